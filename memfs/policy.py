"""What the daemon does by itself with a session's memory.

Every `damon_read_ms`, per session:

1. Promotions (faults that had to restore an evicted page) are turned into
   a rate: percent of the working set (resident registered pages) per
   minute.  Above `promotion_target_pct` the policy backs off: the age at
   which a page counts as cold doubles (up to 64x cold_age_ms); below half
   the target it comes back down.  Google's far-memory system runs at about
   0.2 % per minute; that is the default.
2. While the session's resident registered memory is above its
   `soft_cap_bytes`, its coldest pages are evicted down to the cap (the
   cap wins over the back-off).
3. Otherwise pages idle for the (backed-off) cold age are cold:
   `policy compress` gives them compressed copies in the background, so
   that evicting them later costs nothing; `policy evict` frees them.
4. Then, unless `recompress_age_ms` is max, copies of pages idle that long
   are encoded again with lz4hc (the `recompress` verb), oldest first, at
   most RECOMPRESS_ROUND_PAGES a round: memory for CPU spent once per copy,
   as zram's recompress of idle pages, without one round holding the
   session's operations (a user's `echo evict > ctl`) for long.
5. A fault rate above `degraded_fault_rate` (faults per second) sets the
   session's `degraded` event to 1; it goes back to 0 below half of it.

Settings are read each round from the session's config (overrides, then
the daemon's), so changes apply without a restart.

A round that finds nothing the policy could ever act on without the target
doing something first (no fault since the last round, no page that could
become cold, under the cap, not degraded) makes the policy idle: it then
waits for the session's next fault or operation, or a settings change, and
looks again at least every MAX_IDLE_ROUNDS periods.  Sixteen idle sessions
would otherwise cost the daemon a round per second each, for nothing.
"""
from __future__ import annotations

import logging
import math
import time

import trio

from .config import MAX
from .core import PAGE_SIZE
from .selection import CANDIDATES

log = logging.getLogger("memfs.policy")

MAX_BACKOFF = 64
MAX_IDLE_ROUNDS = 60
# 8 MiB of pages: about 0.1 s of CPU for text-like pages here (recompressing 1 GiB of
# text takes 13-16 s of the daemon's CPU: memfs bench, its recompress table), so a
# tenth of a CPU per session at the default round of 1 s
RECOMPRESS_ROUND_PAGES = 2048
PRESENT = CANDIDATES["evict"].states  # resident and clean


