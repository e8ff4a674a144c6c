"""The service manager's readiness protocol (sd_notify(3)), without libsystemd:
one datagram of `KEY=value` lines to $NOTIFY_SOCKET, when it is set."""
from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("memfs")


def notify(**fields: object) -> bool:
    """notify(READY=1, STATUS="...") -> whether a service manager was told."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):  # an abstract socket
        addr = "\0" + addr[1:]
    text = "".join(f"{key}={value}\n" for key, value in fields.items())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(text.encode())
    except OSError as e:
        log.warning("NOTIFY_SOCKET %s: %s", os.environ["NOTIFY_SOCKET"], e.strerror or e)
        return False
    return True
