"""runc and crun containers as migration Workloads, and their restorers.

crun's ``checkpoint`` / ``restore`` take the same options as runc's
(``--image-path``, ``--work-path``, ``--leave-running``, ``-d``,
``--bundle``, ``--manage-cgroups-mode``), so one adapter serves both; the
differences are in `Runtime` below.

Source, final checkpoint (the container stays stopped, never killed):
  1. freeze the container's cgroup;
  2. ``RUNTIME checkpoint --leave-running``: CRIU dumps the frozen tasks and
     restores the freezer state it found, so they stay frozen afterwards
     (seen with runc 1.1.15 and crun 1.21 on CRIU 4.1.1, cgroup v2); its
     pages go to the sender's page server on 127.0.0.1 (runc's
     ``--page-server``; for crun a ``$CRIU_CONFIG_FILE`` that says
     ``page-server``), which writes only those not clean at the
     destination (criu/page_server.py);
  3. the container's filesystem changes into the images dir (tar), still
     inside the freeze, so files and memory are from the same instant.
  resume() thaws; destroy() is ``kill KILL`` + ``delete -f``, so the
  runtime's own state is gone too.

Destination: the filesystem archive is laid over the bundle's rootfs, then
``RUNTIME restore -d`` under the same id with CRIU's ``leave-stopped``:
runc has no such flag, but passes CRIU a configuration file (the
``org.criu.config`` annotation, else /etc/criu/runc.conf) whose settings
override its RPC options; crun passes none, but the ``criu swrk`` it
starts reads ``$CRIU_CONFIG_FILE``.  Every task is then left stopped by
SIGSTOP, with no window in which it runs, until the Commit: the resumer
sends SIGCONT to every process of the container's cgroup.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from typing import Optional

from migrator.criu.page_server import LOOPBACK
from migrator.kernel import procfs
from migrator.migration import workload as wl
from migrator.runtime import oci
from migrator.runtime.network import ContainerNetwork
from migrator.runtime.oci import FS_ARCHIVE, OciError

log = logging.getLogger("migrator.runtime")

CRIU_CONFIG_ANNOTATION = "org.criu.config"
RUNC_DEFAULT_CRIU_CONFIG = "/etc/criu/runc.conf"
CONFIG_DIR = "/run/migrator"
KILL_TIMEOUT = 10.0
_ERROR_RE = re.compile(r"\bError \(")


class Runtime:
    """What differs between runc and crun."""

    def __init__(self, name: str, manage_cgroups: Optional[str],
                 criu_config_via: str, page_server_flag: bool):
        self.name = name
        # `checkpoint --page-server ADDR:PORT` (runc); crun has no such
        # flag, but its criu swrk reads $CRIU_CONFIG_FILE
        self.page_server_flag = page_server_flag
        # crun: "ignore".  On a host with cgroup v1 controllers mounted
        # beside the v2 hierarchy, CRIU's default ("soft") re-creates the v1
        # controllers' cgroups from the image at their hierarchy's root and
        # restores their state there, outside the container's v2 cgroup
        # (seen: restored tasks frozen by a v1 freezer, unkillable).  The
        # runtime creates the container's cgroup from config.json itself.
        self.manage_cgroups = manage_cgroups
        self.criu_config_via = criu_config_via  # "annotation" | "env"

    def cgroup_args(self) -> list[str]:
        return [f"--manage-cgroups-mode={self.manage_cgroups}"] if self.manage_cgroups else []


RUNTIMES = {
    "runc": Runtime("runc", None, "annotation", page_server_flag=True),
    "crun": Runtime("crun", "ignore", "env", page_server_flag=False),
}


def _criu_errors(log_path: str) -> str:
    try:
        with open(log_path, errors="replace") as f:
            lines = [ln.rstrip() for ln in f if _ERROR_RE.search(ln)
                     # runc's swrk cannot raise its own RLIMIT_NOFILE in a
                     # user namespace-less node; CRIU carries on regardless
                     and "RLIMIT_NOFILE" not in ln]
    except OSError:
        return ""
    return ("\n  CRIU: " + "\n  ".join(lines[:20])) if lines else ""


class ContainerWorkload(wl.Workload):
    """A runc / crun container: every process of its cgroup."""

    # The runtime starts CRIU itself: it can only be told an address.
    page_server_via = "tcp"

    def __init__(self, container_id: str, runtime: Optional[str] = None,
                 shared_storage: bool = False):
        self.id = container_id
        self.runtime = RUNTIMES[runtime or oci.detect(container_id)]
        self.kind = self.runtime.name
        self.shared_storage = shared_storage
        st = oci.state(self.kind, container_id)
        if st.status != "running" or not st.pid:
            raise OciError(f"{self.kind} container {container_id} is {st.status}, "
                           "not running")
        self.state = st
        self.cgroup = oci.cgroup_of(st.pid)
        self.frozen = False
        upper = oci.overlay_upper(st.rootfs)
        # What of the filesystem travels: an overlay rootfs's upper dir holds
        # exactly the container's changes; a plain directory travels whole.
        self.fs = "none" if shared_storage else ("upper" if upper else "rootfs")
        self.fs_source = upper or st.rootfs
        with open(os.path.join(st.bundle, "config.json")) as f:
            self.net = ContainerNetwork.of_bundle(container_id, json.load(f))
        self.isolated = False

    def pids(self) -> list[int]:
        rest = sorted(p for p in self.cgroup.procs() if p != self.state.pid)
        return [self.state.pid, *rest]

    def checkpoint(self, images_dir: str, page_server=None) -> None:
        os.makedirs(images_dir, exist_ok=True)
        self.cgroup.freeze()
        self.frozen = True
        if self.net:
            self.net.isolate()
            self.isolated = True
        work = tempfile.mkdtemp(prefix="migrator-work-", dir=os.path.dirname(images_dir))
        extra, env = [], None
        if page_server is not None:
            if self.runtime.page_server_flag:
                extra = ["--page-server", f"{LOOPBACK}:{page_server.port}"]
            else:
                conf = os.path.join(work, "criu-dump.conf")
                with open(conf, "w") as f:
                    f.write(f"page-server\naddress {LOOPBACK}\nport {page_server.port}\n")
                env = {**os.environ, "CRIU_CONFIG_FILE": conf}
        try:
            res = oci.run(self.kind, [
                "checkpoint", "--leave-running", *self.runtime.cgroup_args(),
                *(["--tcp-established"] if self.net else []), *extra,
                "--image-path", images_dir, "--work-path", work, self.id],
                env=env, check=False)
            if res.returncode != 0:
                raise OciError(f"{self.kind} checkpoint {self.id} failed "
                               f"({res.returncode}): {res.stdout.strip()[-1000:]}"
                               + _criu_errors(os.path.join(work, "dump.log")))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if not self.cgroup.frozen():
            # Then the tasks ran after the dump: what CRIU saved is stale,
            # and the last collect would not be in the dump's freeze.
            raise OciError(f"{self.kind} checkpoint left {self.id} thawed")
        if self.fs != "none":
            oci.pack_fs(self.fs_source, os.path.join(images_dir, FS_ARCHIVE))

    def resume(self) -> None:
        if self.isolated:
            try:
                self.net.reconnect()
            except OSError:
                pass  # the container is gone
            self.isolated = False
        if self.frozen:
            self.cgroup.thaw(gone_ok=True)
            self.frozen = False

    def destroy(self) -> None:
        oci.run(self.kind, ["kill", self.id, "KILL"], check=False)
        self.cgroup.thaw(gone_ok=True)  # a v1-frozen task does not die until thawed
        end = time.monotonic() + KILL_TIMEOUT
        while time.monotonic() < end and self.cgroup.procs():
            time.sleep(0.01)
        oci.run(self.kind, ["delete", "-f", self.id], check=False)
        if self.net:
            self.net.remove()

    def manifest(self) -> dict:
        return {"kind": self.kind, "runtime": self.kind, "id": self.id,
                "bundle": self.state.bundle, "rootfs": self.state.rootfs,
                "fs": self.fs, "shared_storage": self.shared_storage,
                "network": self.net.manifest() if self.net else None}


# ---------------------------------------------------------- destination

def _criu_config(rt: Runtime, cid: str, bundle_spec: dict) -> str:
    """A CRIU configuration file for this restore: the one the runtime would
    have used, plus leave-stopped."""
    base = None
    if rt.criu_config_via == "annotation":
        base = bundle_spec.get("annotations", {}).get(
            CRIU_CONFIG_ANNOTATION, RUNC_DEFAULT_CRIU_CONFIG) or None
    text = ""
    if base:
        try:
            with open(base) as f:
                text = f.read()
        except OSError:
            pass  # CRIU ignores a missing file too
    os.makedirs(CONFIG_DIR, mode=0o700, exist_ok=True)
    path = os.path.join(CONFIG_DIR, f"restore-{rt.name}-{cid}.conf")
    with open(path, "w") as f:
        f.write(text.rstrip("\n") + ("\n" if text.strip() else "") + "leave-stopped\n")
    return path


def restore(images_dir: str, manifest: dict) -> int:
    rt = RUNTIMES[manifest["runtime"]]
    cid, bundle = manifest["id"], manifest["bundle"]
    if not isinstance(cid, str) or not cid or "/" in cid:
        raise ValueError(f"malformed container id {cid!r}")
    if os.path.isdir(os.path.join(oci.STATE_ROOTS[rt.name], cid)):
        raise OciError(f"a {rt.name} container {cid} already exists here")
    spec_path = os.path.join(bundle, "config.json")
    try:
        with open(spec_path, "rb") as f:
            original = f.read()
    except OSError as e:
        raise OciError(f"no bundle for {cid} at {bundle}: {e.strerror}") from None
    spec = json.loads(original)
    archive = os.path.join(images_dir, FS_ARCHIVE)
    if manifest.get("fs") in ("rootfs", "upper"):
        rootfs = os.path.join(bundle, spec.get("root", {}).get("path", "rootfs"))
        oci.unpack_fs(archive, rootfs)
    net = ContainerNetwork.from_manifest(cid, manifest.get("network"))
    if net:
        # Before the restore: CRIU rebinds sockets to this address.
        net.prepare()
    conf = _criu_config(rt, cid, spec)
    env = None
    work = tempfile.mkdtemp(prefix="runtime-work-", dir=os.path.dirname(images_dir))
    try:
        if rt.criu_config_via == "annotation":
            # runc reads the annotation from the bundle's config.json at
            # restore; the original is put back right after.  The config
            # file itself exists only for this restore, so the annotation
            # runc keeps in its state is inert for later checkpoints.
            spec.setdefault("annotations", {})[CRIU_CONFIG_ANNOTATION] = conf
            with open(spec_path + ".migrator", "w") as f:
                json.dump(spec, f)
            os.replace(spec_path + ".migrator", spec_path)
        else:
            env = dict(os.environ, CRIU_CONFIG_FILE=conf)
        res = oci.run(rt.name, ["restore", "-d", *rt.cgroup_args(),
                                *(["--tcp-established"] if net else []),
                                "--bundle", bundle, "--image-path", images_dir,
                                "--work-path", work, cid], env=env, check=False)
        if res.returncode != 0:
            if net:
                net.undo_prepare()
            raise OciError(f"{rt.name} restore {cid} failed ({res.returncode}): "
                           f"{res.stdout.strip()[-1000:]}"
                           + _criu_errors(os.path.join(work, "restore.log")))
    finally:
        if rt.criu_config_via == "annotation":
            with open(spec_path + ".migrator", "wb") as f:
                f.write(original)
            os.replace(spec_path + ".migrator", spec_path)
        os.unlink(conf)
        shutil.rmtree(work, ignore_errors=True)
    try:
        st = oci.state(rt.name, cid)
        oci.check_left_stopped(cid, st.pid)
        if net:
            net.go_live()
    except BaseException:
        _remove(rt.name, cid)
        if net:
            net.undo_prepare()
        raise
    return st.pid


def _remove(runtime: str, cid: str) -> None:
    oci.run(runtime, ["kill", cid, "KILL"], check=False)
    time.sleep(0.1)
    oci.run(runtime, ["delete", "-f", cid], check=False)


def resume_restored(manifest: dict, pid: int) -> None:
    """SIGCONT every process of the restored container (not only the init's
    descendants: a process started with `exec` is not one)."""
    try:
        pids = oci.cgroup_of(pid).procs()
    except OSError:
        pids = procfs.process_tree(pid)
    oci.continue_tasks(pids)
    _register_moved(manifest, pid)


def _register_moved(manifest: dict, pid: int) -> None:
    """A restore runs no poststart hook: register the container here as the
    hook would have, so it can be found (and moved on) from this node."""
    from migrator.hooks import registry
    from migrator.hooks.stages import ENABLE
    try:
        with open(os.path.join(manifest["bundle"], "config.json")) as f:
            ann = json.load(f).get("annotations") or {}
        if ann.get(ENABLE) != "true":
            return
        registry.register({"id": manifest["id"], "pid": pid,
                           "bundle": manifest["bundle"], "annotations": ann},
                          manifest["runtime"])
    except (OSError, ValueError, registry.RegistryError) as e:
        # The container runs; only its registration is missing.
        log.warning("could not register %s after the move: %s",
                    manifest.get("id"), e)


def discard_restored(manifest: dict, pid: int) -> None:
    """A restored container that will not run after all: gone from the
    runtime, its link off the bridge (the network namespace stays: it may
    have been here before the migration)."""
    _remove(manifest["runtime"], manifest["id"])
    net = ContainerNetwork.from_manifest(manifest["id"], manifest.get("network"))
    if net:
        net.undo_prepare()


def register() -> None:
    for name in RUNTIMES:
        wl.RESTORERS[name] = restore
        wl.RESUMERS[name] = resume_restored
        wl.DISCARDERS[name] = discard_restored
