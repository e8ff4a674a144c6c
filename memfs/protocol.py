"""Protocol v2 between a target and the daemon: framing and validation.

The wire format is specified in native/include/predicomp_proto.h (the C
client includes it); this module mirrors it for the daemon, and
tests/test_protocol.py checks the two agree.  Nothing here does I/O:
`FrameReader` turns received bytes and file descriptors into `Frame`s,
the encode_* functions build replies.  Any violation raises
`ProtocolError` carrying the errno to send back in ERR.
"""
from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field
from typing import Iterable

MAGIC = 0x50434D50
VERSION = 2
HEADER = struct.Struct("=IHHII")  # magic, version, type, length, seq
HEADER_SIZE = HEADER.size
MAX_PAYLOAD = 65536
MAX_RANGES = 1024
MAX_ERR_TEXT = 1024
DEFAULT_SOCKET = "/run/memfs/memfs.sock"
PAGE_SIZE = 4096

HELLO, RANGE, START, STOP, PREFETCH, EVICT_DONE, SAMPLE_DONE = 1, 2, 3, 4, 5, 6, 7
RESUME, FORGET, ADOPT = 8, 9, 10
ACK, ERR, EVICT, SAMPLE = 64, 65, 66, 67
NAMES = {HELLO: "HELLO", RANGE: "RANGE", START: "START", STOP: "STOP",
         PREFETCH: "PREFETCH", EVICT_DONE: "EVICT_DONE", SAMPLE_DONE: "SAMPLE_DONE",
         RESUME: "RESUME", FORGET: "FORGET", ADOPT: "ADOPT", ACK: "ACK",
         ERR: "ERR", EVICT: "EVICT", SAMPLE: "SAMPLE"}
FDS_TAKEN = {START: 1, RESUME: 2}  # the messages that carry descriptors, and how many

CAP_AGENT = 0x1
CAP_PREFETCH = 0x2
CAP_STAGING = 0x4
RANGE_ANON_PRIVATE = 0x1
RANGE_WRITABLE = 0x2
RANGE_STAGING = 0x4
STAGING_MAX_PAGES = 65536
STORE_MAX_RANGES = 4096  # PCS_MAX_RANGES: a range's index in a session (RESUME gives the old one)

HELLO_BODY = struct.Struct("=IIQII")  # pid, nranges, caps, page_size, reserved
RANGE_BODY = struct.Struct("=QQII")  # addr, length, flags, index
START_BODY = struct.Struct("=Q")  # uffd_features
PREFETCH_BODY = struct.Struct("=QQ")  # addr, length
ACK_BODY = struct.Struct("=IIQ")  # acked_type, acked_seq, value
ERR_BODY = struct.Struct("=iIII")  # err, acked_seq, text_len, reserved
ADDR_RUN = struct.Struct("=QQ")
EVICT_BODY = struct.Struct("=QII")  # request_id, nruns, flags
EVICT_DONE_BODY = struct.Struct("=QiIQ")  # request_id, status, reserved, bytes_done
EVICT_MAX_RUNS = (MAX_PAYLOAD - EVICT_BODY.size) // ADDR_RUN.size
SAMPLE_BODY = struct.Struct("=QII")  # request_id, nmoves, flags
MOVE = struct.Struct("=QQ")  # src, dst
SAMPLE_DONE_BODY = struct.Struct("=QII")  # request_id, nmoves, nmoved; then a bitmap
SAMPLE_ZAP_STAGING = 0x1
SAMPLE_MAX_MOVES = (MAX_PAYLOAD - SAMPLE_BODY.size) // MOVE.size
RESUME_BODY = struct.Struct("=QQQQQII")  # uffd_features, old_session, takeovers, agent_faults, resumes, nforget, reserved
FORGET_BODY = struct.Struct("=II")  # nruns, reserved
FORGET_RUN = struct.Struct("=IIQQ")  # range, reserved, first, count
FORGET_MAX_RUNS = (MAX_PAYLOAD - FORGET_BODY.size) // FORGET_RUN.size
MAX_FORGET_RUNS = 1 << 20


class ProtocolError(Exception):
    """A message broke the protocol; `err` is the errno for the ERR reply."""

    def __init__(self, err: int, text: str, seq: int = 0):
        super().__init__(text)
        self.err = err
        self.text = text
        self.seq = seq


@dataclass
class Hello:
    pid: int
    nranges: int
    caps: int


@dataclass
class Range:
    addr: int
    length: int
    flags: int
    index: int


@dataclass
class Start:
    uffd_features: int
    fd: int


@dataclass
class Resume:
    uffd_features: int
    old_session: int
    takeovers: int
    agent_faults: int
    resumes: int
    nforget: int
    uffd: int
    store: int


