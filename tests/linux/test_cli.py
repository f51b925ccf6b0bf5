"""`migrator probe` and `migrator track` as a user runs them, as processes.

Includes the ways a tracking session can end badly: SIGKILL of the
tracker mid-round, SIGTERM, Ctrl-C, injected faults, and a target that
exits.  After each, the victim must carry no trace and keep running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from migrator.ranges import PAGE_SIZE, RangeList
from migrator.tracking import features
from tests.victims.control import Victim, assert_no_trace, fds, uffd_vmflags

MIGRATOR = [sys.executable, "-m", "migrator"]


def needs_uffd_wp():
    caps = features.probe()
    for cap in ("uffd_wp_async", "pagemap_scan", "ptrace_injection"):
        if not getattr(caps, cap):
            pytest.skip(f"kernel capability {cap} missing: {caps.why[cap]}")


def run(*args, env=None, timeout=60):
    return subprocess.run(MIGRATOR + list(args), capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def wait_until(cond, timeout=60.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


class Tracking:
    """`migrator track` in the background against a victim."""

    def __init__(self, pid, *extra, env=None):
        self.proc = subprocess.Popen(
            MIGRATOR + ["track", "--pid", str(pid), "--json", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, **(env or {})})

    def finish(self, timeout=30):
        try:
            out, err = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode, out, err


def test_probe_json_schema():
    r = run("probe", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["arch"] == features.arch()
    assert d["kernel"] == os.uname().release
    for cap in ("soft_dirty", "uffd_wp_async", "pagemap_scan",
                "ptrace_injection"):
        assert isinstance(d["capabilities"][cap], bool)
    assert d["processes"] == []


def test_probe_reports_each_process():
    with Victim() as plain, Victim() as user:
        fd = user.cmd("uffd")["fd"]
        r = run("probe", "--json", "--pid", str(plain.pid),
                "--pid", str(user.pid))
        assert r.returncode == 0, r.stderr
        procs = {p["pid"]: p for p in json.loads(r.stdout)["processes"]}
        assert procs[user.pid]["tracker"] == "full"
        assert f"fd {fd}" in procs[user.pid]["reason"]
        default = json.loads(r.stdout)["default_tracker"]["tracker"]
        assert procs[plain.pid]["tracker"] == default


def test_probe_unknown_pid_exit_code():
    r = run("probe", "--pid", "999999999")
    assert r.returncode == 3 and "no process" in r.stderr


def test_track_reports_written_pages_as_ranges():
    needs_uffd_wp()
    with Victim() as v:
        before = fds(v.pid)
        addr = v.cmd("mmap", pages=64)["addr"]
        v.cmd("write", addr=addr, pages=list(range(64)))
        t = Tracking(v.pid, "--interval", "0.3", "--rounds", "4", "--ranges")
        wait_until(lambda: uffd_vmflags(v.pid), what="registration")
        written = [1, 5, 6, 7, 40]
        v.cmd("write", addr=addr, pages=written, seed=3)
        code, out, err = t.finish()
        assert code == 0, err
        rounds = [json.loads(line) for line in out.splitlines()]
        assert [r["round"] for r in rounds] == [1, 2, 3, 4]
        assert {r["tracker"] for r in rounds} == {"uffd-wp"}
        reported = RangeList([])
        for r in rounds:
            assert r["dirty_pages"] >= 0
            reported = reported | RangeList(
                (int(s, 16), int(e, 16)) for s, e in r["ranges"])
        for p in written:
            assert reported.contains(addr + p * PAGE_SIZE)
        assert_no_trace(v.pid, before)


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "SIGINT"])
def test_tracker_ended_mid_round_leaves_no_trace(how):
    needs_uffd_wp()
    with Victim() as v:
        before = fds(v.pid)
        addr = v.cmd("mmap", pages=256)["addr"]
        t = Tracking(v.pid, "--interval", "0.05")
        wait_until(lambda: uffd_vmflags(v.pid), what="registration")
        for seed in range(5):
            v.cmd("write", addr=addr, pages=list(range(0, 256, 3)), seed=seed)
        t.proc.send_signal(getattr(signal, how))
        code, out, err = t.finish()
        if how == "SIGKILL":
            assert code == -signal.SIGKILL
        else:
            assert code == 130, err
        # The kernel drops the registration when our fd closes, and the
        # target never held a copy of it.
        wait_until(lambda: not uffd_vmflags(v.pid), what="unregistration")
        assert_no_trace(v.pid, before)
        assert v.cmd("ping")["pid"] == v.pid


@pytest.mark.parametrize("fault", ["uffd-register", "uffd-collect"])
def test_injected_failure_leaves_no_trace(fault):
    needs_uffd_wp()
    with Victim() as v:
        before = fds(v.pid)
        for _ in range(3):
            v.cmd("mmap", pages=8)
        t = Tracking(v.pid, "--interval", "0.05", "--rounds", "3",
                     env={"MIGRATOR_FAULT": fault})
        code, out, err = t.finish()
        assert code == 1 and "injected fault" in err, (code, err)
        assert_no_trace(v.pid, before)
        assert v.cmd("ping")["pid"] == v.pid


def test_target_exit_is_reported():
    needs_uffd_wp()
    v = Victim()
    try:
        t = Tracking(v.pid, "--interval", "0.1")
        wait_until(lambda: uffd_vmflags(v.pid), what="registration")
        v.close()
        code, out, err = t.finish()
    finally:
        v.close()
    assert code == 3, err
    assert json.loads(out.splitlines()[-1])["event"] == "error"


def test_forced_impossible_tracker_exit_code():
    with Victim() as v:
        v.cmd("uffd")
        r = run("track", "--pid", str(v.pid), "--tracker", "uffd-wp",
                "--rounds", "1")
        assert r.returncode == 4
        assert "already uses userfaultfd" in r.stderr
