"""memfs and zram side by side: the same data, the same target, one run.

For each data set each system has a fresh target process
(native/build/memfs-target) holding the data, the two alive together, and
their steps alternate (`run_pair`): zram's eviction, memfs's, zram's
in-order read-back, memfs's, and so on.  What each does:

  zram   zram0 is swap (lz4); the target MADV_PAGEOUTs its region, then reads
         it back in order, pages it out again and reads pages in random order.
  memfs  the target is registered with a daemon started for the run; `evict`
         is written to the session's ctl, then the same two read-backs; then
         `evict` and `prefetch` (the prefetch throughput); then `recompress`
         (lz4hc) and again `evict` and `prefetch`.

  floor  the same random reads, on a fresh region of the same size, served by
         a bare userfaultfd handler in another process that copies in one
         constant page and nothing else, both pinned to one CPU (memfs-target
         `bare`): the least a fault served from user space costs here.  Set
         against zram it shows how much of the random-fault goals the
         mechanism alone uses up; against memfs, what memfs adds.

Each read-back and prefetch is timed `--repeat` times (default 3), evicting
in between, and the median of each figure (throughput, p50, p99, p99.9) is
reported: on this VM one run of a step can differ from the next by 10-30 %
in throughput and by more in p99, for reasons of the host's, and one
unlucky run should not decide a ratio.  Eviction is timed once, the first,
from resident memory (a second would find memfs's copies still valid).
The daemon's CPU time covers all of its steps on the data set, repetitions
included (it idles through zram's).

Before the data sets the run measures the machine's noise: a target spins
reading the clock (memfs-target `gaps`) and counts what takes its CPU away
for over 10 us.  On this VM that is a timer tick or the host, hundreds of
times a second, for tens of microseconds each; a fault that meets one is
that much slower.  The share of faults that meet one -- this rate over the
rate of faults -- decides whether a random-fault p99 lies in the fast
cluster or the slow one, so the BENCHMARKS.md header gives it, and a
table counts each system's touches over 40 us (memfs-target's slow=), per
cent and per second of reading, and per second those that spanned a timer
tick (memfs-target --tick-hz, with the kernel's CONFIG_HZ): the machine's
for any system, while the others show what a pager adds.  A prefetch's CPU
is split into decoding and copying in (the session counters
prefetch_decode_ns, prefetch_copy_ns), and set against what its threads
would reach doing only that.  Last, memfs
`recompress`es the copies (lz4hc) and times the prefetches again.

After all repetitions of the goals' random reads, which come back to back,
each system reads up to THINK_TOUCHES pages at random (REPEAT times) with
THINK_US of the target's own work before each (memfs-target `touch rand N SEED THINK_US`): what a program
that computes between faults sees.  No goal rides on it.

Fresh memory is warmed before every timed step, for both systems alike
(`warm_free_memory`): this VM hands free guest pages back to its host
(virtio-balloon free page reporting), and the first touch of such a page
costs the host a fault, ~12 us, more than restoring a page.  Which system
happened to get those pages would decide the result; touching and freeing
the step's worth of memory just before puts both on recently used pages.
`--no-warm` measures without it.

Times of single touches are taken in the target (clock_gettime around each
read), eviction and prefetch times around the operation (madvise in the
target; the ctl write for memfs, which returns when the work is done).
Memory saved is the target's RSS drop minus what holding the data costs:
zram's mem_used_total, or the growth of the daemon's RSS.  Every target
verifies all its pages at the end of each system's turn.

The machine is put back afterwards: swapoff, zram reset, the daemon stopped
and unmounted, every process killed.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import io
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, fields
from pathlib import Path

from .. import native
from ..dev.localdaemon import DaemonFailed, LocalDaemon
from ..pager import WORKERS
from ..report import proc_status
from . import realdata

TARGET = native.path("bin", "memfs-target")
ZRAM = Path("/sys/block/zram0")
DATASETS = ("mixed", "text", "random", "real")
PAGE = 4096
TICK = os.sysconf("SC_CLK_TCK")
THINK_US = 1000      # the target's own work between two reads, in the reads with work between them
THINK_TOUCHES = 1000  # ... and how many of them (at most the random reads')


def kernel_hz() -> int | None:
    """The kernel's timer tick rate (CONFIG_HZ), from /proc/config.gz; None if it does not say."""
    try:
        with gzip.open("/proc/config.gz", "rt") as f:
            return next((int(line.split("=", 1)[1]) for line in f if line.startswith("CONFIG_HZ=")), None)
    except (OSError, ValueError):
        return None


HZ = kernel_hz()  # memfs-target --tick-hz: which slow touches spanned a tick
STARTED = time.monotonic()


class BenchError(Exception):
    pass


def progress(msg: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f}s] {msg}", file=sys.stderr, flush=True)


WARM = True
PIN_CPU: int | None = None  # --pin-cpu: every target's threads on this CPU
REPEAT = 3  # read-backs and prefetches per system and data set; the median is reported


def warm_free_memory(mb: int) -> None:
    """Touch and free `mb` MiB (plus slack), so that the pages the next step
    allocates are ones the host still backs (see the module docstring)."""
    if not WARM:
        return
    n = (mb + 64) << 20
    m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_NOHUGEPAGE)
        for off in range(0, n, PAGE):
            m[off] = 1
    finally:
        m.close()


