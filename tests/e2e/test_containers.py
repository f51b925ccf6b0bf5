"""Live migration of runc and crun containers between two nodes with
`migrator send CONTAINER` / `migrator recv`.

The container (tests/workloads/make_bundle.py, the same bundle built on
both nodes) runs counter.sh, which appends "<i> <sum> ok|BAD" to
/data/progress inside its own rootfs: the file exists on the destination
only if the container's filesystem travelled, the counter continues only if
its memory did, and "ok" means the shell's state is consistent.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import time

import pytest

from tests.beds import nodes
from tests.beds.waiting import wait_for

pytestmark = pytest.mark.e2e

WORKLOADS = "/src/tests/workloads"
# counter.sh's logic without a `sleep` child per tick: the drivers track a
# fixed set of processes and fail when one exits during pre-copy (see the
# report); `read -t` on a fifo nobody writes is the shell's own delay.
COUNTER = ["/bin/sh", "-c",
           "/bin/busybox mkfifo /tmp/tick; exec 3<>/tmp/tick; i=0; acc=0; "
           "while true; do i=$((i + 1)); acc=$((acc + i)); "
           "if [ $acc -eq $((i * (i + 1) / 2)) ]; then s=ok; else s=BAD; fi; "
           "echo \"$i $acc $s\" >> /data/progress; read -t 0.1 x <&3; done"]
PORT = 7100
DEBS = os.environ.get("MIGRATOR_BEDS_DIR", "/var/cache/migrator-beds") + "/debs"


@pytest.fixture(scope="module")
def pair(bed_image):
    with nodes.cluster(2, image=bed_image) as (a, b):
        a.run("echo 5000 > /proc/sys/kernel/ns_last_pid")
        crun_ok = _crun_can_checkpoint(a, b)
        yield a, b, crun_ok


def _crun_can_checkpoint(*nodes_):
    """crun loads libcriu.so.2 at run time; the node image may lack it
    (package libcriu2).  A cached .deb is installed into the throwaway
    node roots; without one the crun tests skip with the reason."""
    if nodes_[0].run("ldconfig -p | grep -q libcriu.so.2", check=False).returncode == 0:
        return ""
    debs = sorted(glob.glob(f"{DEBS}/libcriu2_*.deb"))
    if not debs:
        return "crun cannot load libcriu.so.2: libcriu2 is not in the node image"
    shared = nodes_[0].run_state.shared
    name = os.path.basename(debs[-1])
    with open(debs[-1], "rb") as src, open(shared / name, "wb") as dst:
        dst.write(src.read())
    for n in nodes_:
        n.run(["dpkg", "-i", f"/shared/{name}"])
    return ""


class Container:
    def __init__(self, a, b, runtime, cid, setup=None, args=COUNTER):
        self.runtime, self.id = runtime, cid
        self.bundle = f"/var/lib/ctr/{cid}"
        self.progress = f"{self.bundle}/rootfs/data/progress"
        for n in (a, b):
            n.run(["python3", f"{WORKLOADS}/make_bundle.py", self.bundle])
            if setup:
                setup(n, self)
        if args:
            a.run(["python3", "-c",
                   "import json,sys; p=sys.argv[1]; s=json.load(open(p)); "
                   "s['process']['args']=sys.argv[2:]; json.dump(s,open(p,'w'))",
                   f"{self.bundle}/config.json", *args])
        # stdio to /dev/null: the runtime hands its stdio to the container
        a.run(f"{runtime} run -d --bundle {self.bundle} {cid} </dev/null >/dev/null 2>&1")
        self.nodes = (a, b)

    def lines(self, node):
        out = node.run(["cat", self.progress], check=False).stdout
        return [ln.split() for ln in out.splitlines() if ln.strip()]

    def last_tick(self, node):
        lines = self.lines(node)
        return int(lines[-1][0]) if lines else 0

    def status(self, node):
        r = node.run([self.runtime, "state", self.id], check=False)
        return json.loads(r.stdout)["status"] if r.returncode == 0 else None

    def listed(self, node):
        out = node.run([self.runtime, "list", "-q"], check=False).stdout
        return self.id in out.split()

    def keeps_counting(self, node, ticks=5):
        start = self.last_tick(node)
        wait_for(lambda: self.last_tick(node) >= start + ticks, 30,
                 f"{self.id} to keep counting on {node.name}")

    def assert_healthy(self, node):
        lines = self.lines(node)
        assert lines, "no progress file: the filesystem did not travel"
        assert all(ln[2] == "ok" for ln in lines), "shell state inconsistent"
        ticks = [int(ln[0]) for ln in lines]
        assert ticks == list(range(1, len(ticks) + 1)), "ticks lost or repeated"

    def remove(self):
        for n in self.nodes:
            n.run(f"{self.runtime} kill {self.id} KILL; sleep 0.2; "
                  f"{self.runtime} delete -f {self.id}", check=False)
            n.run(["rm", "-rf", self.bundle], check=False)


def receiver(node, addr, *extra):
    log = f"/tmp/recv-{node.name}-{time.monotonic_ns()}.log"
    svc = node.spawn(["python3", "-m", "migrator", "recv", "--listen",
                      f"{addr}:{PORT}", "--dir", "/var/tmp/mig", "--json",
                      "--once", "--insecure", *extra], log=log)
    wait_for(lambda: os.path.exists(log) and "listening" in open(log).read(),
             20, "the receiver to listen")
    return svc, log


def send(node, cid, to, *extra, timeout=180):
    r = node.run(["python3", "-m", "migrator", "send", cid, "--to", f"{to}:{PORT}",
                  "--json", "--insecure", *extra], check=False, timeout=timeout)
    events = [json.loads(ln) for ln in r.stdout.splitlines() if ln.strip()]
    return r, events


def assert_destination_empty(node):
    out = node.run("ls -A /var/tmp/mig 2>/dev/null || true").stdout
    assert out.strip() == "", f"left on the destination: {out}"


@pytest.mark.parametrize("runtime", ["runc", "crun"])
def test_container_round_trip(pair, runtime):
    a, b, crun_problem = pair
    if runtime == "crun" and crun_problem:
        pytest.skip(crun_problem)
    c = Container(a, b, runtime, f"trip-{runtime}")
    try:
        wait_for(lambda: c.last_tick(a) >= 5, 30, "container progress")
        for src, dst in ((a, b), (b, a)):
            svc, log = receiver(dst, src.peers[dst.name])
            before = c.last_tick(src)
            r, events = send(src, c.id, src.peers[dst.name], "--downtime-ms", "50")
            svc.wait(timeout=30)
            assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-2000:],
                                       open(log).read()[-2000:])
            done = events[-1]
            assert done["event"] == "done", events
            print(f"\n{runtime} {src.name}->{dst.name}: {done['rounds']} rounds, "
                  f"downtime {done['downtime_ms']} ms, total {done['total_ms']} ms, "
                  f"{done['sent_bytes']} bytes, breakdown {done['breakdown_ms']}")
            c.keeps_counting(dst)
            assert c.last_tick(dst) > before
            assert c.status(dst) == "running"
            assert not c.listed(src), f"{runtime} still lists {c.id} on {src.name}"
            assert c.status(src) is None
            c.assert_healthy(dst)
            assert_destination_empty(dst)
    finally:
        c.remove()


UFFD_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>
int main(void) {
    /* UFFD_USER_MODE_ONLY (1): allowed without CAP_SYS_PTRACE, which
       runc's default capability set does not grant */
    int fd = syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | 1);
    if (fd < 0) { perror("userfaultfd"); return 1; }
    for (unsigned long n = 1;; n++) {
        FILE *f = fopen("/data/uffd", "a");
        if (f) { fprintf(f, "%lu ok\n", n); fclose(f); }
        usleep(50000);
    }
}
"""


