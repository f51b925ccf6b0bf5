"""Two in-memory Connections wired together: the whole conversation, whole
and one byte at a time, and every way it must refuse to go on."""

import os

import pytest

from migrator.protocol.checksum import crc32c
from migrator.protocol import (
    NEED_DATA, Abort, AuthenticationError, AuthResult, Commit, Connection,
    ConnectionClosed, ConnectionLost, Error, FrameTooLarge, Hello, Images,
    LocalProtocolError, MalformedFrame, PageBatch, Process, ProtocolError,
    ReplayedFrame, RestoreResult, RoundEnd, StartMigration, State, SwitchOver,
    TamperedFrame, UnexpectedFrame, VersionMismatch, make_page_batch,
)
from migrator.protocol import frames

KEY = b"k" * 32
PS = 4096


class Link:
    """Two connections and the bytes in flight between them."""

    def __init__(self, sender, receiver, chunk=None):
        self.c = {"sender": sender, "receiver": receiver}
        self.wire = {"sender": bytearray(), "receiver": bytearray()}  # toward role
        self.events = {"sender": [], "receiver": []}
        self.errors = {}
        self.chunk = chunk

    def other(self, role):
        return "receiver" if role == "sender" else "sender"

    def start(self):
        for role, c in self.c.items():
            self.wire[self.other(role)] += c.start()
        self.pump()

    def send(self, role, event):
        self.wire[self.other(role)] += self.c[role].send(event)
        self.pump()

    def pump(self, limit=100000):
        for _ in range(limit):
            moved = False
            for role, c in self.c.items():
                buf = self.wire[role]
                if role in self.errors:
                    buf.clear()
                    continue
                while buf:
                    n = self.chunk or len(buf)
                    c.receive_data(bytes(buf[:n]))
                    del buf[:n]
                    moved = True
                    self._drain(role)
                    if role in self.errors:
                        break
            if not moved:
                return
        raise AssertionError("pump did not settle")

    def _drain(self, role):
        c = self.c[role]
        while True:
            try:
                ev = c.next_event()
            except ProtocolError as e:
                self.errors[role] = e
                self.wire[self.other(role)] += c.data_to_send()
                return
            self.wire[self.other(role)] += c.data_to_send()
            if ev is NEED_DATA or isinstance(ev, ConnectionClosed):
                return
            self.events[role].append(ev)


def pair(psk_s=KEY, psk_r=KEY, insecure_s=False, insecure_r=False, chunk=None, **kw):
    s = Connection("sender", psk_s, insecure=insecure_s, node_name="node-a", **kw)
    r = Connection("receiver", psk_r, insecure=insecure_r, node_name="node-b", **kw)
    return Link(s, r, chunk)


def pages(n, seed):
    # Odd seeds random (sent raw), even ones compressible (sent zstd).
    if seed % 2:
        return os.urandom(n * PS)
    return (bytes([seed]) * 100 + b"\x00" * PS * n)[: n * PS]


def full_flow(link):
    link.start()
    s, r = link.c["sender"], link.c["receiver"]
    assert s.state is r.state is State.READY, link.errors
    sent = []

    def send(ev):
        sent.append(ev)
        link.send("sender", ev)

    send(StartMigration("m-1", [Process(100, "uffd-wp"), Process(101, "full")], PS))
    originals = []
    seed = 0
    for rnd in (1, 2):
        total = 0
        for pid, runs in ((100, [(0x10000, 3), (0x20000, 1)]), (101, [(0x7f0000, 2)])):
            n = sum(k for _, k in runs)
            data = pages(n, seed)
            seed += 1
            originals.append(data)
            send(make_page_batch(pid, runs, data))
            total += n
        send(RoundEnd(rnd, total, 12345))
    send(SwitchOver(3, "converged"))
    data = pages(1, 7)
    originals.append(data)
    send(make_page_batch(100, [(0x10000, 1)], data))
    send(Images("core-100.img", b"\x01" * 10, False))
    send(Images("core-100.img", b"\x02" * 10, True))
    send(Images("pagemap-100.img", b"", True))
    send(RoundEnd(3, 1, 999))
    assert r.state is State.RESTORING
    link.send("receiver", RestoreResult(True, "restored, stopped"))
    assert s.state is State.RESTORED
    send(Commit())
    assert s.state is r.state is State.COMMITTED
    return sent, originals


