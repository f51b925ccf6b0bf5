"""Wire codec of the migration stream: bytes <-> frames <-> events.  No I/O.

Grammar (one stream per direction; msgpack types in <angle brackets>)::

    stream  = *frame
    frame   = length body [tag]
    length  = uint32, big-endian          ; len(body) + len(tag), 3 .. max_frame
    tag     = 16 octets                   ; HMAC-SHA256(direction key, body)[:16];
                                          ; in psk mode, present on every frame
                                          ; after the author's AuthResponse
    body    = <fixarray n> <fixint type> <uint seq> field{n-2}
    seq     = 0, 1, 2, ... per direction, no gaps; Hello is 0

    type  event           fields after seq
    1     Hello           version<uint> role<str> node_name<str>
                          features<array of str> auth<str "psk"|"none">
    2     AuthChallenge   nonce<bin 32>
    3     AuthResponse    mac<bin 32>
    4     AuthResult      ok<bool> reason<str>
    5     StartMigration  migration_id<str> processes<array of [pid<uint> tracker<str>]>
                          page_size<uint>
    6     PageBatch       pid<uint> runs<bin 16*k> codec<str "raw"|"zstd">
                          data<bin> checksum<uint32>
                          runs = k * (addr<uint64-be> npages<uint64-be>)
    7     RoundEnd        round<uint> dirty_pages<uint> sent_bytes<uint>
    8     SwitchOver      round<uint> reason<str>
    9     Images          name<str> data<bin> last<bool>
    10    RestoreResult   ok<bool> message<str>
    11    Commit          (none)
    12    Abort           reason<str>
    13    Error           phase<str> message<str>

Why this shape:
- A msgpack *array* whose first two bytes are a fixarray header and a fixint
  type lets the reader know the frame type from the first 6 bytes of the
  stream, so a control frame announcing 60 MiB is refused before its body
  is buffered, and an illegal frame is refused before it is unpacked.
- Runs travel as one bin of packed integers, not as nested arrays: a batch of
  thousands of runs then costs one object to unpack instead of thousands, and
  a hostile frame cannot make the unpacker build millions of small lists.
- Hello is frozen for all versions (type 1, version third), so a peer that
  speaks another version gets "version mismatch", not "malformed frame".
- The checksum of a PageBatch is CRC-32C over the *uncompressed* pages
  (checksum.py): it catches corruption and codec bugs end to end, and both
  sides run it over every byte moved, so it has to be cheap: the CPU's CRC
  instruction does ~7.5 GB/s here, three times zlib.crc32 (version 1's
  checksum; blake2b was 7x slower still).  It is not a defence against
  tampering; the per-frame HMAC tag is (see auth.py).
- Strings are UTF-8 without control characters (tab and newline allowed in
  free text): peer text ends up in logs and terminals.

Errors: anything wrong in what the peer sent raises a ProtocolError subclass;
misuse of this API by our own code (an invalid event to send) raises
LocalProtocolError.  The two are deliberately unrelated classes so that
``except ProtocolError`` around a receive never hides a bug of ours.
"""

from __future__ import annotations

import re
import struct
import unicodedata
from dataclasses import dataclass, fields
from typing import ClassVar

import msgpack
import zstandard

from migrator.protocol.checksum import crc32c

PROTOCOL_VERSION = 2   # 2: PageBatch checksums are CRC-32C (were zlib.crc32)

LENGTH = struct.Struct(">I")
_RUN = struct.Struct(">QQ")
TAG_SIZE = 16
NONCE_SIZE = 32
MAC_SIZE = 32
MIN_PAGE_SIZE = 1 << 12
MAX_PAGE_SIZE = 1 << 16      # arm64 with 64 KiB pages
MAX_PID = 1 << 22            # the kernel's PID_MAX_LIMIT on 64-bit
ROLES = ("sender", "receiver")
AUTH_MODES = ("psk", "none")
CODECS = ("raw", "zstd")

# An identifier: image file names, features, trackers, migration ids, phases.
# No "/" so an image name can never leave the destination's image directory.
_IDENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


# -- errors ------------------------------------------------------------------

class ProtocolError(Exception):
    """The peer sent something invalid; the message says what."""


class FrameTooLarge(ProtocolError):
    """A length prefix announced more than the limits allow."""


class MalformedFrame(ProtocolError):
    """Bad msgpack, wrong field count, or a field of the wrong type/value."""


class UnknownFrameType(ProtocolError):
    pass


class VersionMismatch(ProtocolError):
    pass


class ReplayedFrame(ProtocolError):
    """A sequence number other than the next one expected."""


class TamperedFrame(ProtocolError):
    """A frame whose HMAC tag does not verify."""


class AuthenticationError(ProtocolError):
    """The peer failed to authenticate, refused us, or does not authenticate."""


class PageDataError(ProtocolError):
    """Page contents that do not match their checksum or announced size."""


class UnexpectedFrame(ProtocolError):
    """A well-formed frame that is not legal in the current state."""


