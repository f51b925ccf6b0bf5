"""Run syscalls inside another process (ptrace syscall injection).

    with Injection(pid, timeout=2.0) as inj:
        res = inj.syscall(nr, *args)      # raw result, -errno on failure
        fd = inj.syscall_checked(nr, *args)  # raises OSError instead

While the ``with`` block runs, every thread of ``pid`` is stopped and the
calling thread's termination signals (SIGINT, SIGTERM, ...) are blocked;
they are delivered when the block ends, after the target runs again.

``syscall`` returns the raw result because a negative value is a normal
answer of the *target* (e.g. -EPERM from a seccomp filter) that callers
often want to inspect; failures of the injection itself raise OSError.
"""

from __future__ import annotations

import os

from migrator.kernel.native import check, ffi, lib


class Injection:
    """A ptrace session on every thread of ``pid``.  ``handle`` is the
    native ``struct mig_inject *`` for other native calls (uffd)."""

    def __init__(self, pid: int, timeout: float = 2.0):
        self.pid = int(pid)
        self.timeout = float(timeout)
        self.handle = None

    def __enter__(self) -> "Injection":
        out = ffi.new("struct mig_inject **")
        check(lib.mig_inject_attach(self.pid, int(self.timeout * 1000), out),
              f"cannot stop pid {self.pid} for syscall injection")
        self.handle = out[0]
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Restore registers, resume and detach.  Idempotent."""
        handle, self.handle = self.handle, None
        if handle is not None:
            check(lib.mig_inject_detach(handle),
                  f"detaching from pid {self.pid}")

    def _args(self, args) -> "ffi.CData":
        if len(args) > 6:
            raise TypeError("a syscall takes at most 6 arguments")
        return ffi.new("long[6]", [int(a) for a in args] + [0] * (6 - len(args)))

    def _live(self):
        if self.handle is None:
            raise ValueError(f"injection session for pid {self.pid} is closed")
        return self.handle

    def syscall(self, nr: int, *args: int) -> int:
        """Run syscall ``nr`` in the target; return its raw result."""
        res = ffi.new("long *")
        check(lib.mig_inject_syscall(self._live(), nr, self._args(args), res),
              f"injecting syscall {nr} into pid {self.pid}")
        return res[0]

    def syscall_checked(self, nr: int, *args: int) -> int:
        """Like ``syscall``, but a -errno result raises OSError."""
        res = self.syscall(nr, *args)
        if -4095 <= res < 0:
            raise OSError(-res, f"syscall {nr} inside pid {self.pid}: "
                          f"{os.strerror(-res)}")
        return res

    def seccomp_verdict(self, nr: int, *args: int) -> int:
        """The masked SECCOMP_RET_* action the target's filters would take
        for this syscall (``lib.SECCOMP_RET_ALLOW`` when no filter)."""
        return check(lib.mig_seccomp_verdict(self._live(), nr, self._args(args)),
                     f"reading seccomp filters of pid {self.pid}")

    def would_kill(self, nr: int, *args: int) -> bool:
        v = self.seccomp_verdict(nr, *args)
        return v in (lib.SECCOMP_RET_KILL_PROCESS, lib.SECCOMP_RET_KILL_THREAD)


__all__ = ["Injection"]
