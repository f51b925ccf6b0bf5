"""The wire codec: every frame type round-trips byte for byte, and every
limit in the grammar refuses what it should, with a message saying what."""

import os

import msgpack
import pytest
import zstandard

from migrator.protocol.checksum import crc32c
from migrator.protocol import frames
from migrator.protocol.frames import (
    Abort, AuthChallenge, AuthResponse, AuthResult, Commit, Error, FrameReader,
    FrameTooLarge, Hello, Images, Limits, LocalProtocolError, MalformedFrame,
    PageBatch, PageDataError, Process, ProtocolError, RestoreResult, RoundEnd,
    StartMigration, SwitchOver, UnknownFrameType, VersionMismatch,
    decode_body, decode_pages, encode_frame, encode_pages, make_page_batch,
)

PS = 4096
V = frames.PROTOCOL_VERSION

EXAMPLES = [
    Hello(V, "sender", "node-a (arm64)", ("zstd", "images-v1"), "psk"),
    Hello(V, "receiver", "", (), "none"),
    AuthChallenge(bytes(range(32))),
    AuthResponse(b"\xff" * 32),
    AuthResult(True, "authenticated"),
    AuthResult(False, "wrong key\non two lines"),
    StartMigration("m-2024.1", (Process(1, "uffd-wp"), Process(4194304, "soft-dirty")), 65536),
    StartMigration("x", (Process(77, "full"),), PS),
    make_page_batch(7, [(0x1000, 2), (0x7fff_ffff_f000, 1)], os.urandom(3 * PS)),
    make_page_batch(7, [((1 << 64) - PS, 1)], b"\0" * PS),
    RoundEnd(1, 3, 1 << 40),
    SwitchOver(9, "converged"),
    Images("pagemap-1.img", b"\x00\x01", False),
    Images("core-1.img", b"", True),
    RestoreResult(True, "restored"),
    RestoreResult(False, "criu: Error (criu/cr-restore.c:1234)"),
    Commit(),
    Abort("operator: ünïcode ok"),
    Error("migrating", "process 7 vanished"),
]


def roundtrip(event, seq=5, page_size=PS):
    data = encode_frame(event, seq, page_size=page_size)
    r = FrameReader()
    r.feed(data)
    body = r.next_frame()
    assert r.next_frame() is None
    got_seq, got = decode_body(body, page_size=page_size)
    assert (got_seq, got) == (seq, event)
    assert encode_frame(got, got_seq, page_size=page_size) == data
    return data


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: type(e).__name__)
def test_roundtrip(event):
    roundtrip(event)
    roundtrip(event, seq=(1 << 64) - 1)


def test_every_type_has_an_example():
    assert {type(e) for e in EXAMPLES} == set(frames.EVENT_TYPES.values())


def test_golden_bytes():
    # length 3, fixarray(2), type 11, seq 5: the grammar, byte for byte
    assert encode_frame(Commit(), 5) == b"\x00\x00\x00\x03\x92\x0b\x05"
    assert encode_frame(RoundEnd(1, 2, 3), 0) == b"\x00\x00\x00\x06\x95\x07\x00\x01\x02\x03"


def test_lists_become_tuples():
    e = Hello(V, "sender", "a", ["zstd"], "psk")
    assert e.features == ("zstd",)
    assert hash(e)


def test_page_batch_repr_is_short():
    b = make_page_batch(1, [(0, 256)], os.urandom(256 * PS))
    assert len(repr(b)) < 120


# -- framing limits ---------------------------------------------------------

def test_oversized_length_rejected_after_four_bytes():
    r = FrameReader(Limits(max_frame=1024))
    r.feed((1025).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge, match="1025 bytes announced; the limit is 1024"):
        r.next_frame()


def test_oversized_control_frame_rejected_after_six_bytes():
    r = FrameReader(Limits(max_control_frame=100))
    r.feed((5000).to_bytes(4, "big") + b"\x93\x0c")  # an Abort of 5000 bytes
    with pytest.raises(FrameTooLarge, match="Abort frame of 5000"):
        r.next_frame()


def test_big_page_batch_frame_is_fine_for_the_reader():
    r = FrameReader(Limits(max_control_frame=100))
    r.feed((5000).to_bytes(4, "big") + b"\x97\x06")
    assert r.next_frame() is None


@pytest.mark.parametrize("n", [0, 1, 2])
def test_tiny_frames(n):
    r = FrameReader()
    r.feed(n.to_bytes(4, "big") + b"\x90" * n)
    with pytest.raises(MalformedFrame, match="at least 3"):
        r.next_frame()


def test_truncation_then_eof():
    data = encode_frame(Abort("x"), 0)
    for cut in range(1, len(data)):
        r = FrameReader()
        r.feed(data[:cut])
        assert r.next_frame() is None
        r.feed(b"")
        with pytest.raises(frames.ConnectionLost):
            r.next_frame()


