"""Test-bed nodes: isolated Linux "machines" made of namespaces.

Each node is a small init process in its own mount, pid, uts, ipc, net and
cgroup namespaces, whose root is an overlayfs of the node image (lower =
image, upper/work in a per-node directory), so nodes share no state and the
image is never written.  Inside: proc, a fresh sysfs (it shows the node's own
interfaces), cgroup2 on /sys/fs/cgroup (the node's own subtree, seen as the
root through the cgroup namespace), the host's /dev with private /dev/shm and
/dev/pts, tmpfs on /run and /tmp, and the project's working tree on /src.
The root is entered with pivot_root: CRIU fails under a plain chroot ("mnt:
No parent found for mountpoint").

Commands run inside with nsenter into the init's namespaces and root; each
command is first placed in the node's cgroup, so CRIU and runc inside see a
consistent cgroup tree.

Every resource is recorded under ``$MIGRATOR_BEDS_DIR/run/<run id>/`` with
the owner's pid; ``cleanup_stale()`` removes what a crashed run left.
Processes are only ever killed by pid, and only ours: the node inits (killing
a pid namespace's init kills everything in it) and processes still sitting
in a cgroup this module created.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pathlib
import secrets
import signal
import subprocess
import threading
import time
from typing import Iterator, Mapping, Optional, Sequence, Union

from . import image as _image

Command = Union[str, Sequence[str]]

# The project's root (tests/beds/nodes.py -> ../..), bind-mounted at /src.
PROJECT_ROOT = pathlib.Path(__file__).resolve().parents[2]

NODE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    "PYTHONPATH": "/src",
    "PYTHONDONTWRITEBYTECODE": "1",  # keep the shared working tree clean
}

CGROUP_TOP = "migrator-beds"
READY_FILE = ".bed-ready"
START_TIMEOUT = 30.0

# PID 1 of the node once it is set up: reaps orphans (CRIU, runc and
# backgrounded shells leave them), exits on SIGTERM, which makes the kernel
# kill everything else in the pid namespace.
_INIT_PY = r"""
import os, signal
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT})
while True:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
    info = signal.sigtimedwait({signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}, 5)
    if info is not None and info.si_signo in (signal.SIGTERM, signal.SIGINT):
        raise SystemExit(0)
"""

# Runs as PID 1 of the new namespaces, with the host's /bin/sh, until it
# execs the image's python3.  Arguments: image upper work root src name
# ready-file init-code shared-dir.
_SETUP_SH = r"""
set -eu
IMG=$1 UPPER=$2 WORK=$3 ROOT=$4 SRC=$5 NAME=$6
mount -t overlay "bed-$NAME" -o "lowerdir=$IMG,upperdir=$UPPER,workdir=$WORK" "$ROOT"
mount -t proc proc "$ROOT/proc"
mount -t sysfs sysfs "$ROOT/sys"
mount -t cgroup2 cgroup2 "$ROOT/sys/fs/cgroup"
mount --bind /dev "$ROOT/dev"
# Non-recursive: the host's /dev/shm and ptys must not be shared between
# nodes; each node gets its own below.
mount -t tmpfs -o mode=1777,nosuid,nodev shm "$ROOT/dev/shm"
mkdir -p "$ROOT/dev/pts"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$ROOT/dev/pts"
mount --bind "$ROOT/dev/pts/ptmx" "$ROOT/dev/ptmx"
mount -t tmpfs -o mode=755,nosuid,nodev run "$ROOT/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmp "$ROOT/tmp"
mount --bind "$SRC" "$ROOT/src"
mkdir -p "$ROOT/shared"
mount --bind "$9" "$ROOT/shared"
echo "$NAME" > "$ROOT/proc/sys/kernel/hostname"
echo "$NAME" > "$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 %s\n' "$NAME" > "$ROOT/etc/hosts"
mkdir -p "$ROOT/.oldroot"
cd "$ROOT"
pivot_root . .oldroot
cd /
umount -l /.oldroot
rmdir /.oldroot 2>/dev/null || true
# A leaf for processes: cgroup2 allows controllers only in cgroups without
# processes of their own, so the node's root cgroup stays empty for runc.
mkdir -p /sys/fs/cgroup/init
echo $$ > /sys/fs/cgroup/init/cgroup.procs
ip link set lo up
touch "/$7"
exec /usr/bin/python3 -c "$8"
"""


class NodeError(RuntimeError):
    pass


# ---------------------------------------------------------------- helpers

def _starttime(pid: int) -> Optional[str]:
    """Start time of a process (field 22 of stat), to tell a reused pid apart."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _same_process(pid: int, start: Optional[str]) -> bool:
    return pid > 0 and start is not None and _starttime(pid) == start


