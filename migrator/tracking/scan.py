"""Joining the per-range results of native scans."""

from __future__ import annotations

from array import array

from migrator.ranges import RangeList


def concat(parts: list[array]) -> RangeList:
    """Sorted, non-overlapping flat runs per part, parts in address order:
    join them, merging only where one part ends where the next begins."""
    out = array("Q")
    for p in parts:
        if not p:
            continue
        if out and out[-1] == p[0]:
            out[-1] = p[1]
            out.extend(p[2:])
        else:
            out.extend(p)
    return RangeList.from_normalised(out)
