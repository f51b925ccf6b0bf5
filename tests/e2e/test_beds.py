"""The test beds themselves: nodes can checkpoint and restore processes and
containers across nodes with CRIU and runc, and links can be shaped.

These prove the ground the migration tests stand on; each test uses two
fresh nodes and leaves nothing behind.
"""

import json
import pathlib
import subprocess

import pytest

from tests.beds import net, nodes
from tests.beds.waiting import wait_for

pytestmark = pytest.mark.e2e

WORKLOADS = "/src/tests/workloads"


def _progress(node, path):
    """Parsed lines of a workload's progress file inside ``node``."""
    out = node.run(["cat", path], check=False).stdout
    return [line.split() for line in out.splitlines() if line.strip()]




def _run_logged(node, cmd, logs, timeout=60):
    """Run ``cmd``; on failure show the CRIU logs that explain it."""
    res = node.run(cmd, check=False, timeout=timeout)
    if res.returncode != 0:
        details = node.run(
            "for f in " + " ".join(logs) + "; do echo \"== $f\"; tail -n 40 \"$f\"; done",
            check=False).stdout
        raise AssertionError(
            f"{cmd!r} failed on {node.name} ({res.returncode}):\n"
            f"{res.stdout}\n{res.stderr}\n{details}")
    return res


def test_criu_process_moves_between_nodes(two_nodes):
    a, b = two_nodes
    progress = "/var/tmp/w/progress"
    a.run("mkdir -p /var/tmp/w")
    # Push A's pid counter up so the workload's pid is free on B, where
    # CRIU must restore it under the same pid.
    a.run("echo 5000 > /proc/sys/kernel/ns_last_pid")
    # setsid and /dev/null stdio: no terminal or host file is tied to the
    # process, so no --shell-job and no external files are needed.
    pid = int(a.run(
        f"setsid python3 {WORKLOADS}/counter.py {progress} 8 0.05 "
        "</dev/null >/dev/null 2>&1 & echo $!").stdout)
    wait_for(lambda: len(_progress(a, progress)) >= 10, 30, "workload progress on A")

    a.run("mkdir -p /var/tmp/ckpt")
    _run_logged(a, ["criu", "dump", "-t", str(pid), "-D", "/var/tmp/ckpt",
                    "-o", "dump.log", "-v4"], ["/var/tmp/ckpt/dump.log"])
    # criu dump ends the process on A (the node's init reaps it shortly).
    wait_for(lambda: a.run(["kill", "-0", str(pid)], check=False).returncode != 0,
              5, "the dumped process to be gone on A")
    before = _progress(a, progress)
    last_tick = int(before[-1][0])
    assert all(line[3] == "ok" for line in before)

    # "Network" copy: checkpoint and the files the process works on.
    a.run("cp -a /var/tmp/ckpt /var/tmp/w /shared/")
    b.run("mkdir -p /var/tmp && cp -a /shared/ckpt /shared/w /var/tmp/")
    _run_logged(b, ["criu", "restore", "-D", "/var/tmp/ckpt", "-d",
                    "-o", "restore.log", "-v4"], ["/var/tmp/ckpt/restore.log"])

    after = wait_for(
        lambda: (lines := _progress(b, progress)) and int(lines[-1][0]) >= last_tick + 10 and lines,
        30, "restored workload to keep counting on B")
    new = [line for line in after if int(line[0]) > last_tick]
    ticks = [int(line[0]) for line in new]
    print(f"\nCRIU: stopped on A at tick {last_tick}, continued on B up to {ticks[-1]}")
    assert ticks[0] == last_tick + 1, "the counter continues exactly where it stopped"
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks)))
    assert all(line[3] == "ok" for line in new), "memory checksum after restore"
    assert all(int(line[1]) == pid for line in new), "restored under the same pid"
    b.run(["kill", str(pid)])


