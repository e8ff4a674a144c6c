"""pyfuse3 Operations: a thin layer over the tree (names, attributes,
permissions) and the file kinds (contents).

Every handler is guarded: any exception other than FUSEError would take
the mount down, so an OSError becomes its errno and anything unexpected
becomes EIO, logged with its traceback.
"""
from __future__ import annotations

import errno
import functools
import logging
import os

from typing import Any, Callable, Coroutine, ParamSpec, Sequence, TypeVar

import pyfuse3
import trio
from pyfuse3 import EntryAttributes, FileHandleT, FileInfo, FileNameT, InodeT, ModeT, RequestContext

from .files import Handle
from .tree import Key, Opener, Tree

T = TypeVar("T")
P = ParamSpec("P")

log = logging.getLogger("memfs.fs")


def guarded(fn: Callable[P, Coroutine[Any, Any, T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except trio.Cancelled:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO)
        except Exception:
            log.exception("%s%r failed", fn.__name__, args[1:3])
            raise pyfuse3.FUSEError(errno.EIO)
    return wrapper


class Operations(pyfuse3.Operations):
    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, tree: Tree):
        super().__init__()
        self.tree = tree
        self.inodes = tree.inodes
        self._handles: dict[int, Handle] = {}
        self._dirs: dict[int, list[tuple[str, Key]]] = {}
        self._next_fh = 1

    def _new_fh(self) -> FileHandleT:
        fh = self._next_fh
        self._next_fh += 1
        return FileHandleT(fh)

    def _handle(self, fh: FileHandleT) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF)

    # -- names -------------------------------------------------------------------
    @guarded
    async def lookup(self, parent_inode: InodeT, name: FileNameT, ctx: RequestContext) -> EntryAttributes:
        key = self.tree.lookup(self.inodes.key(parent_inode), os.fsdecode(name))
        attr = self.tree.attributes(key)
        self.inodes.ref(attr.st_ino)
        return attr

    @guarded
    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    @guarded
    async def getattr(self, inode: InodeT, ctx: RequestContext) -> EntryAttributes:
        return self.tree.attributes(self.inodes.key(inode))

    @guarded
    async def setattr(self, inode: InodeT, attr: EntryAttributes, fields: pyfuse3.SetattrFields,
                      fh: FileHandleT | None, ctx: RequestContext) -> EntryAttributes:
        # `echo x > file` may truncate first: allowed (and meaningless) on writable files only
        key = self.inodes.key(inode)
        if fields.update_size and attr.st_size == 0 and not (
                fields.update_mode or fields.update_uid or fields.update_gid):
            self.tree.check_open(key, os.O_WRONLY, Opener.of(ctx))
            return self.tree.attributes(key)
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def readlink(self, inode: InodeT, ctx: RequestContext) -> FileNameT:
        key = self.inodes.key(inode)
        if not self.tree.is_link(key):
            raise pyfuse3.FUSEError(errno.EINVAL)
        return FileNameT(os.fsencode(self.tree.readlink(key)))

    @guarded
    async def access(self, inode: InodeT, mode: ModeT, ctx: RequestContext) -> bool:
        return self.tree.check_access(self.inodes.key(inode), mode, Opener.of(ctx))

    # -- directories ---------------------------------------------------------------
    @guarded
    async def opendir(self, inode: InodeT, ctx: RequestContext) -> FileHandleT:
        key = self.inodes.key(inode)
        if not self.tree.is_dir(key):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries = [(".", key), ("..", self.tree.parent(key))] + self.tree.children(key)
        fh = self._new_fh()
        self._dirs[fh] = entries
        return fh

    @guarded
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, key = entries[i]
            try:
                attr = self.tree.attributes(key)
            except pyfuse3.FUSEError:
                continue  # gone since opendir
            if not pyfuse3.readdir_reply(token, FileNameT(os.fsencode(name)), attr, i + 1):
                return
            if name not in (".", ".."):
                self.inodes.ref(attr.st_ino)

    @guarded
    async def releasedir(self, fh: FileHandleT) -> None:
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------------
    @guarded
    async def open(self, inode: InodeT, flags: int, ctx: RequestContext) -> FileInfo:
        key = self.inodes.key(inode)
        if self.tree.is_dir(key):
            raise pyfuse3.FUSEError(errno.EISDIR)
        h = self.tree.open(key, flags, Opener.of(ctx))
        fh = self._new_fh()
        self._handles[fh] = h
        return FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=h.kind.nonseekable)

    @guarded
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes:
        h = self._handle(fh)
        return await h.kind.read(h, off, size)

    @guarded
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        h = self._handle(fh)
        return await h.kind.write(h, off, bytes(buf))

    @guarded
    async def flush(self, fh: FileHandleT) -> None:
        pass

    @guarded
    async def release(self, fh: FileHandleT) -> None:
        self._handles.pop(fh, None)

    @guarded
    async def poll(self, inode: InodeT, fh: FileHandleT, poll_handle: pyfuse3.PollHandle | None,
                   ctx: RequestContext) -> int:
        h = self._handle(fh)
        return h.kind.poll(h, poll_handle)

    @guarded
    async def statfs(self, ctx: RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        return st
