"""Kernel guests under qemu (TCG): the soft-dirty x86_64 guest and arm64.

The host kernel has no soft-dirty and is x86_64 only, so two kinds of
tracking cannot be tested on it directly:

* x86_64 with ``CONFIG_MEM_SOFT_DIRTY=y``: Debian trixie's 6.12 cloud kernel
  boots with the node image (``tests.beds.image.ensure_image``) as its root
  disk, a copy of the working tree with the cffi extension built for the
  image's Python, and runs one command (normally the linux test tier).
* arm64 (uffd-wp, no soft-dirty at all), two ways:
  - the arm64 cloud kernel boots a tiny initramfs (Debian's arm64
    busybox-static and ``native/selftest.c`` cross-compiled statically)
    that runs the native self-test;
  - with ``rootfs=True`` it boots the arm64 node image
    (``ensure_image(arch="arm64")``, bootstrapped on the host through
    qemu-user-static) with the cffi extension built for its Python, and
    runs one command exactly like the x86_64 guest (normally the Python
    trackers' tier).

Everything downloaded or built lives under ``$MIGRATOR_BEDS_DIR`` (default
``/var/cache/migrator-beds``) in ``guest/``, keyed by a hash of its recipe,
built in a temporary directory and renamed into place, so set-up is
idempotent and costs nothing when cached.  Only set-up talks to the network
(the Debian mirror the host's apt uses, through a private apt configuration
so the host's sources are never touched); the guests get no network.

API::

    ensure_guests()                       # download and build everything
    run_guest("x86_64", ["python3", "-m", "pytest", "tests/linux"], 900)
    run_guest("arm64", None, 300)         # runs the native self-test
    run_guest("arm64", ["python3", "-m", "pytest", "tests/linux"], 900, rootfs=True)

Command line::

    python -m tests.beds.guest setup
    python -m tests.beds.guest x86_64 [-- CMD...]
    python -m tests.beds.guest arm64 [-- SELFTEST-ARGS...]
    python -m tests.beds.guest arm64-root [-- CMD...]
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import io
import lzma
import os
import pathlib
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from typing import Callable, Optional, Sequence, Union

from tests.beds import image as _image

REPO = pathlib.Path(__file__).resolve().parents[2]
HELPERS = pathlib.Path(__file__).resolve().parent / "guest"

# Bump when a build step changes in a way the keys below do not show.
RECIPE_VERSION = "guest-3"
SUITE = "trixie"

ARCHES = {
    "x86_64": {
        "deb": "amd64",
        "meta": "linux-image-cloud-amd64",
        # virtio_pci and ext4 are built in; the block driver is a module,
        # and so is nfnetlink, without which CRIU cannot start (see _X86_INIT).
        "modules": ["kernel/drivers/block/virtio_blk.ko",
                    "kernel/net/netfilter/nfnetlink.ko"],
        "qemu": "qemu-system-x86_64",
        "machine": ["-cpu", "max"],
        "console": "ttyS0",
    },
    "arm64": {
        "deb": "arm64",
        "meta": "linux-image-cloud-arm64",
        # Same as x86_64 (pci-host-generic, virtio_pci, ext4 and crc32c are
        # built in); only the root-disk guest loads them, the self-test
        # guest runs from its initramfs alone.
        "modules": ["kernel/drivers/block/virtio_blk.ko",
                    "kernel/net/netfilter/nfnetlink.ko"],
        "qemu": "qemu-system-aarch64",
        # pauth-impdef: TCG's architected pointer-authentication cipher
        # (QARMA) costs a lot in every function of Debian's arm64 userland,
        # which is built with branch protection; the implementation-defined
        # one is cheap and the guest cannot tell the difference.
        "machine": ["-M", "virt", "-cpu", "max,pauth-impdef=on"],
        "console": "ttyAMA0",
    },
}

MARK = "@@MIGRATOR-GUEST@@"
NATIVE_UNITS = ["inject.c", "seccomp.c", "uffd.c", "softdirty.c", "vmread.c"]

# What of the working tree the guest does not need (or must not get: the
# host's extension is built for the host's Python).
TREE_EXCLUDE = {
    ".git", ".venv", "build", "dist", "__pycache__", ".hypothesis",
    ".pytest_cache", ".beds", ".mypy_cache", ".ruff_cache",
}
TREE_EXCLUDE_RE = re.compile(r"(\.egg-info$|^_native.*\.(so|c|o)$|\.pyc$)")


class GuestError(RuntimeError):
    """The guest could not be built or did not finish (a test failure)."""


class GuestUnavailable(GuestError):
    """A capability is really missing (qemu, kernels); the message names it."""


@dataclasses.dataclass
class GuestResult:
    returncode: int
    output: str
    kernel_release: str
    # x86_64: every file the command left in $MIGRATOR_GUEST_RESULTS.
    files: dict = dataclasses.field(default_factory=dict)
    console: str = ""  # the whole serial console, for diagnosis
    boot_seconds: float = 0.0  # qemu start until the guest's first marker
    total_seconds: float = 0.0


def _log_default(msg: str) -> None:
    print(f"[guest] {msg}", file=sys.stderr, flush=True)


def guest_dir() -> pathlib.Path:
    return _image.beds_dir() / "guest"


def _key(*parts: Union[str, bytes]) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:16]


class _Lock:
    """Serialises set-up between processes (pytest-xdist, two terminals)."""

    def __init__(self, name: str):
        guest_dir().mkdir(parents=True, exist_ok=True)
        self.path = guest_dir() / f".lock-{name}"

    def __enter__(self):
        self.f = open(self.path, "w")
        fcntl.flock(self.f, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        self.f.close()


def _build_atomically(final: pathlib.Path, build: Callable[[pathlib.Path], None],
                      prune: Optional[str] = None) -> pathlib.Path:
    """Run build(tmpdir) and rename tmpdir to final; nothing half-built stays.

    ``prune``: a name prefix; other complete builds with it are removed once
    the new one is in place (root disks are large; an edited self-test
    would otherwise leave an initramfs behind per edit).  A qemu still
    using an old file keeps its open descriptor.
    """
    if (final / "STAMP").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _Lock(final.name):
        if (final / "STAMP").exists():
            return final
        for stale in final.parent.glob(f".build-{final.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():
            shutil.rmtree(final)
        tmp = final.parent / f".build-{final.name}-{os.getpid()}"
        tmp.mkdir()
        try:
            build(tmp)
            (tmp / "STAMP").write_text(time.strftime("%Y-%m-%dT%H:%M:%S%z\n"))
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if prune:
            for old in final.parent.glob(prune + "*"):
                if old != final and (old / "STAMP").exists():
                    shutil.rmtree(old, ignore_errors=True)
    return final


def _run(cmd: Sequence[str], what: str, timeout: float = 600, **kw) -> str:
    try:
        r = subprocess.run(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, text=True, timeout=timeout, **kw)
    except FileNotFoundError as e:
        raise GuestUnavailable(f"{what}: {cmd[0]} is not installed on the host") from e
    if r.returncode != 0:
        tail = "\n".join(r.stdout.splitlines()[-25:])
        raise GuestError(f"{what} failed (exit {r.returncode}): {' '.join(cmd)}\n{tail}")
    return r.stdout


# --------------------------------------------------------------------------
# Debian packages through a private apt configuration


class _Apt:
    """apt-get/apt-cache on trixie with state under the beds dir.

    The host's sources, preferences and dpkg status are never used, so
    nothing here can change what the host itself installs.
    """

    def __init__(self, log):
        self.log = log
        self.root = guest_dir() / "apt-trixie"

    def _opts(self) -> list[str]:
        r = self.root
        return [
            "-o", f"Dir::Etc::SourceList={r}/sources.list",
            "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", "Dir::Etc::Preferences=/dev/null",
            "-o", "Dir::Etc::PreferencesParts=/dev/null",
            "-o", f"Dir::State={r}/state",
            "-o", f"Dir::State::Lists={r}/lists",
            "-o", f"Dir::State::status={r}/status",
            "-o", f"Dir::Cache={r}/cache",
            "-o", "APT::Architectures::=amd64",
            "-o", "APT::Architectures::=arm64",
            # Downloads land in our own (root-owned) directories.
            "-o", "APT::Sandbox::User=root",
        ]

    # Once per process is enough: set-up steps share one fresh package list.
    updated: set = set()

    def update(self) -> None:
        if str(self.root) in _Apt.updated:
            return
        try:
            mirror = _image.debian_mirror()
        except _image.ImageError as e:
            raise GuestUnavailable(f"kernels not downloadable: {e}") from e
        for d in ("lists/partial", "cache/archives/partial", "state"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        (self.root / "status").touch()
        keyring = "/usr/share/keyrings/debian-archive-keyring.gpg"
        (self.root / "sources.list").write_text(
            f"deb [signed-by={keyring}] {mirror} {SUITE} main\n")
        self.log(f"apt-get update ({SUITE} from {mirror}, private state in {self.root})")
        try:
            _run(["apt-get", *self._opts(), "-q", "update"], "apt-get update", timeout=600)
        except GuestError as e:
            raise GuestUnavailable(f"kernels not downloadable: {e}") from e
        _Apt.updated.add(str(self.root))

    def resolve_kernel(self, meta: str, arch: str) -> str:
        """Name of the linux-image package the metapackage depends on."""
        out = _run(["apt-cache", *self._opts(), "depends", f"{meta}:{arch}"],
                   "apt-cache depends")
        for line in out.splitlines():
            m = re.match(r"\s*Depends:\s*(linux-image-\S+)", line)
            if m:
                return m.group(1).split(":")[0]
        raise GuestUnavailable(f"kernels not downloadable: {meta} has no linux-image dependency")

    def download(self, pkg: str, arch: str, dest: pathlib.Path) -> pathlib.Path:
        dest.mkdir(parents=True, exist_ok=True)
        before = set(dest.glob("*.deb"))
        try:
            _run(["apt-get", *self._opts(), "-q", "download", f"{pkg}:{arch}"],
                 f"downloading {pkg}:{arch}", cwd=dest, timeout=900)
        except GuestError as e:
            raise GuestUnavailable(f"not downloadable: {e}") from e
        new = sorted(set(dest.glob("*.deb")) - before)
        if not new:
            raise GuestError(f"apt-get download {pkg}:{arch} produced no .deb")
        return new[0]


def _extract_deb(deb: pathlib.Path, into: pathlib.Path) -> None:
    _run(["dpkg-deb", "-x", str(deb), str(into)], f"extracting {deb.name}")


# --------------------------------------------------------------------------
# Kernels and busybox


def _kernel_dir(arch: str) -> pathlib.Path:
    spec = ARCHES[arch]
    k = _key(RECIPE_VERSION, SUITE, arch, spec["meta"], ",".join(spec["modules"]))
    return guest_dir() / "kernels" / f"{arch}-{k}"


def ensure_kernel(arch: str, apt: Optional[_Apt] = None, log=_log_default) -> pathlib.Path:
    """Directory with vmlinuz, config, release, package and modules/*.ko."""
    spec = ARCHES[arch]
    apt = apt or _Apt(log)

    def build(tmp: pathlib.Path) -> None:
        apt.update()
        pkg = apt.resolve_kernel(spec["meta"], spec["deb"])
        log(f"{arch}: {spec['meta']} -> {pkg}; downloading")
        started = time.monotonic()
        deb = apt.download(pkg, spec["deb"], tmp / "deb")
        log(f"{arch}: downloaded {deb.name} in {time.monotonic() - started:.1f} s")
        _extract_deb(deb, tmp / "x")
        boot = tmp / "x" / "boot"
        vmlinuz = next(boot.glob("vmlinuz-*"), None)
        if vmlinuz is None:
            raise GuestError(f"{deb.name} has no /boot/vmlinuz-*")
        release = vmlinuz.name[len("vmlinuz-"):]
        shutil.copyfile(vmlinuz, tmp / "vmlinuz")
        shutil.copyfile(boot / f"config-{release}", tmp / "config")
        (tmp / "release").write_text(release + "\n")
        (tmp / "package").write_text(deb.name + "\n")
        (tmp / "modules").mkdir()
        # Trixie ships modules under /usr/lib (merged /usr); older under /lib.
        moddir = next((d for d in (tmp / "x" / "usr/lib/modules" / release,
                                   tmp / "x" / "lib/modules" / release) if d.is_dir()), None)
        for rel in spec["modules"]:
            # Debian compresses modules with xz; busybox insmod wants them
            # plain, so decompress here rather than rely on its xz support.
            src = next(iter(moddir.glob(rel + "*")), None) if moddir else None
            if src is None:
                raise GuestError(f"{deb.name} lacks module {rel}")
            data = lzma.open(src).read() if src.suffix == ".xz" else src.read_bytes()
            (tmp / "modules" / pathlib.Path(rel).name).write_bytes(data)
        shutil.rmtree(tmp / "x")
        shutil.rmtree(tmp / "deb")

    return _build_atomically(_kernel_dir(arch), build)


def ensure_busybox(arch: str, apt: Optional[_Apt] = None, log=_log_default) -> pathlib.Path:
    """Debian trixie's static busybox for ``arch`` (one binary)."""
    deb_arch = ARCHES[arch]["deb"]
    final = guest_dir() / "busybox" / f"{arch}-{_key(RECIPE_VERSION, SUITE, deb_arch)}"
    apt = apt or _Apt(log)

    def build(tmp: pathlib.Path) -> None:
        apt.update()
        deb = apt.download("busybox-static", deb_arch, tmp / "deb")
        _extract_deb(deb, tmp / "x")
        shutil.copyfile(tmp / "x" / "bin" / "busybox"
                        if (tmp / "x" / "bin" / "busybox").exists()
                        else tmp / "x" / "usr" / "bin" / "busybox", tmp / "busybox")
        os.chmod(tmp / "busybox", 0o755)
        (tmp / "package").write_text(deb.name + "\n")
        shutil.rmtree(tmp / "x")
        shutil.rmtree(tmp / "deb")

    return _build_atomically(final, build) / "busybox"


# --------------------------------------------------------------------------
# initramfs (newc cpio, written directly: no staging tree, no mknod needed)


class _Cpio:
    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"", rdev=(0, 0)) -> None:
        nameb = name.encode() + b"\0"
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(nameb), 0]
        self.ino += 1
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.buf.write(hdr + nameb)
        self.buf.write(b"\0" * (-(len(hdr) + len(nameb)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, 0o100000 | perm, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        out = self.buf.getvalue()
        return out + b"\0" * (-len(out) % 512)


def _base_cpio(busybox: pathlib.Path) -> _Cpio:
    c = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "newroot", "lib", "tmp"):
        c.dir(d)
    # The kernel opens /dev/console for init's stdio before init runs.
    c.chardev("dev/console", 5, 1)
    c.file("bin/busybox", busybox.read_bytes(), 0o755)
    return c


# x86_64: load virtio_blk, mount the root disk and the run disk, switch_root
# into pid1.py under the image's Python.  nfnetlink: CRIU probes the kernel
# with libnftables at every start, and libnftables exits the process when
# netfilter's netlink protocol is missing ("Could not initialize kernel
# features detection"); with nfnetlink alone the probe finds no nf_tables
# and CRIU goes on.
_X86_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
insmod /lib/virtio_blk.ko
insmod /lib/nfnetlink.ko
i=0
while [ ! -b /dev/vdc ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if mount -t ext4 /dev/vda /newroot && mount -t ext4 /dev/vdb /newroot/mnt; then
    mount --move /dev /newroot/dev
    mount --move /proc /newroot/proc
    mount --move /sys /newroot/sys
    exec switch_root /newroot /usr/bin/python3 -I /mnt/pid1.py
fi
echo "@@MIGRATOR-GUEST@@ error: cannot mount the guest disks"
ls -l /dev/vd* 2>&1
poweroff -f
"""

# arm64: everything runs from the initramfs.
_ARM64_INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t devtmpfs devtmpfs /dev
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t tmpfs tmpfs /tmp
echo "@@MIGRATOR-GUEST@@ kernel $(uname -r)"
echo "@@MIGRATOR-GUEST@@ begin-output"
/selftest $(cat /selftest.args) 2>&1
rc=$?
echo "@@MIGRATOR-GUEST@@ end-output"
echo "@@MIGRATOR-GUEST@@ exit $rc"
poweroff -f
"""


def _root_initrd(arch: str, log=_log_default) -> pathlib.Path:
    """The initramfs that mounts the disks and switch_roots (_X86_INIT is
    architecture-neutral despite its name: both root-disk guests use it)."""
    kdir = ensure_kernel(arch, log=log)
    bb = ensure_busybox(arch, log=log)
    key = _key(RECIPE_VERSION, kdir.name, bb.read_bytes(), _X86_INIT)
    # The arm64 self-test initramfs prunes "arm64-*": a different prefix.
    prefix = "x86_64-" if arch == "x86_64" else f"root-{arch}-"
    final = guest_dir() / "initrd" / f"{prefix}{key}"

    def build(tmp: pathlib.Path) -> None:
        c = _base_cpio(bb)
        c.file("init", _X86_INIT.encode(), 0o755)
        for ko in sorted((kdir / "modules").glob("*.ko")):
            c.file(f"lib/{ko.name}", ko.read_bytes())
        (tmp / "initrd").write_bytes(c.finish())

    return _build_atomically(final, build, prune=prefix) / "initrd"


def _x86_initrd(log=_log_default) -> pathlib.Path:
    return _root_initrd("x86_64", log)


def _native_units() -> list[str]:
    """The C units of the extension, as native/build.py lists them.

    The self-test links the same units; reading the list keeps a new unit
    from breaking the cross build.  Falls back to the units known today.
    """
    import ast
    try:
        tree = ast.parse((REPO / "native" / "build.py").read_text())
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == "SOURCES"):
                units = ast.literal_eval(node.value)
                if units and all(isinstance(u, str) for u in units):
                    return list(units)
    except (OSError, SyntaxError, ValueError):
        pass
    return list(NATIVE_UNITS)


def selftest_sources() -> list[pathlib.Path]:
    return [REPO / "native" / "selftest.c"] + [REPO / "native" / u for u in _native_units()]


def _cross_compile_selftest(out: pathlib.Path) -> None:
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if not cc:
        raise GuestUnavailable("aarch64-linux-gnu-gcc is not installed (apt-get install "
                               "gcc-aarch64-linux-gnu libc6-dev-arm64-cross)")
    missing = [str(p) for p in selftest_sources() if not p.exists()]
    if missing:
        raise GuestError(f"self-test sources missing: {', '.join(missing)}")
    _run([cc, "-static", "-O2", "-D_GNU_SOURCE", "-Inative", "-o", str(out),
          *[str(p.relative_to(REPO)) for p in selftest_sources()]],
         "cross-compiling native/selftest.c", cwd=REPO)


def _arm64_initrd(args: Sequence[str] = (), log=_log_default) -> pathlib.Path:
    kdir = ensure_kernel("arm64", log=log)
    bb = ensure_busybox("arm64", log=log)
    src_digest = _key(*[p.read_bytes() if p.exists() else b"-" for p in selftest_sources()],
                      *[p.read_bytes() for p in sorted((REPO / "native").glob("*.h"))])
    key = _key(RECIPE_VERSION, kdir.name, bb.read_bytes(), _ARM64_INIT, src_digest,
               "\0".join(args))
    final = guest_dir() / "initrd" / f"arm64-{key}"

    def build(tmp: pathlib.Path) -> None:
        _cross_compile_selftest(tmp / "selftest")
        c = _base_cpio(bb)
        c.file("init", _ARM64_INIT.encode(), 0o755)
        c.file("selftest", (tmp / "selftest").read_bytes(), 0o755)
        c.file("selftest.args", shlex.join(args).encode())
        (tmp / "initrd").write_bytes(c.finish())
        (tmp / "selftest").unlink()

    return _build_atomically(final, build, prune="arm64-") / "initrd"


# --------------------------------------------------------------------------
# Root-disk guests (x86_64, arm64 with rootfs=True): the node image of the
# guest's architecture as a cached ext4 root, the extension for the image's
# Python, and a fresh run disk per call.


def _tree_size(path: pathlib.Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for n in dirnames + filenames:
            try:
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
            except OSError:
                pass
    return total


def _mkfs(dest: pathlib.Path, src: pathlib.Path, label: str, size: int) -> None:
    with open(dest, "wb") as f:
        f.truncate(size)  # sparse
    _run(["mkfs.ext4", "-q", "-F", "-L", label, "-E", "root_owner=0:0",
          "-d", str(src), str(dest)], f"mkfs.ext4 -d {src}", timeout=900)


def _ensure_image(log, arch: str = "x86_64") -> pathlib.Path:
    # A host that cannot build images at all (not root, no debootstrap, no
    # mirror, no qemu-user binfmt for a foreign arch) lacks a capability:
    # skip.  A build that starts and then fails is a defect somewhere and
    # must show as a failure.
    deb = ARCHES[arch]["deb"]
    if not (_image.image_path(deb) / _image.STAMP).exists():
        try:
            _image._check_host(deb)
            _image.debian_mirror()
        except _image.ImageError as e:
            raise GuestUnavailable(f"{deb} node image cannot be built here: {e}") from e
    try:
        return _image.ensure_image(log=log, arch=deb)
    except _image.ImageError as e:
        raise GuestError(f"{deb} node image build failed: {e}") from e


def _root_disk(log=_log_default, arch: str = "x86_64") -> pathlib.Path:
    img = _ensure_image(log, arch)
    stamp = (img / _image.STAMP).read_text()
    final = guest_dir() / "disks" / f"{arch}-root-{_key(RECIPE_VERSION, img.name, stamp)}"

    def build(tmp: pathlib.Path) -> None:
        size = int(_tree_size(img) * 1.2) + (1 << 30)
        log(f"building {arch} root disk from {img} ({size >> 20} MiB, sparse)")
        _mkfs(tmp / "root.img", img, "migroot", size)

    return _build_atomically(final, build, prune=f"{arch}-root-") / "root.img"


def _copy_tree(dest: pathlib.Path) -> None:
    def ignore(dirpath, names):
        return {n for n in names if n in TREE_EXCLUDE or TREE_EXCLUDE_RE.search(n)}

    shutil.copytree(REPO, dest, ignore=ignore, symlinks=True)


def _extension_inputs() -> list[pathlib.Path]:
    files = [REPO / "setup.py", REPO / "pyproject.toml", REPO / "migrator" / "__init__.py"]
    files += sorted(p for p in (REPO / "native").iterdir() if p.is_file())
    return files


def _ensure_extension(log=_log_default, arch: str = "x86_64") -> pathlib.Path:
    """migrator/_native*.so built for the image's Python, outside the tree.

    Built with the image's own compiler and Python in a chroot on the host
    (fast, unlike gcc in a TCG machine; a foreign image's binaries run
    through qemu-user's binfmt handler, still much faster than a whole
    emulated machine), inside a private mount namespace so nothing stays
    mounted; the image itself is not written to.
    """
    img = _ensure_image(log, arch)
    key = _key(RECIPE_VERSION, img.name,
               *[str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes()
                 for p in _extension_inputs()])
    final = guest_dir() / "ext" / f"{arch}-{key}"

    def build(tmp: pathlib.Path) -> None:
        if ARCHES[arch]["deb"] != _image.host_arch():
            try:
                _image.ensure_binfmt(ARCHES[arch]["deb"])
            except _image.ImageError as e:
                raise GuestUnavailable(str(e)) from e
        src = tmp / "src"
        src.mkdir()
        for p in ("setup.py", "pyproject.toml"):
            shutil.copyfile(REPO / p, src / p)
        shutil.copytree(REPO / "native", src / "native",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copytree(REPO / "migrator", src / "migrator",
                        ignore=lambda d, n: {x for x in n if x == "__pycache__"
                                             or TREE_EXCLUDE_RE.search(x)})
        script = (
            "set -e\n"
            f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(img / 'src'))}\n"
            f"mount -t tmpfs tmpfs {shlex.quote(str(img / 'tmp'))}\n"
            f"mount -t proc proc {shlex.quote(str(img / 'proc'))}\n"
            f"exec chroot {shlex.quote(str(img))} /bin/sh -c "
            "'cd /src && PYTHONDONTWRITEBYTECODE=1 python3 setup.py -q build_ext "
            "--build-lib /src/out --build-temp /tmp/build'\n"
        )
        log(f"building the cffi extension for the {arch} image's Python (chroot)")
        started = time.monotonic()
        _run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
             f"building migrator._native for the {arch} guest", timeout=1200)
        log(f"extension built in {time.monotonic() - started:.1f} s")
        built = sorted((src / "out" / "migrator").glob("_native*.so"))
        if not built:
            raise GuestError("extension build produced no migrator/_native*.so")
        for so in built:
            shutil.copyfile(so, tmp / so.name)
        shutil.rmtree(src)

    return _build_atomically(final, build, prune=f"{arch}-")


def junit_cases(junit_xml: bytes):
    """(id, outcome, message) for every test case in a junit report;
    outcome is passed, failed (failure or error) or skipped."""
    import xml.etree.ElementTree as ET
    root = ET.fromstring(junit_xml)
    for case in root.iter("testcase"):
        cid = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, message = "passed", ""
        for child in case:
            if child.tag in ("failure", "error"):
                outcome, message = "failed", (child.get("message") or "")[:300]
                break
            if child.tag == "skipped":
                outcome, message = "skipped", child.get("message") or ""
        yield cid, outcome, message


def _guest_command(command: Union[Sequence[str], str, None]) -> str:
    if command is None or command == [] or command == "":
        return "uname -a"
    if isinstance(command, str):
        return command
    return shlex.join(command)


# --------------------------------------------------------------------------
# qemu


def _qemu(binary: str) -> str:
    path = shutil.which(binary)
    if not path:
        pkg = "qemu-system-x86" if binary.endswith("x86_64") else "qemu-system-arm"
        raise GuestUnavailable(f"{binary} is not installed on the host (apt-get install {pkg})")
    return path


def _boot(argv: list[str], timeout: float, echo: bool) -> tuple[str, float, float, bool]:
    """Run qemu; returns (console, boot_seconds, total_seconds, timed_out).

    qemu is killed by its pid on every path (timeout, exception, ^C).
    """
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    chunks: list[bytes] = []
    first_mark = [0.0]

    def pump():
        assert proc.stdout is not None
        # The serial console trickles in a few bytes at a time: look for the
        # first marker in everything read so far, not just the last chunk.
        seen = b""
        for chunk in iter(lambda: proc.stdout.read1(65536), b""):
            chunks.append(chunk)
            if not first_mark[0]:
                seen = (seen + chunk)[-4096:]
                if MARK.encode() in seen:
                    first_mark[0] = time.monotonic() - started
            if echo:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        if proc.poll() is None:
            proc.kill()  # SIGKILL to this pid
            proc.wait()
        t.join(timeout=5)
        if proc.stdout:
            proc.stdout.close()
    total = time.monotonic() - started
    text = b"".join(chunks).decode(errors="replace").replace("\r\n", "\n").replace("\r", "")
    return text, first_mark[0], total, timed_out


def _marker(console: str, name: str) -> Optional[str]:
    m = re.search(rf"{re.escape(MARK)} {name} ?(.*)", console)
    return m.group(1).strip() if m else None


def _tail(text: str, n: int = 40) -> str:
    return "\n".join(text.splitlines()[-n:])


def ensure_guests(log=_log_default, arches: Sequence[str] = ("x86_64", "arm64")) -> None:
    """Download and build everything both guests need (idempotent)."""
    apt = _Apt(log)
    for arch in arches:
        ensure_kernel(arch, apt, log)
        ensure_busybox(arch, apt, log)
    if "x86_64" in arches:
        _x86_initrd(log)
        _root_disk(log)
        _ensure_extension(log)
    if "arm64" in arches:
        if (REPO / "native" / "selftest.c").exists():
            _arm64_initrd(log=log)
        else:
            log("native/selftest.c does not exist yet; the arm64 initramfs is built on first run")
        # The arm64 root-disk guest (the Python tier): image, disk, extension.
        _root_initrd("arm64", log)
        _root_disk(log, "arm64")
        _ensure_extension(log, "arm64")


def run_guest(arch: str, command: Union[Sequence[str], str, None], timeout: float,
              *, echo: bool = False, log=_log_default,
              rootfs: Optional[bool] = None) -> GuestResult:
    """Boot the guest for ``arch``, run ``command``, power off.

    With a root disk (``rootfs``; the default for x86_64): ``command``
    (argv list, or a shell string) runs as root with cwd /src (a copy of
    the working tree with the guest-built extension), PYTHONPATH=/src;
    files it writes to $MIGRATOR_GUEST_RESULTS come back in
    ``GuestResult.files``.  $MIGRATOR_GUEST_SCRATCH is disk-backed scratch.
    arm64 without ``rootfs`` (the default there): only the native self-test
    runs; ``command``, if given, is its argument list.  ``timeout`` bounds
    the whole boot; qemu is killed after it.  Raises GuestUnavailable when
    a capability is missing and GuestError when the guest does not finish.
    """
    if arch not in ARCHES:
        raise ValueError(f"unknown guest arch {arch!r} (x86_64 or arm64)")
    if rootfs is None:
        rootfs = arch == "x86_64"
    if rootfs:
        return _run_rooted(arch, command, timeout, echo, log)
    if arch == "arm64":
        return _run_arm64(command, timeout, echo, log)
    raise ValueError("the x86_64 guest always boots its root disk")


def _run_arm64(command, timeout, echo, log) -> GuestResult:
    qemu = _qemu("qemu-system-aarch64")
    if isinstance(command, str):
        args = shlex.split(command)
    else:
        args = list(command or [])
    if args and args[0] in ("selftest", "/selftest"):
        args = args[1:]
    kdir = ensure_kernel("arm64", log=log)
    initrd = _arm64_initrd(args, log=log)
    argv = [qemu, *ARCHES["arm64"]["machine"], "-accel", "tcg", "-m", "1G", "-smp", "2",
            "-nographic", "-nic", "none", "-no-reboot",
            "-kernel", str(kdir / "vmlinuz"), "-initrd", str(initrd),
            "-append", "console=ttyAMA0 panic=-1 quiet loglevel=3"]
    console, boot, total, timed_out = _boot(argv, timeout, echo)
    release = _marker(console, "kernel") or ""
    rc = _marker(console, "exit")
    m = re.search(rf"{re.escape(MARK)} begin-output\n(.*?){re.escape(MARK)} end-output",
                  console, re.S)
    output = m.group(1) if m else ""
    if timed_out or rc is None:
        why = f"timed out after {timeout:.0f} s" if timed_out else "powered off without a result"
        raise GuestError(f"arm64 guest {why}; console tail:\n{_tail(console)}")
    return GuestResult(int(rc), output, release, {}, console, boot, total)


def _run_rooted(arch, command, timeout, echo, log) -> GuestResult:
    spec = ARCHES[arch]
    qemu = _qemu(spec["qemu"])
    for tool in ("mkfs.ext4", "unshare", "chroot", "dpkg-deb", "apt-get"):
        if not shutil.which(tool):
            raise GuestUnavailable(f"{tool} is not installed on the host")
    kdir = ensure_kernel(arch, log=log)
    initrd = _root_initrd(arch, log)
    root = _root_disk(log, arch)
    ext = _ensure_extension(log, arch)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="migrator-guest-"))
    try:
        stage = tmp / "stage"
        stage.mkdir()
        _copy_tree(stage / "tree")
        for so in ext.glob("_native*.so"):
            shutil.copyfile(so, stage / "tree" / "migrator" / so.name)
        shutil.copyfile(HELPERS / "pid1.py", stage / "pid1.py")
        shutil.copyfile(kdir / "config", stage / "kernel-config")
        (stage / "command").write_text(_guest_command(command))
        (stage / "results").mkdir()
        (stage / "scratch").mkdir()
        # Generous sparse scratch: costs only what the guest writes.
        _mkfs(tmp / "run.img", stage, "migrun", _tree_size(stage) + (4 << 30))
        shutil.rmtree(stage)
        results = tmp / "results.img"
        with open(results, "wb") as f:
            f.truncate(512 << 20)
        argv = [qemu, *spec["machine"], "-accel", "tcg", "-m", "3G", "-smp", "2",
                "-nographic", "-nic", "none", "-no-reboot",
                "-kernel", str(kdir / "vmlinuz"), "-initrd", str(initrd),
                "-append", f"console={spec['console']} panic=-1 quiet loglevel=3",
                # The cached root disk stays pristine: writes go to a
                # throw-away overlay.
                "-drive", f"file={root},format=raw,if=virtio,snapshot=on",
                "-drive", f"file={tmp / 'run.img'},format=raw,if=virtio",
                "-drive", f"file={results},format=raw,if=virtio"]
        console, boot, total, timed_out = _boot(argv, timeout, echo)
        files: dict[str, bytes] = {}
        try:
            with tarfile.open(results, mode="r:") as tar:
                for member in tar.getmembers():
                    if member.isfile():
                        f = tar.extractfile(member)
                        if f is not None:
                            files[os.path.normpath(member.name)] = f.read()
        except tarfile.TarError:
            pass
        rc_text = files.get("rc", b"").decode().strip() or _marker(console, "exit")
        if timed_out or not rc_text:
            why = (f"timed out after {timeout:.0f} s" if timed_out
                   else "powered off without a result")
            raise GuestError(f"{arch} guest {why}; console tail:\n{_tail(console)}")
        release = (files.get("kernel_release", b"").decode().strip()
                   or _marker(console, "kernel") or "")
        output = files.get("output", b"").decode(errors="replace")
        return GuestResult(int(rc_text), output, release, files, console, boot, total)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = ("usage: python -m tests.beds.guest {setup,x86_64,arm64,arm64-root} "
             "[--timeout S] [-- CMD...]")
    if not argv or argv[0] not in ("setup", "x86_64", "arm64", "arm64-root"):
        print(usage, file=sys.stderr)
        return 2
    what, rest = argv[0], argv[1:]
    timeout = 900.0
    if rest[:1] == ["--timeout"]:
        timeout, rest = float(rest[1]), rest[2:]
    if rest[:1] == ["--"]:
        rest = rest[1:]
    try:
        if what == "setup":
            started = time.monotonic()
            ensure_guests()
            _log_default(f"guests ready in {time.monotonic() - started:.1f} s under {guest_dir()}")
            return 0
        if what == "arm64-root":
            r = run_guest("arm64", rest or None, timeout, echo=True, rootfs=True)
        else:
            r = run_guest(what, rest or None, timeout, echo=True)
    except GuestUnavailable as e:
        _log_default(f"unavailable: {e}")
        return 77
    except GuestError as e:
        _log_default(f"error: {e}")
        return 1
    _log_default(f"kernel {r.kernel_release}; exit {r.returncode}; first marker after "
                 f"{r.boot_seconds:.1f} s; total {r.total_seconds:.1f} s")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
