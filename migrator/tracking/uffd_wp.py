"""uffd-wp: userfaultfd write-protection in async mode, read with PAGEMAP_SCAN.

The target creates the userfaultfd itself (it is bound to the creator's
memory), by syscall injection; we keep the only copy.  Every trackable
range is registered with UFFDIO_REGISTER_MODE_WP and write-protected.  A
write then clears the page's protection bit in the page table without any
fault reaching us (WP_ASYNC), and PAGEMAP_SCAN with PM_SCAN_WP_MATCHING
reports the written pages and protects them again, atomically per page.

Memory that was not registered continuously since the previous collect is
reported whole (invariant 2): a new mapping, a moved one (mremap drops the
registration), a grown one, and any range PAGEMAP_SCAN refuses with EPERM
(PM_SCAN_CHECK_WPASYNC: something there is no longer registered).
"""

from __future__ import annotations

import errno
import os

from migrator import faults
from migrator.kernel.inject import Injection
from migrator.kernel.pagemap import Pagemap
from migrator.kernel.uffd import Userfaultfd
from migrator.ranges import RangeList
from migrator.tracking.base import Collect, Tracker, TrackerError
from migrator.kernel.procfs import read_maps_text
from migrator.tracking.memory import split_maps, trackable_vmas


# What UFFDIO_REGISTER (ENOMEM) and UFFDIO_WRITEPROTECT (ENOENT) say when
# the range is no longer mapped: the process unmapped it meanwhile.
_VANISHED = (errno.ENOMEM, errno.ENOENT)


class UffdWpTracker(Tracker):
    name = "uffd-wp"

    def __init__(self, pid: int, inject_timeout: float = 2.0):
        super().__init__(pid)
        self.inject_timeout = inject_timeout
        self._uffd: Userfaultfd | None = None
        self._pagemap: Pagemap | None = None
        self._registered = RangeList()
        # Mappings the kernel would not register: untracked, not retried.
        self._refused = RangeList()
        # The last /proc/PID/maps seen, and what it meant: most rounds the
        # mappings do not change, and parsing them is a third of a collect.
        self._maps_text = ""
        self._maps = ([], RangeList(), RangeList())

    def start(self) -> Collect:
        pidfd = os.pidfd_open(self.pid)
        try:
            with Injection(self.pid, timeout=self.inject_timeout) as inj:
                self._uffd = Userfaultfd.take_from(inj, pidfd)
        except OSError as e:
            raise TrackerError(
                f"cannot create a userfaultfd inside pid {self.pid}: {e}"
            ) from e
        finally:
            os.close(pidfd)
        try:
            if not self._uffd.wp_async:
                raise TrackerError("kernel lacks UFFD_FEATURE_WP_ASYNC")
            self._pagemap = Pagemap(self.pid)
            self.started = True
            vmas, untracked = trackable_vmas(self.pid)
            tracked = RangeList(vmas)
            notes = self._register(vmas, tracked)
            return Collect(dirty=tracked, tracked=self._registered,
                           untracked=untracked | (tracked - self._registered),
                           notes=notes)
        except BaseException:
            self.stop()
            raise

    def _register(self, vmas: list[tuple[int, int]],
                  ranges: RangeList) -> tuple[str, ...]:
        """Register the parts of `ranges` we can, mapping by mapping; a
        mapping the kernel refuses (e.g. glibc's MAP_DROPPABLE getrandom
        page) stays untracked, to cross at switch-over, with a note.  A
        mapping unmapped since /proc/PID/maps was read is skipped: if
        something is mapped there at the next collect, it is fresh memory
        and is registered then."""
        notes = []
        for s, e in _split(ranges, vmas):
            try:
                self._uffd.register_wp(s, e)
                # recorded at once, so that stop() undoes it on any failure
                self._registered = self._registered | RangeList([(s, e)])
                faults.check("uffd-register")
            except OSError as err:
                if err.errno in _VANISHED:
                    continue
                if err.errno in (errno.EINVAL, errno.EPERM):
                    notes.append(f"untracked [{s:#x}, {e:#x}): {err.strerror}")
                    self._refused = self._refused | RangeList([(s, e)])
                    continue
                raise
        return tuple(notes)

    def collect(self, stopped: bool = False) -> Collect:
        if not self.started:
            raise TrackerError("collect() before start()")
        text = read_maps_text(self.pid)
        if text == self._maps_text:
            # Same mappings as last time: no parsing.  A mapping replaced in
            # place by one of the same shape is still caught below, as lost
            # registration.
            vmas, untracked, tracked = self._maps
        else:
            vmas, untracked = split_maps(text)
            tracked = RangeList(vmas)
            # Registrations of memory that is gone or no longer trackable.
            self._registered = self._registered & tracked
            self._refused = self._refused & tracked
            self._maps_text, self._maps = text, (vmas, untracked, tracked)
        # New mappings, and any that vanished while being registered last
        # time and are back.
        fresh = tracked - self._registered - self._refused
        # Memory that lost its registration while keeping its place
        # (munmap + mmap over it, MAP_FIXED) is new memory too.
        flat, failed = self._pagemap.scan_unregistered_ranges(self._registered)
        for *_, err in failed:
            raise err
        lost = RangeList.from_normalised(flat)
        if lost:
            self._registered = self._registered - lost
        flat, failed = self._pagemap.scan_written_ranges(self._registered)
        faults.check("uffd-collect")
        for s, e, err in failed:
            if err.errno != errno.EPERM:
                raise err
        if failed:
            # Lost its registration after the check above: the pages this
            # scan had already re-protected were not returned to us, so the
            # whole run must count as written.
            lost = lost | RangeList((s, e) for s, e, _ in failed)
            self._registered = self._registered - lost
        written = RangeList.from_normalised(flat)
        notes = self._register(vmas, fresh | lost) if fresh or lost else ()
        dirty = written
        if fresh or lost:
            dirty = dirty | fresh | lost
        return Collect(dirty=dirty, tracked=self._registered,
                       untracked=untracked | (tracked - self._registered),
                       notes=notes)

    def before_checkpoint(self) -> None:
        # Markers on never-touched pages look like swapped pages to CRIU,
        # which would dump (and restore) them as real zero pages.
        if self._uffd is None:
            return
        dropped = sum(self._uffd.drop_markers(self._pagemap.fd, s, e)
                      for s, e in self._registered)
        self.markers_dropped = dropped

    def stop(self) -> None:
        uffd, self._uffd = self._uffd, None
        pm, self._pagemap = self._pagemap, None
        self.started = False
        if pm:
            pm.close()
        if uffd is None:
            return
        try:
            # Unregistering clears the write-protection bits now; closing
            # the fd alone would leave them until the kernel's release.
            for s, e in self._registered:
                try:
                    uffd.unregister(s, e)
                except OSError:
                    pass  # the process or the mapping is gone
        finally:
            self._registered = RangeList()
            uffd.close()


def _split(ranges: RangeList, vmas: list[tuple[int, int]]):
    """The pieces of `ranges` cut at mapping boundaries, in order."""
    i = 0
    for s, e in ranges:
        while i < len(vmas) and vmas[i][1] <= s:
            i += 1
        j = i
        while j < len(vmas) and vmas[j][0] < e:
            lo, hi = max(s, vmas[j][0]), min(e, vmas[j][1])
            if lo < hi:
                yield lo, hi
            j += 1
