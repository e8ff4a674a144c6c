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

import pyfuse3
import trio

from .. import PROTOCOL_VERSION, __version__, control, report
from ..core import PAGE_SIZE, SHOWN_STATES

READY = select.POLLIN | select.POLLRDNORM | select.POLLPRI


def fuse_error(e: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(e)


class Handle:
    """One open file: its node, its opener and what it has read so far."""

    def __init__(self, tree, key, kind, opener):
        self.tree = tree
        self.key = key
        self.kind = kind
        self.opener = opener  # tree.Opener: pid, uid, gid
        self.session = tree.session(key[1]) if key[0] in ("s", "sconfig", "r") else None
        self.snapshot: bytes | None = None
        self.generation = -1
        self.cursor = 0
        self.pending = b""
        self.started = False
        self.partial: tuple[int, bytes] | None = None  # pages: (offset, line) a read ended inside


class FileKind:
    mode = 0o444
    readable = True
    writable = False
    reveals_memory = False  # pages, data, trace: the rule of /proc/<pid>/mem (Tree.check_open)
    nonseekable = False

    def size(self, tree, key) -> int:
        return 0

    async def read(self, h: Handle, off: int, size: int) -> bytes:
        raise fuse_error(errno.EACCES)

    async def write(self, h: Handle, off: int, data: bytes) -> int:
        raise fuse_error(errno.EACCES)

    def poll(self, h: Handle, ph) -> int:
        return READY


class Generated(FileKind):
    """A text rendered from current values; `render(tree, key, handle)` -> str."""

    def __init__(self, render):
        self.render = render

    async def read(self, h, off, size):
        if off == 0 or h.snapshot is None:
            h.snapshot = self.render(h.tree, h.key, h).encode()
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

    def __init__(self, events_of):
        self.events_of = events_of
        super().__init__(lambda tree, key, h: self._render(tree, key, h))

    def _render(self, tree, key, h):
        ev = self.events_of(tree, key, h)
        h.generation = ev.generation
        return ev.render()

    def poll(self, h, ph):
        ev = self.events_of(h.tree, h.key, h)
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

    def __init__(self, run):
        self.run = run  # run(handle, command) -> awaitable

    async def write(self, h, off, data):
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

    def __init__(self, config_of):
        self.config_of = config_of
        super().__init__(lambda tree, key, h: config_of(tree, key, h).render(key[-1]))

    async def write(self, h, off, data):
        if off != 0:
            raise fuse_error(errno.EINVAL)
        try:
            text = data.decode()
        except UnicodeDecodeError:
            raise fuse_error(errno.EINVAL)
        if len([line for line in text.split("\n") if line.strip()]) != 1:
            raise fuse_error(errno.EINVAL)
        self.config_of(h.tree, h.key, h).set(h.key[-1], text)
        return len(data)


def _live(h: Handle):
    if h.session is None or h.session.state == "ended":
        raise fuse_error(errno.ESRCH)
    return h.session


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

    def size(self, tree, key):
        n = tree.range_info(key[1], key[2]).npages
        return n * self.geometry(n)[1]

    async def read(self, h, off, size):
        s = _live(h)
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

    def size(self, tree, key):
        return tree.range_info(key[1], key[2]).length

    async def read(self, h, off, size):
        s = _live(h)
        n = h.key[2]
        length = s.native.range_info(n).length
        if off >= length:
            return b""
        end = min(off + size, length)
        first, last = off // PAGE_SIZE, (end - 1) // PAGE_SIZE
        data = await trio.to_thread.run_sync(s.native.read_data, n, first, last - first + 1,
                                             limiter=h.tree.daemon.limiter)
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

    async def read(self, h, off, size):
        while not h.pending:
            s = h.session
            if s is None or s.state == "ended":
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

    def poll(self, h, ph):
        return READY if h.pending or (h.session and h.session.state == "ended") else 0


# -- what the files say ---------------------------------------------------------------

def _session(tree, key, h):
    return h.session if h is not None and h.session is not None else tree.session(key[1])


async def _run_all(h, cmd):
    await control.run_on_all(h.tree.daemon, cmd)


async def _run_session(h, cmd):
    await control.run_on_session(_live(h), cmd)


async def _run_range(h, cmd):
    await control.run_on_session(_live(h), cmd, range_index=h.key[2])


def _flag_names(flags: int) -> str:
    names = [name for bit, name in ((1, "anon_private"), (2, "writable")) if flags & bit]
    return " ".join(names) + "\n"


def _range_line(render):
    return Generated(lambda tree, key, h: render(_session(tree, key, h).native.range_info(key[2])) + "\n")


ROOT_KINDS = {
    "version": Generated(lambda tree, key, h: f"memfs {__version__} protocol {PROTOCOL_VERSION}\n"),
    "stat": Generated(lambda tree, key, h: report.flat(report.global_stat(tree.daemon))),
    "events": Events(lambda tree, key, h: tree.daemon.events),
    "metrics": Generated(lambda tree, key, h: report.metrics(tree.daemon)),
    "ctl": Ctl(_run_all),
    "access": Generated(lambda tree, key, h: "".join(f"{k} {v}\n" for k, v in tree.daemon.access.describe().items())),
}
CONFIG = Setting(lambda tree, key, h: tree.daemon.config)
SESSION_CONFIG = Setting(lambda tree, key, h: _session(tree, key, h).config)
SESSION_KINDS = {
    "pid": Generated(lambda tree, key, h: f"{_session(tree, key, h).pid}\n"),
    "comm": Generated(lambda tree, key, h: f"{_session(tree, key, h).comm}\n"),
    "cmdline": Generated(lambda tree, key, h: f"{_session(tree, key, h).cmdline}\n"),
    "mode": Generated(lambda tree, key, h: f"{_session(tree, key, h).mode}\n"),
    "state": Generated(lambda tree, key, h: f"{_session(tree, key, h).state}\n"),
    "stat": Generated(lambda tree, key, h: report.flat(report.session_stat(_session(tree, key, h)))
                      + f"access_source {_session(tree, key, h).access.name}\n"),
    "events": Events(lambda tree, key, h: _session(tree, key, h).events),
    "ctl": Ctl(_run_session),
    "trace": Trace(),
}
RANGE_KINDS = {
    "start": _range_line(lambda r: f"0x{r.start:x}"),
    "length": _range_line(lambda r: f"{r.length}"),
    "flags": Generated(lambda tree, key, h: _flag_names(_session(tree, key, h).native.range_info(key[2]).flags)),
    "stat": Generated(lambda tree, key, h: report.flat(report.range_stat(_session(tree, key, h).native.range_info(key[2])))),
    "pages": Pages(),
    "heat": Generated(lambda tree, key, h: "".join(
        f"{r.first} {r.count} {r.nr_accesses} {r.freq_pct} {r.age_ms}\n"
        for r in _session(tree, key, h).access.heat(key[2]))),
    "data": Data(),
    "ctl": Ctl(_run_range),
}