def _with_uffd_user(node, c):
    node.run(["sh", "-c", f"cat > /tmp/uffd.c <<'EOF'\n{UFFD_C}EOF"])
    node.run(["gcc", "-static", "-O2", "-o", f"{c.bundle}/rootfs/bin/uffd", "/tmp/uffd.c"])


def test_container_with_userfaultfd_user(pair):
    """A process of the container holds a userfaultfd: it is tracked `full`,
    and CRIU refuses to dump it; the source container keeps running and the
    runtime can still use it."""
    a, b, _ = pair
    c = Container(a, b, "runc", "uffd", setup=_with_uffd_user,
                  args=[*COUNTER[:2], "/bin/uffd & " + COUNTER[2]])
    try:
        wait_for(lambda: c.last_tick(a) >= 5, 30, "container progress")
        svc, log = receiver(b, a.peers["b"])
        r, events = send(a, c.id, a.peers["b"])
        svc.wait(timeout=30)
        start = events[0]
        trackers = {p["pid"]: (p["tracker"], p["reason"]) for p in start["processes"]}
        print(f"\ntrackers: {trackers}")
        assert any(t == "full" and "userfaultfd" in why for t, why in trackers.values())
        if r.returncode == 0:
            # CRIU learnt to dump it: then it must have migrated properly
            c.keeps_counting(b)
            assert not c.listed(a)
            return
        assert r.returncode == 6, r.stderr[-2000:]
        err = events[-1]
        assert err["event"] == "error" and "checkpoint" in err["message"]
        print(err["message"][:800])
        c.keeps_counting(a)
        assert c.status(a) == "running"
        a.run(["runc", "exec", c.id, "/bin/sh", "-c", "echo usable > /data/exec"])
        assert a.run(["cat", f"{c.bundle}/rootfs/data/exec"]).stdout.strip() == "usable"
        assert not c.listed(b)
        assert_destination_empty(b)
    finally:
        c.remove()


