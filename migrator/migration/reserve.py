"""Memory the destination holds ready for the restore.

CRIU's restore writes the tree's whole memory into new anonymous pages,
inside the downtime, and how long that takes depends on the memory it
gets: on these machines CRIU restored 1 GiB in 3.1-4.0 s from memory that
had stayed free for seconds, and in 0.8-1.8 s right after a process had
freed as much.  Our reading, not proven: these VMs hand memory that stays
free back to their hypervisor (virtio-balloon free page reporting, as
Firecracker, cloud-hypervisor and QEMU offer), which then costs a
hypervisor fault per page when touched again; memory freed a moment ago
has not been handed back yet.  A bare-metal node should gain little.

So while pre-copy runs, a helper process faults in anonymous memory as
large as the page stores (what the restore will write), following them as
rounds add pages.  During the first round it grows at most PACE bytes a
second: that round moves the bulk and may need every CPU there is, and a
helper growing at full speed beside it halved its throughput on these
machines (`benchmarks/migration.py` part 1, half-zero data, zstd 1: 278
MiB/s against 576 MiB/s without; SCHED_IDLE did not prevent it, perhaps
because a vCPU stalled in the hypervisor's fault runs nothing else).
Over a link slow enough for pre-copy to matter the first round lasts long
enough to be covered at that pace; after it, later rounds are small and
the helper grows at full speed.  When CRIU starts,
the helper hands it over: it unmaps it a little at a time, keeping the
node's free memory just ahead of what the restore has taken, so that the
restore's page faults get pages freed a moment before, and the
hypervisor's reporting (which walks what stays free) finds little to take.
The destination ends the helper once CRIU is done.

The helper is a process, not a thread, so that it can run under
SCHED_IDLE (it takes only CPU time the receiver leaves) without ever
holding the receiver's GIL.  It never takes memory the node cannot spare:
it stops where MemAvailable would fall below a floor, or its cgroup (or an
ancestor) would come near memory.max, and it faults memory in with
MADV_POPULATE_WRITE, which fails with ENOMEM where a plain write would
wake the OOM killer.  It is only an optimization: what it did not hold,
the restore faults in as it always would.  It exits when its standard
input closes, so it never outlives the receiver.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import select
import subprocess
import sys
import time
from typing import Callable, Optional

log = logging.getLogger("migrator.reserve")

STEP = 8 << 20           # faulted in per call; ~25 ms of fresh memory here
POLL = 0.05              # seconds between looks at the stores' size
SHORT_WAIT = 1.0         # seconds before trying again when memory is short
MIN_FREE = 256 << 20     # MemAvailable kept at least this ...
FREE_FRACTION = 16       # ... and at least MemTotal / this
CGROUP_MARGIN = 64 << 20  # kept below each memory.max on the way up
PACE = 64 << 20          # bytes per second during the first round
AHEAD = 64 << 20         # free memory kept ahead of the restore's faults
HAND_OVER_POLL = 0.002   # seconds between looks at MemFree while handing over
MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14
CGROUP_ROOT = "/sys/fs/cgroup"


def store_bytes(store_dir: str) -> int:
    """Bytes the page stores in store_dir occupy (what the restore writes)."""
    total = 0
    try:
        with os.scandir(store_dir) as it:
            for e in it:
                try:
                    total += e.stat(follow_symlinks=False).st_blocks * 512
                except FileNotFoundError:
                    pass
    except FileNotFoundError:
        pass
    return total


def _meminfo() -> dict[str, int]:
    out = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            out[key] = int(rest.split()[0]) * 1024
    return out


def _cgroup_spare(root: str = CGROUP_ROOT,
                  membership: str = "/proc/self/cgroup") -> Optional[int]:
    """Bytes this process's cgroup v2 and its ancestors can still take
    before the tightest memory.max (less a margin); None: no limit seen."""
    try:
        with open(membership) as f:
            path = next((ln.split("::", 1)[1].strip() for ln in f
                         if ln.startswith("0::")), None)
    except OSError:
        return None
    if path is None:
        return None
    spare = None
    d = os.path.normpath(os.path.join(root, path.lstrip("/")))
    while d.startswith(root):
        try:
            with open(os.path.join(d, "memory.max")) as f:
                limit = f.read().strip()
            if limit != "max":
                with open(os.path.join(d, "memory.current")) as f:
                    used = int(f.read())
                left = int(limit) - used - CGROUP_MARGIN
                spare = left if spare is None else min(spare, left)
        except (OSError, ValueError):
            pass
        if d == root:
            break
        d = os.path.dirname(d)
    return spare


def spare_bytes() -> int:
    """Memory that can be taken without crowding the node or a cgroup."""
    info = _meminfo()
    floor = max(MIN_FREE, info.get("MemTotal", 0) // FREE_FRACTION)
    spare = info.get("MemAvailable", info.get("MemFree", 0)) - floor
    cg = _cgroup_spare()
    return spare if cg is None else min(spare, cg)


def _priority(policy: str) -> None:
    try:
        os.sched_setscheduler(0, getattr(os, policy), os.sched_param(0))
    except (AttributeError, OSError):
        pass  # left as it was: only how fast the reserve grows or goes


def _fault_in(m: mmap.mmap) -> None:
    try:
        m.madvise(MADV_POPULATE_WRITE)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        m.write(bytes(len(m)))  # kernels before 5.14: write each page


def hold(need: Callable[[], int], spare: Callable[[], int] = spare_bytes,
         done: Callable[[float], bool] = lambda t: (time.sleep(t), False)[1],
         step: int = STEP, held: Optional[list[mmap.mmap]] = None,
         pace: Optional[int] = None) -> list[mmap.mmap]:
    """Fault in memory, `step` bytes per mapping added to `held`, until
    need() is covered, and keep following need(), while spare() allows and
    at most `pace` bytes a second (None: no limit); done(timeout) waits up
    to timeout and says whether to stop.  Returns the mappings held."""
    held = [] if held is None else held
    short = ""   # why it last stopped short, said once
    start, grown = time.monotonic(), 0

    def stopped_short(why: str) -> bool:
        nonlocal short
        if why != short:
            log.warning("memory held for the restore stops at %d MiB: %s",
                        len(held) * step >> 20, why)
            short = why
        return done(SHORT_WAIT)

    while True:
        if need() - len(held) * step < step:
            if done(POLL):
                return held
            continue
        if spare() < step:
            if stopped_short("the node has no more to spare"):
                return held
            continue
        if pace and grown >= pace * (time.monotonic() - start):
            if done(step / pace):
                return held
            continue
        if done(0):
            return held
        m = mmap.mmap(-1, step, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        try:
            _fault_in(m)
        except OSError as e:
            m.close()
            if e.errno not in (errno.ENOMEM, errno.EAGAIN):
                raise
            if stopped_short(os.strerror(e.errno)):
                return held
            continue
        short = ""
        held.append(m)
        grown += step


def hand_over(held: list[mmap.mmap], free: Callable[[], int],
              ahead: int = AHEAD, wait: Callable[[float], object] = time.sleep) -> None:
    """Unmap `held` one mapping at a time, whenever free() has fallen
    below where it started plus `ahead`, until none is left."""
    base = free()
    while held:
        if free() < base + ahead:
            held.pop().close()
        else:
            wait(HAND_OVER_POLL)


# What the receiver writes to the helper's stdin: FULL_SPEED when the
# first round is in, HAND_OVER when the restore starts, which the helper
# answers with one line, the bytes it held.
FULL_SPEED = b"f"
HAND_OVER = b"h"
# The helper answers between two steps; one that does not (starved of CPU
# under SCHED_IDLE on a busy node) is ended instead, freeing everything at
# once, rather than the downtime waiting on it.
ANSWER_TIMEOUT = 0.25


class Reserve:
    """The helper process, seen from the receiver: started with the
    migration, told when the first round is in and when the restore
    starts, ended when it is done."""

    def __init__(self, store_dir: str):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "migrator.migration.reserve", store_dir],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.paced = True

    def full_speed(self) -> None:
        """The first round is in: grow without a pace from now on."""
        if not self.paced:
            return
        self.paced = False
        self._tell(FULL_SPEED)

    def hand_over(self) -> int:
        """The restore starts: the helper stops growing and frees its
        memory as the restore takes memory.  Returns the bytes it held
        (0 if it does not answer in time: then it is ended)."""
        if not self._tell(HAND_OVER):
            return 0
        out = self.proc.stdout
        if not select.select([out], [], [], ANSWER_TIMEOUT)[0]:
            log.warning("the memory reserve did not answer in %.2f s; ended",
                        ANSWER_TIMEOUT)
            self.release()
            return 0
        try:
            return int(out.readline())
        except ValueError:
            return 0

    def _tell(self, what: bytes) -> bool:
        """Write one command to the helper; False if it is gone (and its
        memory with it: the restore goes without)."""
        try:
            self.proc.stdin.write(what)
            self.proc.stdin.flush()
        except OSError:
            return False
        return True

    def release(self) -> None:
        """End the helper; its memory is free when this returns.
        Idempotent."""
        if self.proc.returncode is None:
            self.proc.kill()     # its memory is freed before it becomes a zombie
            self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


def _main(store_dir: str) -> int:
    logging.basicConfig(level=logging.INFO, format="migrator reserve: %(message)s")
    _priority("SCHED_IDLE")
    stdin = sys.stdin.buffer

    def done(timeout: float) -> bool:
        # readable: the restore starts (HAND_OVER), or the receiver is gone
        return bool(select.select([stdin], [], [], timeout)[0])

    held: list[mmap.mmap] = []
    pace: Optional[int] = PACE
    while True:
        hold(lambda: store_bytes(store_dir), done=done, held=held, pace=pace)
        cmd = os.read(stdin.fileno(), 1)
        if cmd != FULL_SPEED:
            break
        pace = None
    if cmd != HAND_OVER:
        return 0
    print(len(held) * STEP, flush=True)
    _priority("SCHED_OTHER")  # the restore waits on it now
    hand_over(held, lambda: _meminfo()["MemFree"])
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1]))
