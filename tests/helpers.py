"""Test helpers: real target processes, /proc readings, waiting."""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "native" / "build"
C_TARGET = BUILD / "memfs-target"
C_TARGET_NOAGENT = BUILD / "memfs-target-noagent"
PY_TARGET = Path(__file__).resolve().parent / "targets" / "pytarget.py"
PAGE = 4096


def proc_status_kb(pid: int, key: str) -> int:
    """A size from /proc/<pid>/status (RssAnon, VmHWM...), in KiB: read here, as the
    ground truth the daemon's numbers are checked against."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise LookupError(key)


def pages_present(pid: int, addr: int, npages: int) -> list[bool]:
    """From /proc/<pid>/pagemap: is each page in memory (or swap)?"""
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        f.seek((addr // PAGE) * 8)
        data = f.read(npages * 8)
    return [bool(e >> 62 & 3) for e in struct.unpack(f"={npages}Q", data)]


class Target:
    """A target process driven by lines on stdin/stdout (see native/targets/memfs_target.c)."""

    def __init__(self, proc: trio.Process, ready: dict[str, int]):
        self.proc = proc
        self.pid = proc.pid
        self.session_id = ready["session"]
        self.addr = ready["addr"]
        self.npages = ready["pages"]
        self._buf = b""

    @classmethod
    async def start(cls, argv: list[str], env=None) -> "Target":
        proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                                env=env)
        t = cls.__new__(cls)
        t.proc, t._buf = proc, b""
        line = await t.readline()
        if not line.startswith("READY"):
            await t.kill()
            raise RuntimeError(f"target did not start: {line!r}")
        fields = dict(kv.split("=") for kv in line.split()[1:])
        t.__init__(proc, {k: int(v, 0) for k, v in fields.items()})
        t._buf = b""
        return t

    async def readline(self, timeout: float = 120) -> str:
        with trio.fail_after(timeout):
            while b"\n" not in self._buf:
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    return self._buf.decode()
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode()

    async def command(self, cmd: str, timeout: float = 120) -> dict[str, str]:
        await self.proc.stdin.send_all(cmd.encode() + b"\n")
        line = await self.readline(timeout)
        parts = line.split()
        if not parts:
            raise RuntimeError(f"{cmd!r}: target said nothing (exit {self.proc.poll()})")
        return {"_": parts[0], **dict(kv.split("=", 1) for kv in parts[1:] if "=" in kv)}

    async def verify(self) -> tuple[int, int]:
        r = await self.command("verify")
        return int(r["ok"]), int(r["bad"])

    def rss_kb(self) -> int:
        return proc_status_kb(self.pid, "RssAnon")

    def present(self) -> list[bool]:
        return pages_present(self.pid, self.addr, self.npages)

    async def kill(self) -> None:
        if self.proc.returncode is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        with trio.move_on_after(10):
            await self.proc.wait()

    async def exit(self) -> int:
        try:
            await self.proc.stdin.send_all(b"exit\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        with trio.move_on_after(30):
            return await self.proc.wait()
        await self.kill()
        return -9


def c_target(socket: str, mb: int = 64, *extra: str, agent: bool = True) -> list[str]:
    exe = C_TARGET if agent else C_TARGET_NOAGENT
    return [str(exe), "--mb", str(mb), "--socket", socket, *extra]


def py_target(socket: str, mb: int = 64, *extra: str) -> list[str]:
    return [sys.executable, str(PY_TARGET), "--mb", str(mb), "--socket", socket, *extra]


async def wait_for(predicate, timeout: float = 30, interval: float = 0.02):
    with trio.fail_after(timeout):
        while True:
            v = predicate()
            if v:
                return v
            await trio.sleep(interval)
