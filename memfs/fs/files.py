"""What each kind of file does when opened, read, written and polled.

Generated files (stat, events, ...) are rendered into a snapshot per open
file handle, at the first read and again at every read at offset 0, and
are served with direct_io, so their size (0, as in /proc) never cuts a
read short.  `pages` and `data` are computed per read instead, so a range
of millions of pages streams.  `trace` blocks like ftrace's trace_pipe.
Control and config files take one command per write, at offset 0.
"""
from __future__ import annotations

import errno
import select

from typing import TYPE_CHECKING, Awaitable, Callable

import pyfuse3
import trio

from .. import PROTOCOL_VERSION, __version__, control, report
from ..core import PAGE_SIZE, SHOWN_STATES
from .view import DaemonView, is_live

if TYPE_CHECKING:
    from ..config import Config, SessionConfig
    from ..core import RangeInfo
    from ..events import EventCounts
    from ..session import Session
    from .tree import Opener

READY = select.POLLIN | select.POLLRDNORM | select.POLLPRI


def fuse_error(e: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e)


class Handle:
    """One open file: its node, its opener and what it has read so far."""

    def __init__(self, view: DaemonView, key: tuple, kind: FileKind, opener: Opener, session: Session | None):
        self.view = view
        self.key = key
        self.kind = kind
        self.opener = opener
        self.session = session  # the session the file belongs to (None for the daemon's own)
        self.snapshot: bytes | None = None
        self.generation = -1
        self.cursor = 0
        self.pending = b""
        self.started = False
        self.partial: tuple[int, bytes] | None = None  # pages: (offset, line) a read ended inside

    def own(self) -> Session:
        """The file's session, ended or not: what it said last stays readable."""
        assert self.session is not None, "a session's file opened without its session"
        return self.session

    def live(self) -> Session:
        """The file's session, ESRCH if it has ended since the open."""
        if not is_live(self.session):
            raise fuse_error(errno.ESRCH)
        assert self.session is not None
        return self.session


class FileKind:
    mode = 0o444
    readable = True
    writable = False
    reveals_memory = False  # pages, data, trace: the rule of /proc/<pid>/mem (Tree.check_open)
    nonseekable = False

    def size(self, view: DaemonView, key: tuple) -> int:
        return 0

    async def read(self, h: Handle, off: int, size: int) -> bytes:
        raise fuse_error(errno.EACCES)

    async def write(self, h: Handle, off: int, data: bytes) -> int:
        raise fuse_error(errno.EACCES)

    def poll(self, h: Handle, ph: pyfuse3.PollHandle | None) -> int:
        return READY


class Generated(FileKind):
    """A text rendered from current values by `render(handle)`."""

    def __init__(self, render: Callable[[Handle], str]):
        self.render = render

    async def read(self, h: Handle, off: int, size: int) -> bytes:
        if off == 0 or h.snapshot is None:
            h.snapshot = self.render(h).encode()
        return h.snapshot[off:off + size]


class OneShotPoll:
    """Wakes one poll(2) waiter at the next change of an EventCounts."""

    def __init__(self, events, ph):
        self.events, self.ph = events, ph
        events.add_listener(self)

    def __call__(self):
        self.events.remove_listener(self)
        try:
            self.ph.notify()
        except Exception:
            pass  # the waiter went away


class Events(Generated):
    """Flat keyed counts; poll(2) reports the file readable once they changed
    after this handle last read it at offset 0 (then: lseek to 0, read again)."""

    def __init__(self, events_of: Callable[[Handle], EventCounts]):
        self.events_of = events_of
        super().__init__(self._render)

    def _render(self, h: Handle) -> str:
        ev = self.events_of(h)
        h.generation = ev.generation
        return ev.render()

    def poll(self, h: Handle, ph: pyfuse3.PollHandle | None) -> int:
        ev = self.events_of(h)
        if h.generation == -1:  # not read yet: take the current state as seen
            h.generation = ev.generation
        if ev.generation != h.generation:
            return READY
        if ph is not None:
            OneShotPoll(ev, ph)
        return 0


