"""Python face of the native pager core (native/core, bound as memfs._core).

`NativeSession` owns one C session: its page tables, its fault thread and
its share of the store.  Its methods are synchronous and thread-safe (the
C side locks); the ones that may take long (compress, restore, register,
read_data) are meant to be called through `trio.to_thread.run_sync`, and
cffi drops the GIL for every C call, so they run beside the event loop.
"""
from __future__ import annotations

import errno
import functools
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass

from ._core import ffi, lib

PAGE_SIZE = lib.MC_PAGE_SIZE
STATES = ("untouched", "resident", "clean", "compressed", "zero", "evicting")
SHOWN_STATES = STATES + ("sampled",)  # what `pages` says: a sampled page is out for a moment
STATE_BITS = {name: 1 << i for i, name in enumerate(STATES)}
# What select() and age_hist() may leave out (`skip`, or-ed):
SKIP_INCOMPRESSIBLE = lib.MC_PF_INCOMPRESSIBLE  # the last compression did not pay (tried again once written)
SKIP_RECOMPRESSED = lib.MC_SKIP_RECOMPRESSED  # recompress dealt with the copy (again once it is a new one)
CODECS = {"lz4": lib.MC_CODEC_LZ4, "lz4hc": lib.MC_CODEC_LZ4HC, "lz4fast": lib.MC_CODEC_LZ4FAST}
TRACE_KINDS = {lib.MC_TR_FAULT: "fault", lib.MC_TR_ZEROFILL: "zerofill", lib.MC_TR_WRITE: "write",
               lib.MC_TR_HELD: "held", lib.MC_TR_RELEASE: "release", lib.MC_TR_EVICT: "evict",
               lib.MC_TR_PREFETCH: "prefetch", lib.MC_TR_COMPRESS: "compress",
               lib.MC_TR_REMOVE: "remove", lib.MC_TR_UNMAP: "unmap", lib.MC_TR_REMAP: "remap",
               lib.MC_TR_FAIL: "fail", lib.MC_TR_READAHEAD: "readahead",
               lib.MC_TR_RECOMPRESS: "recompress"}
COUNTER_NAMES = tuple(name for name, _ in ffi.typeof("struct mc_counters").fields)
STORE_STAT_NAMES = tuple(name for name, _ in ffi.typeof("struct mc_store_stats").fields)
TUNABLE_NAMES = tuple(name for name, _ in ffi.typeof("struct mc_tunables").fields)
HIST_BUCKETS = lib.MC_HIST_BUCKETS
IOCTL_NAMES = ("UFFDIO_COPY", "UFFDIO_ZEROPAGE", "UFFDIO_WRITEPROTECT", "UFFDIO_WAKE", "UFFDIO_MOVE",
               "UFFDIO_POISON", "UFFDIO_REGISTER", "UFFDIO_UNREGISTER")
# The cffi modules are opened by a Python thread that may later exit; the
# fault threads are the C library's own, so nothing here is tied to one.


def check(rc: int, what: str) -> int:
    if rc < 0:
        raise OSError(-rc, f"{what}: {os.strerror(-rc)}")
    return rc


@dataclass
class OpResult:
    """What an operation did, in pages."""
    seen: int = 0
    done: int = 0
    skipped: int = 0
    bytes_in: int = 0
    bytes_out: int = 0

    def add(self, res) -> None:
        """Add a native struct mc_op_result."""
        self.seen += res.pages_seen
        self.done += res.pages_done
        self.skipped += res.pages_skipped
        self.bytes_in += res.bytes_in
        self.bytes_out += res.bytes_out

    def merge(self, other: "OpResult") -> None:
        self.seen += other.seen
        self.done += other.done
        self.skipped += other.skipped
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out


@dataclass
class RangeInfo:
    index: int
    start: int
    npages: int
    pages_in: dict[str, int]
    bytes_compressed: int
    flags: int = 0

    @property
    def length(self) -> int:
        return self.npages * PAGE_SIZE


Run = tuple[int, int, int]  # (range index, first page, page count)


def runs_array(runs: list[Run]):
    arr = ffi.new("struct mc_run[]", max(1, len(runs)))
    for i, (r, first, count) in enumerate(runs):
        arr[i].range, arr[i].first, arr[i].count = r, first, count
    return arr


