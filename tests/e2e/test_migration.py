"""Live migration of a process between two nodes, with `migrator send` and
`migrator recv` as a user runs them, and the ways it can go wrong.

The workload (tests/workloads/counter.py) keeps a buffer whose content is a
function of a counter it also holds in memory, checks it every tick and
appends "<tick> <pid> <start pid> ok|BAD" to a progress file in /shared,
which both nodes see: after a migration the ticks must continue on the
other node, under the same pid, with every check ok.
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest

from tests.beds import nodes
from tests.beds.waiting import wait_for

WORKLOADS = "/src/tests/workloads"
PORT = 7000


@pytest.fixture(scope="module")
def pair():
    from tests.beds import image
    try:
        image.ensure_image()
    except Exception as e:  # noqa: BLE001 - any reason the image cannot be had
        pytest.skip(f"node image cannot be built: {e}")
    with nodes.cluster(2) as (a, b):
        # Raise A's pid counter so workload pids are free on B (CRIU
        # restores under the same pid) and on A again after a round trip.
        a.run("echo 5000 > /proc/sys/kernel/ns_last_pid")
        yield a, b


class Workload:
    def __init__(self, node, name, mib=8, interval=0.05, memory="private"):
        self.progress = f"/shared/{name}.progress"
        self.node = node
        self.pid = int(node.run(
            f"setsid python3 {WORKLOADS}/counter.py {self.progress} {mib} "
            f"{interval} {memory} </dev/null >/dev/null 2>&1 & echo $!").stdout)
        wait_for(lambda: len(self.lines()) >= 5, 30, "workload progress")

    def lines(self):
        try:
            with open(self.node.host_path(self.progress)) as f:
                return [line.split() for line in f.read().splitlines() if line]
        except FileNotFoundError:
            return []

    def last_tick(self):
        return int(self.lines()[-1][0])

    def assert_healthy(self):
        lines = self.lines()
        bad = [line for line in lines if line[3] != "ok"]
        assert not bad, f"memory check failed: {bad[:3]}"
        ticks = [int(line[0]) for line in lines]
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), \
            "ticks lost or repeated"
        assert {int(line[1]) for line in lines} == {self.pid}

    def running_on(self, node) -> bool:
        r = node.run(["sh", "-c", f"cat /proc/{self.pid}/stat"], check=False)
        return r.returncode == 0 and r.stdout.split(")")[-1].split()[0] in "RS"

    def keeps_running(self, node, ticks=5):
        start = self.last_tick()
        wait_for(lambda: self.last_tick() >= start + ticks, 30,
                 f"workload {self.pid} to keep counting")
        assert self.running_on(node)

    def stop(self, node):
        node.run(["kill", "-9", str(self.pid)], check=False)


def receiver(node, peer_addr, *extra):
    log = f"/tmp/recv-{node.name}-{time.monotonic_ns()}.log"
    svc = node.spawn(["python3", "-m", "migrator", "recv", "--listen",
                      f"{peer_addr}:{PORT}", "--dir", "/var/tmp/mig", "--json",
                      "--once", *extra], log=log)
    wait_for(lambda: os.path.exists(log) and "listening" in open(log).read(),
             20, "the receiver to listen")
    return svc, log


def send(node, pid, to, *extra, timeout=180):
    r = node.run(["python3", "-m", "migrator", "send", "--pid", str(pid),
                  "--to", f"{to}:{PORT}", "--json", *extra],
                 check=False, timeout=timeout)
    events = [json.loads(line) for line in r.stdout.splitlines() if line.strip()]
    return r, events


def migrate(src, dst, w, *extra, recv_extra=()):
    svc, log = receiver(dst, src.peers[dst.name], "--insecure", *recv_extra)
    before = w.last_tick()
    r, events = send(src, w.pid, src.peers[dst.name], "--insecure", *extra)
    svc.wait(timeout=30)
    assert r.returncode == 0, (r.stderr[-2000:], open(log).read()[-2000:])
    done = events[-1]
    assert done["event"] == "done", events
    w.keeps_running(dst)
    assert not w.running_on(src), "the source copy still runs"
    assert w.last_tick() > before
    return events, open(log).read()


@pytest.mark.parametrize("tracker", ["uffd-wp", "full"])
def test_round_trips(pair, tracker):
    a, b = pair
    w = Workload(a, f"trip-{tracker}", mib=16)
    try:
        for src, dst in ((a, b), (b, a), (a, b), (b, a)):
            events, _ = migrate(src, dst, w, "--tracker", tracker,
                                "--bandwidth", "40", "--downtime-ms", "50")
            rounds = [e for e in events if e["event"] == "round"]
            done = events[-1]
            assert done["tracker"] == tracker
            print(f"\n{src.name}->{dst.name} [{tracker}]: {done['rounds']} "
                  f"rounds, downtime {done['downtime_ms']} ms, total "
                  f"{done['total_ms']} ms, {done['sent_bytes']} bytes, "
                  f"breakdown {done['breakdown_ms']}")
            if tracker == "full":
                # nothing is known clean: every page crosses frozen
                assert all(e["dirty_pages"] == 0 for e in rounds)
            else:
                assert rounds and rounds[0]["dirty_pages"] > 16 * 256 // 2
        w.assert_healthy()
    finally:
        w.stop(a)
        w.stop(b)


def test_lazy_restore_round_trip(pair):
    """recv --lazy-restore: the tree resumes before its memory is in, CRIU's
    lazy-pages daemon fills it from the page store (through the store
    server) meanwhile, and the workload's check of its whole memory, every
    tick, stays ok on both nodes."""
    a, b = pair
    w = Workload(a, "lazy", mib=32)
    try:
        for src, dst in ((a, b), (b, a)):
            events, log = migrate(src, dst, w, "--bandwidth", "40", "--downtime-ms", "50",
                                  recv_extra=("--lazy-restore",))
            done = events[-1]
            print(f"\n{src.name}->{dst.name} lazy: downtime {done['downtime_ms']} ms, "
                  f"breakdown {done['breakdown_ms']}")
            assert "lazy restore: every page in" in log, log[-2000:]
            w.keeps_running(dst)
        w.assert_healthy()
    finally:
        w.stop(a)
        w.stop(b)


def test_lazy_fill_outlives_the_receiver(pair):
    """The receiver is SIGKILLed right after the hand-over, while the
    lazy-pages daemon is still filling the tree (each page request slowed
    by MIGRATOR_FAULT=store-server-slow): the daemon and its store server
    are not the receiver's, so the tree still gets every page."""
    from migrator.kernel.procfs import process_tree
    a, b = pair
    # 16 MiB: the fill takes 3 to 15 s here (CRIU's background fetch
    # against the workload's own faults, each request 50 ms), and at worst
    # one request per page, 4096 * 50 ms.
    w = Workload(a, "lazykill", mib=16)
    log = f"/tmp/recv-lazykill-{time.monotonic_ns()}.log"
    svc = b.spawn(["env", "MIGRATOR_FAULT=store-server-slow", "python3", "-m",
                   "migrator", "recv", "--listen", f"{a.peers['b']}:{PORT}",
                   "--dir", "/var/tmp/mig", "--json", "--once", "--insecure",
                   "--lazy-restore"], log=log)
    try:
        wait_for(lambda: os.path.exists(log) and "listening" in open(log).read(),
                 20, "the receiver to listen")
        r, events = send(a, w.pid, a.peers["b"], "--insecure")
        assert r.returncode == 0 and events[-1]["event"] == "done", r.stderr[-2000:]
        recv_pid = next(p for p in process_tree(svc.pid)
                        if b"migrator\0recv" in open(f"/proc/{p}/cmdline", "rb").read())
        filling = b.run("pgrep -f 'criu [l]azy-pages'", check=False).stdout.split()
        os.kill(recv_pid, signal.SIGKILL)
        assert filling, "the daemon had finished before the receiver was killed"
        wait_for(lambda: not b.run("pgrep -f 'criu [l]azy-pages'", check=False).stdout.strip(),
                 300, "the lazy-pages daemon to finish")
        w.keeps_running(b, ticks=10)
        w.assert_healthy()
    finally:
        svc.stop()
        w.stop(a)
        w.stop(b)


