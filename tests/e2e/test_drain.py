"""examples/drain.py for real: three runc containers on node A, registered
by migrator's OCI hooks wired into their config.json, are drained to node B
by `drain.py --parallel 2`, which drives the real CLI (`migrator list`,
`migrator send`) against one `migrator recv` on B serving migration after
migration.

Each container runs the counter of test_containers.py (a shell appending
"<i> <sum> ok" to /data/progress in its rootfs): on B the file must be
there (the filesystem travelled), the ticks must go on without a gap or a
repeat (the memory travelled), and A must have neither the container nor a
live registration of it.
"""

from __future__ import annotations

import json

import pytest

from tests.beds import nodes
from tests.beds.waiting import wait_for

pytestmark = pytest.mark.e2e

WORKLOADS = "/src/tests/workloads"
PORT = 7300
STORE = "/var/tmp/drain-mig"
IDS = ("drain-1", "drain-2", "drain-3")
# The counter of test_containers.py: no `sleep` child per tick (a process
# that exits during pre-copy fails the migration); `read -t` on a fifo
# nobody writes is the delay.
COUNTER = ["/bin/sh", "-c",
           ("/bin/busybox mkfifo /tmp/tick; exec 3<>/tmp/tick; i=0; acc=0; "
            "while true; do i=$((i + 1)); acc=$((acc + i)); "
            "if [ $acc -eq $((i * (i + 1) / 2)) ]; then s=ok; else s=BAD; fi; "
            "echo \"$i $acc $s\" >> /data/progress; read -t 0.1 x <&3; done")]

# The hooks as hooks/README.md says to wire them into config.json, with the
# `python3 -m migrator.cli.hook` entry (no native module at container
# start) and an explicit env, since runc gives hooks no other.
_WIRE = r"""
import json, sys
path, args = sys.argv[1], sys.argv[2:]
spec = json.load(open(path))
def hook(stage):
    return {"path": "/usr/bin/python3",
            "args": ["python3", "-m", "migrator.cli.hook", "hook", stage, "--timeout", "5"],
            "env": ["PYTHONPATH=/src", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "timeout": 10}
spec["hooks"] = {s: [hook(s)] for s in ("poststart", "poststop")}
spec.setdefault("annotations", {})["io.migrator.enable"] = "true"
if args:
    spec["process"]["args"] = args
json.dump(spec, open(path, "w"), indent=1)
"""


def bundle(cid):
    return f"/var/lib/ctr/{cid}"


def ticks(node, cid):
    out = node.run(["cat", f"{bundle(cid)}/rootfs/data/progress"], check=False).stdout
    return [ln.split() for ln in out.splitlines() if ln.strip()]


def last_tick(node, cid):
    t = ticks(node, cid)
    return int(t[-1][0]) if t else 0


def status(node, cid):
    r = node.run(["runc", "state", cid], check=False)
    return json.loads(r.stdout)["status"] if r.returncode == 0 else None


def registered(node):
    r = node.run(["python3", "-m", "migrator", "list", "--json"])
    return {e["id"]: e for e in json.loads(r.stdout)}


@pytest.fixture
def pair(bed_image):
    with nodes.cluster(2, image=bed_image) as (a, b):
        yield a, b


def test_drain_moves_every_registered_container(pair):
    a, b = pair
    recv = None
    try:
        for cid in IDS:
            for n in (a, b):
                # The same bundle, hooks included, on both nodes: runc
                # restores on B from B's config.json.
                n.run(["python3", f"{WORKLOADS}/make_bundle.py", bundle(cid)])
                n.run(["python3", "-c", _WIRE, f"{bundle(cid)}/config.json",
                       *(COUNTER if n is a else [])])
            # stdio on /dev/null: runc hands its own to the container, and
            # CRIU cannot dump a file of the node's root outside the
            # container's mounts; runc's own errors go to --log.
            r = a.run(f"runc --log /var/tmp/{cid}.log run -d --bundle {bundle(cid)} "
                      f"{cid} </dev/null >/dev/null 2>&1", check=False, timeout=60)
            assert r.returncode == 0, a.run(f"cat /var/tmp/{cid}.log", check=False).stdout
        for cid in IDS:
            wait_for(lambda cid=cid: last_tick(a, cid) >= 5, 30, f"{cid} to count")
        reg = registered(a)
        assert sorted(reg) == sorted(IDS), reg
        assert all(reg[c]["alive"] and reg[c]["runtime"] == "runc" for c in IDS), reg

        # One receiver, without --once: it serves the migrations one after
        # another (a second sender waits in the accept queue meanwhile).
        to = a.peers["b"]
        rlog = b.dir / "logs" / "drain-recv.log"
        recv = b.spawn(["python3", "-m", "migrator", "recv", "--listen", f"{to}:{PORT}",
                        "--dir", STORE, "--insecure", "--json"], log=rlog)
        wait_for(lambda: rlog.exists() and "listening" in rlog.read_text(), 30,
                 "the receiver to listen")
        before = {cid: last_tick(a, cid) for cid in IDS}
        d = a.run(["python3", "/src/examples/drain.py", "--to", f"{to}:{PORT}",
                   "--parallel", "2", "--json", "--migrator", "python3 -m migrator",
                   "--send-arg=--insecure", "--timeout", "240"], check=False, timeout=400)
        print(f"\ndrain exit {d.returncode}\nstdout: {d.stdout}\nstderr: {d.stderr[-3000:]}")
        print("receiver:\n" + rlog.read_text()[-3000:])
        report = json.loads(d.stdout.strip().splitlines()[-1])
        assert d.returncode == 0, (d.stdout, d.stderr[-3000:])
        assert sorted(o["id"] for o in report) == sorted(IDS)
        assert all(o["status"] == "migrated" for o in report), report

        for cid in IDS:
            assert status(b, cid) == "running", cid
            start = last_tick(b, cid)
            assert start > before[cid], f"{cid}: no progress on b"
            wait_for(lambda cid=cid, start=start: last_tick(b, cid) >= start + 5, 30,
                     f"{cid} to count on b")
            lines = ticks(b, cid)
            assert all(ln[2] == "ok" for ln in lines), f"{cid}: shell state inconsistent"
            assert [int(ln[0]) for ln in lines] == list(range(1, len(lines) + 1)), \
                f"{cid}: ticks lost or repeated"
            assert status(a, cid) is None, f"{cid} still on a"
        left = registered(a)
        assert all(not left[c]["alive"] for c in IDS if c in left), left
        # What B's registry says is reported, not asserted: whether runc
        # runs poststart at restore is runc's business.
        print(f"registry on b after the drain: "
              f"{ {c: e['alive'] for c, e in registered(b).items()} }")
    finally:
        if recv is not None:
            recv.stop()
        for n in (a, b):
            for cid in IDS:
                n.run(f"runc kill {cid} KILL; sleep 0.2; runc delete -f {cid}; "
                      f"rm -rf {bundle(cid)}", check=False)
            n.run(f"rm -rf {STORE}", check=False)
