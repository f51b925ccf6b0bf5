"""soft-dirty: the kernel's per-page soft-dirty bit (pagemap bit 55).

Writing "4" to /proc/PID/clear_refs clears every bit and write-protects
the pages; the next write sets the bit again.  Mappings created, moved or
grown since the clear carry VM_SOFTDIRTY and read as dirty throughout, so
invariant 2 comes from the kernel here.

Reading the bits and clearing them are two separate operations, and a
write landing between them would be cleared without ever being reported.
So both happen while every thread of the target is stopped (ptrace, the
same attach as for syscall injection, without injecting anything).
"""

from __future__ import annotations

from migrator.kernel.inject import Injection
from migrator.kernel.pagemap import Pagemap, clear_soft_dirty
from migrator.tracking.base import Collect, Tracker, TrackerError
from migrator.tracking.memory import memory_map
from migrator.tracking.scan import concat


class SoftDirtyTracker(Tracker):
    name = "soft-dirty"

    def __init__(self, pid: int, use_pagemap_scan: bool = False,
                 stop_timeout: float = 2.0):
        super().__init__(pid)
        self.use_pagemap_scan = use_pagemap_scan
        self.stop_timeout = stop_timeout
        self._pagemap: Pagemap | None = None

    def start(self) -> Collect:
        self._pagemap = Pagemap(self.pid)
        try:
            clear_soft_dirty(self.pid)
        except OSError as e:
            self.stop()
            raise TrackerError(f"clear_refs of pid {self.pid}: {e}") from e
        self.started = True
        tracked, untracked = memory_map(self.pid)
        return Collect(dirty=tracked, tracked=tracked, untracked=untracked)

    def collect(self, stopped: bool = False) -> Collect:
        if not self.started:
            raise TrackerError("collect() before start()")
        if stopped:
            return self._read_and_clear()
        with Injection(self.pid, timeout=self.stop_timeout):
            return self._read_and_clear()

    def _read_and_clear(self) -> Collect:
        tracked, untracked = memory_map(self.pid)
        parts = [self._pagemap.scan_soft_dirty(s, e, self.use_pagemap_scan)
                 for s, e in tracked]
        clear_soft_dirty(self.pid)
        return Collect(dirty=concat(parts), tracked=tracked,
                       untracked=untracked)

    def stop(self) -> None:
        # Soft-dirty bits are the kernel's bookkeeping, invisible to the
        # process; nothing to undo but our fd.
        pm, self._pagemap = self._pagemap, None
        self.started = False
        if pm:
            pm.close()
