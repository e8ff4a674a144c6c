"""The inspection and control filesystem (memfs(5)), mounted by `memfs serve`.

pyfuse3 runs inside the daemon's trio loop: its handlers are tasks of the
daemon and call the pager's API directly.  A developer note on what runs
without an await: handlers that only read counters or page tables call
the native core synchronously (each call takes the session lock for
microseconds), so they cannot interleave with one another; anything long
(reading `data`, operations) goes to a worker thread or awaits the pager,
and every handler re-checks that its session still lives after an await.
"""
from __future__ import annotations

import errno
import logging
import os
import subprocess

import pyfuse3
import trio

from .operations import Operations
from .tree import Tree
from .view import DaemonView

log = logging.getLogger("memfs.fs")


def mounted_at(path: str) -> str | None:
    """The filesystem type mounted exactly at `path`, if any."""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                sep = fields.index("-")
                if fields[4] == real:
                    return fields[sep + 1]
    except OSError:
        pass
    return None


def prepare_mountpoint(path: str) -> None:
    """Create the mountpoint; clean up a stale mount a crashed daemon left there."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            log.warning("%s: stale mount of a daemon that is gone: unmounting it", path)
            subprocess.run(["fusermount3", "-u", "-z", path], check=False)
        elif e.errno != errno.ENOENT:
            raise
    os.makedirs(path, exist_ok=True)
    fstype = mounted_at(path)
    if fstype is not None:
        if fstype.startswith("fuse"):
            raise OSError(errno.EBUSY, f"{path}: a live filesystem ({fstype}) is mounted there; is another memfs running?")
        raise OSError(errno.EBUSY, f"{path}: {fstype} is mounted there")


async def serve_fs(daemon, mountpoint: str, allow_other: bool = False, on_unmounted=lambda: None, *,
                   task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the filesystem until cancelled; if it is unmounted from outside
    (fusermount3 -u, lazy or not), call on_unmounted: the daemon's stop request,
    as s3ql and sshfs take it."""
    prepare_mountpoint(mountpoint)
    ops = Operations(Tree(DaemonView(daemon), allow_other))
    options = {"fsname=memfs", "subtype=memfs", "nosuid", "nodev", "noexec"}
    if allow_other:
        options.add("allow_other")
    pyfuse3.init(ops, mountpoint, options)
    log.info("mounted at %s", mountpoint)
    try:
        task_status.started()
        await pyfuse3.main()
        log.warning("%s was unmounted: stopping", mountpoint)
        on_unmounted()
    finally:
        pyfuse3.close(unmount=True)
        log.info("unmounted %s", mountpoint)