# -- processes -----------------------------------------------------------------
def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of a whole process."""
    with open(f"/proc/{pid}/stat") as f:
        fields_ = f.read().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / TICK


class Target:
    """A memfs-target process, driven line by line."""

    def __init__(self, mb: int, dataset: str, socket: Path | None):
        args = [str(TARGET), "--mb", str(mb)]
        args += ["--data", str(realdata.image(mb))] if dataset == "real" else ["--pattern", dataset]
        args += ["--socket", str(socket)] if socket else ["--no-start"]
        args += ["--tick-hz", str(HZ)] if HZ else []
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        ready = self.proc.stdout.readline().split()
        if not ready or ready[0] != "READY":
            self.close()
            raise BenchError(f"the target did not start: {' '.join(ready) or 'no answer'}")
        self.info = dict(kv.split("=", 1) for kv in ready[1:])
        self.pid = self.proc.pid
        if PIN_CPU is not None:  # all its threads: the client library's agent runs already
            for tid in os.listdir(f"/proc/{self.pid}/task"):
                os.sched_setaffinity(int(tid), {PIN_CPU})

    def cmd(self, line: str) -> dict[str, str]:
        self.proc.stdin.write(line + "\n")
        answer = self.proc.stdout.readline().split()
        if not answer or answer[0] == "ERROR":
            raise BenchError(f"target: {line}: {' '.join(answer) or 'no answer'}")
        return dict(kv.split("=", 1) for kv in answer[1:] if "=" in kv)

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def cpu(self) -> float:
        return proc_cpu(self.pid)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("exit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# -- the two systems -------------------------------------------------------------
class Zram:
    """zram0 as the only swap, lz4, for the length of the run."""

    def __init__(self, disksize: int):
        self.disksize = disksize
        self.on = False

    def __enter__(self):
        if not ZRAM.exists():
            raise BenchError("no zram0 device: load the zram module (modprobe zram) to compare with it")
        with open("/proc/swaps") as f:
            used = [line.split()[0] for line in f.readlines()[1:]]
        if used:
            raise BenchError(f"swap is in use ({', '.join(used)}): zram must be the only swap for a fair "
                             "comparison; swapoff first")
        if (ZRAM / "initstate").read_text().strip() != "0":
            raise BenchError("zram0 is initialised by someone else; reset it first (echo 1 > /sys/block/zram0/reset)")
        if "lz4" not in (ZRAM / "comp_algorithm").read_text().replace("[", " ").replace("]", " ").split():
            raise BenchError("zram0 has no lz4 compressor")
        (ZRAM / "comp_algorithm").write_text("lz4")
        (ZRAM / "disksize").write_text(str(self.disksize))
        subprocess.run(["mkswap", "/dev/zram0"], check=True, capture_output=True)
        subprocess.run(["swapon", "-p", "32767", "/dev/zram0"], check=True)
        self.on = True
        return self

    def mm_stat(self) -> dict[str, int]:
        names = ("orig_data_size", "compr_data_size", "mem_used_total", "mem_limit", "mem_used_max",
                 "same_pages", "pages_compacted", "huge_pages")
        return dict(zip(names, map(int, (ZRAM / "mm_stat").read_text().split())))

    def __exit__(self, *exc):
        if self.on:
            subprocess.run(["swapoff", "/dev/zram0"], check=False)
        if ZRAM.exists():
            try:
                (ZRAM / "reset").write_text("1")
            except OSError as e:
                print(f"memfs bench: could not reset zram0: {e}", file=sys.stderr)


class Memfs(LocalDaemon):
    """A daemon for the length of the run: no access source, no policy, so that
    only the benchmark moves pages."""

    def __init__(self, settings: list[str]):
        super().__init__("--access-source", "none", "--policy", "off", *settings,
                         prefix="memfs-bench-", log_to_file=True)

    def __enter__(self):
        try:
            return super().__enter__()
        except DaemonFailed as e:
            raise BenchError(str(e))

    def ctl(self, sid: str, verb: str) -> float:
        """Write a verb to a session's ctl; the seconds it took (the write returns when it is done)."""
        t0 = time.perf_counter()
        with open(self.mnt / "sessions" / sid / "ctl", "w") as f:
            f.write(verb + "\n")
        return time.perf_counter() - t0

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def cpu(self) -> float:
        return proc_cpu(self.pid)


# -- one measurement ------------------------------------------------------------
@dataclass
class Result:
    dataset: str
    system: str
    mb: int
    evict_ms: float = 0.0
    evict_mbps: float = 0.0
    evict_cpu_ms: float = 0.0          # target + daemon (zram: the kernel works in the target)
    seq_restore_ms: float = 0.0
    seq_restore_gbps: float = 0.0
    seq_us_per_page: float = 0.0
    seq_cpu_ms: float = 0.0
    rand_touches: int = 0
    rand_p50_us: float = 0.0
    rand_p99_us: float = 0.0
    rand_p999_us: float = 0.0
    rand_mean_us: float = 0.0          # time per random touch: the read's wall time over its touches
    rand_slow_pct: float = 0.0         # touches over the target's SLOW_NS (40 us), in percent
    rand_slow_per_s: float = 0.0       # ... per second of reading
    rand_slow_tick_per_s: float = 0.0  # ... of them spanning a timer tick (0 when HZ is unknown)
    think_touches: int = 0             # random reads with THINK_US of the target's work before each
    think_p50_us: float = 0.0
    think_p99_us: float = 0.0
    think_p999_us: float = 0.0
    think_slow_pct: float = 0.0        # ... over SLOW_NS, in percent
    prefetch_ms: float = 0.0
    prefetch_gbps: float = 0.0
    prefetch_decode_us: float = 0.0    # per page restored: the prefetch threads' CPU decoding
    prefetch_copy_us: float = 0.0      # ... and copying in (session counters prefetch_*_ns)
    recompress_mbps: float = 0.0       # `recompress` (lz4hc) of the clean pages' copies, logical MB/s
    recompress_cpu_s: float = 0.0      # the daemon's CPU over it
    recompressed_ratio: float = 0.0    # logical / compressed bytes after it
    rc_prefetch_gbps: float = 0.0      # prefetch of the recompressed copies
    rc_prefetch_decode_us: float = 0.0
    rc_prefetch_copy_us: float = 0.0
    rss_before_kb: int = 0
    rss_after_evict_kb: int = 0
    rss_after_readback_kb: int = 0
    vmhwm_kb: int = 0
    holder_kb: int = 0                 # zram mem_used_total; memfs daemon RSS growth
    saved_kb: int = 0                  # RSS drop minus holder_kb
    compressed_bytes: int = 0
    stored_bytes: int = 0              # zram mem_used_total, memfs store_bytes_used
    ratio: float = 0.0                 # logical bytes / compressed bytes
    pager_cpu_s: float = 0.0           # the daemon's CPU over its turn (zram: none, it runs in the kernel)
    verify_bad: int = -1


