"""What is being migrated, and how it is checkpointed and restored.

The migration drivers do not care whether they move a bare process tree
or a container: they ask a Workload for the pids to track, for a final
checkpoint that leaves every task stopped, and, on failure, to resume it.
The destination gets the Workload's manifest (a small JSON image file,
MANIFEST) and asks the matching Restorer to restore from the images,
leaving the tasks stopped until the hand-over commits.

Kinds: "process" (CRIU directly) here; container runtimes ("runc",
"crun") register their own restorers and resumers (migrator/runtime),
loaded on first use.
"""

from __future__ import annotations

import json
import os
import signal
from typing import Callable

from migrator.criu import images, runner
from migrator.kernel import procfs

MANIFEST = "migrator-manifest.json"


class Workload:
    kind = "?"
    # How checkpoint() can hand CRIU's pages to a DumpPageServer
    # (criu/page_server.py) instead of CRIU writing them: "fd" (CRIU
    # inherits a socket), "tcp" (CRIU connects to 127.0.0.1), or None.
    page_server_via: str | None = None

    def pids(self) -> list[int]:
        """The processes to track, root first."""
        raise NotImplementedError

    def checkpoint(self, images_dir: str, page_server=None) -> None:
        """Final checkpoint into images_dir; every task is left stopped.
        With a started DumpPageServer (only if page_server_via is set), CRIU
        sends the pages to it, which writes the memory images."""
        raise NotImplementedError

    def resume(self) -> None:
        """Undo a checkpoint's stop (the hand-over failed)."""
        raise NotImplementedError

    def destroy(self) -> None:
        """End the source copy (the commit point)."""
        raise NotImplementedError

    def manifest(self) -> dict:
        return {"kind": self.kind}


class ProcessTree(Workload):
    kind = "process"
    page_server_via = "fd"

    def __init__(self, root: int, shell_job: bool = False,
                 tcp_established: bool = False):
        self.root = root
        self.shell_job = shell_job
        self.tcp_established = tcp_established

    def pids(self) -> list[int]:
        return procfs.process_tree(self.root)

    def checkpoint(self, images_dir: str, page_server=None) -> None:
        runner.dump(self.root, images_dir, leave_stopped=True,
                    shell_job=self.shell_job,
                    tcp_established=self.tcp_established,
                    extra=page_server.criu_args() if page_server else (),
                    pass_fds=(page_server.criu_fd,) if page_server else ())

    def resume(self) -> None:
        try:
            runner.resume(self.root)
        except OSError:
            pass  # the tree is gone: nothing to resume

    def destroy(self) -> None:
        # Stopped by the checkpoint, the tree cannot fork meanwhile.
        kill_tree(self.root)

    def manifest(self) -> dict:
        return {"kind": self.kind, "root": self.root,
                "shell_job": self.shell_job,
                "tcp_established": self.tcp_established}


def kill_tree(root: int) -> None:
    """SIGKILL `root` and its descendants, children first; a tree that is
    already gone is not an error."""
    try:
        pids = procfs.process_tree(root)
    except OSError:
        return
    for pid in reversed(pids):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def write_manifest(images_dir: str, manifest: dict) -> None:
    with open(os.path.join(images_dir, MANIFEST), "w") as f:
        json.dump(manifest, f)


def read_manifest(images_dir: str) -> dict:
    try:
        with open(os.path.join(images_dir, MANIFEST)) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise ValueError("the source sent no manifest") from None
    if not isinstance(m, dict) or not isinstance(m.get("kind"), str):
        raise ValueError(f"malformed manifest: {m!r}")
    return m


# kind -> restore(images_dir, manifest) -> root pid, tasks left stopped
Restorer = Callable[[str, dict], int]


class PidsInUse(RuntimeError):
    """A pid the restored tree needs is taken on this node."""


