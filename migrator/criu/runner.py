"""Running the ``criu`` binary for the final checkpoint and the restore.

The binary is ``$MIGRATOR_CRIU`` if set, else ``criu`` on PATH.  Every run
logs at ``-v4`` into the images directory (``dump.log``, ``restore.log``;
CRIU resolves ``-o`` against its work dir, which defaults to the images
dir), and a failure becomes ``CriuError(phase, message)`` quoting CRIU's
``Error (`` lines from that log, the part a person needs to see.

Stopped hand-over (ARCHITECTURE.md, "never two running instances"):

- ``dump(..., leave_stopped=True)`` is ``criu dump --leave-stopped``: after
  the checkpoint CRIU detaches from the tree and leaves every task stopped
  with SIGSTOP instead of killing it.  The source can then be destroyed
  (SIGKILL) once the destination confirms, or resumed (``resume``) if the
  hand-over is undone.
- ``restore(..., leave_stopped=True)`` is ``criu restore --leave-stopped``:
  CRIU restores the whole tree and, in its last step, sends SIGSTOP to every
  restored process instead of letting it run.  With ``--restore-detached``
  CRIU itself exits and the tree is reparented to CRIU's parent's reaper.
- ``resume(root_pid)`` sends SIGCONT to every process of the tree (the
  root and its descendants; a stopped tree cannot fork, so the list is
  stable).  SIGCONT to one thread continues its whole thread group.

One consequence to know: a task that was *already* stopped (job control)
when it was dumped is resumed too, since after ``--leave-stopped`` every
task is stopped alike.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from typing import Iterable, Optional, Sequence, Union

from migrator.kernel import procfs

LOG_LEVEL = 4
DEFAULT_TIMEOUT = 300.0
MAX_QUOTED_LINES = 20

_ERROR_RE = re.compile(r"\bError \(")
_VERSION_RE = re.compile(r"Version:\s*(\S+)")

PathLike = Union[str, os.PathLike]


class CriuError(RuntimeError):
    """``criu <phase>`` failed; the message quotes CRIU's own errors."""

    def __init__(self, phase: str, message: str, log: Optional[str] = None,
                 returncode: Optional[int] = None):
        super().__init__(f"criu {phase}: {message}")
        self.phase = phase
        self.message = message
        self.log = log  # path of CRIU's log for this run, if any
        self.returncode = returncode


def criu_binary() -> str:
    configured = os.environ.get("MIGRATOR_CRIU")
    if configured:
        return configured
    found = shutil.which("criu")
    if not found:
        raise CriuError("exec", "criu not found on PATH (set MIGRATOR_CRIU)")
    return found


def _run(phase: str, args: Sequence[str], timeout: Optional[float],
         log: Optional[str] = None, pass_fds: Sequence[int] = ()
         ) -> subprocess.CompletedProcess:
    argv = [criu_binary(), *args]
    try:
        res = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, errors="replace", timeout=timeout,
                             pass_fds=tuple(pass_fds))
    except FileNotFoundError as e:
        raise CriuError(phase, f"cannot run {argv[0]}: {e.strerror}") from e
    except subprocess.TimeoutExpired as e:
        # subprocess.run has killed criu (SIGKILL, by its pid).  A dump cut
        # short leaves its tasks detached from ptrace and running; the
        # caller still owns the decision to resume or kill them.
        raise CriuError(phase, f"timed out after {timeout}s"
                        + quote_errors(log, e.stderr), log) from None
    if res.returncode != 0:
        raise CriuError(phase, f"exit status {res.returncode}"
                        + quote_errors(log, res.stderr), log, res.returncode)
    return res


def quote_errors(log: Optional[str], stderr) -> str:
    """CRIU's error lines from the log (else the tail of its stderr)."""
    if isinstance(stderr, bytes):
        stderr = stderr.decode(errors="replace")
    lines: list[str] = []
    if log:
        try:
            with open(log, errors="replace") as f:
                lines = [ln.rstrip() for ln in f if _ERROR_RE.search(ln)]
        except OSError:
            pass
    if not lines and stderr:
        lines = [ln for ln in stderr.splitlines() if _ERROR_RE.search(ln)] \
            or stderr.strip().splitlines()[-5:]
    if not lines:
        return f" (no error lines; see {log})" if log else ""
    if len(lines) > MAX_QUOTED_LINES:
        skipped = len(lines) - MAX_QUOTED_LINES
        lines = lines[:MAX_QUOTED_LINES] + [f"... {skipped} more"]
    where = f" (log: {log})" if log else ""
    return where + "\n  " + "\n  ".join(lines)