def test_byte_by_byte():
    data = b"".join(encode_frame(e, i, page_size=PS) for i, e in enumerate(EXAMPLES))
    r = FrameReader()
    out = []
    for i in range(len(data)):
        r.feed(data[i:i + 1])
        f = r.next_frame()
        if f is not None:
            out.append(decode_body(f, page_size=PS)[1])
    assert out == EXAMPLES


# -- bodies -------------------------------------------------------------------

def body(*items):
    return msgpack.packb(list(items))


@pytest.mark.parametrize("raw, error, match", [
    (b"\x80\x01\x00", MalformedFrame, "fixarray"),
    (b"\x92\xcc\x00", MalformedFrame, "fixint"),
    (body(99, 0), UnknownFrameType, "unknown frame type 99"),
    (b"\x92\x0b\xa1", MalformedFrame, "sequence number"),
    (b"\x92\x0b\xcd\x01", MalformedFrame, "inside its sequence"),
    (body(11, 0) + b"\x00", MalformedFrame, "not valid msgpack"),
    (b"\x93\x0c\x00\xda\xff", MalformedFrame, "not valid msgpack"),
    (body(11, -1), MalformedFrame, "sequence number"),
    (body(11, 0, 1), MalformedFrame, "has 1 fields, expected 0"),
    (body(12, 0, 5), MalformedFrame, "Abort.reason must be a string"),
    (body(12, 0, "bell\x07"), MalformedFrame, "control characters"),
    (body(12, 0, "x" * 5000), MalformedFrame, "msgpack"),
    (body(12, 0, {"a": 1}), MalformedFrame, "msgpack"),
    (body(12, 0, msgpack.ExtType(1, b"x")), MalformedFrame, "msgpack"),
    (body(4, 0, 1, ""), MalformedFrame, "AuthResult.ok must be a boolean"),
    (body(7, 0, True, 0, 0), MalformedFrame, "RoundEnd.round must be an unsigned"),
    (body(7, 0, 1.0, 0, 0), MalformedFrame, "RoundEnd.round must be an unsigned"),
    (body(7, 0, None, 0, 0), MalformedFrame, "RoundEnd.round"),
    (body(2, 0, b"short"), MalformedFrame, "nonce must be 32 bytes"),
    (body(2, 0, "x" * 32), MalformedFrame, "nonce must be bytes"),
    (body(1, 0, 7, "sender", "a", [], "psk"), VersionMismatch, "version 7"),
    (body(1, 0, V, "boss", "a", [], "psk"), MalformedFrame, "Hello.role"),
    (body(1, 0, V, "sender", "a", [], "maybe"), MalformedFrame, "Hello.auth"),
    (body(1, 0, V, "sender", "a", ["zstd", "zstd"], "psk"), MalformedFrame, "twice"),
    (body(1, 0, V, "sender", "a", ["a b"], "psk"), MalformedFrame, "features"),
    (body(5, 0, "m", [], PS), MalformedFrame, "non-empty"),
    (body(5, 0, "m", [[1, "full"], [1, "full"]], PS), MalformedFrame, "pid twice"),
    (body(5, 0, "m", [[0, "full"]], PS), MalformedFrame, "pid must be in"),
    (body(5, 0, "m", [[1]], PS), MalformedFrame, "pair"),
    (body(5, 0, "m", [[1, "full"]], 3000), MalformedFrame, "power of two"),
    (body(5, 0, "../m", [[1, "full"]], PS), MalformedFrame, "migration_id"),
    (body(9, 0, "../../etc/passwd", b"", True), MalformedFrame, "Images.name"),
    (body(9, 0, "..", b"", True), MalformedFrame, "Images.name"),
    (body(9, 0, "a/b", b"", True), MalformedFrame, "Images.name"),
    (body(9, 0, "", b"", True), MalformedFrame, "Images.name"),
])
def test_malformed_bodies(raw, error, match):
    with pytest.raises(error, match=match):
        decode_body(raw, page_size=PS)


def runs(*pairs):
    return b"".join(frames._RUN.pack(a, n) for a, n in pairs)


