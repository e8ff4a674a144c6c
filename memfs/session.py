"""One target's session: the protocol conversation and the session's life.

Life of a session:
  connecting  HELLO, RANGEs and START are read and validated; the native
              session is created, registered and its fault thread started;
              ACK(START) carries the session id.
  running     the target may send PREFETCH hints and STOP; its agent
              answers EVICT requests with EVICT_DONE.
  stopping    on STOP, a protocol error or daemon shutdown: operations are
              cancelled, outstanding evictions settled, every page given
              back to the target writable and the ranges unregistered, then
              ACK(STOP) or ERR is sent.  A target that is gone (its socket
              closed, its process exited) gets none of this.
  ended       the native session is freed: its store memory is returned.

A protocol error ends this session only; the daemon goes on.
"""
from __future__ import annotations

import array
import errno
import logging
import os
import socket
import struct
import time

import trio

from . import protocol, report
from .config import SessionConfig
from .core import HIST_BUCKETS, NativeSession
from .events import EventCounts, first_of
from .pager import NoFree, Pager
from .policy import Policy

log = logging.getLogger("memfs.session")
summary_log = logging.getLogger("memfs.summary")

HANDSHAKE_SECONDS = 30
PREFETCH_QUEUE = 256
UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
USER_ADDR_LIMIT = 1 << 47
SESSION_EVENTS = ("compress", "evict", "prefetch", "recompress", "prefetch_dropped", "restore_fail", "degraded", "ended")


SAMPLE_ANSWER_SECONDS = 5


class AgentSource:
    """The agent thread inside the target frees pages (EVICT / EVICT_DONE) and
    parks pages for the access sampler (SAMPLE / SAMPLE_DONE)."""

    mode = "full"
    can_free = True

    def __init__(self, session: "Session"):
        self._session = session
        self._samples: dict[int, tuple[list, trio.Event]] = {}
        self._next_sample = 1

    async def request_free(self, request_id, addr_runs):
        await self._session.send(protocol.encode_evict(self._session.next_seq(), request_id, addr_runs))

    async def sample(self, moves: list[tuple[int, int]], zap: bool) -> None:
        """Have the agent make these moves; the answer is committed whenever it comes."""
        rid = self._next_sample
        self._next_sample += 1
        done = trio.Event()
        self._samples[rid] = (moves, done)
        await self._session.send(protocol.encode_sample(self._session.next_seq(), rid, moves, zap))
        with trio.move_on_after(SAMPLE_ANSWER_SECONDS):
            await done.wait()

    def sample_done(self, request_id: int, moved: bytes) -> None:
        entry = self._samples.pop(request_id, None)
        if entry is None:
            raise protocol.ProtocolError(errno.EINVAL, f"SAMPLE_DONE for unknown request {request_id}")
        moves, done = entry
        if len(moved) != (len(moves) + 7) // 8:
            raise protocol.ProtocolError(errno.EINVAL, "SAMPLE_DONE answers another number of moves")
        self._session.native.sample_commit(moves, moved)
        done.set()

    async def settle_samples(self) -> None:
        """Wait for answers to sampling requests still in flight (a while at most)."""
        with trio.move_on_after(SAMPLE_ANSWER_SECONDS):
            while self._samples:
                await next(iter(self._samples.values()))[1].wait()


def read_proc(pid: int, name: str) -> str:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            data = f.read(4096)
    except OSError:
        return ""
    return data.replace(b"\0", b" ").decode(errors="replace").strip()


def check_ranges(pid: int, ranges: list[protocol.Range]) -> None:
    """Ranges must be page aligned, disjoint and private anonymous memory of `pid`."""
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
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                path = parts[5].strip() if len(parts) > 5 else ""
                anon = parts[1][3] == "p" and parts[4] == "0" and (not path or path.startswith("["))
                maps.append((lo, hi, anon))
    except OSError as e:
        raise protocol.ProtocolError(errno.ESRCH, f"reading /proc/{pid}/maps: {e.strerror}")
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