def median_of(answers: list[dict[str, str]], key: str) -> float:
    """The median of one figure over the repetitions (each figure on its own)."""
    return statistics.median(int(a[key]) for a in answers)


def fill_touches(r: Result, seqs: list[dict], rnds: list[dict], npages: int) -> None:
    wall_ns = median_of(seqs, "wall_ns")
    r.seq_restore_ms = wall_ns / 1e6
    r.seq_restore_gbps = npages * PAGE / (wall_ns / 1e9) / 1e9
    r.seq_us_per_page = wall_ns / 1000 / npages
    fill_random(r, rnds)


def latencies_us(answers: list[dict[str, str]]) -> tuple[float, ...]:
    """p50, p99, p99.9 of touches, in us: the median of each over the repetitions."""
    return tuple(median_of(answers, k) / 1000 for k in ("p50", "p99", "p999"))


def slow_pct(answers: list[dict[str, str]]) -> float:
    return statistics.median(100 * int(a["slow"]) / int(a["n"]) for a in answers)


def fill_random(r: Result, rnds: list[dict]) -> None:
    r.rand_touches = int(rnds[0]["n"])
    r.rand_p50_us, r.rand_p99_us, r.rand_p999_us = latencies_us(rnds)
    r.rand_mean_us = statistics.median(int(a["wall_ns"]) / int(a["n"]) for a in rnds) / 1000
    r.rand_slow_pct = slow_pct(rnds)
    r.rand_slow_per_s = statistics.median(int(a["slow"]) / (int(a["wall_ns"]) / 1e9) for a in rnds)
    if HZ:  # the targets were given --tick-hz, so each answer has slow_tick=
        r.rand_slow_tick_per_s = statistics.median(int(a["slow_tick"]) / (int(a["wall_ns"]) / 1e9)
                                                   for a in rnds)


def fill_think(r: Result, thinks: list[dict]) -> None:
    r.think_touches = int(thinks[0]["n"])
    r.think_p50_us, r.think_p99_us, r.think_p999_us = latencies_us(thinks)
    r.think_slow_pct = slow_pct(thinks)


def evicted(r: Result, before: dict, after: dict, holder: int, compressed: int, stored: int) -> None:
    """The eviction's figures: throughput, and memory saved (the target's RSS drop
    minus `holder`, the bytes the system holds the data in)."""
    r.evict_mbps = r.mb * 1048576 / (r.evict_ms / 1000) / 1e6
    r.rss_before_kb, r.rss_after_evict_kb = before["RssAnon"] // 1024, after["RssAnon"] // 1024
    r.holder_kb = holder // 1024
    r.saved_kb = r.rss_before_kb - r.rss_after_evict_kb - r.holder_kb
    r.compressed_bytes, r.stored_bytes = compressed, stored
    r.ratio = r.mb * 1048576 / max(1, compressed)


def read_backs(r: Result, t: Target, nrand: int, evict, cpu):
    """The read-backs both systems are timed on, REPEAT times: all pages in order,
    then (evicted again by `evict()`) `nrand` at random; after those, REPEAT times
    up to THINK_TOUCHES at random with THINK_US of the target's work before each; `cpu()`
    is what the system spends.  A step at a time; fills `r`'s touch figures and RSS
    after read-back."""
    seqs, seq_cpu, rnds, thinks = [], [], [], []
    for i in range(REPEAT):
        if i:
            evict()
        warm_free_memory(r.mb)
        c0 = cpu()
        seqs.append(t.cmd("touch seq"))
        seq_cpu.append(cpu() - c0)
        if not i:
            r.rss_after_readback_kb = t.status()["RssAnon"] // 1024
        yield "read back in order"
        evict()
        warm_free_memory(nrand * PAGE >> 20)
        rnds.append(t.cmd(f"touch rand {nrand} {7 + i}"))
        yield "read at random"
    # after all the goals' reads, so that nothing these leave behind (where the
    # fault thread sits, its back-offs) meets those
    nthink = min(THINK_TOUCHES, nrand)
    for i in range(REPEAT):
        evict()
        warm_free_memory(nthink * PAGE >> 20)
        thinks.append(t.cmd(f"touch rand {nthink} {17 + i} {THINK_US}"))
        yield f"read at random, {THINK_US} us of work before each read"
    r.seq_cpu_ms = statistics.median(seq_cpu) * 1000
    fill_touches(r, seqs, rnds, int(t.info["pages"]))
    fill_think(r, thinks)


