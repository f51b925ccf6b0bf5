"""What /proc says about a process: mappings, fds, seccomp mode.

Plain text parsing, no native code.  Every reader raises OSError with the
real errno (ENOENT or ESRCH when the process is gone).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

# smaps VmFlags of a VMA registered with some userfaultfd: missing, wp, minor.
UFFD_VMFLAGS = frozenset({"um", "uw", "ui"})
USERFAULTFD_FD_TARGET = "anon_inode:[userfaultfd]"


@dataclass(frozen=True)
class Vma:
    start: int
    end: int
    perms: str  # e.g. "rw-p"
    offset: int
    inode: int
    path: str  # "" for anonymous memory, "[heap]", "/usr/lib/..."

    @property
    def private(self) -> bool:
        return self.perms[3] == "p"

    @property
    def special(self) -> bool:
        """Kernel-provided mappings that no checkpoint carries as memory."""
        return self.path in ("[vdso]", "[vvar]", "[vsyscall]", "[uprobes]",
                             "[vvar_vclock]", "[sigpage]", "[vectors]")


_MAPS_LINE = re.compile(
    r"([0-9a-f]+)-([0-9a-f]+) (\S{4}) ([0-9a-f]+) \S+ (\d+)\s*(.*)")


def parse_maps(text: str) -> list[Vma]:
    vmas = []
    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if not m:
            continue
        vmas.append(Vma(int(m[1], 16), int(m[2], 16), m[3], int(m[4], 16),
                        int(m[5]), m[6]))
    return vmas


def read_maps_text(pid: int) -> str:
    with open(f"/proc/{pid}/maps") as f:
        return f.read()


def read_maps(pid: int) -> list[Vma]:
    return parse_maps(read_maps_text(pid))


def parse_smaps_vmflags(text: str) -> list[tuple[int, int, frozenset[str]]]:
    """(start, end, VmFlags) of every VMA in an smaps text."""
    out = []
    cur = None
    for line in text.splitlines():
        m = _MAPS_LINE.match(line)
        if m:
            cur = (int(m[1], 16), int(m[2], 16))
        elif line.startswith("VmFlags:") and cur:
            out.append((cur[0], cur[1], frozenset(line.split()[1:])))
            cur = None
    return out


def uffd_registered_vmas(pid: int) -> list[tuple[int, int, frozenset[str]]]:
    """VMAs that carry userfaultfd registration flags (um, uw, ui)."""
    with open(f"/proc/{pid}/smaps") as f:
        return [(s, e, fl & UFFD_VMFLAGS)
                for s, e, fl in parse_smaps_vmflags(f.read())
                if fl & UFFD_VMFLAGS]


def fd_targets(pid: int) -> dict[int, str]:
    """fd number -> readlink target, for fds that still exist."""
    out = {}
    base = f"/proc/{pid}/fd"
    for name in os.listdir(base):
        try:
            out[int(name)] = os.readlink(f"{base}/{name}")
        except FileNotFoundError:
            continue  # closed while we looked
    return out


def userfaultfd_fds(pid: int) -> list[int]:
    return sorted(fd for fd, t in fd_targets(pid).items()
                  if t == USERFAULTFD_FD_TARGET)


def status_field(pid: int, name: str) -> str | None:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key == name:
                return value.strip()
    return None


def ended(pid: int) -> bool:
    """Whether the process has ended (gone, or a zombie waiting for its
    parent): what an ESRCH or ENOENT about it can mean, or not."""
    try:
        state = status_field(pid, "State")
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state is None or state[:1] in ("Z", "X")


def innermost_pid(pid: int) -> int:
    """The pid the process has in its own pid namespace (last of "NSpid:"):
    the name CRIU gives it in a container's images."""
    value = status_field(pid, "NSpid")
    return int(value.split()[-1]) if value else pid


def seccomp_mode(pid: int) -> int:
    """0 none, 1 strict, 2 filter (status "Seccomp:")."""
    value = status_field(pid, "Seccomp")
    return int(value) if value else 0


def threads(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def comm(pid: int) -> str:
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip()


def children(pid: int) -> list[int]:
    """Direct children of every thread of `pid` (needs
    CONFIG_PROC_CHILDREN, present in distribution kernels)."""
    out = []
    for tid in threads(pid):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(c) for c in f.read().split())
        except FileNotFoundError:
            continue  # the thread exited meanwhile
    return out


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants, parents before children."""
    tree, i = [pid], 0
    while i < len(tree):
        tree.extend(c for c in children(tree[i]) if c not in tree)
        i += 1
    return tree
