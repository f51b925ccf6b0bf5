"""The destination's page store: what it holds of one process's memory.

Pages live in sparse files, not in Python objects, so the store's own
memory stays small whatever the process's size.  Address space is sparse
(a 47-bit space, mappings far apart), so a file is not indexed by address:
memory is cut into 2 MiB blocks, and each block that receives a page gets
the next 2 MiB slot of a file.  Per block, one byte per page says whether
the page is held.

The files are *segments* whose blocks rise in address from slot to slot:
a block lower than the last one of the current segment opens a new
segment.  Each segment is then laid out as CRIU lays out a pages image
(runs in address order, back to back), so the destination hands the
segments to CRIU as they are, as a chain of parent images (levels.py),
instead of copying a gigabyte into a new pages file during the downtime.
The sender sends each round in address order, so a process's store
usually has one segment, plus one per round that found a new mapping
below the highest block seen so far.

Layout: segment k is the file PATH.k; page i of a block in slot j of a
segment is at j * BLOCK + i * page_size.
"""

from __future__ import annotations

import errno
import os

from migrator.ranges import PAGE_SIZE, RangeList

BLOCK = 2 << 20

_copy_file_range = getattr(os, "copy_file_range", None)


def _copy_range(in_fd: int, in_off: int, out_fd: int, out_off: int,
                length: int) -> None:
    """length bytes from in_fd at in_off to out_fd at out_off, in the kernel."""
    global _copy_file_range
    while length > 0:
        n = 0
        if _copy_file_range is not None:
            try:
                n = _copy_file_range(in_fd, out_fd, length, in_off, out_off)
            except OSError as e:
                # EXDEV: another filesystem (kernels >= 5.19 refuse most);
                # ENOSYS/EOPNOTSUPP/EINVAL: not supported here.
                if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP,
                                   errno.EINVAL):
                    raise
                _copy_file_range = None
                continue
        else:
            os.lseek(out_fd, out_off, os.SEEK_SET)
            n = os.sendfile(out_fd, in_fd, in_off, length)
        if n == 0:
            raise OSError(errno.EIO, f"page store ends {length} bytes early "
                                     f"at offset {in_off}")
        in_off += n
        out_off += n
        length -= n