def zram_steps(r: Result, nrand: int, zram: Zram):
    """zram's turn on one data set, a step at a time (see `run_pair`); fills `r`."""
    dataset, mb = r.dataset, r.mb
    t = Target(mb, dataset, None)
    try:
        before, z0 = t.status(), zram.mm_stat()
        c0 = t.cpu()
        warm_free_memory(mb)
        out = t.cmd("pageout")
        if out["rc"] != "0":
            raise BenchError(f"MADV_PAGEOUT failed: {out['rc']}")
        r.evict_cpu_ms = (t.cpu() - c0) * 1000
        r.evict_ms = int(out["wall_ns"]) / 1e6
        after, z1 = t.status(), zram.mm_stat()
        yield "evicted"
        yield from read_backs(r, t, nrand, lambda: t.cmd("pageout"), t.cpu)
        r.verify_bad = int(t.cmd("verify")["bad"])
        r.vmhwm_kb = t.status()["VmHWM"] // 1024
    finally:
        t.close()
    evicted(r, before, after, holder=z1["mem_used_total"] - z0["mem_used_total"],
            compressed=z1["compr_data_size"] - z0["compr_data_size"],
            stored=z1["mem_used_total"] - z0["mem_used_total"])


def memfs_steps(r: Result, nrand: int, memfs: Memfs):
    """memfs's turn on one data set, a step at a time (see `run_pair`); fills `r`."""
    dataset, mb = r.dataset, r.mb
    d0, cpu0 = memfs.status(), memfs.cpu()
    t = Target(mb, dataset, memfs.sock)
    try:
        sid = t.info["session"]
        before = t.status()
        warm_free_memory(mb)
        c0 = t.cpu() + memfs.cpu()
        r.evict_ms = memfs.ctl(sid, "evict") * 1000
        r.evict_cpu_ms = (t.cpu() + memfs.cpu() - c0) * 1000
        after, d1, st = t.status(), memfs.status(), memfs.session_stat(sid)
        yield "evicted"
        yield from read_backs(r, t, nrand, lambda: memfs.ctl(sid, "evict"), lambda: t.cpu() + memfs.cpu())
        wall, r.prefetch_decode_us, r.prefetch_copy_us = yield from prefetches(memfs, sid, mb, "prefetched")
        r.prefetch_ms = wall * 1000
        r.prefetch_gbps = mb * 1048576 / wall / 1e9
        # the pages are clean now, their lz4 copies kept: recompress them, then prefetch again
        c0 = memfs.cpu()
        wall = memfs.ctl(sid, "recompress")
        r.recompress_cpu_s = memfs.cpu() - c0
        r.recompress_mbps = mb * 1048576 / wall / 1e6
        r.recompressed_ratio = mb * 1048576 / max(1, memfs.session_stat(sid)["store_bytes_compressed"])
        yield "recompressed (lz4hc)"
        wall, r.rc_prefetch_decode_us, r.rc_prefetch_copy_us = yield from prefetches(
            memfs, sid, mb, "prefetched the recompressed copies")
        r.rc_prefetch_gbps = mb * 1048576 / wall / 1e9
        r.verify_bad = int(t.cmd("verify")["bad"])
        r.vmhwm_kb = t.status()["VmHWM"] // 1024
    finally:
        t.close()
    r.pager_cpu_s = memfs.cpu() - cpu0
    evicted(r, before, after, holder=max(0, d1["VmRSS"] - d0["VmRSS"]),
            compressed=st["store_bytes_compressed"], stored=st["store_bytes_used"])


def prefetches(memfs: Memfs, sid: str, mb: int, step: str):
    """REPEAT prefetches of the whole region, each after `evict` and warming, a
    step at a time; returns the medians of its wall seconds and of the CPU per
    page restored spent decoding and copying in (microseconds)."""
    walls, decode_us, copy_us = [], [], []
    for _ in range(REPEAT):
        memfs.ctl(sid, "evict")
        warm_free_memory(mb)
        s0 = memfs.session_stat(sid)
        walls.append(memfs.ctl(sid, "prefetch"))
        s1 = memfs.session_stat(sid)
        pages = max(1, s1["prefetch_restored"] - s0["prefetch_restored"])
        decode_us.append((s1["prefetch_decode_ns"] - s0["prefetch_decode_ns"]) / pages / 1000)
        copy_us.append((s1["prefetch_copy_ns"] - s0["prefetch_copy_ns"]) / pages / 1000)
        yield step
    return statistics.median(walls), statistics.median(decode_us), statistics.median(copy_us)


FLOOR = "uffd-floor"


def floor_steps(r: Result, nrand: int):
    """The floor's turn: the same random read served by a bare userfaultfd handler
    (memfs-target `bare`: another process, one constant page, both pinned to one
    CPU), REPEAT times, each in the round of the systems' random reads (it sits
    out their eviction and in-order read-backs: a None step; it is done before
    their reads with work between).  What any user-space
    pager pays here before doing any work; fills `r`'s random-read figures."""
    t = Target(r.mb, "none", None)
    try:
        rnds = []
        yield None  # the systems evict
        for i in range(REPEAT):
            yield None  # they read back in order
            warm_free_memory(nrand * PAGE >> 20)
            rnds.append(t.cmd(f"bare {nrand} {7 + i}"))
            yield "bare userfaultfd reads at random"
        r.verify_bad = sum(int(a["bad"]) for a in rnds)
    finally:
        t.close()
    fill_random(r, rnds)


def run_pair(dataset: str, mb: int, nrand: int, zram: Zram, memfs: Memfs) -> list[Result]:
    """Both systems on one data set, their steps in alternation: zram's eviction,
    then memfs's, zram's read-back, then memfs's, and so on, with the floor's
    random reads among them.  A spell of the host's slowness then meets all
    alike, not whichever system's turn it fell in."""
    results = [Result(dataset, "zram", mb), Result(dataset, "memfs", mb), Result(dataset, FLOOR, mb)]
    turns = [("zram", zram_steps(results[0], nrand, zram)), ("memfs", memfs_steps(results[1], nrand, memfs)),
             (FLOOR, floor_steps(results[2], nrand))]
    try:
        while turns:
            for turn in list(turns):
                try:
                    if (step := next(turn[1])) is not None:
                        progress(f"      {turn[0]}: {step}")
                except StopIteration:
                    turns.remove(turn)
    finally:
        for _, steps in turns:  # a failed or interrupted run still closes every target
            steps.close()
    return results