def test_restore_failing_leaves_source_running(pair):
    """The destination cannot restore (the id is taken there): the source
    container is thawed and keeps running; nothing is left on B."""
    a, b, _ = pair
    c = Container(a, b, "runc", "taken")
    squatter = "/var/lib/ctr/squat"
    try:
        b.run(["python3", f"{WORKLOADS}/make_bundle.py", squatter])
        b.run(f"runc run -d --bundle {squatter} {c.id} </dev/null >/dev/null 2>&1")
        wait_for(lambda: c.last_tick(a) >= 5, 30, "container progress")
        svc, log = receiver(b, a.peers["b"])
        r, events = send(a, c.id, a.peers["b"])
        svc.wait(timeout=30)
        assert r.returncode == 6, r.stderr[-2000:]
        assert "already exists" in events[-1]["message"], events[-1]
        c.keeps_counting(a)
        assert c.status(a) == "running"
        c.assert_healthy(a)
        assert_destination_empty(b)
    finally:
        b.run(f"runc kill {c.id} KILL; sleep 0.2; runc delete -f {c.id}; "
              f"rm -rf {squatter}", check=False)
        c.remove()


def test_receiver_killed_leaves_source_running(pair):
    a, b, _ = pair
    c = Container(a, b, "runc", "rkill")
    try:
        wait_for(lambda: c.last_tick(a) >= 5, 30, "container progress")
        svc, log = receiver(b, a.peers["b"])
        slog = f"/tmp/send-{time.monotonic_ns()}.log"
        # a slow link: pre-copy lasts seconds
        sender = a.spawn(["python3", "-m", "migrator", "send", c.id, "--to",
                          f"{a.peers['b']}:{PORT}", "--json", "--insecure",
                          "--timeout", "5", "--bandwidth", "0.1",
                          "--downtime-ms", "1"], log=slog)
        wait_for(lambda: os.path.exists(slog) and '"start"' in open(slog).read(),
                 30, "the sender to start")
        time.sleep(0.5)
        os.killpg(svc.pid, signal.SIGKILL)  # the receiver this test started
        svc.wait(timeout=10)
        code = sender.wait(timeout=60)
        out = open(slog).read()
        assert code == 6, out[-2000:]
        c.keeps_counting(a)
        assert c.status(a) == "running"
        c.assert_healthy(a)
        assert not c.listed(b)
    finally:
        c.remove()


@pytest.mark.parametrize("decision", ["--commit", "--abort"])
def test_commit_lost_then_resolved(pair, decision):
    """The source container is destroyed and Commit never arrives: the
    restored container waits stopped until `migrator resolve`, which
    resumes it as the Commit would have, or removes it from the runtime."""
    a, b, _ = pair
    c = Container(a, b, "runc", f"undecided{decision[1:]}")
    svc = None
    try:
        wait_for(lambda: c.last_tick(a) >= 5, 30, "container progress")
        svc, log = receiver(b, a.peers[b.name])
        r = a.run(["env", "MIGRATOR_FAULT=commit-send", "python3", "-m", "migrator",
                   "send", c.id, "--to", f"{a.peers[b.name]}:{PORT}", "--json",
                   "--insecure"], check=False, timeout=180)
        assert r.returncode == 7, (r.stdout[-2000:], r.stderr[-2000:])
        svc.wait(timeout=30)
        undecided = [json.loads(ln) for ln in open(log).read().splitlines()
                     if '"undecided"' in ln]
        assert undecided, open(log).read()[-2000:]
        assert c.status(a) is None, "the source container was not destroyed"
        last = c.last_tick(b)
        time.sleep(0.5)
        assert c.last_tick(b) == last, "nobody may run before the decision"
        out = b.run(["python3", "-m", "migrator", "resolve", "--dir", "/var/tmp/mig",
                     "--migration", undecided[0]["migration"], decision]).stdout
        if decision == "--commit":
            assert "resumed" in out
            c.keeps_counting(b)
            assert c.status(b) == "running"
            c.assert_healthy(b)
        else:
            assert "destroyed" in out
            assert not c.listed(b), f"runc still lists {c.id} on b"
        assert_destination_empty(b)
    finally:
        if svc is not None:
            svc.stop()
        c.remove()
