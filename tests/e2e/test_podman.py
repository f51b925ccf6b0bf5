"""Live migration of a podman container between two nodes, with `migrator
send NAME` / `migrator recv` (migrator/runtime/podman.py).

podman in a test-bed node: its storage on a tmpfs (overlay cannot sit on
the node's overlay root), cgroupfs and file events (no systemd), no pids
limit (the nodes' cgroup2 has no controllers: this host binds them all to
cgroup v1), runc as its runtime (runc takes a CRIU configuration from the
container's annotations, which the restore needs for leave-stopped).  The
image is a busybox rootfs imported on both nodes; the container runs the
same self-checking counter as the runc tests, in its own filesystem.
"""

from __future__ import annotations

import json

import pytest

from tests.beds import nodes
from tests.beds.waiting import wait_for
from tests.e2e.test_containers import COUNTER, receiver, send

pytestmark = pytest.mark.e2e

IMAGE = "localhost/migrator-busybox"
NAME = "pm1"
CONF = """[containers]
pids_limit = 0
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
runtime = "runc"
"""


def _setup(node) -> None:
    node.run("mkdir -p /var/lib/containers /etc/containers && "
             "mount -t tmpfs tmpfs /var/lib/containers")
    node.run(["sh", "-c", f"cat > /etc/containers/containers.conf <<'EOF'\n{CONF}EOF"])


def _image(a, b) -> None:
    """The same image (same id: a restore looks it up by id) on both."""
    a.run("rm -rf /tmp/bbroot && mkdir -p /tmp/bbroot/bin /tmp/bbroot/data "
          "/tmp/bbroot/tmp && cp /usr/bin/busybox /tmp/bbroot/bin/ && "
          "for x in sh sleep echo cat; do ln -s busybox /tmp/bbroot/bin/$x; done && "
          f"tar -C /tmp/bbroot -cf /tmp/bbroot.tar . && podman import -q "
          f"/tmp/bbroot.tar {IMAGE} >/dev/null && "
          f"podman save -q -o /shared/podman-image.tar {IMAGE}")
    b.run("podman load -q -i /shared/podman-image.tar >/dev/null && "
          "rm /shared/podman-image.tar")


@pytest.fixture(scope="module")
def pair(bed_image):
    with nodes.cluster(2, image=bed_image) as (a, b):
        if a.run("command -v podman", check=False).returncode != 0:
            pytest.skip("podman is not in the node image")
        a.run("echo 5000 > /proc/sys/kernel/ns_last_pid")
        for n in (a, b):
            _setup(n)
        _image(a, b)
        yield a, b


def lines(node):
    r = node.run(["podman", "exec", NAME, "cat", "/data/progress"], check=False)
    return [ln.split() for ln in r.stdout.splitlines() if ln.strip()]


def last_tick(node):
    ls = lines(node)
    return int(ls[-1][0]) if ls else 0


def status(node):
    r = node.run(["podman", "container", "inspect", NAME], check=False)
    return json.loads(r.stdout)[0]["State"]["Status"] if r.returncode == 0 else None


def move(src, dst):
    svc, log = receiver(dst, src.peers[dst.name])
    before = last_tick(src)
    r, events = send(src, NAME, src.peers[dst.name])
    svc.wait(timeout=60)
    assert r.returncode == 0, (r.stderr[-2000:], open(log).read()[-2000:])
    assert events[-1]["event"] == "done", events
    assert status(dst) == "running"
    assert status(src) is None, "the source container still exists"
    wait_for(lambda: last_tick(dst) >= before + 5, 30, "the counter to go on")
    return events


def address(node):
    r = node.run(["podman", "container", "inspect", NAME, "--format",
                  "{{.NetworkSettings.IPAddress}}"])
    return r.stdout.strip()


# podman's default seccomp profile refuses userfaultfd(2): such a container
# is tracked `full` (all its memory crosses in the frozen step); unconfined,
# it is pre-copied with uffd-wp.  With podman's default network (netavark,
# a bridge in each node) the container keeps its address.
@pytest.mark.parametrize("run_args, tracker", [
    (["--security-opt", "seccomp=unconfined", "--network", "none"], "uffd-wp"),
    ([], "full"),
], ids=["unconfined-no-network", "default-profile-and-network"])
def test_podman_container_round_trip(pair, run_args, tracker):
    a, b = pair
    a.run(["podman", "run", "-d", "--name", NAME, *run_args, IMAGE, *COUNTER])
    try:
        wait_for(lambda: last_tick(a) >= 5, 30, "the counter to start")
        ip = address(a)
        events = move(a, b)
        assert {p["tracker"] for p in events[0]["processes"]} == {tracker}, events[0]
        assert address(b) == ip
        move(b, a)
        assert address(a) == ip
        ls = lines(a)
        assert all(ln[2] == "ok" for ln in ls), "shell state inconsistent"
        ticks = [int(ln[0]) for ln in ls]
        assert ticks == list(range(1, len(ticks) + 1)), "ticks lost or repeated"
    finally:
        for n in (a, b):
            n.run(["podman", "rm", "-f", "-t", "0", NAME], check=False)
