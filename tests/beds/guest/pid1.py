"""PID 1 of the root-disk guests (x86_64 soft-dirty, arm64; the guest's Python 3.13).

The initramfs mounts the root disk (/dev/vda, the node image) and the run
disk (/dev/vdb, at /mnt) and switch_roots into this script.  It sets up the
usual pseudo file systems, runs the one command the host asked for, and
hands the results back on a raw disk (/dev/vdc) as a tar archive, because
the cloud kernel has no 9p and a raw tar needs no file-system driver on the
host side.  Then it powers the machine off.

Being PID 1 it also reaps orphans, so tests that check whether a process
has gone away do not see zombies that a shell as init would leave behind.

Run disk layout (written by tests/beds/guest.py):
    /mnt/tree      copy of the project's working tree, bind-mounted at /src
    /mnt/command   the shell command to run (cwd /src)
    /mnt/results   files to hand back (output, rc, kernel_release, ...)
    /mnt/scratch   disk-backed scratch space
    /mnt/kernel-config  the guest kernel's config (copied to /boot)
"""

import os
import signal
import subprocess
import sys
import tarfile
import threading
import time

RESULTS = "/mnt/results"
MARK = "@@MIGRATOR-GUEST@@"


def console(msg):
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def mount(fstype, source, target, opts=None, bind=False):
    os.makedirs(target, exist_ok=True)
    cmd = ["mount"]
    if bind:
        cmd += ["--bind", source, target]
    else:
        cmd += ["-t", fstype]
        if opts:
            cmd += ["-o", opts]
        cmd += [source, target]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        console(f"{MARK} warning: {' '.join(cmd)}: {r.stdout.strip()}")


def setup():
    # /proc, /sys and /dev were moved here by the initramfs.
    mount("tmpfs", "tmpfs", "/tmp", "mode=1777")
    mount("tmpfs", "tmpfs", "/run", "mode=0755")
    mount("tmpfs", "tmpfs", "/dev/shm", "mode=1777")
    mount("devpts", "devpts", "/dev/pts", "gid=5,mode=620,ptmxmode=666")
    # cgroup2 only, as on most users' hosts.
    mount("cgroup2", "cgroup2", "/sys/fs/cgroup")
    mount(None, "/mnt/tree", "/src", bind=True)
    os.makedirs(RESULTS, exist_ok=True)
    os.makedirs("/mnt/scratch", exist_ok=True)
    subprocess.run(["ip", "link", "set", "lo", "up"], stderr=subprocess.DEVNULL)
    # Debian kernels have no /proc/config.gz; put the config where Debian
    # keeps it so tests can compare probes with the truth.
    try:
        os.makedirs("/boot", exist_ok=True)
        with open("/mnt/kernel-config", "rb") as src, \
                open(f"/boot/config-{os.uname().release}", "wb") as dst:
            dst.write(src.read())
    except OSError:
        pass
    try:
        with open("/proc/sys/kernel/hostname", "w") as f:
            f.write("migrator-guest")
    except OSError:
        pass


def run_command():
    with open("/mnt/command") as f:
        command = f.read()
    env = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "PYTHONPATH": "/src",
        "PYTHONDONTWRITEBYTECODE": "1",
        # Stream output: the serial console shows progress as it happens.
        "PYTHONUNBUFFERED": "1",
        "MIGRATOR_GUEST": "1",
        "MIGRATOR_GUEST_RESULTS": RESULTS,
        "MIGRATOR_GUEST_SCRATCH": "/mnt/scratch",
    }
    out = open(os.path.join(RESULTS, "output"), "wb")
    child = subprocess.Popen(
        ["/bin/sh", "-c", command], cwd="/src", env=env,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )

    def pump():
        # Output goes both to the results (exact) and to the serial console
        # (so a human, or the host after a timeout, can see progress).
        for chunk in iter(lambda: child.stdout.read1(65536), b""):
            out.write(chunk)
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    rc = None
    # Reap everything; the main child's status is the result.  Popen.wait
    # is not used because os.wait(-1) would steal its status.
    while rc is None:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        if pid == child.pid:
            rc = os.waitstatus_to_exitcode(status)
    # Grandchildren may hold the pipe open; do not wait forever for EOF.
    t.join(timeout=10)
    out.flush()
    out.close()
    return 255 if rc is None else rc


def finish(rc):
    # Stop whatever the command left behind, then reap it.
    try:
        os.kill(-1, signal.SIGKILL)
    except OSError:
        pass
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        time.sleep(0.05)
    release = os.uname().release
    with open(os.path.join(RESULTS, "rc"), "w") as f:
        f.write(f"{rc}\n")
    with open(os.path.join(RESULTS, "kernel_release"), "w") as f:
        f.write(release + "\n")
    try:
        with open("/dev/vdc", "wb") as dev:
            with tarfile.open(fileobj=dev, mode="w|") as tar:
                tar.add(RESULTS, arcname=".")
            dev.flush()
            os.fsync(dev.fileno())
    except OSError as e:
        console(f"{MARK} warning: writing results to /dev/vdc failed: {e}")
    os.sync()
    console(f"{MARK} exit {rc}")


def main():
    console(f"{MARK} kernel {os.uname().release}")
    rc = 255
    try:
        setup()
        rc = run_command()
    except BaseException as e:  # PID 1 must never just die: power off instead
        console(f"{MARK} error: {e!r}")
    finally:
        try:
            finish(rc)
        finally:
            os.sync()
            with open("/proc/sysrq-trigger", "w") as f:
                f.write("o")
            time.sleep(30)


if __name__ == "__main__":
    main()
