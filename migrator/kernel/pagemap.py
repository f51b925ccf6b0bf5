"""Page-table queries of another process: PAGEMAP_SCAN and soft-dirty bits.

A ``Pagemap`` owns an open /proc/PID/pagemap fd and a reusable native
result buffer; scans return RangeLists.
"""

from __future__ import annotations

import os
from array import array

from migrator.kernel.native import check, ffi, lib
from migrator.ranges import RangeList

# Runs one native call can return before it is asked to continue.
_BATCH = 1 << 16


class Pagemap:
    def __init__(self, pid: int):
        self.pid = pid
        self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        self._buf = ffi.new("struct mig_range[]", _BATCH)
        self._walk_end = ffi.new("uint64_t *")

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _runs(self, call, what: str, start: int, end: int, *extra) -> array:
        """Drive a native scan over [start, end) until it is complete."""
        flat = array("Q")
        while start < end:
            n = call(self.fd, start, end, self._buf, _BATCH, self._walk_end,
                     *extra)
            check(n, f"{what} of pid {self.pid} [{start:#x}, {end:#x})")
            flat.frombytes(ffi.buffer(self._buf, n * 16))
            nxt = self._walk_end[0]
            if nxt <= start:  # pragma: no cover - the kernel always advances
                raise OSError(0, f"{what}: walk did not advance at {start:#x}")
            start = nxt
        return flat

    def scan_written(self, start: int, end: int) -> array:
        """Pages written since last write-protected, re-protecting them
        (uffd-wp async).  OSError(EPERM) if part of the range is not
        registered for async write-protection."""
        return self._runs(lib.mig_scan_written, "PAGEMAP_SCAN", start, end)

    def scan_unregistered(self, start: int, end: int) -> array:
        """Mapped runs that carry no async write-protect registration."""
        return self._runs(lib.mig_scan_unregistered, "PAGEMAP_SCAN", start, end)

    def scan_soft_dirty(self, start: int, end: int,
                        use_pagemap_scan: bool) -> array:
        if use_pagemap_scan:
            return self._runs(lib.mig_pagemap_runs, "PAGEMAP_SCAN soft-dirty",
                              start, end, 0, lib.PAGE_IS_SOFT_DIRTY, 0)
        return self._runs(lib.mig_softdirty_scan, "pagemap read", start, end)


def scan_supported(pid: int | str = "self") -> bool:
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        return check(lib.mig_pagemap_scan_supported(fd), "PAGEMAP_SCAN probe") == 1
    finally:
        os.close(fd)


def clear_soft_dirty(pid: int) -> None:
    check(lib.mig_softdirty_clear(pid), f"clear_refs of pid {pid}")


def ranges(flat: array) -> RangeList:
    return RangeList.from_sorted_flat(flat)
