"""The pager of one session: compress, evict, prefetch and recompress pages, safely.

This is the API the filesystem, the policy and the CLI use.  Operations
take page runs ((range, first, count) tuples, see `memfs.selection` for
turning user selectors into runs), report what they did as `OpResult`,
and may be cancelled: work is done in chunks, each chunk handed to the
native core on a worker thread (two chunks at once: `Pager._spread`), and
a cancellation takes effect between chunks.  One operation runs at a time
per session, so an operation never meets another's half-done pages.

Freeing pages needs the target's cooperation: the session's
`MemorySource` carries EVICT requests to it.  An eviction, once asked
for, completes when the source reports back (`eviction_done`), whoever
was waiting for it, so a cancelled caller never leaves pages half-evicted.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Protocol

import trio

from . import protocol
from .core import NativeSession, OpResult, Run
from .errors import first_oserror

log = logging.getLogger("memfs.pager")

CHUNK_PAGES = 2048  # pages per native call: the grain of cancellation
# Each chunk costs the daemon's thread a hand-off to a worker and back, CPU
# taken from the workers; a prefetch is CPU-bound, so it hands off 16 MiB at a
# time (what 1024-page chunks cost: commit cddc0a9's message).
PREFETCH_CHUNK_PAGES = 4096
WORKERS = 2  # chunks of one operation in hand at once (the daemon's limiter caps threads)
EVICT_SETTLE_SECONDS = 10.0


class SessionEnded(OSError):
    def __init__(self, text="the session has ended"):
        super().__init__(errno.ESRCH, text)


class MemorySource(Protocol):
    """Where a session's pages live, and how to free them."""

    mode: str  # "full" or "wp-only"
    can_free: bool

    async def request_free(self, request_id: int, addr_runs: list[tuple[int, int]]) -> None:
        """Ask for these address runs to be dropped; the answer comes to Pager.eviction_done."""


class NoFree:
    """A target without an agent: pages are compressed and tracked, never freed."""

    mode = "wp-only"
    can_free = False

    async def request_free(self, request_id, addr_runs):
        raise OSError(errno.EOPNOTSUPP, "this session is wp-only: its pages cannot be freed")


@dataclass
class _Eviction:
    addr_runs: list[tuple[int, int]]
    done: trio.Event = field(default_factory=trio.Event)
    result: OpResult | None = None


def chunked(runs: list[Run], limit: int = CHUNK_PAGES):
    """Split runs into lists holding at most `limit` pages each."""
    chunk, size = [], 0
    for r, first, count in runs:
        while count:
            take = min(count, limit - size)
            chunk.append((r, first, take))
            size += take
            first += take
            count -= take
            if size == limit:
                yield chunk
                chunk, size = [], 0
    if chunk:
        yield chunk