class ConnectionLost(ProtocolError):
    """The peer closed the stream mid-frame or before the conversation ended."""


class LocalProtocolError(Exception):
    """Our own code misused the protocol API (not the peer's fault)."""


class _Invalid(Exception):
    """A validation failure, before we know whose fault it is."""


# -- limits ------------------------------------------------------------------

@dataclass(frozen=True)
class Limits:
    """What a decoder accepts.  Checked before anything is allocated.

    The sender must stay within the receiver's limits; both use the defaults
    unless configured alike (limits are not negotiated).
    """

    max_frame: int = 64 << 20           # any frame, tag included
    max_control_frame: int = 1 << 20    # every type but PageBatch and Images
    max_batch_pages: int = 8192
    max_batch_bytes: int = 32 << 20     # uncompressed pages in one batch
    max_string: int = 4096              # free text (reasons, messages), bytes
    max_name: int = 255                 # identifiers and names, bytes
    max_features: int = 64
    max_processes: int = 4096
    max_images: int = 1 << 16           # image files per migration

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if type(v) is not int or v <= 0:
                raise ValueError(f"Limits.{f.name} must be a positive int, got {v!r}")
        if self.max_frame >= 1 << 32:
            raise ValueError("Limits.max_frame must fit the 32-bit length prefix")


DEFAULT_LIMITS = Limits()


# -- field kinds ---------------------------------------------------------------

def _show(v) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _uint(v, what, bits=64):
    if type(v) is not int or not 0 <= v < 1 << bits:
        raise _Invalid(f"{what} must be an unsigned {bits}-bit integer, got {_show(v)}")


def _str(v, what, limit, ident=False):
    if type(v) is not str:
        raise _Invalid(f"{what} must be a string, got {_show(v)}")
    try:
        n = len(v.encode("utf-8"))
    except UnicodeEncodeError:
        raise _Invalid(f"{what} is not valid UTF-8 text: {_show(v)}") from None
    if n > limit:
        raise _Invalid(f"{what} is {n} bytes long; the limit is {limit}")
    if ident:
        if not _IDENT.fullmatch(v):
            raise _Invalid(f"{what} must be a name of letters, digits and ._+- "
                           f"not starting with a punctuation mark, got {_show(v)}")
    elif any(unicodedata.category(c) == "Cc" and c not in "\t\n" for c in v):
        raise _Invalid(f"{what} contains control characters: {_show(v)}")


def _check_kind(kind, v, what, lim: Limits):
    if kind == "uint":
        _uint(v, what)
    elif kind == "u32":
        _uint(v, what, 32)
    elif kind == "bool":
        if type(v) is not bool:
            raise _Invalid(f"{what} must be a boolean, got {_show(v)}")
    elif kind == "name":
        _str(v, what, lim.max_name, ident=True)
    elif kind == "label":                     # short human text: node names
        _str(v, what, lim.max_name)
    elif kind == "text":
        _str(v, what, lim.max_string)
    elif kind == "bin" and type(v) in (bytearray, memoryview):
        # Page data may be a view of a reused buffer (sent without a copy)
        # or of the received frame (decoded without a copy).
        if type(v) is memoryview and (v.itemsize != 1 or not v.c_contiguous):
            raise _Invalid(f"{what} must be a contiguous byte buffer")
    elif kind in ("bin", "bin32"):
        if type(v) is not bytes:
            raise _Invalid(f"{what} must be bytes, got {type(v).__name__}")
        if kind == "bin32" and len(v) != 32:
            raise _Invalid(f"{what} must be 32 bytes, got {len(v)}")
    elif kind == "features":
        if type(v) is not tuple:
            raise _Invalid(f"{what} must be a list of names, got {_show(v)}")
        if len(v) > lim.max_features:
            raise _Invalid(f"{what} has {len(v)} entries; the limit is {lim.max_features}")
        for i, f in enumerate(v):
            _str(f, f"{what}[{i}]", lim.max_name, ident=True)
        if len(set(v)) != len(v):
            raise _Invalid(f"{what} lists a feature twice")
    elif kind == "processes":
        if type(v) is not tuple or not v:
            raise _Invalid(f"{what} must be a non-empty list of processes")
        if len(v) > lim.max_processes:
            raise _Invalid(f"{what} has {len(v)} entries; the limit is {lim.max_processes}")
        for i, p in enumerate(v):
            if type(p) is not Process:
                raise _Invalid(f"{what}[{i}] must be a Process, got {_show(p)}")
            if type(p.pid) is not int or not 1 <= p.pid <= MAX_PID:
                raise _Invalid(f"{what}[{i}].pid must be in 1..{MAX_PID}, got {_show(p.pid)}")
            _str(p.tracker, f"{what}[{i}].tracker", lim.max_name, ident=True)
        if len({p.pid for p in v}) != len(v):
            raise _Invalid(f"{what} lists a pid twice")
    elif kind == "runs":
        if type(v) is not tuple:
            raise _Invalid(f"{what} must be a list of (addr, npages)")
        if len(v) > lim.max_batch_pages:
            raise _Invalid(f"{what} has {len(v)} runs; the limit is {lim.max_batch_pages}")
        for i, r in enumerate(v):
            if type(r) is not tuple or len(r) != 2:
                raise _Invalid(f"{what}[{i}] must be an (addr, npages) pair, got {_show(r)}")
            _uint(r[0], f"{what}[{i}].addr")
            _uint(r[1], f"{what}[{i}].npages")
    else:  # pragma: no cover - a typo in a _SPEC
        raise AssertionError(kind)


