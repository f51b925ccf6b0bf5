"""The thin I/O driver under migrator.protocol: sockets, TLS, pacing.

A Channel pairs one socket with one protocol Connection.  Authentication
is the protocol's pre-shared-key challenge, or mutual TLS (both sides
present certificates signed by the given CA), or, only when asked for
explicitly, nothing.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass

from migrator.protocol.connection import NEED_DATA, Connection, State
from migrator.protocol.frames import ConnectionLost, Event, ProtocolError

RECV_SIZE = 1 << 20
_IOV_MAX = 1024


class TransportError(Exception):
    """The link failed (refused, reset, timed out): the message says how."""


@dataclass(frozen=True)
class Auth:
    psk: bytes | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    insecure: bool = False

    def check(self) -> None:
        tls = [self.tls_cert, self.tls_key, self.tls_ca]
        if any(tls) and not all(tls):
            raise ValueError("TLS needs all of --tls-cert, --tls-key and --tls-ca")
        if not (self.psk or all(tls) or self.insecure):
            raise ValueError("no authentication: give --psk-file, or the three "
                             "--tls-* options, or --insecure to go without")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def context(self, server: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server
                             else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.tls_cert, self.tls_key)
        ctx.load_verify_locations(self.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual: the sender proves itself too
        # Nodes are named by address in clusters; the CA is the trust anchor.
        ctx.check_hostname = False
        return ctx

    def connection(self, role: str, node_name: str) -> Connection:
        # With mutual TLS the peer is already authenticated by the transport.
        return Connection(role, psk=self.psk,
                          insecure=self.insecure or (self.tls and not self.psk),
                          node_name=node_name)


def parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


class Pacer:
    """Caps the send rate (--bandwidth) with a token bucket."""

    def __init__(self, bytes_per_s: float | None):
        self.rate = bytes_per_s
        self._tokens = 0.0
        self._last = time.monotonic()

    def take(self, n: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        # at most a quarter second of burst
        self._tokens = min(self.rate / 4, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            time.sleep(-self._tokens / self.rate)


class Channel:
    def __init__(self, sock: socket.socket, conn: Connection,
                 pacer: Pacer | None = None, timeout: float = 60.0):
        self.sock = sock
        self.conn = conn
        self.pacer = pacer or Pacer(None)
        self.sock.settimeout(timeout)
        self.sent_bytes = 0

    # -- opening --------------------------------------------------------
    @classmethod
    def connect(cls, hostport: str, auth: Auth, node_name: str,
                bandwidth: float | None = None, timeout: float = 60.0) -> "Channel":
        host, port = parse_hostport(hostport)
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
            if auth.tls:
                sock = auth.context(server=False).wrap_socket(sock)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"cannot connect to {hostport}: {e}") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ch = cls(sock, auth.connection("sender", node_name), Pacer(bandwidth), timeout)
        ch.handshake()
        return ch

    def handshake(self) -> None:
        self._write(self.conn.start())
        while self.conn.state is not State.READY:
            self.next_event()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- traffic --------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if not data:
            return
        try:
            self.sock.sendall(data)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"connection to the peer failed: {e}") from e
        self.sent_bytes += len(data)

    def _write_parts(self, parts: list) -> None:
        """Write buffers in order: one gathering sendmsg per turn on a
        plain socket (no joined copy of a batch), sendall each over TLS."""
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        total = sum(len(v) for v in views)
        try:
            if isinstance(self.sock, ssl.SSLSocket):
                for v in views:
                    self.sock.sendall(v)
            else:
                while views:
                    n = self.sock.sendmsg(views[:_IOV_MAX])
                    while n:
                        if n >= len(views[0]):
                            n -= len(views.pop(0))
                        else:
                            views[0] = views[0][n:]
                            n = 0
        except socket.timeout as e:
            raise TransportError("the peer stopped reading "
                                 f"({self.sock.gettimeout():.0f} s)") from e
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"connection to the peer failed: {e}") from e
        self.sent_bytes += total

    def send(self, event: Event) -> int:
        parts = self.conn.send_parts(event)
        size = sum(len(p) for p in parts)
        self.pacer.take(size)
        self._write_parts(parts)
        return size

    def next_event(self):
        """The next event from the peer; ProtocolError for garbage,
        TransportError for a dead link."""
        while True:
            ev = self.conn.next_event()
            self._write(self.conn.data_to_send())
            if ev is not NEED_DATA:
                return ev
            buf = self.conn.receive_buffer()
            if not buf:
                continue  # the stream is bad: next_event() raises why
            try:
                # Straight into the frame's own buffer: no copies.
                n = self.sock.recv_into(buf)
            except socket.timeout as e:
                raise TransportError("the peer stopped answering "
                                     f"({self.sock.gettimeout():.0f} s)") from e
            except (OSError, ssl.SSLError) as e:
                raise TransportError(f"connection to the peer failed: {e}") from e
            self.conn.received(n)

    def peer_error(self, wait: float = 1.0) -> str | None:
        """After our write failed: why the peer stopped, if its Error or
        Abort frame reached us before the connection broke (a receiver that
        fails mid-round says why, then closes; our next write meets the
        reset, while its frame sits unread in our socket)."""
        try:
            self.sock.settimeout(wait)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                why = stop_reason(self.next_event())
                if why:
                    return why
        except Exception:  # noqa: BLE001 - nothing more to learn from the link
            pass
        return None

    def tell_error(self, phase: str, message: str) -> None:
        """Best effort: let the peer know why we stop."""
        from migrator.protocol.frames import Error
        try:
            if self.conn.state not in (State.ERROR, State.COMMITTED,
                                       State.ABORTED, State.IDLE):
                self._write(self.conn.send(Error(phase, message[:1000])))
        except (ProtocolError, TransportError, Exception):  # noqa: BLE001
            pass


def describe(e: BaseException) -> str:
    """An error as one line for the peer and the log."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return str(e) or type(e).__name__


def stop_reason(event) -> str | None:
    """Why the peer stopped, if `event` is its Error or Abort."""
    from migrator.protocol.frames import Abort, Error
    if isinstance(event, Error):
        return f"{event.phase}: {event.message}"
    if isinstance(event, Abort):
        return event.reason
    return None


__all__ = ["Auth", "Channel", "ConnectionLost", "Pacer", "TransportError",
           "describe", "parse_hostport", "stop_reason"]
