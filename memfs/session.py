"""One target's session: the protocol conversation and the session's life.

Life of a session (`State`):
  connecting  HELLO, RANGEs and START are read and validated; the native
              session is created, its ranges registered and its fault thread
              started; ACK(START) carries the session id and the target's
              descriptors of its store and fence page.  Or, for a target
              whose daemon died: HELLO, RANGEs, FORGETs and RESUME; the
              session is rebuilt from the store the target kept, ACK(RESUME)
              answers, and the daemon serves the faults from ADOPT on.
  running     the target may send PREFETCH hints and STOP; its agent
              answers EVICT and SAMPLE requests.
  stopping    on STOP, a protocol error or daemon shutdown: operations are
              cancelled, requests the agent never began are cancelled, every
              page is given back to the target writable and the ranges
              unregistered, then ACK(STOP) or ERR is sent.  A target that is
              gone (its socket closed, its process exited) gets none of this;
              a target whose agent began a request and never finished it is
              left to serve itself from its store (the connection is just
              closed, as if the daemon had died).
  ended       the native session is freed: its store memory is returned
              (unless the target still holds the store).

The session belongs to the connecting process itself (`Peer`: a pidfd), and
what one user may open is bounded (`UserLimits`).  A protocol error ends
this session only; the daemon goes on.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import socket
import time

import trio

from . import protocol, report
from typing import TYPE_CHECKING, cast

from .agent import AgentChannel
from .config import SessionConfig
from .core import HIST_BUCKETS, PAGE_SIZE, NativeSession
from .events import EventCounts, first_of
from .pager import Pager
from .peer import Peer, PeerGone
from .policy import Policy
from .states import State

if TYPE_CHECKING:
    from .access import AccessSource

log = logging.getLogger("memfs.session")
summary_log = logging.getLogger("memfs.summary")

HANDSHAKE_SECONDS = 30
PREFETCH_QUEUE = 16
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
USER_ADDR_LIMIT = 1 << 47
SESSION_EVENTS = ("compress", "evict", "prefetch", "recompress", "prefetch_dropped", "restore_fail", "degraded",
                  "ended")
MAX_FD_PER_RECV = 4  # the most descriptors a message carries is 2 (RESUME)
RESUMED = ("takeovers", "agent_faults", "resumes")  # what a resumed target reports of its time alone


def check_ranges(peer: Peer, ranges: list[protocol.Range]) -> None:
    """Ranges must be page aligned, disjoint and private anonymous memory of the peer."""
    known = protocol.RANGE_ANON_PRIVATE | protocol.RANGE_WRITABLE | protocol.RANGE_STAGING
    for r in ranges:
        if not r.length or r.addr % protocol.PAGE_SIZE or r.length % protocol.PAGE_SIZE:
            raise protocol.ProtocolError(errno.EINVAL, f"range {r.index}: 0x{r.addr:x}+{r.length} is empty or not page aligned")
        if r.addr + r.length > USER_ADDR_LIMIT:
            raise protocol.ProtocolError(errno.EINVAL, f"range {r.index}: beyond the user address space")
        if not r.flags & protocol.RANGE_ANON_PRIVATE or r.flags & ~known:
            raise protocol.ProtocolError(errno.EINVAL, f"range {r.index}: flags 0x{r.flags:x} (ANON_PRIVATE required)")
    ordered = sorted(ranges, key=lambda r: r.addr)
    for a, b in zip(ordered, ordered[1:]):
        if a.addr + a.length > b.addr:
            raise protocol.ProtocolError(errno.EEXIST, f"ranges {a.index} and {b.index} overlap")
    maps = []
    try:
        for line in peer.lines("maps"):
            parts = line.split(None, 5)
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            path = parts[5].strip() if len(parts) > 5 else ""
            anon = parts[1][3] == "p" and parts[4] == "0" and (not path or path.startswith("["))
            maps.append((lo, hi, anon))
    except OSError as e:
        raise protocol.ProtocolError(errno.ESRCH, f"reading the target's maps: {e.strerror}")
    for r in ranges:
        want, end = r.addr, r.addr + r.length
        for lo, hi, anon in maps:
            if hi <= want or lo > want:
                continue
            if not anon:
                raise protocol.ProtocolError(errno.EINVAL, f"range {r.index}: not private anonymous memory")
            want = hi
            if want >= end:
                break
        if want < end:
            raise protocol.ProtocolError(errno.EFAULT, f"range {r.index}: 0x{want:x} is not mapped")


def is_userfaultfd(fd: int) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[userfaultfd]"
    except OSError:
        return False


def _close(*fds: int) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


class Session:
    def __init__(self, daemon, sock: trio.socket.SocketType):
        self.daemon = daemon
        self.sock = sock
        self.id = 0
        self.peer: Peer | None = None
        self.pid = self.uid = self.gid = -1
        self.comm = self.cmdline = ""
        self.state = State.CONNECTING
        self.caps = 0
        self.registered = 0  # bytes counted against the user's limit
        self.resumed = dict.fromkeys(RESUMED, 0)  # what a resumed target reported
        self.native: NativeSession | None = None
        self.agent: AgentChannel | None = None
        self.pager: Pager | None = None
        self.access: AccessSource | None = None  # once running
        self.policy: Policy | None = None
        self.started = time.time()
        self.end_reason = ""
        self.final_counters: dict[str, int] = {}
        self.final_hist: list[int] = [0] * HIST_BUCKETS
        self.config = SessionConfig(daemon.config)
        self.events = EventCounts(SESSION_EVENTS)
        self._activity = trio.Event()
        self._activity_waiters = 0
        self._activity_watched = False
        self._nursery: trio.Nursery | None = None
        self._send_lock = trio.Lock()
        self._seq = 0
        self._reader = protocol.FrameReader()
        self._frame: protocol.Frame | None = None  # the last one read: its descriptors until taken
        self._end = trio.Event()
        self._end_kind = ""
        self._end_error: protocol.ProtocolError | None = None
        self._prefetch_in, self._prefetch_out = trio.open_memory_channel(PREFETCH_QUEUE)

    def __repr__(self):
        return f"session {self.id} (pid {self.pid} {self.comm})"

    @property
    def mode(self) -> str:
        return self.pager.mode if self.pager is not None else ""

    @property
    def live(self) -> bool:
        """Running or stopping: its pages and files can still be looked at."""
        return self.state in (State.RUNNING, State.STOPPING)

    # -- transport -----------------------------------------------------------
    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        async with self._send_lock:
            view = memoryview(data)
            if fds:
                anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                view = view[await self.sock.sendmsg([view], anc):]
            while view:
                view = view[await self.sock.send(view):]

    async def _recv(self) -> bool:
        """Read what is available into the frame reader; False at end of stream."""
        data, anc, flags, _ = await self.sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FD_PER_RECV * 4))
        fds: list[int] = []
        for level, ctype, cdata in anc:
            if level == socket.SOL_SOCKET and ctype == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(cdata[: len(cdata) - len(cdata) % a.itemsize])
                fds.extend(a)
        self._reader.feed(data, fds)
        if flags & socket.MSG_CTRUNC:
            raise protocol.ProtocolError(errno.EINVAL, "too many file descriptors in one message")
        return bool(data)

    async def _next_frame(self) -> protocol.Frame | None:
        """The next frame from the target, or None at the end of the stream.  A frame's
        descriptors are closed when the next one is read, or at the end, unless taken."""
        if self._frame is not None:
            self._frame.close_fds()
            self._frame = None
        while True:
            fr = self._reader.next_frame()
            if fr is not None:
                self._frame = fr
                await self.daemon.limits.pace(self.uid)
                return fr
            if not await self._recv():
                if self._reader.pending():
                    raise protocol.ProtocolError(errno.EPROTO, f"connection closed inside a message ({self._reader.pending()} bytes)")
                return None

    # -- the whole life ----------------------------------------------------------
    def end(self, kind: str, error: protocol.ProtocolError | None = None, reason: str = "") -> None:
        """Ask the session to end: kind is stop, error, shutdown or gone (first one wins)."""
        if not self._end_kind:
            self._end_kind = kind
            self._end_error = error
            self.end_reason = reason or (error.text if error else kind)
            self._end.set()

    async def run(self) -> None:
        try:
            if await self._handshake():
                await self._running()
        finally:
            with trio.CancelScope(shield=True):
                await self._finish()

    async def _handshake(self) -> bool:
        """Up to a running session (True), or its refusal."""
        try:
            try:
                self.peer = Peer.of(self.sock)
            except PeerGone as e:
                raise protocol.ProtocolError(errno.EPERM, f"the connecting process has exited ({e.strerror})")
            self.pid, self.uid, self.gid = self.peer.pid, self.peer.uid, self.peer.gid
            try:
                with trio.fail_after(HANDSHAKE_SECONDS):
                    return await self._connect()
            except trio.TooSlowError:
                raise protocol.ProtocolError(errno.ETIMEDOUT, f"no START within {HANDSHAKE_SECONDS} s")
        except protocol.ProtocolError as e:
            log.info("pid %s: refused: %s (%s)", self.pid, e.text, errno.errorcode.get(e.err, e.err))
            self.daemon.events.bump("sessions_refused")
            await self._try_send(protocol.encode_err(self.next_seq(), e.err, e.text, e.seq))
        except (OSError, trio.BrokenResourceError) as e:
            log.info("pid %s: connection lost during handshake: %s", self.pid, e)
        return False

    async def _connect(self) -> bool:
        """The handshake; True once the session runs."""
        hello: protocol.Hello | None = None
        ranges: list[protocol.Range] = []
        forget: list[tuple[int, int, int]] = []
        while (fr := await self._next_frame()) is not None:
            if hello is None:
                if fr.type != protocol.HELLO:
                    raise protocol.ProtocolError(errno.EPROTO, f"expected HELLO, got {protocol.NAMES.get(fr.type)}", fr.seq)
                hello = cast(protocol.Hello, fr.body)
                # the connecting process itself, alive: nothing about another pid is read or told
                if hello.pid != self.pid or not self.peer.alive():
                    raise protocol.ProtocolError(errno.EPERM, "HELLO must name the connecting process, alive",
                                                 fr.seq)
                self.comm = self.peer.text("comm")
                self.cmdline = self.peer.text("cmdline")
            elif len(ranges) < hello.nranges:
                if fr.type != protocol.RANGE:
                    raise protocol.ProtocolError(errno.EPROTO, f"expected RANGE {len(ranges)} of {hello.nranges}, got {protocol.NAMES.get(fr.type)}", fr.seq)
                rng = cast(protocol.Range, fr.body)
                if not rng.flags & protocol.RANGE_STAGING and (
                        rng.index >= protocol.STORE_MAX_RANGES
                        or any(r.index == rng.index and not r.flags & protocol.RANGE_STAGING for r in ranges)):
                    raise protocol.ProtocolError(errno.EINVAL, f"RANGE index {rng.index}: repeated or "
                                                 f"not below {protocol.STORE_MAX_RANGES}", fr.seq)
                ranges.append(rng)
            elif fr.type == protocol.FORGET:
                forget += cast(list, fr.body)
                if len(forget) > protocol.MAX_FORGET_RUNS:
                    raise protocol.ProtocolError(errno.EINVAL, f"more than {protocol.MAX_FORGET_RUNS} FORGET runs", fr.seq)
            elif fr.type == protocol.START and not forget:
                fd = fr.body.fd
                fr.taken = True  # the native session's, or closed below
                try:
                    self._check_indexes(ranges, hello, sequential=True, seq=fr.seq)
                    await self._start(hello, ranges, fr.body.uffd_features, fd, fr.seq)
                except BaseException:
                    if self.native is None:
                        _close(fd)
                    raise
                return True
            elif fr.type == protocol.RESUME:
                fr.taken = True  # closed below (the uffd: unless the native session took it)
                try:
                    self._check_indexes(ranges, hello, sequential=False, seq=fr.seq)
                    return await self._resume(hello, ranges, forget, cast(protocol.Resume, fr.body), fr.seq)
                finally:
                    _close(fr.body.store)
                    if self.native is None:
                        _close(fr.body.uffd)
            else:
                raise protocol.ProtocolError(errno.EPROTO, f"expected START or RESUME, got {protocol.NAMES.get(fr.type)}", fr.seq)
        return False

    @staticmethod
    def _check_indexes(ranges, hello, sequential: bool, seq: int) -> None:
        """START numbers ranges 0, 1, 2 ...; RESUME gives each its number in the old store."""
        data = ranges[:-1] if hello.caps & protocol.CAP_STAGING else ranges
        seen = set()
        for i, r in enumerate(data):
            if (sequential and r.index != i) or r.index in seen or r.index >= protocol.STORE_MAX_RANGES:
                raise protocol.ProtocolError(errno.EINVAL, f"RANGE index {r.index}"
                                             + (f", expected {i}" if sequential else ": repeated or too large"), seq)
            seen.add(r.index)

    def _split_staging(self, hello, ranges, seq):
        staging = None
        if hello.caps & protocol.CAP_STAGING:
            staging = ranges[-1]
            ranges = ranges[:-1]
            if not staging.flags & protocol.RANGE_STAGING or not ranges \
                    or not 0 < staging.length // protocol.PAGE_SIZE <= protocol.STAGING_MAX_PAGES:
                raise protocol.ProtocolError(errno.EINVAL, "the last RANGE must be the staging area, at most "
                                             f"{protocol.STAGING_MAX_PAGES} pages", seq)
        if any(r.flags & protocol.RANGE_STAGING for r in ranges):
            raise protocol.ProtocolError(errno.EINVAL, "only the last RANGE may be a staging area (CAP_STAGING)", seq)
        return ranges, staging

    async def _new_native(self, hello, ranges, staging, features, uffd, seq) -> NativeSession:
        """Checks common to START and RESUME, the user's limits, then the native session (owning uffd)."""
        if not is_userfaultfd(uffd):
            raise protocol.ProtocolError(errno.EBADF, "the descriptor passed is not a userfaultfd", seq)
        if not features & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            raise protocol.ProtocolError(errno.EOPNOTSUPP, "userfaultfd without write-protect support", seq)
        check_ranges(cast(Peer, self.peer), ranges + ([staging] if staging else []))
        registered = sum(r.length for r in ranges)
        try:
            self.daemon.limits.start_session(self.uid, registered)
        except OSError as e:
            raise protocol.ProtocolError(e.errno or errno.EINVAL, e.strerror or str(e), seq)
        self.registered = registered
        self.caps = hello.caps
        self.id = self.daemon.new_session_id()
        try:
            native = NativeSession(uffd, self.pid, self.peer.pidfd, self.id)
        except OSError as e:
            raise protocol.ProtocolError(e.errno or errno.EIO, e.strerror or str(e), seq)
        self.native = native
        return native

    async def _start(self, hello, ranges, features, fd, seq) -> None:
        ranges, staging = self._split_staging(hello, ranges, seq)
        native = await self._new_native(hello, ranges, staging, features, fd, seq)
        try:
            for r in ranges:
                await trio.to_thread.run_sync(native.add_range, r.addr, r.length, r.flags, r.index)
            if staging is not None:
                native.set_staging(staging.addr, staging.length // protocol.PAGE_SIZE)
            native.start()
        except OSError as e:
            native.unregister()
            raise protocol.ProtocolError(e.errno or errno.EIO, e.strerror or str(e), seq)
        self._begin_running()
        await self._ack_with_store(protocol.START, seq)
        log.info("%s started: %d range(s), %d pages, mode %s", self, len(ranges),
                 sum(r.length for r in ranges) // protocol.PAGE_SIZE, self.mode)

    async def _resume(self, hello, ranges, forget, body: protocol.Resume, seq) -> bool:
        ranges, staging = self._split_staging(hello, ranges, seq)
        native = await self._new_native(hello, ranges, staging, body.uffd_features, body.uffd, seq)
        try:
            await trio.to_thread.run_sync(native.import_store, body.store,
                                          [(r.index, r.flags, r.addr, r.length // PAGE_SIZE) for r in ranges],
                                          forget)
            if staging is not None:
                native.set_staging(staging.addr, staging.length // protocol.PAGE_SIZE)
        except OSError as e:
            # nothing served nor unregistered: the target goes on serving itself
            raise protocol.ProtocolError(e.errno or errno.EIO, e.strerror or str(e), seq)
        self.resumed = {"takeovers": body.takeovers, "agent_faults": body.agent_faults,
                        "resumes": body.resumes + 1}
        await self._ack_with_store(protocol.RESUME, seq)
        fr = await self._next_frame()
        if fr is None:
            log.info("pid %s: left before ADOPT: it goes on serving itself", self.pid)
            return False
        if fr.type != protocol.ADOPT:
            raise protocol.ProtocolError(errno.EPROTO, f"expected ADOPT, got {protocol.NAMES.get(fr.type)}", fr.seq)
        native.start()
        self._begin_running()
        log.info("%s resumed (old session %d, %d takeover(s), %d fault(s) it served itself): %d range(s)",
                 self, body.old_session, body.takeovers, body.agent_faults, len(ranges))
        return True

    async def _ack_with_store(self, acked_type: int, seq: int) -> None:
        ro, fence = self.native.store_fds()
        try:
            await self.send(protocol.encode_ack(self.next_seq(), acked_type, seq, self.id), (ro, fence))
        finally:
            _close(ro, fence)

    def _begin_running(self) -> None:
        native = self.native
        assert native is not None, "running without a native session"
        if self.caps & protocol.CAP_AGENT:
            self.agent = AgentChannel(native, self.send, self.next_seq)
        self.pager = Pager(native, self.agent, self.daemon.limiter,
                           agent_timeout=lambda: self.daemon.config.get("agent_timeout_ms") / 1000,
                           on_done=self._op_done)
        self.daemon.add_session(self)
        self.access = self.daemon.access.source_for(self)
        self.policy = Policy(self)
        self.state = State.RUNNING

    async def _running(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._read_loop)
            nursery.start_soon(self._watch_pid)
            nursery.start_soon(self._prefetcher)
            background = trio.CancelScope()
            nursery.start_soon(self._background, background)
            await self._end.wait()
            self.state = State.STOPPING
            kind = self._end_kind
            log.info("%s ending: %s", self, self.end_reason)
            background.cancel()
            try:
                # sampled pages go home before the rest
                handed_back = await self.pager.close(restore=kind != "gone" and not self.native.dead,
                                                     before_restore=self.access.close)
            except OSError as e:
                log.info("%s: giving pages back failed (%s): the target is gone", self, e)
                kind, handed_back = "gone", True
            if not handed_back:
                kind = "left"  # the target serves itself from its store; nothing is sent
            if kind == "stop":
                await self._try_send(protocol.encode_ack(self.next_seq(), protocol.STOP, 0))
            elif kind == "error":
                err = self._end_error
                await self._try_send(protocol.encode_err(self.next_seq(), err.err, err.text, err.seq))
            elif kind == "shutdown":
                await self._try_send(protocol.encode_err(self.next_seq(), errno.ESHUTDOWN, "memfs daemon shutting down"))
            nursery.cancel_scope.cancel()

    async def _background(self, scope: trio.CancelScope) -> None:
        """The access source and the policy, until the session starts ending."""
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.access.run)
                nursery.start_soon(self.policy.run)

    def set_degraded(self, on: bool) -> None:
        if bool(self.events.counts.get("degraded")) != on:
            self.events.set("degraded", 1 if on else 0)
            if on:
                self.daemon.events.bump("degraded")

    async def _finish(self) -> None:
        """Whatever the session got, given back: the native session, the user's share, descriptors."""
        if self.state == State.ENDED:
            return
        running = self.state in (State.RUNNING, State.STOPPING)
        if self.native is not None and running:
            self.final_counters = self.counters()
            self.final_hist = self.native.histogram()
        self.state = State.ENDED
        self._reader.close_fds()
        if self._frame is not None:
            self._frame.close_fds()
        if self.native is not None:
            await trio.to_thread.run_sync(self.native.free)
        if self.registered or self.native is not None:
            self.daemon.limits.end_session(self.uid, self.registered)
            self.registered = 0
        if running:
            self.events.bump("ended")
            self.daemon.remove_session(self)
            self._log_summary()
        if self.peer is not None:
            self.peer.close()

    async def _try_send(self, data: bytes) -> None:
        try:
            await self.send(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- running tasks ------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while (fr := await self._next_frame()) is not None:
                if fr.type == protocol.EVICT_DONE and self.agent is not None:
                    self.agent.answered("evict", fr.body.request_id, fr.body.status)
                elif fr.type == protocol.SAMPLE_DONE and self.agent is not None:
                    self.agent.answered("sample", fr.body.request_id, moved=fr.body.moved)
                elif fr.type == protocol.PREFETCH:
                    self._queue_prefetch(fr)
                elif fr.type == protocol.STOP:
                    self.end("stop", reason="target asked to stop")
                else:
                    raise protocol.ProtocolError(errno.EPROTO, f"{protocol.NAMES.get(fr.type)} out of order", fr.seq)
        except protocol.ProtocolError as e:
            log.warning("%s: protocol error: %s", self, e.text)
            self.end("error", e)
            return
        except (OSError, trio.BrokenResourceError) as e:
            self.end("gone", reason=f"connection lost: {e}")
            return
        self.end("gone", reason="connection closed")

    def _queue_prefetch(self, fr) -> None:
        p = fr.body
        try:
            r, first = self.native.addr_to_page(p.addr)
            r2, last = self.native.addr_to_page(p.addr + p.length - 1)
        except OSError:
            raise protocol.ProtocolError(errno.EINVAL, f"PREFETCH 0x{p.addr:x}+{p.length} outside the registered ranges", fr.seq)
        if r != r2 or not p.length:
            raise protocol.ProtocolError(errno.EINVAL, f"PREFETCH 0x{p.addr:x}+{p.length} spans ranges", fr.seq)
        try:
            self._prefetch_in.send_nowait((r, first, last - first + 1))
        except trio.WouldBlock:
            self.events.bump("prefetch_dropped")

    async def _prefetcher(self) -> None:
        async for run in self._prefetch_out:
            try:
                await self.pager.prefetch([run])
                self.events.bump("prefetch")
            except OSError as e:
                log.info("%s: prefetch hint failed: %s", self, e)

    async def _watch_pid(self) -> None:
        """The target's exit ends the session (its pidfd turns readable)."""
        fd = os.dup(self.peer.pidfd)
        try:
            await trio.lowlevel.wait_readable(fd)
            self.end("gone", reason="target exited")
        finally:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)

    def _op_done(self, verb: str) -> None:
        self.events.bump(verb)
        self.daemon.events.bump(verb)

    async def wait_activity(self) -> None:
        """Return after the fault thread or an operation did something (a fault or a trace
        event).  An event between a caller's last look and this call is not seen: callers
        that must not miss one wait with a timeout and look again."""
        if self.state == State.ENDED or self._nursery is None:
            return
        self._activity_waiters += 1
        try:
            if not self._activity_watched:
                self._activity_watched = True
                self._nursery.start_soon(self._watch_activity)
            await self._activity.wait()
        finally:
            self._activity_waiters -= 1

    async def wait_for_change(self, timeout: float) -> None:
        """Until the session faults or runs an operation, one of its settings
        changes, or `timeout` seconds: how idle loops (policy, sampler) wait."""
        if not self.live:
            await trio.sleep(timeout)  # no activity to relay: a plain wait, never a busy loop
            return
        with trio.move_on_after(timeout):
            await first_of(self.wait_activity, self.config.wait_changed)

    async def _watch_activity(self) -> None:
        """While someone waits, relay the native core's notifications (an eventfd).

        Armed only while needed: an armed core writes the eventfd on every
        trace event, which would cost every fault a wakeup of this loop."""
        fd = self.native.notify_fd
        try:
            while self._activity_waiters and self.live:
                self.native.arm_notify()
                with trio.move_on_after(10):  # to look at the loop's condition again
                    await trio.lowlevel.wait_readable(fd)
                    try:
                        os.read(fd, 8)
                    except BlockingIOError:
                        pass
                    ev, self._activity = self._activity, trio.Event()
                    ev.set()
        finally:
            self._activity_watched = False
            trio.lowlevel.notify_closing(fd)  # the fd closes with the native session
            ev, self._activity = self._activity, trio.Event()
            ev.set()

    # -- reporting ---------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        """Everything counted for this session: the pager's, the access source's, the policy's."""
        if self.native is None or not self.live:
            return dict(self.final_counters)
        out = self.native.counters()
        out.update(self.resumed)
        if self.access is not None:
            out.update(self.access.counters())
        if self.policy is not None:
            out.update(self.policy.counters())
        return out

    def histogram(self) -> list[int]:
        if self.native is not None and self.live:
            return self.native.histogram()
        return list(self.final_hist)

    def _log_summary(self) -> None:
        if self.id:
            summary_log.info(report.summary(self))
