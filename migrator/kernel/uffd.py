"""userfaultfd write-protection of another process's memory."""

from __future__ import annotations

import os

from migrator.kernel.native import check, ffi, lib


# The flags mig_uffd_open passes to userfaultfd(2) first, for seccomp checks:
# O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY.
USERFAULTFD_FLAGS = os.O_CLOEXEC | os.O_NONBLOCK | 1


class Userfaultfd:
    """A userfaultfd bound to a target's memory and held by us only.

    Closing it (or our death) makes the kernel drop every registration it
    made, which is what keeps a killed migrator from leaving a trace.
    """

    def __init__(self, fd: int, features: int, pid: int | None):
        self.fd = fd
        self.pid = pid
        self.wp_async = bool(features & lib.MIG_UFFD_HAS_WP_ASYNC)
        self.wp_unpopulated = bool(features & lib.MIG_UFFD_HAS_WP_UNPOPULATED)

    @classmethod
    def take_from(cls, injection, pidfd: int) -> "Userfaultfd":
        """Have the stopped target create one, take it, close its copy."""
        feats = ffi.new("unsigned *")
        fd = check(lib.mig_uffd_open(injection.handle, pidfd, feats),
                   f"userfaultfd in pid {injection.pid}")
        return cls(fd, feats[0], injection.pid)

    @classmethod
    def local(cls) -> "Userfaultfd":
        feats = ffi.new("unsigned *")
        fd = check(lib.mig_uffd_open_local(feats), "userfaultfd")
        return cls(fd, feats[0], None)

    def register_wp(self, start: int, end: int) -> None:
        check(lib.mig_uffd_register_wp(self.fd, start, end),
              f"UFFDIO_REGISTER(WP) [{start:#x}, {end:#x}) of pid {self.pid}")

    def unregister(self, start: int, end: int) -> None:
        check(lib.mig_uffd_unregister(self.fd, start, end),
              f"UFFDIO_UNREGISTER [{start:#x}, {end:#x}) of pid {self.pid}")

    def drop_markers(self, pagemap_fd: int, start: int, end: int) -> int:
        """Unprotect never-touched pages of [start, end) so their markers
        vanish from pagemap (see native/uffd.c); returns the page count."""
        return check(lib.mig_uffd_drop_markers(self.fd, pagemap_fd, start, end),
                     f"dropping uffd-wp markers [{start:#x}, {end:#x}) "
                     f"of pid {self.pid}")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

