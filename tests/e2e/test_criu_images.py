"""migrator.criu and the destination's image preparation against the
real CRIU of the test-bed nodes.

A workload fills an anonymous mapping with a known pattern and then checks
it every tick.  It is dumped on node A with the runner (left stopped); the
pagemap must cover the pattern and CRIU's pages file must hold it; the
stopped process's memory (read with process_vm_readv) goes into a page
store, and levels.prepare rewrites the dump to read its pages from that
store through parent images; node B restores that, stopped, and resumes
it; the workload keeps verifying its memory.  The second test dumps a
process whose memory migrator's tracker has registered for uffd-wp.
"""

import json
import os
import struct
import time

import pytest

from tests.beds.waiting import wait_for

from migrator.criu import images
from migrator.ranges import RangeList

pytestmark = pytest.mark.e2e

MIB = 8
SEED = 0x5EED0000CAFE0000

# The workload: an anonymous mapping whose every page holds its own
# address xor SEED; it writes "<addr> <size>" to INFO, then one line per
# tick "<tick> <pid> ok|BAD" to PROGRESS (opened and closed each time, so
# no file is open when CRIU dumps it).
WORKLOAD = r"""
import ctypes, mmap, os, sys, time
progress, info, mib, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4], 0)
PAGE = mmap.PAGESIZE
size = mib << 20
buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
expect = b"".join(((addr + i * PAGE) ^ seed).to_bytes(8, "little") * (PAGE // 8)
                  for i in range(size // PAGE))
buf[:] = expect
with open(info, "w") as f:
    f.write(f"{addr} {size}\n")
tick = 0
while True:
    tick += 1
    ok = "ok" if buf[:] == expect else "BAD"
    with open(progress, "a") as f:
        f.write(f"{tick} {os.getpid()} {ok}\n")
    time.sleep(0.05)
"""

# Runs in node A: dump PID into ROOT/images with the runner (left
# stopped), keep a copy of CRIU's dump, read the dumped runs from the
# stopped process with process_vm_readv into a page store in an order that
# makes exactly three segments, and let levels.prepare (at most two levels) turn
# the dump into one that reads its pages from the store: two segments as
# parent levels, the third copied into the dump's own pages image.
DUMP_AND_PREPARE = r"""
import json, os, shutil, sys
from migrator.criu import images, runner
from migrator.kernel.vmread import read_ranges
from migrator.migration import levels
from migrator.migration.store import PageStore
from migrator.ranges import RangeList
pid, root = int(sys.argv[1]), sys.argv[2]
d = os.path.join(root, "images")
PAGE = os.sysconf("SC_PAGE_SIZE")
log = runner.dump(pid, d, leave_stopped=True)
with open(f"/proc/{pid}/stat") as f:
    state = f.read().rsplit(")", 1)[1].split()[0]
shutil.copytree(d, d + ".criu")
runs = images.dumped_runs(images.read_pagemap(d, pid))
ranges = RangeList((v, v + n * PAGE) for v, n in runs)
mem, gone = read_ranges(pid, ranges)
# Cut the address space at two 2 MiB block boundaries into three parts
# that share no block; put the top part, then the middle, then the bottom:
# each starts below the last, so each opens a segment.
BLOCK = 2 << 20
blocks = sorted({a - a % BLOCK for s, e in ranges for a in range(s - s % BLOCK, e, BLOCK)})
cut1, cut2 = blocks[len(blocks) // 3], blocks[2 * len(blocks) // 3]
parts, off = [[], [], []], 0
for s, e in ranges:
    for k, (lo, hi) in enumerate(((cut2, 1 << 64), (cut1, cut2), (0, cut1))):
        a, b = max(s, lo), min(e, hi)
        if a < b:
            parts[k].append((a, mem[off + a - s:off + b - s]))
    off += e - s
store = PageStore(os.path.join(root, "store"))
for part in parts:
    for addr, data in part:
        store.put(addr, data)
levels.MAX_LEVELS = 2
prep = levels.prepare(d, {pid: store})
store.close()
print(json.dumps({"state": state, "gone": list(gone), "runs": len(runs),
                  "pages": sum(n for _, n in runs), "segments": len(store.segments()),
                  "levels": prep.levels, "parent_pages": prep.parent_pages,
                  "copied_pages": prep.copied_pages}))
"""

# Runs in node B: restore DIR stopped, print the root pid and its state.
RESTORE = r"""
import json, sys
from migrator.criu import runner
pid = runner.restore(sys.argv[1], detached=True, leave_stopped=True)
with open(f"/proc/{pid}/stat") as f:
    state = f.read().rsplit(")", 1)[1].split()[0]
with open(f"/proc/{pid}/smaps") as f:
    flags = sorted({fl for line in f if line.startswith("VmFlags:")
                    for fl in line.split()[1:]})
print(json.dumps({"pid": pid, "state": state, "vmflags": flags}))
"""

RESUME = r"""
import sys
from migrator.criu import runner
print(runner.resume(int(sys.argv[1])))
"""

