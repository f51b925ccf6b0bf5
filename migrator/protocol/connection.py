"""The migration conversation as a state machine.  Bytes in, events out; no I/O.

Theory of operation
-------------------
One Connection is one side of one TCP (or TLS) stream: role "sender" on the
source node, "receiver" on the destination.  The driver owns the socket:

    conn = Connection("receiver", psk=key)
    sock.sendall(conn.start())                # our Hello
    while True:
        event = conn.next_event()             # ProtocolError: peer's fault
        sock.sendall(conn.data_to_send())     # handshake replies, error notices
        if event is NEED_DATA:
            conn.receive_data(sock.recv(1 << 20))   # b"" means EOF
            continue
        ...
        sock.sendall(conn.send(SomeEvent(...)))  # LocalProtocolError: ours

The handshake runs by itself: Hello each way, then (both sides holding a key)
AuthChallenge / AuthResponse / AuthResult each way, or (a side without a key,
accepted only by a peer in insecure mode) AuthResult each way.  Replies go
to data_to_send(); next_event() hands out the peer's Hello and, once both
sides accepted each other, the peer's AuthResult: the state is then READY.

There is one state for the conversation, because after the handshake only
one side drives each phase; the table says which role may author which
event in which state, and where it leads (a "-" keeps the state):

    state       author    event                  next state
    READY       sender    StartMigration         MIGRATING
    MIGRATING   sender    PageBatch, RoundEnd    -
                sender    SwitchOver             SWITCHOVER
    SWITCHOVER  sender    PageBatch, Images      -
                sender    RoundEnd (final)       RESTORING
    RESTORING   receiver  RestoreResult(ok)      RESTORED
                receiver  RestoreResult(not ok)  ABORTED
    RESTORED    sender    Commit                 COMMITTED
    any of the above, either role (but the receiver not in RESTORED):
                          Abort                  ABORTED
                          Error                  ERROR
    HANDSHAKE, AUTH: either role may send Error.  IDLE: nothing.

The same table judges both directions: an event the peer may not author
raises UnexpectedFrame (a ProtocolError) from next_event(); one we may not
author raises LocalProtocolError from send().  Further checks, also both
ways: PageBatch pids belong to the migration and zstd is used only if the
receiver lists the "zstd" feature; rounds count 1, 2, ... and the final
round's number is the one SwitchOver announced; RoundEnd.dirty_pages equals
the pages the round's batches carried; an image file gets no chunk after
its last one, and none is left unfinished when the final round ends.

The receiver stays silent in RESTORED: the sender alone decides the commit
point, so Commit cannot cross a message that contradicts it.  Abort and
Error may cross frames the peer sent before seeing them, so in ABORTED, and
in ERROR entered by an Error event, further peer frames are checked for
framing, sequence and tag, then dropped.  In COMMITTED any frame is an
error.  End of stream is ConnectionClosed in COMMITTED, ABORTED or ERROR,
and ConnectionLost (a ProtocolError) anywhere else.

Any error, ours or the peer's, leaves the connection in ERROR for good:
next_event() raises the same error again and send() refuses.  When it can,
the connection queues a last frame telling the peer why (an Error, or an
AuthResult(ok=False) for authentication failures) in data_to_send().
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable

from migrator.protocol import auth
from migrator.protocol.frames import (
    DEFAULT_LIMITS, PROTOCOL_VERSION, ROLES, TAG_SIZE,
    Abort, AuthChallenge, AuthenticationError, AuthResponse, AuthResult, Commit,
    ConnectionLost, Error, Event, FrameReader, Hello, Images, Limits,
    LocalProtocolError, MalformedFrame, PageBatch, ProtocolError, ReplayedFrame,
    RestoreResult, RoundEnd, StartMigration, SwitchOver, TamperedFrame,
    UnexpectedFrame, _Invalid, check_event, decode_body, decode_pages,
    LENGTH, encode_body, encode_body_parts, frame, peek,
)

DEFAULT_FEATURES = ("zstd",)


class State(enum.Enum):
    IDLE = "idle"                # constructed, start() not called yet
    HANDSHAKE = "handshake"      # our Hello sent, waiting for the peer's
    AUTH = "auth"                # Hellos exchanged, verdicts pending
    READY = "ready"              # both sides accepted each other
    MIGRATING = "migrating"      # pre-copy rounds
    SWITCHOVER = "switchover"    # source frozen: final delta and images
    RESTORING = "restoring"      # all sent; the receiver restores
    RESTORED = "restored"        # restore succeeded; waiting for Commit
    COMMITTED = "committed"
    ABORTED = "aborted"
    ERROR = "error"


_TERMINAL = (State.COMMITTED, State.ABORTED, State.ERROR)
_HANDSHAKE_EVENTS = (Hello, AuthChallenge, AuthResponse, AuthResult)


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer ended the stream after the conversation was over."""


