"""Who is on the other end: a process, held by a pidfd, never just a pid.

A session belongs to the process that connected, for its whole life.  Its
pidfd is taken from the connection itself (SO_PEERPIDFD, Linux 6.5), so it
names the process that called connect(2), even if that process has exited
and its pid been reused since (then the pidfd says so, and the connection
is refused before anything about that pid is read).  A file of
/proc/<pid>/ is trusted only if the process still lives once it is open:
then the pid was its own when the file was opened.  (docs/design.md,
"Identity".)

Reading a target's memory follows the rule of /proc/<pid>/mem
(`may_read_memory`): ptrace access mode ATTACH with the reader's file
system credentials, as far as it can be decided from outside the kernel:
CAP_SYS_PTRACE, or the same uid and gid as all of the target's and a
target that is dumpable, under Yama's ptrace_scope where it is set.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import trio

SO_PEERPIDFD = 77  # Linux 6.5: a pidfd of the process that connected
CAP_SYS_PTRACE = 19


class PeerGone(OSError):
    def __init__(self, pid: int):
        super().__init__(errno.ESRCH, f"process {pid} has exited")


@dataclass
class Peer:
    pid: int
    uid: int
    gid: int
    pidfd: int

    @classmethod
    def of(cls, sock: socket.socket | trio.socket.SocketType) -> "Peer":
        """The connected process (ESRCH if it has exited since it connected)."""
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        try:
            pidfd = struct.unpack("i", sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD, 4))[0]
        except OSError as e:
            if e.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
                raise
            # an older kernel: the pid's process now; it is the peer's only if the peer is
            # still alive, and a live peer cannot have given its pid away
            pidfd = os.pidfd_open(pid)
        peer = cls(pid, uid, gid, pidfd)
        if not peer.alive():
            peer.close()
            raise PeerGone(pid)
        return peer

    def alive(self) -> bool:
        if self.pidfd < 0:
            return False
        p = select.poll()
        p.register(self.pidfd, select.POLLIN)
        return not p.poll(0)  # a pidfd turns readable when its process exits

    def read(self, name: str, limit: int = 4096) -> bytes:
        """/proc/<pid>/<name>, if it is this process's (PeerGone otherwise)."""
        try:
            fd = os.open(f"/proc/{self.pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PeerGone(self.pid)
        try:
            if not self.alive():
                raise PeerGone(self.pid)
            out = b""
            while len(out) < limit and (chunk := os.read(fd, min(65536, limit - len(out)))):
                out += chunk
            return out
        finally:
            os.close(fd)

    def lines(self, name: str, limit: int = 1 << 24):
        """/proc/<pid>/<name> as text lines, if it is this process's."""
        return self.read(name, limit).decode(errors="replace").splitlines()

    def text(self, name: str) -> str:
        """A short /proc file as one line (NULs as spaces), "" if the process has gone."""
        try:
            data = self.read(name)
        except OSError:
            return ""
        return data.replace(b"\0", b" ").decode(errors="replace").strip()

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def _status(pid: int) -> dict[str, list[str]]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.split() for k, _, v in (line.partition(":") for line in f)}


def _yama_scope() -> int:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 0


def _is_ancestor(pid: int, of: int) -> bool:
    seen = 0
    while of > 1 and seen < 4096:
        try:
            of = int(_status(of)["PPid"][0])
        except (OSError, KeyError, ValueError, IndexError):
            return False
        if of == pid:
            return True
        seen += 1
    return False


def may_read_memory(target: Peer, reader_pid: int, reader_uid: int, reader_gid: int) -> bool:
    """Could the reader (a FUSE request's process and file system ids) open /proc/<target>/mem?"""
    try:
        reader = _status(reader_pid)
        if not target.alive():
            return False
        owner = os.stat(f"/proc/{target.pid}/status").st_uid  # root's while the target is not dumpable
        tstat = _status(target.pid)
        if not target.alive():
            return False
    except (OSError, KeyError):
        return False
    capable = bool(int(reader.get("CapEff", ["0"])[0], 16) >> CAP_SYS_PTRACE & 1)
    scope = _yama_scope()
    if capable:
        return scope < 3
    uids, gids = tstat.get("Uid", [])[:3], tstat.get("Gid", [])[:3]
    if any(int(u) != reader_uid for u in uids) or any(int(g) != reader_gid for g in gids):
        return False
    if owner != int(uids[1]):
        return False  # not dumpable (prctl PR_SET_DUMPABLE 0, or it changed ids)
    if scope >= 2:
        return False
    return scope == 0 or _is_ancestor(reader_pid, target.pid)
