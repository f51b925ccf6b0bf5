"""podman containers as migration Workloads, and their restorer.

podman keeps its own database of containers, so a podman container is
checkpointed and restored through podman, never through the OCI runtime
underneath (which would leave that database wrong).  podman's portable
form of a checkpoint is its export archive (``checkpoint --export``): CRIU's
images under ``checkpoint/`` plus podman's own files (config.dump,
spec.dump, the filesystem changes in rootfs-diff.tar, ...).

Source, final checkpoint (the container stays stopped, never killed):
  1. freeze the container's cgroup (as for runc, oci.Cgroup);
  2. ``podman container checkpoint --leave-running --export TAR`` (no
     compression): podman's runtime has CRIU dump the frozen tasks, which
     stay frozen;
  3. the archive is split: CRIU's images go into the images directory (so
     the pre-copied pages need not travel again: only the delta does), the
     rest stays one small archive, PODMAN_ARCHIVE, sent as an image file.
  resume() thaws; destroy() is ``podman rm -f``.

Destination: the pages are copied back into the dump's pages images (an
archive cannot hold the page stores' parent images), the archive is put
together again with spec.dump asking CRIU to leave the tasks stopped (the
org.criu.config annotation, which runc reads at restore), and
``podman container restore --import`` restores the container under its
id and name.  The Commit sends SIGCONT to every process of its cgroup.

podman's checkpoint has no way to name a CRIU page server, so CRIU writes
every page here (no DumpPageServer), and the destination copies every page
into the archive: podman moves are correct but their downtime pays for
the whole memory twice, unlike runc's and crun's.
"""

from __future__ import annotations

import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile

from migrator.migration import workload as wl
from migrator.runtime import oci
from migrator.runtime.oci import OciError

log = logging.getLogger("migrator.runtime")

PODMAN_ARCHIVE = "podman-export.tar"   # podman's files of the export, not CRIU's
CHECKPOINT_DIR = "checkpoint/"         # CRIU's images inside podman's archive
CRIU_CONFIG_ANNOTATION = "org.criu.config"
CONFIG_DIR = "/run/migrator"
TIMEOUT = 300.0
EXISTS_TIMEOUT = 30.0


