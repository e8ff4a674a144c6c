"""A session's life, in the one place its states are named (memfs(5), `state`)."""
from __future__ import annotations

import enum


class State(str, enum.Enum):
    CONNECTING = "connecting"  # the handshake: HELLO, RANGEs, START or RESUME
    RUNNING = "running"  # faults served, verbs taken
    STOPPING = "stopping"  # its pages going back to the target
    ENDED = "ended"  # gone from the tree; its counters added to the daemon's totals

    def __str__(self) -> str:
        return self.value
