"""Driving victim programs from tests, and checking they carry no trace."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

HERE = pathlib.Path(__file__).resolve().parent


class Victim:
    """A tests/victims/pages.py process; always ended by pid on close."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "pages.py")], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, bufsize=1)
        hello = json.loads(self.proc.stdout.readline())
        self.pid = hello["pid"]
        assert self.pid == self.proc.pid

    def cmd(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"victim {self.pid} died (status "
                               f"{self.proc.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise OSError(reply["error"])
        return reply

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("reap")
            except (OSError, RuntimeError, ValueError, BrokenPipeError):
                pass
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def fds(pid: int) -> dict[int, str]:
    out = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return out


def uffd_vmflags(pid: int) -> list[str]:
    """smaps VmFlags lines that mention a userfaultfd registration."""
    bad = []
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("VmFlags:"):
                flags = set(line.split()[1:])
                if flags & {"um", "uw", "ui"}:
                    bad.append(line.strip())
    return bad


def tracer_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


def assert_no_trace(pid: int, fds_before: dict[int, str]) -> None:
    """Invariant 3: no registration, no extra fd, not traced, running."""
    assert uffd_vmflags(pid) == [], "userfaultfd registration left behind"
    assert fds(pid) == fds_before, "fd table changed"
    assert tracer_of(pid) == 0, "still ptrace-attached"
    with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    assert state in ("S", "R"), f"victim state {state}"
