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

import pyfuse3
import trio

from .files import Handle
from .tree import Opener, Tree

log = logging.getLogger("memfs.fs")


def guarded(fn):
    @functools.wraps(fn)
    async def wrapper(self, *args):
        try:
            return await fn(self, *args)
        except pyfuse3.FUSEError:
            raise
        except trio.Cancelled:
            raise
        except OSError as e:
            raise pyfuse3.FUSEError(e.errno or errno.EIO)
        except Exception:
            log.exception("%s%r failed", fn.__name__, args[:2])
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
        self._dirs: dict[int, list] = {}
        self._next_fh = 1

    def _fh(self, obj, table) -> int:
        fh = self._next_fh
        self._next_fh += 1
        table[fh] = obj
        return fh

    def _handle(self, fh: int) -> Handle:
        try:
            return self._handles[fh]
        except KeyError:
            raise pyfuse3.FUSEError(errno.EBADF)

    # -- names -------------------------------------------------------------------
    @guarded
    async def lookup(self, parent_inode, name, ctx):
        key = self.tree.lookup(self.inodes.key(parent_inode), os.fsdecode(name))
        attr = self.tree.attributes(key)
        self.inodes.ref(attr.st_ino)
        return attr

    @guarded
    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.inodes.forget(ino, n)

    @guarded
    async def getattr(self, inode, ctx):
        return self.tree.attributes(self.inodes.key(inode))

    @guarded
    async def setattr(self, inode, attr, fields, fh, ctx):
        # `echo x > file` may truncate first: allowed (and meaningless) on writable files only
        key = self.inodes.key(inode)
        if fields.update_size and attr.st_size == 0 and not (
                fields.update_mode or fields.update_uid or fields.update_gid):
            self.tree.check_open(key, os.O_WRONLY, Opener.of(ctx))
            return self.tree.attributes(key)
        raise pyfuse3.FUSEError(errno.EPERM)

    @guarded
    async def readlink(self, inode, ctx):
        key = self.inodes.key(inode)
        if key[0] != "link":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(self.tree.readlink(key))

    @guarded
    async def access(self, inode, mode, ctx):
        return self.tree.check_access(self.inodes.key(inode), mode, Opener.of(ctx))

    # -- directories ---------------------------------------------------------------
    @guarded
    async def opendir(self, inode, ctx):
        key = self.inodes.key(inode)
        if not self.tree.is_dir(key):
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        entries = [(".", key), ("..", self.tree.parent(key))] + self.tree.children(key)
        return self._fh(entries, self._dirs)

    @guarded
    async def readdir(self, fh, start_id, token):
        entries = self._dirs.get(fh, [])
        for i in range(start_id, len(entries)):
            name, key = entries[i]
            try:
                attr = self.tree.attributes(key)
            except pyfuse3.FUSEError:
                continue  # gone since opendir
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, i + 1):
                return
            if name not in (".", ".."):
                self.inodes.ref(attr.st_ino)

    @guarded
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------------
    @guarded
    async def open(self, inode, flags, ctx):
        key = self.inodes.key(inode)
        if self.tree.is_dir(key):
            raise pyfuse3.FUSEError(errno.EISDIR)
        kind = self.tree.check_open(key, flags, Opener.of(ctx))
        fh = self._fh(Handle(self.tree, key, kind, Opener.of(ctx)), self._handles)
        return pyfuse3.FileInfo(fh=fh, direct_io=True, keep_cache=False, nonseekable=kind.nonseekable)

    @guarded
    async def read(self, fh, off, size):
        h = self._handle(fh)
        return await h.kind.read(h, off, size)

    @guarded
    async def write(self, fh, off, buf):
        h = self._handle(fh)
        return await h.kind.write(h, off, bytes(buf))

    @guarded
    async def flush(self, fh):
        pass

    @guarded
    async def release(self, fh):
        self._handles.pop(fh, None)

    @guarded
    async def poll(self, inode, fh, poll_handle, ctx):
        h = self._handle(fh)
        return h.kind.poll(h, poll_handle)

    @guarded
    async def statfs(self, ctx):
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 4096
        st.f_namemax = 255
        return st