class _Sentinel:
    def __init__(self, name):
        self._name = name

    def __repr__(self):
        return self._name


NEED_DATA = _Sentinel("NEED_DATA")

_S, _R = "sender", "receiver"
_ANY = (Abort, Error)
_LEGAL: dict[State, dict[str, tuple[type[Event], ...]]] = {
    State.HANDSHAKE: {_S: (Error,), _R: (Error,)},
    State.AUTH: {_S: (Error,), _R: (Error,)},
    State.READY: {_S: (StartMigration,) + _ANY, _R: _ANY},
    State.MIGRATING: {_S: (PageBatch, RoundEnd, SwitchOver) + _ANY, _R: _ANY},
    State.SWITCHOVER: {_S: (PageBatch, Images, RoundEnd) + _ANY, _R: _ANY},
    State.RESTORING: {_S: _ANY, _R: (RestoreResult,) + _ANY},
    State.RESTORED: {_S: (Commit,) + _ANY, _R: ()},
}


class Connection:
    """One side of a migration stream.  See the module docstring.

    role: "sender" or "receiver".  psk: the pre-shared key (bytes, at least
    16).  insecure: accept a peer that does not authenticate; required when
    psk is None, so running without authentication is always spelled out.
    """

    def __init__(self, role: str, psk: bytes | None = None, *, insecure: bool = False,
                 limits: Limits = DEFAULT_LIMITS, node_name: str = "",
                 features=DEFAULT_FEATURES,
                 _nonce_source: Callable[[], bytes] = auth.new_nonce):
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if psk is None and not insecure:
            raise ValueError("no pre-shared key: pass psk=..., or insecure=True "
                             "to run without authentication")
        self.role = role
        self.peer_role = _R if role == _S else _S
        self.limits = limits
        self.insecure = insecure
        self._psk = None if psk is None else auth.check_psk(psk)
        self._nonce_source = _nonce_source
        self._hello = Hello(PROTOCOL_VERSION, role, node_name, tuple(features),
                            "psk" if self._psk else "none")
        check_event(self._hello, limits)

        self.state = State.IDLE
        self.peer: Hello | None = None       # the peer's Hello
        self.authenticated = False           # the peer proved the key
        self._error: Exception | None = None
        self._reader = FrameReader(limits)
        self._outbox: list[bytes] = []
        self._out_seq = 0
        self._in_seq = 0
        self._out_key: bytes | None = None   # set once our frames are tagged
        self._in_key: bytes | None = None    # set once the peer's frames are
        self._keys: dict[str, bytes] = {}
        self._hello_bodies: dict[str, bytes] = {}
        self._nonces: dict[str, bytes] = {}
        self._transcript = b""
        self._mode: str | None = None        # "psk" or "none" after the Hellos
        self._peer_ok = False                # we accepted the peer
        self._answered = False               # we answered the peer's challenge
        self._closing_sent = False           # we sent Error/AuthResult(False)
        # Migration bookkeeping, checked in both directions.
        self.page_size: int | None = None
        self.migration: StartMigration | None = None
        self._pids: frozenset[int] = frozenset()
        self._round = 0                      # last completed round
        self._round_pages = 0
        self._final_round: int | None = None
        self._images_open: set[str] = set()
        self._images_done: set[str] = set()

    # -- public API -----------------------------------------------------------

    def start(self) -> bytes:
        """Our Hello: the first bytes to write."""
        if self.state is not State.IDLE:
            raise LocalProtocolError(f"start() called twice (state {self.state.name})")
        self.state = State.HANDSHAKE
        body = self._queue(self._hello)
        self._hello_bodies[self.role] = body
        return self.data_to_send()

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; b"" means the peer closed its side."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(f"receive_data takes bytes, got {type(data).__name__}")
        self._reader.feed(data)

    def receive_buffer(self) -> memoryview:
        """Where the peer's next bytes go, for a driver that reads without
        copying (sock.recv_into(conn.receive_buffer()), then received(n)).
        Empty once the stream is known to be bad: call next_event()."""
        return self._reader.get_buffer()

    def received(self, n: int) -> None:
        """n bytes were written into receive_buffer(); 0 means the peer
        closed its side."""
        self._reader.buffer_updated(n)

    def next_event(self):
        """The next event from the peer, NEED_DATA, or ConnectionClosed."""
        if self._error is not None:
            raise self._error
        if self.state is State.IDLE:
            raise LocalProtocolError("call start() before reading events")
        try:
            while True:  # each turn consumes one frame, so this ends
                body_and_tag = self._reader.next_frame()
                if body_and_tag is None:
                    if not self._reader.at_eof:
                        return NEED_DATA
                    if self.state in _TERMINAL:
                        return ConnectionClosed()
                    raise ConnectionLost(f"peer closed the connection in state "
                                         f"{self.state.name}")
                event = self._receive_frame(body_and_tag)
                if event is not None:
                    return event
        except ProtocolError as e:
            self._fail(e)
            raise

    def _prepare(self, event: Event, encode):
        """Check that we may send `event` now, encode it with `encode`, and
        move the state; returns what `encode` made.  The frame takes its
        sequence number only afterwards (the caller emits it)."""
        if self._error is not None or self.state is State.ERROR:
            raise LocalProtocolError(f"cannot send {type(event).__name__}: the "
                                     f"connection is in ERROR ({self._error or 'Error sent or received'})")
        try:
            if isinstance(event, _HANDSHAKE_EVENTS):
                raise LocalProtocolError(f"{type(event).__name__} is sent by the "
                                         f"connection itself during the handshake")
            if self.state is State.IDLE:
                raise LocalProtocolError("call start() before sending events")
            if type(event) not in _LEGAL.get(self.state, {}).get(self.role, ()):
                raise LocalProtocolError(f"{self.role} may not send "
                                         f"{type(event).__name__} in state "
                                         f"{self.state.name}")
            # Encode first (validates, may refuse the size), then move the
            # state.
            encoded = encode(event, self._out_seq, self.limits, self.page_size)
            try:
                self._apply(event, self.role)
            except _Invalid as e:
                raise LocalProtocolError(str(e)) from None
        except LocalProtocolError as e:
            self._fail(e)
            raise
        return encoded

    def send(self, event: Event) -> bytes:
        """Bytes for `event`, preceded by anything queued in data_to_send()."""
        self._emit(self._prepare(event, encode_body))
        return self.data_to_send()

    def send_parts(self, event: Event) -> list:
        """Like send(), as a list of buffers to write in order (a gathering
        write).  A PageBatch's data is one of them, as given: nothing
        copies the pages.  The bytes are exactly send()'s."""
        if type(event) is not PageBatch:
            return [self.send(event)]
        parts = self._prepare(event, encode_body_parts)
        self._out_seq += 1
        tag = auth.tag_parts(self._out_key, parts) if self._out_key else b""
        head, data, tail = parts
        size = len(head) + len(data) + len(tail) + len(tag)
        out = self._outbox[:]
        self._outbox.clear()
        out += [LENGTH.pack(size) + head, data, tail + tag]
        return out

    def data_to_send(self) -> bytes:
        """Bytes the connection produced on its own (handshake, error notice)."""
        out = b"".join(self._outbox)
        self._outbox.clear()
        return out

    def pages(self, batch: PageBatch) -> bytes:
        """The verified, uncompressed pages of a received batch (PageDataError
        if they do not match).  Pure computation: a driver may run it, or
        frames.decode_pages, in a worker thread."""
        if self.page_size is None:
            raise LocalProtocolError("no migration started: page size unknown")
        try:
            return decode_pages(batch, self.page_size, self.limits)
        except ProtocolError as e:
            self._fail(e)
            raise

    # -- frames -----------------------------------------------------------------

    def _queue(self, event: Event) -> bytes:
        body = encode_body(event, self._out_seq, self.limits, self.page_size)
        self._emit(body)
        return body

    def _emit(self, body: bytes) -> None:
        self._out_seq += 1
        tag = auth.tag(self._out_key, body) if self._out_key else b""
        self._outbox.append(frame(body, tag))

    def _receive_frame(self, data: bytes):
        if self._in_key is not None:
            if len(data) < TAG_SIZE + 3:
                raise MalformedFrame(f"frame of {len(data)} bytes is too short to "
                                     f"carry its {TAG_SIZE}-byte tag")
            view = memoryview(data)  # no copy of a 32 MiB batch just to split
            body, tag = view[:-TAG_SIZE], view[-TAG_SIZE:]
            # Before parsing anything: unauthenticated bytes are not looked at.
            if not auth.check_tag(self._in_key, body, tag):
                raise TamperedFrame(f"frame after seq {self._in_seq - 1} failed its "
                                    f"integrity check: tampered, injected, or "
                                    f"replayed from another connection")
        else:
            body = data
        cls, seq = peek(body)
        if seq != self._in_seq:
            raise ReplayedFrame(f"replayed or reordered frame: expected seq "
                                f"{self._in_seq}, got {seq} ({cls.__name__})")
        self._in_seq += 1
        if self.state in (State.ABORTED, State.ERROR):
            return None  # crossed our Abort/Error (or the peer's) in flight
        if self.state in (State.HANDSHAKE, State.AUTH) and cls in _HANDSHAKE_EVENTS:
            _, event = decode_body(body, self.limits, self.page_size)
            return self._handshake(event, body)
        if cls not in _LEGAL.get(self.state, {}).get(self.peer_role, ()):
            raise UnexpectedFrame(f"{self.peer_role} may not send {cls.__name__} "
                                  f"in state {self.state.name}")
        _, event = decode_body(body, self.limits, self.page_size)
        try:
            self._apply(event, self.peer_role)
        except _Invalid as e:
            raise UnexpectedFrame(str(e)) from None
        return event

    # -- handshake ---------------------------------------------------------------

    def _handshake(self, event: Event, body: bytes):
        if isinstance(event, Hello):
            if self.state is not State.HANDSHAKE:
                raise UnexpectedFrame("second Hello from the peer")
            return self._on_hello(event, body)
        if self.state is not State.AUTH:
            raise UnexpectedFrame(f"{type(event).__name__} before the peer's Hello")
        if isinstance(event, AuthResult):
            return self._on_result(event)
        if self._mode != "psk":
            raise UnexpectedFrame(f"{type(event).__name__} although one side has "
                                  f"no pre-shared key")
        if isinstance(event, AuthChallenge):
            if self._answered:
                raise UnexpectedFrame("second AuthChallenge from the peer")
            if event.nonce == self._nonces[self.role]:
                raise AuthenticationError("peer echoed our own challenge back")
            self._nonces[self.peer_role] = event.nonce
            self._derive_keys()
            self._queue(AuthResponse(self._response(self.role)))
            self._answered = True
            # Every later frame of ours is tagged, AuthResult included, so
            # nothing after the proof (not even its reason text) can be
            # altered on the way.
            self._out_key = self._keys[self.role]
            return None
        # AuthResponse: our challenge always precedes it (sent on the Hello).
        if self._peer_ok:
            raise UnexpectedFrame("second AuthResponse from the peer")
        if not self._answered:
            raise UnexpectedFrame("AuthResponse before the peer's AuthChallenge")
        if not auth.verify_response(self._response(self.peer_role), event.mac):
            raise AuthenticationError(
                "peer failed to prove the pre-shared key (the keys differ, or "
                "someone else is answering)")
        self._peer_ok = self.authenticated = True
        self._in_key = self._keys[self.peer_role]  # the peer tags from here on
        self._queue(AuthResult(True, "authenticated with the pre-shared key"))
        return None

    def _on_hello(self, hello: Hello, body: bytes):
        if hello.role == self.role:
            raise UnexpectedFrame(f"peer is also a {self.role}; one side sends "
                                  f"and the other receives")
        self.peer = hello
        self._hello_bodies[self.peer_role] = bytes(body)
        self.state = State.AUTH
        if hello.auth == "psk" and self._psk is not None:
            self._mode = "psk"
            nonce = self._nonce_source()
            self._nonces[self.role] = nonce
            self._queue(AuthChallenge(nonce))
            return hello
        self._mode = "none"
        if hello.auth != "psk" and not self.insecure:
            raise AuthenticationError(
                f"peer {hello.node_name!r} does not authenticate (it has no "
                f"pre-shared key); refusing it because insecure mode is off")
        self._peer_ok = True
        self._queue(AuthResult(True, "accepted without authentication (insecure mode)"))
        return hello

    def _on_result(self, result: AuthResult):
        if not result.ok:
            raise AuthenticationError(f"peer refused us: {result.reason}")
        if not self._peer_ok:
            raise AuthenticationError("peer reported success before proving the "
                                      "pre-shared key")
        self.state = State.READY
        return result

    def _derive_keys(self):
        t = auth.transcript(self._hello_bodies[_S], self._hello_bodies[_R])
        self._transcript = t
        for role in ROLES:
            self._keys[role] = auth.direction_key(
                self._psk, role, self._nonces[_S], self._nonces[_R], t)

    def _response(self, responder: str) -> bytes:
        return auth.response(self._psk, responder, PROTOCOL_VERSION,
                             self._nonces[_S], self._nonces[_R], self._transcript)

    # -- the migration table -------------------------------------------------------

    def _apply(self, ev: Event, author: str) -> None:
        """Check `ev` by `author` against the table, then move.  Raises
        _Invalid before changing anything."""
        s = self.state
        if type(ev) not in _LEGAL.get(s, {}).get(author, ()):
            raise _Invalid(f"{author} may not send {type(ev).__name__} in state {s.name}")
        if isinstance(ev, Abort):
            self.state = State.ABORTED
        elif isinstance(ev, Error):
            self.state = State.ERROR
        elif isinstance(ev, StartMigration):
            self.migration = ev
            self.page_size = ev.page_size
            self._pids = frozenset(p.pid for p in ev.processes)
            self.state = State.MIGRATING
        elif isinstance(ev, PageBatch):
            if ev.pid not in self._pids:
                raise _Invalid(f"PageBatch for pid {ev.pid}, which is not part of "
                               f"this migration")
            if ev.codec == "zstd" and "zstd" not in self._receiver_features():
                raise _Invalid("zstd PageBatch, but the receiver did not list "
                               "the zstd feature")
            self._round_pages += ev.npages()
        elif isinstance(ev, SwitchOver):
            if ev.round != self._round + 1:
                raise _Invalid(f"SwitchOver announces final round {ev.round}; "
                               f"the next round is {self._round + 1}")
            self._final_round = ev.round
            self.state = State.SWITCHOVER
        elif isinstance(ev, RoundEnd):
            if ev.round != self._round + 1:
                raise _Invalid(f"RoundEnd for round {ev.round}; the current "
                               f"round is {self._round + 1}")
            if ev.dirty_pages != self._round_pages:
                raise _Invalid(f"RoundEnd for round {ev.round} counts "
                               f"{ev.dirty_pages} pages, but its batches carried "
                               f"{self._round_pages}")
            if s is State.SWITCHOVER:
                if self._images_open:
                    raise _Invalid(f"final round ends with image files unfinished: "
                                   f"{sorted(self._images_open)[:5]}")
                self.state = State.RESTORING
            self._round += 1
            self._round_pages = 0
        elif isinstance(ev, Images):
            if ev.name in self._images_done:
                raise _Invalid(f"image file {ev.name!r} was already complete")
            if (ev.name not in self._images_open and
                    len(self._images_open) + len(self._images_done) >= self.limits.max_images):
                raise _Invalid(f"more than {self.limits.max_images} image files")
            if ev.last:
                self._images_open.discard(ev.name)
                self._images_done.add(ev.name)
            else:
                self._images_open.add(ev.name)
        elif isinstance(ev, RestoreResult):
            self.state = State.RESTORED if ev.ok else State.ABORTED
        elif isinstance(ev, Commit):
            self.state = State.COMMITTED

    def _receiver_features(self):
        if self.role == _R:
            return self._hello.features
        return self.peer.features if self.peer else ()

    # -- errors -------------------------------------------------------------------

    def _fail(self, exc: Exception) -> None:
        """Enter ERROR for good and, if we still may, tell the peer why."""
        phase = self.state.value
        self.state = State.ERROR
        self._error = exc
        if self._closing_sent or not self._hello_bodies.get(self.role):
            return
        if isinstance(exc, ConnectionLost):
            return  # nobody is listening
        self._closing_sent = True
        text = _printable(str(exc), self.limits.max_string)
        if isinstance(exc, AuthenticationError) and phase in ("handshake", "auth"):
            note = AuthResult(False, text)
        else:
            note = Error(phase, text)
        try:
            self._queue(note)
        except LocalProtocolError:  # pragma: no cover - _printable keeps it valid
            pass


def _printable(text: str, limit: int) -> str:
    text = "".join(c if c.isprintable() or c in "\n\t" else "?" for c in text)
    raw = text.encode("utf-8", "replace")[:limit]
    return raw.decode("utf-8", "ignore")
