"""The destination's page store: what it holds of one process's memory.

Pages live in one sparse file per process, not in Python objects, so the
store's own memory stays small whatever the process's size.  Address
space is sparse (a 47-bit space, mappings far apart), so the file is not
indexed by address: memory is cut into 2 MiB blocks, and each block that
receives a page gets the next 2 MiB slot of the file.  Per block, one byte
per page says whether the page is held.

Layout: slot k of the file = the block that got slot k; page i of a block
is at slot * BLOCK + i * page_size.
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
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC |
                          os.O_CLOEXEC, 0o600)
        self._slots: dict[int, int] = {}  # block address -> slot
        self._held: dict[int, bytearray] = {}  # block address -> page flags

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        self.close()
        try:
            os.unlink(self.path)
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

    def put(self, addr: int, data) -> None:
        """Store the pages starting at `addr` (data: whole pages)."""
        data = memoryview(data)
        for block, first, n, off in self._pieces(addr, len(data)):
            slot = self._slots.get(block)
            if slot is None:
                slot = self._slots[block] = len(self._slots)
                self._held[block] = bytearray(self.per_block)
            pos = slot * BLOCK + first * self.page_size
            chunk = data[off:off + n * self.page_size]
            written = os.pwrite(self.fd, chunk, pos)
            while written < len(chunk):  # pwrite may be short on huge writes
                written += os.pwrite(self.fd, chunk[written:], pos + written)
            self._held[block][first:first + n] = b"\1" * n

    def get(self, addr: int, npages: int) -> tuple[bytes, RangeList]:
        """The pages [addr, addr + npages pages), zero where not held, and
        the runs that were not held."""
        ps = self.page_size
        out = bytearray(npages * ps)
        missing = []
        for block, first, n, off in self._pieces(addr, npages * ps):
            slot = self._slots.get(block)
            held = self._held.get(block)
            if slot is None:
                missing.append((addr + off, addr + off + n * ps))
                continue
            got = os.preadv(self.fd, [memoryview(out)[off:off + n * ps]],
                            slot * BLOCK + first * ps)
            if got < n * ps:  # beyond the file's end: sparse zeroes
                out[off + got:off + n * ps] = bytes(n * ps - got)
            for i in range(n):
                if not held[first + i]:
                    a = addr + off + i * ps
                    missing.append((a, a + ps))
        return bytes(out), RangeList(missing)

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
        # Blocks that got consecutive slots are consecutive in the file:
        # one copy for all of them.
        spans: list[list[int]] = []          # [file offset, length, out offset]
        for block, first, n, off in self._pieces(addr, npages * ps):
            src = self._slots[block] * BLOCK + first * ps
            if spans and spans[-1][0] + spans[-1][1] == src:
                spans[-1][1] += n * ps
            else:
                spans.append([src, n * ps, out_off + off])
        for src, length, dst in spans:
            _copy_range(self.fd, src, out_fd, dst, length)

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

    def disk_bytes(self) -> int:
        return os.fstat(self.fd).st_blocks * 512
