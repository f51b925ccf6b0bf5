"""The node image: a Debian 13 (trixie) root filesystem for the test beds.

Why trixie: Debian 12's CRIU (3.17) fails on current kernels, trixie's 4.1.1
works.  Trixie packages stay inside this root; the host's apt sources are
never touched (adding trixie there upgrades the host's libc).

The image is cached outside the git tree (``$MIGRATOR_BEDS_DIR``, default
``/var/cache/migrator-beds``) so that clean checkouts on the same machine
reuse it.  It is keyed by a hash of its recipe; a changed recipe builds a new
image next to the old one.  A build happens in a temporary directory that is
renamed into place only when complete, so a crashed build never leaves
something that looks like an image.

    python -m tests.beds.image      # build (or find) the image, print its path
    python -m tests.beds.image --arch arm64   # a foreign-architecture image

A foreign architecture (``arch`` other than the host's dpkg architecture,
e.g. an arm64 root for the arm64 qemu guest) is bootstrapped with
debootstrap's second stage running on the host through qemu-user-static's
binfmt_misc handler, which is far faster than running it in an emulated
machine.  Its cache key and directory name carry the architecture; the
host architecture's key is what it always was, so existing images stay valid.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import sys
import time
from typing import Callable, Optional

# Bump when the steps below change in a way the package list does not show.
RECIPE_VERSION = "beds-image-4"

SUITE = "trixie"
VARIANT = "minbase"

# CRIU 4.1.1 (trixie) cannot dump any process holding an INET socket on
# Linux 6.16 and later: the kernel restricted SO_PASSCRED / SO_PASSSEC to
# unix, netlink and bluetooth sockets, and CRIU treats the refused
# getsockopt as fatal ("sockets: Can't get 1:16 opt").  CRIU 4.2 handles
# it.  So the nodes take criu (and libcriu2, which crun loads) from the
# next Debian release, pinned to those packages and what they need.
CRIU_SUITE = "forky"
CRIU_PACKAGES = ("criu", "libcriu2")

# podman and what it runs containers with, from trixie with apt (its
# dependencies are more than debootstrap's resolver handles), in the host
# architecture's image only: the emulated arm64 guest runs no containers,
# and its image would take 20 minutes to rebuild for them.
PODMAN_PACKAGES = ("podman", "conmon", "netavark", "aardvark-dns", "catatonit",
                   "nftables")  # netavark sets up podman's networks with nft

# What a node needs: runtimes and CRIU (iptables: CRIU locks the network with
# iptables-restore), tools the beds drive (iproute2, procps), busybox-static
# as a ready-made container rootfs, and everything the project needs to run
# from the bind-mounted working tree, including building its cffi extension
# for the image's own Python.  python3-venv is left out on purpose: nodes use
# Debian's python3 with Debian's packages, so no pip install is needed.
PACKAGES = (
    "criu",
    "runc",
    "crun",
    "iptables",
    "iproute2",
    "procps",
    "busybox-static",
    "python3",
    "python3-cffi",
    # debootstrap's resolver does not follow virtual packages:
    # python3-pycparser depends on python3-ply-{lex,yacc}-3.10, which only
    # python3-ply provides.
    "python3-ply",
    "python3-msgpack",
    "python3-zstandard",
    "python3-typer",
    "python3-pyroute2",
    "python3-pytest",
    "python3-hypothesis",
    "python3-setuptools",
    "python3-dev",
    "gcc",
    "libc6-dev",
    "linux-libc-dev",
)

# The host's CA bundle, carried into the image: HTTPS to package registries
# may go through a proxy whose CA only the host trusts.
CA_BUNDLE = pathlib.Path("/etc/ssl/certs/ca-certificates.crt")

DEFAULT_BEDS_DIR = "/var/cache/migrator-beds"
BUILD_TIMEOUT = 30 * 60
STAMP = "etc/migrator-bed-image"


class ImageError(RuntimeError):
    """The image cannot be built; the message says which capability is missing."""


def beds_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("MIGRATOR_BEDS_DIR") or DEFAULT_BEDS_DIR)


def _ca_digest() -> str:
    # Part of the key: a changed host trust store must reach the image.
    try:
        return hashlib.sha256(CA_BUNDLE.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "no-ca-bundle"


# platform.machine() -> Debian architecture, for hosts without dpkg.
_DEB_ARCH = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
# Debian architecture -> the binfmt_misc entry qemu-user-static registers.
QEMU_BINFMT = {"arm64": "qemu-aarch64", "amd64": "qemu-x86_64"}


@functools.lru_cache(maxsize=None)
def host_arch() -> str:
    """The host's Debian architecture (amd64, arm64, ...)."""
    try:
        out = subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                             text=True, check=True).stdout.strip()
        if out:
            return out
    except (OSError, subprocess.CalledProcessError):
        pass
    return _DEB_ARCH.get(platform.machine(), platform.machine())