def test_pre_copy_rounds_shrink_the_final_delta(pair):
    """With a slow link the workload dirties pages during round 1; later
    rounds send only those, and the frozen delta is a small part."""
    a, b = pair
    w = Workload(a, "rounds", mib=32, interval=0.02)
    try:
        events, _ = migrate(a, b, w, "--bandwidth", "16", "--downtime-ms", "20",
                         "--compress", "off",
                         "--max-rounds", "6")
        rounds = [e for e in events if e["event"] == "round"]
        done = events[-1]
        print(f"\nrounds {[r['dirty_pages'] for r in rounds]}, delta "
              f"{done['breakdown_ms']['delta_pages']} pages")
        assert len(rounds) >= 2
        assert rounds[1]["dirty_pages"] < rounds[0]["dirty_pages"] / 4
        assert done["breakdown_ms"]["delta_pages"] < rounds[0]["dirty_pages"] / 4
        w.assert_healthy()
    finally:
        w.stop(a)
        w.stop(b)


@pytest.mark.parametrize("recv_extra", [(), ("--no-reserve",)], ids=["reserve", "no-reserve"])
def test_memory_held_for_the_restore(pair, recv_extra):
    """While pre-copy runs, a helper of the receiver holds as much memory as
    the page stores; it hands it over to the restore and ends.  With
    --no-reserve there is none."""
    a, b = pair
    w = Workload(a, f"reserve{len(recv_extra)}", mib=64)
    try:
        seen = []
        svc, log = receiver(b, a.peers["b"], "--insecure", *recv_extra)
        sender, slog = start_sender(a, w.pid, a.peers["b"], "--insecure",
                                    "--bandwidth", "16")
        while sender.running():
            seen += reserve_helpers(b)
            time.sleep(0.2)
        assert sender.wait(timeout=10) == 0, open(slog).read()[-2000:]
        svc.wait(timeout=30)
        done = json.loads(open(slog).read().strip().splitlines()[-1])
        held = done["breakdown_ms"]["reserved_mib"]
        print(f"\nheld for the restore: {held} MiB, breakdown {done['breakdown_ms']}")
        if recv_extra:
            assert held == 0 and not seen
        else:
            # 64 MiB of stores; round 1 takes 4 s at 16 MiB/s, the helper
            # grows at up to 64 MiB/s meanwhile when the CPU is idle
            assert seen and held >= 32
        w.keeps_running(b)
        assert not reserve_helpers(b), "the memory reserve outlived the restore"
        w.assert_healthy()
    finally:
        w.stop(a)
        w.stop(b)