# -- goals ------------------------------------------------------------------------
# (name, ratio as memfs/zram, the goal, True if higher is better)
def goals(z: Result, m: Result) -> list[tuple[str, float, float, bool]]:
    def q(a, b):
        return a / b if b > 0 else float("nan")  # no ratio to a zero (or negative) yardstick
    return [
        ("eviction throughput", q(m.evict_mbps, z.evict_mbps), 1.0, True),
        ("sequential restore", q(m.seq_restore_gbps, z.seq_restore_gbps), 1.5, True),
        ("random fault p50", q(m.rand_p50_us, z.rand_p50_us), 2.0, False),
        ("random fault p99", q(m.rand_p99_us, z.rand_p99_us), 3.0, False),
        ("net memory saved", q(m.saved_kb, z.saved_kb), 0.95, True),
        ("store used / compressed", q(m.stored_bytes, m.compressed_bytes), 1.10, False),
    ]


def verdict(value: float, goal: float, higher: bool) -> str:
    if value != value:
        return "n/a (zram's figure is 0)"
    met = value >= goal if higher else value <= goal
    if met:
        return "met"
    short = (goal / value if higher else value / goal) if value else float("inf")
    if short < 1.1:  # "1.00x off" next to a ratio printed as the goal itself says nothing
        return f"missed (by {(short - 1) * 100:.1f} %)"
    return f"missed ({short:.2f}x off)"


# -- reports ----------------------------------------------------------------------
def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, r in enumerate(rows):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if k == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def section(title: str, rows: list[list[str]], text: str = "") -> list[str]:
    """A report section: its title, what it shows, its table; nothing without rows."""
    if len(rows) < 2:
        return []
    return [f"### {title}\n"] + ([text] if text else []) + [table(rows), ""]


