"""The daemon: listens for targets, owns every session's task.

One nursery owns the daemon's tasks: the accept loop, one task per
connection (a `Session`), and whatever is attached later (the filesystem,
the policy).  Each session cleans up after itself (session.py); shutdown
asks every live session to end gracefully, which gives each target its
pages back before the daemon exits.
"""
from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
import time
from collections import Counter

import trio

from . import core, protocol
from .access import AccessMonitor
from .counters import COUNTERS, Kind, counter
from .config import Config
from .events import EventCounts
from .limits import UserLimits, raise_nofile
from .session import Session

log = logging.getLogger("memfs.daemon")

GLOBAL_EVENTS = ("sessions_started", "sessions_ended", "sessions_refused", "compress", "evict",
                 "prefetch", "recompress", "restore_fail", "degraded", "damon_unavailable")
WATCH_SECONDS = 0.25  # how often the fault threads' own news (restore failures) is looked for
SHUTDOWN_SECONDS = 60
IOCTL_LOG_SECONDS = 10  # a session's failing uffd ioctl is logged at most this often (per ioctl)
ACCEPT_BACKOFF = (0.01, 1.0)  # out of descriptors: wait this long before accepting again, doubling


class Daemon:
    def __init__(self, socket_path: str = protocol.DEFAULT_SOCKET, config: Config | None = None):
        self.socket_path = socket_path
        self.config = config or Config()
        self.sessions: dict[int, Session] = {}
        self.sessions_total = 0
        self._next_id = 1
        self.limits = UserLimits(self.config, nofile=raise_nofile())
        self._ioctl_logged: dict[tuple[int, str], tuple[float, int]] = {}  # (when last told, untold count)
        self.limiter = trio.CapacityLimiter(max(2, os.cpu_count() or 2))
        self.ended_totals: Counter = Counter()
        self.ended_hist = [0] * core.HIST_BUCKETS
        self.events = EventCounts(GLOBAL_EVENTS)
        self.started = time.time()
        self._nursery: trio.Nursery | None = None
        self._session_done = trio.Event()
        self.access = AccessMonitor(self.config)
        if self.access.damon_reason:
            self.events.bump("damon_unavailable")

    # -- sessions -----------------------------------------------------------------
    def new_session_id(self) -> int:
        sid = self._next_id
        self._next_id += 1
        return sid

    def add_session(self, s: Session) -> None:
        """A session runs now (ids come from new_session_id)."""
        self.sessions[s.id] = s
        self.sessions_total += 1
        self.events.bump("sessions_started")

    def remove_session(self, s: Session) -> None:
        if self.sessions.pop(s.id, None) is None:
            return
        for k, v in s.final_counters.items():
            c = counter(k)
            if c.kind is Kind.TOTAL:
                self.ended_totals[k] += v
            elif c.kind is Kind.MAX:
                self.ended_totals[k] = max(self.ended_totals[k], v)
        self.ended_hist = [a + b for a, b in zip(self.ended_hist, s.final_hist)]
        self.events.bump("sessions_ended")
        done, self._session_done = self._session_done, trio.Event()
        done.set()

    def counters(self) -> dict[str, int]:
        """Daemon-wide counters, each summed as its kind says (memfs/counters.py):
        totals and maxima over all sessions ever, levels over live ones; the
        store's levels from the stores themselves."""
        out: Counter = Counter()
        for k, c in COUNTERS.items():
            if c.scope == "session" or c.kind is Kind.VALUE:
                continue
            if c.kind in (Kind.TOTAL, Kind.MAX):
                out[k] = self.ended_totals.get(k, 0)
            else:
                out[k] = 0
        for s in list(self.sessions.values()):
            for k, v in s.counters().items():
                if k not in out:
                    continue
                if counter(k).kind is Kind.MAX:
                    out[k] = max(out[k], v)
                else:
                    out[k] += v
        st = core.store_stats()
        totals = dict(out)  # (a Counter's update() adds)
        totals.update(sessions_active=len(self.sessions), sessions_total=self.sessions_total,
                   store_bytes_compressed=st["bytes_compressed"], store_bytes_used=st["bytes_used"],
                   store_bytes_peak=st["bytes_peak"], store_blobs=st["blobs"], index_bytes=st["index_bytes"])
        return totals

    def histogram(self) -> list[int]:
        """Fault latencies of all sessions ever."""
        h = list(self.ended_hist)
        for s in list(self.sessions.values()):
            h = [a + b for a, b in zip(h, s.histogram())]
        return h

    def _log_ioctl_failures(self, s: Session) -> None:
        """Each failing uffd ioctl of a session, in the log: its name, errno, count, at most every IOCTL_LOG_SECONDS."""
        now = time.monotonic()
        for name, err, count, addr in s.native.ioctl_failures():
            key = (s.id, name)
            pending = self._ioctl_logged.get(key, (0.0, 0))
            count += pending[1]
            if now - pending[0] < IOCTL_LOG_SECONDS:
                self._ioctl_logged[key] = (pending[0], count)  # said recently: counted, told later
                continue
            log.warning("%s: %s failed %d time(s): %s (last at 0x%x)", s, name, count,
                        errno.errorcode.get(err, err), addr)
            self._ioctl_logged[key] = (now, 0)

    async def _watch_sessions(self) -> None:
        """Turn what the fault threads counted into events scripts can poll for, and log their failures."""
        seen: dict[int, int] = {}
        while True:
            await trio.sleep(WATCH_SECONDS)
            for sid, s in list(self.sessions.items()):
                if s.native is None or not s.live:
                    fails = s.final_counters.get("restore_fail", 0)
                else:
                    try:
                        fails = s.native.restore_failures()
                        self._log_ioctl_failures(s)
                    except OSError:
                        continue  # it ended meanwhile
                if fails > seen.get(sid, 0):
                    s.events.bump("restore_fail", fails - seen.get(sid, 0))
                    self.events.bump("restore_fail", fails - seen.get(sid, 0))
                seen[sid] = fails
            for sid in set(seen) - set(self.sessions):
                del seen[sid]
            for key in [k for k in self._ioctl_logged if k[0] not in self.sessions]:
                del self._ioctl_logged[key]

    # -- serving --------------------------------------------------------------------------
    async def _listen(self) -> trio.socket.SocketType:
        path = self.socket_path
        os.makedirs(os.path.dirname(path) or ".", mode=0o755, exist_ok=True)
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise OSError(errno.EADDRINUSE, f"another memfs daemon is listening on {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                log.info("removing stale socket %s", path)
                os.unlink(path)
            finally:
                probe.close()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        await sock.bind(path)
        os.chmod(path, 0o666)  # any user may connect: peers are identified by SO_PEERCRED
        sock.listen(128)
        return sock

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listener = await self._listen()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._accept_loop, listener)
                nursery.start_soon(self._watch_sessions)
                log.info("listening on %s", self.socket_path)
                task_status.started(self)
        finally:
            listener.close()
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
            with trio.CancelScope(shield=True):
                await self.access.close()

    async def _accept_loop(self, listener) -> None:
        """Accept for ever: out of descriptors (EMFILE, ENFILE) or over the connections the
        descriptor limit allows, it logs, waits and tries again; it never ends the daemon."""
        backoff = ACCEPT_BACKOFF[0]
        while True:
            if not self.limits.connection_room():
                log.warning("%d connections: no room for more under RLIMIT_NOFILE (%d); waiting",
                            sum(self.limits.connections.values()), self.limits.nofile)
                await trio.sleep(backoff)
                backoff = min(ACCEPT_BACKOFF[1], backoff * 2)
                continue
            try:
                conn, _ = await listener.accept()
            except OSError as e:
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                log.warning("accept: %s; trying again in %.2f s", e.strerror, backoff)
                await trio.sleep(backoff)
                backoff = min(ACCEPT_BACKOFF[1], backoff * 2)
                continue
            backoff = ACCEPT_BACKOFF[0]
            self._nursery.start_soon(self._serve_connection, conn)

    async def _serve_connection(self, conn) -> None:
        with conn:
            try:
                uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          struct.calcsize("3i")))[1]
                self.limits.connect(uid)
            except OSError as e:
                log.info("connection refused: %s", e.strerror)
                self.events.bump("sessions_refused")
                with trio.move_on_after(1):
                    await conn.send(protocol.encode_err(1, e.errno or errno.EIO, e.strerror or str(e)))
                return
            session = Session(self, conn)
            try:
                await session.run()
            except Exception:
                # a bug must cost one session, never the daemon
                log.exception("%s failed", session)
                self.remove_session(session)
            finally:
                self.limits.disconnect(uid)

    async def shutdown(self) -> None:
        """End every session gracefully (targets get their pages back), then stop."""
        for s in list(self.sessions.values()):
            s.end("shutdown", reason="daemon shutting down")
        with trio.move_on_after(SHUTDOWN_SECONDS):
            while self.sessions:
                await self._session_done.wait()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