def _to_wire(kind, v):
    if kind == "features":
        return list(v)
    if kind == "processes":
        return [[p.pid, p.tracker] for p in v]
    if kind == "runs":
        return b"".join(_RUN.pack(a, n) for a, n in v)
    return v


def _from_wire(kind, w, what):
    """Turn an unpacked value into the event's Python value (shape only;
    _check_kind validates it afterwards)."""
    if kind == "processes":
        if type(w) is not tuple:
            raise _Invalid(f"{what} must be an array, got {_show(w)}")
        out = []
        for i, p in enumerate(w):
            if type(p) is not tuple or len(p) != 2:
                raise _Invalid(f"{what}[{i}] must be a [pid, tracker] pair, got {_show(p)}")
            out.append(Process(*p))
        return tuple(out)
    if kind == "runs":
        if type(w) is not bytes or len(w) % _RUN.size:
            raise _Invalid(f"{what} must be a bin of 16-byte (addr, npages) records")
        return tuple(_RUN.iter_unpack(w))
    return w


# -- events --------------------------------------------------------------------

class Event:
    """Base of every frame's event.  Subclasses are frozen dataclasses with a
    wire TYPE and a _SPEC of (field, kind) in wire order."""

    TYPE: ClassVar[int] = 0
    _SPEC: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __post_init__(self):
        # Accept lists from callers, store tuples: events stay hashable and
        # compare equal to what the decoder produces.
        for name, kind in self._SPEC:
            v = getattr(self, name)
            if kind in ("features", "processes") and type(v) is list:
                object.__setattr__(self, name, tuple(v))
            elif kind == "runs" and type(v) in (list, tuple):
                object.__setattr__(self, name, tuple(
                    tuple(r) if type(r) is list else r for r in v))

    def _check(self, lim: Limits, page_size: int | None) -> None:
        """Cross-field checks; the per-field ones come from _SPEC."""


@dataclass(frozen=True)
class Process:
    """One process of a migration and the tracker following its memory."""
    pid: int
    tracker: str


@dataclass(frozen=True)
class Hello(Event):
    """First frame each way.  features: names of optional abilities (a side
    only uses one if both list it; "zstd": may receive zstd page batches).
    auth: "psk" if this side holds a pre-shared key, "none" otherwise."""
    version: int
    role: str
    node_name: str
    features: tuple[str, ...]
    auth: str
    TYPE = 1
    _SPEC = (("version", "u32"), ("role", "name"), ("node_name", "label"),
             ("features", "features"), ("auth", "name"))

    def _check(self, lim, page_size):
        if self.role not in ROLES:
            raise _Invalid(f"Hello.role must be one of {ROLES}, got {_show(self.role)}")
        if self.auth not in AUTH_MODES:
            raise _Invalid(f"Hello.auth must be one of {AUTH_MODES}, got {_show(self.auth)}")


@dataclass(frozen=True)
class AuthChallenge(Event):
    """A fresh random nonce the peer must fold into its AuthResponse."""
    nonce: bytes
    TYPE = 2
    _SPEC = (("nonce", "bin32"),)


@dataclass(frozen=True)
class AuthResponse(Event):
    """HMAC-SHA256 proving the pre-shared key (see auth.response)."""
    mac: bytes
    TYPE = 3
    _SPEC = (("mac", "bin32"),)


@dataclass(frozen=True)
class AuthResult(Event):
    """The author's verdict on its peer.  ok=False ends the connection."""
    ok: bool
    reason: str
    TYPE = 4
    _SPEC = (("ok", "bool"), ("reason", "text"))


@dataclass(frozen=True)
class StartMigration(Event):
    """Sender -> receiver: the processes to migrate, each with its tracker,
    and the page size every later address and count refers to."""
    migration_id: str
    processes: tuple[Process, ...]
    page_size: int
    TYPE = 5
    _SPEC = (("migration_id", "name"), ("processes", "processes"), ("page_size", "u32"))

    def _check(self, lim, page_size):
        ps = self.page_size
        if not MIN_PAGE_SIZE <= ps <= MAX_PAGE_SIZE or ps & (ps - 1):
            raise _Invalid(f"StartMigration.page_size must be a power of two in "
                           f"{MIN_PAGE_SIZE}..{MAX_PAGE_SIZE}, got {ps}")