def test_shared_memory_round_trip(pair):
    """A buffer in anonymous shared memory: CRIU dumps it as shmem, which
    the sender's page server writes whole (it is not in any process's
    clean set) and the destination restores from the images."""
    a, b = pair
    w = Workload(a, "shm", mib=4, memory="shared")
    try:
        migrate(a, b, w)
        migrate(b, a, w)
        w.assert_healthy()
    finally:
        w.stop(a)
        w.stop(b)


def test_pid_taken_on_the_destination(pair):
    """CRIU restores a process under its own pid: one taken on the
    destination fails the move with a message that says so, and the
    source keeps running."""
    a, b = pair
    w = Workload(a, "pidclash", mib=4)
    holder = svc = None
    # B's pids stay below A's workloads' (the fixture raised A's counter)
    last = b.run("cat /proc/sys/kernel/ns_last_pid").stdout.strip()
    try:
        holder = b.run(f"echo {w.pid - 1} > /proc/sys/kernel/ns_last_pid; "
                       "setsid sleep 600 </dev/null >/dev/null 2>&1 & echo $!").stdout.strip()
        assert holder == str(w.pid), "could not take the workload's pid on B"
        svc, log = receiver(b, a.peers[b.name], "--insecure")
        r, events = send(a, w.pid, a.peers[b.name], "--insecure")
        svc.wait(timeout=30)
        assert r.returncode != 0
        err = events[-1]
        assert err["event"] == "error" and "restore" in err["message"], events
        assert f"in use on this node: {w.pid} (sleep)" in err["message"], err
        w.keeps_running(a)
        w.assert_healthy()
    finally:
        if svc is not None:
            svc.stop()
        if holder:
            b.run(["kill", "-9", holder], check=False)
        b.run(f"echo {last} > /proc/sys/kernel/ns_last_pid")
        w.stop(a)
        w.stop(b)


