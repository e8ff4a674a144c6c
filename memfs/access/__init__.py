"""Evidence of use: which pages of a target are hot and which are cold.

Every source turns what it observes into page stamps in the native page
table (mc_note_access: "this page was used at t"), which is all the
selectors `cold` and `bytes=` and the policy look at.  The pager's own
faults stamp pages too; a source only ever makes pages younger.

    damon     DAMON's vaddr monitoring through the sysfs admin tree, one
              kdamond per session (damon.py)
    sampler   DAMON's idea carried out with userfaultfd (sampler.py)
    none      the pager's faults alone

`AccessMonitor` decides, once for the daemon, whether DAMON can be used
here, and hands each session the best source it can have.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger("memfs.access")


@dataclass
class HeatRegion:
    """A region of pages with one access pattern (the `heat` file)."""
    first: int
    count: int
    nr_accesses: int  # in the last window
    freq_pct: int  # share of recent windows in which it was used
    age_ms: int  # since it was last seen used


class AccessSource:
    """The pager's faults alone: no monitoring."""

    name = "none"
    COUNTERS: tuple[str, ...] = ()

    def __init__(self, session, reason: str = ""):
        self.session = session
        self.reason = reason

    async def run(self) -> None:
        """Observe until cancelled."""

    def heat(self, range_index: int) -> list[HeatRegion]:
        return []

    def counters(self) -> dict[str, int]:
        return {}

    async def close(self) -> None:
        """Leave the target as it was (called before the session's pages go back)."""


class AccessMonitor:
    """Chooses each session's source; owns what sources share (DAMON's kdamonds)."""

    def __init__(self, config):
        from .damon import Damon
        self.config = config
        self.damon = Damon(config)
        self.damon_reason = self.damon.probe()
        if self.damon_reason:
            log.warning("access: DAMON not used: %s; sessions use the sampler", self.damon_reason)

    def source_for(self, session) -> AccessSource:
        from .damon import DamonSource
        from .sampler import Sampler
        wanted = self.config.get("access_source")
        if wanted == "none":
            return AccessSource(session, "access_source is none")
        if wanted == "auto" and not self.damon_reason:
            return DamonSource(session, self.damon)
        if session.native.staging_pages:
            return Sampler(session, self.config)
        return AccessSource(session, "the client set aside no staging area for the sampler")

    def describe(self) -> dict[str, str]:
        return {"damon": "available" if not self.damon_reason else "unavailable",
                "damon_reason": self.damon_reason or "-",
                "sampler": "available"}

    async def close(self) -> None:
        await self.damon.shutdown()
