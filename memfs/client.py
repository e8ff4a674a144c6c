"""The Python client: hand memory of this process to the memfs daemon.

    from memfs.client import Client
    with Client() as c:               # socket: $PREDICOMP_SOCKET or the default
        buf = c.alloc(64 << 20)       # registered, page aligned, private anonymous
        buf[:5] = b"hello"
        sid = c.start()
        ...                           # the daemon may compress and evict buf now
        c.prefetch(0, 1 << 20)        # hint: bring the first MiB back
    # leaving the block stops the session: every page is back in the process

It is libpredicomp_client (native/client) bound with cffi, agent thread
included: the same code C targets link.  Errors are OSError with the
errno the library returned and its explanation.
"""
from __future__ import annotations

import mmap
import os
from typing import Any

from ._client import ffi, lib

PAGE_SIZE = 4096
RANGE_FLAGS = lib.PREDICOMP_CLIENT_RANGE_F_ANON_PRIVATE | lib.PREDICOMP_CLIENT_RANGE_F_WRITABLE


class Client:
    def __init__(self, socket: str | None = None):
        pp = ffi.new("struct predicomp_client **")
        self._path = socket.encode() if socket else ffi.NULL
        rc = lib.predicomp_client_open(pp, self._path)
        if rc < 0:
            raise OSError(-rc, f"connecting to the memfs daemon ({socket or os.environ.get('PREDICOMP_SOCKET') or 'default socket'}): {os.strerror(-rc)}")
        self._pc = pp[0]
        self._buffers: list[tuple[object, object, int]] = []  # (buffer, cdata pointer, length)

    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            detail = ffi.string(lib.predicomp_client_last_error(self._pc)).decode(errors="replace")
            raise OSError(-rc, f"{what}: {os.strerror(-rc)}" + (f" ({detail})" if detail else ""))
        return rc

    def alloc(self, nbytes: int) -> mmap.mmap:
        """A new private anonymous mapping of nbytes (rounded up to pages), registered."""
        length = max(PAGE_SIZE, -(-nbytes // PAGE_SIZE) * PAGE_SIZE)
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                        prot=mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            self.register(buf)
        except BaseException:
            buf.close()
            raise
        return buf

    def register(self, buf) -> int:
        """Register a writable, page-aligned private anonymous buffer; returns its range index."""
        ptr = ffi.from_buffer(buf, require_writable=True)
        handle = ffi.new("struct predicomp_range_handle *")
        self._check(lib.predicomp_client_register_range(self._pc, ptr, len(ptr), RANGE_FLAGS, handle),
                    "registering the range")
        self._buffers.append((buf, ptr, len(ptr)))
        return handle.index

    def start(self) -> int:
        """Start the session; returns its id (sessions/<id> in the filesystem)."""
        self._check(lib.predicomp_client_start(self._pc), "starting the session")
        sid = ffi.new("uint64_t *")
        self._check(lib.predicomp_client_session_id(self._pc, sid), "session id")
        return sid[0]

    def prefetch(self, offset: int, length: int, buffer=None) -> None:
        """Ask for [offset, offset+length) of a registered buffer (default: the first) to be restored."""
        if not self._buffers:
            raise OSError(22, "nothing registered")
        ptr: Any = self._buffers[0][1]  # a cffi pointer
        if buffer is not None:
            for buf, p, _ in self._buffers:
                if buf is buffer:
                    ptr = p
                    break
            else:
                raise ValueError("buffer is not registered with this client")
        self._check(lib.predicomp_client_prefetch(self._pc, ptr + offset, length), "prefetch")

    def stop(self) -> None:
        """End the session: the daemon puts every page back first."""
        self._check(lib.predicomp_client_stop(self._pc), "stopping the session")

    def stats(self) -> dict[str, int]:
        """What the library did while no daemon served this process: takeovers,
        agent_faults (faults it served itself), resumes, alone (1 now)."""
        st = ffi.new("struct predicomp_client_stats *")
        self._check(lib.predicomp_client_stats(self._pc, st), "stats")
        return {"takeovers": st.takeovers, "agent_faults": st.agent_faults, "resumes": st.resumes,
                "alone": st.alone}

    @property
    def has_agent(self) -> bool:
        return bool(lib.predicomp_client_has_agent(self._pc))

    def close(self) -> None:
        if self._pc is not None:
            rc = lib.predicomp_client_close(self._pc)
            self._pc = None
            for _, ptr, _ in self._buffers:
                ffi.release(ptr)  # the caller may close its buffers now
            self._buffers.clear()
            if rc < 0:
                raise OSError(-rc, f"closing the client: {os.strerror(-rc)}")

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