@dataclass
class Prefetch:
    addr: int
    length: int


@dataclass
class EvictDone:
    request_id: int
    status: int
    bytes_done: int


@dataclass
class SampleDone:
    request_id: int
    moved: bytes  # bit i: move i happened


# what a frame carries, by type (FORGET: its runs as (range, first, count))
Body = Hello | Range | Start | Resume | Prefetch | EvictDone | SampleDone | list[tuple[int, int, int]] | None


@dataclass
class Frame:
    type: int
    seq: int
    body: Body = None
    taken: bool = False  # its descriptors were handed on: whoever took them closes them

    def fds(self) -> list[int]:
        if self.type == START:
            return [self.body.fd]
        if self.type == RESUME:
            return [self.body.uffd, self.body.store]
        return []

    def close_fds(self) -> None:
        """Close the descriptors this frame carries, unless they were taken."""
        if not self.taken:
            for fd in self.fds():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.taken = True


def _exact(payload: bytes, st: struct.Struct, name: str, seq: int) -> tuple:
    if len(payload) != st.size:
        raise ProtocolError(errno.EINVAL, f"{name}: payload is {len(payload)} bytes, expected {st.size}", seq)
    return st.unpack(payload)


def _take_fds(fds: list[int], n: int, name: str, what: str, seq: int) -> list[int]:
    """The n descriptors a message carries; any others ride along by mistake."""
    if len(fds) != n:
        raise ProtocolError(errno.EBADF, f"{name} without {what} (SCM_RIGHTS: {len(fds)} descriptors, expected {n})", seq)
    taken = fds[:]
    fds.clear()
    return taken


def decode_body(ftype: int, seq: int, payload: bytes, fds: list[int]) -> Frame:
    """Validate one frame's payload; START takes its fd from `fds`."""
    if ftype == HELLO:
        pid, nranges, caps, page_size, reserved = _exact(payload, HELLO_BODY, "HELLO", seq)
        if page_size != PAGE_SIZE:
            raise ProtocolError(errno.EINVAL, f"HELLO: page size {page_size}, only {PAGE_SIZE} is supported", seq)
        data_ranges = nranges - (1 if caps & CAP_STAGING else 0)
        if not 1 <= data_ranges <= MAX_RANGES:
            raise ProtocolError(errno.EINVAL, f"HELLO: {data_ranges} ranges, must be 1..{MAX_RANGES}"
                                + (" and the staging area" if caps & CAP_STAGING else ""), seq)
        if reserved or caps & ~(CAP_AGENT | CAP_PREFETCH | CAP_STAGING):
            raise ProtocolError(errno.EINVAL, f"HELLO: unknown capability bits 0x{caps:x}", seq)
        if caps & CAP_STAGING and not caps & CAP_AGENT:
            raise ProtocolError(errno.EINVAL, "HELLO: CAP_STAGING without CAP_AGENT (the agent makes the moves)", seq)
        return Frame(ftype, seq, Hello(pid, nranges, caps))
    if ftype == RANGE:
        addr, length, flags, index = _exact(payload, RANGE_BODY, "RANGE", seq)
        return Frame(ftype, seq, Range(addr, length, flags, index))
    if ftype == START:
        (features,) = _exact(payload, START_BODY, "START", seq)
        (fd,) = _take_fds(fds, 1, "START", "a userfaultfd", seq)
        return Frame(ftype, seq, Start(features, fd))
    if ftype == RESUME:
        features, old, takeovers, agent_faults, resumes, nforget, _ = _exact(payload, RESUME_BODY, "RESUME", seq)
        uffd, store = _take_fds(fds, 2, "RESUME", "a userfaultfd and the old store", seq)
        return Frame(ftype, seq, Resume(features, old, takeovers, agent_faults, resumes, nforget, uffd, store))
    if ftype == FORGET:
        if len(payload) < FORGET_BODY.size:
            raise ProtocolError(errno.EINVAL, "FORGET: payload too short", seq)
        (nruns, _) = FORGET_BODY.unpack_from(payload)
        if len(payload) != FORGET_BODY.size + nruns * FORGET_RUN.size:
            raise ProtocolError(errno.EINVAL, f"FORGET: {len(payload)} bytes for {nruns} runs", seq)
        runs = [(r, first, count) for r, _, first, count in FORGET_RUN.iter_unpack(payload[FORGET_BODY.size:])]
        return Frame(ftype, seq, runs)
    if ftype == ADOPT:
        if payload:
            raise ProtocolError(errno.EINVAL, "ADOPT carries no payload", seq)
        return Frame(ftype, seq)
    if ftype == STOP:
        if payload:
            raise ProtocolError(errno.EINVAL, "STOP carries no payload", seq)
        return Frame(ftype, seq)
    if ftype == PREFETCH:
        addr, length = _exact(payload, PREFETCH_BODY, "PREFETCH", seq)
        return Frame(ftype, seq, Prefetch(addr, length))
    if ftype == EVICT_DONE:
        rid, status, _, done = _exact(payload, EVICT_DONE_BODY, "EVICT_DONE", seq)
        return Frame(ftype, seq, EvictDone(rid, status, done))
    if ftype == SAMPLE_DONE:
        if len(payload) < SAMPLE_DONE_BODY.size:
            raise ProtocolError(errno.EINVAL, "SAMPLE_DONE: payload too short", seq)
        rid, nmoves, _ = SAMPLE_DONE_BODY.unpack_from(payload)
        bitmap = payload[SAMPLE_DONE_BODY.size:]
        if len(bitmap) != (nmoves + 7) // 8:
            raise ProtocolError(errno.EINVAL, f"SAMPLE_DONE: {len(bitmap)} bitmap bytes for {nmoves} moves", seq)
        return Frame(ftype, seq, SampleDone(rid, bytes(bitmap)))
    raise ProtocolError(errno.EPROTO, f"unknown message type {ftype}", seq)


