"""The sampler: DAMON's idea, carried out with userfaultfd.

Like DAMON, it watches regions instead of pages: each registered range is
cut into regions that adapt (split where a region might hide two patterns,
merge neighbours that behave alike), and one page per region stands for
the region.  Unlike DAMON, which reads page-table access bits, it learns
that a page was used by taking it out of the target and seeing whether
the target faults on it: the page is moved (no copy) to a staging area
the client library set aside, and a fault copies it back and counts
(native/core/sample.c).

Every `sample_ms`, the pages sampled last time are collected (the unused
ones go back untouched) and a new page is sampled in each region that has
not shown use in the current window.  Every `damon_read_ms` the window
closes: regions used in it have their pages stamped as used now; the
others age.  So a hot region costs at most one fault per window, and a
cold one two page moves (1.6 us each here) per sample.

The moves are the target's agent's to make (the kernel allows UFFDIO_MOVE
only within one's own address space): one SAMPLE request per interval,
which also has the agent zap the staging area first, so slots the pages
were copied back from are empty again.  Only resident pages are sampled:
a page comes back writable, and a clean page must stay write-protected
(its writes are seen that way anyway).

Overhead, reported in the session's stat: `samples` (pages taken out),
`sampler_faults` (faults they caused: accesses seen), `sampler_cpu_ns`
(time this code spent on the event loop thread, the native calls
included), `sampler_regions`.
"""
from __future__ import annotations

import bisect
import random
import time

import trio

from .. import protocol
from ..core import now_ms
from . import AccessSource, HeatRegion

MIN_REGIONS_PER_RANGE = 10  # as DAMON's default nr_regions min: small hot spots stay findable
EWMA = 0.3  # weight of the newest window in freq
MAX_SLOWDOWN = 32  # an idle session is sampled every 32 * sample_ms at the slowest
PARKED_WINDOWS = 60  # then its samples stay out, waiting for a fault, this many windows at most


class Region:
    __slots__ = ("range", "first", "count", "hits", "sampled", "freq", "last_used_ms", "used_last_window")

    def __init__(self, range_index: int, first: int, count: int, born_ms: int):
        self.range = range_index
        self.first = first
        self.count = count
        self.hits = 0  # samples found used in this window
        self.sampled = False  # a page of it is out now
        self.freq = 0.0
        self.last_used_ms = born_ms
        self.used_last_window = False