@dataclass(frozen=True)
class PageBatch(Event):
    """Contents of some pages of one process.  runs: ascending, disjoint
    (addr, npages); data: the pages back to back in run order, encoded with
    codec; checksum: CRC-32C of the uncompressed data.  Build one with
    make_page_batch, read one with decode_pages (which verifies it)."""
    pid: int
    runs: tuple[tuple[int, int], ...]
    codec: str
    data: bytes
    checksum: int
    TYPE = 6
    _SPEC = (("pid", "u32"), ("runs", "runs"), ("codec", "name"),
             ("data", "bin"), ("checksum", "u32"))

    def __repr__(self):  # never dump megabytes of page data into a log
        return (f"PageBatch(pid={self.pid}, runs={len(self.runs)}, "
                f"codec={self.codec!r}, data={len(self.data)} bytes, "
                f"checksum={self.checksum:#010x})")

    def npages(self) -> int:
        return sum(n for _, n in self.runs)

    def _check(self, lim, page_size):
        if page_size is None:
            raise _Invalid("PageBatch before the page size is known (no StartMigration)")
        if self.codec not in CODECS:
            raise _Invalid(f"PageBatch.codec {self.codec!r} is unknown; known: {CODECS}")
        if not self.runs:
            raise _Invalid("PageBatch has no runs")
        total = 0
        prev_end = 0
        for i, (addr, n) in enumerate(self.runs):
            if addr % page_size:
                raise _Invalid(f"PageBatch.runs[{i}]: address {addr:#x} is not "
                               f"aligned to the page size {page_size}")
            if n == 0:
                raise _Invalid(f"PageBatch.runs[{i}] is empty")
            total += n
            if total > lim.max_batch_pages:
                raise _Invalid(f"PageBatch holds more than {lim.max_batch_pages} pages")
            end = addr + n * page_size
            if end > 1 << 64:
                raise _Invalid(f"PageBatch.runs[{i}] ({addr:#x} + {n} pages) "
                               f"runs past the end of the address space")
            if addr < prev_end:
                raise _Invalid(f"PageBatch.runs[{i}] at {addr:#x} overlaps or "
                               f"precedes the previous run (runs must ascend)")
            prev_end = end
        size = total * page_size
        if size > lim.max_batch_bytes:
            raise _Invalid(f"PageBatch covers {size} bytes; the limit is {lim.max_batch_bytes}")
        if self.codec == "raw" and len(self.data) != size:
            raise _Invalid(f"raw PageBatch carries {len(self.data)} bytes for "
                           f"{total} pages of {page_size} ({size} bytes)")
        if self.codec == "zstd" and len(self.data) >= size:
            # encode_pages sends raw whenever zstd does not shrink the data.
            raise _Invalid(f"zstd PageBatch payload ({len(self.data)} bytes) is "
                           f"not smaller than its {size} bytes of pages")


@dataclass(frozen=True)
class RoundEnd(Event):
    """Sender: round `round` (1, 2, ...) is complete.  dirty_pages: pages
    sent in this round's batches (the receiver checks the count);
    sent_bytes: frame bytes the sender wrote for the round (statistics)."""
    round: int
    dirty_pages: int
    sent_bytes: int
    TYPE = 7
    _SPEC = (("round", "uint"), ("dirty_pages", "uint"), ("sent_bytes", "uint"))


@dataclass(frozen=True)
class SwitchOver(Event):
    """Sender: the source is frozen; `round` is the number of the final
    round (delta pages and images), which a RoundEnd closes.  reason: why
    now ("converged", "max-rounds", "forced", ...), for the logs."""
    round: int
    reason: str
    TYPE = 8
    _SPEC = (("round", "uint"), ("reason", "text"))


@dataclass(frozen=True)
class Images(Event):
    """A chunk of one of CRIU's non-memory image files; last marks the
    file's final chunk.  name is a bare file name (never a path)."""
    name: str
    data: bytes
    last: bool
    TYPE = 9
    _SPEC = (("name", "name"), ("data", "bin"), ("last", "bool"))

    def __repr__(self):
        return f"Images(name={self.name!r}, data={len(self.data)} bytes, last={self.last})"


@dataclass(frozen=True)
class RestoreResult(Event):
    """Receiver: whether the restore succeeded.  On ok the restored tasks
    wait, stopped, for Commit; on failure the migration is over (aborted)."""
    ok: bool
    message: str
    TYPE = 10
    _SPEC = (("ok", "bool"), ("message", "text"))


@dataclass(frozen=True)
class Commit(Event):
    """Sender: the commit point.  Sent once the source is to be destroyed;
    the receiver then resumes the restored tasks."""
    TYPE = 11


@dataclass(frozen=True)
class Abort(Event):
    """Either side: stop the migration in an orderly way (the source keeps
    running, the destination discards what it has)."""
    reason: str
    TYPE = 12
    _SPEC = (("reason", "text"),)


@dataclass(frozen=True)
class Error(Event):
    """Either side: a failure ended the connection.  phase: the state the
    author was in (e.g. "migrating"); message: what went wrong."""
    phase: str
    message: str
    TYPE = 13
    _SPEC = (("phase", "name"), ("message", "text"))


