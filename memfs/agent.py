"""The channel to a target's agent thread: the requests only the target itself can carry out.

The kernel lets a process drop its own private pages (MADV_DONTNEED) and move
them (UFFDIO_MOVE), not another's, so the daemon asks the target's agent:
EVICT (drop these pages, answered by EVICT_DONE) and SAMPLE (park these pages
in the staging area, answered by SAMPLE_DONE).

Every request has an id from one counter and a word in the session's fence
page (predicomp_store.h), shared with the target: the daemon arms the word
before sending, and the agent begins a request only by moving that word from
PENDING to STARTED.  So the daemon can give up on a request (`cancel`): if
the word was still PENDING, the request will never be carried out, whenever
the agent reads it; if it was STARTED, the agent is carrying it out and its
answer must be awaited.  An eviction the agent never began leaves its pages
as they were; one it began is finished by its answer, whoever waits for it
(docs/design.md, "Nothing lost when the daemon leaves").
"""
from __future__ import annotations

import errno
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import trio

from . import protocol
from .core import NativeSession, OpResult

SAMPLE_ANSWER_SECONDS = 5
FENCE_WORDS = 64  # PCS_FENCE_WORDS: the fence page's words, so at most this many requests in flight


@dataclass
class Request:
    kind: str  # "evict" or "sample"
    body: list  # evict: address runs; sample: moves
    answered: trio.Event = field(default_factory=trio.Event)
    status: int = 0
    moved: bytes = b""
    cancelled: bool = False
    result: OpResult | None = None  # evict: what completing it did


class AgentChannel:
    """Requests to the target's agent, each fenced (see the module's text)."""

    def __init__(self, native: NativeSession, send: Callable, next_seq: Callable[[], int]):
        self._native = native
        self._send = send  # async send(bytes)
        self._next_seq = next_seq
        # an eviction ends in native.evict_complete: the pages freed, or back to clean
        self._complete_evict = native.evict_complete
        self._next_id = 1
        self.in_flight: dict[int, Request] = {}
        self._cancelled: deque[int] = deque(maxlen=FENCE_WORDS)  # the agent may still answer these

    def _new_id(self) -> int:
        rid = self._next_id
        while self._native.fence_busy(rid):
            # its fence word holds an older request the agent began and never answered
            rid += 1
        self._next_id = rid + 1
        return rid

    async def _request(self, kind: str, body, encode) -> tuple[int, Request]:
        if len(self.in_flight) >= FENCE_WORDS:
            raise OSError(errno.EBUSY, "the agent has too many requests it began and never answered")
        rid = self._new_id()
        req = Request(kind, body)
        self._native.fence_arm(rid)
        self.in_flight[rid] = req
        try:
            await self._send(encode(self._next_seq(), rid))
        except BaseException:
            # never sent (or not all of it): the fence says nothing of it can begin
            self.cancel(rid)
            raise
        return rid, req

    def _forget(self, rid: int) -> None:
        self.in_flight.pop(rid, None)
        self._native.fence_clear(rid)

    def _end(self, rid: int, req: Request, status: int, moved: bytes = b"") -> None:
        """The request is over (answered, or cancelled before it began): its effects, then its waiters."""
        self._forget(rid)
        req.status, req.moved = status, moved
        if req.kind == "evict":
            req.result = self._complete_evict(req.body, status)
        elif req.cancelled:
            self._native.sample_commit(req.body, bytes((len(req.body) + 7) // 8))  # none happened
        else:
            self._native.sample_commit(req.body, moved)
        req.answered.set()

    async def evict(self, addr_runs: list[tuple[int, int]]) -> tuple[int, Request]:
        """Ask the agent to drop these address runs; wait on the request's `answered`."""
        return await self._request("evict", addr_runs, lambda seq, rid: protocol.encode_evict(seq, rid, addr_runs))

    async def sample(self, moves: list[tuple[int, int]], zap: bool) -> None:
        """Have the agent make these moves; the answer is committed whenever it comes,
        and a request it has not begun within SAMPLE_ANSWER_SECONDS is cancelled."""
        rid, req = await self._request("sample", moves,
                                       lambda seq, rid: protocol.encode_sample(seq, rid, moves, zap))
        with trio.move_on_after(SAMPLE_ANSWER_SECONDS):
            await req.answered.wait()
        if not req.answered.is_set():
            self.cancel(rid)

    def cancel(self, rid: int) -> bool:
        """Give up on a request: True if it can never be carried out now (it was
        not begun, or is answered already); False if the agent began it."""
        req = self.in_flight.get(rid)
        if req is None:
            return True
        if not self._native.fence_cancel(rid):
            return False
        req.cancelled = True
        self._cancelled.append(rid)
        self._end(rid, req, -errno.ECANCELED)
        return True

    def answered(self, kind: str, rid: int, status: int = 0, moved: bytes = b"") -> Request:
        """The agent's answer (EVICT_DONE, SAMPLE_DONE)."""
        req = self.in_flight.get(rid)
        if req is None and rid in self._cancelled:
            return Request(kind, [], cancelled=True)  # we gave up on it; the agent says it did nothing
        if req is None or req.kind != kind:
            raise protocol.ProtocolError(errno.EINVAL, f"{kind.upper()}_DONE for unknown request {rid}")
        if kind == "sample" and len(moved) != (len(req.body) + 7) // 8:
            raise protocol.ProtocolError(errno.EINVAL, "SAMPLE_DONE answers another number of moves")
        if status and kind == "evict" and status == -errno.ECANCELED:
            req.cancelled = True  # the agent found it cancelled (it checks the fence)
        self._end(rid, req, status, moved)
        return req

    def cancel_all(self) -> list[int]:
        """Give up on every request not begun; the ids of those the agent began."""
        return [rid for rid in list(self.in_flight) if not self.cancel(rid)]

    async def wait_begun(self, seconds: float) -> bool:
        """Wait (a while at most) for answers to the requests the agent began; True if none is left."""
        with trio.move_on_after(seconds):
            while self.in_flight:
                await next(iter(self.in_flight.values())).answered.wait()
        return not self.in_flight