def summary_tables(results: list[Result]) -> str:
    # (heading, Result field, format, scale): "-" where the system does not measure it
    columns = [("evict MB/s", "evict_mbps", ".0f", 1), ("seq restore GB/s", "seq_restore_gbps", ".2f", 1),
               ("us/page", "seq_us_per_page", ".2f", 1), ("rand p50 us", "rand_p50_us", ".1f", 1),
               ("p99 us", "rand_p99_us", ".1f", 1), ("p99.9 us", "rand_p999_us", ".1f", 1),
               ("prefetch GB/s", "prefetch_gbps", ".2f", 1), ("saved MiB", "saved_kb", ".0f", 1024),
               ("held MiB", "holder_kb", ".0f", 1024), ("ratio", "ratio", ".2f", 1),
               ("pager CPU s", "pager_cpu_s", ".2f", 1)]
    rows = [["data", "system"] + [c[0] for c in columns] + ["verify"]]
    for r in results:
        filled = measured(r.system)
        rows.append([r.dataset, r.system]
                    + [format(getattr(r, f) / scale, spec) if f in filled else "-" for _, f, spec, scale in columns]
                    + ["ok" if r.verify_bad == 0 else f"{r.verify_bad} bad"])
    out = section("Per system", rows)
    grows = [["data", "memfs/zram", "ratio", "goal", "verdict"]]
    for ds in dict.fromkeys(r.dataset for r in results):
        z = next((r for r in results if r.dataset == ds and r.system == "zram"), None)
        m = next((r for r in results if r.dataset == ds and r.system == "memfs"), None)
        if not z or not m:
            continue
        for name, value, goal, higher in goals(z, m):
            grows.append([ds, name, f"{value:.2f}", f"{'>=' if higher else '<='} {goal:g}",
                          verdict(value, goal, higher)])
        grows.append([ds, "prefetch (absolute, GB/s)", f"{m.prefetch_gbps:.2f}", ">= 2", verdict(m.prefetch_gbps, 2.0, True)])
        if m.rc_prefetch_gbps:
            grows.append([ds, "prefetch, recompressed (GB/s)", f"{m.rc_prefetch_gbps:.2f}", ">= 2",
                          verdict(m.rc_prefetch_gbps, 2.0, True)])
    out += section("Ratios memfs/zram and goals", grows)
    frows = [["data", "floor p50 us", "floor p99 us", "floor/zram p50", "floor/zram p99",
              "memfs/floor p50", "memfs/floor p99"]]
    for ds in dict.fromkeys(r.dataset for r in results):
        z, m, f = (next((r for r in results if r.dataset == ds and r.system == name), None)
                   for name in ("zram", "memfs", FLOOR))
        if z and m and f:
            frows.append([ds, f"{f.rand_p50_us:.1f}", f"{f.rand_p99_us:.1f}",
                          f"{f.rand_p50_us / z.rand_p50_us:.2f}", f"{f.rand_p99_us / z.rand_p99_us:.2f}",
                          f"{m.rand_p50_us / f.rand_p50_us:.2f}", f"{m.rand_p99_us / f.rand_p99_us:.2f}"])
    out += section("The floor: a bare userfaultfd round trip, against zram and memfs", frows,
                   "The same random reads, served by a handler in another process that copies in one\n"
                   "constant page and does nothing else, pinned to the reader's CPU (memfs-target `bare`).\n"
                   "No user-space pager can serve a fault faster here; floor/zram is the part of the\n"
                   "random-fault goals that is the mechanism's, memfs/floor the part that is memfs's.\n")
    srows = [["data", "system", "us per touch", "slow touches %", "slow per s"]
             + (["over a tick, per s", "elsewhere, per s"] if HZ else [])]
    for r in results:
        srows.append([r.dataset, r.system, f"{r.rand_mean_us:.1f}", f"{r.rand_slow_pct:.2f}",
                      f"{r.rand_slow_per_s:.0f}"]
                     + ([f"{r.rand_slow_tick_per_s:.0f}", f"{r.rand_slow_per_s - r.rand_slow_tick_per_s:.0f}"]
                        if HZ else []))
    out += section("Slow random reads: how many, and how often", srows,
                   "A touch over 40 us (memfs-target's SLOW_NS, a little under the goal's line of three\n"
                   "times zram's p99) met more than the work of its fault: a timer tick or the host took\n"
                   "the CPU (machine noise, above), or the pager took a slow path.  The floor does no\n"
                   "work, so its rate is the machine's.\n"
                   "A p99 stays under 40 us only while fewer than 1 % of the touches are slow, and that\n"
                   "share is the rate (slow touches per second of reading) times the time a touch takes.\n"
                   "A pager whose rate is near the floor's adds no slow touches of its own; it spends\n"
                   "longer in each touch, and so meets more of the machine's.\n"
                   + (f"Ticks fall on multiples of 1/{HZ} s (CONFIG_HZ) of the monotonic clock, so the target\n"
                      "knows which slow touches spanned one (memfs-target --tick-hz): those are the\n"
                      "machine's for any system, at about the same rate per second.  The others are the\n"
                      "host's or the pager's own: the floor's rate of them is the host's.\n" if HZ else
                      "The kernel's tick rate is unknown (no CONFIG_HZ in /proc/config.gz), so slow\n"
                      "touches are not split by whether they spanned a tick.\n"))
    trows = [["data", "zram p50 us", "memfs p50 us", "zram p99 us", "memfs p99 us", "zram p99.9 us",
              "memfs p99.9 us", "zram slow %", "memfs slow %", "memfs/zram p50", "memfs/zram p99"]]
    for ds in dict.fromkeys(r.dataset for r in results):
        z, m = (next((r for r in results if r.dataset == ds and r.system == name), None) for name in ("zram", "memfs"))
        if z and m and z.think_touches and m.think_touches:
            trows.append([ds, f"{z.think_p50_us:.1f}", f"{m.think_p50_us:.1f}", f"{z.think_p99_us:.1f}",
                          f"{m.think_p99_us:.1f}", f"{z.think_p999_us:.1f}", f"{m.think_p999_us:.1f}",
                          f"{z.think_slow_pct:.2f}", f"{m.think_slow_pct:.2f}",
                          f"{m.think_p50_us / z.think_p50_us:.2f}", f"{m.think_p99_us / z.think_p99_us:.2f}"])
    out += section(f"Random reads with work between them ({THINK_US} us before each read)", trows,
                   f"The goals' random reads come back to back.  A program that works between faults is\n"
                   f"measured here: up to {THINK_TOUCHES} random reads, each after {THINK_US} us of the target's own\n"
                   f"work (memfs-target `touch rand N SEED {THINK_US}`), timed as the others.  No goal; for the\n"
                   f"record.  Both systems pay more per fault than back to back.  memfs's tail is its\n"
                   f"own: while the program works, memfs's fault thread waits on the program's CPU,\n"
                   f"runnable and pinned there, and the kernel's load balancer, seeing two tasks on one\n"
                   f"CPU and none on the other, moves the program itself, tens of times a second; each\n"
                   f"move costs a fault served across vCPUs before the thread follows.  And a kernel\n"
                   f"thread or another program that runs on that CPU meanwhile keeps the SCHED_IDLE\n"
                   f"fault thread off it for as long as it runs (memfs(5), follow_fault_cpu).\n")
    prows = [["data", "copies", "prefetch GB/s", "decode us/page", "copy-in us/page", "ceiling GB/s", "of ceiling"]]
    for r in results:
        if r.system != "memfs":
            continue
        for copies, gbps, decode, copy in (("lz4", r.prefetch_gbps, r.prefetch_decode_us, r.prefetch_copy_us),
                                           ("lz4hc", r.rc_prefetch_gbps, r.rc_prefetch_decode_us,
                                            r.rc_prefetch_copy_us)):
            if decode + copy > 0:
                ceiling = prefetch_threads() * PAGE / (decode + copy) / 1000
                prows.append([r.dataset, copies, f"{gbps:.2f}", f"{decode:.2f}", f"{copy:.2f}",
                              f"{ceiling:.2f}", f"{gbps / ceiling:.0%}"])
    out += section("Prefetch: where its CPU goes", prows,
                   f"Per page restored, the CPU the prefetch's threads spent decoding the copy (the codec, in\n"
                   f"user space) and copying the page in (UFFDIO_COPY: the kernel allocates, charges, fills\n"
                   f"and maps a page), from the session counters prefetch_decode_ns and prefetch_copy_ns:\n"
                   f"for the copies eviction made (lz4), and again after `recompress` (lz4hc, below).\n"
                   f"The ceiling is what {prefetch_threads()} threads would reach doing nothing else: "
                   f"{prefetch_threads()} x 4 KiB\nover decode + copy-in.\n")
    rrows = [["data", "recompress MB/s", "daemon CPU s", "ratio lz4", "ratio lz4hc", "zram ratio",
              "prefetch GB/s lz4", "lz4hc"]]
    for ds in dict.fromkeys(r.dataset for r in results):
        z, m = (next((r for r in results if r.dataset == ds and r.system == name), None) for name in ("zram", "memfs"))
        if m and m.recompress_mbps:
            rrows.append([ds, f"{m.recompress_mbps:.0f}", f"{m.recompress_cpu_s:.2f}", f"{m.ratio:.2f}",
                          f"{m.recompressed_ratio:.2f}", f"{z.ratio:.2f}" if z else "-",
                          f"{m.prefetch_gbps:.2f}", f"{m.rc_prefetch_gbps:.2f}"])
    out += section("Recompress: the same copies again with lz4hc", rrows,
                   "After the prefetches, `recompress` is written to the session's ctl: every copy is\n"
                   "encoded again with lz4hc and kept where the blob gets smaller, as zram's recompress\n"
                   "does for idle pages (throughput in logical MB/s of the region).  Then the same\n"
                   "prefetches again.  Eviction itself keeps lz4: lz4hc encodes several times slower.\n")
    mrows = [["data", "system", "VmRSS before KiB", "after evict KiB", "after readback KiB", "VmHWM KiB",
              "evict wall ms", "evict CPU ms", "readback wall ms", "readback CPU ms"]]
    for r in results:
        if r.system == FLOOR:
            continue
        mrows.append([r.dataset, r.system, str(r.rss_before_kb), str(r.rss_after_evict_kb),
                      str(r.rss_after_readback_kb), str(r.vmhwm_kb), f"{r.evict_ms:.0f}", f"{r.evict_cpu_ms:.0f}",
                      f"{r.seq_restore_ms:.0f}", f"{r.seq_cpu_ms:.0f}"])
    out += section("Process memory (the target's RssAnon; CPU of target and daemon together)", mrows)
    return "\n".join(out)