class Sampler(AccessSource):
    name = "sampler"
    COUNTERS = ("sampler_cpu_ns", "sampler_regions", "access_windows", "sampler_interval_ms", "sampler_parked")

    def __init__(self, session, config):
        super().__init__(session)
        self.config = config
        self.rng = random.Random(session.id)
        born = now_ms()
        self.regions: dict[int, list[Region]] = {}
        for info in session.native.ranges():
            k = max(1, min(MIN_REGIONS_PER_RANGE, info.npages))
            step = -(-info.npages // k)
            self.regions[info.index] = [Region(info.index, f, min(step, info.npages - f), born)
                                        for f in range(0, info.npages, step)]
        self.cpu_ns = 0
        self.windows = 0
        self.slowdown = 1  # the interval is sample_ms times this (see _pace)
        self.parked = 0  # times it waited for a fault instead of sampling
        self._faults_seen = 0
        self._window_used = 0  # samples found used in the current window

    # -- the loop -------------------------------------------------------------------
    async def run(self) -> None:
        window_start = time.monotonic()
        while True:
            if self.slowdown >= MAX_SLOWDOWN:
                # idle through a whole window at the slowest pace: the pages out now
                # are enough to notice use, since using one faults
                self.parked += 1
                await self.session.wait_for_change(self.config.get("damon_read_ms") * PARKED_WINDOWS / 1000)
                self.slowdown = MAX_SLOWDOWN // 2  # the next window decides again
            else:
                await trio.sleep(self.config.get("sample_ms") * self.slowdown / 1000)
            t0 = time.thread_time_ns()
            try:
                used = self._collect()
                self._window_used += used
                if used:
                    self.slowdown = 1
                if time.monotonic() - window_start >= self.config.get("damon_read_ms") / 1000:
                    window_start = time.monotonic()
                    self._pace()
                    self._close_window()
                moves, zap = self._prepare()
            finally:
                self.cpu_ns += time.thread_time_ns() - t0
            if moves or zap:
                await self.session.agent.sample(moves, zap)

    def _region_of(self, range_index: int, page: int) -> Region | None:
        regs = self.regions.get(range_index)
        if not regs:
            return None
        i = bisect.bisect_right(regs, page, key=lambda r: r.first) - 1
        return regs[i] if i >= 0 and page < regs[i].first + regs[i].count else None

    def _pace(self) -> None:
        """At the end of a window.  An idle target costs a round trip to its agent
        per interval for nothing: after a whole window in which no sample was used
        and no page faulted, the interval doubles (up to MAX_SLOWDOWN times
        sample_ms); any use brings it back at once.  Judged per window, not per
        interval, because a region that showed use is not sampled again in the
        same window: the intervals after it see no use from a hot target too."""
        c = self.session.native.counters()
        faults = c["faults_missing"] + c["faults_wp"]
        if self._window_used or faults != self._faults_seen:
            self.slowdown = 1
        else:
            self.slowdown = min(MAX_SLOWDOWN, self.slowdown * 2)
        self._faults_seen = faults
        self._window_used = 0

    def _collect(self) -> int:
        """Take the samples back; how many were found used."""
        used_n = 0
        for r in (reg for regs in self.regions.values() for reg in regs):
            r.sampled = False
        for range_index, page, used in self.session.native.sample_collect():
            reg = self._region_of(range_index, page)
            if reg is not None and used:
                reg.hits += 1
                used_n += 1
        return used_n

    def _prepare(self):
        """A page of each region not yet seen used in this window: the moves to ask for."""
        picks = []
        for regs in self.regions.values():
            for reg in regs:
                if not reg.hits:  # once used in this window, the region is known hot
                    picks.append((reg.range, reg.first + self.rng.randrange(reg.count)))
                    reg.sampled = True
        return self.session.native.sample_prepare(picks[:protocol.SAMPLE_MAX_MOVES])

    def _close_window(self) -> None:
        now = now_ms()
        used = []
        for regs in self.regions.values():
            for reg in regs:
                reg.used_last_window = reg.hits > 0
                reg.freq = (1 - EWMA) * reg.freq + EWMA * (1.0 if reg.hits else 0.0)
                if reg.hits:
                    reg.last_used_ms = now
                    used.append((reg.range, reg.first, reg.count))
        self.session.native.note_access(used, now)
        self._adapt()
        for regs in self.regions.values():
            for reg in regs:
                reg.hits = 0
        self.windows += 1

    def _adapt(self) -> None:
        """Merge neighbours that behaved alike, then split while regions are few."""
        max_regions = self.config.get("max_regions")
        per_range = max(MIN_REGIONS_PER_RANGE, max_regions // max(1, len(self.regions)))
        for ri, regs in self.regions.items():
            merged = [regs[0]]
            for n, reg in enumerate(regs[1:], start=2):
                last = merged[-1]
                left = len(regs) - n  # regions after this one
                if (reg.used_last_window == last.used_last_window and abs(reg.freq - last.freq) < 0.1
                        and len(merged) + left >= MIN_REGIONS_PER_RANGE):
                    total = last.count + reg.count
                    last.freq = (last.freq * last.count + reg.freq * reg.count) / total
                    last.last_used_ms = max(last.last_used_ms, reg.last_used_ms)
                    last.count = total
                else:
                    merged.append(reg)
            if len(merged) * 2 <= per_range:
                split = []
                for reg in merged:
                    if reg.count >= 2:
                        cut = 1 + self.rng.randrange(reg.count - 1)
                        a = Region(ri, reg.first, cut, reg.last_used_ms)
                        b = Region(ri, reg.first + cut, reg.count - cut, reg.last_used_ms)
                        for new in (a, b):
                            new.freq, new.used_last_window = reg.freq, reg.used_last_window
                        split += [a, b]
                    else:
                        split.append(reg)
                merged = split
            self.regions[ri] = merged

    # -- reporting ----------------------------------------------------------------
    def heat(self, range_index: int) -> list[HeatRegion]:
        now = now_ms()
        return [HeatRegion(r.first, r.count, r.hits, round(100 * r.freq), max(0, now - r.last_used_ms))
                for r in self.regions.get(range_index, [])]

    def counters(self) -> dict[str, int]:
        return dict(zip(self.COUNTERS, (self.cpu_ns, sum(len(r) for r in self.regions.values()),
                                        self.windows, self.config.get("sample_ms") * self.slowdown,
                                        self.parked)))

    async def close(self) -> None:
        """Every sampled page goes home (before the session gives its pages back; the
        requests to the agent have been settled by then: see Pager.close)."""
        self.session.native.sample_collect(final=True)
