"""ptrace syscall injection (native/inject.c, seccomp.c) on the host kernel.

Victims (tests/victims/inject_victim.c) check themselves: whatever they
were blocked in must still behave correctly after we injected syscalls
into them; each prints "pass" or "fail: why".  Every victim is killed by
pid in a finalizer, whatever happens.
"""

from __future__ import annotations

import errno
import os
import pathlib
import platform
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.native import c_units

pytestmark = pytest.mark.linux

ROOT = pathlib.Path(__file__).resolve().parents[2]
VICTIM_SRC = ROOT / "tests" / "victims" / "inject_victim.c"
NATIVE = ROOT / "native"

if os.geteuid() != 0:
    pytest.skip("needs root (ptrace of other processes, PTRACE_SECCOMP_GET_FILTER)",
                allow_module_level=True)
if platform.machine() not in ("x86_64", "aarch64"):
    pytest.skip(f"syscall injection is not implemented on {platform.machine()}",
                allow_module_level=True)

from migrator.kernel.inject import Injection  # noqa: E402
from migrator.kernel.native import ffi, lib  # noqa: E402

SYS = {
    "x86_64": dict(read=0, nanosleep=35, getpid=39, dup=32, close=3,
                   getppid=110, futex=202, clock_nanosleep=230),
    "aarch64": dict(read=63, nanosleep=101, getpid=172, dup=23, close=57,
                    getppid=173, futex=98, clock_nanosleep=115),
}[platform.machine()]


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="session")
def victim_bin(tmp_path_factory):
    gcc = shutil.which("gcc") or shutil.which("cc")
    if not gcc:
        pytest.skip("no C compiler (gcc) to build the victim programs")
    out = tmp_path_factory.mktemp("victims") / "inject_victim"
    subprocess.run([gcc, "-O2", "-pthread", str(VICTIM_SRC), "-o", str(out)],
                   check=True)
    return out


