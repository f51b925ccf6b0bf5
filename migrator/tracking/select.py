"""Choosing a tracker: per architecture, then per kernel, then per process.

1. The architecture's preference: arm64 has no soft-dirty at all, so
   uffd-wp; powerpc and s390 have no uffd write-protection, so soft-dirty;
   x86_64 has both, and prefers uffd-wp, whose collect is atomic per page and
   needs no stop of the target (see docs/ARCHITECTURE.md for the figures).
2. The kernel's capabilities as probed (features.probe), by effect.
3. The process: one that already uses userfaultfd (an
   anon_inode:[userfaultfd] fd, or uffd flags in smaps VmFlags) cannot get
   a second registration, and CRIU refuses it anyway; one whose seccomp
   filter would refuse (or punish) an injected userfaultfd(2) cannot host
   our userfaultfd.  uffd-wp is off for both; with nothing left, `full`.

Every decision carries a one-line reason; a forced tracker that cannot
work is an error, never a silent fallback.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from migrator.kernel import procfs
from migrator.tracking.base import Tracker, TrackerError
from migrator.tracking.features import Capabilities

TRACKERS = ("uffd-wp", "soft-dirty", "full")

PREFERENCE = {
    "arm64": ("uffd-wp", "soft-dirty"),
    "x86_64": ("uffd-wp", "soft-dirty"),
    "ppc64": ("soft-dirty", "uffd-wp"),
    "s390x": ("soft-dirty", "uffd-wp"),
}

SECCOMP_ACTION_MASK = 0xFFFF0000


@dataclass(frozen=True)
class ProcessFacts:
    pid: int
    uffd_fds: tuple[int, ...] = ()
    uffd_vmas: int = 0
    seccomp_mode: int = 0
    # What the seccomp filters would do to userfaultfd(2): None when no
    # filter applies, else a name like "allow", "errno", "kill-process".
    seccomp_uffd: str | None = None


@dataclass(frozen=True)
class Decision:
    pid: int | None
    tracker: str
    reason: str

    def as_dict(self) -> dict:
        return {"pid": self.pid, "tracker": self.tracker, "reason": self.reason}


def _kernel_says(name: str, caps: Capabilities) -> str | None:
    """Why the kernel cannot run tracker `name`, or None if it can."""
    if name == "uffd-wp":
        for cap in ("uffd_wp_async", "pagemap_scan", "ptrace_injection"):
            if not getattr(caps, cap):
                return f"{cap.replace('_', '-')}: {caps.why[cap]}"
    elif name == "soft-dirty":
        if not caps.soft_dirty:
            return f"soft-dirty: {caps.why['soft_dirty']}"
        if not caps.ptrace_injection:
            # the read-and-clear must happen with the target stopped
            return f"ptrace: {caps.why['ptrace_injection']}"
    return None


def _process_says(name: str, facts: ProcessFacts | None) -> str | None:
    """Why this process cannot use tracker `name`, or None."""
    if facts is None or name != "uffd-wp":
        return None
    if facts.uffd_fds or facts.uffd_vmas:
        where = (f"fd {', '.join(map(str, facts.uffd_fds))} is "
                 f"{procfs.USERFAULTFD_FD_TARGET}" if facts.uffd_fds else
                 f"{facts.uffd_vmas} mapping(s) carry uffd VmFlags")
        return f"pid {facts.pid} already uses userfaultfd ({where})"
    if facts.seccomp_uffd not in (None, "allow"):
        return (f"pid {facts.pid}'s seccomp filter would answer "
                f"userfaultfd(2) with {facts.seccomp_uffd}")
    return None


def choose(arch: str, caps: Capabilities, facts: ProcessFacts | None = None,
           forced: str | None = None) -> Decision:
    pid = facts.pid if facts else None
    if forced is not None:
        if forced not in TRACKERS:
            raise TrackerError(f"unknown tracker {forced!r}; "
                               f"choose one of {', '.join(TRACKERS)}")
        why_not = _kernel_says(forced, caps) or _process_says(forced, facts)
        if why_not:
            raise TrackerError(f"tracker {forced} cannot be used: {why_not}")
        return Decision(pid, forced, "forced by the user")

    # A process that already uses userfaultfd gets `full` whatever the
    # kernel offers: CRIU cannot checkpoint it with a dirty-page history.
    if facts and (facts.uffd_fds or facts.uffd_vmas):
        return Decision(pid, "full", _process_says("uffd-wp", facts))

    order = PREFERENCE.get(arch, ("uffd-wp", "soft-dirty"))
    skipped = []
    for name in order:
        why_not = _kernel_says(name, caps) or _process_says(name, facts)
        if why_not is None:
            first = (f"{arch} prefers {name}" if not skipped else
                     f"{name}, because " + "; ".join(skipped))
            return Decision(pid, name, first)
        skipped.append(f"not {name}: {why_not}")
    return Decision(pid, "full", "no dirty tracking possible: "
                    + "; ".join(skipped))


def process_facts(pid: int, caps: Capabilities) -> ProcessFacts:
    """Look at a live process.  Stops it briefly (ptrace) only if it has
    a seccomp filter that must be evaluated."""
    fds = tuple(procfs.userfaultfd_fds(pid))
    vmas = len(procfs.uffd_registered_vmas(pid))
    mode = procfs.seccomp_mode(pid)
    verdict = None
    if mode == 1:
        verdict = "kill-thread (strict mode)"
    elif mode == 2 and not fds and not vmas and caps.ptrace_injection:
        verdict = seccomp_uffd_verdict(pid)
    return ProcessFacts(pid, fds, vmas, mode, verdict)


_ACTIONS = {
    0x80000000: "kill-process", 0x00000000: "kill-thread",
    0x00030000: "trap", 0x00050000: "errno", 0x7fc00000: "user-notif",
    0x7ff00000: "trace", 0x7ffc0000: "log", 0x7fff0000: "allow",
}


def seccomp_uffd_verdict(pid: int) -> str:
    from migrator.kernel.inject import Injection
    from migrator.kernel.native import lib
    from migrator.kernel.uffd import USERFAULTFD_FLAGS
    with Injection(pid, timeout=2.0) as inj:
        v = inj.seccomp_verdict(lib.mig_nr_userfaultfd(), USERFAULTFD_FLAGS)
    if v == lib.MIG_SECCOMP_NONE:
        return "allow"
    action = _ACTIONS.get(v & SECCOMP_ACTION_MASK, f"action {v:#x}")
    if action == "errno":
        data = v & 0xFFFF
        name = errno.errorcode.get(data, str(data))
        action = f"errno {name}"
    return action


def make_tracker(decision: Decision, caps: Capabilities) -> Tracker:
    from migrator.tracking.full import FullTracker
    from migrator.tracking.soft_dirty import SoftDirtyTracker
    from migrator.tracking.uffd_wp import UffdWpTracker
    pid = decision.pid
    if decision.tracker == "uffd-wp":
        return UffdWpTracker(pid)
    if decision.tracker == "soft-dirty":
        return SoftDirtyTracker(pid, use_pagemap_scan=caps.pagemap_scan_soft_dirty)
    return FullTracker(pid)
