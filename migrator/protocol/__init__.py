"""Sans-IO wire protocol of a migration: frames (codec), auth (pre-shared
key), connection (state machine).  Nothing here touches a socket or a file;
a driver feeds bytes in and writes the bytes it is given."""

from migrator.protocol.connection import (
    DEFAULT_FEATURES, NEED_DATA, Connection, ConnectionClosed, State,
)
from migrator.protocol.frames import (
    DEFAULT_LIMITS, PROTOCOL_VERSION, Abort, AuthChallenge, AuthenticationError,
    AuthResponse, AuthResult, Commit, ConnectionLost, Error, Event,
    FrameTooLarge, Hello, Images, Limits, LocalProtocolError, MalformedFrame,
    PageBatch, PageDataError, Process, ProtocolError, ReplayedFrame,
    RestoreResult, RoundEnd, StartMigration, SwitchOver, TamperedFrame,
    UnexpectedFrame, UnknownFrameType, VersionMismatch, decode_pages,
    encode_pages, make_page_batch,
)

__all__ = [
    "Abort", "AuthChallenge", "AuthResponse", "AuthResult", "AuthenticationError",
    "Commit", "Connection", "ConnectionClosed", "ConnectionLost",
    "DEFAULT_FEATURES", "DEFAULT_LIMITS", "Error", "Event", "FrameTooLarge",
    "Hello", "Images", "Limits", "LocalProtocolError", "MalformedFrame",
    "NEED_DATA", "PROTOCOL_VERSION", "PageBatch", "PageDataError", "Process",
    "ProtocolError", "ReplayedFrame", "RestoreResult", "RoundEnd",
    "StartMigration", "State", "SwitchOver", "TamperedFrame", "UnexpectedFrame",
    "UnknownFrameType", "VersionMismatch", "decode_pages", "encode_pages",
    "make_page_batch",
]