@pytest.fixture(scope="session")
def ptrace_works(victim_bin):
    p = subprocess.Popen([str(victim_bin), "read"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        p.stdout.readline()
        try:
            with Injection(p.pid, timeout=2.0):
                pass
        except OSError as e:
            if e.errno in (errno.EPERM, errno.ENOSYS):
                pytest.skip(f"ptrace is not available here: {e}")
            raise
    finally:
        p.kill()
        p.wait()


class Victims:
    def __init__(self, binary):
        self.binary = binary
        self.procs: list[subprocess.Popen] = []
        self.cgroups: list[tuple[pathlib.Path, str]] = []

    def start(self, *args) -> subprocess.Popen:
        p = subprocess.Popen([str(self.binary), *map(str, args)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        self.procs.append(p)
        line = p.stdout.readline().strip()
        assert line == "ready", f"victim {args}: {line!r}"
        return p

    def cleanup(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()  # by pid; SIGKILL also ends a stopped/frozen one
            p.wait()
        for cg, thaw in self.cgroups:
            try:
                (cg / thaw.split("=")[0]).write_text(thaw.split("=")[1])
            except OSError:
                pass
            for _ in range(50):
                try:
                    cg.rmdir()
                    break
                except OSError:
                    time.sleep(0.02)


@pytest.fixture
def victims(victim_bin, ptrace_works):
    v = Victims(victim_bin)
    try:
        yield v
    finally:
        v.cleanup()


# ------------------------------------------------------------------ helpers

def syscall_line(pid: int, tid: int | None = None) -> str:
    path = f"/proc/{pid}/task/{tid}/syscall" if tid else f"/proc/{pid}/syscall"
    return pathlib.Path(path).read_text().strip()


def wait_in_syscall(pid: int, nr: int, tid: int | None = None) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        line = syscall_line(pid, tid)
        if line.split()[0] == str(nr):
            return line
        time.sleep(0.01)
    raise AssertionError(f"pid {pid} never blocked in syscall {nr}: {line}")


def status(pid: int) -> dict[str, str]:
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def text_bytes(pid: int) -> dict[str, bytes]:
    """The content of every executable mapping (vDSO included)."""
    out = {}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb") as mem:
        for line in maps:
            f = line.split()
            if "x" not in f[1] or "r" not in f[1]:
                continue
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            mem.seek(lo)
            out[line.strip()] = mem.read(hi - lo)
    return out


def fds(pid: int) -> dict[str, str]:
    d = f"/proc/{pid}/fd"
    return {n: os.readlink(f"{d}/{n}") for n in os.listdir(d)}


def finish(p: subprocess.Popen, stdin: str | None = None) -> None:
    if stdin is not None:
        p.stdin.write(stdin)
        p.stdin.flush()
    out, _ = p.communicate(timeout=10)
    assert out.strip() == "pass" and p.returncode == 0, out


# ------------------------------------------------------------------ tests

def test_getpid_registers_and_text_unchanged(victims):
    p = victims.start("read")
    before = wait_in_syscall(p.pid, SYS["read"])
    text_before = text_bytes(p.pid)
    with Injection(p.pid) as inj:
        assert inj.syscall(SYS["getpid"]) == p.pid
        assert inj.syscall_checked(SYS["getpid"]) == p.pid
        with pytest.raises(OSError) as e:
            inj.syscall_checked(SYS["close"], 12345)
        assert e.value.errno == errno.EBADF
        assert inj.syscall(SYS["close"], 12345) == -errno.EBADF
    assert wait_in_syscall(p.pid, SYS["read"]) == before
    assert text_bytes(p.pid) == text_before
    assert status(p.pid)["TracerPid"] == "0"
    finish(p, "hello\n")  # the pipe read still returns what comes after


@pytest.mark.parametrize("call", ["nanosleep", "clock_nanosleep"])
def test_sleep_keeps_its_length(victims, call):
    p = victims.start(call, 700)
    wait_in_syscall(p.pid, SYS[call])
    for _ in range(3):
        with Injection(p.pid) as inj:
            assert inj.syscall(SYS["getpid"]) == p.pid
        time.sleep(0.05)
    finish(p)  # the victim checks: returned 0 after at least 700 ms


def test_futex_wait_still_wakes(victims):
    p = victims.start("futex")
    wait_in_syscall(p.pid, SYS["futex"], tid=p.pid)
    with Injection(p.pid) as inj:
        assert inj.syscall(SYS["getpid"]) == p.pid
    wait_in_syscall(p.pid, SYS["futex"], tid=p.pid)
    finish(p, "go\n")


def test_multithreaded_victim(victims):
    p = victims.start("threads", 1500)
    assert len(os.listdir(f"/proc/{p.pid}/task")) == 7
    for _ in range(15):
        with Injection(p.pid) as inj:
            assert inj.syscall(SYS["getpid"]) == p.pid
            assert inj.syscall(SYS["getpid"]) == p.pid
        time.sleep(0.03)
    finish(p)  # writers verified their data, sleepers their sleeps


def test_no_fd_left_in_target(victims):
    p = victims.start("read")
    wait_in_syscall(p.pid, SYS["read"])
    before = fds(p.pid)
    pidfd = os.pidfd_open(p.pid)
    try:
        with Injection(p.pid) as inj:
            fd = inj.syscall_checked(SYS["dup"], 0)
            assert str(fd) in fds(p.pid)
            assert inj.syscall(SYS["close"], fd) == 0
            feats = ffi.new("unsigned *")
            ours = lib.mig_uffd_open(inj.handle, pidfd, feats)
            assert ours >= 0, os.strerror(-ours)
            os.close(ours)
    finally:
        os.close(pidfd)
    assert fds(p.pid) == before
    finish(p, "hello\n")


def test_stopped_target_times_out_and_stays_stopped(victims):
    p = victims.start("read")
    os.kill(p.pid, signal.SIGSTOP)
    while status(p.pid)["State"][0] != "T":
        time.sleep(0.01)
    t0 = time.monotonic()
    with pytest.raises(OSError) as e:
        with Injection(p.pid, timeout=0.3):
            pass
    assert e.value.errno == errno.ETIMEDOUT
    assert str(p.pid) in str(e.value)
    assert time.monotonic() - t0 < 3
    time.sleep(0.1)
    st = status(p.pid)
    assert st["State"].startswith("T (stopped)") and st["TracerPid"] == "0"
    os.kill(p.pid, signal.SIGCONT)
    finish(p, "hello\n")


def _cgroup2_root() -> pathlib.Path | None:
    for line in pathlib.Path("/proc/mounts").read_text().splitlines():
        f = line.split()
        if f[2] == "cgroup2":
            return pathlib.Path(f[1])
    return None


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_frozen_target_times_out_and_is_left_alone(victims, kind):
    if kind == "v1":
        base = pathlib.Path("/sys/fs/cgroup/freezer")
        if not (base / "cgroup.procs").exists():
            pytest.skip("no cgroup v1 freezer hierarchy mounted")
        freeze, thaw = "freezer.state=FROZEN", "freezer.state=THAWED"
    else:
        base = _cgroup2_root()
        if base is None or not (base / "cgroup.procs").exists():
            pytest.skip("no cgroup2 mount")
        freeze, thaw = "cgroup.freeze=1", "cgroup.freeze=0"
    p = victims.start("read")
    wait_in_syscall(p.pid, SYS["read"])
    cg = base / f"migrator-test-inject-{os.getpid()}-{p.pid}"
    cg.mkdir()
    victims.cgroups.append((cg, thaw))
    (cg / "cgroup.procs").write_text(str(p.pid))
    k, v = freeze.split("=")
    (cg / k).write_text(v)
    time.sleep(0.2)
    # v1 never lets the thread reach a ptrace-stop (attach times out);
    # v2 honours the interrupt but never lets the syscall run.
    with pytest.raises(OSError) as e:
        with Injection(p.pid, timeout=0.3) as inj:
            inj.syscall(SYS["getpid"])
    assert e.value.errno == errno.ETIMEDOUT
    assert status(p.pid)["TracerPid"] == "0"
    k, v = thaw.split("=")
    (cg / k).write_text(v)
    time.sleep(0.2)
    assert status(p.pid)["State"][0] in "SR"   # not left in a ptrace-stop
    assert wait_in_syscall(p.pid, SYS["read"])
    finish(p, "hello\n")   # and its registers were intact


DRIVER = r"""
import sys, time
from migrator.kernel.inject import Injection
pid = int(sys.argv[1])
try:
    with Injection(pid) as inj:
        print("attached", flush=True)
        sys.stdin.readline()          # SIGINT arrives while we wait here
        print("injected", inj.syscall(int(sys.argv[2])), flush=True)
    time.sleep(3)
    print("no-interrupt", flush=True)
except KeyboardInterrupt:
    st = open(f"/proc/{pid}/status").read()
    print("interrupt", [l for l in st.splitlines()
                        if l.startswith("TracerPid")][0].split()[1], flush=True)
"""


def test_sigint_is_deferred_until_detach(victims):
    p = victims.start("read")
    wait_in_syscall(p.pid, SYS["read"])
    d = subprocess.Popen([sys.executable, "-c", DRIVER, str(p.pid),
                          str(SYS["getpid"])], cwd=ROOT, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    victims.procs.append(d)
    assert d.stdout.readline().strip() == "attached"
    os.kill(d.pid, signal.SIGINT)
    time.sleep(0.2)
    assert d.poll() is None
    out, _ = d.communicate("go\n", timeout=10)
    assert out.split("\n")[:2] == [f"injected {p.pid}", "interrupt 0"], out
    finish(p, "hello\n")


# -------------------------------------------------------------- seccomp

def test_seccomp_no_filter(victims):
    p = victims.start("read")
    with Injection(p.pid) as inj:
        assert inj.seccomp_verdict(lib.mig_nr_userfaultfd()) == lib.MIG_SECCOMP_NONE
        assert not inj.would_kill(lib.mig_nr_userfaultfd())
    finish(p, "hello\n")


def test_seccomp_errno_filter(victims):
    p = victims.start("seccomp_errno")
    wait_in_syscall(p.pid, SYS["read"])
    nr = lib.mig_nr_userfaultfd()
    with Injection(p.pid) as inj:
        assert inj.seccomp_verdict(nr, 0x80800) == lib.SECCOMP_RET_ERRNO
        assert inj.seccomp_verdict(nr, 0) == lib.SECCOMP_RET_ERRNO
        assert inj.seccomp_verdict(SYS["getpid"]) == lib.SECCOMP_RET_ALLOW
        # safe to try: the filter answers EPERM instead of running it
        assert inj.syscall(nr, 0x80800) == -errno.EPERM
    finish(p, "hello\n")


def test_seccomp_kill_filter_is_reported_and_not_injected(victims):
    p = victims.start("seccomp_kill")
    wait_in_syscall(p.pid, SYS["read"])
    nr = lib.mig_nr_userfaultfd()
    with Injection(p.pid) as inj:
        assert inj.seccomp_verdict(nr, 0x80800) == lib.SECCOMP_RET_KILL_PROCESS
        assert inj.would_kill(nr)
        assert inj.seccomp_verdict(SYS["getpid"]) == lib.SECCOMP_RET_ALLOW
        assert inj.syscall(SYS["getpid"]) == p.pid
    finish(p, "hello\n")


def test_seccomp_filter_on_another_syscall(victims):
    p = victims.start("seccomp_other")
    wait_in_syscall(p.pid, SYS["read"])
    with Injection(p.pid) as inj:
        assert inj.seccomp_verdict(lib.mig_nr_userfaultfd()) == lib.SECCOMP_RET_ALLOW
        assert inj.seccomp_verdict(SYS["getppid"]) == lib.SECCOMP_RET_ERRNO
        assert inj.syscall(SYS["getppid"]) == -errno.EACCES
    finish(p, "hello\n")


# -------------------------------------------------------------- selftest

def test_native_selftest(tmp_path):
    gcc = shutil.which("gcc")
    if not gcc:
        pytest.skip("gcc not found: cannot build native/selftest.c")
    exe = tmp_path / "selftest"
    srcs = [NATIVE / "selftest.c", *c_units()]
    r = subprocess.run([gcc, "-static", "-O2", "-D_GNU_SOURCE", f"-I{NATIVE}",
                        *map(str, srcs), "-o", str(exe)],
                       capture_output=True, text=True)
    if r.returncode != 0 and "cannot find -lc" in r.stderr:
        # no static libc installed: a dynamic build checks the same code
        r = subprocess.run([gcc, "-O2", "-D_GNU_SOURCE", f"-I{NATIVE}",
                            *map(str, srcs), "-o", str(exe)],
                           capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "selftest: PASS" in run.stdout, run.stdout
    assert "soft-dirty: " in run.stdout
