"""A whole live migration on one machine: `migrator send` and `migrator
recv` over loopback, the receiver in a pid namespace of its own (CRIU
restores a process under its own pid, which the source holds until the
Commit), then back.

It lives in tests/linux because that tier also runs inside the test
guests: the x86_64 guest has the one kernel with soft-dirty, and the arm64
guest is the architecture this project exists for (no soft-dirty, uffd-wp
only).  There each tracker carries a real migration, not only a collect.
On a machine without CRIU (the host keeps its CRIU in the node image,
where tests/e2e migrate between nodes) it skips and says so.

The workload is tests/workloads/counter.py: it checks its whole buffer
every tick and logs "<tick> <pid> <start pid> ok|BAD" to a file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from migrator.tracking import features
from tests.beds.waiting import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COUNTER = os.path.join(ROOT, "tests", "workloads", "counter.py")
MIGRATOR = [sys.executable, "-m", "migrator"]
NEEDS = {"uffd-wp": ["uffd_wp_async", "pagemap_scan", "ptrace_injection"],
         "soft-dirty": ["soft_dirty", "ptrace_injection"],
         "full": []}
# Under TCG emulation a Python start costs seconds.
SLOW = float(os.environ.get("MIGRATOR_LOCAL_MIGRATION_TIMEOUT", "600"))


@pytest.fixture(params=list(NEEDS))
def tracker(request):
    if os.geteuid() != 0:
        pytest.skip("a migration needs root (ptrace, CRIU, pid namespaces)")
    if not shutil.which("criu"):
        pytest.skip("criu is not installed on this machine (the node image and "
                    "the test guests have it; tests/e2e migrate between nodes)")
    if not shutil.which("unshare"):
        pytest.skip("unshare (util-linux) is missing: no pid namespace for the receiver")
    caps = features.probe()
    for cap in NEEDS[request.param]:
        if not getattr(caps, cap):
            pytest.skip(f"kernel capability {cap} missing: {caps.why[cap]}")
    return request.param


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Progress:
    def __init__(self, path):
        self.path = path

    def lines(self):
        try:
            with open(self.path) as f:
                return [line.split() for line in f.read().splitlines() if line]
        except FileNotFoundError:
            return []

    def ticks(self) -> int:
        return len(self.lines())

    def assert_healthy(self, pid):
        lines = self.lines()
        assert lines and all(line[3] == "ok" for line in lines), lines[-5:]
        ticks = [int(line[0]) for line in lines]
        assert ticks == list(range(1, len(ticks) + 1)), "ticks lost or repeated"
        assert {int(line[1]) for line in lines} == {pid}


class Namespace:
    """A shell as pid 1 of a new pid namespace (with its own /proc), that
    runs one command and then waits; killing it ends everything in it."""

    def __init__(self, command: str, log: str):
        self.proc = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child", "sh", "-c",
             f"{command} >{log} 2>&1; exec sleep 3600"],
            stdin=subprocess.DEVNULL, start_new_session=True)
        self.log = log

    def text(self) -> str:
        try:
            with open(self.log) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def init_pid(self) -> int:
        """The namespace's pid 1 (sh), as the parent namespace sees it."""
        with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
            return int(f.read().split()[0])

    def close(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)  # --kill-child takes the rest
        self.proc.wait()


def migrate(send_prefix, pid, tracker, port, tmp_path, receiver):
    """Run `migrator send` (prefixed, e.g. with nsenter) to the receiver
    listening on port (receiver() is its log so far); returns the done
    event."""
    wait_for(lambda: "listening" in receiver(), SLOW, "the receiver to listen")
    r = subprocess.run(send_prefix + MIGRATOR + [
        "send", "--pid", str(pid), "--to", f"127.0.0.1:{port}", "--insecure",
        "--json", "--tracker", tracker, "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=SLOW, cwd=ROOT)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert r.returncode == 0 and events and events[-1]["event"] == "done", \
        (r.returncode, r.stdout[-2000:], r.stderr[-3000:], receiver()[-3000:])
    return events[-1]


def test_live_migration_into_a_pid_namespace_and_back(tracker, tmp_path):
    progress = Progress(str(tmp_path / "counter.progress"))
    work = subprocess.Popen([sys.executable, COUNTER, progress.path, "4", "0.05"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True,
                            cwd=str(tmp_path))
    pid = work.pid
    port_in, port_back = free_port(), free_port()
    ns = back = None
    try:
        wait_for(lambda: progress.ticks() >= 3, SLOW, "the workload to count")
        # there: the receiver is in the new namespace, the source here
        ns = Namespace(
            " ".join(MIGRATOR + ["recv", "--listen", f"127.0.0.1:{port_in}",
                                 "--dir", str(tmp_path / "in"), "--once",
                                 "--insecure", "--json"]),
            str(tmp_path / "recv-in.log"))
        done = migrate([], pid, tracker, port_in, tmp_path, ns.text)
        assert done["tracker"] == tracker, done
        work.wait(timeout=30)          # our child, destroyed at the Commit
        before = progress.ticks()
        wait_for(lambda: progress.ticks() >= before + 3, SLOW,
                   "the restored workload to count on")
        # back: the source now runs in the namespace, the receiver here
        back = subprocess.Popen(
            MIGRATOR + ["recv", "--listen", f"127.0.0.1:{port_back}", "--dir",
                        str(tmp_path / "back"), "--once", "--insecure", "--json"],
            stdout=open(tmp_path / "recv-back.log", "w"), stderr=subprocess.STDOUT,
            cwd=ROOT)
        enter = ["nsenter", "--target", str(ns.init_pid()), "--pid", "--mount"]
        done = migrate(enter, pid, tracker, port_back, tmp_path,
                       lambda: (tmp_path / "recv-back.log").read_text())
        assert done["tracker"] == tracker, done
        assert back.wait(timeout=60) == 0
        before = progress.ticks()
        wait_for(lambda: progress.ticks() >= before + 3, SLOW,
                   "the workload to count on back home")
        with open(f"/proc/{pid}/status") as f:
            assert "\nNSpid:\t%d\n" % pid in f.read()   # in this namespace again
        progress.assert_healthy(pid)
    finally:
        if back is not None and back.poll() is None:
            back.kill()
            back.wait()
        if ns is not None:
            ns.close()
        if work.poll() is None:
            work.kill()
            work.wait()
        # the workload restored back here is not our child: by its pid,
        # once we know it is the counter
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if COUNTER.encode() in f.read():
                    os.kill(pid, signal.SIGKILL)
        except (FileNotFoundError, ProcessLookupError):
            pass
