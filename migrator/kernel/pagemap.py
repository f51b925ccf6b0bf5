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

    def _runs_many(self, call, what: str, ranges: RangeList
                   ) -> tuple[array, list[tuple[int, int, OSError]]]:
        """Drive a native many-range scan over `ranges`; the ranges it
        failed on are returned with their error, not raised."""
        flat = array("Q")
        failed = []
        n_in = len(ranges)
        src = ffi.from_buffer("struct mig_range[]", ranges.flat)
        next_in = ffi.new("size_t *", 0)
        self._walk_end[0] = 0
        while next_in[0] < n_in:
            n = call(self.fd, src, n_in, self._buf, _BATCH, next_in,
                     self._walk_end)
            if n < 0:
                i = next_in[0]
                s, e = ranges.flat[2 * i], ranges.flat[2 * i + 1]
                failed.append((s, e, OSError(-n, f"{what} of pid {self.pid} "
                                                  f"[{s:#x}, {e:#x}): "
                                                  f"{os.strerror(-n)}")))
                next_in[0] = i + 1
                self._walk_end[0] = 0
                continue
            if n and flat and flat[-1] == self._buf[0].start:
                flat[-1] = self._buf[0].end  # a run continued across calls
                flat.frombytes(ffi.buffer(self._buf + 1, (n - 1) * 16))
            else:
                flat.frombytes(ffi.buffer(self._buf, n * 16))
        return flat, failed

    def scan_written_ranges(self, ranges: RangeList):
        """scan_written over every run of `ranges` in one native call;
        returns (written runs, [(start, end, OSError) of failed runs])."""
        return self._runs_many(lib.mig_scan_written_ranges, "PAGEMAP_SCAN",
                               ranges)

    def scan_unregistered_ranges(self, ranges: RangeList):
        return self._runs_many(lib.mig_scan_unregistered_ranges,
                               "PAGEMAP_SCAN", ranges)

    def scan_written(self, start: int, end: int) -> array:
        """Pages written since last write-protected, re-protecting them
        (uffd-wp async).  OSError(EPERM) if part of the range is not
        registered for async write-protection."""
        return self._runs(lib.mig_scan_written, "PAGEMAP_SCAN", start, end)

    def scan_present(self, start: int, end: int) -> array:
        """Runs of pages present in memory."""
        return self._runs(lib.mig_scan_present, "PAGEMAP_SCAN", start, end)

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