def test_destination_out_of_space(pair):
    """The destination's --dir fills up during pre-copy: the source hears
    why, keeps running, and the destination keeps nothing."""
    a, b = pair
    w = Workload(a, "nospace", mib=32)
    small = "/var/tmp/small"
    b.run(f"mkdir -p {small} && mount -t tmpfs -o size=8m none {small}")
    svc = None
    try:
        log = f"/tmp/recv-nospace-{time.monotonic_ns()}.log"
        svc = b.spawn(["python3", "-m", "migrator", "recv", "--listen",
                       f"{a.peers[b.name]}:{PORT}", "--dir", f"{small}/mig", "--json",
                       "--once", "--insecure"], log=log)
        wait_for(lambda: os.path.exists(log) and "listening" in open(log).read(),
                 20, "the receiver to listen")
        r, events = send(a, w.pid, a.peers[b.name], "--insecure")
        svc.wait(timeout=30)
        assert r.returncode != 0
        msg = events[-1]["message"]
        assert "the destination failed" in msg and "No space left on device" in msg, msg
        assert f"{small}/mig" in msg, msg           # which store
        w.keeps_running(a)
        w.assert_healthy()
        assert b.run(f"find {small} -type f").stdout.strip() == ""
    finally:
        if svc is not None:
            svc.stop()
        b.run(f"umount {small}", check=False)
        w.stop(a)
        w.stop(b)


def test_mapping_churn_keeps_tracking(pair):
    """A thread maps, splits and unmaps small mappings all the time, so
    mappings come and go under every collect: the process stays tracked by
    uffd-wp through each move and its memory stays intact.  (A mapping
    unmapped between the read of /proc/PID/maps and its registration once
    made the process look exited, its whole memory then crossing in the
    downtime; that race is rare here, and is pinned down by
    tests/linux/test_trackers.py::test_uffd_wp_mapping_unmapped_while_being_registered.)"""
    a, b = pair
    w = Workload(a, "churn", mib=8, memory="churn")
    try:
        for src, dst in ((a, b), (b, a), (a, b)):
            events, _ = migrate(src, dst, w)
            assert events[-1]["tracker"] == "uffd-wp", events[-1]
        w.assert_healthy()
    finally:
        w.stop(a)
        w.stop(b)


@pytest.mark.parametrize("recv_extra", [(), ("--lazy-restore",)], ids=["plain", "lazy"])
def test_process_tree_moves_whole(pair, recv_extra):
    """A shell with two counting children: the whole tree moves, every
    process tracked on its own, pids kept (lazily: the store server answers
    for each process's pages)."""
    a, b = pair
    progress = [f"/shared/tree-{i}-{len(recv_extra)}.progress" for i in (1, 2)]
    root = int(a.run(
        "setsid sh -c '"
        + " ".join(f"python3 {WORKLOADS}/counter.py {p} 4 0.05 &" for p in progress)
        + " wait' </dev/null >/dev/null 2>&1 & echo $!").stdout)
    kids = []
    try:
        workers = []
        for p in progress:
            w = Workload.__new__(Workload)
            w.node, w.progress = a, p
            wait_for(lambda w=w: len(w.lines()) >= 5, 30, "child progress")
            w.pid = int(w.lines()[-1][1])
            workers.append(w)
        kids = [w.pid for w in workers]
        svc, log = receiver(b, a.peers["b"], "--insecure", *recv_extra)
        r, events = send(a, root, a.peers["b"], "--insecure")
        svc.wait(timeout=30)
        assert r.returncode == 0, r.stderr[-2000:]
        if recv_extra:
            assert "lazy restore: every page in" in open(log).read()
        tracked = {p["pid"]: p["tracker"] for p in events[0]["processes"]}
        assert set(tracked) == {root, *kids}, tracked
        for w in workers:
            w.keeps_running(b)
            assert not w.running_on(a)
            w.assert_healthy()
    finally:
        for node in (a, b):
            node.run(["kill", "-9", str(root), *map(str, kids)], check=False)