# Runs in node A for the life of the uffd-wp scenario: start migrator's
# tracker on PID, say "ready", wait for the test to say "dumped", collect
# while the process is stopped, stop the tracker, report.
TRACKER = r"""
import json, os, sys, time
from migrator.kernel import procfs
from migrator.tracking.uffd_wp import UffdWpTracker
pid, ctl = int(sys.argv[1]), sys.argv[2]
def state():
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
def uffd_vmas():
    return [[s, e, sorted(fl)] for s, e, fl in procfs.uffd_registered_vmas(pid)]
t = UffdWpTracker(pid)
first = t.start()
out = {"registered_at_start": len(uffd_vmas()), "tracked_pages": first.tracked.npages()}
open(os.path.join(ctl, "ready"), "w").close()
while not os.path.exists(os.path.join(ctl, "dumped")):
    time.sleep(0.02)
out["state_after_dump"] = state()
out["registered_after_dump"] = len(uffd_vmas())
c1 = t.collect()
c2 = t.collect()  # stopped: nothing can have been written since c1
out["collect_while_stopped"] = c1.dirty.npages()
# Pages of tracked (registered) memory written while stopped: must be none.
out["second_collect"] = (c2.dirty & c1.tracked).npages()
# What the tracker could not register is reported dirty every round.
out["second_untracked_dirty"] = c2.dirty.difference(c1.tracked).npages()
out["start_notes"] = list(first.notes)
out["collect_notes"] = list(c2.notes)
out["state_after_collect"] = state()
t.stop()
out["registered_after_stop"] = uffd_vmas()
with open(os.path.join(ctl, "result.json"), "w") as f:
    json.dump(out, f)
"""




def _progress(node, path):
    out = node.run(["cat", path], check=False).stdout
    return [line.split() for line in out.splitlines() if line.strip()]