UNLIMITED = 2**64 - 1  # a 64-bit tunable's "max"


def set_tunables(**values: int) -> None:
    """Set native tunables, all or none (OverflowError: a value does not fit its field)."""
    t = ffi.new("struct mc_tunables *")
    lib.mc_get_tunables(t)
    for k, v in values.items():
        setattr(t, k, int(v))
    lib.mc_set_tunables(t)


def get_tunables() -> dict[str, int]:
    t = ffi.new("struct mc_tunables *")
    lib.mc_get_tunables(t)
    return {k: getattr(t, k) for k in TUNABLE_NAMES}


def store_stats() -> dict[str, int]:
    st = ffi.new("struct mc_store_stats *")
    lib.mc_store_get_stats(st)
    return {k: getattr(st, k) for k in STORE_STAT_NAMES}


def now_ms() -> int:
    return lib.mc_now_ms()


def percentile_ns(hist: list[int], q: float) -> int:
    """Upper bound of the histogram bucket holding quantile q (0..1)."""
    total = sum(hist)
    if not total:
        return 0
    want, acc = q * total, 0
    for b, n in enumerate(hist):
        acc += n
        if acc >= want and n:
            return bucket_upper_ns(b)
    return bucket_upper_ns(len(hist) - 1)


def bucket_upper_ns(b: int) -> int:
    if b < 8:
        return b
    msb, sub = divmod(b, 8)
    return ((8 + sub + 1) << (msb - 3)) - 1