def _arch(arch: Optional[str]) -> str:
    return _DEB_ARCH.get(arch, arch) if arch else host_arch()


def recipe_key(arch: Optional[str] = None) -> str:
    arch = _arch(arch)
    parts = [RECIPE_VERSION, SUITE, VARIANT, ",".join(sorted(PACKAGES)),
             CRIU_SUITE, ",".join(CRIU_PACKAGES), _ca_digest()]
    if arch != host_arch():
        # Only foreign images name their architecture in the recipe: the
        # host's key stays what it was before images had an architecture.
        parts.append(f"arch={arch}")
    else:
        parts.append(",".join(PODMAN_PACKAGES))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def image_path(arch: Optional[str] = None) -> pathlib.Path:
    """Where the image for the current recipe lives (it may not exist yet)."""
    arch = _arch(arch)
    name = "trixie" if arch == host_arch() else f"trixie-{arch}"
    return beds_dir() / "images" / f"{name}-{recipe_key(arch)}"


def _sources_files() -> list[pathlib.Path]:
    files = []
    main = pathlib.Path("/etc/apt/sources.list")
    if main.exists():
        files.append(main)
    d = pathlib.Path("/etc/apt/sources.list.d")
    if d.is_dir():
        files.extend(sorted(d.glob("*.sources")) + sorted(d.glob("*.list")))
    return files


def _is_main_archive(uri: str, suites: list[str]) -> bool:
    # The security archive has a different layout; debootstrap needs the
    # main archive.
    if any(s.endswith("-security") or "/" in s for s in suites):
        return False
    return uri.startswith(("http://", "https://")) and "security" not in uri


def debian_mirror() -> str:
    """The Debian mirror the host's apt uses, read at run time.

    MIGRATOR_DEBIAN_MIRROR overrides it.  Only http(s) mirrors are accepted.
    """
    override = os.environ.get("MIGRATOR_DEBIAN_MIRROR")
    if override:
        return override
    for path in _sources_files():
        text = path.read_text(errors="replace")
        if path.suffix == ".sources":
            # deb822: blank-line separated stanzas of "Key: value" fields.
            for stanza in text.split("\n\n"):
                fields: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.startswith("#") or ":" not in line or line[:1].isspace():
                        continue
                    k, v = line.split(":", 1)
                    fields[k.strip().lower()] = v.strip()
                if fields.get("enabled", "yes").lower() == "no":
                    continue
                if "deb" not in fields.get("types", "").split():
                    continue
                suites = fields.get("suites", "").split()
                for uri in fields.get("uris", "").split():
                    if _is_main_archive(uri, suites):
                        return uri
        else:
            for line in text.splitlines():
                words = line.split("#", 1)[0].split()
                if not words or words[0] != "deb":
                    continue
                words = [w for w in words[1:] if not w.startswith("[")]
                if len(words) >= 2 and _is_main_archive(words[0], [words[1]]):
                    return words[0]
    raise ImageError("no Debian mirror found in the host's apt sources")


def _mounts_below(path: pathlib.Path) -> list[str]:
    prefix = str(path).rstrip("/") + "/"
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == str(path) or mp.startswith(prefix):
                found.append(mp)
    return found