def _common(images_dir: str, log_name: str, log_level: int) -> list[str]:
    return ["-D", images_dir, "-o", log_name, f"-v{log_level}"]


def criu_version(timeout: float = 30.0) -> str:
    """The version string of the criu binary ("4.1.1")."""
    res = _run("--version", ["--version"], timeout)
    m = _VERSION_RE.search(res.stdout)
    if not m:
        raise CriuError("--version", f"unexpected output {res.stdout.strip()!r}")
    return m.group(1)


def check(timeout: float = 60.0) -> str:
    """``criu check``: raises CriuError unless CRIU works on this kernel;
    returns its output ("Looks good.")."""
    res = _run("check", ["check"], timeout)
    return (res.stdout + res.stderr).strip()


def dump(pid: int, images_dir: PathLike, leave_stopped: bool = True,
         shell_job: bool = False, tcp_established: bool = False,
         extra: Iterable[str] = (), *, log_name: str = "dump.log",
         log_level: int = LOG_LEVEL, timeout: Optional[float] = DEFAULT_TIMEOUT,
         pass_fds: Sequence[int] = ()) -> str:
    """Checkpoint the tree rooted at `pid` into `images_dir` (created if
    missing).  Returns the log's path.  pass_fds: descriptors CRIU inherits
    (a page server's socket named in `extra`)."""
    images_dir = os.fspath(images_dir)
    os.makedirs(images_dir, exist_ok=True)
    args = ["dump", "-t", str(pid), *_common(images_dir, log_name, log_level)]
    if leave_stopped:
        args.append("--leave-stopped")
    if shell_job:
        args.append("--shell-job")
    if tcp_established:
        args.append("--tcp-established")
    args.extend(extra)
    log = os.path.join(images_dir, log_name)
    _run("dump", args, timeout, log, pass_fds)
    return log


def restore(images_dir: PathLike, detached: bool = True, leave_stopped: bool = True,
            pidfile: Optional[PathLike] = None, shell_job: bool = False,
            tcp_established: bool = False, extra: Iterable[str] = (), *,
            log_name: str = "restore.log", log_level: int = LOG_LEVEL,
            timeout: Optional[float] = DEFAULT_TIMEOUT) -> int:
    """Restore the tree dumped in `images_dir`; returns the root's pid.

    With ``detached`` CRIU exits once the tree runs (or, with
    ``leave_stopped``, is stopped); ``resume(pid)`` continues it.  The pid
    comes from CRIU's ``--pidfile`` (a temporary file unless given).
    """
    images_dir = os.fspath(images_dir)
    own_pidfile = pidfile is None
    if own_pidfile:
        fd, pidfile = tempfile.mkstemp(prefix=".restore-", suffix=".pid", dir=images_dir)
        os.close(fd)
        os.unlink(pidfile)  # CRIU creates it exclusively
    pidfile = os.path.abspath(os.fspath(pidfile))
    args = ["restore", *_common(images_dir, log_name, log_level), "--pidfile", pidfile]
    if detached:
        args.append("--restore-detached")
    if leave_stopped:
        args.append("--leave-stopped")
    if shell_job:
        args.append("--shell-job")
    if tcp_established:
        args.append("--tcp-established")
    args.extend(extra)
    log = os.path.join(images_dir, log_name)
    try:
        _run("restore", args, timeout, log)
        try:
            with open(pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError) as e:
            raise CriuError("restore", f"no root pid in {pidfile}: {e}", log) from e
    finally:
        if own_pidfile:
            try:
                os.unlink(pidfile)
            except FileNotFoundError:
                pass


def resume(root_pid: int) -> list[int]:
    """SIGCONT every process of the tree rooted at `root_pid` (see the
    module docstring); returns the pids signalled."""
    tree = procfs.process_tree(root_pid)
    done = []
    for pid in tree:
        try:
            os.kill(pid, signal.SIGCONT)
            done.append(pid)
        except ProcessLookupError:
            pass  # exited meanwhile (killed by someone else)
    return done
