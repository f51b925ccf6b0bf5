"""A self-verifying workload for checkpoint/restore tests.

It keeps a counter and a buffer in memory whose content is a pure function
of the counter, so the process can check at any moment that its memory is
intact.  Every step it rewrites part of the buffer, bumps the counter and
verifies the whole buffer against a checksum it carries.  Progress goes to
a file (one line per tick: "<tick> <pid> <ok|BAD ...>"), always appended,
so a test sees the numbers continue across a checkpoint and restore.

    python3 counter.py PROGRESS_FILE [MIB] [INTERVAL_S] [private|shared|churn]

"shared" keeps the buffer in an anonymous MAP_SHARED mapping (shared
memory, which CRIU dumps apart from private pages) instead of a bytearray.
"churn" adds a thread that maps, writes and unmaps small mappings all the
time, as allocators do: the mappings change under every collect.

Standard library only: it runs with the node image's python3, and inside a
busybox container only as a shell variant (see counter.sh).
"""

import hashlib
import mmap
import os
import sys
import threading
import time

PAGE = 4096


def fill(buf: bytearray, page: int, value: int) -> None:
    # Page content depends on (page, value), so corruption or a lost write
    # shows as a checksum mismatch.
    word = ((page * 2654435761 + value) & 0xFFFFFFFF).to_bytes(4, "little")
    buf[page * PAGE:(page + 1) * PAGE] = word * (PAGE // 4)


def churn() -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                          ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = 16 * PAGE
    while True:
        addr = libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE,
                         mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        ctypes.memset(addr, 7, size)
        # one page read-only: three mappings where there was one
        libc.mprotect(addr + PAGE, PAGE, mmap.PROT_READ)
        time.sleep(0.0005)  # mapped long enough to be seen, then gone
        libc.munmap(addr, size)


def main() -> int:
    path = sys.argv[1]
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    interval = float(sys.argv[3]) if len(sys.argv) > 3 else 0.1
    pages = mib * 256
    memory = sys.argv[4] if len(sys.argv) > 4 else "private"
    shared = memory == "shared"
    if memory == "churn":
        threading.Thread(target=churn, daemon=True).start()
    buf = mmap.mmap(-1, pages * PAGE, flags=mmap.MAP_SHARED) if shared \
        else bytearray(pages * PAGE)
    values = [0] * pages  # what each page should hold
    for p in range(pages):
        fill(buf, p, 0)
    tick = 0
    start_pid = os.getpid()
    while True:
        tick += 1
        # Touch a moving window of pages: some memory changes every tick.
        for k in range(16):
            p = (tick * 16 + k) % pages
            values[p] = tick
            fill(buf, p, tick)
        expected = hashlib.sha256()
        for p in range(pages):
            w = ((p * 2654435761 + values[p]) & 0xFFFFFFFF).to_bytes(4, "little")
            expected.update(w * (PAGE // 4))
        ok = hashlib.sha256(buf).digest() == expected.digest()
        status = "ok" if ok else "BAD checksum"
        # Reopen each time: after a restore the same fd is restored anyway,
        # but reopening also proves the file system view is consistent.
        with open(path, "a") as f:
            f.write(f"{tick} {os.getpid()} {start_pid} {status}\n")
        if not ok:
            return 1
        time.sleep(interval)


if __name__ == "__main__":
    sys.exit(main())
