"""The shape of the filesystem: which names exist, what they are, their attributes.

Every directory is one entry of `DIRS`: its tag, the directory it is in,
its name there (or, for one directory per session or range, how to list
them and whether one exists) and the files it holds.  Adding a directory is
adding an entry.  A node is named by a key, a tuple:

    (tag, *args)          a directory; args are what its tag needs
                          ("session", 3), ("range", 3, 0), ("root",)
    (tag, *args, name)    a file in that directory: ("range", 3, 0, "pages")
    ("link", pid)         /by-pid/PID -> ../sessions/ID

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
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import pyfuse3

from ..config import SETTINGS
from ..peer import may_read_memory
from . import files
from .files import FileKind
from .view import DaemonView, enoent

Key = tuple
ROOT: Key = ("root",)
LINK = "link"


@dataclass(frozen=True)
class Dir:
    tag: str
    under: str | None  # the tag of the directory this one is in
    name: str | None = None  # its fixed name there, or one per `each`
    each: Callable[[DaemonView, Key], Iterable[tuple[str, object]]] | None = None  # parent key -> (name, arg)
    exists: Callable[[DaemonView, Key], object] | None = None  # raises ENOENT when this one is gone
    files: Mapping[str, FileKind] = field(default_factory=dict)
    links: Callable[[DaemonView], Iterable[tuple[str, object]]] | None = None  # symbolic links here


DIRS: dict[str, Dir] = {d.tag: d for d in (
    Dir("root", None, files=files.ROOT_FILES),
    Dir("config", "root", "config", files={name: files.CONFIG for name in SETTINGS}),
    Dir("sessions", "root", "sessions"),
    Dir("by-pid", "root", "by-pid", links=lambda view: [(str(pid), pid) for pid in sorted(view.pids())]),
    Dir("session", "sessions", each=lambda view, key: [(str(s.id), s.id) for s in view.sessions()],
        exists=lambda view, key: view.session(key[1]), files=files.SESSION_FILES),
    Dir("ranges", "session", "ranges"),
    Dir("sconfig", "session", "config",
        files={name: files.SESSION_CONFIG for name, s in SETTINGS.items() if s.per_session}),
    Dir("range", "ranges", each=lambda view, key: [(str(n), n) for n in view.range_indexes(key[1])],
        exists=lambda view, key: view.range(key[1], key[2]), files=files.RANGE_FILES),
)}


def _arity(tag: str) -> int:
    """How many arguments a directory's key carries (a session id, a range index)."""
    d = DIRS[tag]
    return 0 if d.under is None else _arity(d.under) + (1 if d.each else 0)


ARITY = {tag: _arity(tag) for tag in DIRS}
SUBDIRS: dict[str, list[Dir]] = {tag: [d for d in DIRS.values() if d.under == tag] for tag in DIRS}


class Inodes:
    def __init__(self) -> None:
        self.by_key: dict[Key, int] = {ROOT: pyfuse3.ROOT_INODE}
        self.by_ino: dict[int, Key] = {pyfuse3.ROOT_INODE: ROOT}
        self.refs: dict[int, int] = {}
        self._next = pyfuse3.ROOT_INODE + 1

    def ino(self, key: Key) -> pyfuse3.InodeT:
        ino = self.by_key.get(key)
        if ino is None:
            ino = self._next
            self._next += 1
            self.by_key[key] = ino
            self.by_ino[ino] = key
        return pyfuse3.InodeT(ino)

    def key(self, ino: int) -> Key:
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
            if key is not None:
                self.by_key.pop(key, None)