def check_pids_free(images_dir: str) -> None:
    """CRIU restores a process tree (outside a container's own pid
    namespace) under its original pids and thread ids; one in use here
    would fail the restore with "Can't fork for N: File exists".  Said
    plainly, before CRIU starts."""
    taken = []
    for pid, threads in images.read_pstree(images_dir):
        for tid in sorted({pid, *threads}):
            try:
                who = procfs.comm(tid)
            except FileNotFoundError:
                continue            # free
            except OSError:
                who = "?"
            taken.append(f"{tid} ({who})")
    if taken:
        raise PidsInUse(
            f"pids of the process tree are in use on this node: "
            f"{', '.join(taken[:10])}{' ...' if len(taken) > 10 else ''}; "
            f"CRIU restores every process and thread under its own pid, so "
            f"those must be free here (start workloads with pids above what "
            f"the nodes use, e.g. by raising /proc/sys/kernel/ns_last_pid)")


def _restore_process(images_dir: str, manifest: dict, lazy: bool = False) -> int:
    check_pids_free(images_dir)
    return runner.restore(images_dir, detached=True, leave_stopped=True,
                          shell_job=bool(manifest.get("shell_job")),
                          tcp_established=bool(manifest.get("tcp_established")),
                          extra=["--lazy-pages"] if lazy else ())


RESTORERS: dict[str, Restorer] = {"process": _restore_process}
# Kinds whose restore cannot read pages from parent images (the page
# stores): the destination copies the pages into the dump's own images.
FLAT_IMAGES: set[str] = set()

# kind -> resume(manifest, root pid): start what a Restorer left stopped
# (the Commit).  Kinds without one: SIGCONT to the tree under the root.
Resumer = Callable[[dict, int], None]
RESUMERS: dict[str, Resumer] = {}


# kind -> discard(manifest, root pid): undo what a Restorer did, when the
# migration fails after the restore or `resolve --abort` decides so.
# Kinds without one: SIGKILL the tree.
Discarder = Callable[[dict, int], None]
DISCARDERS: dict[str, Discarder] = {}


def _load_kinds(kind: str) -> None:
    # Container kinds live in a layer above this one and register
    # themselves when imported; import them only when asked for one.
    if kind not in RESTORERS:
        import migrator.runtime  # noqa: F401


def _manifest(images_dir: str) -> dict:
    """The manifest in images_dir, its kind's handlers registered."""
    m = read_manifest(images_dir)
    _load_kinds(m["kind"])
    return m


def needs_flat_images(images_dir: str) -> bool:
    return _manifest(images_dir)["kind"] in FLAT_IMAGES


def restore(images_dir: str, lazy: bool = False) -> int:
    """Restore the tree in images_dir, stopped; with `lazy`, its memory is
    left to a lazy-pages daemon the caller started (criu/lazy.py)."""
    m = _manifest(images_dir)
    if lazy:
        if m["kind"] != "process":
            raise ValueError(f"lazy restore covers process trees; this is a "
                             f"{m['kind']!r} workload")
        return _restore_process(images_dir, m, lazy=True)
    fn = RESTORERS.get(m["kind"])
    if fn is None:
        raise ValueError(f"this node cannot restore a {m['kind']!r} workload")
    return fn(images_dir, m)


def discard_restored(images_dir: str, root_pid: int) -> None:
    """Undo restore(images_dir), which returned root_pid, the way its kind
    needs (a container also leaves its runtime's state)."""
    try:
        m = _manifest(images_dir)
    except ValueError:
        kill_tree(root_pid)
        return
    fn = DISCARDERS.get(m["kind"])
    if fn is None:
        kill_tree(root_pid)
    else:
        fn(m, root_pid)


def resume_restored(images_dir: str, root_pid: int) -> None:
    """Resume what restore(images_dir) returned, the way its kind needs."""
    m = _manifest(images_dir)
    fn = RESUMERS.get(m["kind"])
    if fn is None:
        runner.resume(root_pid)
    else:
        fn(m, root_pid)
