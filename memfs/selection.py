"""Page selectors: the SEL of control verbs, turned into page runs.

    all                 every page (the default)
    cold                pages idle for at least cold_age_ms
    pages=A-B | pages=A page indexes, inclusive (as cpuset lists); relative to
                        the range, or at session level to the session's pages
                        counted across its ranges in registration order
    addr=0xA-0xB        pages holding any byte of [A, B) (end exclusive, as in
                        /proc/<pid>/maps)
    bytes=N[K|M|G]      N bytes of pages, coldest first (prefetch: most
                        recently used first), as cgroup memory.reclaim does

Errors: OSError(EINVAL) for a malformed selector, OSError(ERANGE) for one
outside the pages it applies to.
"""
from __future__ import annotations

import errno
import re
from dataclasses import dataclass

from .core import PAGE_SIZE, SKIP_INCOMPRESSIBLE, SKIP_RECOMPRESSED, STATE_BITS, NativeSession, Run

UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


@dataclass(frozen=True)
class Candidates:
    """Pages an operation can act on: what `cold` and `bytes=` choose among."""
    states: int  # a STATE_BITS mask
    skip: int = 0  # core.SKIP_* (pages in those states that it would leave alone)


CANDIDATES = {
    # compress leaves pages whose last compression did not pay until they are written
    "compress": Candidates(STATE_BITS["resident"], SKIP_INCOMPRESSIBLE),
    "evict": Candidates(STATE_BITS["resident"] | STATE_BITS["clean"]),
    "prefetch": Candidates(STATE_BITS["compressed"] | STATE_BITS["zero"]),
    # the pages with copies that recompress has not dealt with yet
    "recompress": Candidates(STATE_BITS["compressed"] | STATE_BITS["clean"], SKIP_RECOMPRESSED),
}


@dataclass(frozen=True)
class Selector:
    kind: str  # all, cold, pages, addr, bytes
    lo: int = 0
    hi: int = 0  # pages: inclusive; addr: exclusive
    nbytes: int = 0


def invalid(text: str) -> OSError:
    return OSError(errno.EINVAL, text)


MAX_SIZE = (1 << 63) - 1  # what the native core's 64-bit counters take


def parse_size(text: str) -> int:
    """N[K|M|G|T], ASCII digits only, at most 2**63 - 1 bytes."""
    m = re.fullmatch(r"([0-9]+)([KMGT]?)", text.strip(), re.IGNORECASE | re.ASCII)
    if not m:
        raise invalid(f"bad size {text!r}")
    n = int(m.group(1)) * UNITS[m.group(2).upper()]
    if n > MAX_SIZE:
        raise invalid(f"size {text!r} is too large")
    return n


def parse(text: str) -> Selector:
    text = text.strip()
    if text in ("", "all"):
        return Selector("all")
    if text == "cold":
        return Selector("cold")
    key, eq, value = text.partition("=")
    if not eq:
        raise invalid(f"unknown selector {text!r}")
    if key == "pages":
        m = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", value)
        if not m:
            raise invalid(f"bad page list {value!r}: expected A or A-B")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise invalid(f"bad page list {value!r}: B < A")
        return Selector("pages", lo, hi)
    if key == "addr":
        m = re.fullmatch(r"(0x[0-9a-fA-F]+|[0-9]+)-(0x[0-9a-fA-F]+|[0-9]+)", value)
        if not m:
            raise invalid(f"bad address range {value!r}: expected 0xA-0xB")
        lo, hi = int(m.group(1), 0), int(m.group(2), 0)
        if hi <= lo:
            raise invalid(f"bad address range {value!r}: empty")
        return Selector("addr", lo, hi)
    if key == "bytes":
        n = parse_size(value)
        if n <= 0:
            raise invalid("bytes=0 selects nothing")
        return Selector("bytes", nbytes=n)
    raise invalid(f"unknown selector {text!r}")


def _span_runs(native: NativeSession, range_index: int | None, lo: int, hi: int) -> list[Run]:
    """Pages lo..hi (inclusive) of one range, or of the session's pages in registration order."""
    ranges = native.ranges() if range_index is None else [native.range_info(range_index)]
    total = sum(r.npages for r in ranges)
    if hi >= total:
        raise OSError(errno.ERANGE, f"pages {lo}-{hi}: only {total} pages (0-{total - 1})")
    runs, base = [], 0
    for r in ranges:
        a, b = max(lo, base), min(hi, base + r.npages - 1)
        if a <= b:
            runs.append((r.index, a - base, b - a + 1))
        base += r.npages
    return runs


def _addr_runs(native: NativeSession, range_index: int | None, lo: int, hi: int) -> list[Run]:
    ranges = native.ranges() if range_index is None else [native.range_info(range_index)]
    runs = []
    for r in ranges:
        a, b = max(lo, r.start), min(hi, r.start + r.length)
        if a < b:
            first = (a - r.start) // PAGE_SIZE
            last = (b - 1 - r.start) // PAGE_SIZE
            runs.append((r.index, first, last - first + 1))
    if not runs or sum(n for _, _, n in runs) * PAGE_SIZE < (hi - lo) - 2 * PAGE_SIZE:
        raise OSError(errno.ERANGE, f"addr=0x{lo:x}-0x{hi:x} is not inside the registered memory")
    return runs


def resolve(sel: Selector, native: NativeSession, verb: str, range_index: int | None = None,
            cold_age_ms: int = 0) -> tuple[list[Run], int]:
    """Runs to hand to the pager, and the pages wanted (for bytes=N, else 0).  Only the
    parts of ranges where pages ever had a state are visited: the rest is untouched."""
    if sel.kind == "all":
        return native.indexed_runs(range_index), 0
    if sel.kind == "pages":
        return native.clip(_span_runs(native, range_index, sel.lo, sel.hi)), 0
    if sel.kind == "addr":
        return native.clip(_addr_runs(native, range_index, sel.lo, sel.hi)), 0
    c = CANDIDATES[verb]
    if sel.kind == "cold":
        runs, _ = native.select(range_index, c.states, min_age_ms=cold_age_ms, skip=c.skip)
        return runs, 0
    wanted = -(-sel.nbytes // PAGE_SIZE)
    runs, _ = native.select(range_index, c.states, max_pages=wanted, order=-1 if verb == "prefetch" else 1,
                            skip=c.skip)
    return runs, wanted


def all_runs(native: NativeSession) -> list[Run]:
    return native.indexed_runs()