EVENT_TYPES: dict[int, type[Event]] = {
    c.TYPE: c for c in (Hello, AuthChallenge, AuthResponse, AuthResult,
                        StartMigration, PageBatch, RoundEnd, SwitchOver, Images,
                        RestoreResult, Commit, Abort, Error)}
_BULK_TYPES = (PageBatch.TYPE, Images.TYPE)  # may use max_frame; others max_control_frame


# -- bodies ---------------------------------------------------------------------

def _validate(event: Event, lim: Limits, page_size: int | None) -> None:
    for name, kind in event._SPEC:
        _check_kind(kind, getattr(event, name), f"{type(event).__name__}.{name}", lim)
    event._check(lim, page_size)


def check_event(event: Event, limits: Limits = DEFAULT_LIMITS,
                page_size: int | None = None) -> None:
    """Raise LocalProtocolError if `event` could not be sent."""
    if type(event) not in EVENT_TYPES.values():
        raise LocalProtocolError(f"not a protocol event: {_show(event)}")
    try:
        _validate(event, limits, page_size)
    except _Invalid as e:
        raise LocalProtocolError(f"cannot send invalid {type(event).__name__}: {e}") from None


def encode_body(event: Event, seq: int, limits: Limits = DEFAULT_LIMITS,
                page_size: int | None = None) -> bytes:
    """The msgpack body of one frame (no length, no tag)."""
    check_event(event, limits, page_size)
    if type(seq) is not int or not 0 <= seq < 1 << 64:
        raise LocalProtocolError(f"sequence number out of range: {_show(seq)}")
    body = msgpack.packb(
        [event.TYPE, seq] + [_to_wire(k, getattr(event, n)) for n, k in event._SPEC],
        use_bin_type=True)
    limit = limits.max_frame if event.TYPE in _BULK_TYPES else limits.max_control_frame
    if len(body) + TAG_SIZE > limit:
        raise LocalProtocolError(f"{type(event).__name__} frame of {len(body)} bytes "
                                 f"exceeds the limit of {limit}; send smaller pieces")
    return body