def test_runc_container_moves_between_nodes(two_nodes):
    a, b = two_nodes
    bundle = "/var/lib/bed/c1"
    progress = f"{bundle}/rootfs/data/progress"
    a.run(["python3", f"{WORKLOADS}/make_bundle.py", bundle])
    # stdio to /dev/null: runc run -d hands its stdio to the container, and
    # a pipe back to the test would keep node.run waiting.
    a.run(f"runc run -d --bundle {bundle} c1 </dev/null >/dev/null 2>&1")
    wait_for(lambda: len(_progress(a, progress)) >= 10, 30, "container progress on A")

    _run_logged(a, ["runc", "checkpoint", "--image-path", "/var/tmp/rckpt",
                    "--work-path", "/var/tmp/rwork", "c1"],
                ["/var/tmp/rwork/dump.log"])
    before = _progress(a, progress)
    last_tick = int(before[-1][0])
    assert a.run(["runc", "list", "-q"]).stdout.strip() == ""

    a.run("mkdir -p /shared/bed && cp -a /var/tmp/rckpt /shared/ && cp -a /var/lib/bed/c1 /shared/bed/")
    b.run("mkdir -p /var/lib/bed && cp -a /shared/bed/c1 /var/lib/bed/ && cp -a /shared/rckpt /var/tmp/")
    # runc's own errors share stdio with the container: keep them in a file.
    _run_logged(b, f"runc restore -d --bundle {bundle} --image-path /var/tmp/rckpt "
                   "--work-path /var/tmp/rwork c1 </dev/null >/var/tmp/runc.out 2>&1",
                ["/var/tmp/runc.out", "/var/tmp/rwork/restore.log"])

    after = wait_for(
        lambda: (lines := _progress(b, progress)) and int(lines[-1][0]) >= last_tick + 10 and lines,
        30, "restored container to keep counting on B")
    new = [line for line in after if int(line[0]) > last_tick]
    print(f"\nrunc: stopped on A at tick {last_tick}, continued on B up to {new[-1][0]}")
    assert int(new[0][0]) == last_tick + 1
    assert all(line[2] == "ok" for line in new), "shell state consistent after restore"
    b.run("runc kill c1 KILL; sleep 0.2; runc delete -f c1", check=False)


def test_shaped_link_rate(two_nodes):
    a, b = two_nodes
    net.shape(a, a.ifnames["b"], rate_mbit=100)
    port = 5201
    recv = b.spawn(["python3", f"{WORKLOADS}/tcp_rate.py", "recv", b.addr, str(port)])
    a.run(["python3", f"{WORKLOADS}/tcp_rate.py", "send", b.addr, str(port), "4"], timeout=60)
    assert recv.wait(timeout=30) == 0, recv.output()
    result = json.loads(recv.output().strip().splitlines()[-1])
    mbit = result["mbit_s"]
    print(f"\nshaped link a->b at 100 Mbit/s: measured {mbit} Mbit/s goodput "
          f"({result['bytes']} bytes)")
    assert 90 <= mbit <= 110, f"measured {mbit} Mbit/s on a 100 Mbit/s link"


def test_nodes_are_isolated_and_torn_down(bed_image):
    with nodes.cluster(2, image=bed_image) as (a, b):
        run_dir, cgroup = a.run_state.dir, a.run_state.cgroup
        inits = [a.init_pid, b.init_pid]
        assert a.run("hostname").stdout.strip() == "a"
        assert b.run("hostname").stdout.strip() == "b"
        a.run("echo from-a > /etc/only-on-a")
        assert b.run("test -e /etc/only-on-a", check=False).returncode != 0
        assert a.run("cat /proc/1/cmdline | tr '\\0' ' '").stdout.startswith("/usr/bin/python3")
        # Only lo and the link to b: the host's interfaces are not visible.
        links = a.run("ls /sys/class/net").stdout.split()
        assert sorted(links) == ["lo", "v-b"]
        # b answers on the link: a refused connection proves the route.
        probe = ("import socket\ntry:\n socket.create_connection(('%s', 9), 2)\n"
                 "except ConnectionRefusedError:\n print('refused')" % b.addr)
        assert a.run(["python3", "-c", probe]).stdout.strip() == "refused"
        assert a.run("stat -fc %T /sys/fs/cgroup").stdout.strip() == "cgroup2fs"
        # cgroup namespace: the node's subtree is its root, commands in /init.
        assert "0::/init" in a.run("cat /proc/self/cgroup").stdout.splitlines()
    for pid in inits:
        assert not pathlib.Path(f"/proc/{pid}").exists()
    assert not run_dir.exists()
    assert cgroup is None or not cgroup.exists()
    host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    assert "mgb" not in host_links
