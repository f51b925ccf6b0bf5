"""Fuzzing: whatever bytes arrive, the protocol answers with events or a
ProtocolError, never another exception and never a hang."""

import os

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from migrator.protocol.checksum import crc32c
from migrator.protocol import (
    NEED_DATA, Commit, Connection, ConnectionClosed, Images, Process,
    ProtocolError, RestoreResult, RoundEnd, StartMigration, State, SwitchOver,
    make_page_batch,
)
from migrator.protocol import frames

KEY = b"fuzz-key-0123456789abcdef"
PS = 4096
NONCE = {"sender": b"S" * 32, "receiver": b"R" * 32}


def conn(role, mode):
    psk = KEY if mode == "psk" else None
    return Connection(role, psk, insecure=mode != "psk", node_name=role,
                      _nonce_source=lambda: NONCE[role])


def record(mode):
    """Bytes a sender writes in a complete migration, against a receiver
    with fixed nonces (so a fresh receiver can be fed them again)."""
    s, r = conn("sender", mode), conn("receiver", mode)
    to_r = bytearray()
    wire = {id(s): bytearray(), id(r): bytearray()}   # bytes toward each side

    def pump():
        while wire[id(s)] or wire[id(r)]:
            for dst, src in ((r, s), (s, r)):
                data = bytes(wire[id(dst)])
                wire[id(dst)].clear()
                if dst is r:
                    to_r.extend(data)
                if data:
                    dst.receive_data(data)
                while dst.next_event() is not NEED_DATA:
                    pass
                wire[id(src)] += dst.data_to_send()

    def deliver(src, dst, data):
        wire[id(dst)] += data
        pump()

    wire[id(r)] += s.start()
    wire[id(s)] += r.start()
    pump()
    assert s.state is r.state is State.READY
    data = (b"\1" * 100 + b"\0" * PS * 2)[: 2 * PS]
    for ev in (StartMigration("m", [Process(5, "full")], PS),
               make_page_batch(5, [(0, 1), (8 * PS, 1)], data),
               make_page_batch(5, [(PS, 1)], os.urandom(PS)),
               RoundEnd(1, 3, 0),
               SwitchOver(2, "converged"),
               Images("core-5.img", b"abc", True),
               RoundEnd(2, 0, 0)):
        deliver(s, r, s.send(ev))
    deliver(r, s, r.send(RestoreResult(True, "ok")))
    deliver(s, r, s.send(Commit()))
    assert r.state is State.COMMITTED
    return bytes(to_r)


STREAMS = {mode: record(mode) for mode in ("psk", "insecure")}


def drive(c, data, chunk):
    """Feed `data` (then EOF) and read events; ProtocolError ends it."""
    pieces = [data[i:i + chunk] for i in range(0, len(data), chunk)] + [b""]
    try:
        for piece in pieces:
            c.receive_data(piece)
            # every event consumes at least one 4-byte frame: bounded
            for _ in range(len(data) // 4 + 3):
                ev = c.next_event()
                if c.state is State.RESTORING and c.role == "receiver":
                    c.send(RestoreResult(True, "ok"))
                if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                    break
            else:
                raise AssertionError("next_event did not stop")
    except ProtocolError:
        assert c.state is State.ERROR
        c.data_to_send()  # the notice to the peer encodes fine
        return "error"
    return c.state


@pytest.mark.parametrize("mode", ["psk", "insecure"])
def test_recorded_stream_replays(mode):
    r = conn("receiver", mode)
    r.start()
    assert drive(r, STREAMS[mode], 1 << 20) is State.COMMITTED


mutation = st.tuples(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]),
                     st.integers(min_value=0), st.integers(0, 255))


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(mode=st.sampled_from(["psk", "insecure"]),
       muts=st.lists(mutation, min_size=1, max_size=4),
       chunk=st.sampled_from([1, 3, 64, 1 << 20]))
def test_mutated_stream(mode, muts, chunk):
    data = bytearray(STREAMS[mode])
    for kind, pos, byte in muts:
        if not data:
            break
        pos %= len(data)
        if kind == "flip":
            data[pos] ^= 1 << (byte % 8)
        elif kind == "set":
            data[pos] = byte
        elif kind == "insert":
            data[pos:pos] = bytes([byte])
        elif kind == "delete":
            del data[pos]
        else:
            del data[pos:]
    r = conn("receiver", mode)
    r.start()
    result = drive(r, bytes(data), chunk)
    # A change anywhere after the handshake must be caught in psk mode.
    if mode == "psk" and bytes(data) != STREAMS[mode]:
        assert result != State.COMMITTED


@settings(deadline=None)
@given(data=st.binary(max_size=3000), role=st.sampled_from(["sender", "receiver"]),
       mode=st.sampled_from(["psk", "insecure"]))
def test_random_bytes(data, role, mode):
    c = conn(role, mode)
    c.start()
    drive(c, data, 97)


@settings(deadline=None)
@given(data=st.binary(max_size=3000))
def test_random_bytes_after_hello(data):
    # A valid Hello first, so the random bytes reach the later decoders.
    r = conn("receiver", "insecure")
    s = conn("sender", "insecure")
    r.start()
    drive(r, s.start() + data, 1 << 20)


leaf = (st.none() | st.booleans() | st.integers(-2**70, 2**70).filter(
    lambda i: -2**63 <= i < 2**64) | st.floats() | st.text(max_size=20)
    | st.binary(max_size=40))
value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                     max_leaves=12)


@settings(deadline=None)
@given(t=st.integers(0, 20), seq=value, fields=st.lists(value, max_size=8),
       page_size=st.sampled_from([None, PS]))
def test_random_structures(t, seq, fields, page_size):
    body = msgpack.packb([t, seq] + fields)
    try:
        frames.decode_body(body, page_size=page_size)
    except ProtocolError:
        pass


runs_st = st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                   max_size=4)


@settings(deadline=None)
@given(runs=runs_st, codec=st.sampled_from(["raw", "zstd", "lz4"]),
       data=st.binary(max_size=300), checksum=st.integers(0, 2**32 - 1),
       page_size=st.sampled_from([PS, 65536]))
def test_random_page_batches(runs, codec, data, checksum, page_size):
    b = frames.PageBatch(1, tuple(runs), codec, data, checksum)
    try:
        frames.decode_pages(b, page_size)
    except ProtocolError:
        pass


@settings(deadline=None)
@given(data=st.binary(min_size=1, max_size=4 * PS), flip=st.integers(min_value=0))
def test_corrupted_zstd_payloads(data, flip):
    page = (data * (PS // len(data) + 1))[:PS]
    b = make_page_batch(1, [(0, 1)], page)
    if b.codec != "zstd":
        return
    payload = bytearray(b.data)
    payload[flip % len(payload)] ^= 0xff
    try:
        out = frames.decode_pages(frames.PageBatch(1, b.runs, "zstd", bytes(payload),
                                                   b.checksum), PS)
    except ProtocolError:
        return
    assert crc32c(out) == b.checksum