class PageStore:
    def __init__(self, path: str, page_size: int = PAGE_SIZE):
        self.path = path
        self.page_size = page_size
        self.per_block = BLOCK // page_size
        self._fds: list[int] = []                 # segment -> open file
        self._blocks: list[list[int]] = []        # segment -> block per slot
        self._where: dict[int, tuple[int, int]] = {}  # block -> (segment, slot)
        self._held: dict[int, bytearray] = {}     # block -> page flags

    def segment_path(self, k: int) -> str:
        return f"{self.path}.{k}"

    def close(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds = [-1] * len(self._fds)

    def remove(self) -> None:
        self.close()
        for k in range(len(self._fds)):
            try:
                os.unlink(self.segment_path(k))
            except FileNotFoundError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _pieces(self, addr: int, length: int):
        """Split [addr, addr+length) at block boundaries:
        (block address, first page index, page count, offset in input)."""
        ps = self.page_size
        if addr % ps or length % ps:
            raise ValueError(f"unaligned run {addr:#x}+{length:#x}")
        done = 0
        while done < length:
            a = addr + done
            block = a - a % BLOCK
            first = (a - block) // ps
            n = min(self.per_block - first, (length - done) // ps)
            yield block, first, n, done
            done += n * ps

    def _place(self, block: int) -> tuple[int, int]:
        """(segment, slot) of a block seen for the first time."""
        if not self._blocks or block < self._blocks[-1][-1]:
            fd = os.open(self.segment_path(len(self._fds)),
                         os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            self._fds.append(fd)
            self._blocks.append([])
        seg = len(self._blocks) - 1
        self._blocks[seg].append(block)
        self._held[block] = bytearray(self.per_block)
        where = self._where[block] = (seg, len(self._blocks[seg]) - 1)
        return where

    def _at(self, block: int, first: int) -> tuple[int, int]:
        """(file descriptor, offset) of page `first` of a placed block."""
        seg, slot = self._where[block]
        return self._fds[seg], slot * BLOCK + first * self.page_size

    def put(self, addr: int, data) -> None:
        """Store the pages starting at `addr` (data: whole pages)."""
        data = memoryview(data)
        for block, first, n, off in self._pieces(addr, len(data)):
            if block not in self._where:
                self._place(block)
            fd, pos = self._at(block, first)
            chunk = data[off:off + n * self.page_size]
            written = os.pwrite(fd, chunk, pos)
            while written < len(chunk):  # pwrite may be short on huge writes
                written += os.pwrite(fd, chunk[written:], pos + written)
            self._held[block][first:first + n] = b"\1" * n

    def get(self, addr: int, npages: int) -> tuple[bytes, RangeList]:
        """The pages [addr, addr + npages pages), zero where not held, and
        the runs that were not held."""
        ps = self.page_size
        out = bytearray(npages * ps)
        for block, first, n, off in self._pieces(addr, npages * ps):
            if block not in self._where:
                continue
            # Pages of a placed block that were never put are holes of
            # the sparse file, or lie past its end (a short read into the
            # zeroed buffer): either way they read as zeroes.
            fd, pos = self._at(block, first)
            os.preadv(fd, [memoryview(out)[off:off + n * ps]], pos)
        return bytes(out), self.check_held(addr, npages)

    def check_held(self, addr: int, npages: int) -> RangeList:
        """The runs of [addr, addr + npages pages) that are not held
        (empty: all held).  One bytes.count per block, no per-page loop."""
        ps = self.page_size
        missing = []
        for block, first, n, off in self._pieces(addr, npages * ps):
            held = self._held.get(block)
            if held is None:
                missing.append((addr + off, addr + off + n * ps))
                continue
            if held.count(0, first, first + n) == 0:
                continue
            for i in range(first, first + n):   # rare: name the holes
                if not held[i]:
                    a = block + i * ps
                    missing.append((a, a + ps))
        return RangeList(missing)

    def copy_to(self, addr: int, npages: int, out_fd: int, out_off: int) -> None:
        """Write the pages [addr, addr + npages pages) into out_fd at
        out_off, file to file in the kernel (copy_file_range, or sendfile
        across filesystems): no Python copy.  Every page must be held
        (check_held first)."""
        ps = self.page_size
        # Blocks in consecutive slots of a segment are consecutive in its
        # file: one copy for all of them.
        spans: list[list[int]] = []     # [fd, file offset, length, out offset]
        for block, first, n, off in self._pieces(addr, npages * ps):
            fd, src = self._at(block, first)
            last = spans[-1] if spans else None
            if last and last[0] == fd and last[1] + last[2] == src:
                last[2] += n * ps
            else:
                spans.append([fd, src, n * ps, out_off + off])
        for fd, src, length, dst in spans:
            _copy_range(fd, src, out_fd, dst, length)

    def segments(self) -> list[tuple[str, list[int]]]:
        """(file, block address of each slot) per segment, in order; the
        blocks of a segment rise."""
        return [(self.segment_path(k), list(b)) for k, b in enumerate(self._blocks)]

    def segment_runs(self, addr: int, npages: int) -> list[tuple[int, int, int]]:
        """[addr, addr + npages pages) cut where the segment changes:
        (address, pages, segment).  Every page must be held (check_held
        first)."""
        out: list[list[int]] = []
        for block, first, n, off in self._pieces(addr, npages * self.page_size):
            seg = self._where[block][0]
            if out and out[-1][2] == seg:
                out[-1][1] += n
            else:
                out.append([addr + off, n, seg])
        return [tuple(r) for r in out]

    def held(self) -> RangeList:
        ps = self.page_size
        runs = []
        for block, flags in self._held.items():
            i = 0
            while i < self.per_block:
                if flags[i]:
                    j = i
                    while j < self.per_block and flags[j]:
                        j += 1
                    runs.append((block + i * ps, block + j * ps))
                    i = j
                else:
                    i += 1
        return RangeList(runs)

    def state(self) -> dict:
        """What another process needs to read this store (open_state)."""
        return {"path": self.path, "page_size": self.page_size,
                "blocks": self._blocks,
                "held": {b: bytes(f) for b, f in self._held.items()}}

    @classmethod
    def open_state(cls, state: dict) -> "PageStore":
        """A read-only view of a store described by state(), its segment
        files opened by name (they stay readable when unlinked later)."""
        st = cls(state["path"], state["page_size"])
        st._blocks = [list(b) for b in state["blocks"]]
        st._where = {b: (seg, slot) for seg, bl in enumerate(st._blocks)
                     for slot, b in enumerate(bl)}
        st._held = {b: bytearray(f) for b, f in state["held"].items()}
        st._fds = [os.open(st.segment_path(k), os.O_RDONLY | os.O_CLOEXEC)
                   for k in range(len(st._blocks))]
        return st

    def disk_bytes(self) -> int:
        return sum(os.fstat(fd).st_blocks * 512 for fd in self._fds if fd >= 0)