class Pager:
    def __init__(self, native: NativeSession, source: MemorySource, limiter: trio.CapacityLimiter,
                 on_done=lambda verb: None):
        self.native = native
        self.source = source
        self._limiter = limiter
        self._on_done = on_done  # told the verb after each operation that completed
        self._op_lock = trio.Lock()
        self._op_scopes: set[trio.CancelScope] = set()
        self._inflight: dict[int, _Eviction] = {}
        self._next_request = 1
        self.closed = False

    async def _in_thread(self, fn, *args):
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def _begin(self):
        if self.closed:
            raise SessionEnded()

    async def _run_op(self, body):
        """Run an operation under the op lock, cancellable by close()."""
        self._begin()
        with trio.CancelScope() as scope:
            self._op_scopes.add(scope)
            try:
                async with self._op_lock:
                    self._begin()
                    result = await body()
                self._on_done(body.__name__)
                return result
            finally:
                self._op_scopes.discard(scope)
        raise SessionEnded()

    async def _spread(self, chunks, work) -> OpResult:
        """`work(chunk)` for every chunk, WORKERS chunks at a time; the sum of what they did.

        Chunks are disjoint, and the native core skips a page another thread
        has in hand (COMPRESSING, PINNED), so the workers never step on each
        other; what two of them buy is both CPUs at work, and for an
        eviction, one chunk compressing while the agent frees the last."""
        total = OpResult()
        chunks = iter(chunks)  # shared: each chunk goes to one worker

        async def worker():
            for chunk in chunks:
                total.merge(await work(chunk))

        try:
            async with trio.open_nursery() as nursery:
                for _ in range(WORKERS):
                    nursery.start_soon(worker)
        except BaseExceptionGroup as group:
            # a worker's error (the session ended, ...) is the operation's: a ctl
            # write must fail with its errno, and a group would only be EIO there
            err = first_oserror(group)
            if err is None:
                raise
            raise err from None
        return total

    # -- operations ------------------------------------------------------------
    async def compress(self, runs: list[Run]) -> OpResult:
        """Give pages a compressed copy; they stay in the target, write-protected."""
        async def compress():
            return await self._spread(chunked(runs), lambda chunk: self._in_thread(
                self.native.compress, chunk, False))
        return await self._run_op(compress)

    async def evict(self, runs: list[Run]) -> OpResult:
        """Free pages from the target, compressing first where needed; done = pages freed."""
        if not self.source.can_free:
            raise OSError(errno.EOPNOTSUPP, "this session is wp-only: its pages cannot be freed")

        async def evict_chunk(chunk) -> OpResult:
            out = OpResult()
            await self._in_thread(self.native.compress, chunk, True)
            addr_runs, prep = self.native.evict_prepare(chunk, protocol.EVICT_MAX_RUNS)
            out.seen = prep.seen
            if not addr_runs:
                out.skipped = prep.seen
                return out
            ev = await self._start_eviction(addr_runs)
            await ev.done.wait()
            out.done = ev.result.done
            out.skipped = prep.seen - ev.result.done
            return out

        async def evict():
            return await self._spread(chunked(runs, min(CHUNK_PAGES, protocol.EVICT_MAX_RUNS)), evict_chunk)
        return await self._run_op(evict)

    async def prefetch(self, runs: list[Run]) -> OpResult:
        """Put evicted pages back before they are touched (they stay tracked: state clean)."""
        async def prefetch():
            self.native.mark_prefetch(runs)
            return await self._spread(chunked(runs, PREFETCH_CHUNK_PAGES), lambda chunk: self._in_thread(
                self.native.restore, chunk, False))
        return await self._run_op(prefetch)

    async def recompress(self, runs: list[Run]) -> OpResult:
        """Encode copies again with lz4hc where their blob gets smaller (done = copies replaced)."""
        async def recompress():
            return await self._spread(chunked(runs), lambda chunk: self._in_thread(
                self.native.recompress, chunk))
        return await self._run_op(recompress)

    # -- evictions in flight ------------------------------------------------------
    async def _start_eviction(self, addr_runs) -> _Eviction:
        rid = self._next_request
        self._next_request += 1
        ev = _Eviction(addr_runs)
        self._inflight[rid] = ev
        try:
            await self.source.request_free(rid, addr_runs)
        except BaseException:
            # never sent: nothing was dropped, so the pages go back to clean
            self._inflight.pop(rid, None)
            ev.result = self.native.evict_complete(addr_runs, -errno.ECANCELED)
            ev.done.set()
            raise
        return ev

    def eviction_done(self, request_id: int, status: int) -> None:
        """The source dropped (status 0) or failed to drop the pages of a request."""
        ev = self._inflight.pop(request_id, None)
        if ev is None:
            raise protocol.ProtocolError(errno.EINVAL, f"EVICT_DONE for unknown request {request_id}")
        ev.result = self.native.evict_complete(ev.addr_runs, status)
        ev.done.set()

    @property
    def evictions_in_flight(self) -> int:
        return len(self._inflight)

    async def settle_evictions(self) -> bool:
        """Wait for outstanding evictions to be answered; False if some never were."""
        with trio.move_on_after(EVICT_SETTLE_SECONDS):
            while self._inflight:
                await next(iter(self._inflight.values())).done.wait()
        return not self._inflight

    # -- the end -----------------------------------------------------------------
    async def close(self, restore: bool) -> None:
        """End the pager: stop operations, then (if the target lives on) give every
        page back writable and unregister, so the target runs on without us."""
        self.closed = True
        for scope in list(self._op_scopes):
            scope.cancel()
        async with self._op_lock:
            if restore:
                settled = await self.settle_evictions()
                if not settled:
                    log.warning("agent did not answer %d eviction(s); pagemap decides",
                                len(self._inflight))
                runs = [(r.index, 0, r.npages) for r in self.native.ranges()]
                await self._in_thread(self.native.restore, runs, True, not settled)
                await self._in_thread(self.native.unregister)
            for ev in self._inflight.values():
                ev.result = OpResult()
                ev.done.set()
            self._inflight.clear()

