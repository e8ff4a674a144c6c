"""A hostile client: speaks the protocol by hand, as any local user could.

    attacker.py SOCKET flood N
        Opens N connections and holds them; prints how many are still open and
        the errnos of those refused.

    attacker.py SOCKET leak N
        Sessions that end badly, with descriptors the daemon must not keep
        (see leak()); prints how each ended.

    attacker.py SOCKET reuse
        Connects (as process P), forks C, and P exits.  C waits for a line
        "PID ADDR LENGTH" on stdin (a process that got P's pid since, and a
        range of its memory), then sends HELLO naming PID, a RANGE there and
        START with its own userfaultfd (UFFD_USER_MODE_ONLY: no privilege
        needed), and prints what the daemon answered: "REPLY ERR errno text"
        or "REPLY ACK session".
"""
import ctypes
import os
import socket
import struct
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from memfs import protocol  # noqa: E402

UFFD_USER_MODE_ONLY = 1
UFFDIO_API = 0xC018AA3F


def userfaultfd() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK | UFFD_USER_MODE_ONLY)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    import fcntl
    fcntl.ioctl(fd, UFFDIO_API, bytearray(struct.pack("=QQQ", 0xAA, 1, 0)))
    return fd


def reply(sock) -> str:
    buf = b""
    while len(buf) < protocol.HEADER_SIZE:
        chunk = sock.recv(65536)
        if not chunk:
            return "REPLY EOF"
        buf += chunk
    _, _, ftype, length, _ = protocol.HEADER.unpack_from(buf)
    while len(buf) < protocol.HEADER_SIZE + length:
        buf += sock.recv(65536)
    body = buf[protocol.HEADER_SIZE:protocol.HEADER_SIZE + length]
    if ftype == protocol.ERR:
        err, _, n, _ = protocol.ERR_BODY.unpack_from(body)
        text = body[protocol.ERR_BODY.size:protocol.ERR_BODY.size + n].decode(errors="replace")
        return f"REPLY ERR {err} {text}"
    if ftype == protocol.ACK:
        return f"REPLY ACK {protocol.ACK_BODY.unpack(body)[2]}"
    return f"REPLY {ftype}"


def reuse(path: str) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    if os.fork():
        print(f"P {os.getpid()}", flush=True)
        os._exit(0)  # P leaves; its pid may be handed to anyone now
    line = sys.stdin.readline().split()
    pid, addr, length = int(line[0]), int(line[1], 0), int(line[2])
    seq = iter(range(1, 100))
    try:
        sock.sendall(protocol.frame(protocol.HELLO, next(seq), protocol.HELLO_BODY.pack(pid, 1, protocol.CAP_AGENT, 4096, 0)))
        sock.sendall(protocol.frame(protocol.RANGE, next(seq), protocol.RANGE_BODY.pack(addr, length, 3, 0)))
        fd = userfaultfd()
        sock.sendmsg([protocol.frame(protocol.START, next(seq), protocol.START_BODY.pack(1))],
                     [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", fd))])
    except (BrokenPipeError, ConnectionResetError):
        pass  # refused early: the answer is waiting to be read
    print(reply(sock), flush=True)




def flood(path: str, n: str) -> None:
    """Open n connections and keep them; print how many the daemon refused at once
    (ERR, with its errno) and how many it left open, then hold them until stdin ends."""
    import select
    socks, refused = [], {}
    for _ in range(int(n)):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(0.05)  # a daemon that accepts no more leaves us in its backlog
        try:
            s.connect(path)
        except TimeoutError:
            refused["timeout"] = refused.get("timeout", 0) + 1
            s.close()
            continue
        except OSError as e:
            refused[e.errno] = refused.get(e.errno, 0) + 1
            s.close()
            continue
        s.settimeout(None)
        socks.append(s)
    answered = set()
    deadline = time.monotonic() + 1  # a refusal comes at once; a second is plenty
    while time.monotonic() < deadline and len(answered) < len(socks):
        ready, _, _ = select.select([s for s in socks if s not in answered], [], [],
                                    max(0, deadline - time.monotonic()))
        for s in ready:
            answered.add(s)
            answer = reply(s)
            if answer.startswith("REPLY ERR"):
                err = int(answer.split()[2])
                refused[err] = refused.get(err, 0) + 1
    open_ = len(socks) - sum(v for k, v in refused.items() if k != "timeout")
    print("FLOOD open=%d %s" % (open_, " ".join(f"e{k}={v}" for k, v in sorted(refused.items(), key=str))),
          flush=True)
    sys.stdin.read()


def session(sock, addr: int, length: int, uffd: int, nranges: int = 1, caps: int = protocol.CAP_AGENT) -> str:
    """HELLO, RANGE and START for [addr, addr + length) of this process; the answer."""
    sock.sendall(protocol.frame(protocol.HELLO, 1, protocol.HELLO_BODY.pack(os.getpid(), nranges, caps, 4096, 0)))
    sock.sendall(protocol.frame(protocol.RANGE, 2, protocol.RANGE_BODY.pack(addr, length, 3, 0)))
    sock.sendmsg([protocol.frame(protocol.START, 3, protocol.START_BODY.pack(1))],
                 [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", uffd))])
    return reply(sock)


def leak(path: str, n: str) -> None:
    """Sessions that end badly, n of each kind, with descriptors the daemon must not keep:
    a START whose range another userfaultfd has registered (EBUSY), and a running
    session sent a PREFETCH with three descriptors attached (EINVAL)."""
    import fcntl
    import mmap
    region = mmap.mmap(-1, 1 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(region))
    other = userfaultfd()
    fcntl.ioctl(other, 0xC020AA00, bytearray(struct.pack("=QQQQ", addr, 1 << 19, 1, 0)))  # UFFDIO_REGISTER MISSING
    answers = {}
    for i in range(int(n)):
        for kind, start in (("busy", addr), ("fds", addr + (1 << 19)), ("restart", addr + (1 << 19))):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
                uffd = userfaultfd()
                a = session(s, start, 1 << 19, uffd)
                os.close(uffd)
                if kind == "restart" and a.startswith("REPLY ACK"):
                    again = userfaultfd()  # a second START, out of order, with its descriptor
                    s.sendmsg([protocol.frame(protocol.START, 4, protocol.START_BODY.pack(1))],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("i", again))])
                    os.close(again)
                    a = reply(s)
                if kind == "fds" and a.startswith("REPLY ACK"):
                    r, w = os.pipe()
                    s.sendmsg([protocol.frame(protocol.PREFETCH, 4, protocol.PREFETCH_BODY.pack(start, 4096))],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack("3i", r, w, r))])
                    os.close(r)
                    os.close(w)
                    a = reply(s)
                key = f"{kind}:{a.split(' ', 3)[2] if a.startswith('REPLY ERR') else a}"
                answers[key] = answers.get(key, 0) + 1
    print("LEAK " + " ".join(f"{k}={v}" for k, v in sorted(answers.items())), flush=True)


if __name__ == "__main__":
    {"reuse": reuse, "flood": flood, "leak": leak}[sys.argv[2]](sys.argv[1], *sys.argv[3:])
