"""Protocol v1: the daemon refuses bad input with the right errno and keeps serving;
the client library returns the errno its man page promises."""
from __future__ import annotations

import array
import ctypes
import errno
import fcntl
import mmap
import os
import re
import socket
import struct

import pytest
import trio

from helpers import ROOT, c_target

from memfs import protocol, selection
from memfs.client import Client

PAGE = 4096


def test_header_and_module_agree():
    text = (ROOT / "native" / "include" / "predicomp_proto.h").read_text()
    defines = dict(re.findall(r"#define (PCP_\w+) (0x[0-9a-f]+|\d+)u?\b", text))
    expect = {"PCP_MAGIC": protocol.MAGIC, "PCP_VERSION": protocol.VERSION,
              "PCP_HEADER_SIZE": protocol.HEADER_SIZE, "PCP_MAX_PAYLOAD": protocol.MAX_PAYLOAD,
              "PCP_MAX_RANGES": protocol.MAX_RANGES, "PCP_MAX_ERR_TEXT": protocol.MAX_ERR_TEXT,
              "PCP_HELLO": protocol.HELLO, "PCP_RANGE": protocol.RANGE, "PCP_START": protocol.START,
              "PCP_STOP": protocol.STOP, "PCP_PREFETCH": protocol.PREFETCH,
              "PCP_EVICT_DONE": protocol.EVICT_DONE, "PCP_ACK": protocol.ACK, "PCP_ERR": protocol.ERR,
              "PCP_EVICT": protocol.EVICT, "PCP_CAP_AGENT": protocol.CAP_AGENT,
              "PCP_CAP_PREFETCH": protocol.CAP_PREFETCH, "PCP_CAP_STAGING": protocol.CAP_STAGING,
              "PCP_RANGE_STAGING": protocol.RANGE_STAGING,
              "PCP_RANGE_ANON_PRIVATE": protocol.RANGE_ANON_PRIVATE,
              "PCP_RANGE_WRITABLE": protocol.RANGE_WRITABLE}
    assert {k: int(defines[k], 0) for k in expect} == expect
    assert f'"{protocol.DEFAULT_SOCKET}"' in text


# -- raw connections ------------------------------------------------------------------

class Raw:
    def __init__(self, sock):
        self.sock = sock
        self.seq = 0

    @classmethod
    async def connect(cls, path):
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await s.connect(path)
        return cls(s)

    async def send(self, ftype, payload=b"", fd=None, length=None):
        self.seq += 1
        hdr = protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, ftype,
                                   len(payload) if length is None else length, self.seq)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd is not None else []
        await self.sock.sendmsg([hdr + payload], anc)

    async def reply(self):
        """(type, body fields) of the daemon's next frame, or None at EOF."""
        buf = b""
        with trio.fail_after(30):
            while len(buf) < protocol.HEADER_SIZE:
                chunk = await self.sock.recv(65536)
                if not chunk:
                    return None
                buf += chunk
            _, _, ftype, length, _ = protocol.HEADER.unpack_from(buf)
            while len(buf) < protocol.HEADER_SIZE + length:
                buf += await self.sock.recv(65536)
        body = buf[protocol.HEADER_SIZE:protocol.HEADER_SIZE + length]
        if ftype == protocol.ERR:
            err, seq, n, _ = protocol.ERR_BODY.unpack_from(body)
            return ftype, (err, body[protocol.ERR_BODY.size:protocol.ERR_BODY.size + n].decode())
        if ftype == protocol.ACK:
            return ftype, protocol.ACK_BODY.unpack(body)
        return ftype, body

    async def expect_err(self, want_errno):
        r = await self.reply()
        assert r is not None and r[0] == protocol.ERR, r
        assert r[1][0] == want_errno, f"{errno.errorcode.get(r[1][0])} ({r[1][1]}), wanted {errno.errorcode[want_errno]}"
        assert await self.reply() is None, "the daemon must close the session after ERR"
        return r[1][1]


def hello(pid=None, nranges=1, caps=protocol.CAP_AGENT):
    return protocol.HELLO_BODY.pack(os.getpid() if pid is None else pid, nranges, caps, PAGE, 0)


def range_msg(addr, length, index=0, flags=protocol.RANGE_ANON_PRIVATE | protocol.RANGE_WRITABLE):
    return protocol.RANGE_BODY.pack(addr, length, flags, index)


def addr_of(buf) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