def _guarded(method):
    """Run a method only while the native session exists; free() waits for it."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._use():
            return method(self, *args, **kwargs)
    return wrapper


class NativeSession:
    """One target's pager state in the native core.

    Methods may be called from the event loop thread and from worker
    threads at once; free() waits until no call is running and makes any
    later call fail with ESRCH, so C memory is never used after it is freed.
    """

    def __init__(self, uffd: int, pid: int, pidfd: int, session_id: int = 0, store_reserve: int = 0):
        """Takes ownership of `uffd` on success; `pidfd` is the target's (the session keeps a copy)."""
        err = ffi.new("int *")
        self._s = lib.mc_session_new(uffd, pid, pidfd, session_id, store_reserve, err)
        if self._s == ffi.NULL:
            raise OSError(err[0], f"creating the session: {os.strerror(err[0])}")
        self.staging_pages = 0
        self._calls = 0
        self._freed = False
        self._cond = threading.Condition()

    @contextmanager
    def _use(self):
        with self._cond:
            if self._freed:
                raise OSError(errno.ESRCH, "the session has ended")
            self._calls += 1
        try:
            yield
        finally:
            with self._cond:
                self._calls -= 1
                if not self._calls:
                    self._cond.notify_all()

    # -- lifecycle --------------------------------------------------------
    @_guarded
    def add_range(self, addr: int, length: int, flags: int, index: int = -1) -> int:
        """Register a range for faults and learn which of its pages exist; its index."""
        buf = ffi.new("char[]", 512)
        rc = lib.mc_range_add(self._s, addr, length, flags, index, buf, 512)
        if rc < 0:
            raise OSError(-rc, ffi.string(buf).decode(errors="replace") or os.strerror(-rc))
        return rc

    @_guarded
    def set_staging(self, addr: int, npages: int) -> None:
        """The target's staging area for the access sampler (none if the kernel cannot move pages)."""
        self.staging_pages = check(lib.mc_session_set_staging(self._s, addr, npages), "staging area")

    @_guarded
    def import_store(self, old_store_fd: int, ranges: list[tuple[int, int, int, int]],
                     forget: list[Run]) -> None:
        """Take a session back from the store a target kept (RESUME): ranges are
        (index, flags, start, npages), forget the runs the target discarded meanwhile."""
        arr = ffi.new("struct mc_resume_range[]", max(1, len(ranges)))
        for i, (index, flags, start, npages) in enumerate(ranges):
            arr[i].index, arr[i].flags, arr[i].start, arr[i].npages = index, flags, start, npages
        buf = ffi.new("char[]", 512)
        rc = lib.mc_session_import(self._s, old_store_fd, arr, len(ranges), runs_array(forget), len(forget),
                                   buf, 512)
        if rc < 0:
            raise OSError(-rc, ffi.string(buf).decode(errors="replace") or os.strerror(-rc))

    @_guarded
    def start(self) -> None:
        check(lib.mc_session_start(self._s), "starting the fault thread")

    @_guarded
    def stop(self) -> None:
        lib.mc_session_stop(self._s)

    @_guarded
    def unregister(self) -> int:
        return lib.mc_session_unregister(self._s)

    @_guarded
    def store_fds(self) -> tuple[int, int]:
        """New descriptors for the target: its store (read-only) and its fence page; the caller closes them."""
        ro, fence = ffi.new("int *"), ffi.new("int *")
        check(lib.mc_session_store_fds(self._s, ro, fence), "store descriptors")
        return ro[0], fence[0]

    def free(self) -> None:
        """Stop the fault thread, free the page tables and every copy, close the uffd.
        Blocks until calls in progress are done (call it from a worker thread)."""
        with self._cond:
            if self._freed:
                return
            self._freed = True
            while self._calls:
                self._cond.wait()
        lib.mc_session_free(self._s)
        self._s = ffi.NULL

    @property
    def notify_fd(self) -> int:
        return lib.mc_session_notify_fd(self._s)

    @_guarded
    def arm_notify(self) -> None:
        lib.mc_session_arm_notify(self._s)

    @property
    def dead(self) -> bool:
        with self._cond:
            return self._freed or bool(lib.mc_session_dead(self._s))

    # -- fences (agent requests) ------------------------------------------------
    @_guarded
    def fence_arm(self, request_id: int) -> None:
        lib.mc_fence_arm(self._s, request_id)

    @_guarded
    def fence_cancel(self, request_id: int) -> bool:
        """True if the request can no longer begin; False if the agent began it."""
        return bool(lib.mc_fence_cancel(self._s, request_id))

    @_guarded
    def fence_clear(self, request_id: int) -> None:
        lib.mc_fence_clear(self._s, request_id)

    @_guarded
    def fence_busy(self, request_id: int) -> bool:
        return bool(lib.mc_fence_busy(self._s, request_id))

    @_guarded
    def ioctl_failures(self) -> list[tuple[str, int, int, int]]:
        """(ioctl, errno, failures, last address) of each uffd ioctl that failed since the last call."""
        out = ffi.new("struct mc_ioctl_failure[]", lib.MC_IOCTL_KINDS)
        n = lib.mc_ioctl_failures(self._s, out, lib.MC_IOCTL_KINDS)
        return [(IOCTL_NAMES[out[i].kind], out[i].err, out[i].count, out[i].addr) for i in range(n)]

    # -- numbers -------------------------------------------------------------
    @_guarded
    def counters(self) -> dict[str, int]:
        c = ffi.new("struct mc_counters *")
        lib.mc_session_counters(self._s, c)
        return {k: getattr(c, k) for k in COUNTER_NAMES}

    @_guarded
    def restore_failures(self) -> int:
        """counters()["restore_fail"] alone: the daemon looks at it four times a second."""
        c = ffi.new("struct mc_counters *")
        lib.mc_session_counters(self._s, c)
        return c.restore_fail

    @_guarded
    def histogram(self) -> list[int]:
        h = ffi.new("uint64_t[]", HIST_BUCKETS)
        lib.mc_session_hist(self._s, h)
        return list(h)

    @_guarded
    def range_info(self, index: int) -> RangeInfo:
        info = ffi.new("struct mc_range_info *")
        check(lib.mc_range_get(self._s, index, info), f"range {index}")
        return RangeInfo(index, info.start, info.npages,
                         {name: info.nstate[i] for i, name in enumerate(STATES)},
                         info.bytes_compressed, info.flags)

    @_guarded
    def ranges(self) -> list[RangeInfo]:
        """The live ranges, by index."""
        out = []
        info = ffi.new("struct mc_range_info *")
        for i in range(lib.mc_session_nranges(self._s)):
            if lib.mc_range_get(self._s, i, info) == 0:
                out.append(RangeInfo(i, info.start, info.npages,
                                     {name: info.nstate[k] for k, name in enumerate(STATES)},
                                     info.bytes_compressed, info.flags))
        return out

    def range_indexes(self) -> list[int]:
        return [r.index for r in self.ranges()]

    @_guarded
    def addr_to_page(self, addr: int) -> tuple[int, int]:
        r = ffi.new("uint32_t *")
        p = ffi.new("uint64_t *")
        check(lib.mc_addr_to_page(self._s, addr, r, p), f"address 0x{addr:x}")
        return r[0], p[0]

    # -- operations (call from a worker thread) ------------------------------
    @_guarded
    def compress(self, runs: list[Run], for_evict: bool = False) -> OpResult:
        res = ffi.new("struct mc_op_result *")
        out = OpResult()
        rc = lib.mc_compress(self._s, runs_array(runs), len(runs),
                             lib.MC_COMPRESS_FOR_EVICT if for_evict else 0, res)
        out.add(res)
        check(rc, "compress")
        return out

    @_guarded
    def evict_prepare(self, runs: list[Run], cap: int) -> tuple[list[tuple[int, int]], OpResult]:
        res = ffi.new("struct mc_op_result *")
        out = ffi.new("struct mc_addr_run[]", max(1, cap))
        n = check(lib.mc_evict_prepare(self._s, runs_array(runs), len(runs), out, cap, res), "evict")
        r = OpResult()
        r.add(res)
        return [(out[i].addr, out[i].length) for i in range(n)], r

    @_guarded
    def evict_complete(self, addr_runs: list[tuple[int, int]], status: int) -> OpResult:
        arr = ffi.new("struct mc_addr_run[]", max(1, len(addr_runs)))
        for i, (a, n) in enumerate(addr_runs):
            arr[i].addr, arr[i].length = a, n
        res = ffi.new("struct mc_op_result *")
        lib.mc_evict_complete(self._s, arr, len(addr_runs), status, res)
        r = OpResult()
        r.add(res)
        return r

    @_guarded
    def restore(self, runs: list[Run], final: bool = False) -> OpResult:
        res = ffi.new("struct mc_op_result *")
        flags = lib.MC_RESTORE_FINAL if final else 0
        rc = lib.mc_restore(self._s, runs_array(runs), len(runs), flags, res)
        out = OpResult()
        out.add(res)
        check(rc, "restore")
        return out

    @_guarded
    def recompress(self, runs: list[Run]) -> OpResult:
        res = ffi.new("struct mc_op_result *")
        rc = lib.mc_recompress(self._s, runs_array(runs), len(runs), res)
        out = OpResult()
        out.add(res)
        check(rc, "recompress")
        return out

    @_guarded
    def mark_prefetch(self, runs: list[Run]) -> None:
        check(lib.mc_mark_prefetch(self._s, runs_array(runs), len(runs)), "prefetch")

    # -- access sampling ---------------------------------------------------------
    @_guarded
    def sample_prepare(self, pages: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], bool]:
        """Reserve staging slots for these (range, page) pages: the (src, dst) moves
        the agent is to make, and whether it must zap the staging area first."""
        cap = max(1, min(len(pages), self.staging_pages))
        moves = ffi.new("struct mc_move[]", cap)
        zap = ffi.new("int *")
        n = check(lib.mc_sample_prepare(self._s, runs_array([(r, p, 1) for r, p in pages]), len(pages),
                                        moves, cap, zap), "sample")
        return [(moves[i].src, moves[i].dst) for i in range(n)], bool(zap[0])

    @_guarded
    def sample_commit(self, moves: list[tuple[int, int]], moved: bytes) -> None:
        """The agent's answer to sample_prepare's moves (bit i of `moved`: move i happened)."""
        arr = ffi.new("struct mc_move[]", max(1, len(moves)))
        for i, (src, dst) in enumerate(moves):
            arr[i].src, arr[i].dst = src, dst
        bitmap = ffi.new("uint8_t[]", moved or b"\0")
        check(lib.mc_sample_commit(self._s, arr, len(moves), bitmap), "sample")

    @_guarded
    def sample_collect(self, final: bool = False) -> list[tuple[int, int, bool]]:
        """(range, page, used) of every sampled page; the unused ones go back.
        final: the session ends and no sampling request is in flight."""
        cap = max(1, self.staging_pages)
        out = ffi.new("struct mc_sample_result[]", cap)
        n = check(lib.mc_sample_collect(self._s, out, cap, 1 if final else 0), "sample")
        return [(out[i].range, out[i].page, bool(out[i].accessed)) for i in range(n)]

    @_guarded
    def note_access(self, runs: list[Run], when_ms: int) -> None:
        """Evidence that these pages were used at when_ms (never makes a page older)."""
        if runs:
            check(lib.mc_note_access(self._s, runs_array(runs), len(runs), when_ms & 0xFFFFFFFF), "access")

    # -- inspection ------------------------------------------------------------
    @_guarded
    def indexed_runs(self, range_index: int | None = None) -> list[Run]:
        """The runs of pages that ever had a state (the rest is untouched): what a
        whole-range operation needs to visit, however sparse the range."""
        cap = 1024
        while True:
            out = ffi.new("struct mc_run[]", cap)
            n = lib.mc_indexed(self._s, -1 if range_index is None else range_index, out, cap)
            if n != -errno.ENOSPC:
                check(n, "index")
                return [(out[i].range, out[i].first, out[i].count) for i in range(n)]
            cap *= 4

    @_guarded
    def count(self, runs: list[Run], states: int) -> int:
        """Pages of the runs in `states` (a STATE_BITS mask)."""
        return check(lib.mc_count(self._s, runs_array(runs), len(runs), states), "count")

    def clip(self, runs: list[Run]) -> list[Run]:
        """Those parts of runs that lie where pages ever had a state."""
        by_range: dict[int, list[tuple[int, int]]] = {}
        for r, first, count in self.indexed_runs():
            by_range.setdefault(r, []).append((first, first + count))
        out = []
        for r, first, count in runs:
            for lo, hi in by_range.get(r, ()):
                a, b = max(lo, first), min(hi, first + count)
                if a < b:
                    out.append((r, a, b - a))
        return out

    @_guarded
    def select(self, range_index: int | None, states: int, min_age_ms: int = 0,
               max_pages: int = 0, order: int = 0, skip: int = 0) -> tuple[list[Run], int]:
        """Runs of pages in `states` (a STATE_BITS mask) idle >= min_age_ms, but
        those `skip` (SKIP_*) leaves out; with max_pages, order > 0 takes the
        oldest first, < 0 the youngest first."""
        cap = 4096
        while True:
            out = ffi.new("struct mc_run[]", cap)
            npages = ffi.new("uint64_t *")
            n = check(lib.mc_select(self._s, -1 if range_index is None else range_index, states,
                                    min_age_ms, skip, max_pages, order, out, cap, npages), "select")
            if n < cap:
                return [(out[i].range, out[i].first, out[i].count) for i in range(n)], npages[0]
            cap *= 4

    @_guarded
    def age_hist(self, range_index: int | None, states: int, min_age_ms: int = 0, skip: int = 0) -> list[int]:
        """The pages select() would take, by age class: class 0 is age 0, class k
        holds ages in [2**(k-1), 2**k) ms."""
        out = ffi.new("uint64_t[]", lib.MC_AGE_CLASSES)
        check(lib.mc_age_hist(self._s, -1 if range_index is None else range_index, states,
                              min_age_ms, skip, out), "age histogram")
        return list(out)

    @_guarded
    def page_info(self, range_index: int, first: int, count: int):
        out = ffi.new("struct mc_page_info[]", max(1, count))
        check(lib.mc_page_info(self._s, range_index, first, count, out), "pages")
        return out

    @_guarded
    def read_data(self, range_index: int, first: int, count: int) -> bytes:
        buf = ffi.new("char[]", count * PAGE_SIZE)
        check(lib.mc_read_data(self._s, range_index, first, count, buf), "data")
        return ffi.buffer(buf)[:]

    @_guarded
    def trace_read(self, cursor: int, cap: int = 256):
        """(events, new cursor, missed) from the session's trace ring."""
        cur = ffi.new("uint64_t *", cursor)
        missed = ffi.new("uint64_t *")
        out = ffi.new("struct mc_trace_event[]", cap)
        n = lib.mc_trace_read(self._s, cur, out, cap, missed)
        events = [(out[i].seq, out[i].ts_ns, TRACE_KINDS.get(out[i].kind, str(out[i].kind)),
                   out[i].range, out[i].page, out[i].count, out[i].latency_ns, out[i].tid)
                  for i in range(n)]
        return events, cur[0], missed[0]


def errno_name(e: int) -> str:
    return errno.errorcode.get(e, str(e))