def _bin_header(n: int) -> bytes:
    """msgpack's header of a bin of n bytes, as msgpack.packb writes it."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


def encode_body_parts(event: Event, seq: int, limits: Limits = DEFAULT_LIMITS,
                      page_size: int | None = None) -> list:
    """The body of encode_body as pieces whose concatenation is exactly
    encode_body's bytes.  A PageBatch comes as [head, data, tail] with its
    data as given (no copy of the pages: a gathering write sends them);
    any other event as [body]."""
    if type(event) is not PageBatch:
        return [encode_body(event, seq, limits, page_size)]
    check_event(event, limits, page_size)
    if type(seq) is not int or not 0 <= seq < 1 << 64:
        raise LocalProtocolError(f"sequence number out of range: {_show(seq)}")
    data = event.data
    # Everything up to the data, then the data's bin header: the array's
    # elements are packed one after the other, so this is packb's output.
    head = msgpack.packb([event.TYPE, seq, event.pid, _to_wire("runs", event.runs),
                          event.codec], use_bin_type=True)
    head = bytes([0x90 + 2 + len(event._SPEC)]) + head[1:] + _bin_header(len(data))
    tail = msgpack.packb(event.checksum)
    n = len(head) + len(data) + len(tail)
    if n + TAG_SIZE > limits.max_frame:
        raise LocalProtocolError(f"PageBatch frame of {n} bytes exceeds the limit "
                                 f"of {limits.max_frame}; send smaller pieces")
    return [head, data, tail]


def frame(body: bytes, tag: bytes = b"") -> bytes:
    """Length prefix + body + optional tag: one frame on the wire."""
    return LENGTH.pack(len(body) + len(tag)) + body + tag


def encode_frame(event: Event, seq: int, limits: Limits = DEFAULT_LIMITS,
                 page_size: int | None = None) -> bytes:
    """One untagged frame."""
    return frame(encode_body(event, seq, limits, page_size))


_UINT_FORMATS = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q"}


def _read_uint(body: bytes, off: int, what: str) -> tuple[int, int]:
    """A msgpack unsigned integer at body[off]: (value, offset after it)."""
    if off >= len(body):
        raise MalformedFrame(f"frame body ends before its {what}")
    b = body[off]
    if b <= 0x7f:
        return b, off + 1
    fmt = _UINT_FORMATS.get(b)
    if fmt is None:
        raise MalformedFrame(f"{what} must be an unsigned integer, got msgpack "
                             f"byte {b:#04x}")
    size = struct.calcsize(fmt)
    if len(body) < off + 1 + size:
        raise MalformedFrame(f"frame body ends inside its {what}")
    return struct.unpack_from(fmt, body, off + 1)[0], off + 1 + size


def peek(body: bytes) -> tuple[type[Event], int]:
    """Frame type and sequence number from a body's first bytes, without
    unpacking the rest (so illegal or replayed frames cost nothing)."""
    if len(body) < 3:
        raise MalformedFrame(f"frame body of {len(body)} bytes is too short")
    if not 0x90 <= body[0] <= 0x9f:
        raise MalformedFrame(f"frame body must start with a msgpack fixarray, "
                             f"got byte {body[0]:#04x}")
    if body[1] > 0x7f:
        raise MalformedFrame(f"frame type must be a msgpack fixint, got byte {body[1]:#04x}")
    cls = EVENT_TYPES.get(body[1])
    if cls is None:
        raise UnknownFrameType(f"unknown frame type {body[1]}")
    seq, _ = _read_uint(body, 2, "sequence number")
    return cls, seq


def _reject_ext(code, data):
    raise _Invalid(f"msgpack extension type {code} is not used by this protocol")


_BIN_SIZES = {0xc4: 1, 0xc5: 2, 0xc6: 4}
_STR_SIZES = {0xd9: 1, 0xda: 2, 0xdb: 4}


def _read_len(body, off: int, sizes: dict) -> tuple[int, int] | None:
    """(length, offset after the header) of the msgpack bin/str header at
    `off` whose type byte is one of `sizes`, else None."""
    n_size = sizes.get(body[off])
    if n_size is None:
        return None
    return int.from_bytes(body[off + 1:off + 1 + n_size], "big"), off + 1 + n_size


def _fast_page_batch(body, limits: Limits, page_size):
    """(seq, PageBatch) whose data is a view into `body` (no copy of the
    pages), or None when the body is not laid out the usual way; the
    generic decoder then judges it (and words any error).  Accepts exactly
    what msgpack.unpackb would, for this one shape."""
    try:
        if body[0] != 0x97:
            return None
        _, off = _read_uint(body, 1, "type")
        seq, off = _read_uint(body, off, "seq")
        pid, off = _read_uint(body, off, "pid")
        if (got := _read_len(body, off, _BIN_SIZES)) is None:
            return None
        n, off = got
        runs = bytes(body[off:off + n])
        off += n
        if 0xa0 <= body[off] <= 0xbf:   # fixstr
            n, off = body[off] - 0xa0, off + 1
        elif (got := _read_len(body, off, _STR_SIZES)) is not None:
            n, off = got
        else:
            return None
        if n > max(limits.max_string, limits.max_name):
            return None
        codec = str(body[off:off + n], "utf-8")
        off += n
        if (got := _read_len(body, off, _BIN_SIZES)) is None:
            return None
        n, off = got
        data = memoryview(body)[off:off + n]
        off += n
        checksum, off = _read_uint(body, off, "checksum")
    except (IndexError, MalformedFrame, UnicodeDecodeError):
        return None
    if off != len(body) or len(runs) % _RUN.size or len(data) != n:
        return None
    try:
        _uint(seq, "sequence number")
        event = PageBatch(pid, tuple(_RUN.iter_unpack(runs)), codec,
                          data.toreadonly(), checksum)
        _validate(event, limits, page_size)
    except _Invalid as e:
        raise MalformedFrame(str(e)) from None
    return seq, event


def decode_body(body: bytes, limits: Limits = DEFAULT_LIMITS,
                page_size: int | None = None) -> tuple[int, Event]:
    """(seq, event) from one frame body; ProtocolError if anything is off.
    A PageBatch's data may be a read-only memoryview into `body`."""
    cls, _ = peek(body)
    name = cls.__name__
    limit = limits.max_frame if cls.TYPE in _BULK_TYPES else limits.max_control_frame
    if len(body) > limit:
        raise FrameTooLarge(f"{name} frame of {len(body)} bytes; the limit is {limit}")
    if cls is PageBatch:
        fast = _fast_page_batch(body, limits, page_size)
        if fast is not None:
            return fast
    if cls is Hello and body[0] >= 0x93:
        # Look at the version before the field count: another version may
        # have another Hello, and "version mismatch" is the useful answer.
        _, off = _read_uint(body, 2, "sequence number")
        version, _ = _read_uint(body, off, "Hello.version")
        if version != PROTOCOL_VERSION:
            raise VersionMismatch(f"peer speaks protocol version {version}; "
                                  f"this side speaks {PROTOCOL_VERSION}")
    try:
        items = msgpack.unpackb(
            body, raw=False, use_list=False, strict_map_key=True,
            max_str_len=max(limits.max_string, limits.max_name),
            max_bin_len=limits.max_frame,
            max_array_len=max(limits.max_processes, limits.max_features, 16),
            max_map_len=0, max_ext_len=0, ext_hook=_reject_ext)
    except _Invalid as e:
        raise MalformedFrame(f"{name} frame: {e}") from None
    except (ValueError, TypeError, OverflowError, msgpack.UnpackException) as e:
        # msgpack's own errors (bad bytes, trailing data, nesting, limits)
        raise MalformedFrame(f"{name} frame is not valid msgpack for this "
                             f"protocol: {type(e).__name__}: {e}") from None
    if len(items) != 2 + len(cls._SPEC):
        raise MalformedFrame(f"{name} frame has {len(items) - 2} fields, "
                             f"expected {len(cls._SPEC)}")
    seq = items[1]
    try:
        _uint(seq, "sequence number")
        values = [_from_wire(k, w, f"{name}.{n}")
                  for (n, k), w in zip(cls._SPEC, items[2:])]
        event = cls(*values)
        _validate(event, limits, page_size)
    except _Invalid as e:
        raise MalformedFrame(str(e)) from None
    return seq, event


