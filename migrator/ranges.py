"""Sorted, merged sets of half-open address ranges.

Dirty-page reports can hold hundreds of thousands of runs, so a RangeList
keeps them flat in an ``array('Q')`` (start0, end0, start1, end1, ...)
instead of one Python object per run.  Instances are immutable; every
operation returns a new, normalised list (sorted, no empty, overlapping or
touching runs).
"""

from __future__ import annotations

import bisect
from array import array
from typing import Iterable, Iterator

PAGE_SIZE = 4096  # replaced at import time below by the real page size

try:
    import os as _os
    PAGE_SIZE = _os.sysconf("SC_PAGE_SIZE")
except (ValueError, OSError):  # pragma: no cover - every Linux has it
    pass


class RangeList:
    __slots__ = ("_a",)

    def __init__(self, pairs: Iterable[tuple[int, int]] = ()):
        self._a = _normalise(sorted((s, e) for s, e in pairs if e > s))

    @classmethod
    def from_normalised(cls, flat: array) -> "RangeList":
        """Wrap a flat array that is already sorted, merged and without
        empty runs, as the native scans return them (no copy, no checks)."""
        r = cls.__new__(cls)
        r._a = flat
        return r

    @classmethod
    def from_sorted_flat(cls, flat: array) -> "RangeList":
        """From a flat array of sorted, non-overlapping runs (touching runs
        are merged), as the native scans produce."""
        return cls.from_normalised(_merge_touching(flat))

    # -- views ---------------------------------------------------------
    def __iter__(self) -> Iterator[tuple[int, int]]:
        a = self._a
        return ((a[i], a[i + 1]) for i in range(0, len(a), 2))

    def __len__(self) -> int:
        return len(self._a) // 2

    def __bool__(self) -> bool:
        return bool(self._a)

    def __eq__(self, other) -> bool:
        return isinstance(other, RangeList) and self._a == other._a

    def __repr__(self) -> str:
        runs = ", ".join(f"{s:#x}-{e:#x}" for s, e in list(self)[:4])
        more = f", ... {len(self)} runs" if len(self) > 4 else ""
        return f"RangeList([{runs}{more}])"

    @property
    def flat(self) -> array:
        return self._a

    def nbytes(self) -> int:
        a = self._a
        return sum(a[1::2]) - sum(a[0::2])

    def npages(self) -> int:
        return self.nbytes() // PAGE_SIZE

    def contains(self, addr: int) -> bool:
        starts = self._a[0::2]
        i = bisect.bisect_right(starts, addr) - 1
        return i >= 0 and addr < self._a[2 * i + 1]

    def clip(self, start: int, end: int) -> "RangeList":
        """The runs within [start, end), cut at its edges: a binary search
        and a slice, for windows of a large list."""
        a = self._a
        if start >= end:
            return RangeList()
        # The flat array is strictly increasing: an odd insertion point
        # falls inside a run, an even one between runs.
        lo = bisect.bisect_right(a, start)
        lo -= lo & 1
        hi = bisect.bisect_left(a, end)
        hi += hi & 1
        out = a[lo:hi]
        if out:
            out[0] = max(out[0], start)
            out[-1] = min(out[-1], end)
        return RangeList.from_normalised(out)

    def pages(self) -> Iterator[int]:
        """Every page address, in order (for tests and small sets)."""
        for s, e in self:
            yield from range(s, e, PAGE_SIZE)

    # -- set algebra ---------------------------------------------------
    def union(self, other: "RangeList") -> "RangeList":
        return RangeList(list(self) + list(other))

    __or__ = union

    def intersection(self, other: "RangeList") -> "RangeList":
        out = array("Q")
        a, b = list(self), list(other)
        i = j = 0
        while i < len(a) and j < len(b):
            s = max(a[i][0], b[j][0])
            e = min(a[i][1], b[j][1])
            if s < e:
                out.extend((s, e))
            if a[i][1] < b[j][1]:
                i += 1
            else:
                j += 1
        return RangeList.from_normalised(_merge_touching(out))

    __and__ = intersection

    def difference(self, other: "RangeList") -> "RangeList":
        out = array("Q")
        b = list(other)
        j = 0
        for s, e in self:
            while j < len(b) and b[j][1] <= s:
                j += 1
            k = j
            cur = s
            while k < len(b) and b[k][0] < e:
                if b[k][0] > cur:
                    out.extend((cur, b[k][0]))
                cur = max(cur, b[k][1])
                k += 1
            if cur < e:
                out.extend((cur, e))
        return RangeList.from_normalised(out)

    __sub__ = difference


def _normalise(pairs: list[tuple[int, int]]) -> array:
    out = array("Q")
    for s, e in pairs:
        if out and s <= out[-1]:
            if e > out[-1]:
                out[-1] = e
        else:
            out.extend((s, e))
    return out


def _merge_touching(flat: array) -> array:
    if len(flat) <= 2:
        return flat
    out = array("Q", flat[:2])
    for i in range(2, len(flat), 2):
        s, e = flat[i], flat[i + 1]
        if s <= out[-1]:
            if e > out[-1]:
                out[-1] = e
        else:
            out.extend((s, e))
    return out