def test_process_exiting_during_precopy(pair):
    """A shell that runs a short-lived child every tick: children tracked
    at the start exit during pre-copy, new ones appear; the tree still
    moves and keeps going."""
    a, b = pair
    progress = "/shared/shortlived.progress"
    root = int(a.run(
        "setsid sh -c 'i=0; while true; do i=$((i+1)); sleep 0.2; "
        f"echo \"$i $$ $$ ok\" >> {progress}; done' "
        "</dev/null >/dev/null 2>&1 & echo $!").stdout)
    w = Workload.__new__(Workload)
    w.node, w.progress, w.pid = a, progress, root
    try:
        wait_for(lambda: len(w.lines()) >= 3, 30, "shell progress")
        svc, log = receiver(b, a.peers["b"], "--insecure")
        r, events = send(a, root, a.peers["b"], "--insecure",
                         "--bandwidth", "1", "--compress", "off",
                         "--max-rounds", "3")
        svc.wait(timeout=30)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "exited during pre-copy" in r.stderr
        w.keeps_running(b)
        w.assert_healthy()
    finally:
        for node in (a, b):
            node.run(["kill", "-9", str(root)], check=False)


# ------------------------------------------------------------ failures
#
# Whatever fails before the commit point, the source must keep running as
# before (not stopped, no tracker left in it) and the destination must hold
# nothing of the migration afterwards.

def uffd_flags(node, pid) -> list[str]:
    r = node.run(["sh", "-c", f"grep -E '^VmFlags:.* (uw|um|ui)( |$)' "
                  f"/proc/{pid}/smaps || true"], check=False)
    return r.stdout.split("\n") if r.stdout.strip() else []


def assert_source_intact(node, w):
    assert uffd_flags(node, w.pid) == [], "tracking left in the source"
    w.keeps_running(node)
    w.assert_healthy()


def reserve_helpers(node) -> list[str]:
    """Pids of memory-reserve helpers (migration/reserve.py) on node."""
    r = node.run(["pgrep", "-f", "migrator[.]migration[.]reserve"], check=False)
    return r.stdout.split()


def assert_destination_empty(node):
    r = node.run(["sh", "-c", "ls -A /var/tmp/mig 2>/dev/null || true"])
    assert r.stdout.strip() == "", f"left on the destination: {r.stdout}"
    wait_for(lambda: not reserve_helpers(node), 10, "the memory reserve to end")


SLOW = ("--bandwidth", "2", "--downtime-ms", "1")  # pre-copy lasts seconds


def start_sender(node, pid, to, *extra):
    log = f"/tmp/send-{time.monotonic_ns()}.log"
    svc = node.spawn(["python3", "-m", "migrator", "send", "--pid", str(pid),
                      "--to", f"{to}:{PORT}", "--json", *extra], log=log)
    wait_for(lambda: os.path.exists(log) and '"round"' in open(log).read()
             or (os.path.exists(log) and '"start"' in open(log).read()),
             30, "the sender to start")
    return svc, log


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_destination_killed_during_precopy(pair, how):
    a, b = pair
    w = Workload(a, f"dstkill-{how}", mib=32)
    try:
        svc, log = receiver(b, a.peers["b"], "--insecure")
        sender, slog = start_sender(a, w.pid, a.peers["b"], "--insecure",
                                    "--timeout", "5", *SLOW)
        time.sleep(1)
        # the receiver's process group, started by this test
        os.killpg(svc.pid, getattr(signal, how))
        svc.wait(timeout=10)
        code = sender.wait(timeout=60)
        out = open(slog).read()
        assert code == 6, out[-2000:]
        assert '"event": "error"' in out
        assert_source_intact(a, w)
        if how == "SIGKILL":
            # nothing could clean up; the next receiver removes the leftovers
            svc, _ = receiver(b, a.peers["b"], "--insecure")
            svc.stop()
        assert_destination_empty(b)
    finally:
        w.stop(a)


def test_link_cut_during_precopy(pair):
    a, b = pair
    w = Workload(a, "linkcut", mib=32)
    try:
        svc, log = receiver(b, a.peers["b"], "--insecure", "--timeout", "3")
        sender, slog = start_sender(a, w.pid, a.peers["b"], "--insecure",
                                    "--timeout", "3", *SLOW)
        time.sleep(1)
        a.run(["ip", "link", "set", a.ifnames["b"], "down"])
        try:
            code = sender.wait(timeout=60)
            assert code == 6, open(slog).read()[-2000:]
            assert svc.wait(timeout=30) != 0
        finally:
            a.run(["ip", "link", "set", a.ifnames["b"], "up"])
        assert_source_intact(a, w)
        assert_destination_empty(b)
    finally:
        w.stop(a)


