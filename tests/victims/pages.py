"""A tracking victim: changes its own memory on command.

Reads one JSON command per line on stdin and answers one JSON line on
stdout, so a test knows exactly which pages were written and when.  Memory
is handled with raw mmap/munmap/mremap/madvise/mprotect through ctypes, so
addresses are real and mappings behave as in any C program.

Commands ({"op": ...}): mmap pages [at] -> addr; write addr pages=[i..] seed;
munmap addr pages; mremap addr old new [fixed_to] -> addr;
dontneed addr pages=[i..]; mprotect addr pages prot ("r"|"rw");
fork -> child (the child sleeps until "reap"); reap; uffd (open a
userfaultfd of our own and keep it); ping -> pid; exit.
"""

import ctypes
import json
import os
import signal
import sys

libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                      ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.mremap.restype = ctypes.c_void_p
libc.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                        ctypes.c_int, ctypes.c_void_p]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
libc.syscall.restype = ctypes.c_long

PAGE = os.sysconf("SC_PAGE_SIZE")
PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x02, 0x10, 0x20
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MADV_DONTNEED = 4
MAP_FAILED = ctypes.c_void_p(-1).value
NR_USERFAULTFD = {"x86_64": 323, "aarch64": 282}[os.uname().machine]

children = []
keep = []


def check(ok, what):
    if not ok:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def handle(cmd):
    op = cmd["op"]
    if op == "ping":
        return {"pid": os.getpid()}
    if op == "mmap":
        # "at": replace whatever is mapped there (MAP_FIXED)
        at = cmd.get("at")
        a = libc.mmap(at, cmd["pages"] * PAGE, PROT_READ | PROT_WRITE,
                      MAP_PRIVATE | MAP_ANONYMOUS | (MAP_FIXED if at else 0),
                      -1, 0)
        check(a != MAP_FAILED, "mmap")
        return {"addr": a}
    if op == "write":
        seed = cmd.get("seed", 1)
        for i in cmd["pages"]:
            word = ctypes.c_uint64((seed * 0x9E3779B97F4A7C15 + i) % 2**64)
            off = (i * 8 + seed * 64) % PAGE
            ctypes.memmove(cmd["addr"] + i * PAGE + off,
                           ctypes.addressof(word), 8)
        return {}
    if op == "munmap":
        check(libc.munmap(cmd["addr"], cmd["pages"] * PAGE) == 0, "munmap")
        return {}
    if op == "mremap":
        if "fixed_to" in cmd:
            a = libc.mremap(cmd["addr"], cmd["old"] * PAGE, cmd["new"] * PAGE,
                            MREMAP_MAYMOVE | MREMAP_FIXED, cmd["fixed_to"])
        else:
            a = libc.mremap(cmd["addr"], cmd["old"] * PAGE, cmd["new"] * PAGE,
                            MREMAP_MAYMOVE, None)
        check(a != MAP_FAILED, "mremap")
        return {"addr": a}
    if op == "dontneed":
        for i in cmd["pages"]:
            check(libc.madvise(cmd["addr"] + i * PAGE, PAGE, MADV_DONTNEED) == 0,
                  "madvise")
        return {}
    if op == "mprotect":
        prot = PROT_READ | (PROT_WRITE if cmd["prot"] == "rw" else 0)
        check(libc.mprotect(cmd["addr"], cmd["pages"] * PAGE, prot) == 0,
              "mprotect")
        return {}
    if op == "fork":
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(w)
            for _, other in children:  # else a sibling keeps its pipe open
                os.close(other)
            os.read(r, 1)  # until the parent reaps us
            os._exit(0)
        os.close(r)
        children.append((pid, w))
        return {"child": pid}
    if op == "reap":
        for pid, w in children:
            os.close(w)
            os.waitpid(pid, 0)
        children.clear()
        return {}
    if op == "uffd":
        fd = libc.syscall(NR_USERFAULTFD, os.O_CLOEXEC | os.O_NONBLOCK | 1)
        check(fd >= 0, "userfaultfd")
        keep.append(fd)
        return {"fd": fd}
    if op == "exit":
        handle({"op": "reap"})
        sys.stdout.write("{}\n")
        sys.stdout.flush()
        os._exit(0)
    raise ValueError(f"unknown op {op!r}")


def main():
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.stdout.write(json.dumps({"pid": os.getpid()}) + "\n")
    sys.stdout.flush()
    for line in sys.stdin:
        try:
            reply = handle(json.loads(line))
        except OSError as e:
            reply = {"error": str(e)}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    handle({"op": "reap"})


if __name__ == "__main__":
    main()
