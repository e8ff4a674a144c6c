"""The shape of the filesystem: which names exist, what they are, their attributes.

A node is named by a key, a tuple that says where it is:

    ("root",)                    /                     ("root", name)        /version ...
    ("config",)                  /config/              ("config", name)      /config/NAME
    ("sessions",)                /sessions/            ("s", sid)            /sessions/ID/
    ("s", sid, name)             /sessions/ID/stat ... ("sranges", sid)      /sessions/ID/ranges/
    ("sconfig", sid)             /sessions/ID/config/  ("sconfig", sid, name)
    ("r", sid, n)                .../ranges/N/         ("r", sid, n, name)   .../ranges/N/pages ...
    ("by-pid",)                  /by-pid/              ("link", pid)         /by-pid/PID -> ../sessions/ID

Keys of a session stop existing when it ends.  `Inodes` hands out inode
numbers (never reused) and forgets them with the kernel.  `attributes()`
is the one place entry attributes are built; `check_open()` the one place
permissions are decided (see memfs(5), PERMISSIONS).
"""
from __future__ import annotations

import errno
import os
import stat
import time
from dataclasses import dataclass

import pyfuse3

from ..config import SETTINGS
from ..peer import may_read_memory
from . import files

ROOT = ("root",)
ROOT_FILES = ("version", "stat", "events", "metrics", "ctl", "access")
SESSION_FILES = ("pid", "comm", "cmdline", "mode", "state", "stat", "events", "ctl", "trace")
RANGE_FILES = ("start", "length", "flags", "stat", "pages", "heat", "data", "ctl")


def enoent() -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(errno.ENOENT)


class Inodes:
    def __init__(self):
        self.by_key = {ROOT: pyfuse3.ROOT_INODE}
        self.by_ino = {pyfuse3.ROOT_INODE: ROOT}
        self.refs: dict[int, int] = {}
        self._next = pyfuse3.ROOT_INODE + 1

    def ino(self, key) -> int:
        ino = self.by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self.by_key[key] = ino
            self.by_ino[ino] = key
        return ino

    def key(self, ino: int):
        try:
            return self.by_ino[ino]
        except KeyError:
            raise enoent()

    def ref(self, ino: int) -> None:
        self.refs[ino] = self.refs.get(ino, 0) + 1

    def forget(self, ino: int, n: int) -> None:
        left = self.refs.get(ino, 0) - n
        if left > 0:
            self.refs[ino] = left
            return
        self.refs.pop(ino, None)
        if ino != pyfuse3.ROOT_INODE:
            key = self.by_ino.pop(ino, None)
            self.by_key.pop(key, None)