@dataclass
class FrameReader:
    """Accumulates received bytes and fds; yields complete, validated frames."""

    buf: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)

    def feed(self, data: bytes, fds: Iterable[int] = ()) -> None:
        self.buf += data
        self.fds.extend(fds)

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes arrive."""
        if len(self.buf) < HEADER_SIZE:
            # An fd arrives with the bytes of the frame it rides on, together
            # with the frames received before it; with no frame incomplete, an
            # fd left over was attached to a frame that takes none.
            if not self.buf and self.fds:
                raise ProtocolError(errno.EINVAL, "file descriptor attached to a message that takes none")
            return None
        magic, version, ftype, length, seq = HEADER.unpack_from(self.buf)
        if magic != MAGIC:
            raise ProtocolError(errno.EPROTO, f"bad magic 0x{magic:08x}: not a memfs client")
        if version != VERSION:
            raise ProtocolError(errno.EPROTONOSUPPORT, f"protocol version {version}, this daemon speaks {VERSION}", seq)
        if length > MAX_PAYLOAD:
            raise ProtocolError(errno.EMSGSIZE, f"{NAMES.get(ftype, ftype)}: payload of {length} bytes exceeds {MAX_PAYLOAD}", seq)
        if len(self.buf) < HEADER_SIZE + length:
            return None
        payload = bytes(self.buf[HEADER_SIZE:HEADER_SIZE + length])
        del self.buf[:HEADER_SIZE + length]
        if ftype not in FDS_TAKEN and self.fds and not self.buf:
            # descriptors come with the bytes of the message they ride on, the last received
            raise ProtocolError(errno.EINVAL, f"file descriptor attached to {NAMES.get(ftype, ftype)}, which takes none", seq)
        return decode_body(ftype, seq, payload, self.fds)

    def pending(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest."""
        return len(self.buf)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()


def frame(ftype: int, seq: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(MAGIC, VERSION, ftype, len(payload), seq) + payload


def encode_ack(seq: int, acked_type: int, acked_seq: int, value: int = 0) -> bytes:
    return frame(ACK, seq, ACK_BODY.pack(acked_type, acked_seq, value))


def encode_err(seq: int, err: int, text: str, acked_seq: int = 0) -> bytes:
    data = text.encode("utf-8", "replace")[:MAX_ERR_TEXT]
    return frame(ERR, seq, ERR_BODY.pack(err, acked_seq, len(data), 0) + data)


def encode_sample(seq: int, request_id: int, moves: list[tuple[int, int]], zap: bool) -> bytes:
    if len(moves) > SAMPLE_MAX_MOVES:
        raise ValueError("too many moves for one SAMPLE")
    body = SAMPLE_BODY.pack(request_id, len(moves), SAMPLE_ZAP_STAGING if zap else 0)
    return frame(SAMPLE, seq, body + b"".join(MOVE.pack(s, d) for s, d in moves))


def encode_evict(seq: int, request_id: int, runs: list[tuple[int, int]]) -> bytes:
    if len(runs) > EVICT_MAX_RUNS:
        raise ValueError("too many runs for one EVICT")
    body = EVICT_BODY.pack(request_id, len(runs), 0) + b"".join(ADDR_RUN.pack(a, n) for a, n in runs)
    return frame(EVICT, seq, body)
