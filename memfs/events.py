"""Flat keyed event counts that can be waited on (the `events` files)."""
from __future__ import annotations

from typing import Awaitable, Callable

import trio


class EventCounts:
    """Named counters; every change bumps `generation` and wakes waiters.

    Listeners are plain callables run synchronously on change (the
    filesystem uses them to notify poll(2) handles); they must not block.
    """

    def __init__(self, names=()):
        self.counts: dict[str, int] = dict.fromkeys(names, 0)
        self.generation = 0
        self._changed = trio.Event()
        self._listeners: set[Callable[[], None]] = set()

    def bump(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n
        self._fire()

    def set(self, name: str, value: int) -> None:
        if self.counts.get(name) != value:
            self.counts[name] = value
            self._fire()

    def _fire(self) -> None:
        self.generation += 1
        ev, self._changed = self._changed, trio.Event()
        ev.set()
        for cb in list(self._listeners):
            cb()

    async def wait_changed(self, since: int) -> int:
        while self.generation == since:
            await self._changed.wait()
        return self.generation

    def add_listener(self, cb: Callable[[], None]) -> None:
        self._listeners.add(cb)

    def remove_listener(self, cb: Callable[[], None]) -> None:
        self._listeners.discard(cb)

    def render(self) -> str:
        return "".join(f"{k} {v}\n" for k, v in self.counts.items())


async def first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return when the first of these waits returns; the others are cancelled."""
    async with trio.open_nursery() as nursery:
        async def until(wait):
            await wait()
            nursery.cancel_scope.cancel()
        for wait in waits:
            nursery.start_soon(until, wait)