def _cgroup2_mount() -> Optional[pathlib.Path]:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, right = line.split(" - ", 1)
            if right.split()[0] == "cgroup2":
                return pathlib.Path(left.split()[4])
    return None


def _rmdir_cgroup_tree(path: pathlib.Path, kill: bool = False, timeout: float = 5.0) -> None:
    """Remove a cgroup and its children, deepest first.

    With kill=True, processes still inside are SIGKILLed by pid first: they
    can only be ours, since only this module puts processes there.
    """
    if not path.is_dir():
        return
    deadline = time.monotonic() + timeout
    for child in sorted((p for p in path.iterdir() if p.is_dir()), reverse=True):
        _rmdir_cgroup_tree(child, kill, timeout)
    while True:
        if kill:
            try:
                for pid in (path / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid), signal.SIGKILL)
            except FileNotFoundError:
                return
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            # EBUSY while killed processes are still being reaped.
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def _as_argv(cmd: Command) -> list[str]:
    if isinstance(cmd, str):
        return ["/bin/sh", "-c", cmd]
    return [str(c) for c in cmd]


def _kill_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# ---------------------------------------------------------------- services

class Service:
    """A background process inside a node, with its output in a log file."""

    def __init__(self, node: "Node", popen: subprocess.Popen, log: pathlib.Path, argv: list[str]):
        self.node = node
        self.popen = popen
        self.log = log
        self.argv = argv

    @property
    def pid(self) -> int:
        """Host pid of the nsenter wrapper (leader of the service's process group)."""
        return self.popen.pid

    def running(self) -> bool:
        return self.popen.poll() is None

    def wait(self, timeout: Optional[float] = None) -> int:
        return self.popen.wait(timeout)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 5.0) -> Optional[int]:
        """SIGTERM the service's process group, SIGKILL after ``timeout``."""
        if self.popen.poll() is None:
            _kill_group(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Also for children left behind by a service that already exited.
        _kill_group(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout)
        return self.popen.returncode

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------- nodes

class Node:
    """One node.  Create with ``cluster(n)``; do not construct directly."""

    def __init__(self, run: "_Run", name: str, image: pathlib.Path):
        self.name = name
        self.run_state = run  # the cluster run this node belongs to
        self.image = image
        self.dir = run.dir / name
        self.cgroup: Optional[pathlib.Path] = (run.cgroup / name) if run.cgroup else None
        self.addr: Optional[str] = None  # set by net.connect (first link)
        self.addrs: dict[str, str] = {}  # peer name -> this node's address on that link
        self.peers: dict[str, str] = {}  # peer name -> peer's address on that link
        self.ifnames: dict[str, str] = {}  # peer name -> interface name inside this node
        self.init_pid = 0
        self._unshare: Optional[subprocess.Popen] = None
        self._services: list[Service] = []
        self._lock = threading.Lock()

    # -- life cycle

    def start(self) -> None:
        for d in ("upper", "work", "root", "logs"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        if self.cgroup is not None:
            self.cgroup.mkdir(parents=True, exist_ok=True)
            procs = str(self.cgroup / "cgroup.procs")
        else:
            procs = "/dev/null"
        log = open(self.dir / "logs" / "init.log", "wb")
        # The shell joins the node's cgroup first, so that the cgroup
        # namespace unshare creates has the node's cgroup as its root.
        # setpriv --pdeathsig: if the test runner dies, unshare dies, and
        # --kill-child takes the node's init with it.
        wrapper = 'echo $$ > "$1"; shift; exec "$@"'
        argv = [
            "/bin/sh", "-c", wrapper, "sh", procs,
            "setpriv", "--pdeathsig", "KILL", "--",
            "unshare", "--mount", "--pid", "--uts", "--ipc", "--net", "--cgroup",
            "--propagation", "private", "--kill-child",
            "/bin/sh", "-c", _SETUP_SH, "setup",
            str(self.image), str(self.dir / "upper"), str(self.dir / "work"),
            str(self.dir / "root"), str(PROJECT_ROOT), self.name, READY_FILE, _INIT_PY,
            str(self.run_state.shared),
        ]
        self._unshare = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=NODE_ENV, start_new_session=True,
        )
        log.close()
        (self.dir / "unshare.pid").write_text(f"{self._unshare.pid} {_starttime(self._unshare.pid)}\n")
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if not self.init_pid:
                self.init_pid = self._find_init()
                if self.init_pid:
                    (self.dir / "init.pid").write_text(
                        f"{self.init_pid} {_starttime(self.init_pid)}\n")
            if self.init_pid and (self.dir / "upper" / READY_FILE).exists():
                return
            if self._unshare.poll() is not None:
                raise NodeError(f"node {self.name} failed to start:\n{self._init_log()}")
            if time.monotonic() > deadline:
                raise NodeError(f"node {self.name} not ready after {START_TIMEOUT}s:\n{self._init_log()}")
            time.sleep(0.02)

    def _find_init(self) -> int:
        assert self._unshare is not None
        pid = self._unshare.pid
        try:
            children = pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except FileNotFoundError:
            return 0
        return int(children[0]) if children else 0

    def _init_log(self) -> str:
        try:
            return (self.dir / "logs" / "init.log").read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return "(no log)"

    def stop(self) -> None:
        """Kill everything in the node and remove its files and cgroups."""
        with self._lock:
            for svc in self._services:
                with contextlib.suppress(Exception):
                    svc.stop(timeout=2)
            self._services.clear()
            if self.init_pid:
                # The init of a pid namespace: the kernel kills the rest.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.init_pid, signal.SIGKILL)
            if self._unshare is not None:
                if self._unshare.poll() is None and not self.init_pid:
                    _kill_group(self._unshare.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._unshare.wait(10)
            self._wait_gone(self.init_pid)
            if self.cgroup is not None:
                _rmdir_cgroup_tree(self.cgroup, kill=True)
            if self.dir.exists():
                _image.remove_tree(self.dir)
            self.init_pid = 0

    @staticmethod
    def _wait_gone(pid: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while pid and pathlib.Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    # -- running things inside

    @property
    def netns_path(self) -> str:
        """Path of the node's network namespace (for pyroute2's netns=)."""
        return f"/proc/{self.init_pid}/ns/net"

    def _nsenter(self, argv: list[str], cwd: Optional[str]) -> list[str]:
        if not self.init_pid:
            raise NodeError(f"node {self.name} is not running")
        # Join the node's process cgroup first (see Node.start), then all of
        # its namespaces and its root.
        procs = str(self.cgroup / "init" / "cgroup.procs") if self.cgroup else "/dev/null"
        return [
            "/bin/sh", "-c", 'echo $$ > "$1"; shift; exec "$@"', "sh", procs,
            "nsenter", "-t", str(self.init_pid),
            "--mount", "--uts", "--ipc", "--net", "--pid", "--cgroup",
            "--root", f"--wdns={cwd or '/'}", "--", *argv,
        ]

    def _env(self, env: Optional[Mapping[str, str]]) -> dict[str, str]:
        merged = dict(NODE_ENV)
        if env:
            merged.update(env)
        return merged

    def run(self, cmd: Command, check: bool = True, timeout: float = 120.0,
            input: Optional[str] = None, env: Optional[Mapping[str, str]] = None,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        """Run ``cmd`` (argv list, or a string for /bin/sh -c) inside the node.

        Captures stdout/stderr as text.  On timeout the command's process
        group is killed and TimeoutExpired raised; with check=True a non-zero
        exit raises CalledProcessError carrying the output.
        """
        argv = _as_argv(cmd)
        proc = subprocess.Popen(
            self._nsenter(argv, cwd), env=self._env(env), text=True,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            # Timeout or interrupt: end the command and its process group.
            # On normal completion the group is left alone, so that
            # "cmd &" started from a foreground command keeps running (it
            # ends with the node).
            _kill_group(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        result = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        if check and proc.returncode != 0:
            raise subprocess.CalledProcessError(proc.returncode, argv, out, err)
        return result

    def spawn(self, cmd: Command, log: Optional[Union[str, os.PathLike]] = None,
              env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None) -> Service:
        """Start ``cmd`` in the background inside the node.

        stdout and stderr go to ``log`` (a host path; default under the
        node's log dir).  The node stops the service on teardown; call
        ``stop()`` to end it earlier.  A process that CRIU must dump should
        not write to a host file: redirect inside the node instead.
        """
        argv = _as_argv(cmd)
        if log is None:
            log = self.dir / "logs" / f"svc-{len(self._services)}-{pathlib.Path(argv[0]).name}.log"
        log = pathlib.Path(log)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self._nsenter(argv, cwd), env=self._env(env), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        svc = Service(self, proc, log, argv)
        self._services.append(svc)
        return svc

    # -- files

    def host_path(self, path: str) -> pathlib.Path:
        """Host path of a file written inside the node's root (not /tmp,
        /run), or under /shared."""
        rel = path.lstrip("/")
        if rel == "shared" or rel.startswith("shared/"):
            return self.run_state.shared / rel[len("shared"):].lstrip("/")
        return self.dir / "upper" / rel

    def __repr__(self) -> str:
        return f"<Node {self.name} init={self.init_pid} addr={self.addr}>"


# ---------------------------------------------------------------- runs

_live_runs: "set[_Run]" = set()
_live_lock = threading.Lock()


class _Run:
    """The resources of one cluster() call, recorded for cleanup_stale()."""

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.id = f"{os.getpid()}-{secrets.token_hex(3)}"
        self.dir = runs_dir() / self.id
        self.dir.mkdir(parents=True)
        (self.dir / "owner").write_text(f"{os.getpid()} {_starttime(os.getpid())}\n")
        cg = _cgroup2_mount()
        self.cgroup = (cg / CGROUP_TOP / self.id) if cg else None
        if self.cgroup is not None:
            self.cgroup.mkdir(parents=True)
        # Bind-mounted at /shared in every node of the run: a stand-in for
        # "copy over the network" when moving checkpoint images around.
        self.shared = self.dir / "shared"
        self.shared.mkdir()
        self.nodes: list[Node] = []
        self.host_links: list[str] = []  # veth names created on the host

    def record_link(self, ifname: str) -> None:
        """Record a host-side veth name before it is created (net.py)."""
        self.host_links.append(ifname)
        with open(self.dir / "links", "a") as f:
            f.write(ifname + "\n")

    def teardown(self) -> None:
        if os.getpid() != self.owner_pid:
            return  # only the process that made the run takes it down
        errors = []
        for node in reversed(self.nodes):
            try:
                node.stop()
            except Exception as e:  # keep tearing down the others
                errors.append(f"{node.name}: {e}")
        _delete_host_links(self.dir / "links")
        if self.cgroup is not None:
            try:
                _rmdir_cgroup_tree(self.cgroup, kill=True)
            except OSError as e:
                errors.append(f"cgroup {self.cgroup}: {e}")
        try:
            _image.remove_tree(self.dir)
        except Exception as e:
            errors.append(f"{self.dir}: {e}")
        with _live_lock:
            _live_runs.discard(self)
        if errors:
            raise NodeError("teardown incomplete: " + "; ".join(errors))


def runs_dir() -> pathlib.Path:
    return _image.beds_dir() / "run"


def _delete_host_links(record: pathlib.Path) -> None:
    # Veths are created on the host and then moved into nodes; one left on
    # the host means a crash in between.  Deleting one end deletes the pair.
    try:
        names = record.read_text().split()
    except FileNotFoundError:
        return
    if not names:
        return
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in names:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                with contextlib.suppress(Exception):
                    ipr.link("del", index=idx[0])


def _teardown_all() -> None:
    with _live_lock:
        runs = list(_live_runs)
    for run in runs:
        with contextlib.suppress(Exception):
            run.teardown()


atexit.register(_teardown_all)


def _forget_runs_in_child() -> None:
    # A forked child (pyroute2 forks helpers to enter network namespaces)
    # must never tear down its parent's nodes from its atexit handlers.
    global _live_lock
    _live_lock = threading.Lock()
    _live_runs.clear()


os.register_at_fork(after_in_child=_forget_runs_in_child)


def cleanup_stale(log=None) -> int:
    """Remove what crashed earlier runs left behind; return how many runs.

    A run is stale when its owner process is gone (pid dead, or reused by
    another process).  Its node inits are killed by pid, its cgroups,
    host-side veths and directories removed.
    """
    log = log or (lambda msg: None)
    count = 0
    root = runs_dir()
    for run_dir in sorted(root.glob("*")) if root.is_dir() else []:
        try:
            pid_s, start = (run_dir / "owner").read_text().split()
            if _same_process(int(pid_s), start):
                continue
        except (FileNotFoundError, ValueError):
            pass
        log(f"removing stale test-bed run {run_dir.name}")
        for node_dir in run_dir.iterdir():
            for rec in ("init.pid", "unshare.pid"):
                try:
                    pid_s, start = (node_dir / rec).read_text().split()
                except (FileNotFoundError, NotADirectoryError, ValueError):
                    continue
                if _same_process(int(pid_s), start):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(int(pid_s), signal.SIGKILL)
                    Node._wait_gone(int(pid_s))
        _delete_host_links(run_dir / "links")
        cg = _cgroup2_mount()
        if cg is not None:
            _rmdir_cgroup_tree(cg / CGROUP_TOP / run_dir.name, kill=True)
        _image.remove_tree(run_dir)
        count += 1
    # Cgroups whose run directory is already gone (crash during teardown).
    cg = _cgroup2_mount()
    top = cg / CGROUP_TOP if cg else None
    if top is not None and top.is_dir():
        for run_cg in top.iterdir():
            if not run_cg.is_dir() or (root / run_cg.name).exists():
                continue
            log(f"removing stale cgroup {run_cg}")
            _rmdir_cgroup_tree(run_cg, kill=True)
    return count


@contextlib.contextmanager
def _terminate_as_exit() -> Iterator[None]:
    # SIGTERM's default action skips finally blocks and atexit; turn it into
    # SystemExit for the duration, when nobody else handles it.
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            # Inherited by a forked child: behave as if there were no handler.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class Cluster(list):
    """The nodes of a cluster (a list), plus the run they belong to."""

    run: _Run


@contextlib.contextmanager
def cluster(n: int = 2, connect: bool = True, names: Optional[Sequence[str]] = None,
            image: Optional[pathlib.Path] = None) -> Iterator[Cluster]:
    """Start ``n`` nodes; with ``connect``, join every pair with a veth link.

    Yields a list of ``Node``.  Everything is torn down on exit, on
    exceptions, on SIGTERM, and at interpreter exit; what a SIGKILL leaves
    is removed by the next ``cleanup_stale()``.
    """
    names = list(names or [chr(ord("a") + i) for i in range(n)])
    if len(names) != n:
        raise ValueError("need one name per node")
    image = image or _image.ensure_image()
    with _terminate_as_exit():
        run = _Run()
        with _live_lock:
            _live_runs.add(run)
        nodes = Cluster()
        nodes.run = run
        try:
            for name in names:
                node = Node(run, name, image)
                run.nodes.append(node)
                node.start()
                nodes.append(node)
            if connect:
                from . import net

                for i in range(n):
                    for j in range(i + 1, n):
                        net.connect(nodes[i], nodes[j])
            yield nodes
        finally:
            run.teardown()
