"""The registry of containers migrator may move: one JSON file per
container id in a directory (default /run/migrator/containers, or
$MIGRATOR_REGISTRY), written by the poststart hook, removed by poststop.

File grammar (one JSON object, `<id>.json`):

    {"id": str, "pid": int, "pid_starttime": str | null, "bundle": str,
     "runtime": str, "runtime_path": str | null, "runtime_root": str | null,
     "manager": "podman" | null,
     "cgroup": str | null, "annotations": {str: str},
     "network": {"address": str, "bridge": str, "gateway": str | null} | null,
     "registered_at": float (Unix time), "version": 1}

Readers get the same object plus `"alive": bool`: whether the recorded pid
still is the process that was registered (pid and start time match), so a
registration left behind by a runtime that never ran poststop (runc
SIGKILLed during delete, a container killed outside its runtime) is visible
as such and not acted on.

Files are written to a temporary name in the same directory, fsynced and
renamed, so a reader sees either the old registration or the new one,
never half of one.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import tempfile
import time
from typing import Optional

DEFAULT_DIR = "/run/migrator/containers"
ENV_DIR = "MIGRATOR_REGISTRY"
VERSION = 1

# runc accepts ids matching ^[\w+-\.]+$; anything else (a slash, a leading
# dot) could name a file outside the directory, so it is refused here too.
_ID = re.compile(r"^[A-Za-z0-9_+\-][A-Za-z0-9_+.\-]{0,249}$")


class RegistryError(ValueError):
    """A registration cannot be written or read (bad id, bad file)."""


def directory(path: Optional[str] = None) -> pathlib.Path:
    return pathlib.Path(path or os.environ.get(ENV_DIR) or DEFAULT_DIR)


def check_id(container_id: object) -> str:
    if not isinstance(container_id, str) or not _ID.match(container_id):
        raise RegistryError(f"invalid container id {container_id!r}")
    return container_id


def _file(container_id: str, path: Optional[str]) -> pathlib.Path:
    return directory(path) / f"{check_id(container_id)}.json"


def pid_starttime(pid: int) -> Optional[str]:
    """Field 22 of /proc/PID/stat: with the pid, it names one process for
    the life of the system (pids are reused, start times with them are not)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after the last ')'.
    return stat[stat.rindex(")") + 2:].split()[19]


def cgroup_of(pid: int) -> Optional[str]:
    """The process's cgroup v2 path ("0::/path" line of /proc/PID/cgroup),
    as seen from the caller's cgroup namespace."""
    try:
        lines = pathlib.Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


def register(state: dict, runtime: dict | str, network: Optional[dict] = None,
             path: Optional[str] = None) -> dict:
    """Record the container described by the OCI ``state``; returns what was
    written.  ``runtime`` is a name or a dict with ``name``, ``path`` and
    ``root`` (see migrator.hooks.stages.detect_runtime)."""
    if isinstance(runtime, str):
        runtime = {"name": runtime}
    pid = state.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        raise RegistryError(f"container {state.get('id')!r} has no pid in its state")
    entry = {
        "version": VERSION,
        "id": check_id(state.get("id")),
        "pid": pid,
        "pid_starttime": pid_starttime(pid),
        "bundle": state.get("bundle"),
        "runtime": runtime.get("name"),
        "runtime_path": runtime.get("path"),
        "runtime_root": runtime.get("root"),
        "manager": runtime.get("manager"),
        "cgroup": cgroup_of(pid),
        "annotations": dict(state.get("annotations") or {}),
        "network": network,
        "registered_at": time.time(),
    }
    target = _file(entry["id"], path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    fd, tmp = tempfile.mkstemp(prefix=f".{entry['id']}.", suffix=".tmp",
                               dir=target.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(entry, f, indent=1, sort_keys=True)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.rename(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return entry


def remove(container_id: str, path: Optional[str] = None) -> bool:
    """Forget a container; True if it was registered.  Removing an unknown
    id is not an error: poststop runs for every container."""
    try:
        _file(container_id, path).unlink()
        return True
    except FileNotFoundError:
        return False


def _read(file: pathlib.Path) -> dict:
    try:
        entry = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"unreadable registration {file}: {e}") from None
    if not isinstance(entry, dict) or not isinstance(entry.get("pid"), int):
        raise RegistryError(f"malformed registration {file}")
    entry["alive"] = (entry.get("pid_starttime") is not None
                      and pid_starttime(entry["pid"]) == entry["pid_starttime"])
    return entry


def lookup(container_id: str, path: Optional[str] = None) -> Optional[dict]:
    """The registration of ``container_id``, or None."""
    file = _file(container_id, path)
    if not file.exists():
        return None
    return _read(file)


def all(path: Optional[str] = None) -> list[dict]:  # noqa: A001 - the brief's API name
    """Every registration, sorted by id.  Files that cannot be parsed are
    skipped (another writer's temporary file is never matched: it starts
    with a dot)."""
    d = directory(path)
    try:
        names = sorted(p for p in d.iterdir()
                       if p.suffix == ".json" and not p.name.startswith("."))
    except FileNotFoundError:
        return []
    out = []
    for file in names:
        try:
            out.append(_read(file))
        except RegistryError:
            continue
    return out