# -- framing -------------------------------------------------------------------

class FrameReader:
    """Splits a byte stream into frames (length prefix removed, tag kept).

    Limits are applied as soon as the bytes that carry them arrive: the
    length after 4 bytes, the type-specific size after 6, so an oversized
    frame is refused before its body is buffered.

    Two ways in: feed(bytes), or, without copying, get_buffer() /
    buffer_updated(n) (a socket's recv_into writes straight into the
    frame's own buffer; a frame is then handed out without being copied
    again).  Limit errors are raised by next_frame(), after the frames
    that arrived before the bad one.
    """

    _HEAD = LENGTH.size + 2      # the length and the body's first 2 bytes

    def __init__(self, limits: Limits = DEFAULT_LIMITS):
        self._lim = limits
        self._head = bytearray(self._HEAD)
        self._hlen = 0           # bytes of _head filled
        self._n = 0              # announced frame length, once known
        self._frame: bytearray | None = None   # body + tag being filled
        self._flen = 0
        self._ready: list[bytearray] = []
        self._err: ProtocolError | None = None
        self.eof = False

    # -- filling ---------------------------------------------------------
    def get_buffer(self) -> memoryview:
        """Where the next bytes of the stream go; empty once the stream
        is known to be bad (next_frame raises why)."""
        if self._err is not None:
            return memoryview(b"")
        if self._frame is None:
            return memoryview(self._head)[self._hlen:]
        return memoryview(self._frame)[self._flen:]

    def buffer_updated(self, n: int) -> None:
        """n bytes were written at the start of get_buffer(); 0 = end of stream."""
        if n == 0:
            self.eof = True
            return
        if self.eof:
            raise LocalProtocolError("data received after end of stream")
        if self._frame is not None:
            self._flen += n
            if self._flen == len(self._frame):
                self._ready.append(self._frame)
                self._frame = None
                self._hlen = 0
            return
        before = self._hlen
        self._hlen += n
        try:
            if before < LENGTH.size <= self._hlen:
                self._check_length()
            if self._hlen == self._HEAD:
                self._check_type()
                self._frame = bytearray(self._n)
                self._frame[:2] = self._head[LENGTH.size:]
                self._flen = 2
        except ProtocolError as e:
            self._err = e

    def _check_length(self) -> None:
        (n,) = LENGTH.unpack_from(self._head)
        if n > self._lim.max_frame:
            raise FrameTooLarge(f"frame of {n} bytes announced; the limit is "
                                f"{self._lim.max_frame}")
        if n < 3:
            raise MalformedFrame(f"frame of {n} bytes announced; a frame has "
                                 f"at least 3")
        self._n = n

    def _check_type(self) -> None:
        t = self._head[LENGTH.size + 1]
        n = self._n
        if (t in EVENT_TYPES and t not in _BULK_TYPES
                and n > self._lim.max_control_frame + TAG_SIZE):
            raise FrameTooLarge(f"{EVENT_TYPES[t].__name__} frame of {n} bytes "
                                f"announced; the limit is "
                                f"{self._lim.max_control_frame}")

    def feed(self, data: bytes) -> None:
        if self.eof and data:
            raise LocalProtocolError("data received after end of stream")
        if not data:
            self.eof = True
            return
        view = memoryview(data).cast("B")
        while view:
            buf = self.get_buffer()
            if not buf:
                return  # a bad stream: the rest is not looked at
            k = min(len(buf), len(view))
            buf[:k] = view[:k]
            view = view[k:]
            self.buffer_updated(k)

    # -- reading ---------------------------------------------------------
    @property
    def buffered(self) -> int:
        return (self._hlen if self._frame is None else LENGTH.size + self._flen) + \
            sum(len(f) + LENGTH.size for f in self._ready)

    @property
    def at_eof(self) -> bool:
        return self.eof and not self.buffered

    def next_frame(self) -> bytearray | None:
        """The next complete frame, or None until more bytes arrive."""
        if self._ready:
            return self._ready.pop(0)
        if self._err is not None:
            raise self._err
        if not self.eof:
            return None
        if self._frame is not None:
            raise ConnectionLost(f"stream ended inside a frame: {self._flen} of "
                                 f"{self._n} bytes arrived")
        if self._hlen >= LENGTH.size:
            raise ConnectionLost(f"stream ended inside a frame: "
                                 f"{self._hlen - LENGTH.size} of {self._n} bytes arrived")
        if self._hlen:
            raise ConnectionLost(f"stream ended inside a length prefix "
                                 f"({self._hlen} of 4 bytes)")
        return None


