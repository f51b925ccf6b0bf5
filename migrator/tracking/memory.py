"""Which memory of a process a tracker follows.

Trackable memory is what CRIU dumps as the process's own pages: private
mappings, anonymous or file-backed, except the kernel's special ones
([vdso], [vvar], ...).  Shared mappings are "untracked": their pages are
not the process's alone, CRIU carries shared memory separately, and no
tracker here can vouch for them, so they cross in the frozen final step.
"""

from __future__ import annotations

from migrator.kernel.procfs import Vma, parse_maps, read_maps_text
from migrator.ranges import RangeList


def is_trackable(vma: Vma) -> bool:
    return vma.private and not vma.special


def memory_map(pid: int) -> tuple[RangeList, RangeList]:
    """(trackable, untracked) memory of `pid` right now."""
    vmas, untracked = trackable_vmas(pid)
    return RangeList(vmas), untracked


def trackable_vmas(pid: int) -> tuple[list[tuple[int, int]], RangeList]:
    """The trackable mappings one by one (neighbours are not merged, so a
    mapping the kernel refuses to register costs only itself), and the
    untracked memory."""
    return split_maps(read_maps_text(pid))


def split_maps(maps_text: str) -> tuple[list[tuple[int, int]], RangeList]:
    """trackable_vmas() of an already read /proc/PID/maps text."""
    vmas, untracked = [], []
    for v in parse_maps(maps_text):
        if v.special:
            continue
        if is_trackable(v):
            vmas.append((v.start, v.end))
        else:
            untracked.append((v.start, v.end))
    return vmas, RangeList(untracked)