def remove_tree(path: pathlib.Path) -> None:
    """rmtree that first detaches anything mounted below ``path``.

    A plain rmtree into a leftover bind mount of /dev or /sys would delete
    the host's files.
    """
    for mp in sorted(_mounts_below(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], check=False, capture_output=True)
    if _mounts_below(path):
        raise ImageError(f"cannot remove {path}: still has mounts below it")
    if path.exists() or path.is_symlink():
        shutil.rmtree(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(images: pathlib.Path, log: Callable[[str], None]) -> None:
    # Temporary build dirs are named .build-<key>-<pid>; the pid is the
    # builder.  Called with the build lock held, so a live builder of the
    # same key cannot exist, but a builder of another key may: keep those.
    for tmp in images.glob(".build-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
        except (IndexError, ValueError):
            continue
        if pid != os.getpid() and _pid_alive(pid):
            continue
        log(f"removing half-built image {tmp}")
        remove_tree(tmp)


BINFMT_DIR = pathlib.Path("/proc/sys/fs/binfmt_misc")


def _binfmt_enabled(entry: str) -> bool:
    try:
        lines = (BINFMT_DIR / entry).read_text().splitlines()
    except OSError:
        return False
    # "F" (fix binary): the kernel opened the interpreter when it was
    # registered, so it also runs inside a chroot that lacks it.
    flags = next((l.split(":", 1)[1] for l in lines if l.startswith("flags:")), "")
    return bool(lines) and lines[0] == "enabled" and "F" in flags


def ensure_binfmt(arch: str) -> None:
    """Make sure ``arch`` binaries run on this host through qemu-user-static.

    Outside systemd (containers, CI) nothing mounts binfmt_misc or loads
    qemu-user-static's entries, so do what systemd-binfmt would: mount it
    and ask update-binfmts (binfmt-support) to enable the entry.
    """
    entry = QEMU_BINFMT.get(arch)
    if entry is None:
        raise ImageError(f"no qemu-user binfmt entry known for architecture {arch}")
    if _binfmt_enabled(entry):
        return
    if not (BINFMT_DIR / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT_DIR)],
                       capture_output=True)
    if not (BINFMT_DIR / "register").exists():
        raise ImageError(f"binfmt_misc cannot be mounted at {BINFMT_DIR}: "
                         f"{arch} binaries cannot run on this host")
    if shutil.which("update-binfmts"):
        subprocess.run(["update-binfmts", "--enable", entry], capture_output=True)
    conf = pathlib.Path("/usr/lib/binfmt.d") / f"{entry}.conf"
    if not _binfmt_enabled(entry) and conf.exists() and not (BINFMT_DIR / entry).exists():
        # Without binfmt-support: register qemu-user-static's own
        # systemd-binfmt line, exactly as systemd-binfmt would.
        line = next((l for l in conf.read_text().splitlines()
                     if l.startswith(":")), None)
        if line:
            try:
                (BINFMT_DIR / "register").write_text(line)
            except OSError:
                pass
    if not _binfmt_enabled(entry):
        raise ImageError(
            f"{arch} binaries cannot run on this host: binfmt_misc has no enabled "
            f"{entry} entry with the F flag (apt-get install qemu-user-static binfmt-support)")


def _check_host(arch: Optional[str] = None) -> None:
    if os.geteuid() != 0:
        raise ImageError("building the node image needs root")
    if not shutil.which("debootstrap"):
        raise ImageError("debootstrap is not installed on the host (apt-get install debootstrap)")
    if not shutil.which("unshare"):
        raise ImageError("unshare (util-linux) is not installed on the host")
    if _arch(arch) != host_arch():
        ensure_binfmt(_arch(arch))


