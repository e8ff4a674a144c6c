"""The pager of one session: compress, evict, prefetch and recompress pages, safely.

This is the API the filesystem, the policy and the CLI use.  Operations
take page runs ((range, first, count) tuples, see `memfs.selection` for
turning user selectors into runs), report what they did as `OpResult`,
and may be cancelled: work is done in chunks, each chunk handed to the
native core on a worker thread (two chunks at once: `Pager._spread`), and
a cancellation takes effect between chunks.  One operation runs at a time
per session, so an operation never meets another's half-done pages.

Freeing pages needs the target's cooperation: its agent (`AgentChannel`)
drops them on request.  An eviction, once asked for, ends when the agent
answers, whoever was waiting for it, so a cancelled caller never leaves
pages half-evicted; an agent that does not answer within `agent_timeout_ms`
makes the operation fail with ETIMEDOUT, and the request is cancelled if
the agent has not begun it (its pages stay as they were).  A session
without an agent is wp-only: pages are compressed, never freed.
"""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field
from typing import Protocol, cast

import trio

from . import protocol
from .agent import AgentChannel
from .core import NativeSession, OpResult, Run
from .errors import first_oserror

log = logging.getLogger("memfs.pager")

CHUNK_PAGES = 2048  # pages per native call: the grain of cancellation
# Each chunk costs the daemon's thread a hand-off to a worker and back (about
# 0.3 ms of CPU), taken from the workers; a prefetch is CPU-bound, so it hands
# off 16 MiB at a time.
PREFETCH_CHUNK_PAGES = 4096
WORKERS = 2  # chunks of one operation in hand at once (the daemon's limiter caps threads)


class SessionEnded(OSError):
    def __init__(self, text="the session has ended"):
        super().__init__(errno.ESRCH, text)


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
    def __init__(self, native: NativeSession, agent: AgentChannel | None, limiter: trio.CapacityLimiter,
                 agent_timeout=lambda: 10.0, on_done=lambda verb: None):
        self.native = native
        self.agent = agent  # None: wp-only
        self._limiter = limiter
        self._agent_timeout = agent_timeout  # seconds the agent has to answer a request
        self._on_done = on_done  # told the verb after each operation that completed
        self._op_lock = trio.Lock()
        self._op_scopes: set[trio.CancelScope] = set()
        self.closed = False

    @property
    def mode(self) -> str:
        return "full" if self.agent is not None else "wp-only"

    @property
    def can_free(self) -> bool:
        return self.agent is not None

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
        if self.agent is None:
            raise OSError(errno.EOPNOTSUPP, "this session is wp-only: its pages cannot be freed")

        async def evict_chunk(chunk) -> OpResult:
            out = OpResult()
            await self._in_thread(self.native.compress, chunk, True)
            addr_runs, prep = self.native.evict_prepare(chunk, protocol.EVICT_MAX_RUNS)
            out.seen = prep.seen
            if not addr_runs:
                out.skipped = prep.seen
                return out
            done = await self._ask_agent(addr_runs)
            out.done = done.done
            out.skipped = prep.seen - done.done
            return out

        async def evict():
            return await self._spread(chunked(runs, min(CHUNK_PAGES, protocol.EVICT_MAX_RUNS)), evict_chunk)
        return await self._run_op(evict)

    async def _ask_agent(self, addr_runs) -> OpResult:
        """One EVICT request, to its end: answered, or given up after agent_timeout_ms
        (or when the operation is cancelled)."""
        rid, req = await self.agent.evict(addr_runs)
        try:
            with trio.move_on_after(self._agent_timeout()):
                await req.answered.wait()
        finally:
            began = not req.answered.is_set() and not self.agent.cancel(rid)
        if req.answered.is_set() and not req.cancelled:
            return cast(OpResult, req.result)  # an answered evict has one
        if not began:
            raise OSError(errno.ETIMEDOUT, f"the target's agent did not answer within "
                          f"{self._agent_timeout():g} s: its pages stay in it")
        # it began: its answer completes the eviction whenever it comes (pages stay
        # evicting meanwhile, their copies kept, writes to them held)
        raise OSError(errno.ETIMEDOUT, f"the target's agent began freeing pages and did not finish "
                      f"within {self._agent_timeout():g} s")

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

    # -- the end -----------------------------------------------------------------
    async def close(self, restore: bool, before_restore=None) -> bool:
        """End the pager: stop operations; then, if the target lives on, give every
        page back writable and unregister, so the target runs on without us.

        Requests the agent never began are cancelled: it will not carry them out.
        If it began one and does not finish it within agent_timeout_ms, nothing is
        given back and False is returned: the session must be left to the target
        (its client serves its own faults from the store it holds), since pages the
        agent is still dropping must keep their copies."""
        self.closed = True
        for scope in list(self._op_scopes):
            scope.cancel()
        async with self._op_lock:
            if restore and self.agent is not None:
                self.agent.cancel_all()
                if not await self.agent.wait_begun(self._agent_timeout()):
                    log.warning("the agent began %d request(s) and did not finish them: "
                                "the session is left to the target", len(self.agent.in_flight))
                    return False
            if restore and before_restore is not None:
                await before_restore()
            if restore:
                await self._in_thread(self.native.restore, self.native.indexed_runs(), True)
                await self._in_thread(self.native.unregister)
        return True
