"""What one user may cost the daemon: connections, sessions, registered memory, messages.

Any local user may connect, so each user id has limits (settings
uid_connections_max, uid_sessions_max, uid_registered_bytes_max; root is
exempt unless limit_root is 1), and every user's messages are paced by one
token bucket (MESSAGES_PER_SECOND): a flood slows its sender, not the
daemon.  The daemon as a whole keeps connections under what its file
descriptor limit allows (`connection_room`).  (docs/design.md, "Limits".)
"""
from __future__ import annotations

import errno
import resource
from collections import Counter
from dataclasses import dataclass, field

import trio

from .config import MAX, Config

MESSAGES_PER_SECOND = 50_000  # per user: far above any client's need, a bound on a flood's CPU
MESSAGES_BURST = 5_000
FDS_PER_CONNECTION = 12  # a session's socket, userfaultfd, pidfds, pagemap, eventfds, store and fence
FDS_RESERVED = 64  # the daemon's own (FUSE, logs, listening socket, /proc reads)


def raise_nofile() -> int:
    """Raise the soft limit on open files to the hard one; the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError):
            pass
    return soft


@dataclass
class _Bucket:
    tokens: float = MESSAGES_BURST
    at: float = 0.0


@dataclass
class UserLimits:
    config: Config
    nofile: int = field(default_factory=lambda: resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    connections: Counter = field(default_factory=Counter)
    sessions: Counter = field(default_factory=Counter)
    registered: Counter = field(default_factory=Counter)
    _buckets: dict = field(default_factory=dict)

    def _applies(self, uid: int) -> bool:
        return uid != 0 or bool(self.config.get("limit_root"))

    def _over(self, name: str, uid: int, have: int, more: int) -> bool:
        limit = self.config.get(name)
        return self._applies(uid) and limit is not MAX and have + more > limit

    def connection_room(self) -> bool:
        """Can the daemon take one more connection without running out of descriptors?"""
        return (sum(self.connections.values()) + 1) * FDS_PER_CONNECTION + FDS_RESERVED <= self.nofile

    def connect(self, uid: int) -> None:
        if self._over("uid_connections_max", uid, self.connections[uid], 1):
            raise OSError(errno.EAGAIN, f"user {uid} has uid_connections_max connections already")
        self.connections[uid] += 1

    def disconnect(self, uid: int) -> None:
        self.connections[uid] -= 1
        if self.connections[uid] <= 0:
            del self.connections[uid]

    def start_session(self, uid: int, registered: int) -> None:
        if self._over("uid_sessions_max", uid, self.sessions[uid], 1):
            raise OSError(errno.EAGAIN, f"user {uid} has uid_sessions_max sessions already")
        if self._over("uid_registered_bytes_max", uid, self.registered[uid], registered):
            raise OSError(errno.ENOMEM, f"user {uid} would register more than uid_registered_bytes_max "
                                        f"({self.registered[uid]} + {registered} bytes)")
        self.sessions[uid] += 1
        self.registered[uid] += registered

    def grow_session(self, uid: int, registered: int) -> None:
        """A running session registers more (its ranges grow)."""
        if self._over("uid_registered_bytes_max", uid, self.registered[uid], registered):
            raise OSError(errno.ENOMEM, f"user {uid} would register more than uid_registered_bytes_max")
        self.registered[uid] += registered

    def end_session(self, uid: int, registered: int) -> None:
        self.sessions[uid] -= 1
        self.registered[uid] -= registered
        for c in (self.sessions, self.registered):
            if c[uid] <= 0:
                del c[uid]

    async def pace(self, uid: int) -> None:
        """Before handling one message of this user's: wait while the user's bucket is empty."""
        if not self._applies(uid):
            return
        b = self._buckets.setdefault(uid, _Bucket(at=trio.current_time()))
        now = trio.current_time()
        b.tokens = min(MESSAGES_BURST, b.tokens + (now - b.at) * MESSAGES_PER_SECOND)
        b.at = now
        if b.tokens < 1:
            await trio.sleep((1 - b.tokens) / MESSAGES_PER_SECOND)
            b.tokens, b.at = 1, trio.current_time()
        b.tokens -= 1