@pytest.fixture
def region():
    m = mmap.mmap(-1, 16 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    yield m
    try:
        m.close()
    except BufferError:
        pass


async def assert_daemon_serves(daemon, sock_path, targets):
    t = await targets(c_target(sock_path, 1))
    s = daemon.sessions[t.session_id]
    await s.pager.evict(selection.all_runs(s.native))
    assert await t.verify() == (t.npages, 0)


@pytest.mark.parametrize("case", ["garbage", "truncated_hello", "hello_cut_off", "huge_length",
                                  "bad_version", "wrong_pid", "range_first", "bad_index"])
async def test_bad_handshake_gets_err_and_daemon_goes_on(daemon, sock_path, targets, region, case):
    c = await Raw.connect(sock_path)
    want = {"garbage": errno.EPROTO, "truncated_hello": errno.EINVAL, "hello_cut_off": errno.EPROTO,
            "huge_length": errno.EMSGSIZE, "bad_version": errno.EPROTONOSUPPORT,
            "wrong_pid": errno.EPERM, "range_first": errno.EPROTO, "bad_index": errno.EINVAL}[case]
    if case == "garbage":
        await c.sock.send(os.urandom(64) + b"\xff" * 64)
    elif case == "truncated_hello":
        await c.send(protocol.HELLO, hello()[:8])
    elif case == "hello_cut_off":
        await c.sock.send(protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION, protocol.HELLO, 24, 1) + hello()[:10])
        c.sock.shutdown(socket.SHUT_WR)
    elif case == "huge_length":
        await c.send(protocol.HELLO, b"", length=1 << 30)
    elif case == "bad_version":
        await c.sock.send(protocol.HEADER.pack(protocol.MAGIC, protocol.VERSION + 1, protocol.HELLO, 24, 1) + hello())
    elif case == "wrong_pid":
        await c.send(protocol.HELLO, hello(pid=1))
    elif case == "range_first":
        await c.send(protocol.RANGE, range_msg(addr_of(region), len(region)))
    elif case == "bad_index":
        await c.send(protocol.HELLO, hello())
        await c.send(protocol.RANGE, range_msg(addr_of(region), len(region), index=protocol.STORE_MAX_RANGES))
    await c.expect_err(want)
    assert daemon.events.counts["sessions_refused"] >= 1
    await assert_daemon_serves(daemon, sock_path, targets)


@pytest.mark.parametrize("case", ["no_fd", "not_uffd", "unaligned", "zero_length", "overlap",
                                  "unmapped", "shared", "no_flags"])
