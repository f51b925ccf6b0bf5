"""OCI hooks and the container registry, without privileges: registry
round trips, state parsing, opt-in, errors as exit codes, the time bound,
and the cutover's frames (the netlink side is in tests/e2e/test_hooks.py)."""

import ipaddress
import json
import os
import pathlib
import struct
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from migrator.cli import hook as hook_cli
from migrator.hooks import registry, stages
from migrator.network import cutover

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _state(**over):
    s = {"ociVersion": "1.0.2", "id": "c1", "status": "running",
         "pid": os.getpid(), "bundle": "/var/lib/c1",
         "annotations": {"io.migrator.enable": "true"}}
    s.update(over)
    return s


def _hook(args, stdin, env=None, timeout=20):
    """Run the hook as a runtime would: a child process, state on stdin."""
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "migrator.cli.hook", "hook", *args],
                          input=stdin, capture_output=True, text=True, env=e,
                          timeout=timeout)


# ------------------------------------------------------------ registry

def test_registry_round_trip(tmp_path):
    entry = registry.register(_state(), "runc", path=str(tmp_path))
    assert entry["pid"] == os.getpid() and entry["runtime"] == "runc"
    assert entry["cgroup"] == registry.cgroup_of(os.getpid())
    got = registry.lookup("c1", path=str(tmp_path))
    assert got["alive"] is True
    assert {k: got[k] for k in entry} == entry
    assert [e["id"] for e in registry.all(str(tmp_path))] == ["c1"]
    # Nothing but the registration itself is left in the directory.
    assert [p.name for p in tmp_path.iterdir()] == ["c1.json"]
    assert oct(os.stat(tmp_path / "c1.json").st_mode & 0o777) == "0o644"
    assert registry.remove("c1", path=str(tmp_path)) is True
    assert registry.lookup("c1", path=str(tmp_path)) is None
    assert registry.remove("c1", path=str(tmp_path)) is False
    assert registry.all(str(tmp_path)) == []


def test_registry_env_and_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRATOR_REGISTRY", str(tmp_path / "sub"))
    assert registry.all() == []
    registry.register(_state(id="x-1.2_3"), "crun")
    assert registry.lookup("x-1.2_3")["runtime"] == "crun"


def test_registry_replaces_atomically(tmp_path):
    registry.register(_state(), "runc", path=str(tmp_path))
    registry.register(_state(bundle="/other"), "runc", path=str(tmp_path))
    assert registry.lookup("c1", path=str(tmp_path))["bundle"] == "/other"
    assert len(list(tmp_path.iterdir())) == 1