@pytest.mark.parametrize("chunk", [None, 1, 7])
@pytest.mark.parametrize("mode", ["psk", "insecure"])
def test_full_flow(chunk, mode):
    if mode == "psk":
        link = pair(chunk=chunk)
    else:
        link = pair(None, None, True, True, chunk=chunk)
    sent, originals = full_flow(link)
    assert not link.errors
    s, r = link.c["sender"], link.c["receiver"]
    assert r.authenticated is s.authenticated is (mode == "psk")
    got = link.events["receiver"]
    assert isinstance(got[0], Hello) and got[0].node_name == "node-a"
    assert isinstance(got[1], AuthResult) and got[1].ok
    assert got[2:] == sent
    batches = [e for e in got if isinstance(e, PageBatch)]
    assert {b.codec for b in batches} == {"raw", "zstd"}
    assert [r.pages(b) for b in batches] == originals
    assert link.events["sender"][-1] == RestoreResult(True, "restored, stopped")
    # end of stream after the end of the conversation is clean
    for c in (s, r):
        c.receive_data(b"")
        assert isinstance(c.next_event(), ConnectionClosed)


def test_psk_on_one_side_insecure_other_accepts_when_allowed():
    link = pair(KEY, None, insecure_s=True, insecure_r=True)
    link.start()
    assert link.c["sender"].state is link.c["receiver"].state is State.READY
    assert not link.c["receiver"].authenticated


def test_insecure_must_be_explicit():
    with pytest.raises(ValueError, match="insecure=True"):
        Connection("receiver")
    with pytest.raises(ValueError, match="at least 16"):
        Connection("receiver", b"short")


def test_wrong_key_fails_on_both_sides():
    link = pair(KEY, b"x" * 32)
    link.start()
    for role in ("sender", "receiver"):
        assert isinstance(link.errors[role], AuthenticationError), link.errors
        assert "pre-shared key" in str(link.errors[role])
        assert link.c[role].state is State.ERROR
        with pytest.raises(LocalProtocolError, match="ERROR"):
            link.c[role].send(Abort("x"))


def test_receiver_refuses_unauthenticated_sender():
    link = pair(None, KEY, insecure_s=True)
    link.start()
    err = link.errors["receiver"]
    assert isinstance(err, AuthenticationError)
    assert "does not authenticate" in str(err) and "insecure" in str(err)
    # the sender is told why, not just disconnected
    assert isinstance(link.errors["sender"], AuthenticationError)
    assert "refused us" in str(link.errors["sender"])


def test_receiver_without_key_is_refused_by_authenticating_sender():
    link = pair(KEY, None, insecure_r=True)
    link.start()
    assert isinstance(link.errors["sender"], AuthenticationError)
    assert "refused us" in str(link.errors["receiver"])


def test_same_role_on_both_ends():
    a = Connection("sender", KEY)
    b = Connection("sender", KEY)
    a.start()
    a.receive_data(b.start())
    with pytest.raises(UnexpectedFrame, match="also a sender"):
        a.next_event()


@pytest.mark.parametrize("version", [frames.PROTOCOL_VERSION - 1,
                                     frames.PROTOCOL_VERSION + 1])
def test_version_mismatch(version):
    r = Connection("receiver", KEY)
    r.start()
    # an older peer (version 1 checksummed pages with zlib.crc32), or a newer
    # one whose Hello has a field this version does not know
    body = frames.msgpack.packb([1, 0, version, "sender", "a", [], "psk", "extra"])
    r.receive_data(frames.frame(body))
    with pytest.raises(VersionMismatch, match=f"version {version}"):
        r.next_event()


def ready_pair(**kw):
    link = pair(**kw)
    link.start()
    link.send("sender", StartMigration("m", [Process(1, "full")], PS))
    return link


def test_local_misuse_is_local_error():
    s = Connection("sender", KEY)
    with pytest.raises(LocalProtocolError, match="start"):
        s.send(Commit())
    s = Connection("sender", KEY)
    s.start()
    with pytest.raises(LocalProtocolError, match="may not send PageBatch in state HANDSHAKE"):
        s.send(make_page_batch(1, [(0, 1)], b"\0" * PS))
    assert s.state is State.ERROR


def test_handshake_events_are_not_sent_by_hand():
    s = Connection("sender", KEY)
    s.start()
    with pytest.raises(LocalProtocolError, match="handshake"):
        s.send(AuthResult(True, ""))


def test_receiver_may_not_start_migration():
    link = pair()
    link.start()
    with pytest.raises(LocalProtocolError, match="receiver may not send StartMigration"):
        link.c["receiver"].send(StartMigration("m", [Process(1, "full")], PS))


def test_local_checks_of_round_accounting():
    link = ready_pair()
    s = link.c["sender"]
    link.send("sender", make_page_batch(1, [(0, 2)], b"\0" * 2 * PS))
    with pytest.raises(LocalProtocolError, match="counts 3 pages, but its batches carried 2"):
        s.send(RoundEnd(1, 3, 0))