async def test_bad_start_gets_err(daemon, sock_path, targets, region, case):
    base = addr_of(region)
    ranges = {"unaligned": [(base + 100, PAGE)], "zero_length": [(base, 0)],
              "overlap": [(base, 8 * PAGE), (base + 4 * PAGE, 8 * PAGE)]}.get(case, [(base, len(region))])
    if case == "unmapped":
        gone = mmap.mmap(-1, 4 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        ranges = [(addr_of(gone), 4 * PAGE)]
        gone.close()
    shared = None
    flags = 0 if case == "no_flags" else protocol.RANGE_ANON_PRIVATE
    if case == "shared":
        shared = mmap.mmap(-1, 4 * PAGE)  # MAP_SHARED: not private anonymous
        ranges = [(addr_of(shared), 4 * PAGE)]
    want = {"no_fd": errno.EBADF, "not_uffd": errno.EBADF, "unaligned": errno.EINVAL,
            "zero_length": errno.EINVAL, "overlap": errno.EEXIST, "unmapped": errno.EFAULT,
            "shared": errno.EINVAL, "no_flags": errno.EINVAL}[case]
    c = await Raw.connect(sock_path)
    await c.send(protocol.HELLO, hello(nranges=len(ranges)))
    for i, (a, n) in enumerate(ranges):
        await c.send(protocol.RANGE, range_msg(a, n, i, flags))
    r, w = os.pipe()
    try:
        fd = None if case == "no_fd" else (r if case == "not_uffd" else new_uffd())
        await c.send(protocol.START, protocol.START_BODY.pack(1), fd=fd)
        if fd is not None and fd not in (r,):
            os.close(fd)
        await c.expect_err(want)
    finally:
        os.close(r)
        os.close(w)
        if shared is not None:
            shared.close()
    await assert_daemon_serves(daemon, sock_path, targets)


# -- a session of this very process, to break the protocol while running -----------

UFFDIO_API = 0xC018AA3F
UFFD_API = 0xAA


def new_uffd() -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(323, os.O_CLOEXEC | os.O_NONBLOCK)  # SYS_userfaultfd on x86-64
    if fd < 0:
        raise OSError(ctypes.get_errno(), "userfaultfd")
    api = bytearray(struct.pack("=QQQ", UFFD_API, 1, 0))  # features: PAGEFAULT_FLAG_WP
    fcntl.ioctl(fd, UFFDIO_API, api)
    return fd


async def test_malformed_message_while_running_ends_only_that_session(daemon, sock_path, targets, region):
    region[:] = bytes(range(256)) * (len(region) // 256)
    c = await Raw.connect(sock_path)
    await c.send(protocol.HELLO, hello(caps=0))
    await c.send(protocol.RANGE, range_msg(addr_of(region), len(region)))
    fd = new_uffd()
    await c.send(protocol.START, protocol.START_BODY.pack(1), fd=fd)
    os.close(fd)
    ftype, (acked, _, sid) = await c.reply()
    assert ftype == protocol.ACK and acked == protocol.START and sid in daemon.sessions
    s = daemon.sessions[sid]
    assert s.mode == "wp-only"
    await s.pager.compress(selection.all_runs(s.native))
    assert s.native.range_info(0).pages_in["clean"] == 16
    await c.send(77, b"junk")
    await c.expect_err(errno.EPROTO)
    assert sid not in daemon.sessions
    # our memory was handed back: unprotected and intact
    region[0] = 255
    assert region[1:256] == bytes(range(1, 256))
    await assert_daemon_serves(daemon, sock_path, targets)


# -- the client library's errnos ----------------------------------------------------

async def test_client_library_errnos(daemon, sock_path, tmp_path):
    def check():
        out = {}
        try:
            Client(str(tmp_path / "nothing-here"))
        except OSError as e:
            out["no_socket"] = e.errno
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(str(tmp_path / "dead.sock"))  # bound, never listening: no daemon there
        try:
            Client(str(tmp_path / "dead.sock"))
        except OSError as e:
            out["no_daemon"] = e.errno
        dead.close()
        with Client(sock_path) as c:
            from memfs._client import ffi, lib
            m = mmap.mmap(-1, 8 * PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            p = ffi.from_buffer(m)
            flags = lib.PREDICOMP_CLIENT_RANGE_F_ANON_PRIVATE | lib.PREDICOMP_CLIENT_RANGE_F_WRITABLE
            out["unaligned"] = lib.predicomp_client_register_range(c._pc, p + 1, PAGE, flags, ffi.NULL)
            out["zero_len"] = lib.predicomp_client_register_range(c._pc, p, 0, flags, ffi.NULL)
            out["no_flags"] = lib.predicomp_client_register_range(c._pc, p, PAGE, 0, ffi.NULL)
            out["stop_unstarted"] = lib.predicomp_client_stop(c._pc)
            out["start_empty"] = lib.predicomp_client_start(c._pc)
            shared = mmap.mmap(-1, PAGE)
            out["shared"] = lib.predicomp_client_register_range(c._pc, ffi.from_buffer(shared), PAGE, flags, ffi.NULL)
            out["ok"] = lib.predicomp_client_register_range(c._pc, p, 4 * PAGE, flags, ffi.NULL)
            out["overlap"] = lib.predicomp_client_register_range(c._pc, p + 2 * PAGE, 4 * PAGE, flags, ffi.NULL)
            out["start"] = lib.predicomp_client_start(c._pc)
            out["start_again"] = lib.predicomp_client_start(c._pc)
            out["late_register"] = lib.predicomp_client_register_range(c._pc, p + 4 * PAGE, PAGE, flags, ffi.NULL)
            out["prefetch_outside"] = lib.predicomp_client_prefetch(c._pc, p + 6 * PAGE, PAGE)
            out["prefetch"] = lib.predicomp_client_prefetch(c._pc, p, PAGE)
            out["stop"] = lib.predicomp_client_stop(c._pc)
        return out

    out = await trio.to_thread.run_sync(check)
    assert out == {"no_socket": errno.ENOENT, "no_daemon": errno.ECONNREFUSED,
                   "unaligned": -errno.EINVAL, "zero_len": -errno.EINVAL, "no_flags": -errno.EINVAL,
                   "stop_unstarted": -errno.ENOTCONN, "start_empty": -errno.ENODATA,
                   "shared": -errno.EINVAL, "ok": 0, "overlap": -errno.EEXIST, "start": 0,
                   "start_again": -errno.EALREADY, "late_register": -errno.EBUSY,
                   "prefetch_outside": -errno.EINVAL, "prefetch": 0, "stop": 0}