@pytest.mark.parametrize("r, data, codec, match", [
    (runs((1, 1)), b"\0" * PS, "raw", "not aligned"),
    (runs((0, 0)), b"", "raw", "empty"),
    (b"", b"", "raw", "no runs"),
    (runs((0, 1))[:-1], b"\0" * PS, "raw", "16-byte"),
    (runs(((1 << 64) - PS, 2)), b"\0" * 2 * PS, "raw", "past the end"),
    (runs((PS, 1), (0, 1)), b"\0" * 2 * PS, "raw", "ascend"),
    (runs((0, 2), (PS, 1)), b"\0" * 3 * PS, "raw", "overlaps"),
    (runs((0, 9000)), b"", "raw", "more than 8192 pages"),
    (runs((0, 1)), b"\0" * (PS - 1), "raw", "carries 4095 bytes"),
    (runs((0, 1)), b"\0" * PS, "lz4", "codec 'lz4' is unknown"),
    (runs((0, 1)), b"\0" * PS, "zstd", "not smaller"),
])
def test_bad_page_batches(r, data, codec, match):
    with pytest.raises(MalformedFrame, match=match):
        decode_body(body(6, 0, 1, r, codec, data, 0), page_size=PS)


def test_page_batch_needs_page_size():
    raw = encode_frame(EXAMPLES[8], 0, page_size=PS)[4:]
    with pytest.raises(MalformedFrame, match="page size is known"):
        decode_body(raw)


def test_batch_byte_limit():
    lim = Limits(max_batch_bytes=2 * PS)
    with pytest.raises(MalformedFrame, match="covers 12288 bytes"):
        decode_body(body(6, 0, 1, runs((0, 3)), "raw", b"\0" * 3 * PS, 0), lim, PS)


def test_control_frame_body_limit():
    lim = Limits(max_control_frame=64)
    with pytest.raises(FrameTooLarge):
        decode_body(body(12, 0, "x" * 100), lim)


def test_deep_nesting_is_refused():
    raw = b"\x93\x0c\x00" + b"\x91" * 100000 + b"\x00"
    with pytest.raises(MalformedFrame):
        decode_body(raw)


# -- encoding is checked too, as our fault ------------------------------------------

@pytest.mark.parametrize("event", [
    Abort(5),
    Abort("x" * 5000),
    Images("a/b", b"", True),
    RoundEnd(-1, 0, 0),
    StartMigration("m", (), PS),
    Hello(V, "sender", "a", ("zstd",), "maybe"),
    PageBatch(1, ((0, 1),), "raw", b"short", 0),
])
def test_invalid_events_are_local_errors(event):
    with pytest.raises(LocalProtocolError, match="cannot send invalid"):
        encode_frame(event, 0, page_size=PS)


def test_frame_too_large_to_send():
    lim = Limits(max_frame=1 << 12)
    with pytest.raises(LocalProtocolError, match="send smaller pieces"):
        encode_frame(Images("big.img", b"x" * 5000, True), 0, lim)


def test_limits_validated():
    with pytest.raises(ValueError):
        Limits(max_frame=0)
    with pytest.raises(ValueError):
        Limits(max_frame=1 << 32)


# -- pages ------------------------------------------------------------------------

def test_encode_pages_codecs():
    zeros = b"\0" * 4 * PS
    assert encode_pages(zeros, None) == ("raw", zeros)
    codec, payload = encode_pages(zeros, 3)
    assert codec == "zstd" and len(payload) < 100
    rnd = os.urandom(4 * PS)
    assert encode_pages(rnd, 19) == ("raw", rnd)
    assert encode_pages(zeros, -5)[0] == "zstd"
    with pytest.raises(LocalProtocolError):
        encode_pages(zeros, 99)


@pytest.mark.parametrize("level", [None, -3, 1, 3, 19])
@pytest.mark.parametrize("page_size", [PS, 65536])
def test_pages_roundtrip(level, page_size):
    data = (b"abc" * page_size)[: 3 * page_size]
    b = make_page_batch(1, [(0, 2), (10 * page_size, 1)], data, level)
    assert decode_pages(b, page_size) == data


def test_bad_checksum():
    b = make_page_batch(1, [(0, 1)], b"\1" * PS)
    with pytest.raises(PageDataError, match="checksum mismatch"):
        decode_pages(PageBatch(b.pid, b.runs, b.codec, b.data, b.checksum ^ 1), PS)


def test_wrong_decompressed_size():
    payload = zstandard.ZstdCompressor().compress(b"\0" * 2 * PS)
    b = PageBatch(1, ((0, 1),), "zstd", payload, crc32c(b"\0" * PS))
    with pytest.raises(PageDataError, match="declares 8192 bytes; its runs cover 4096"):
        decode_pages(b, PS)


def test_zstd_without_declared_size():
    payload = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * PS)
    b = PageBatch(1, ((0, 1),), "zstd", payload, crc32c(b"\0" * PS))
    with pytest.raises(PageDataError, match="declares no size"):
        decode_pages(b, PS)


def _bomb(size, declare):
    c = zstandard.ZstdCompressor(level=1, write_content_size=declare)
    obj = c.compressobj(size=size if declare else -1)
    chunk = b"\0" * (1 << 20)
    out = [obj.compress(chunk) for _ in range(size >> 20)]
    out.append(obj.flush())
    return b"".join(out)