def test_restore_failing_on_destination(pair):
    """CRIU cannot restore: the workload's pid is taken on B."""
    a, b = pair
    w = Workload(a, "pidtaken")
    squatter = None
    try:
        # one shell: its next fork takes the pid after ns_last_pid
        squatter = int(b.run(f"echo {w.pid - 1} > /proc/sys/kernel/ns_last_pid; "
                             "setsid sleep 1000 </dev/null >/dev/null 2>&1 & "
                             "echo $!").stdout)
        assert squatter == w.pid, "could not occupy the pid on B"
        svc, log = receiver(b, a.peers["b"], "--insecure")
        r, events = send(a, w.pid, a.peers["b"], "--insecure")
        assert r.returncode == 6, r.stderr[-2000:]
        err = events[-1]
        assert err["event"] == "error" and "restore" in err["message"]
        print("\n" + err["message"][:600])
        svc.wait(timeout=10)
        assert_source_intact(a, w)
        assert_destination_empty(b)
    finally:
        if squatter:
            b.run(["kill", str(squatter)], check=False)
        w.stop(a)


UFFD_USER = (
    "import ctypes, os, sys, time\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "nr = {'x86_64': 323, 'aarch64': 282}[os.uname().machine]\n"
    "fd = libc.syscall(nr, os.O_CLOEXEC | os.O_NONBLOCK | 1)\n"
    "assert fd >= 0, ctypes.get_errno()\n"
    "n = 0\n"
    "while True:\n"
    "    n += 1\n"
    "    with open(sys.argv[1], 'a') as f: f.write(f'{n} {os.getpid()} x ok\\n')\n"
    "    time.sleep(0.05)\n")


def test_checkpoint_failing_on_source(pair):
    """A process holding a userfaultfd: tracker `full`, and CRIU refuses to
    dump it; the source resumes with CRIU's reason reported."""
    a, b = pair
    a.run(["sh", "-c", f"cat > /tmp/uffd_user.py <<'EOF'\n{UFFD_USER}EOF"])
    w = Workload.__new__(Workload)
    w.node, w.progress = a, "/shared/uffd-user.progress"
    w.pid = int(a.run(f"setsid python3 /tmp/uffd_user.py {w.progress} "
                      "</dev/null >/dev/null 2>&1 & echo $!").stdout)
    try:
        wait_for(lambda: len(w.lines()) >= 3, 30, "uffd user progress")
        svc, log = receiver(b, a.peers["b"], "--insecure")
        r, events = send(a, w.pid, a.peers["b"], "--insecure")
        assert r.returncode == 6, r.stderr[-2000:]
        start = events[0]
        assert start["processes"][0]["tracker"] == "full"
        assert "already uses userfaultfd" in start["processes"][0]["reason"]
        err = events[-1]
        assert err["event"] == "error" and "criu dump" in err["message"]
        print("\n" + err["message"][:600])
        svc.wait(timeout=10)
        w.keeps_running(a)
        assert_destination_empty(b)
    finally:
        w.stop(a)


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "SIGKILL"])
def test_sender_killed_during_precopy(pair, how):
    a, b = pair
    w = Workload(a, f"srckill-{how}", mib=32)
    try:
        svc, log = receiver(b, a.peers["b"], "--insecure", "--timeout", "5")
        sender, slog = start_sender(a, w.pid, a.peers["b"], "--insecure", *SLOW)
        time.sleep(1)
        # the migrator process itself (host pid), under the nsenter wrapper
        from migrator.kernel.procfs import process_tree
        migrator_pid = process_tree(sender.pid)[-1]
        os.kill(migrator_pid, getattr(signal, how))
        code = sender.wait(timeout=30)
        if how in ("SIGINT", "SIGTERM"):    # Ctrl-C, or kill
            assert code == 130
            assert '"event": "error"' in open(slog).read()
        else:
            assert code == -signal.SIGKILL or code == 128 + signal.SIGKILL
        assert svc.wait(timeout=30) != 0
        assert_source_intact(a, w)
        assert_destination_empty(b)
    finally:
        w.stop(a)


