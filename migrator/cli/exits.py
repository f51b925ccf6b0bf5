"""Exit codes, stable for scripts, and the one place errors become them."""

from __future__ import annotations

import errno
import sys
from contextlib import contextmanager

from migrator.kernel.native import NativeBuildError
from migrator.tracking.base import TrackerError
from migrator.tracking.report import ProcessGone

OK = 0
FAILURE = 1          # anything unexpected; the message says what
USAGE = 2            # bad options (typer's own code too)
NO_PROCESS = 3       # the target process does not exist or exited
TRACKER = 4          # the requested tracker cannot be used here
PERMISSION = 5       # not root / ptrace or /proc access denied
MIGRATION = 6        # the migration failed; the source runs as before
UNDECIDED = 7        # hand-over outcome unknown: see the message (resolve)
INTERRUPTED = 130    # Ctrl-C or SIGTERM; everything was cleaned up

class DemoFailed(Exception):
    """`migrator demo` could not run its migration."""


def _migration_errors():
    from migrator.criu.runner import CriuError
    from migrator.migration.source import MigrationError
    from migrator.migration.transport import TransportError
    from migrator.protocol.frames import ProtocolError
    return [(DemoFailed, MIGRATION), (MigrationError, MIGRATION), (CriuError, MIGRATION),
            (TransportError, MIGRATION), (ProtocolError, MIGRATION)]


TABLE = [
    (ProcessGone, NO_PROCESS),
    (TrackerError, TRACKER),
    (NativeBuildError, FAILURE),
    (PermissionError, PERMISSION),
    (KeyboardInterrupt, INTERRUPTED),
]


def code_for(exc: BaseException) -> int:
    if getattr(exc, "phase", None) == "commit":
        return UNDECIDED
    for kind, code in TABLE + _migration_errors():
        if isinstance(exc, kind):
            return code
    if isinstance(exc, OSError) and exc.errno in (errno.EPERM, errno.EACCES):
        return PERMISSION
    return FAILURE


@contextmanager
def errors_to_exit(emit_error):
    """Run a command body; turn known errors into a message and a code.
    `emit_error(message, code)` prints in the command's output format."""
    try:
        yield
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - this is the one place
        code = code_for(e)
        if code == FAILURE and not isinstance(e, (OSError, NativeBuildError,
                                                  ValueError)):
            raise  # a bug: keep the traceback
        msg = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
        if getattr(e, "phase", None):
            msg = f"{e.phase}: {msg}"
        emit_error(msg, code)
        sys.exit(code)
