"""What `migrator hook STAGE` does at each OCI lifecycle stage.

The runtime writes the container's state on the hook's stdin (OCI runtime
spec, "State"): ``{"ociVersion", "id", "status", "pid", "bundle",
"annotations"}``.  Stages:

- ``poststart``: register the container (migrator.hooks.registry), only if
  its annotations opt in (``io.migrator.enable=true``);
- ``poststop``: forget it (unconditionally: removing nothing is a no-op,
  and a stale file of a reused id must not survive);
- ``createRuntime``: at create, and at restore on the destination (runc
  runs it when CRIU has set up the namespaces, before the tasks resume):
  connect the container's network namespace to a bridge and announce its
  address (migrator.network.cutover), only if
  ``io.migrator.network=ADDR/PREFIX@BRIDGE`` is set.

Annotations read here:

    io.migrator.enable           "true": register at poststart
    io.migrator.network          ADDR/PREFIX@BRIDGE (IPv4 or IPv6)
    io.migrator.network.gateway  default gateway (optional; without it the
                                 default route goes out of the interface)
    io.migrator.network.ifname   interface inside the container (eth0)

Every stage runs against a ``Deadline``: a hook holds the container's start,
so nothing here may wait longer than the hook's time budget.
"""

from __future__ import annotations

import json
import os
import pathlib
import select
import time
from typing import Optional

from migrator.hooks import registry

ENABLE = "io.migrator.enable"
NETWORK = "io.migrator.network"
GATEWAY = "io.migrator.network.gateway"
IFNAME = "io.migrator.network.ifname"

STAGES = ("poststart", "poststop", "createRuntime")
MAX_STATE_BYTES = 1 << 20  # OCI state is a few hundred bytes; refuse floods


class HookError(RuntimeError):
    """The hook cannot do its job; the message is one line for the runtime."""


class StateError(HookError, ValueError):
    """The state on stdin is not an OCI state."""


class HookTimeout(HookError):
    """The hook's time budget ran out."""


class Deadline:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise HookTimeout(f"timed out after {self.seconds:g}s")
        return left


def canonical_stage(name: str) -> str:
    for s in STAGES:
        if name.lower().replace("-", "").replace("_", "") == s.lower():
            return s
    raise HookError(f"unknown stage {name!r} (one of {', '.join(STAGES)})")