def test_commit_lost_then_resolved(pair):
    """The source is destroyed and Commit never arrives: the destination
    keeps its restored copy stopped until `migrator resolve`."""
    a, b = pair
    w = Workload(a, "nocommit")
    try:
        svc, log = receiver(b, a.peers["b"], "--insecure")
        r = a.run(["env", "MIGRATOR_FAULT=commit-send", "python3", "-m",
                   "migrator", "send", "--pid", str(w.pid), "--to",
                   f"{a.peers['b']}:{PORT}", "--json", "--insecure"],
                  check=False, timeout=120)
        assert r.returncode == 7, r.stderr[-2000:]
        assert "migrator resolve --commit" in r.stdout
        svc.wait(timeout=10)
        undecided = [json.loads(line) for line in open(log).read().splitlines()
                     if '"undecided"' in line]
        assert undecided, open(log).read()[-2000:]
        mig = undecided[0]["migration"]
        assert not w.running_on(a)
        stat = b.run(["sh", "-c", f"cat /proc/{w.pid}/stat"]).stdout
        assert stat.split(")")[-1].split()[0] == "T", "restored copy not stopped"
        last = w.last_tick()
        time.sleep(0.5)
        assert w.last_tick() == last, "nobody may run before the decision"
        out = b.run(["python3", "-m", "migrator", "resolve", "--dir",
                     "/var/tmp/mig", "--migration", mig, "--commit"]).stdout
        assert "resumed" in out
        w.keeps_running(b)
        w.assert_healthy()
        assert_destination_empty(b)
    finally:
        w.stop(a)
        w.stop(b)


def test_unauthenticated_peers_are_refused(pair, tmp_path):
    a, b = pair
    w = Workload(a, "auth")
    try:
        # a receiver without any authentication refuses to start
        r = b.run(["python3", "-m", "migrator", "recv", "--listen",
                   f"{a.peers['b']}:{PORT}", "--dir", "/var/tmp/mig", "--once"],
                  check=False)
        assert r.returncode != 0 and "--insecure" in r.stderr
        b.run("echo key-of-b-0123456789abcdef > /var/tmp/psk")
        a.run("echo another-key-0123456789abcdef > /var/tmp/psk")
        for extra in (("--insecure",), ("--psk-file", "/var/tmp/psk")):
            svc, log = receiver(b, a.peers["b"], "--psk-file", "/var/tmp/psk")
            r, events = send(a, w.pid, a.peers["b"], *extra)
            assert r.returncode == 6, r.stderr[-2000:]
            assert events[-1]["event"] == "error"
            print(f"\n{extra[0]}: {events[-1]['message'][:300]}")
            svc.wait(timeout=10)
            assert_source_intact(a, w)
            assert_destination_empty(b)
        # the same key on both sides works
        a.run("cp /shared/../psk /var/tmp/psk 2>/dev/null || "
              "echo key-of-b-0123456789abcdef > /var/tmp/psk")
        svc, log = receiver(b, a.peers["b"], "--psk-file", "/var/tmp/psk")
        r, events = send(a, w.pid, a.peers["b"], "--psk-file", "/var/tmp/psk")
        assert r.returncode == 0, r.stderr[-2000:]
        svc.wait(timeout=10)
        w.keeps_running(b)
    finally:
        w.stop(a)
        w.stop(b)


def test_garbage_stream_is_refused(pair):
    a, b = pair
    svc, log = receiver(b, a.peers["b"], "--insecure")
    garbage = ("import socket; s = socket.create_connection(('%s', %d)); "
               "s.sendall(b'\\x00\\x00\\x00\\x05hello' * 3); s.recv(100); "
               "s.close()" % (a.peers["b"], PORT))
    a.run(["python3", "-c", garbage], check=False, timeout=30)
    assert svc.wait(timeout=10) == 6
    errors = [json.loads(line) for line in open(log).read().splitlines()
              if '"error"' in line]
    assert errors and errors[0]["message"], open(log).read()
    print("\n" + errors[0]["message"])
    assert_destination_empty(b)