def prefetch_threads() -> int:
    """Threads a prefetch decodes and copies in on at once: the pager's workers, at most one a CPU."""
    return min(WORKERS, os.cpu_count() or 1)


def measured(system: str) -> set[str]:
    """The Result fields a system's run fills: zram has no prefetch or recompress,
    the floor only reads at random.  The others are left empty in the CSV, not 0."""
    names = {f.name for f in fields(Result)} - (set() if HZ else {"rand_slow_tick_per_s"})
    if system == "zram":
        return {n for n in names if not n.startswith(("prefetch_", "recompress", "rc_"))} - {"pager_cpu_s"}
    if system == FLOOR:
        return {n for n in names if n.startswith("rand_")} | {"dataset", "system", "mb", "verify_bad"}
    return names


def write_csv(results: list[Result], path: Path) -> None:
    names = [f.name for f in fields(Result)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(names)
    for r in results:
        filled = measured(r.system)
        w.writerow(["" if n not in filled else f"{v:.4f}" if isinstance(v, float) else v
                    for n, v in ((n, getattr(r, n)) for n in names)])
    path.write_text(buf.getvalue())


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = proc_meminfo_gib()
    return f"Linux {os.uname().release}, {os.cpu_count()} CPUs ({cpu}), {mem:.0f} GiB"


def proc_meminfo_gib() -> float:
    with open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) / 1048576


def machine_noise(seconds: float) -> dict[str, str]:
    """How often, and how long, this machine takes a busy CPU away (memfs-target's
    `gaps`): a fault that meets such a gap is that much slower, so this rate against
    the rate of faults is what puts a random-fault p99 in the slow cluster or not."""
    t = Target(1, "zero", None)
    try:
        return t.cmd(f"gaps {seconds}")
    finally:
        t.close()


def noise_line(gaps: dict[str, str]) -> str:
    return (f"a busy CPU loses {int(gaps['per_s'])} gaps a second of over 10 us, median "
            f"{int(gaps['p50_ns']) / 1000:.0f} us, p90 {int(gaps['p90_ns']) / 1000:.0f} us, "
            f"{int(gaps['lost_ppm']) / 1e4:.1f} % of its time")


# -- the run ------------------------------------------------------------------------
def idle_cpu_pct(sessions: int, seconds: float, settle: float, settings: list[str]) -> float:
    """CPU of a daemon with its default access source and policy, serving `sessions`
    targets (16 MiB of mixed data each) that do nothing, in percent of one core."""
    with LocalDaemon(*settings, prefix="memfs-bench-idle-", log_to_file=True) as d:
        targets = []
        try:
            for _ in range(sessions):
                targets.append(Target(16, "mixed", d.sock))
            time.sleep(settle)  # the policy compresses what it will, the sampler slows down
            c0 = proc_cpu(d.pid)
            time.sleep(seconds)
            return (proc_cpu(d.pid) - c0) / seconds * 100
        finally:
            for t in targets:
                t.close()


