"""The destination's memory held for the restore (migration/reserve.py):
how it grows, where it stops, how it is handed over, and the helper
process's life."""

from __future__ import annotations

import errno
import logging
import os
import signal
import time

import pytest

from migrator.migration import reserve
from migrator.migration.reserve import Reserve, hand_over, hold, store_bytes

MIB = 1 << 20


def rss_anon(pid="self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon for {pid}")


def test_store_bytes_counts_what_the_files_occupy(tmp_path):
    (tmp_path / "sparse").write_bytes(b"")
    os.truncate(tmp_path / "sparse", 64 * MIB)          # a hole: nothing held
    (tmp_path / "full").write_bytes(os.urandom(2 * MIB))
    assert 2 * MIB <= store_bytes(str(tmp_path)) < 3 * MIB
    assert store_bytes(str(tmp_path / "missing")) == 0


def test_hold_follows_the_need_with_memory_faulted_in():
    need = [6 * MIB]

    def done(timeout):
        if timeout != reserve.POLL:
            return False
        if need[0] == 6 * MIB:      # covered: the stores grow
            need[0] = 10 * MIB
            return False
        return True

    before = rss_anon()
    held = hold(lambda: need[0], spare=lambda: 1 << 40, done=done, step=MIB)
    try:
        assert len(held) == 10
        # faulted in, not just mapped (MADV_POPULATE_WRITE)
        assert rss_anon() - before >= 9 * MIB
    finally:
        for m in held:
            m.close()


def test_hold_stops_where_the_node_has_nothing_to_spare(caplog):
    asked = []

    def spare():
        asked.append(1)
        return (4 - len(asked) + 1) * MIB   # room for 4 steps of 1 MiB

    caplog.set_level(logging.WARNING, "migrator.reserve")
    held = hold(lambda: 64 * MIB, spare=spare,
                done=lambda t: t == reserve.SHORT_WAIT, step=MIB)
    assert len(held) == 4
    assert "stops at 4 MiB: the node has no more to spare" in caplog.text
    for m in held:
        m.close()


def test_hold_stops_on_enomem_instead_of_waking_the_oom_killer(monkeypatch, caplog):
    real, calls = reserve._fault_in, []

    def fault_in(m):
        calls.append(1)
        if len(calls) > 3:
            raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))
        real(m)

    monkeypatch.setattr(reserve, "_fault_in", fault_in)
    caplog.set_level(logging.WARNING, "migrator.reserve")
    held = hold(lambda: 64 * MIB, spare=lambda: 1 << 40,
                done=lambda t: t == reserve.SHORT_WAIT, step=MIB)
    assert len(held) == 3
    assert "stops at 3 MiB: Cannot allocate memory" in caplog.text
    for m in held:
        m.close()


def test_hold_raises_other_errors(monkeypatch):
    def fault_in(m):
        raise OSError(errno.EFAULT, "bad address")

    monkeypatch.setattr(reserve, "_fault_in", fault_in)
    with pytest.raises(OSError, match="bad address"):
        hold(lambda: 64 * MIB, spare=lambda: 1 << 40, done=lambda t: False, step=MIB)


class Unmapped:
    def __init__(self, memory):
        self.memory = memory

    def close(self):
        self.memory["free"] += reserve.STEP
        self.memory["released"] += 1


def test_hold_keeps_its_pace():
    """At `pace` bytes a second it waits between steps; what it already
    holds is kept and added to."""
    held, waits = [], []

    def done(timeout):
        waits.append(timeout)
        return len(held) >= 6 and timeout == reserve.POLL

    t0 = time.monotonic()
    hold(lambda: 6 * MIB, spare=lambda: 1 << 40, done=done, step=MIB,
         held=held, pace=16 * MIB)
    took = time.monotonic() - t0
    assert len(held) == 6
    assert took >= 5 / 16, took     # the 6th step waits until 5 MiB / 16 MiB/s
    assert MIB / (16 * MIB) in waits
    hold(lambda: 8 * MIB, spare=lambda: 1 << 40,
         done=lambda t: len(held) >= 8 and t == reserve.POLL, step=MIB, held=held)
    assert len(held) == 8
    for m in held:
        m.close()


def test_hand_over_frees_as_the_restore_takes_memory():
    """Free memory never runs more than one step beyond its start plus
    `ahead`, and everything is released in the end."""
    memory = {"free": 1000 * MIB, "released": 0, "peak": 0}
    base, ahead = memory["free"], 4 * reserve.STEP

    def free():
        memory["peak"] = max(memory["peak"], memory["free"])
        return memory["free"]

    def restore_faults(timeout):    # the restore takes 2 MiB per look
        memory["free"] -= 2 * MIB

    held = [Unmapped(memory) for _ in range(40)]
    hand_over(held, free, ahead=ahead, wait=restore_faults)
    assert held == [] and memory["released"] == 40
    assert memory["peak"] <= base + ahead + reserve.STEP


def test_cgroup_spare_takes_the_tightest_limit_on_the_way_up(tmp_path):
    root = tmp_path / "cg"
    leaf = root / "a" / "b"
    leaf.mkdir(parents=True)
    (root / "a" / "memory.max").write_text(f"{1024 * MIB}\n")
    (root / "a" / "memory.current").write_text(f"{900 * MIB}\n")
    (leaf / "memory.max").write_text("max\n")
    (leaf / "memory.current").write_text(f"{800 * MIB}\n")
    member = tmp_path / "cgroup"
    member.write_text("0::/a/b\n")
    assert reserve._cgroup_spare(str(root), str(member)) == \
        1024 * MIB - 900 * MIB - reserve.CGROUP_MARGIN
    (root / "a" / "memory.max").write_text("max\n")
    assert reserve._cgroup_spare(str(root), str(member)) is None
    member.write_text("1:name=systemd:/\n")     # no cgroup v2 line
    assert reserve._cgroup_spare(str(root), str(member)) is None


def wait_for(cond, timeout, what):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_helper_holds_the_stores_size_then_hands_it_over(tmp_path):
    (tmp_path / "pages").write_bytes(os.urandom(32 * MIB))
    r = Reserve(str(tmp_path))
    try:
        r.full_speed()
        r.full_speed()     # once is enough; again is harmless
        wait_for(lambda: rss_anon(r.proc.pid) >= 24 * MIB, 60,
                 "the helper to hold the stores' size")
        held = r.hand_over()
        assert 24 * MIB <= held <= 32 * MIB
    finally:
        r.release()
    assert r.proc.returncode is not None
    assert not os.path.exists(f"/proc/{r.proc.pid}")
    r.release()     # idempotent


def test_helper_that_does_not_answer_is_ended(tmp_path, caplog):
    r = Reserve(str(tmp_path))
    try:
        r.proc.send_signal(signal.SIGSTOP)      # as if starved of CPU
        caplog.set_level(logging.WARNING, "migrator.reserve")
        assert r.hand_over() == 0
        assert "did not answer" in caplog.text
        assert r.proc.returncode is not None
    finally:
        r.release()


@pytest.mark.parametrize("growing", [False, True], ids=["waiting", "growing"])
def test_helper_ends_when_the_receiver_goes(tmp_path, growing):
    """The receiver's end of the pipe closes when it dies, even by SIGKILL."""
    (tmp_path / "pages").write_bytes(os.urandom(8 * MIB))
    r = Reserve(str(tmp_path))
    try:
        if growing:
            r.full_speed()
            time.sleep(0.5)
        r.proc.stdin.close()
        assert r.proc.wait(timeout=10) == 0
    finally:
        r.release()