def _build(tmp: pathlib.Path, mirror: str, log: Callable[[str], None], verbose: bool,
           arch: Optional[str] = None) -> None:
    arch = _arch(arch)
    logfile = tmp.parent / f"{tmp.name}.log"
    # Downloaded .debs are kept: a recipe change then rebuilds without
    # fetching everything again.
    cache = beds_dir() / "debs"
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        # A private mount namespace: whatever debootstrap mounts inside the
        # target (proc, sys) vanishes with it, even if it is killed.
        "unshare", "--mount", "--propagation", "private",
        "debootstrap", f"--variant={VARIANT}", f"--cache-dir={cache}", f"--include={','.join(PACKAGES)}",
        # Both stages run here; a foreign one's second stage through binfmt.
        f"--arch={arch}",
        SUITE, str(tmp), mirror,
    ]
    log(f"running: {' '.join(cmd[4:])}")
    with open(logfile, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        assert proc.stdout is not None
        try:
            deadline = time.monotonic() + BUILD_TIMEOUT
            for line in proc.stdout:
                out.write(line)
                if verbose:
                    sys.stdout.write(line.decode(errors="replace"))
                    sys.stdout.flush()
                if time.monotonic() > deadline:
                    proc.kill()
                    break
            rc = proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if rc != 0:
        # Keep debootstrap's own log (it has the real error); the target
        # directory is removed after this.
        inner = tmp / "debootstrap" / "debootstrap.log"
        if inner.exists():
            with open(logfile, "ab") as out:
                out.write(b"\n==== debootstrap/debootstrap.log ====\n" + inner.read_bytes())
        tail = logfile.read_text(errors="replace").splitlines()[-25:]
        raise ImageError(
            f"debootstrap failed (exit {rc}); log {logfile}:\n" + "\n".join(tail)
        )
    logfile.unlink(missing_ok=True)
    _install_newer_criu(tmp, mirror, log,
                        extra=PODMAN_PACKAGES if arch == host_arch() else ())

    if CA_BUNDLE.exists():
        dest = tmp / str(CA_BUNDLE).lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(CA_BUNDLE, dest)
    # Downloaded .debs are not needed in a read-only lower layer.
    shutil.rmtree(tmp / "var/cache/apt/archives", ignore_errors=True)
    (tmp / "var/cache/apt/archives/partial").mkdir(parents=True, exist_ok=True)
    # Mount points the nodes use.
    for d in ("src", "sys/fs/cgroup", "run", "tmp", "proc", "dev", ".oldroot"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    (tmp / STAMP).write_text(
        f"recipe={RECIPE_VERSION}\nkey={recipe_key(arch)}\nsuite={SUITE}\narch={arch}\n"
        f"packages={' '.join(PACKAGES)}\nbuilt={time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n"
    )


def _install_newer_criu(root: pathlib.Path, mirror: str,
                        log: Callable[[str], None], extra: tuple = ()) -> None:
    """CRIU_PACKAGES from CRIU_SUITE into the fresh root (see CRIU_SUITE),
    then `extra` packages from SUITE (PODMAN_PACKAGES)."""
    src = root / "etc/apt/sources.list.d/migrator-criu.list"
    src.write_text(f"deb {mirror} {CRIU_SUITE} main\n")
    # Nothing else may come from that suite unless CRIU needs it.
    pref = root / "etc/apt/preferences.d/migrator-criu"
    pref.write_text(f"Package: *\nPin: release n={CRIU_SUITE}\nPin-Priority: 100\n")
    resolv = root / "etc/resolv.conf"
    had_resolv = resolv.exists() or resolv.is_symlink()
    if not had_resolv and pathlib.Path("/etc/resolv.conf").exists():
        shutil.copyfile("/etc/resolv.conf", resolv)
    # The mirror may serve a frozen snapshot whose Release files are past
    # their Valid-Until date: accept them, as debootstrap did.
    script = ("mount -t proc proc /proc && "
              "apt-get -q -o Acquire::Check-Valid-Until=false update && "
              "DEBIAN_FRONTEND=noninteractive apt-get -q install -y "
              f"--no-install-recommends -t {CRIU_SUITE} {' '.join(CRIU_PACKAGES)}")
    if extra:
        script += (" && DEBIAN_FRONTEND=noninteractive apt-get -q install -y "
                   f"--no-install-recommends {' '.join(extra)}")
    log(f"installing {', '.join(CRIU_PACKAGES)} from {CRIU_SUITE}"
        + (f", {', '.join(extra)} from {SUITE}" if extra else ""))
    r = subprocess.run(["unshare", "--mount", "--propagation", "private",
                        "chroot", str(root), "sh", "-c", script],
                       capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    try:
        if r.returncode != 0:
            raise ImageError(f"installing CRIU from {CRIU_SUITE} (and {extra}) failed:\n"
                             + (r.stdout + r.stderr)[-3000:])
    finally:
        # The image keeps no list of the other suite: nodes never upgrade.
        src.unlink(missing_ok=True)
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        if not had_resolv:
            resolv.unlink(missing_ok=True)


def ensure_image(log: Optional[Callable[[str], None]] = None, verbose: bool = False,
                 arch: Optional[str] = None) -> pathlib.Path:
    """Return the path of a complete node image, building it if needed.

    Idempotent and quick when the image for the current recipe exists.
    Concurrent callers serialise on a lock file; only one builds.
    ``arch``: a Debian architecture; default the host's.
    Raises ImageError when the host cannot build it.
    """
    log = log or (lambda msg: None)
    arch = _arch(arch)
    final = image_path(arch)
    if (final / STAMP).exists():
        return final
    _check_host(arch)
    images = final.parent
    images.mkdir(parents=True, exist_ok=True)
    with open(images / f".lock-{final.name}", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / STAMP).exists():  # someone else built it while we waited
            return final
        _remove_stale_builds(images, log)
        if final.exists():
            # Exists without a stamp: not one of ours, or damaged.
            log(f"removing incomplete image {final}")
            remove_tree(final)
        tmp = images / f".build-{final.name}-{os.getpid()}"
        mirror = debian_mirror()
        log(f"building node image {final.name} ({arch}) from {mirror} "
            f"(about a minute native, several under binfmt emulation)")
        started = time.monotonic()
        try:
            _build(tmp, mirror, log, verbose, arch)
            os.rename(tmp, final)  # atomic: same directory
        except BaseException:
            try:
                remove_tree(tmp)
            except Exception:
                pass  # leave it for _remove_stale_builds on the next run
            raise
        log(f"image ready in {time.monotonic() - started:.0f} s: {final}")
    return final


def main() -> int:
    def say(msg: str) -> None:
        print(f"[image] {msg}", flush=True)

    args = sys.argv[1:]
    arch = args[args.index("--arch") + 1] if "--arch" in args[:-1] else None
    try:
        path = ensure_image(log=say, verbose="-q" not in args, arch=arch)
    except ImageError as e:
        say(f"error: {e}")
        return 1
    say(f"image: {path}")
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