def build_parser() -> argparse.ArgumentParser:
    from . import TOOLS
    tools = "\n".join(f"  memfs bench {name:<15} {what}" for name, (_, what) in TOOLS.items())
    p = argparse.ArgumentParser(prog="memfs bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=f"other measurements (each takes --help):\n{tools}")
    p.add_argument("--mb", type=int, help="MiB of data per data set (default 1024; 16 with --quick)")
    p.add_argument("--datasets", default=",".join(DATASETS), help=f"comma-separated, of {', '.join(DATASETS)}")
    p.add_argument("--random-touches", type=int, help="pages read in random order (default npages/16)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 16 MiB per data set, under a minute")
    p.add_argument("--out", type=Path, help="directory for results.csv (and BENCHMARKS.md unless --quick); "
                   "default: bench/ for a full run, a temporary directory with --quick")
    p.add_argument("--idle-sessions", type=int, default=16,
                   help="idle targets for the idle-CPU measurement (default 16; 0 skips it)")
    p.add_argument("--setting", action="append", default=[], metavar="NAME=VALUE",
                   help="a daemon setting for the memfs side (as memfs serve --NAME VALUE), repeatable")
    p.add_argument("--no-warm", action="store_true",
                   help="do not warm free memory before each timed step (see the module docstring)")
    p.add_argument("--pin-cpu", type=int, metavar="CPU",
                   help="pin every target to this CPU: how much of a result is placement (not how memfs "
                   "is meant to run: its goals are without pinning)")
    p.add_argument("--repeat", type=int, help="times each read-back and prefetch is timed, the median "
                   "reported (default 3; 1 with --quick)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    global WARM, REPEAT, PIN_CPU
    WARM = not args.no_warm
    PIN_CPU = args.pin_cpu
    if PIN_CPU is not None and PIN_CPU not in os.sched_getaffinity(0):
        p.error(f"--pin-cpu {PIN_CPU}: not a CPU this process may run on")
    REPEAT = args.repeat or (1 if args.quick else 3)
    if REPEAT < 1:
        p.error("--repeat must be at least 1")
    mb = args.mb or (16 if args.quick else 1024)
    datasets = [d for d in args.datasets.split(",") if d]
    if bad := [d for d in datasets if d not in DATASETS]:
        p.error(f"unknown data set(s): {', '.join(bad)}")
    nrand = args.random_touches or max(256, mb * 256 // 16)
    settings = []
    for s in args.setting:
        name, _, value = s.partition("=")
        settings += ["--" + name.replace("_", "-"), value]
    if not TARGET.exists():
        print(f"memfs bench: {TARGET} is missing: build native/ first (make -C native)", file=sys.stderr)
        return 1
    out = args.out or (Path(tempfile.mkdtemp(prefix="memfs-bench-out-")) if args.quick else native.results_dir())
    out.mkdir(parents=True, exist_ok=True)
    command = "memfs bench " + " ".join(argv if argv is not None else sys.argv[1:])
    results: list[Result] = []
    try:
        if "real" in datasets:
            progress(f"capturing the real data set ({mb} MiB of a CPython heap) unless cached")
            realdata.image(mb)
        noise = machine_noise(0.5 if args.quick else 3)
        progress(f"[noise] {noise_line(noise)}")
        with Zram(mb * 1048576 * 2 + (64 << 20)) as zram, Memfs(settings) as memfs:
            times = f" ({REPEAT} times each)" if REPEAT > 1 else ""
            for k, ds in enumerate(datasets, 1):
                progress(f"[{k}/{len(datasets)}] {ds} {mb} MiB, zram and memfs in alternation: fill, evict, "
                         f"read back in order and {nrand} pages at random{times}; memfs prefetch{times}")
                for r in run_pair(ds, mb, nrand, zram, memfs):
                    results.append(r)
                    if r.system == FLOOR:
                        progress(f"      {r.system}: random p50 {r.rand_p50_us:.1f} us, p99 {r.rand_p99_us:.1f} us")
                        continue
                    progress(f"      {r.system}: evict {r.evict_mbps:.0f} MB/s, read back {r.seq_restore_gbps:.2f} "
                             f"GB/s, random p50 {r.rand_p50_us:.1f} us, saved {r.saved_kb / 1024:.0f} MiB, "
                             f"verify {'ok' if r.verify_bad == 0 else 'FAILED'}")
        idle = None
        if args.idle_sessions:
            # full runs settle past cold_age_ms (30 s), so that the policy's one compression
            # of the idle pages is over and the steady state is measured
            settle, seconds = (2, 3) if args.quick else (40, 30)
            progress(f"[idle] a daemon with its defaults and {args.idle_sessions} idle sessions: "
                     f"{settle} s to settle, then its CPU over {seconds} s")
            idle = idle_cpu_pct(args.idle_sessions, seconds, settle, settings)
            progress(f"      {idle:.2f}% of a core")
    except BenchError as e:
        print(f"memfs bench: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("memfs bench: interrupted; the machine is restored", file=sys.stderr)
        return 130
    report = summary_tables(results)
    if idle is not None:
        report += ("\n### Idle\n\n" + table([
            ["measurement", "value", "goal", "verdict"],
            [f"daemon CPU, {args.idle_sessions} idle sessions (default settings: sampler, policy compress)",
             f"{idle:.2f}% of a core", "< 1%", verdict(idle, 1.0, False)]]) + "\n")
    print("\n" + report)
    write_csv(results, out / "results.csv")
    if not args.quick:
        (out / "BENCHMARKS.md").write_text(
            "# memfs and zram, side by side\n\n"
            "Generated by `python3 -m memfs bench`; do not edit by hand.\n\n"
            f"- command: `{command.strip()}`\n- date: {time.strftime('%Y-%m-%d %H:%M %Z')}\n"
            f"- machine: {machine()}\n"
            f"- machine noise: {noise_line(noise)} (memfs-target `gaps`, before the run)\n"
            f"- free memory warmed before each timed step: {'yes' if WARM else 'no (--no-warm)'}\n"
            + (f"- every target pinned to CPU {PIN_CPU} (--pin-cpu)\n" if PIN_CPU is not None else "")
            + f"- data: {mb} MiB per data set; random reads: {nrand} distinct pages\n"
            f"- read-backs and prefetches: each timed {REPEAT} {'time' if REPEAT == 1 else 'times'}, the median "
            "of each figure reported (eviction: once, from resident memory)\n"
            f"- memfs daemon: `memfs serve --access-source none --policy off {' '.join(settings)}` (defaults otherwise)\n"
            "- zram: zram0, lz4, the only swap; eviction is MADV_PAGEOUT of the region\n\n"
            + report + "\nThe raw numbers are in `results.csv` next to this file. How each number is taken: "
            "see the docstring of `memfs/bench/zram_vs_memfs.py` and memfs(8).\n")
    print(f"\nmemfs bench: results in {out}", file=sys.stderr)
    bad = [r for r in results if r.verify_bad != 0]
    if bad:
        print("memfs bench: DATA MISMATCH in " + ", ".join(f"{r.dataset}/{r.system}" for r in bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