@pytest.mark.parametrize("event, match", [
    (lambda: make_page_batch(2, [(0, 1)], b"\0" * PS), "pid 2, which is not part"),
    (lambda: RoundEnd(2, 0, 0), "round 2; the current round is 1"),
    (lambda: SwitchOver(5, "x"), "final round 5"),
    (lambda: Images("core-1.img", b"", True), "may not send Images in state MIGRATING"),
    (lambda: Commit(), "may not send Commit"),
    (lambda: RestoreResult(True, ""), "may not send RestoreResult"),
])
def test_peer_breaking_the_table_is_protocol_error(event, match):
    link = ready_pair()
    s, r = link.c["sender"], link.c["receiver"]
    # Forge what a buggy or hostile sender would put on the wire: a
    # correctly tagged frame carrying an illegal event.
    body = frames.encode_body(event(), s._out_seq, page_size=PS)
    s._emit(body)
    r.receive_data(s.data_to_send())
    with pytest.raises(UnexpectedFrame, match=match):
        r.next_event()
    assert r.state is State.ERROR
    # sticky: the same error again, and the peer gets told
    with pytest.raises(UnexpectedFrame):
        r.next_event()
    note = r.data_to_send()
    s.receive_data(note)
    ev = s.next_event()
    assert isinstance(ev, Error) and match.split()[0] in ev.message
    assert s.state is State.ERROR


def test_unfinished_image_at_final_round():
    link = ready_pair()
    link.send("sender", SwitchOver(1, "forced"))
    link.send("sender", Images("core-1.img", b"x", False))
    with pytest.raises(LocalProtocolError, match="unfinished"):
        link.c["sender"].send(RoundEnd(1, 0, 0))


def test_image_after_its_last_chunk():
    link = ready_pair()
    link.send("sender", SwitchOver(1, "forced"))
    link.send("sender", Images("core-1.img", b"x", True))
    with pytest.raises(LocalProtocolError, match="already complete"):
        link.c["sender"].send(Images("core-1.img", b"y", True))


def test_zstd_needs_the_receivers_feature():
    link = pair(features=())
    link.start()
    link.send("sender", StartMigration("m", [Process(1, "full")], PS))
    with pytest.raises(LocalProtocolError, match="zstd feature"):
        link.c["sender"].send(make_page_batch(1, [(0, 4)], b"\0" * 4 * PS))


def test_abort_crossing_frames_in_flight():
    link = ready_pair()
    s, r = link.c["sender"], link.c["receiver"]
    # both write before reading what the other wrote
    to_r = s.send(make_page_batch(1, [(0, 1)], b"\0" * PS))
    to_s = r.send(Abort("operator cancelled"))
    assert r.state is State.ABORTED
    r.receive_data(to_r)
    assert r.next_event() is NEED_DATA  # dropped: it crossed our Abort
    s.receive_data(to_s)
    assert s.next_event() == Abort("operator cancelled")
    assert s.state is State.ABORTED
    for c in (s, r):
        c.receive_data(b"")
        assert isinstance(c.next_event(), ConnectionClosed)


def test_failed_restore_aborts():
    link = ready_pair()
    link.send("sender", SwitchOver(1, "converged"))
    link.send("sender", RoundEnd(1, 0, 0))
    link.send("receiver", RestoreResult(False, "criu restore failed"))
    assert link.c["sender"].state is link.c["receiver"].state is State.ABORTED


def test_receiver_is_silent_while_waiting_for_commit():
    link = ready_pair()
    link.send("sender", SwitchOver(1, "converged"))
    link.send("sender", RoundEnd(1, 0, 0))
    link.send("receiver", RestoreResult(True, "ok"))
    with pytest.raises(LocalProtocolError, match="receiver may not send Abort in state RESTORED"):
        link.c["receiver"].send(Abort("changed my mind"))


def test_eof_before_the_end_is_an_error():
    link = ready_pair()
    r = link.c["receiver"]
    r.receive_data(b"")
    with pytest.raises(ConnectionLost, match="state MIGRATING"):
        r.next_event()


def test_truncated_frame_needs_data_then_fails_at_eof():
    link = ready_pair()
    s, r = link.c["sender"], link.c["receiver"]
    data = s.send(make_page_batch(1, [(0, 1)], os.urandom(PS)))
    r.receive_data(data[:-1])
    assert r.next_event() is NEED_DATA
    r.receive_data(b"")
    with pytest.raises(ConnectionLost, match="inside a frame"):
        r.next_event()


