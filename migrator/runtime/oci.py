"""What every OCI runtime adapter needs: the runtime's view of a container
(``RUNTIME state ID``), the container's cgroup and its freezer, which
runtime owns an id, and the container's filesystem changes as a tar file.

The cgroup freezer is how a container is held still for the final
checkpoint: CRIU, asked to dump a cgroup that is already frozen, dumps
the frozen tasks and puts the freezer back as it found it (frozen), so the
tasks stay stopped after the dump and the last collect runs inside the
same freeze as the dump (ARCHITECTURE.md, invariant 4).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from dataclasses import dataclass
from typing import Optional

# Where each runtime keeps its per-container state (one directory per id)
# when run as root with its default --root.
STATE_ROOTS = {"runc": "/run/runc", "crun": "/run/crun"}

FREEZE_TIMEOUT = 10.0
RUNTIME_TIMEOUT = 120.0


class OciError(RuntimeError):
    """A runtime command failed or a container is not in a usable state."""


def binary(runtime: str) -> str:
    env = os.environ.get(f"MIGRATOR_{runtime.upper()}")
    if env:
        return env
    found = shutil.which(runtime)
    if not found:
        raise OciError(f"{runtime} not found on PATH")
    return found


def run(runtime: str, args: list[str], timeout: float = RUNTIME_TIMEOUT,
        env: Optional[dict] = None, check: bool = True
        ) -> subprocess.CompletedProcess:
    """Run the runtime with stdio detached from ours: `restore -d` hands its
    stdio to the container, and a pipe of ours kept open there would make
    us wait for the container's end.  Output goes through a file."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out:
        try:
            res = subprocess.run([binary(runtime), *args], stdin=subprocess.DEVNULL,
                                 stdout=out, stderr=subprocess.STDOUT,
                                 timeout=timeout, env=env, text=True)
        except subprocess.TimeoutExpired:
            raise OciError(f"{runtime} {args[0]} timed out after {timeout}s") from None
        out.seek(0)
        text = out.read()
    res = subprocess.CompletedProcess(res.args, res.returncode, text, "")
    if check and res.returncode != 0:
        raise OciError(f"{runtime} {' '.join(args[:1])} failed "
                            f"({res.returncode}): {text.strip()[-2000:]}")
    return res


@dataclass(frozen=True)
class ContainerState:
    id: str
    pid: int
    status: str      # created / running / paused / stopped
    bundle: str
    rootfs: str      # absolute


def state(runtime: str, cid: str) -> ContainerState:
    res = run(runtime, ["state", cid], timeout=30)
    try:
        st = json.loads(res.stdout)
    except ValueError:
        raise OciError(f"{runtime} state {cid}: not JSON: {res.stdout[:300]!r}") from None
    bundle = st.get("bundle") or ""
    rootfs = st.get("rootfs") or ""
    if not rootfs:
        rootfs = os.path.join(bundle, _spec_root(bundle))
    elif not os.path.isabs(rootfs):
        rootfs = os.path.join(bundle, rootfs)  # crun reports it as in config.json
    return ContainerState(cid, int(st.get("pid") or 0), st.get("status", "?"),
                          bundle, os.path.normpath(rootfs))


def _spec_root(bundle: str) -> str:
    with open(os.path.join(bundle, "config.json")) as f:
        return json.load(f).get("root", {}).get("path", "rootfs")


def detect(cid: str) -> str:
    """The runtime that owns container `cid` (its state directory exists)."""
    owners = [rt for rt, root in STATE_ROOTS.items()
              if os.path.isdir(os.path.join(root, cid))]
    if len(owners) == 1:
        return owners[0]
    if not owners:
        raise OciError(f"no runc or crun container named {cid!r} "
                            f"(looked in {', '.join(STATE_ROOTS.values())})")
    raise OciError(f"container {cid!r} exists in {' and '.join(owners)}: "
                        "say which with --runtime")


def task_stopped(pid: int) -> bool:
    """Whether `pid` is stopped (a restore left it so); a task that is
    gone counts as stopped: nothing of it runs."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except OSError:
        return True


def check_left_stopped(cid: str, pid: int) -> None:
    """After a restore meant to leave every task of container `cid` (init
    `pid`) stopped until the Commit: OciError if one runs."""
    running = [p for p in cgroup_of(pid).procs() if not task_stopped(p)]
    if running:
        raise OciError(f"restored {cid} but tasks {running} run before the "
                       "commit (CRIU ignored leave-stopped)")


def continue_tasks(pids) -> None:
    """SIGCONT each of `pids`; one that is gone meanwhile is skipped."""
    for p in pids:
        try:
            os.kill(p, signal.SIGCONT)
        except ProcessLookupError:
            pass


# ------------------------------------------------------------- cgroups

def _mountinfo() -> list[tuple[str, str, str, str]]:
    """(root, mount point, fs type, super options) per mount of ours."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rfields = left.split(), right.split()
            out.append((_unescape(fields[3]), _unescape(fields[4]), rfields[0],
                        rfields[2] if len(rfields) > 2 else ""))
    return out


def _unescape(s: str) -> str:
    return s.encode().decode("unicode_escape") if "\\" in s else s


