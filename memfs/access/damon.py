"""DAMON's virtual-address monitoring, through the sysfs admin tree.

One kdamond per session: a kdamond has one context, a context reports its
regions without saying which target they belong to, and two targets may
use the same addresses.  Each context monitors its target's registered
ranges only (one initial region per range, never a span across holes;
`update_us` is set so long that DAMON does not replace them with its own
"three regions" guess) and carries one `stat` scheme whose tried regions
are read every `damon_read_ms`, as damo does.  A region used in the last
aggregation interval stamps its pages as used now.  An idle region stamps
nothing: it is no evidence of use, and DAMON restarts a region's `age`
whenever it splits or merges it, so "idle for age intervals" would make
cold pages look young (the heat file shows the age).

Whose kdamonds these are: memfs only ever writes to kdamonds it created.
Adding kdamonds means rewriting `nr_kdamonds`, which drops every existing
kdamond directory (and fails with EBUSY while any runs), so memfs uses
DAMON only when no other kdamond exists, and records the ones it made in
a state file: for each, its operations, target pid and update interval.  The
next daemon tears down what a crashed one left only if every kdamond
still matches that record; otherwise they are someone else's now, and
it leaves them alone.  All of them go when the daemon stops.
"""
from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import trio

from ..core import PAGE_SIZE, now_ms
from . import AccessSource, HeatRegion

log = logging.getLogger("memfs.access")

ADMIN = Path("/sys/kernel/mm/damon/admin")
STATE_FILE = Path("/run/memfs/damon-kdamonds.json")
UPDATE_US = 3_600_000_000  # do not let vaddr's periodic update replace our regions
# the stat scheme must match every region: its default access pattern matches none
MATCH_ALL = {"sz": 2**64 - 1, "nr_accesses": 2**32 - 1, "age": 2**32 - 1}


def _read(path: Path) -> str:
    return path.read_text().strip()


def _write(path: Path, value) -> None:
    with open(path, "w") as f:
        f.write(f"{value}\n")


class Damon:
    """The kdamonds memfs owns: one per session using DAMON."""

    def __init__(self, config, admin: Path = ADMIN, state_file: Path = STATE_FILE):
        self.config = config
        self.admin = admin
        self.state_file = state_file
        self.kdamonds = admin / "kdamonds"
        self.sessions: list = []
        self.owned = 0
        self._lock = trio.Lock()

    # -- may we? ---------------------------------------------------------------
    def probe(self) -> str:
        """Why DAMON cannot be used here ("" if it can).  Writes nothing that is not ours."""
        if not (self.kdamonds / "nr_kdamonds").exists():
            return "the kernel has no DAMON sysfs interface (CONFIG_DAMON_SYSFS)"
        try:
            self._clean_leftovers()
            n = int(_read(self.kdamonds / "nr_kdamonds"))
            if n:
                ops = self._avail_operations(0)
                if ops is not None and "vaddr" not in ops.split():
                    return f"DAMON here has no vaddr operations (avail_operations: {ops})"
                return (f"{n} kdamond(s) of others exist: adding one rewrites nr_kdamonds, which would "
                        "remove theirs (and fails with EBUSY while one runs)")
            # nothing there: make one (ours) just to learn what this kernel offers
            _write(self.kdamonds / "nr_kdamonds", 1)
            try:
                _write(self.kdamonds / "0" / "contexts" / "nr_contexts", 1)
                ops = self._avail_operations(0) or ""
            finally:
                _write(self.kdamonds / "nr_kdamonds", 0)
            if "vaddr" not in ops.split():
                return f"DAMON here has no vaddr operations (avail_operations: {ops})"
        except OSError as e:
            return f"DAMON sysfs: {e.strerror or e}"
        return ""

    def _avail_operations(self, k: int) -> str | None:
        path = self.kdamonds / str(k) / "contexts" / "0" / "avail_operations"
        return _read(path) if path.exists() else None

    def _identity(self, k: int) -> dict:
        """What marks kdamond k as the one we configured (our update_us is unusual)."""
        ctx = self.kdamonds / str(k) / "contexts" / "0"
        ident: dict[str, str | None] = {}
        for key, path in (("ops", ctx / "operations"),
                          ("target", ctx / "targets" / "0" / "pid_target"),
                          ("update_us", ctx / "monitoring_attrs" / "intervals" / "update_us")):
            try:
                ident[key] = _read(path)
            except OSError:
                ident[key] = None
        return ident

    def _clean_leftovers(self) -> None:
        """Tear down kdamonds a crashed memfs left, if they are still exactly those."""
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        pid, ours = state.get("pid"), state.get("kdamonds", [])
        if pid and os.path.exists(f"/proc/{pid}") and pid != os.getpid():
            raise OSError(errno.EBUSY, f"another memfs daemon (pid {pid}) owns kdamonds")
        n = int(_read(self.kdamonds / "nr_kdamonds"))
        if ours and n == len(ours) and all(self._identity(k) == ident for k, ident in enumerate(ours)):
            log.warning("access: stopping %d kdamond(s) left by a memfs daemon that died", n)
            for k in range(n):
                self._stop(k)
            _write(self.kdamonds / "nr_kdamonds", 0)
        elif ours:
            log.warning("access: kdamonds recorded by a memfs daemon that died are not as it left "
                        "them: someone else's now; leaving them alone")
        self.state_file.unlink(missing_ok=True)

    def _stop(self, k: int) -> None:
        state = self.kdamonds / str(k) / "state"
        if state.exists() and _read(state) == "on":
            _write(state, "off")

    # -- ours ------------------------------------------------------------------------
    def _apply(self, sessions: list) -> None:
        """Reconfigure our kdamonds for these sessions (all stopped, then restarted)."""
        for k in range(self.owned):
            self._stop(k)
        _write(self.kdamonds / "nr_kdamonds", len(sessions))
        self.owned = len(sessions)
        for k, s in enumerate(sessions):
            self._configure(k, s)
            _write(self.kdamonds / str(k) / "state", "on")
            s.access.kdamond = k
        if sessions:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self.state_file.write_text(json.dumps(
                {"pid": os.getpid(), "kdamonds": [self._identity(k) for k in range(len(sessions))]}))
        else:
            self.state_file.unlink(missing_ok=True)

    def _configure(self, k: int, session) -> None:
        ctx = self.kdamonds / str(k) / "contexts"
        _write(ctx / "nr_contexts", 1)
        c = ctx / "0"
        _write(c / "operations", "vaddr")
        attrs = c / "monitoring_attrs"
        _write(attrs / "intervals" / "sample_us", self.config.get("sample_ms") * 1000)
        _write(attrs / "intervals" / "aggr_us", self.config.get("damon_read_ms") * 1000)
        _write(attrs / "intervals" / "update_us", UPDATE_US)
        _write(attrs / "nr_regions" / "min", max(3, len(session.native.ranges())))
        _write(attrs / "nr_regions" / "max", max(10, self.config.get("max_regions")))
        _write(c / "targets" / "nr_targets", 1)
        t = c / "targets" / "0"
        _write(t / "pid_target", session.pid)
        ranges = session.native.ranges()
        _write(t / "regions" / "nr_regions", len(ranges))
        for i, r in enumerate(sorted(ranges, key=lambda r: r.start)):
            _write(t / "regions" / str(i) / "start", r.start)
            _write(t / "regions" / str(i) / "end", r.start + r.length)
        _write(c / "schemes" / "nr_schemes", 1)
        scheme = c / "schemes" / "0"
        _write(scheme / "action", "stat")
        for name, top in MATCH_ALL.items():
            _write(scheme / "access_pattern" / name / "min", 0)
            _write(scheme / "access_pattern" / name / "max", top)

    async def attach(self, session) -> None:
        async with self._lock:
            self.sessions.append(session)
            await trio.to_thread.run_sync(self._apply, list(self.sessions))

    async def detach(self, session) -> None:
        async with self._lock:
            if session in self.sessions:
                self.sessions.remove(session)
                await trio.to_thread.run_sync(self._apply, list(self.sessions))

    async def shutdown(self) -> None:
        async with self._lock:
            if self.owned:
                self.sessions.clear()
                await trio.to_thread.run_sync(self._apply, [])

    def snapshot(self, k: int) -> list[tuple[int, int, int, int]]:
        """(start, end, nr_accesses, age) of kdamond k's regions, freshly updated."""
        _write(self.kdamonds / str(k) / "state", "update_schemes_tried_regions")
        base = self.kdamonds / str(k) / "contexts" / "0" / "schemes" / "0" / "tried_regions"
        out = []
        for d in sorted((p for p in base.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)):
            start, end, nr, age = (int(_read(d / f)) for f in ("start", "end", "nr_accesses", "age"))
            out.append((start, end, nr, age))
        return out