def test_oversized_length_rejected_before_the_body():
    r = Connection("receiver", KEY)
    r.start()
    r.receive_data((1 << 31).to_bytes(4, "big"))
    with pytest.raises(FrameTooLarge, match="limit"):
        r.next_event()


def test_garbage_instead_of_hello():
    r = Connection("receiver", KEY)
    r.start()
    r.receive_data(b"\x00\x00\x00\x05GET /")
    with pytest.raises(MalformedFrame):
        r.next_event()


def test_replayed_frame_before_auth():
    r = Connection("receiver", None, insecure=True)
    s = Connection("sender", None, insecure=True)
    hello = s.start()
    r.start()
    r.receive_data(hello + hello)
    assert isinstance(r.next_event(), Hello)
    with pytest.raises(ReplayedFrame, match="replayed or reordered frame: expected seq 1, got 0"):
        r.next_event()


def test_replayed_frame_insecure_mode():
    link = ready_pair(psk_s=None, psk_r=None, insecure_s=True, insecure_r=True)
    s, r = link.c["sender"], link.c["receiver"]
    data = s.send(RoundEnd(1, 0, 0))
    r.receive_data(data + data)
    assert r.next_event() == RoundEnd(1, 0, 0)
    with pytest.raises(ReplayedFrame, match="replayed or reordered"):
        r.next_event()


def test_replayed_frame_with_tags_fails_on_sequence():
    link = ready_pair()
    s, r = link.c["sender"], link.c["receiver"]
    data = s.send(RoundEnd(1, 0, 0))
    r.receive_data(data + data)
    assert r.next_event() == RoundEnd(1, 0, 0)
    with pytest.raises(ReplayedFrame):
        r.next_event()


def test_tampered_frame():
    link = ready_pair()
    s, r = link.c["sender"], link.c["receiver"]
    data = bytearray(s.send(make_page_batch(1, [(0, 1)], b"\0" * PS)))
    data[10] ^= 1
    r.receive_data(bytes(data))
    with pytest.raises(TamperedFrame, match="integrity"):
        r.next_event()


def test_injected_untagged_frame_after_auth():
    link = ready_pair()
    r = link.c["receiver"]
    r.receive_data(frames.encode_frame(Abort("evil"), link.c["sender"]._out_seq))
    with pytest.raises((TamperedFrame, MalformedFrame)):
        r.next_event()


def test_frames_from_another_connection_do_not_verify():
    a, b = ready_pair(), ready_pair()
    data = a.c["sender"].send(RoundEnd(1, 0, 0))
    b.c["receiver"].receive_data(data)
    with pytest.raises(TamperedFrame):
        b.c["receiver"].next_event()


def test_bad_page_data_is_protocol_error_from_pages():
    link = ready_pair()
    _s, r = link.c["sender"], link.c["receiver"]
    good = make_page_batch(1, [(0, 1)], os.urandom(PS), level=None)
    bad = PageBatch(1, good.runs, "raw", good.data, good.checksum ^ 1)
    link.send("sender", bad)
    ev = link.events["receiver"][-1]
    assert ev == bad
    with pytest.raises(frames.PageDataError, match="checksum"):
        r.pages(ev)
    assert r.state is State.ERROR
    assert crc32c(good.data) == good.checksum


@pytest.mark.parametrize("psk", [KEY, None])
def test_send_parts_is_send_byte_for_byte(psk):
    """The gathering path (head, pages as given, tail + incremental HMAC)
    writes exactly what send() writes, and the receiver accepts it."""
    nonces = {"sender": b"S" * 32, "receiver": b"R" * 32}

    def fixed():
        kw = dict(insecure=psk is None)
        s = Connection("sender", psk, node_name="a", _nonce_source=lambda: nonces["sender"], **kw)
        r = Connection("receiver", psk, node_name="b", _nonce_source=lambda: nonces["receiver"], **kw)
        link = Link(s, r)
        link.start()
        link.send("sender", StartMigration("m", [Process(1, "full")], PS))
        return link

    a, b = fixed(), fixed()
    data = bytearray(os.urandom(3 * PS))
    batch = make_page_batch(1, [(0, 2), (4 * PS, 1)], bytes(data), None)
    plain = a.c["sender"].send(batch)
    view = frames.PageBatch(1, batch.runs, "raw", memoryview(data), batch.checksum)
    parts = b.c["sender"].send_parts(view)
    assert b"".join(bytes(p) for p in parts) == plain
    b.wire["receiver"] += plain
    b.pump()
    assert not b.errors
    got = b.events["receiver"][-1]
    assert got == batch and b.c["receiver"].pages(got) == bytes(data)
