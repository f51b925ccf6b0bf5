"""CRIU's lazy-pages daemon, for a restore that does not wait for memory.

``criu restore --lazy-pages`` restores everything but the private
anonymous memory (the pagemap entries CRIU flags ``PE_LAZY``) and hands
each restored process's userfaultfd to a ``criu lazy-pages`` daemon, which
fills a page when the process first touches it and copies every other
page in the background; it exits once all pages are in.  Here both run on
the destination, and the daemon asks for the pages over CRIU's
page-server protocol (criu/page_server.py StorePageServer, run as a
process of its own by migration/store_server.py), which reads them from
the page stores: nothing is copied before the tree resumes, and no page
waits for the network.

The cost is a window of risk: until the daemon exits, part of the tree's
memory exists only in the page stores.  If the daemon dies (killed, out of
memory), pages it had not copied would read as zeroes once its
userfaultfd closes, so a failed daemon means the restored tree must be
killed.  The daemon talks to the restore over ``lazy-pages.socket`` in
the work directory (the images directory here).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from typing import Optional

from migrator.criu.runner import LOG_LEVEL, CriuError, criu_binary, quote_errors

SOCKET = "lazy-pages.socket"
LOG = "lazy-pages.log"


class LazyPages:
    """One daemon serving one restore from `images_dir`."""

    def __init__(self, images_dir: str, proc: subprocess.Popen):
        self.images_dir = images_dir
        self.proc = proc
        self.log = os.path.join(images_dir, LOG)

    @classmethod
    def start(cls, images_dir: str, timeout: float = 10.0,
              ps_socket: Optional[socket.socket] = None) -> "LazyPages":
        """Start the daemon and wait until it listens (CRIU's restore
        fails at once if the socket is not there).  ps_socket: the
        daemon's end of a socket to a page server that answers for the
        lazy pages (closed here once the daemon has it); without one the
        daemon reads them from the images."""
        images_dir = os.fspath(images_dir)
        argv = [criu_binary(), "lazy-pages", "-D", images_dir, "-W", images_dir,
                "-o", LOG, f"-v{LOG_LEVEL}"]
        fds: tuple[int, ...] = ()
        if ps_socket is not None:
            fds = (ps_socket.fileno(),)
            argv += ["--page-server", "--ps-socket", str(fds[0])]
        try:
            # Output goes to the log only, and a session of its own: the
            # daemon must not die on a closed pipe or with the receiver's
            # Ctrl-C while the tree depends on it.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, pass_fds=fds, start_new_session=True)
        except OSError as e:
            raise CriuError("lazy-pages", f"cannot run {argv[0]}: {e.strerror}") from e
        finally:
            if ps_socket is not None:
                ps_socket.close()
        daemon = cls(images_dir, proc)
        end = time.monotonic() + timeout
        sock = os.path.join(images_dir, SOCKET)
        while not os.path.exists(sock):
            if proc.poll() is not None:
                why = quote_errors(daemon.log, "")
                raise CriuError("lazy-pages", f"exit status {proc.returncode} before "
                                f"listening{why}", daemon.log, proc.returncode)
            if time.monotonic() > end:
                daemon.kill()
                raise CriuError("lazy-pages", f"not listening after {timeout:.0f}s",
                                daemon.log)
            time.sleep(0.01)
        return daemon

    def wait(self, timeout: Optional[float]) -> None:
        """Until every page is in the restored tree; CriuError if the
        daemon failed or did not finish in time (it is killed then)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CriuError("lazy-pages", f"still copying pages after {timeout:.0f}s",
                            self.log) from None
        if rc != 0:
            raise CriuError("lazy-pages", f"exit status {rc}{quote_errors(self.log, '')}",
                            self.log, rc)

    def kill(self) -> None:
        """SIGKILL the daemon (ours, by its pid) and reap it."""
        if self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