class Session:
    def __init__(self, daemon, sock: trio.socket.SocketType):
        self.daemon = daemon
        self.sock = sock
        self.id = 0
        self.pid = self.uid = self.gid = -1
        self.comm = self.cmdline = ""
        self.state = "connecting"
        self.mode = ""
        self.caps = 0
        self.ranges: list[protocol.Range] = []
        self.native: NativeSession | None = None
        self.pager: Pager | None = None
        self.access = None  # its AccessSource, once running
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
        self._end = trio.Event()
        self._end_kind = ""
        self._end_error: protocol.ProtocolError | None = None
        self._prefetch_in, self._prefetch_out = trio.open_memory_channel(PREFETCH_QUEUE)

    def __repr__(self):
        return f"session {self.id} (pid {self.pid} {self.comm})"

    # -- transport -----------------------------------------------------------
    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            view = memoryview(data)
            while view:
                view = view[await self.sock.send(view):]

    async def _recv(self) -> bool:
        """Read what is available into the frame reader; False at end of stream."""
        data, anc, flags, _ = await self.sock.recvmsg(65536, socket.CMSG_SPACE(4 * struct.calcsize("i")))
        fds = []
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
        """The next frame from the target, or None at the end of the stream."""
        while True:
            fr = self._reader.next_frame()
            if fr is not None:
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
            creds = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            self.pid, self.uid, self.gid = struct.unpack("3i", creds)
            self.comm = read_proc(self.pid, "comm")
            self.cmdline = read_proc(self.pid, "cmdline")
            try:
                with trio.fail_after(HANDSHAKE_SECONDS):
                    started = await self._connect()
            except trio.TooSlowError:
                raise protocol.ProtocolError(errno.ETIMEDOUT, f"no START within {HANDSHAKE_SECONDS} s")
            if not started:
                return
        except protocol.ProtocolError as e:
            log.info("pid %s: refused: %s (%s)", self.pid, e.text, errno.errorcode.get(e.err, e.err))
            self.daemon.events.bump("sessions_refused")
            await self._try_send(protocol.encode_err(self.next_seq(), e.err, e.text, e.seq))
            return
        except (OSError, trio.BrokenResourceError) as e:
            log.info("pid %s: connection lost during handshake: %s", self.pid, e)
            return
        finally:
            self._reader.close_fds()
        try:
            await self._running()
        finally:
            await self._finish()

    async def _connect(self) -> bool:
        hello, ranges = None, []
        while (fr := await self._next_frame()) is not None:
            if hello is None:
                if fr.type != protocol.HELLO:
                    self._close_frame_fd(fr)
                    raise protocol.ProtocolError(errno.EPROTO, f"expected HELLO, got {protocol.NAMES.get(fr.type)}", fr.seq)
                hello = fr.body
                if hello.pid != self.pid:
                    raise protocol.ProtocolError(errno.EPERM, f"HELLO pid {hello.pid} is not the peer's pid {self.pid}", fr.seq)
            elif len(ranges) < hello.nranges:
                if fr.type != protocol.RANGE:
                    self._close_frame_fd(fr)
                    raise protocol.ProtocolError(errno.EPROTO, f"expected RANGE {len(ranges)} of {hello.nranges}, got {protocol.NAMES.get(fr.type)}", fr.seq)
                if fr.body.index != len(ranges):
                    raise protocol.ProtocolError(errno.EINVAL, f"RANGE index {fr.body.index}, expected {len(ranges)}", fr.seq)
                ranges.append(fr.body)
            else:
                if fr.type != protocol.START:
                    raise protocol.ProtocolError(errno.EPROTO, f"expected START, got {protocol.NAMES.get(fr.type)}", fr.seq)
                fd = fr.body.fd
                try:
                    await self._start(hello, ranges, fr.body.uffd_features, fd, fr.seq)
                except BaseException:
                    if self.native is None:
                        os.close(fd)
                    raise
                return True
        return False

    @staticmethod
    def _close_frame_fd(fr) -> None:
        if fr.type == protocol.START:
            os.close(fr.body.fd)

    async def _start(self, hello, ranges, features, fd, seq) -> None:
        if not is_userfaultfd(fd):
            raise protocol.ProtocolError(errno.EBADF, "the fd passed with START is not a userfaultfd", seq)
        if not features & UFFD_FEATURE_PAGEFAULT_FLAG_WP:
            raise protocol.ProtocolError(errno.EOPNOTSUPP, "userfaultfd without write-protect support", seq)
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
        check_ranges(self.pid, ranges + ([staging] if staging else []))
        self.caps = hello.caps
        self.ranges = ranges
        native = NativeSession(fd, self.pid, [(r.addr, r.length) for r in ranges])
        self.native = native
        try:
            if staging is not None:
                native.set_staging(staging.addr, staging.length // protocol.PAGE_SIZE)
            await trio.to_thread.run_sync(native.register)
            native.start()
        except OSError as e:
            native.unregister()
            raise protocol.ProtocolError(e.errno or errno.EIO, e.strerror or str(e), seq)
        source = AgentSource(self) if hello.caps & protocol.CAP_AGENT else NoFree()
        self.mode = source.mode
        self.pager = Pager(native, source, self.daemon.limiter, on_done=self._op_done)
        self.id = self.daemon.add_session(self)
        self.access = self.daemon.access.source_for(self)
        self.policy = Policy(self)
        self.state = "running"
        await self.send(protocol.encode_ack(self.next_seq(), protocol.START, seq, self.id))
        log.info("%s started: %d range(s), %d pages, mode %s", self, len(ranges),
                 sum(r.length for r in ranges) // protocol.PAGE_SIZE, self.mode)

    async def _running(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._read_loop)
            nursery.start_soon(self._watch_pid)
            nursery.start_soon(self._prefetcher)
            background = trio.CancelScope()
            nursery.start_soon(self._background, background)
            await self._end.wait()
            self.state = "stopping"
            kind = self._end_kind
            log.info("%s ending: %s", self, self.end_reason)
            background.cancel()
            try:
                if kind != "gone" and not self.native.dead:
                    await self.access.close()  # sampled pages go home before the rest
                await self.pager.close(restore=kind != "gone" and not self.native.dead)
            except OSError as e:
                log.info("%s: giving pages back failed (%s): the target is gone", self, e)
                kind = "gone"
            if kind == "stop":
                await self._try_send(protocol.encode_ack(self.next_seq(), protocol.STOP, 0))
            elif kind == "error":
                e = self._end_error
                await self._try_send(protocol.encode_err(self.next_seq(), e.err, e.text, e.seq))
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
        if self.native is not None:
            self.final_counters = self.counters()
        self.state = "ended"
        if self.native is not None:
            self.final_hist = self.native.histogram()
            await trio.to_thread.run_sync(self.native.free)
        self.events.bump("ended")
        self.daemon.remove_session(self)
        self._log_summary()

    async def _try_send(self, data: bytes) -> None:
        try:
            await self.send(data)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    # -- running tasks ------------------------------------------------------------------
    async def _read_loop(self) -> None:
        try:
            while (fr := await self._next_frame()) is not None:
                if fr.type == protocol.EVICT_DONE:
                    self.pager.eviction_done(fr.body.request_id, fr.body.status)
                elif fr.type == protocol.SAMPLE_DONE and isinstance(self.pager.source, AgentSource):
                    self.pager.source.sample_done(fr.body.request_id, fr.body.moved)
                elif fr.type == protocol.PREFETCH:
                    self._queue_prefetch(fr)
                elif fr.type == protocol.STOP:
                    self.end("stop", reason="target asked to stop")
                else:
                    self._close_frame_fd(fr)
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
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:
            self.end("gone", reason="target exited")
            return
        try:
            await trio.lowlevel.wait_readable(pidfd)
            self.end("gone", reason="target exited")
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)

    def _op_done(self, verb: str) -> None:
        self.events.bump(verb)
        self.daemon.events.bump(verb)

    async def wait_activity(self) -> None:
        """Return after the fault thread or an operation did something (a fault or a trace
        event).  An event between a caller's last look and this call is not seen: callers
        that must not miss one wait with a timeout and look again."""
        if self.state == "ended" or self._nursery is None:
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
        if self.state not in ("running", "stopping"):
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
            while self._activity_waiters and self.state in ("running", "stopping"):
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
        if self.native is None or self.state == "ended":
            return dict(self.final_counters)
        out = self.native.counters()
        if self.access is not None:
            out.update(self.access.counters())
        if self.policy is not None:
            out.update(self.policy.counters())
        return out

    def histogram(self) -> list[int]:
        if self.native is not None and self.state != "ended":
            return self.native.histogram()
        return list(self.final_hist)

    def _log_summary(self) -> None:
        if self.id:
            summary_log.info(report.summary(self))