# -- page payloads ---------------------------------------------------------------

def encode_pages(data: bytes, level: int | None = 3) -> tuple[str, bytes]:
    """(codec, payload) for pages back to back.  level None means no
    compression; otherwise a zstd level (negative: faster).  Data zstd does
    not shrink (already compressed or random) travels raw, so the receiver
    never pays for decompressing it."""
    if level is None or not data:
        return "raw", bytes(data)
    if type(level) is not int or not -(1 << 17) <= level <= 22:
        raise LocalProtocolError(f"zstd level must be an int in -131072..22 or None, "
                                 f"got {_show(level)}")
    # A compressor per call: contexts are not thread-safe, and their setup
    # is small next to a batch of pages.  Content size goes in the frame
    # header; decode_pages requires it.
    out = zstandard.ZstdCompressor(level=level, write_content_size=True).compress(data)
    if len(out) >= len(data):
        return "raw", bytes(data)
    return "zstd", out


class PageEncoder:
    """encode_pages for a stream of batches: one zstd context for all of
    them (use it from one thread at a time), and no time spent compressing
    what does not compress.  While batches compress below RATIO of their
    size each is compressed whole; one that does not travels raw and the
    next SKIP batches go raw without a try; then a PROBE-byte sample of a
    batch decides whether to try the whole again.  Random or already
    compressed memory thus costs one small sample per SKIP batches."""

    PROBE = 64 << 10
    SKIP = 16
    RATIO = 0.95

    def __init__(self, level: int | None = 3):
        if level is not None and (type(level) is not int
                                  or not -(1 << 17) <= level <= 22):
            raise LocalProtocolError(f"zstd level must be an int in -131072..22 "
                                     f"or None, got {_show(level)}")
        self.level = level
        self._z = (None if level is None else
                   zstandard.ZstdCompressor(level=level, write_content_size=True))
        self._skip = 0
        self._probe = True

    def encode(self, data) -> tuple[str, object]:
        """(codec, payload); a raw payload is `data` itself (no copy)."""
        if self._z is None or not len(data):
            return "raw", data
        if self._skip:
            self._skip -= 1
            return "raw", data
        if self._probe and len(data) >= 4 * self.PROBE:
            sample = memoryview(data)[:self.PROBE]
            if len(self._z.compress(sample)) >= self.RATIO * len(sample):
                self._skip = self.SKIP
                return "raw", data
        out = self._z.compress(data)
        if len(out) >= self.RATIO * len(data):
            self._skip, self._probe = self.SKIP, True
            return "raw", data
        self._probe = False
        return "zstd", out

    def batch(self, pid: int, runs, data) -> PageBatch:
        """A PageBatch for pages `data` (back to back, in `runs` order),
        encoded by this stream; like make_page_batch."""
        codec, payload = self.encode(data)
        return PageBatch(pid, runs, codec, payload, crc32c(data))


def make_page_batch(pid: int, runs, data: bytes, level: int | None = 3) -> PageBatch:
    """A PageBatch for pages `data` (back to back, in `runs` order)."""
    codec, payload = encode_pages(data, level)
    return PageBatch(pid, runs, codec, payload, crc32c(data))


def _window_for(size: int) -> int:
    w = 1 << 10                          # zstd's smallest window
    while w < size:
        w <<= 1
    return w


def decode_pages(batch: PageBatch, page_size: int,
                 limits: Limits = DEFAULT_LIMITS) -> bytes:
    """The uncompressed, verified pages of `batch` (back to back).

    The output is bounded before any decompression: the zstd frame must
    declare exactly the size its runs cover, the window is capped to that
    size, and a frame that yields more, less, or has trailing bytes fails.
    """
    try:
        _validate(batch, limits, page_size)
    except _Invalid as e:
        raise PageDataError(str(e)) from None
    expected = batch.npages() * page_size
    if batch.codec == "raw":
        out = batch.data
    else:
        try:
            declared = zstandard.frame_content_size(batch.data)
        except zstandard.ZstdError as e:
            raise PageDataError(f"zstd payload has no valid frame header: {e}") from None
        if declared != expected:
            what = "no size" if declared < 0 else f"{declared} bytes"
            raise PageDataError(f"zstd payload declares {what}; its runs cover "
                                f"{expected} bytes")
        try:
            d = zstandard.ZstdDecompressor(max_window_size=_window_for(expected))
            obj = d.decompressobj()
            out = obj.decompress(batch.data)
        except zstandard.ZstdError as e:
            raise PageDataError(f"zstd payload does not decompress: {e}") from None
        if not obj.eof or obj.unused_data:
            raise PageDataError("zstd payload is not exactly one complete frame")
        if len(out) != expected:
            raise PageDataError(f"zstd payload decompressed to {len(out)} bytes; "
                                f"expected {expected}")
    crc = crc32c(out)
    if crc != batch.checksum:
        raise PageDataError(f"page data checksum mismatch for pid {batch.pid}: "
                            f"crc32c {crc:#010x}, batch says {batch.checksum:#010x}")
    return out