class Tree:
    def __init__(self, daemon, allow_other: bool = False):
        self.daemon = daemon
        self.allow_other = allow_other
        self.mounted_at = time.time_ns()
        self.inodes = Inodes()

    # -- what exists ------------------------------------------------------------
    def session(self, sid: int):
        s = self.daemon.sessions.get(sid)
        if s is None or s.state == "ended":
            raise enoent()
        return s

    def range_info(self, sid: int, n: int):
        s = self.session(sid)
        try:
            return s.native.range_info(n)
        except OSError:
            raise enoent()

    def children(self, key) -> list[tuple[str, tuple]]:
        kind = key[0]
        if key == ROOT:
            return ([(n, ("root", n)) for n in ROOT_FILES]
                    + [("config", ("config",)), ("sessions", ("sessions",)), ("by-pid", ("by-pid",))])
        if key == ("config",):
            return [(n, ("config", n)) for n in SETTINGS]
        if key == ("sessions",):
            return [(str(sid), ("s", sid)) for sid, s in sorted(self.daemon.sessions.items())
                    if s.state != "ended"]
        if key == ("by-pid",):
            return [(str(pid), ("link", pid)) for pid in sorted(self.pids())]
        if kind == "s" and len(key) == 2:
            self.session(key[1])
            return ([(n, ("s", key[1], n)) for n in SESSION_FILES]
                    + [("ranges", ("sranges", key[1])), ("config", ("sconfig", key[1]))])
        if kind == "sranges":
            s = self.session(key[1])
            return [(str(n), ("r", key[1], n)) for n in s.native.range_indexes()]
        if kind == "sconfig" and len(key) == 2:
            self.session(key[1])
            return [(n, ("sconfig", key[1], n)) for n, st in SETTINGS.items() if st.per_session]
        if kind == "r" and len(key) == 3:
            self.range_info(key[1], key[2])
            return [(n, ("r", key[1], key[2], n)) for n in RANGE_FILES]
        raise pyfuse3.FUSEError(errno.ENOTDIR)

    def lookup(self, parent, name: str):
        for child_name, child in self.children(parent):
            if child_name == name:
                return child
        raise enoent()

    def parent(self, key):
        kind = key[0]
        if key == ROOT or kind == "root" or key in (("config",), ("sessions",), ("by-pid",)):
            return ROOT
        if kind == "config":
            return ("config",)
        if kind == "link":
            return ("by-pid",)
        if kind == "s":
            return ("sessions",) if len(key) == 2 else ("s", key[1])
        if kind in ("sranges", "sconfig") and len(key) == 2:
            return ("s", key[1])
        if kind == "sconfig":
            return ("sconfig", key[1])
        if kind == "r":
            return ("sranges", key[1]) if len(key) == 3 else ("r", key[1], key[2])
        return ROOT

    def pids(self) -> dict[int, int]:
        """pid -> its newest live session."""
        out = {}
        for sid, s in sorted(self.daemon.sessions.items()):
            if s.state != "ended":
                out[s.pid] = sid
        return out

    def readlink(self, key) -> str:
        sid = self.pids().get(key[1])
        if sid is None:
            raise enoent()
        return f"../sessions/{sid}"

    @staticmethod
    def is_dir(key) -> bool:
        return (key in (ROOT, ("config",), ("sessions",), ("by-pid",))
                or (key[0] in ("s", "sranges", "sconfig") and len(key) == 2)
                or (key[0] == "r" and len(key) == 3))

    def file(self, key) -> files.FileKind:
        """The kind of a file node (raises ENOENT if it does not exist now)."""
        kind = key[0]
        if kind == "root" and len(key) == 2 and key[1] in ROOT_FILES:
            return files.ROOT_KINDS[key[1]]
        if kind == "config" and len(key) == 2 and key[1] in SETTINGS:
            return files.CONFIG
        if kind == "s" and len(key) == 3 and key[2] in SESSION_FILES:
            self.session(key[1])
            return files.SESSION_KINDS[key[2]]
        if kind == "sconfig" and len(key) == 3 and SETTINGS.get(key[2]) and SETTINGS[key[2]].per_session:
            self.session(key[1])
            return files.SESSION_CONFIG
        if kind == "r" and len(key) == 4 and key[3] in RANGE_FILES:
            self.range_info(key[1], key[2])
            return files.RANGE_KINDS[key[3]]
        raise enoent()

    # -- attributes and permissions ---------------------------------------------
    def attributes(self, key) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.inodes.ino(key)
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_uid = a.st_gid = 0
        a.st_nlink = 1
        when = self.mounted_at
        if len(key) >= 2 and key[0] in ("s", "sranges", "sconfig", "r"):
            when = int(self.session(key[1]).started * 1e9)
        if key[0] == "link":
            a.st_mode = stat.S_IFLNK | 0o777
            a.st_size = len(self.readlink(key))
        elif self.is_dir(key):
            if key[0] in ("s", "sranges", "sconfig", "r"):
                self.children(key)  # raises if gone
            a.st_mode = stat.S_IFDIR | 0o555
            a.st_nlink = 2
        else:
            kind = self.file(key)
            a.st_mode = stat.S_IFREG | kind.mode
            a.st_size = kind.size(self, key)
            if kind.reveals_memory:
                a.st_uid = self.session(key[1]).uid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = when
        a.st_blksize = 4096
        a.st_blocks = 0
        return a

    def check_open(self, key, flags: int, who: "Opener") -> files.FileKind:
        """Who may open what: read-only files refuse writes (EACCES, root too);
        control and config files take writes from root only; pages, data and
        trace follow the rule of /proc/<pid>/mem, decided now against the live
        target (memfs(5), SECURITY)."""
        kind = self.file(key)
        acc = flags & os.O_ACCMODE
        reading = acc in (os.O_RDONLY, os.O_RDWR)
        writing = acc in (os.O_WRONLY, os.O_RDWR) or flags & os.O_TRUNC
        if writing and not kind.writable or reading and not kind.readable:
            raise pyfuse3.FUSEError(errno.EACCES)
        if writing and who.uid != 0:
            raise pyfuse3.FUSEError(errno.EACCES)
        if kind.reveals_memory:
            s = self.session(key[1])
            if s.peer is None or not may_read_memory(s.peer, who.pid, who.uid, who.gid):
                raise pyfuse3.FUSEError(errno.EACCES)
        return kind

    def check_access(self, key, mode: int, who: "Opener") -> bool:
        if self.is_dir(key) or key[0] == "link":
            return not mode & os.W_OK
        flags = os.O_RDWR if mode & os.R_OK and mode & os.W_OK else os.O_WRONLY if mode & os.W_OK else os.O_RDONLY
        if mode & os.X_OK:
            return False
        try:
            self.check_open(key, flags, who)
        except pyfuse3.FUSEError:
            return False
        return True


@dataclass(frozen=True)
class Opener:
    """Who asks (a FUSE request's process and file system ids)."""
    pid: int
    uid: int
    gid: int

    @classmethod
    def of(cls, ctx) -> "Opener":
        return cls(ctx.pid, ctx.uid, ctx.gid)