def podman(args: list[str], timeout: float = TIMEOUT, check: bool = True
           ) -> subprocess.CompletedProcess:
    try:
        res = subprocess.run([oci.binary("podman"), *args], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise OciError(f"podman {args[0]} timed out after {timeout}s") from None
    if check and res.returncode != 0:
        raise OciError(f"podman {' '.join(args[:2])} failed ({res.returncode}): "
                       f"{(res.stderr or res.stdout).strip()[-2000:]}")
    return res


def exists(name: str) -> bool:
    """Whether podman here has a container `name` (id or name)."""
    if not shutil.which("podman") and not os.environ.get("MIGRATOR_PODMAN"):
        return False
    try:
        return podman(["container", "exists", name], timeout=EXISTS_TIMEOUT,
                      check=False).returncode == 0
    except OciError as e:  # a podman that hangs must not hold up runc's containers
        log.warning("%s: taking %s for a runc/crun container", e, name)
        return False


def inspect(name: str) -> dict:
    out = podman(["container", "inspect", name]).stdout
    data = json.loads(out)
    if not data:
        raise OciError(f"podman has no container {name!r}")
    return data[0]


class PodmanWorkload(wl.Workload):
    """A podman container: every process of its cgroup."""

    kind = "podman"

    def __init__(self, name: str, shared_storage: bool = False):
        info = inspect(name)
        st = info.get("State", {})
        if st.get("Status") != "running" or not st.get("Pid"):
            raise OciError(f"podman container {name} is {st.get('Status')}, not running")
        if info.get("OCIRuntime") != "runc":
            # The restore leaves the tasks stopped through the CRIU config
            # file of the org.criu.config annotation, which runc reads and
            # crun does not.
            raise OciError(f"podman container {name} runs under "
                           f"{info.get('OCIRuntime')}: migrator moves podman "
                           "containers that run under runc (podman --runtime runc)")
        self.id = info["Id"]
        self.name = info.get("Name", name)
        self.pid = int(st["Pid"])
        self.shared_storage = shared_storage
        self.cgroup = oci.cgroup_of(self.pid)
        self.frozen = False

    def pids(self) -> list[int]:
        rest = sorted(p for p in self.cgroup.procs() if p != self.pid)
        return [self.pid, *rest]

    def checkpoint(self, images_dir: str, page_server=None) -> None:
        os.makedirs(images_dir, exist_ok=True)
        self.cgroup.freeze()
        self.frozen = True
        fd, tar = tempfile.mkstemp(prefix="podman-export-", suffix=".tar",
                                   dir=os.path.dirname(images_dir))
        os.close(fd)
        try:
            podman(["container", "checkpoint", "--leave-running", "--export", tar,
                    "--compress", "none", "--tcp-established",
                    *(["--ignore-rootfs"] if self.shared_storage else []), self.id])
            if not self.cgroup.frozen():
                raise OciError(f"podman checkpoint left {self.name} thawed")
            split_export(tar, images_dir)
        finally:
            os.unlink(tar)

    def resume(self) -> None:
        if self.frozen:
            self.cgroup.thaw(gone_ok=True)
            self.frozen = False

    def destroy(self) -> None:
        podman(["rm", "-f", "-t", "0", self.id], check=False)
        self.cgroup.thaw(gone_ok=True)  # a v1-frozen task does not die until thawed

    def manifest(self) -> dict:
        return {"kind": self.kind, "runtime": "podman", "id": self.id,
                "name": self.name, "shared_storage": self.shared_storage}


def split_export(tar: str, images_dir: str) -> None:
    """CRIU's images of podman's export archive into images_dir, the rest
    into images_dir/PODMAN_ARCHIVE."""
    with tarfile.open(tar) as src, \
            tarfile.open(os.path.join(images_dir, PODMAN_ARCHIVE), "w") as rest:
        for m in src:
            if m.name.startswith(CHECKPOINT_DIR) and m.isfile() \
                    and "/" not in m.name[len(CHECKPOINT_DIR):]:
                with src.extractfile(m) as f, \
                        open(os.path.join(images_dir, m.name[len(CHECKPOINT_DIR):]),
                             "xb") as out:
                    shutil.copyfileobj(f, out, 1 << 20)
            elif m.name.rstrip("/") + "/" != CHECKPOINT_DIR:
                rest.addfile(m, src.extractfile(m) if m.isfile() else None)


# ---------------------------------------------------------- destination

def _join_export(images_dir: str, out: str, criu_conf: str) -> None:
    """podman's archive again: its files (spec.dump with the CRIU config
    annotation) and CRIU's images from images_dir under checkpoint/."""
    ours = {PODMAN_ARCHIVE, wl.MANIFEST}
    with tarfile.open(os.path.join(images_dir, PODMAN_ARCHIVE)) as src, \
            tarfile.open(out, "w") as dst:
        for m in src:
            data = src.extractfile(m) if m.isfile() else None
            if m.name == "spec.dump":
                spec = json.load(data)
                spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = criu_conf
                raw = json.dumps(spec).encode()
                m.size, data = len(raw), io.BytesIO(raw)
            dst.addfile(m, data)
        d = tarfile.TarInfo(CHECKPOINT_DIR.rstrip("/"))
        d.type, d.mode = tarfile.DIRTYPE, 0o755
        dst.addfile(d)
        for name in sorted(os.listdir(images_dir)):
            path = os.path.join(images_dir, name)
            if name in ours or name.startswith(".") or not os.path.isfile(path) \
                    or os.path.islink(path):
                continue
            dst.add(path, CHECKPOINT_DIR + name, recursive=False)


def restore(images_dir: str, manifest: dict) -> int:
    cid = manifest["id"]
    if not isinstance(cid, str) or not cid.isalnum():
        raise ValueError(f"malformed podman container id {cid!r}")
    if exists(cid):
        raise OciError(f"a podman container {cid} already exists here")
    os.makedirs(CONFIG_DIR, mode=0o700, exist_ok=True)
    conf = os.path.join(CONFIG_DIR, f"restore-podman-{cid}.conf")
    with open(conf, "w") as f:
        f.write("leave-stopped\n")
    tar = os.path.join(os.path.dirname(images_dir), "podman-import.tar")
    try:
        _join_export(images_dir, tar, conf)
        podman(["container", "restore", "--import", tar, "--tcp-established",
                *(["--ignore-rootfs"] if manifest.get("shared_storage") else [])])
    finally:
        for path in (conf, tar):
            if os.path.exists(path):
                os.unlink(path)
    try:
        pid = int(inspect(cid)["State"]["Pid"])
        oci.check_left_stopped(cid, pid)
    except BaseException:
        podman(["rm", "-f", "-t", "0", cid], check=False)
        raise
    return pid


def resume_restored(manifest: dict, pid: int) -> None:
    """SIGCONT every process of the restored container's cgroup."""
    try:
        pids = oci.cgroup_of(pid).procs()
    except OSError:
        pids = [pid]
    oci.continue_tasks(pids)


def discard_restored(manifest: dict, pid: int) -> None:
    """A restored container that will not run after all: removed."""
    podman(["rm", "-f", "-t", "0", manifest["id"]], check=False)


def register() -> None:
    wl.RESTORERS["podman"] = restore
    wl.RESUMERS["podman"] = resume_restored
    wl.DISCARDERS["podman"] = discard_restored
    # An archive cannot carry parent images: pages go into its images.
    wl.FLAT_IMAGES.add("podman")