class Tree:
    def __init__(self, view: DaemonView, allow_other: bool = False):
        self.view = view
        self.allow_other = allow_other
        self.mounted_at = time.time_ns()
        self.inodes = Inodes()

    # -- what a key is ---------------------------------------------------------------
    @staticmethod
    def is_dir(key: Key) -> bool:
        return key[0] in DIRS and len(key) == 1 + ARITY[key[0]]

    @staticmethod
    def is_link(key: Key) -> bool:
        return key[0] == LINK

    @staticmethod
    def session_id(key: Key) -> int | None:
        """The session a node belongs to, if any."""
        tag = key[0]
        return key[1] if tag in DIRS and ARITY[tag] >= 1 else None

    # -- what exists ------------------------------------------------------------------
    def check_dir(self, key: Key) -> Dir:
        """The directory's entry; ENOENT if it (or one above it) is gone."""
        d = DIRS[key[0]]
        if d.exists is not None:
            d.exists(self.view, key)
        elif d.under is not None and ARITY[d.tag]:
            self.check_dir(self.parent(key))
        return d

    def children(self, key: Key) -> list[tuple[str, Key]]:
        if not self.is_dir(key):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        d = self.check_dir(key)
        out = [(name, key + (name,)) for name in d.files]
        for sub in SUBDIRS[d.tag]:
            if sub.each is None:
                out.append((sub.name or sub.tag, (sub.tag,) + key[1:]))
            else:
                out += [(name, (sub.tag,) + key[1:] + (arg,)) for name, arg in sub.each(self.view, key)]
        if d.links is not None:
            out += [(name, (LINK, arg)) for name, arg in d.links(self.view)]
        return out

    def lookup(self, parent: Key, name: str) -> Key:
        for child_name, child in self.children(parent):
            if child_name == name:
                return child
        raise enoent()

    def parent(self, key: Key) -> Key:
        if self.is_link(key):
            return ("by-pid",)
        if not self.is_dir(key):
            return key[:-1]
        under = DIRS[key[0]].under
        return ROOT if under is None else (under,) + key[1:1 + ARITY[under]]

    def readlink(self, key: Key) -> str:
        sid = self.view.pids().get(key[1])
        if sid is None:
            raise enoent()
        return f"../sessions/{sid}"

    def file(self, key: Key) -> FileKind:
        """The kind of a file node (ENOENT if it does not exist now)."""
        tag = key[0]
        if tag not in DIRS or len(key) != 2 + ARITY[tag]:
            raise enoent()
        kind = DIRS[tag].files.get(key[-1])
        if kind is None:
            raise enoent()
        self.check_dir(key[:-1])
        return kind

    # -- attributes and permissions ------------------------------------------------------
    def attributes(self, key: Key) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = self.inodes.ino(key)
        a.entry_timeout = 0
        a.attr_timeout = 0
        a.st_uid = a.st_gid = 0
        a.st_nlink = 1
        when = self.mounted_at
        sid = self.session_id(key)
        if sid is not None:
            when = int(self.view.session(sid).started * 1e9)
        if self.is_link(key):
            a.st_mode = pyfuse3.ModeT(stat.S_IFLNK | 0o777)
            a.st_size = len(self.readlink(key))
        elif self.is_dir(key):
            self.check_dir(key)
            a.st_mode = pyfuse3.ModeT(stat.S_IFDIR | 0o555)
            a.st_nlink = 2
        else:
            kind = self.file(key)
            a.st_mode = pyfuse3.ModeT(stat.S_IFREG | kind.mode)
            a.st_size = kind.size(self.view, key)
            if kind.reveals_memory and sid is not None:
                a.st_uid = self.view.session(sid).uid
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = when
        a.st_blksize = 4096
        a.st_blocks = 0
        return a

    def check_open(self, key: Key, flags: int, who: Opener) -> FileKind:
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
            sid = self.session_id(key)
            s = self.view.session(sid) if sid is not None else None
            if s is None or s.peer is None or not may_read_memory(s.peer, who.pid, who.uid, who.gid):
                raise pyfuse3.FUSEError(errno.EACCES)
        return kind

    def open(self, key: Key, flags: int, who: Opener) -> files.Handle:
        kind = self.check_open(key, flags, who)
        sid = self.session_id(key)
        return files.Handle(self.view, key, kind, who, self.view.session(sid) if sid is not None else None)

    def check_access(self, key: Key, mode: int, who: Opener) -> bool:
        if self.is_dir(key) or self.is_link(key):
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
    def of(cls, ctx: pyfuse3.RequestContext) -> Opener:
        return cls(ctx.pid, ctx.uid, ctx.gid)


# names of the files, for the documentation check (tests/test_docs.py)
ROOT_FILES = tuple(files.ROOT_FILES)
SESSION_FILES = tuple(files.SESSION_FILES)
RANGE_FILES = tuple(files.RANGE_FILES)
