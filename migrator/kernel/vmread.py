"""Reading another process's pages in batches (process_vm_readv)."""

from __future__ import annotations

from migrator.kernel.native import check, ffi, lib
from migrator.ranges import RangeList


def read_ranges(pid: int, ranges: RangeList, out: bytearray | None = None
                ) -> tuple[memoryview, RangeList]:
    """Contents of `ranges` back to back, and the runs that vanished
    meanwhile (zero-filled in the result)."""
    n = len(ranges)
    total = ranges.nbytes()
    if out is None or len(out) < total:
        out = bytearray(total)
    src = ffi.from_buffer("struct mig_range[]", ranges.flat)
    missing = ffi.new("struct mig_range[]", max(n, 1) + 64)
    n_missing = ffi.new("size_t *")
    check(lib.mig_vm_read(pid, src, n, ffi.from_buffer(out), missing,
                          n + 64, n_missing),
          f"process_vm_readv of pid {pid}")
    gone = RangeList((missing[i].start, missing[i].end)
                     for i in range(n_missing[0]))
    return memoryview(out)[:total], gone
