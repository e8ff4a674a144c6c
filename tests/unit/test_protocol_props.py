"""The protocol decoder on any bytes: a frame or ProtocolError, never anything else,
and the same frames however the bytes are cut (property tests, no root needed)."""
from __future__ import annotations

import errno
import os

from hypothesis import given, settings
from hypothesis import strategies as st

from memfs import protocol

TYPES = sorted(protocol.NAMES)


def frames_of(chunks, fds_at=()) -> list:
    """Feed chunks to a reader; the frames, and the first ProtocolError if any."""
    r = protocol.FrameReader()
    out = []
    try:
        for i, c in enumerate(chunks):
            r.feed(c, [os.dup(0)] if i in fds_at else [])
            while (f := r.next_frame()) is not None:
                out.append((f.type, f.seq, repr(f.body)))
                for fd in (getattr(f.body, "fd", None), getattr(f.body, "uffd", None), getattr(f.body, "store", None)):
                    if fd is not None:
                        os.close(fd)
    except protocol.ProtocolError as e:
        assert e.err > 0 and e.text
        out.append(("error", e.err))
    finally:
        r.close_fds()
    return out


def header(ftype: int, length: int, seq: int = 1, magic: int = protocol.MAGIC, version: int = protocol.VERSION) -> bytes:
    return protocol.HEADER.pack(magic, version, ftype, length, seq)


payloads = st.one_of(
    st.binary(max_size=96),
    st.builds(lambda pid, n, caps, ps: protocol.HELLO_BODY.pack(pid, n, caps, ps, 0),
              st.integers(0, 2**32 - 1), st.integers(0, 5000), st.integers(0, 2**64 - 1),
              st.sampled_from([4096, 0, 8192])),
    st.builds(lambda a, n, f, i: protocol.RANGE_BODY.pack(a, n, f, i),
              st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
    st.builds(lambda n, runs: protocol.FORGET_BODY.pack(n, 0) + runs, st.integers(0, 5000), st.binary(max_size=200)),
)


@st.composite
def streams(draw):
    """A byte stream of plausible frames, some of them damaged, cut anywhere."""
    data = b""
    for _ in range(draw(st.integers(1, 6))):
        body = draw(payloads)
        ftype = draw(st.sampled_from(TYPES + [0, 11, 63, 99, 65535]))
        length = draw(st.one_of(st.just(len(body)), st.integers(0, 2**32 - 1)))
        magic = draw(st.sampled_from([protocol.MAGIC, protocol.MAGIC ^ 1]))
        version = draw(st.sampled_from([protocol.VERSION, protocol.VERSION + 1, 1]))
        data += header(ftype, length, magic=magic, version=version) + body
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=8)))
    return [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]


@given(streams())
@settings(max_examples=400, deadline=None)
def test_any_stream_gives_frames_or_a_protocol_error(chunks):
    frames_of(chunks)  # anything but ProtocolError fails the test


@given(streams(), st.data())
@settings(max_examples=300, deadline=None)
def test_the_frames_do_not_depend_on_how_the_bytes_were_cut(chunks, data):
    whole = b"".join(chunks)
    assert frames_of(chunks) == frames_of([whole])


@given(st.sampled_from([t for t in TYPES if t not in protocol.FDS_TAKEN]), st.binary(max_size=64))
def test_a_descriptor_on_a_message_that_takes_none_is_refused(ftype, body):
    out = frames_of([header(ftype, len(body)) + body], fds_at={0})
    assert out and out[-1] == ("error", errno.EINVAL) or out[-1][0] == "error"


@given(st.integers(protocol.MAX_PAYLOAD + 1, 2**32 - 1))
def test_an_oversized_length_is_emsgsize_before_any_payload(length):
    assert frames_of([header(protocol.HELLO, length)]) == [("error", errno.EMSGSIZE)]


@given(st.integers(0, protocol.MAX_RANGES + 2), st.booleans())
def test_hello_takes_one_to_1024_ranges_and_the_staging_area(n, staging):
    caps = protocol.CAP_AGENT | (protocol.CAP_STAGING if staging else 0)
    body = protocol.HELLO_BODY.pack(1, n, caps, 4096, 0)
    out = frames_of([header(protocol.HELLO, len(body)) + body])
    data_ranges = n - (1 if staging else 0)
    if 1 <= data_ranges <= protocol.MAX_RANGES:
        assert out[0][0] == protocol.HELLO
    else:
        assert out == [("error", errno.EINVAL)]


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=50),
       st.integers(0, 2**64 - 1))
def test_evict_encodes_what_the_header_says(runs, rid):
    f = protocol.encode_evict(7, rid, runs)
    magic, version, ftype, length, seq = protocol.HEADER.unpack_from(f)
    assert (magic, version, ftype, seq) == (protocol.MAGIC, protocol.VERSION, protocol.EVICT, 7)
    assert length == len(f) - protocol.HEADER_SIZE == protocol.EVICT_BODY.size + 16 * len(runs)