@pytest.mark.parametrize("declare", [True, False])
def test_zstd_bomb(declare):
    payload = _bomb(1 << 30, declare)   # 1 GiB of zeros in 32 KiB
    assert len(payload) < 16 * PS
    b = PageBatch(1, ((0, 16),), "zstd", payload, 0)
    with pytest.raises(PageDataError, match="declares"):
        decode_pages(b, PS)


def test_zstd_lying_header():
    # A frame that declares one page but holds two: patch the 2-byte frame
    # content size field (stored as size - 256) in the header.
    payload = bytearray(zstandard.ZstdCompressor(level=1).compress(b"\0" * 2 * PS))
    fhd = payload[4]
    assert fhd >> 6 == 1 and fhd & 0x20  # 2-byte size, single segment
    payload[5:7] = (PS - 256).to_bytes(2, "little")
    assert zstandard.frame_content_size(bytes(payload)) == PS
    b = PageBatch(1, ((0, 1),), "zstd", bytes(payload), crc32c(b"\0" * PS))
    with pytest.raises(PageDataError):
        decode_pages(b, PS)


def test_zstd_trailing_data():
    one = zstandard.ZstdCompressor().compress(b"\0" * PS)
    for payload in (one + b"junk", one + one):
        b = PageBatch(1, ((0, 1),), "zstd", payload, crc32c(b"\0" * PS))
        with pytest.raises(PageDataError, match="exactly one complete frame"):
            decode_pages(b, PS)


def test_zstd_garbage():
    b = PageBatch(1, ((0, 1),), "zstd", b"not zstd at all", 0)
    with pytest.raises(PageDataError, match="frame header"):
        decode_pages(b, PS)


def test_protocol_errors_are_not_local_errors():
    assert not issubclass(LocalProtocolError, ProtocolError)
    assert not issubclass(ProtocolError, LocalProtocolError)


# -- zero-copy paths ------------------------------------------------------------

@pytest.mark.parametrize("npages", [1, 15, 16, 17, 512])
def test_page_batch_parts_are_the_plain_bytes(npages):
    data = bytearray(os.urandom(npages * PS))
    for level in (None, 3):
        b = make_page_batch(3, [(0x1000, npages)], bytes(data), level)
        view = PageBatch(b.pid, b.runs, b.codec,
                         memoryview(data) if b.codec == "raw" else b.data, b.checksum)
        for seq in (0, 200, 1 << 40):
            parts = frames.encode_body_parts(view, seq, page_size=PS)
            assert len(parts) == 3
            assert b"".join(parts) == frames.encode_body(b, seq, page_size=PS)


def test_fast_page_batch_decode_matches_generic():
    b = make_page_batch(9, [(0, 2), (8 * PS, 1)], os.urandom(3 * PS), None)
    body = bytearray(frames.encode_body(b, 7, page_size=PS))
    seq, got = decode_body(body, page_size=PS)
    assert (seq, got) == (7, b) and isinstance(got.data, memoryview)
    assert decode_pages(got, PS) == b.data
    # non-canonical but valid msgpack (seq as uint64) takes the generic path
    body2 = bytearray(body)
    body2[2:3] = b"\xcf" + (7).to_bytes(8, "big")
    assert decode_body(bytes(body2), page_size=PS) == (7, b)


def test_reader_recv_into_path():
    data = b"".join(encode_frame(e, i, page_size=PS) for i, e in enumerate(EXAMPLES))
    r = FrameReader()
    out, pos = [], 0
    while pos < len(data):
        buf = r.get_buffer()
        k = min(len(buf), 1000, len(data) - pos)
        buf[:k] = data[pos:pos + k]
        pos += k
        r.buffer_updated(k)
        while (f := r.next_frame()) is not None:
            out.append(decode_body(f, page_size=PS)[1])
    assert out == EXAMPLES


def test_page_encoder_skips_random_data():
    enc = frames.PageEncoder(3)
    rnd = os.urandom(512 * PS)
    assert enc.encode(rnd) == ("raw", rnd)
    zeros = bytes(512 * PS)
    for _ in range(enc.SKIP):
        assert enc.encode(zeros)[0] == "raw"
    codec, payload = enc.encode(zeros)
    assert codec == "zstd" and len(payload) < 1000


def test_page_encoder_batch_decodes_to_its_pages():
    enc = frames.PageEncoder(3)
    data = bytes(PS) + os.urandom(PS)
    batch = enc.batch(9, [(0x1000, 1), (0x5000, 1)], memoryview(data))
    assert (batch.pid, batch.runs, batch.codec) == (9, ((0x1000, 1), (0x5000, 1)), "zstd")
    assert decode_pages(batch, PS) == data