class Ctl(FileKind):
    mode = 0o200
    readable = False
    writable = True

    def __init__(self, run: Callable[[Handle, control.Command], Awaitable[None]]):
        self.run = run

    async def write(self, h: Handle, off: int, data: bytes) -> int:
        if off != 0:
            raise fuse_error(errno.EINVAL)  # one command per write, from the start
        try:
            cmd = control.parse_command(data.decode())
        except UnicodeDecodeError:
            raise fuse_error(errno.EINVAL)
        await self.run(h, cmd)
        return len(data)


class Setting(Generated):
    """One config value: read it, or write a new one in the same format."""

    mode = 0o644
    writable = True

    def __init__(self, config_of: Callable[[Handle], Config | SessionConfig]):
        self.config_of = config_of
        super().__init__(lambda h: config_of(h).render(h.key[-1]))

    async def write(self, h: Handle, off: int, data: bytes) -> int:
        if off != 0:
            raise fuse_error(errno.EINVAL)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise fuse_error(errno.EINVAL)
        if len([line for line in text.split("\n") if line.strip()]) != 1:
            raise fuse_error(errno.EINVAL)
        self.config_of(h).set(h.key[-1], text)
        return len(data)


class Pages(FileKind):
    """One fixed-width line per page: `index state compressed_bytes age_ms`.
    Fixed width makes offset -> page a division, so any part of a huge
    range is produced on demand."""

    mode = 0o400
    reveals_memory = True

    @staticmethod
    def geometry(npages: int) -> tuple[int, int]:
        width = len(str(max(npages - 1, 0)))
        return width, width + 1 + 10 + 1 + 4 + 1 + 10 + 1

    def size(self, view: DaemonView, key: tuple) -> int:
        n = view.range(key[1], key[2]).npages
        return n * self.geometry(n)[1]

    async def read(self, h: Handle, off: int, size: int) -> bytes:
        s = h.live()
        n = h.key[2]
        npages = s.native.range_info(n).npages
        width, line = self.geometry(npages)
        first = off // line
        if first >= npages:
            return b""
        count = min(npages - first, (off + size - 1) // line - first + 1)
        info = s.native.page_info(n, first, count)
        text = "".join(f"{first + i:>{width}} {SHOWN_STATES[info[i].state]:<10} {info[i].csize:>4} {info[i].age_ms:>10}\n"
                       for i in range(count)).encode()
        start = off - first * line
        # A line split between two reads must not mix two states of its page:
        # the rest of it comes from the text the first read was cut from.
        if h.partial and h.partial[0] == first * line and start:
            text = h.partial[1] + text[line:]
        out = text[start:start + size]
        end = off + len(out)
        h.partial = (end - end % line, text[(end // line - first) * line:][:line]) if end % line else None
        return out


class Data(FileKind):
    """The range's logical bytes, whatever each page's state, read without
    faulting the target or changing any page (native mc_read_data)."""

    mode = 0o400
    reveals_memory = True

    def size(self, view: DaemonView, key: tuple) -> int:
        return view.range(key[1], key[2]).length

    async def read(self, h: Handle, off: int, size: int) -> bytes:
        s = h.live()
        n = h.key[2]
        length = s.native.range_info(n).length
        if off >= length:
            return b""
        end = min(off + size, length)
        first, last = off // PAGE_SIZE, (end - 1) // PAGE_SIZE
        data = await trio.to_thread.run_sync(s.native.read_data, n, first, last - first + 1,
                                             limiter=h.view.limiter)
        return data[off - first * PAGE_SIZE:end - first * PAGE_SIZE]


def signal_pending(pid: int) -> bool:
    """Is a signal waiting to be delivered to pid (it is blocked in a read of ours)?"""
    try:
        with open(f"/proc/{pid}/status") as f:
            return any(int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:")))
    except (OSError, ValueError, IndexError):
        return True  # gone: nobody waits


class Trace(FileKind):
    """Live events, one line each; a read waits for new ones.  A reader
    that falls behind the ring (2048 events per session) is told how many
    it missed.  pyfuse3 passes on no FUSE interrupt, and the kernel waits
    for the answer to a read it already handed us, so a waiting read looks
    every WAIT_SECONDS whether its process has a signal pending (Ctrl-C,
    timeout(1), kill), and then ends (end of file) so that it is delivered."""

    WAIT_SECONDS = 0.25

    mode = 0o400
    reveals_memory = True
    nonseekable = True

    async def read(self, h: Handle, off: int, size: int) -> bytes:
        while not h.pending:
            s = h.session
            if s is None or not is_live(s):
                return b""  # the session is over: end of file
            events, h.cursor, missed = s.native.trace_read(h.cursor, 512)
            lines = [f"# {missed} events missed\n"] if missed and h.started else []
            h.started = True
            lines += [f"{ts / 1e9:.6f} {kind} range={r} page={p} count={n} latency_ns={lat} tid={tid}\n"
                      for _, ts, kind, r, p, n, lat, tid in events]
            h.pending = "".join(lines).encode()
            if not h.pending:
                if signal_pending(h.opener.pid):
                    return b""
                with trio.move_on_after(self.WAIT_SECONDS):  # an event just before the wait is found next time
                    await s.wait_activity()
        out, h.pending = h.pending[:size], h.pending[size:]
        return out

    def poll(self, h: Handle, ph: pyfuse3.PollHandle | None) -> int:
        return READY if h.pending or not is_live(h.session) else 0


# -- what the files say ---------------------------------------------------------------

async def _run_all(h: Handle, cmd: control.Command) -> None:
    await h.view.run_all(cmd)


async def _run_session(h: Handle, cmd: control.Command) -> None:
    await h.view.run(h.live(), cmd)


async def _run_range(h: Handle, cmd: control.Command) -> None:
    await h.view.run(h.live(), cmd, range_index=h.key[2])


def _flag_names(flags: int) -> str:
    names = [name for bit, name in ((1, "anon_private"), (2, "writable")) if flags & bit]
    return " ".join(names) + "\n"


def _session_line(render: Callable[[Session], object]) -> Generated:
    return Generated(lambda h: f"{render(h.own())}\n")


def _range_text(render: Callable[[RangeInfo], str]) -> Generated:
    return Generated(lambda h: render(h.live().native.range_info(h.key[2])))


ROOT_FILES: dict[str, FileKind] = {
    "version": Generated(lambda h: f"memfs {__version__} protocol {PROTOCOL_VERSION}\n"),
    "stat": Generated(lambda h: h.view.stat_text()),
    "events": Events(lambda h: h.view.events),
    "metrics": Generated(lambda h: h.view.metrics_text()),
    "ctl": Ctl(_run_all),
    "access": Generated(lambda h: h.view.access_text()),
}
CONFIG = Setting(lambda h: h.view.config)
SESSION_CONFIG = Setting(lambda h: h.live().config)
SESSION_FILES: dict[str, FileKind] = {
    "pid": _session_line(lambda s: s.pid),
    "comm": _session_line(lambda s: s.comm),
    "cmdline": _session_line(lambda s: s.cmdline),
    "mode": _session_line(lambda s: s.mode),
    "state": _session_line(lambda s: s.state),
    "stat": Generated(lambda h: report.flat(report.session_stat(h.own())) + f"access_source {h.own().access.name}\n"),
    "events": Events(lambda h: h.own().events),
    "ctl": Ctl(_run_session),
    "trace": Trace(),
}
RANGE_FILES: dict[str, FileKind] = {
    "start": _range_text(lambda r: f"0x{r.start:x}\n"),
    "length": _range_text(lambda r: f"{r.length}\n"),
    "flags": _range_text(lambda r: _flag_names(r.flags)),
    "stat": _range_text(lambda r: report.flat(report.range_stat(r))),
    "pages": Pages(),
    "heat": Generated(lambda h: "".join(f"{r.first} {r.count} {r.nr_accesses} {r.freq_pct} {r.age_ms}\n"
                                        for r in h.live().access.heat(h.key[2]))),
    "data": Data(),
    "ctl": Ctl(_run_range),
}