def read_state(fd: int, deadline: Deadline) -> str:
    """All of ``fd`` up to EOF, within the deadline.  select() before each
    read: a runtime that never closes the pipe must not hang the hook."""
    chunks, size = [], 0
    while True:
        ready, _, _ = select.select([fd], [], [], deadline.remaining())
        if not ready:
            deadline.remaining()  # raises HookTimeout
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        size += len(chunk)
        if size > MAX_STATE_BYTES:
            raise StateError(f"state on stdin exceeds {MAX_STATE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks).decode("utf-8", errors="replace")


def parse_state(text: str, need_pid: bool = False) -> dict:
    """The OCI state as a dict, checked; StateError says what is wrong."""
    if not text.strip():
        raise StateError("no OCI state on stdin (the runtime passes it there)")
    try:
        state = json.loads(text)
    except ValueError as e:
        raise StateError(f"state on stdin is not JSON: {e}") from None
    if not isinstance(state, dict):
        raise StateError("state on stdin is not a JSON object")
    for key in ("ociVersion", "id", "status"):
        if not isinstance(state.get(key), str):
            raise StateError(f"state has no {key!r} string")
    try:
        registry.check_id(state["id"])
    except registry.RegistryError as e:
        raise StateError(str(e)) from None
    pid = state.get("pid")
    if pid is not None and (not isinstance(pid, int) or isinstance(pid, bool) or pid < 0):
        raise StateError(f"state has a bad pid {pid!r}")
    if need_pid and not pid:
        raise StateError(f"state of {state['id']} has no pid (status {state['status']})")
    ann = state.get("annotations") or {}
    if not isinstance(ann, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in ann.items()):
        raise StateError("state annotations are not a map of strings")
    state["annotations"] = ann
    if "bundle" in state and not isinstance(state["bundle"], str):
        raise StateError("state bundle is not a string")
    return state


def _cmdline(pid: int) -> list[str]:
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


_DEFAULT_ROOTS = {"runc": "/run/runc", "crun": "/run/crun"}


def detect_runtime(state: dict, explicit: Optional[str] = None,
                   parent: Optional[int] = None) -> dict:
    """Which runtime runs the hook: ``explicit`` if given, else the hook's
    parent process (runc and crun run hooks as their own children; the
    OCI state does not name the runtime).  ``root`` is the runtime's
    --root (state directory) from the parent's command line, or its
    default, so `runc --root ROOT checkpoint` finds the container later.
    ``manager`` is "podman" when libpod's annotation says it created the
    container (then podman, not the runtime, should checkpoint it)."""
    parent = os.getppid() if parent is None else parent
    argv = _cmdline(parent)
    try:
        path = os.readlink(f"/proc/{parent}/exe")
    except OSError:
        path = None
    name = explicit
    if name is None:
        try:
            name = pathlib.Path(f"/proc/{parent}/comm").read_text().strip()
        except OSError:
            name = "unknown"
    root = None
    for i, arg in enumerate(argv):
        if arg == "--root" and i + 1 < len(argv):
            root = argv[i + 1]
        elif arg.startswith("--root="):
            root = arg.split("=", 1)[1]
    manager = "podman" if state.get("annotations", {}).get(
        "io.container.manager") == "libpod" else None
    return {"name": name, "path": path if explicit is None else None,
            "root": root or _DEFAULT_ROOTS.get(name), "manager": manager}


def network_request(state: dict) -> Optional[dict]:
    """The network the annotations ask for, or None."""
    ann = state.get("annotations") or {}
    spec = ann.get(NETWORK)
    if not spec:
        return None
    address, sep, bridge = spec.rpartition("@")
    if not sep or not address or not bridge:
        raise HookError(f"{NETWORK}={spec!r}: expected ADDR/PREFIX@BRIDGE")
    return {"address": address, "bridge": bridge,
            "gateway": ann.get(GATEWAY) or None,
            "ifname": ann.get(IFNAME) or "eth0"}


def poststart(state: dict, runtime: Optional[str] = None,
              registry_dir: Optional[str] = None) -> dict:
    if (state["annotations"].get(ENABLE) or "").lower() != "true":
        return {"stage": "poststart", "id": state["id"], "action": "skipped",
                "reason": f"no {ENABLE}=true annotation"}
    try:
        net = network_request(state)
    except HookError:
        net = None  # createRuntime already refused it; registration still helps
    rt = detect_runtime(state, runtime)
    try:
        entry = registry.register(state, rt, network=net, path=registry_dir)
    except registry.RegistryError as e:
        raise HookError(str(e)) from None
    except OSError as e:
        raise HookError(f"cannot write the registry "
                        f"{registry.directory(registry_dir)}: {e}") from None
    return {"stage": "poststart", "id": state["id"], "action": "registered",
            "entry": entry}


def poststop(state: dict, registry_dir: Optional[str] = None) -> dict:
    try:
        removed = registry.remove(state["id"], path=registry_dir)
    except OSError as e:
        raise HookError(f"cannot update the registry: {e}") from None
    return {"stage": "poststop", "id": state["id"],
            "action": "removed" if removed else "not-registered"}


def create_runtime(state: dict, deadline: Deadline) -> dict:
    net = network_request(state)
    if net is None:
        return {"stage": "createRuntime", "id": state["id"], "action": "skipped",
                "reason": f"no {NETWORK} annotation"}
    if not state.get("pid"):
        raise StateError(f"state of {state['id']} has no pid: no namespace to connect")
    # Imported here: pyroute2 costs time that poststart/poststop never need.
    from migrator.network import cutover
    try:
        att = cutover.attach(state["pid"], net["address"], net["bridge"],
                             ifname=net["ifname"], gateway=net["gateway"],
                             host_if=cutover.host_ifname(state["id"]),
                             mac=cutover.container_mac(state["id"]))
        ann = cutover.announce(state["pid"], net["address"], ifname=net["ifname"],
                               mac=att.mac, timeout=deadline.remaining())
    except cutover.CutoverError as e:
        raise HookError(str(e)) from None
    return {"stage": "createRuntime", "id": state["id"], "action": "attached",
            "attachment": att.as_dict(), "announce": ann}


def run(stage: str, text: str, deadline: Deadline, runtime: Optional[str] = None,
        registry_dir: Optional[str] = None) -> dict:
    """Run one stage on the state ``text``; returns what it did."""
    stage = canonical_stage(stage)
    state = parse_state(text, need_pid=stage == "poststart")
    if "hook-stall" in os.environ.get("MIGRATOR_FAULT", "").split(","):
        # Test point: a stage stuck in the kernel; the CLI's deadline must end it.
        while True:
            time.sleep(3600)
    if stage == "poststart":
        return poststart(state, runtime, registry_dir)
    if stage == "poststop":
        return poststop(state, registry_dir)
    return create_runtime(state, deadline)
