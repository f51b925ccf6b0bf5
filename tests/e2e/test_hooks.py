"""OCI hooks and the network cutover, for real, inside a test-bed node:
runc runs `migrator hook` from config.json (createRuntime, poststart,
poststop), and the cutover connects network namespaces to a bridge,
announces addresses and detaches them again.

Addresses are in 198.18.200.0/22, on bridges inside the node only.
"""

import json

import pytest

from tests.beds import nodes
from tests.beds.waiting import wait_for

pytestmark = pytest.mark.e2e

WORKLOADS = "/src/tests/workloads"


@pytest.fixture
def node(bed_image):
    with nodes.cluster(1, connect=False, image=bed_image) as (n,):
        yield n




def _holder(node) -> int:
    """A process in a fresh network namespace inside ``node`` (a stand-in
    for a container's netns); it ends with the node, or by pid."""
    return int(node.run("setsid unshare --net sleep 600 </dev/null >/dev/null 2>&1 & "
                        "echo $!").stdout)


_WIRE_HOOKS = r"""
import json, sys
path, annotations = sys.argv[1], json.loads(sys.argv[2])
spec = json.load(open(path))
def hook(stage):
    # runc runs hooks with exactly this environment, not the caller's.
    return {"path": "/usr/bin/python3",
            "args": ["python3", "-m", "migrator.cli.hook", "hook", stage, "--timeout", "5"],
            "env": ["PYTHONPATH=/src", "PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "timeout": 10}
spec["hooks"] = {s: [hook(s)] for s in ("createRuntime", "poststart", "poststop")}
spec["annotations"] = annotations
json.dump(spec, open(path, "w"), indent=1)
"""


def test_runc_lifecycle_registers_and_connects(node):
    bundle = "/var/lib/bed/c1"
    node.run(["python3", f"{WORKLOADS}/make_bundle.py", bundle])
    node.run(["python3", "-c", _WIRE_HOOKS, f"{bundle}/config.json", json.dumps({
        "io.migrator.enable": "true",
        "io.migrator.network": "198.18.201.10/24@brmig"})])
    res = node.run(f"runc run -d --bundle {bundle} c1 </dev/null >/var/tmp/runc.out 2>&1",
                   check=False, timeout=60)
    assert res.returncode == 0, node.run("cat /var/tmp/runc.out").stdout
    try:
        pid = json.loads(node.run(["runc", "state", "c1"]).stdout)["pid"]
        entry = json.loads(node.run("cat /run/migrator/containers/c1.json").stdout)
        cgroup = [line[3:] for line in node.run(f"cat /proc/{pid}/cgroup").stdout.splitlines()
                  if line.startswith("0::")][0]
        assert entry["pid"] == pid and entry["cgroup"] == cgroup
        assert entry["runtime"] == "runc" and entry["runtime_root"] == "/run/runc"
        assert entry["bundle"] == bundle
        assert entry["annotations"]["io.migrator.enable"] == "true"
        listed = json.loads(node.run(["python3", "-m", "migrator.cli.hook", "list",
                                      "--json"]).stdout)
        assert [(e["id"], e["alive"]) for e in listed] == [("c1", True)]

        # createRuntime gave the container eth0 with its address on brmig.
        addrs = node.run(f"nsenter --net=/proc/{pid}/ns/net ip -o -4 addr show dev eth0").stdout
        assert "198.18.201.10/24" in addrs
        neighbour = _holder(node)
        node.run(["python3", "-c",
                  "import sys; from migrator.network import cutover; "
                  "cutover.attach(int(sys.argv[1]), '198.18.201.11/24', 'brmig', host_if='mgnb')",
                  str(neighbour)])
        # A refused connection proves the path: the container's kernel answered.
        probe = ("import socket\ntry:\n socket.create_connection(('198.18.201.10', 9), 3)\n"
                 "except ConnectionRefusedError:\n print('refused')")
        out = node.run(["nsenter", f"--net=/proc/{neighbour}/ns/net", "python3", "-c", probe])
        assert out.stdout.strip() == "refused"
    finally:
        node.run("runc kill c1 KILL", check=False)
        wait_for(lambda: '"stopped"' in node.run("runc state c1", check=False).stdout,
                  10, "c1 to stop")
        node.run("runc delete c1", check=False)
    # poststop ran at delete: the registration is gone.
    assert node.run("test -e /run/migrator/containers/c1.json", check=False).returncode != 0
    assert json.loads(node.run(["python3", "-m", "migrator.cli.hook", "list",
                                "--json"]).stdout) == []