class DamonSource(AccessSource):
    name = "damon"
    COUNTERS = ("damon_snapshots", "damon_regions_read")

    def __init__(self, session, damon: Damon):
        super().__init__(session)
        self.damon = damon
        self.kdamond = -1
        self.snapshots = 0
        self.regions_read = 0
        self._heat: dict[int, list[HeatRegion]] = {}

    async def run(self) -> None:
        await self.damon.attach(self.session)
        try:
            while True:
                await trio.sleep(self.damon.config.get("damon_read_ms") / 1000)
                regions = await trio.to_thread.run_sync(self.damon.snapshot, self.kdamond)
                self._apply(regions)
        finally:
            # shielded as a whole: taking the lock is itself a checkpoint, and a
            # cancelled session must still give its kdamond back
            with trio.CancelScope(shield=True):
                await self.damon.detach(self.session)

    def _apply(self, regions) -> None:
        now = now_ms()
        aggr_ms = self.damon.config.get("damon_read_ms")
        samples_per_aggr = aggr_ms // max(1, self.damon.config.get("sample_ms"))
        heat: dict[int, list[HeatRegion]] = {}
        infos = self.session.native.ranges()
        used = []
        for start, end, nr_accesses, age in regions:
            for info in infos:
                lo, hi = max(start, info.start), min(end, info.start + info.length)
                if lo >= hi:
                    continue
                first = (lo - info.start) // PAGE_SIZE
                count = -(-(hi - info.start) // PAGE_SIZE) - first
                if nr_accesses:
                    used.append((info.index, first, count))
                heat.setdefault(info.index, []).append(HeatRegion(
                    first, count, nr_accesses, 100 * nr_accesses // max(1, samples_per_aggr),
                    0 if nr_accesses else age * aggr_ms))
        self.session.native.note_access(used, now)
        self._heat = heat
        self.snapshots += 1
        self.regions_read += len(regions)

    def heat(self, range_index: int) -> list[HeatRegion]:
        return self._heat.get(range_index, [])

    def counters(self) -> dict[str, int]:
        return dict(zip(self.COUNTERS, (self.snapshots, self.regions_read)))
