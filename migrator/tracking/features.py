"""What this kernel can do for dirty tracking, probed by effect, once.

Probes test behaviour, not the acceptance of a call: a kernel without
CONFIG_MEM_SOFT_DIRTY accepts "4" in clear_refs and never sets bit 55, so
soft-dirty is probed by clearing, writing a page and reading the bit back.

MIGRATOR_DISABLE (comma-separated: soft-dirty, uffd-wp, pagemap-scan,
ptrace-injection) forces a capability off, so the fallbacks can be
exercised on a kernel that has everything.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import platform
import subprocess
from dataclasses import asdict, dataclass

from migrator.ranges import PAGE_SIZE

ARCH_NAMES = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64",
              "arm64": "arm64", "ppc64le": "ppc64", "ppc64": "ppc64",
              "s390x": "s390x"}


def arch() -> str:
    m = platform.machine()
    return ARCH_NAMES.get(m, m)


@dataclass(frozen=True)
class Capabilities:
    soft_dirty: bool
    uffd_wp_async: bool
    pagemap_scan: bool
    pagemap_scan_soft_dirty: bool
    ptrace_injection: bool
    why: dict  # capability -> one line of evidence

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("why")
        return d


def _disabled() -> set[str]:
    return {w.strip() for w in os.environ.get("MIGRATOR_DISABLE", "").split(",")
            if w.strip()}


def _page_of(buf: mmap.mmap, i: int) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf, i * PAGE_SIZE))


def probe_soft_dirty() -> tuple[bool, str]:
    from migrator.kernel.pagemap import Pagemap, clear_soft_dirty
    n = 16
    buf = mmap.mmap(-1, n * PAGE_SIZE)
    try:
        for i in range(n):
            buf[i * PAGE_SIZE] = 1  # fault every page in
        base = _page_of(buf, 0)
        try:
            clear_soft_dirty(os.getpid())
        except OSError as e:
            return False, f"clear_refs refused: {e.strerror}"
        written = range(0, n, 2)
        for i in written:
            buf[i * PAGE_SIZE] = 2
        with Pagemap(os.getpid()) as pm:
            flat = pm.scan_soft_dirty(base, base + n * PAGE_SIZE, False)
        from migrator.ranges import RangeList
        found = {(a - base) // PAGE_SIZE
                 for a in RangeList.from_sorted_flat(flat).pages()}
        hit = len(found & set(written))
        if hit == len(written):
            return True, f"bit 55 set on {hit}/{len(written)} written pages"
        return False, (f"clear_refs accepted 4 but bit 55 was set on "
                       f"{hit}/{len(written)} written pages "
                       "(kernel without CONFIG_MEM_SOFT_DIRTY)")
    finally:
        buf.close()


def probe_uffd_wp() -> tuple[bool, str]:
    from migrator.kernel.pagemap import Pagemap
    from migrator.kernel.uffd import Userfaultfd
    try:
        uffd = Userfaultfd.local()
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:
            return False, "userfaultfd lacks UFFD_FEATURE_WP_ASYNC"
        return False, f"userfaultfd(2): {e.strerror}"
    n = 8
    buf = mmap.mmap(-1, n * PAGE_SIZE)
    try:
        base = _page_of(buf, 0)
        with uffd:
            uffd.register_wp(base, base + n * PAGE_SIZE)
            buf[3 * PAGE_SIZE] = 1
            with Pagemap(os.getpid()) as pm:
                flat = pm.scan_written(base, base + n * PAGE_SIZE)
            uffd.unregister(base, base + n * PAGE_SIZE)
        got = list(flat)
        want = [base + 3 * PAGE_SIZE, base + 4 * PAGE_SIZE]
        if got == want:
            return True, "a written page was reported, and only that one"
        return False, f"PAGEMAP_SCAN reported {len(got)//2} runs, expected 1"
    except OSError as e:
        return False, f"uffd-wp: {e}"
    finally:
        buf.close()


def probe_pagemap_scan() -> tuple[bool, str]:
    from migrator.kernel.pagemap import scan_supported
    try:
        ok = scan_supported()
    except OSError as e:
        return False, f"PAGEMAP_SCAN: {e.strerror}"
    return ok, ("PAGEMAP_SCAN ioctl present" if ok else
                "pagemap has no PAGEMAP_SCAN ioctl (kernel before 6.7)")


def probe_pagemap_scan_soft_dirty() -> tuple[bool, str]:
    """PAGE_IS_SOFT_DIRTY as a PAGEMAP_SCAN category (newer than the ioctl)."""
    from migrator.kernel.pagemap import Pagemap
    buf = mmap.mmap(-1, PAGE_SIZE)
    try:
        base = _page_of(buf, 0)
        with Pagemap(os.getpid()) as pm:
            pm.scan_soft_dirty(base, base + PAGE_SIZE, True)
        return True, "PAGEMAP_SCAN knows PAGE_IS_SOFT_DIRTY"
    except OSError as e:
        return False, f"PAGEMAP_SCAN with PAGE_IS_SOFT_DIRTY: {e.strerror}"
    finally:
        buf.close()


def probe_ptrace_injection() -> tuple[bool, str]:
    """Inject getpid() into a short-lived child of ours and check the answer."""
    from migrator.kernel.inject import Injection
    from migrator.kernel.native import lib  # noqa: F401 (build check first)
    child = subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL)
    try:
        with Injection(child.pid, timeout=2.0) as inj:
            got = inj.syscall(_nr_getpid())
        if got == child.pid:
            return True, "getpid() injected into a child returned its pid"
        return False, f"injected getpid() returned {got}, not {child.pid}"
    except OSError as e:
        return False, f"ptrace injection: {e}"
    finally:
        child.kill()
        child.wait()


def _nr_getpid() -> int:
    return {"x86_64": 39, "arm64": 172, "ppc64": 20, "s390x": 20}[arch()]


# capability -> (probe, the MIGRATOR_DISABLE words that turn it off)
_PROBES = {
    "soft_dirty": (probe_soft_dirty, {"soft-dirty"}),
    "uffd_wp_async": (probe_uffd_wp, {"uffd-wp"}),
    "pagemap_scan": (probe_pagemap_scan, {"pagemap-scan"}),
    "pagemap_scan_soft_dirty": (probe_pagemap_scan_soft_dirty,
                                {"pagemap-scan", "soft-dirty"}),
    "ptrace_injection": (probe_ptrace_injection, {"ptrace-injection"}),
}


@functools.cache
def probe() -> Capabilities:
    off = _disabled()
    results = {}
    for name, (fn, words) in _PROBES.items():
        if words & off:
            results[name] = (False, "disabled by MIGRATOR_DISABLE")
            continue
        results[name] = fn()
    if not results["pagemap_scan"][0] and results["uffd_wp_async"][0]:
        results["uffd_wp_async"] = (False, "uffd-wp needs PAGEMAP_SCAN to read")
    return Capabilities(**{k: v[0] for k, v in results.items()},
                        why={k: v[1] for k, v in results.items()})


def kernel_release() -> str:
    return os.uname().release
