"""Fault injection for tests, in the manner of CRIU's: MIGRATOR_FAULT names
failure points (comma-separated) at which the code raises as if the kernel
had failed there, so every cleanup path can be exercised for real.

Points: uffd-register (after the first range is registered),
uffd-collect (after the scan of a collect), commit-send (the source is
destroyed and Commit is about to be sent: the message "lost exactly at the
commit point").  One point slows instead of failing: store-server-slow
(each page request of a lazy restore waits 50 ms, so that a test can act
while the tree is still being filled).
"""

from __future__ import annotations

import errno
import os
import time


# Read once: set for a whole process by the test that starts it.
_ARMED = frozenset(os.environ.get("MIGRATOR_FAULT", "").split(",")) - {""}


def check(point: str) -> None:
    if point in _ARMED:
        raise OSError(errno.EIO, f"injected fault at {point} (MIGRATOR_FAULT)")


def pause(point: str, seconds: float) -> None:
    if point in _ARMED:
        time.sleep(seconds)
