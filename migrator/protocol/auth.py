"""Pre-shared-key authentication and per-frame integrity.  No I/O.

Mutual challenge-response: after the Hellos, each side sends a fresh
32-byte nonce (AuthChallenge) and answers the peer's with::

    response = HMAC-SHA256(psk, "migrator-auth-v1" 0x00 responder_role 0x00
                                 version<u32-be> sender_nonce receiver_nonce
                                 transcript)
    transcript = SHA-256(len<u32-be> sender_hello_body
                         len<u32-be> receiver_hello_body)

- The responder's role is in the MAC, so a side's own response reflected back
  to it does not verify, and both nonces are in it, so a response is fresh
  for this connection only (neither side can be made to answer a replayed
  challenge usefully).
- The transcript binds both Hello frames as sent, so a man in the middle
  cannot rewrite the peer's features or name without failing authentication.
  (A "none" Hello still downgrades a side that runs with insecure=True: that
  is what insecure means.  Without insecure, a side refuses a peer that
  offers no key.)

Every frame a side writes after its AuthResponse carries a tag (its
AuthResult included, so not even the verdict's text can be altered)::

    tag = HMAC-SHA256(direction_key, body)[:16]
    direction_key = HMAC-SHA256(psk, "migrator-frames-v1" 0x00 author_role 0x00
                                     sender_nonce receiver_nonce transcript)

The body contains the frame's sequence number, so a tag also refuses
replayed, reordered, injected or reflected frames (each direction has its own
key), and a key that never repeats across connections (fresh nonces).
Frames are authenticated, not encrypted: page contents are readable on the
wire.  Confidentiality is TLS's job, in the socket driver.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from migrator.protocol.frames import NONCE_SIZE, TAG_SIZE

MIN_PSK_SIZE = 16


def check_psk(psk) -> bytes:
    """The key as bytes; refuse keys too short to resist guessing."""
    if not isinstance(psk, (bytes, bytearray)):
        raise TypeError(f"pre-shared key must be bytes, got {type(psk).__name__}")
    if len(psk) < MIN_PSK_SIZE:
        raise ValueError(f"pre-shared key must be at least {MIN_PSK_SIZE} bytes, "
                         f"got {len(psk)}")
    return bytes(psk)


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def transcript(sender_hello: bytes, receiver_hello: bytes) -> bytes:
    h = hashlib.sha256()
    for body in (sender_hello, receiver_hello):
        h.update(len(body).to_bytes(4, "big"))
        h.update(body)
    return h.digest()


def response(psk: bytes, responder_role: str, version: int, sender_nonce: bytes,
             receiver_nonce: bytes, transcript_hash: bytes) -> bytes:
    msg = b"".join((b"migrator-auth-v1\0", responder_role.encode(), b"\0",
                    version.to_bytes(4, "big"), sender_nonce, receiver_nonce,
                    transcript_hash))
    return hmac.digest(psk, msg, "sha256")


def verify_response(expected: bytes, got: bytes) -> bool:
    # Constant time, so the time to refuse leaks nothing about the key.
    return hmac.compare_digest(expected, got)


def direction_key(psk: bytes, author_role: str, sender_nonce: bytes,
                  receiver_nonce: bytes, transcript_hash: bytes) -> bytes:
    msg = b"".join((b"migrator-frames-v1\0", author_role.encode(), b"\0",
                    sender_nonce, receiver_nonce, transcript_hash))
    return hmac.digest(psk, msg, "sha256")


def tag(key: bytes, body: bytes) -> bytes:
    return hmac.digest(key, body, "sha256")[:TAG_SIZE]


def tag_parts(key: bytes, parts) -> bytes:
    """tag() of the concatenation of `parts`, without concatenating them."""
    h = hmac.new(key, digestmod="sha256")
    for p in parts:
        h.update(p)
    return h.digest()[:TAG_SIZE]


def check_tag(key: bytes, body: bytes, got: bytes) -> bool:
    return hmac.compare_digest(tag(key, body), got)
