"""memfs bench fuzz: generated frames against a live daemon, and what it cost.

    python3 -m memfs bench fuzz [--frames N] [--seed S] [--out FILE]

Starts a daemon (memfs.localdaemon), then opens connection after
connection and sends each a run of generated frames: handshakes with
fields drawn at random or from the edges of what is valid (pids, range
counts, addresses in this very process, flags, page sizes), descriptors of
every kind attached to any message (a pipe, a userfaultfd, two at once),
truncated and oversized frames, unknown types, garbage, and sessions that
really start (a region of this process and its userfaultfd, no agent) and
then get EVICT_DONE, SAMPLE_DONE, PREFETCH, RESUME and ADOPT out of order.
Each connection is closed at once or read until the daemon ends it.

At the end the daemon must still run, its descriptors be back where they
were (within FD_SLACK), its memory within RSS_SLACK_MB of where it was,
and a good client (memfs-target) be served: evict, verify.  The run prints
its figures and, with --out, writes them as Markdown (bench/FUZZ.md).
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from .. import native, protocol
from ..dev.localdaemon import LocalDaemon

TARGET = native.path("bin", "memfs-target")
FD_SLACK = 8
RSS_SLACK_MB = 64
PAGE = 4096
UFFDIO_API = 0xC018AA3F


def userfaultfd() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("=QQQ", 0xAA, 1 | 0x100, 0)))  # WP, THREAD_ID
    return fd


def status(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


class Fuzzer:
    def __init__(self, sock: str, rng: random.Random):
        self.sock = sock
        self.rng = rng
        self.region = mmap.mmap(-1, 64 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.region[:] = os.urandom(64 * PAGE)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.region))
        self.frames = 0
        self.outcomes: dict[str, int] = {}

    # -- what to send ----------------------------------------------------------------
    def number(self, bits: int) -> int:
        r = self.rng
        edge = [0, 1, 2, 4095, 4096, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1, 2**bits - 1]
        return r.choice(edge) if r.random() < 0.4 else r.getrandbits(bits)

    def address(self) -> int:
        r = self.rng
        return r.choice([self.addr, self.addr + PAGE * r.randrange(64), self.addr + 1, 0, 1 << 47,
                         self.number(64)])

    def hello(self, real: bool) -> bytes:
        r = self.rng
        pid = os.getpid() if real or r.random() < 0.6 else self.number(32)
        n = 1 if real else r.choice([0, 1, 2, 1024, 1025, self.number(32)])
        caps = 0 if real else r.choice([0, 1, 2, 3, 4, 5, 7, 8, self.number(64)])
        ps = 4096 if real or r.random() < 0.8 else self.number(32)
        return protocol.HELLO_BODY.pack(pid, n, caps, ps, 0 if r.random() < 0.9 else 1)

    def range_(self, real: bool, index: int = 0) -> bytes:
        r = self.rng
        if real:
            return protocol.RANGE_BODY.pack(self.addr, 64 * PAGE, 3, index)
        return protocol.RANGE_BODY.pack(self.address(), r.choice([PAGE, 64 * PAGE, 0, 1, self.number(64)]),
                                        r.choice([0, 1, 2, 3, 4, 7, self.number(32)]),
                                        r.choice([0, 1, 3, 4095, 4096, self.number(32)]))

    def body(self, ftype: int) -> bytes:
        r = self.rng
        if ftype == protocol.HELLO:
            return self.hello(False)
        if ftype == protocol.RANGE:
            return self.range_(False)
        if ftype in (protocol.START, protocol.RESUME):
            st = protocol.START_BODY if ftype == protocol.START else protocol.RESUME_BODY
            return os.urandom(st.size) if r.random() < 0.5 else bytes(st.size)
        if ftype == protocol.PREFETCH:
            return protocol.PREFETCH_BODY.pack(self.address(), self.number(64))
        if ftype == protocol.EVICT_DONE:
            return protocol.EVICT_DONE_BODY.pack(self.number(64), -r.randrange(200), 0, self.number(64))
        if ftype == protocol.SAMPLE_DONE:
            n = r.choice([0, 1, 8, 9, self.number(32)])
            return protocol.SAMPLE_DONE_BODY.pack(self.number(64), n, 0) + os.urandom(r.randrange(0, 40))
        if ftype == protocol.FORGET:
            n = r.randrange(0, 5)
            return protocol.FORGET_BODY.pack(r.choice([n, self.number(32)]), 0) + b"".join(
                protocol.FORGET_RUN.pack(r.randrange(4), 0, self.number(64), self.number(64)) for _ in range(n))
        return os.urandom(r.randrange(0, 64))

    def frame(self, ftype: int | None = None, body: bytes | None = None) -> bytes:
        r = self.rng
        if ftype is None:
            ftype = r.choice(sorted(protocol.NAMES) + [0, 11, 12, 63, 100, 65535])
        if body is None:
            body = self.body(ftype)
        length = len(body)
        if r.random() < 0.05:
            length = r.choice([length + 1, max(0, length - 1), protocol.MAX_PAYLOAD + 1, self.number(32)])
        magic = protocol.MAGIC if r.random() < 0.97 else self.number(32)
        version = protocol.VERSION if r.random() < 0.95 else r.choice([1, 3, r.getrandbits(16)])
        data = protocol.HEADER.pack(magic, version, ftype, length, self.number(32)) + body
        if r.random() < 0.03:
            data = data[:r.randrange(len(data) + 1)]
        return data

    def fds(self) -> list[int]:
        """Descriptors to attach: none mostly; else a pipe end, a userfaultfd, or two."""
        r = self.rng.random()
        if r < 0.85:
            return []
        if r < 0.92:
            a, b = os.pipe()
            os.close(b)
            return [a]
        if r < 0.97:
            return [userfaultfd()]
        return [userfaultfd(), os.open("/dev/null", os.O_RDONLY)]

    # -- sending ----------------------------------------------------------------------------
    def send(self, s: socket.socket, data: bytes, fds: list[int]) -> bool:
        try:
            if fds:
                s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))])
            else:
                s.sendall(data)
            self.frames += 1
            return True
        except OSError:
            return False
        finally:
            for fd in fds:
                os.close(fd)

    def connection(self) -> None:
        r = self.rng
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        try:
            s.connect(self.sock)
        except OSError as e:
            self.outcomes[f"connect {e.strerror}"] = self.outcomes.get(f"connect {e.strerror}", 0) + 1
            s.close()
            return
        kind = r.choice(["random", "handshake", "session", "garbage"])
        ok = True
        if kind == "garbage":
            ok = self.send(s, os.urandom(r.randrange(1, 4096)), [])
        elif kind == "session":
            uffd = userfaultfd()
            ok = (self.send(s, self.frame(protocol.HELLO, self.hello(True)), [])
                  and self.send(s, self.frame(protocol.RANGE, self.range_(True)), [])
                  and self.send(s, protocol.frame(protocol.START, 3, protocol.START_BODY.pack(1 | 0x100)),
                                [os.dup(uffd)]))
            os.close(uffd)
        elif kind == "handshake":
            ok = self.send(s, self.frame(protocol.HELLO), self.fds())
            for _ in range(r.randrange(0, 4)):
                ok = ok and self.send(s, self.frame(protocol.RANGE), self.fds())
            ok = ok and self.send(s, self.frame(r.choice([protocol.START, protocol.RESUME])), self.fds())
        for _ in range(r.randrange(1, 60) if ok else 0):
            if not self.send(s, self.frame(), self.fds()):
                break
        try:
            if r.random() < 0.5:
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
            outcome = "ended by the daemon"
        except OSError as e:
            outcome = f"ended: {e.strerror}"
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        s.close()


def good_client(d: LocalDaemon) -> str:
    t = subprocess.Popen([str(TARGET), "--mb", "16", "--socket", str(d.sock)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        ready = t.stdout.readline().split()
        sid = dict(kv.split("=") for kv in ready[1:])["session"]
        (d.mnt / "sessions" / sid / "ctl").write_text("evict\n")
        t.stdin.write("verify\n")
        t.stdin.flush()
        return t.stdout.readline().strip()
    finally:
        t.kill()
        t.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="memfs bench fuzz", description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=100_000, help="frames to send in all (default 100000)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", type=Path, help="write the figures as Markdown here (bench/FUZZ.md)")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    with LocalDaemon("--policy", "off", "--access-source", "none", "-v", prefix="memfs-fuzz-", log_to_file=True) as d:
        fz = Fuzzer(str(d.sock), rng)
        for _ in range(20):  # the daemon's own descriptors and memory settle first
            fz.connection()
        time.sleep(1)
        fds0, rss0 = len(os.listdir(f"/proc/{d.pid}/fd")), status(d.pid, "VmRSS")
        fz.frames = 0
        t0 = time.monotonic()
        conns = 0
        while fz.frames < args.frames:
            fz.connection()
            conns += 1
        elapsed = time.monotonic() - t0
        deadline = time.monotonic() + 10  # sessions still ending
        while time.monotonic() < deadline and len(os.listdir(f"/proc/{d.pid}/fd")) > fds0 + FD_SLACK:
            time.sleep(0.2)
        alive = d.proc.poll() is None
        fds1 = len(os.listdir(f"/proc/{d.pid}/fd")) if alive else -1
        if fds1 > fds0 + FD_SLACK:
            kinds: dict[str, int] = {}
            for fd in os.listdir(f"/proc/{d.pid}/fd"):
                try:
                    k = os.readlink(f"/proc/{d.pid}/fd/{fd}")
                    k = k if k.startswith("anon_inode") else k.split(":")[0].split("[")[0]
                except OSError:
                    continue
                kinds[k] = kinds.get(k, 0) + 1
            print("descriptors left:", kinds, "sessions:", os.listdir(d.mnt / "sessions"))
        rss1 = status(d.pid, "VmRSS") if alive else -1
        hwm = status(d.pid, "VmHWM") if alive else -1
        verify = good_client(d) if alive else "daemon gone"
        log_text = (d.work / "daemon.log").read_text()
        refused = log_text.count("refused")
    ok = alive and fds1 <= fds0 + FD_SLACK and rss1 - rss0 <= RSS_SLACK_MB * 1024 and "bad=0" in verify
    rows = [("frames sent", f"{fz.frames}"), ("connections", f"{conns}"), ("seconds", f"{elapsed:.1f}"),
            ("frames a second", f"{fz.frames / elapsed:.0f}"), ("handshakes refused (daemon log)", f"{refused}"),
            ("daemon alive after", "yes" if alive else "NO"),
            ("daemon descriptors before / after", f"{fds0} / {fds1} (bound: +{FD_SLACK})"),
            ("daemon RSS before / after / peak", f"{rss0 // 1024} / {rss1 // 1024} / {hwm // 1024} MiB "
                                                 f"(bound: +{RSS_SLACK_MB} MiB)"),
            ("a good client afterwards", verify),
            ("verdict", "passed" if ok else "FAILED")]
    text = "\n".join(f"{k}: {v}" for k, v in rows)
    print(text)
    print("how connections ended: " + ", ".join(f"{k} {v}" for k, v in sorted(fz.outcomes.items())))
    if args.out:
        cmd = " ".join(["python3 -m memfs bench fuzz", *(argv if argv is not None else sys.argv[1:])])
        table = "\n".join(f"| {k} | {v} |" for k, v in rows)
        args.out.write_text(f"# Socket fuzz run\n\nGenerated by `{cmd}` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                            f" (seed {args.seed}).\n\n| | |\n|---|---|\n{table}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