@pytest.mark.parametrize("bad", ["../etc/x", "a/b", ".hidden", "", "x" * 300, 5])
def test_registry_refuses_unsafe_ids(tmp_path, bad):
    with pytest.raises(registry.RegistryError):
        registry.register(_state(id=bad), "runc", path=str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_registry_marks_dead_containers(tmp_path):
    p = subprocess.Popen(["true"])
    p.wait()
    (tmp_path / "gone.json").write_text(json.dumps(
        {"id": "gone", "pid": p.pid, "pid_starttime": "1"}))
    (tmp_path / "junk.json").write_text("{not json")
    (tmp_path / ".c.123.tmp").write_text("{}")
    entries = registry.all(str(tmp_path))
    assert [(e["id"], e["alive"]) for e in entries] == [("gone", False)]
    with pytest.raises(registry.RegistryError):
        registry.lookup("junk", path=str(tmp_path))


# ------------------------------------------------------------ state parsing

@pytest.mark.parametrize("text, why", [
    ("", "no OCI state"),
    ("{", "not JSON"),
    ("[1]", "not a JSON object"),
    ('{"ociVersion": "1", "status": "running"}', "'id'"),
    ('{"ociVersion": "1", "id": "../x", "status": "running"}', "invalid container id"),
    ('{"ociVersion": "1", "id": "a", "status": "running", "pid": "7"}', "bad pid"),
    ('{"ociVersion": "1", "id": "a", "status": "running", "annotations": {"k": 1}}',
     "annotations"),
])
def test_parse_state_rejects(text, why):
    with pytest.raises(stages.StateError, match=why):
        stages.parse_state(text)


def test_parse_state_accepts_minimal():
    s = stages.parse_state('{"ociVersion": "1.2.0", "id": "a", "status": "stopped"}')
    assert s["annotations"] == {} and s.get("pid") is None
    with pytest.raises(stages.StateError, match="no pid"):
        stages.parse_state('{"ociVersion": "1.2.0", "id": "a", "status": "x"}', need_pid=True)


def test_stage_names():
    assert stages.canonical_stage("createRuntime") == "createRuntime"
    assert stages.canonical_stage("create-runtime") == "createRuntime"
    with pytest.raises(stages.HookError):
        stages.canonical_stage("prestart")


def test_network_request():
    st = _state(annotations={"io.migrator.network": "198.18.5.7/24@br0",
                             "io.migrator.network.gateway": "198.18.5.1"})
    assert stages.network_request(st) == {"address": "198.18.5.7/24", "bridge": "br0",
                                          "gateway": "198.18.5.1", "ifname": "eth0"}
    assert stages.network_request(_state()) is None
    with pytest.raises(stages.HookError, match="ADDR/PREFIX@BRIDGE"):
        stages.network_request(_state(annotations={"io.migrator.network": "198.18.5.7/24"}))


def test_detect_runtime_from_parent():
    # "; :" keeps sh from exec-ing sleep, which would change comm and cmdline.
    p = subprocess.Popen(["sh", "-c", "sleep 30; :", "runc", "--root", "/run/x"])
    try:
        # Popen can return before the child has exec'd (vfork): wait for it.
        for _ in range(500):
            if b"runc" in pathlib.Path(f"/proc/{p.pid}/cmdline").read_bytes():
                break
            time.sleep(0.01)
        rt = stages.detect_runtime({"annotations": {}}, parent=p.pid)
        assert rt["root"] == "/run/x" and rt["name"] == "sh" and rt["path"]
        rt = stages.detect_runtime({"annotations": {"io.container.manager": "libpod"}},
                                   explicit="crun", parent=p.pid)
        assert rt["name"] == "crun" and rt["manager"] == "podman"
    finally:
        p.kill()
        p.wait()


# ------------------------------------------------------------ the hook command

def test_poststart_then_poststop(tmp_path):
    env = {"MIGRATOR_REGISTRY": str(tmp_path)}
    st = json.dumps(_state())
    r = _hook(["poststart", "--runtime", "runc", "--json"], st, env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["action"] == "registered"
    assert registry.lookup("c1", path=str(tmp_path))["runtime"] == "runc"
    r = _hook(["poststop"], json.dumps(_state(status="stopped")), env)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""
    assert registry.lookup("c1", path=str(tmp_path)) is None


def test_without_opt_in_nothing_happens(tmp_path):
    st = json.dumps(_state(annotations={"io.migrator.enable": "false"}))
    r = _hook(["poststart", "--registry", str(tmp_path), "--json"], st)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["action"] == "skipped"
    assert list(tmp_path.iterdir()) == []
    # createRuntime without a network annotation: nothing either.
    r = _hook(["createRuntime", "--json"], json.dumps(_state(annotations={})))
    assert r.returncode == 0 and json.loads(r.stdout)["action"] == "skipped"


@pytest.mark.parametrize("stdin", ["", "{oops", '{"ociVersion": "1", "id": "a/b", "status": "x"}'])
def test_malformed_state_is_a_usage_error(tmp_path, stdin):
    r = _hook(["poststart", "--registry", str(tmp_path)], stdin)
    assert r.returncode == hook_cli.USAGE
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("migrator hook poststart: ")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_registry_fails_with_one_line(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = _hook(["poststart", "--registry", str(blocker / "sub")], json.dumps(_state()))
    assert r.returncode == hook_cli.FAILURE
    assert len(r.stderr.strip().splitlines()) == 1 and "registry" in r.stderr


def test_unknown_stage_is_usage():
    assert _hook(["prestart"], "{}").returncode == hook_cli.USAGE


def test_stdin_never_closed_is_bounded(tmp_path):
    # The runtime keeps the pipe open and writes nothing: the hook must end
    # on its own deadline.  The 20 s here is only the test's safety net.
    e = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.Popen([sys.executable, "-m", "migrator.cli.hook", "hook",
                          "poststart", "--timeout", "0.5", "--registry", str(tmp_path)],
                         stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e)
    try:
        p.wait(timeout=20)  # not communicate(): that would close stdin
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdin.close()
        p.stderr.close()
    assert p.returncode == hook_cli.FAILURE
    assert "timed out after 0.5s" in err


def test_stuck_stage_is_bounded(tmp_path):
    r = _hook(["poststart", "--timeout", "0.5", "--registry", str(tmp_path)],
              json.dumps(_state()), env={"MIGRATOR_FAULT": "hook-stall"})
    assert r.returncode == hook_cli.FAILURE
    assert r.stderr.strip() == "migrator hook poststart: timed out after 0.5s"


def test_list_json(tmp_path):
    registry.register(_state(), "runc", path=str(tmp_path))
    r = CliRunner().invoke(hook_cli.cli, ["list", "--json", "--registry", str(tmp_path)])
    assert r.exit_code == 0, r.output
    (entry,) = json.loads(r.stdout)
    assert entry["id"] == "c1" and entry["alive"] is True
    r = CliRunner().invoke(hook_cli.cli, ["list", "--registry", str(tmp_path)])
    assert "c1" in r.stdout


def test_exit_codes_match_the_cli_table():
    exits = pytest.importorskip("migrator.cli.exits")
    assert (hook_cli.FAILURE, hook_cli.USAGE) == (exits.FAILURE, exits.USAGE)


def test_main_app_has_hook_and_list():
    app = pytest.importorskip("migrator.cli.app")
    r = CliRunner().invoke(app.app, ["list", "--help"])
    assert r.exit_code == 0 and "--json" in r.stdout


# ------------------------------------------------------------ cutover frames (no netlink)

def test_names_are_stable_and_valid():
    a, b = cutover.host_ifname("c1"), cutover.host_ifname("c1")
    assert a == b and len(a) <= 15 and a != cutover.host_ifname("c2")
    mac = cutover.container_mac("c1")
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01  # locally administered, unicast
    assert mac == cutover.container_mac("c1")


def test_arp_frame_layout():
    f = cutover.arp_frame("02:00:00:00:00:0a", "198.18.3.4")
    assert len(f) == 60
    assert f[:6] == b"\xff" * 6 and f[6:12] == bytes.fromhex("02000000000a")
    htype, ptype, hlen, plen, oper = struct.unpack("!HHBBH", f[14:22])
    assert (struct.unpack("!H", f[12:14])[0], htype, ptype, hlen, plen, oper) == \
        (0x0806, 1, 0x0800, 6, 4, 1)
    ip = ipaddress.IPv4Address("198.18.3.4").packed
    assert f[22:28] == bytes.fromhex("02000000000a") and f[28:32] == ip
    assert f[32:38] == b"\x00" * 6 and f[38:42] == ip


def test_na_frame_checksum():
    f = cutover.na_frame("02:00:00:00:00:0a", "fd00::7")
    assert f[:6] == bytes.fromhex("333300000001") and f[12:14] == b"\x86\xdd"
    ip6, icmp = f[14:54], f[54:]
    assert ip6[6] == 58 and ip6[7] == 255 and struct.unpack("!H", ip6[4:6])[0] == len(icmp)
    assert icmp[0] == 136 and icmp[4] & 0x20 and not icmp[4] & 0x40
    pseudo = ip6[8:40] + struct.pack("!I", len(icmp)) + b"\x00\x00\x00\x3a"
    # The one's-complement sum over pseudo-header and message, checksum
    # included, is all ones when the checksum is right.
    assert cutover._checksum(pseudo + icmp) == 0
    assert icmp[24:26] == b"\x02\x01" and icmp[26:32] == bytes.fromhex("02000000000a")


def test_bad_inputs_are_clear():
    with pytest.raises(cutover.CutoverError, match="prefix"):
        cutover.parse_address("198.18.0.1")
    with pytest.raises(cutover.CutoverError, match="MAC"):
        cutover.arp_frame("zz", "198.18.0.1")
    with pytest.raises(cutover.CutoverError, match="does not exist"):
        cutover.attach("/nonexistent/ns", "198.18.0.1/24", "br0")
    assert cutover.netns_path(42) == "/proc/42/ns/net"
    assert cutover.netns_path("/run/netns/x") == "/run/netns/x"