def _py(node, code, *args, timeout=120):
    res = node.run(["python3", "-c", code, *map(str, args)], check=False, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"helper failed on {node.name}:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1]) if res.stdout.strip() else None


def _state(node, pid):
    res = node.run(["cat", f"/proc/{pid}/stat"], check=False)
    return res.stdout.rsplit(")", 1)[1].split()[0] if res.returncode == 0 else None


def _start_workload(a, work):
    a.run(f"mkdir -p {work}")
    a.run(["sh", "-c", f"cat > {work}/pattern.py"], input=WORKLOAD)
    # Push A's pid counter up so the workload's pid is free on B, where
    # CRIU restores it under the same pid (as in test_beds).
    a.run("echo 5000 > /proc/sys/kernel/ns_last_pid")
    pid = int(a.run(
        f"setsid python3 {work}/pattern.py {work}/progress {work}/info {MIB} {SEED:#x} "
        "</dev/null >/dev/null 2>&1 & echo $!").stdout)
    wait_for(lambda: len(_progress(a, f"{work}/progress")) >= 3, 30, "workload on A")
    addr, size = map(int, a.run(["cat", f"{work}/info"]).stdout.split())
    return pid, addr, size


def _pattern(addr, size, page):
    return b"".join(struct.pack("<Q", (addr + i * page) ^ SEED) * (page // 8)
                    for i in range(size // page))


def _check_dump_has_pattern(a, ckpt, pid, addr, size):
    host_dir = a.host_path(ckpt)
    page = os.sysconf("SC_PAGE_SIZE")
    pm = images.read_pagemap(host_dir, pid)
    runs = images.dumped_runs(pm)
    covered = RangeList((v, v + n * page) for v, n in runs)
    want = RangeList([(addr, addr + size)])
    assert want.difference(covered).npages() == 0, "dumped runs cover the pattern"
    got = bytearray(size)
    for v, n, data in images.iter_pages(host_dir, pid):
        s, e = max(v, addr), min(v + n * page, addr + size)
        if s < e:
            got[s - addr:e - addr] = data[s - v:e - v]
    assert bytes(got) == _pattern(addr, size, page), "pages-*.img holds the pattern"
    memory, other = images.image_files(host_dir)
    assert memory == sorted([f"pagemap-{pid}.img", pm.pages_name])
    assert f"core-{pid}.img" in other and "pstree.img" in other
    return len(runs)


def _move_restore_resume(a, b, pid, ckpt, work, images=None):
    """Copy ckpt (the images, or a tree holding them at `images`) and the
    work directory to B, same paths, and restore there."""
    images = images or ckpt
    a.run(["kill", "-KILL", str(pid)])
    wait_for(lambda: _state(a, pid) in (None, "Z"), 10, "the source to be gone on A")
    a.run(f"rm -rf /shared/ckpt /shared/w && cp -a {ckpt} /shared/ckpt && cp -a {work} /shared/w")
    b.run(f"mkdir -p /var/tmp && cp -a /shared/ckpt {ckpt} && cp -a /shared/w {work}")
    restored = _py(b, RESTORE, images)
    assert restored["pid"] == pid
    assert restored["state"] == "T", "restored with tasks stopped"
    before = len(_progress(b, f"{work}/progress"))
    time.sleep(0.5)
    assert len(_progress(b, f"{work}/progress")) == before, "stays stopped until resumed"
    resumed = b.run(["python3", "-c", RESUME, str(pid)]).stdout
    assert str(pid) in resumed
    after = wait_for(lambda: (p := _progress(b, f"{work}/progress")) and len(p) >= before + 5 and p,
                      30, "the resumed workload to continue on B")
    new = after[before:]
    assert all(line[1] == str(pid) and line[2] == "ok" for line in new), new
    ticks = [int(line[0]) for line in after]
    assert ticks == list(range(1, len(ticks) + 1)), "continues exactly where it stopped"
    b.run(["kill", "-KILL", str(pid)], check=False)
    return restored


# Runs in a node: version, check, and a failing dump turned into CriuError.
RUNNER_BASICS = r"""
import json
from migrator.criu import runner
out = {"version": runner.criu_version(), "check": runner.check()}
try:
    runner.dump(999999, "/var/tmp/nosuch")
except runner.CriuError as e:
    out["error"] = {"phase": e.phase, "message": str(e), "log": e.log}
print(json.dumps(out))
"""


def test_runner_version_check_and_errors(two_nodes):
    a, _ = two_nodes
    res = _py(a, RUNNER_BASICS)
    print(f"\ncriu {res['version']}: check says {res['check']!r}\n{res['error']['message']}")
    assert res["version"].startswith("4.")
    assert "Looks good" in res["check"]
    assert res["error"]["phase"] == "dump"
    assert "Error (" in res["error"]["message"]
    assert res["error"]["log"] == "/var/tmp/nosuch/dump.log"


def test_dump_prepare_levels_restore(two_nodes):
    a, b = two_nodes
    work, root = "/var/tmp/w", "/var/tmp/ckpt"
    pid, addr, size = _start_workload(a, work)
    try:
        res = _py(a, DUMP_AND_PREPARE, pid, root)
        assert res["state"] == "T", "criu dump --leave-stopped leaves the task stopped"
        assert res["gone"] == []
        nruns = _check_dump_has_pattern(a, f"{root}/images.criu", pid, addr, size)
        assert nruns == res["runs"]
        assert (res["segments"], res["levels"]) == (3, 2)
        assert res["copied_pages"] > 0 and res["parent_pages"] > 0
        assert res["parent_pages"] + res["copied_pages"] == res["pages"]
        print(f"\ndump: {res['runs']} runs, {res['pages']} pages; pattern "
              f"{size >> 20} MiB covered; store in {res['segments']} segments, "
              f"{res['parent_pages']} pages read through {res['levels']} parent "
              f"levels, {res['copied_pages']} copied")
        restored = _move_restore_resume(a, b, pid, root, work, f"{root}/images")
        print(f"restored on B as pid {restored['pid']}, stopped, resumed, memory ok")
    finally:
        a.run(["kill", "-KILL", str(pid)], check=False)


def test_uffd_wp_registered_process_dumps_and_restores(two_nodes):
    a, b = two_nodes
    work, ckpt, ctl = "/var/tmp/w", "/var/tmp/ckpt", "/var/tmp/ctl"
    pid, addr, size = _start_workload(a, work)
    a.run(f"mkdir -p {ctl}")
    helper = a.spawn(["python3", "-c", TRACKER, str(pid), ctl])
    try:
        wait_for(lambda: a.run(["test", "-e", f"{ctl}/ready"], check=False).returncode == 0
                  or not helper.running(), 30, "tracker started")
        assert helper.running(), helper.output()
        flags_before = a.run(f"grep VmFlags /proc/{pid}/smaps | grep -c uw", check=False).stdout
        dump = a.run(["python3", "-c",
                      "import sys; from migrator.criu import runner; "
                      "print(runner.dump(int(sys.argv[1]), sys.argv[2]))", str(pid), ckpt],
                     check=False, timeout=120)
        a.run(["touch", f"{ctl}/dumped"])
        assert helper.wait(60) == 0, helper.output()
        assert dump.returncode == 0, dump.stderr
        result = json.loads(a.run(["cat", f"{ctl}/result.json"]).stdout)
        print("\nuffd-wp: " + json.dumps(result))
        print(f"VMAs with 'uw' before dump: {flags_before.strip()}")
        assert result["registered_at_start"] > 0
        assert result["registered_after_dump"] == result["registered_at_start"], \
            "CRIU's dump leaves the registration in place"
        assert result["state_after_dump"] == "T"
        assert result["state_after_collect"] == "T"
        assert result["second_collect"] == 0, "nothing written while stopped"
        assert result["registered_after_stop"] == [], "tracker.stop() removes every registration"
        uffd_log = a.run(f"grep -i -c uffd {ckpt}/dump.log", check=False).stdout.strip()
        print(f"dump.log lines mentioning uffd: {uffd_log}")
        _check_dump_has_pattern(a, ckpt, pid, addr, size)
        restored = _move_restore_resume(a, b, pid, ckpt, work)
        uffd_flags = sorted(set(restored["vmflags"]) & {"um", "uw", "ui"})
        print(f"restored VmFlags (union): {restored['vmflags']}")
        assert uffd_flags == [], "restored mappings carry no userfaultfd flags"
    finally:
        helper.stop()
        a.run(["kill", "-KILL", str(pid)], check=False)