def test_hook_failure_stops_create_with_a_clear_message(node):
    bundle = "/var/lib/bed/c2"
    node.run(["python3", f"{WORKLOADS}/make_bundle.py", bundle])
    # A bridge name longer than IFNAMSIZ: createRuntime must refuse it.
    node.run(["python3", "-c", _WIRE_HOOKS, f"{bundle}/config.json", json.dumps({
        "io.migrator.network": "198.18.201.20/24@bridge-name-too-long"})])
    res = node.run(f"runc run -d --bundle {bundle} c2 </dev/null >/var/tmp/runc2.out 2>&1",
                   check=False, timeout=60)
    out = node.run("cat /var/tmp/runc2.out").stdout
    node.run("runc delete -f c2", check=False)
    assert res.returncode != 0
    assert "migrator hook createRuntime: interface names are at most 15 bytes" in out


_CUTOVER = r"""
import json, socket, sys, time
from migrator.network import cutover

c, n = int(sys.argv[1]), int(sys.argv[2])
out = {}
first = cutover.attach(c, "198.18.202.10/24", "brt", host_if=cutover.host_ifname("ct"),
                       mac=cutover.container_mac("ct"))
out["first"] = first.actions
out["again"] = cutover.attach(c, "198.18.202.10/24", "brt",
                              host_if=cutover.host_ifname("ct")).actions
out["mac"] = first.mac
cutover.attach(n, "198.18.202.11/24", "brt", host_if="mgneigh")

# The neighbour believes .10 lives at another MAC (the source node's, say).
with cutover.netlink(f"/proc/{n}/ns/net") as ipr:
    idx = ipr.link_lookup(ifname="eth0")[0]
    ipr.neigh("add", dst="198.18.202.10", lladdr="02:00:00:00:00:99", ifindex=idx,
              state=0x04)  # NUD_STALE

cap = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
cap.bind(("brt", 0))
cap.settimeout(0.2)
out["announce"] = cutover.announce(c, "198.18.202.10/24", count=3)
frames, deadline = [], time.monotonic() + 3
while len(frames) < 3 and time.monotonic() < deadline:
    try:
        frames.append(cap.recv(2048).hex())
    except socket.timeout:
        pass
cap.close()
out["frames"] = frames

with cutover.netlink(f"/proc/{n}/ns/net") as ipr:
    out["neigh"] = [m.get_attr("NDA_LLADDR") for m in ipr.get_neighbours(dst="198.18.202.10")]

def connect():
    try:
        socket.create_connection(("198.18.202.10", 9), 3)
    except ConnectionRefusedError:
        return "refused"
out["connect"] = cutover.in_netns(f"/proc/{n}/ns/net", connect)

out["detach"] = cutover.detach(cutover.host_ifname("ct"))
out["detach_again"] = cutover.detach(cutover.host_ifname("ct"))
with cutover.netlink(f"/proc/{c}/ns/net") as ipr:
    out["left_in_container"] = sorted(l.get_attr("IFLA_IFNAME") for l in ipr.get_links())
print(json.dumps(out))
"""


def test_cutover_attach_announce_detach(node):
    container, neighbour = _holder(node), _holder(node)
    res = node.run(["python3", "-c", _CUTOVER, str(container), str(neighbour)],
                   timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert any("created bridge brt" in a for a in out["first"])
    assert not any(a.startswith(("created", "added", "moved")) for a in out["again"]), \
        "a second attach changes nothing"
    assert out["mac"] == out["announce"]["mac"]
    assert out["announce"]["sent"] == 3 and out["announce"]["kind"] == "garp"
    # Gratuitous ARPs on the bridge: request, sender = target = .10, from the MAC.
    assert len(out["frames"]) == 3
    mac = out["mac"].replace(":", "")
    ip = "c612ca0a"  # 198.18.202.10
    for f in out["frames"]:
        assert f[:12] == "ff" * 6 and f[12:24] == mac and f[24:28] == "0806"
        assert f[40:44] == "0001"                      # request
        assert f[44:56] == mac and f[56:64] == ip and f[76:84] == ip
    assert out["neigh"] == [out["mac"]], "the neighbour's cache followed the announcement"
    assert out["connect"] == "refused"
    assert out["detach"] is True and out["detach_again"] is False
    assert out["left_in_container"] == ["lo"], "the peer went with the host end"