class Cgroup:
    """A container's cgroup, seen through our cgroup mounts.  v2:
    ``cgroup.freeze`` / ``cgroup.events``; v1: the freezer controller's
    ``freezer.state``."""

    def __init__(self, path: str, v2: bool):
        self.path = path
        self.v2 = v2

    def __repr__(self) -> str:
        return f"Cgroup({self.path!r}, v2={self.v2})"

    def procs(self) -> list[int]:
        # cgroup.procs lists thread-group leaders; a v2 container cgroup
        # with sub-cgroups (systemd inside) needs its whole subtree.
        pids: list[int] = []
        for d, _, files in os.walk(self.path):
            if "cgroup.procs" in files:
                try:
                    with open(os.path.join(d, "cgroup.procs")) as f:
                        pids += [int(x) for x in f.read().split()]
                except OSError:
                    pass  # removed meanwhile
        return pids

    def frozen(self) -> bool:
        if self.v2:
            with open(os.path.join(self.path, "cgroup.events")) as f:
                return any(line.split() == ["frozen", "1"] for line in f)
        with open(os.path.join(self.path, "freezer.state")) as f:
            return f.read().strip() == "FROZEN"

    def _write(self, name: str, value: str) -> None:
        with open(os.path.join(self.path, name), "w") as f:
            f.write(value)

    def freeze(self, timeout: float = FREEZE_TIMEOUT) -> None:
        """Freeze and wait until every task is frozen (the write only asks;
        the kernel reports completion in cgroup.events / freezer.state)."""
        if self.v2:
            self._write("cgroup.freeze", "1")
        else:
            self._write("freezer.state", "FROZEN")
        end = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > end:
                self.thaw()
                raise OciError(f"{self.path}: not frozen after {timeout}s")
            time.sleep(0.002)

    def thaw(self, gone_ok: bool = False) -> None:
        """gone_ok: a cgroup that no longer exists (the container is
        gone) is not an error."""
        try:
            if self.v2:
                self._write("cgroup.freeze", "0")
            else:
                self._write("freezer.state", "THAWED")
        except OSError:
            if not gone_ok:
                raise


def cgroup_of(pid: int) -> Cgroup:
    """The cgroup of `pid` that can freeze it: the v2 one if cgroup2 is
    mounted here (and this process's cgroup namespace shows the path),
    else the v1 freezer."""
    lines = {}
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            hid, ctrls, path = line.rstrip("\n").split(":", 2)
            lines[ctrls if hid != "0" else ""] = path
    mounts = _mountinfo()
    if "" in lines:
        for root, point, fstype, _ in mounts:
            if fstype == "cgroup2":
                rel = os.path.relpath(lines[""], root) if root != "/" else lines[""].lstrip("/")
                if rel.startswith(".."):
                    continue
                p = os.path.normpath(os.path.join(point, rel))
                if os.path.exists(os.path.join(p, "cgroup.freeze")):
                    return Cgroup(p, True)
    for ctrls, path in lines.items():
        if "freezer" in ctrls.split(","):
            for root, point, fstype, opts in mounts:
                if fstype == "cgroup" and "freezer" in opts.split(","):
                    rel = os.path.relpath(path, root)
                    if not rel.startswith(".."):
                        return Cgroup(os.path.normpath(os.path.join(point, rel)), False)
    raise OciError(f"pid {pid}: no freezable cgroup (no cgroup2 with "
                        "cgroup.freeze, no v1 freezer) is mounted here")


# ----------------------------------------------------------- filesystem

FS_ARCHIVE = "container-fs.tar"  # in the images dir: a plain name, no dot


def overlay_upper(rootfs: str) -> Optional[str]:
    """The upper dir when `rootfs` is an overlay mount point, else None."""
    rootfs = os.path.realpath(rootfs)
    upper = None
    for _, point, fstype, opts in _mountinfo():
        if point == rootfs:
            # the last mount on a point is the one seen
            upper = None
            if fstype == "overlay":
                for o in opts.split(","):
                    if o.startswith("upperdir="):
                        upper = o[len("upperdir="):]
    return upper


def pack_fs(src: str, archive: str) -> None:
    """Everything under `src` into `archive` with owners, modes, devices,
    xattrs: GNU tar, numeric ids (the destination may name users otherwise)."""
    res = subprocess.run(["tar", "-C", src, "--numeric-owner", "--xattrs",
                          "--xattrs-include=*", "-cpf", archive, "."],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise OciError(f"packing {src}: {res.stderr.strip()[-1000:]}")


def _is_whiteout(m: tarfile.TarInfo) -> bool:
    return m.ischr() and m.devmajor == 0 and m.devminor == 0


def unpack_fs(archive: str, dest: str) -> None:
    """Lay `archive` over `dest`.  An overlay upper dir marks deleted files
    with 0/0 character devices (whiteouts): those delete the path in
    `dest` instead of being created (when `dest` is itself an overlay's
    merged view, that makes the kernel write its own whiteout)."""
    with tarfile.open(archive) as t:
        whiteouts = [m.name for m in t.getmembers() if _is_whiteout(m)]
    for name in whiteouts:
        p = os.path.normpath(os.path.join(dest, name))
        if not p.startswith(os.path.normpath(dest) + os.sep):
            raise OciError(f"{archive}: member {name!r} escapes the rootfs")
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p)
        elif os.path.lexists(p):
            os.unlink(p)
    excludes = []
    for name in whiteouts:
        excludes += ["--exclude", name]
    res = subprocess.run(["tar", "-C", dest, "--numeric-owner", "--xattrs",
                          "--xattrs-include=*", "-xpf", archive, *excludes],
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise OciError(f"unpacking into {dest}: {res.stderr.strip()[-1000:]}")