class Policy:
    COUNTERS = ("policy_rounds", "policy_compress_pages", "policy_evict_pages", "policy_recompress_pages",
                "cold_page_marks", "policy_backoffs", "policy_cold_age_ms", "promotion_rate_ppm",
                "policy_idle_waits")

    def __init__(self, session):
        self.session = session
        self.backoff = 1
        self.compressed = 0
        self.evicted = 0
        self.recompressed = 0
        self.cold_marks = 0
        self.backoffs = 0
        self.rounds = 0
        self.promotion_rate_ppm = 0  # parts per million of the working set per minute
        self.idle = False  # the last round found nothing to do until the target acts
        self.idle_waits = 0
        self._last: tuple[float, int, int] | None = None

    def cold_age_ms(self) -> int:
        return self.session.config.get("cold_age_ms") * self.backoff

    async def run(self) -> None:
        last_round = -math.inf
        while True:
            period = self.session.config.get("damon_read_ms") / 1000
            if self.idle:
                self.idle_waits += 1
                await self.session.wait_for_change(period * MAX_IDLE_ROUNDS)
                # Still one round a period at most: an operation in progress (a prefetch
                # without faults) notifies on every batch, and each round would cost
                # the daemon's thread a scan of the session while the pages go in.
                await trio.sleep_until(last_round + period)
            else:
                await trio.sleep(period)
            last_round = trio.current_time()
            try:
                await self.step()
            except OSError as e:
                log.info("%s: policy round stopped: %s", self.session, e)

    async def step(self) -> None:
        s, cfg = self.session, self.session.config
        c = s.native.counters()
        now = time.monotonic()
        resident = sum(r.pages_in["resident"] + r.pages_in["clean"] for r in s.native.ranges())
        faults = c["faults_missing"] + c["faults_wp"]
        quiet = self._last is not None and faults == self._last[2]
        self.idle = False
        if self._last is not None:
            dt = max(1e-3, now - self._last[0])
            promotions = c["promotions"] - self._last[1]
            rate_pct = promotions / max(1, resident) * 100 * 60 / dt
            self.promotion_rate_ppm = int(rate_pct * 10_000)
            target = cfg.get("promotion_target_pct")
            if rate_pct > target and self.backoff < MAX_BACKOFF:
                self.backoff *= 2
                self.backoffs += 1
            elif rate_pct < target / 2 and self.backoff > 1:
                self.backoff //= 2
            fault_rate = (faults - self._last[2]) / dt
            threshold = cfg.get("degraded_fault_rate")
            if fault_rate > threshold:
                s.set_degraded(True)
            elif fault_rate < threshold / 2:
                s.set_degraded(False)
        self._last = (now, c["promotions"], faults)
        self.rounds += 1

        mode = cfg.get("policy")
        pager = s.pager
        cap = cfg.get("soft_cap_bytes")
        over_cap = cap is not None and resident * PAGE_SIZE > cap and pager.can_free
        if quiet and not over_cap and not s.events.counts.get("degraded") and not self._could_act(mode):
            self.idle = True
            return
        if mode == "off":
            return
        if over_cap:
            excess = -(-(resident * PAGE_SIZE - cap) // PAGE_SIZE)
            runs, _ = s.native.select(None, PRESENT, max_pages=excess, order=1)
            self.evicted += (await pager.evict(runs)).done
            return
        age = self.cold_age_ms()
        if mode == "evict" and pager.can_free:
            runs, n = s.native.select(None, PRESENT, min_age_ms=age)
            self.cold_marks += n
            if runs:
                self.evicted += (await pager.evict(runs)).done
        else:
            # what the compress verb would act on: pages that did not compress last time are
            # left alone until written (offering them every round would cost an idle session CPU)
            c = CANDIDATES["compress"]
            runs, n = s.native.select(None, c.states, min_age_ms=age, skip=c.skip)
            self.cold_marks += n
            if runs:
                self.compressed += (await pager.compress(runs)).done
        recompress_age = cfg.get("recompress_age_ms")
        if recompress_age is not MAX:
            c = CANDIDATES["recompress"]  # each copy once: those done are skipped
            runs, _ = s.native.select(None, c.states, min_age_ms=recompress_age,
                                      max_pages=RECOMPRESS_ROUND_PAGES, order=1, skip=c.skip)
            if runs:
                self.recompressed += (await pager.recompress(runs)).done

    def _could_act(self, mode: str) -> bool:
        """Is there a page this policy could act on once it is old enough?"""
        s = self.session
        if mode == "off":
            return False
        if s.config.get("recompress_age_ms") is not MAX:
            c = CANDIDATES["recompress"]
            if s.native.select(None, c.states, max_pages=1, skip=c.skip)[1] > 0:
                return True
        if mode == "evict" and s.pager.can_free:
            return s.native.select(None, PRESENT, max_pages=1)[1] > 0
        # compress, and evict where pages cannot be freed (step() compresses them then)
        c = CANDIDATES["compress"]
        return s.native.select(None, c.states, max_pages=1, skip=c.skip)[1] > 0

    def counters(self) -> dict[str, int]:
        return dict(zip(self.COUNTERS, (self.rounds, self.compressed, self.evicted, self.recompressed,
                                        self.cold_marks, self.backoffs, self.cold_age_ms(),
                                        self.promotion_rate_ppm, self.idle_waits)))
