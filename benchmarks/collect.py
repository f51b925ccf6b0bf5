#!/usr/bin/env python3
"""Collect-round cost of migrator's trackers against the C floor, and the
slowdown tracking imposes on a write-heavy process.

    sudo .venv/bin/python benchmarks/collect.py [--size-mib 1024]
        [--repeats 5] [--spin-s 3] [--quick] [--json]

Prints figures measured side by side in one run; asserts nothing (exit 0
unless the benchmark itself cannot run).  See benchmarks/README.md.

1. Collect cost.  Two identical victims (benchmarks/victim.c) map
   --size-mib of anonymous memory.  Victim A is tracked by the C floor
   (benchmarks/floor.c: the bare kernel calls of a scan, timed in C);
   victim B by the Python tracker (tracker.collect(), timed in Python).
   For 0.1 %, 1 % and 10 % of the pages (random, fixed seed), both victims
   write the same pages, then each side collects; C and Python alternate
   which goes first, round by round.  The pages found must be exactly the
   pages written: a disagreement is printed as MISMATCH.
2. Slowdown.  Victim A (no longer tracked) and victim B (tracked, collect
   every --interval-ms) spin writing random pages for --spin-s each,
   alternating; writes/s of both and their ratio.

Children are compiled with gcc into a temporary directory, ended by pid on
every path (and die with this process: PR_SET_PDEATHSIG), and the trackers
are stopped on every path, Ctrl-C and SIGTERM included.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pathlib
import pstats
import random
import select
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from migrator.ranges import PAGE_SIZE, RangeList  # noqa: E402
from migrator.tracking import features  # noqa: E402
from migrator.tracking.select import (choose, make_tracker,  # noqa: E402
                                      process_facts)

FRACTIONS = (0.001, 0.01, 0.1)
TARGET = 1.5  # Python collect within this factor of the C floor
# the C units of the native layer, if native/build.py cannot be read
NATIVE = ["inject.c", "seccomp.c", "uffd.c", "softdirty.c", "vmread.c"]
HEADER = ("tracker     written     pages   found-C  found-Py   C-med-ms   "
          "C-min-ms  Py-med-ms  Py-min-ms  ratio-med  ratio-min  <=1.5x")
SLOW_HEADER = ("tracker     pattern         untracked-w/s    tracked-w/s  "
               "slowdown  collects  collect-ms  dirty-pages/collect")
# where the spinning victim writes: (label, fraction of the region; 0 = all)
SPIN_PATTERNS = (("all pages", 0.0), ("hot 1%", 0.01))
TMP_PREFIX = "migrator-bench-"


class BenchError(Exception):
    """The benchmark cannot go on (a child died, a command failed)."""


class Child:
    """A child process spoken to in lines over pipes; ended by pid."""

    registry: list["Child"] = []

    def __init__(self, argv: list[str], name: str):
        self.name = name
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
            start_new_session=True)  # Ctrl-C is ours to handle, not theirs
        Child.registry.append(self)
        self.pid = self.proc.pid
        self._buf = b""

    def send(self, line: str) -> None:
        try:
            self.proc.stdin.write(line.encode() + b"\n")
        except BrokenPipeError:
            raise BenchError(f"{self.name} (pid {self.pid}) died "
                             f"(status {self.proc.poll()})") from None

    def ready(self) -> bool:
        """Is a reply line waiting?"""
        if b"\n" in self._buf:
            return True
        r, _, _ = select.select([self.proc.stdout], [], [], 0)
        return bool(r)

    def readline(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name} (pid {self.pid}) did not "
                                 f"answer within {timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], left)
            if r:
                data = os.read(fd, 1 << 16)
                if not data:
                    raise BenchError(f"{self.name} (pid {self.pid}) died "
                                     f"(status {self.proc.wait()})")
                self._buf += data
        line, self._buf = self._buf.split(b"\n", 1)
        text = line.decode()
        if text.startswith("error"):
            raise BenchError(f"{self.name} (pid {self.pid}): {text}")
        return text

    def ask(self, line: str, timeout: float = 120.0) -> str:
        self.send(line)
        return self.readline(timeout)

    def end(self, polite: str | None = None) -> None:
        """Ask it to quit (if `polite`), else / then SIGKILL by pid; reap."""
        if self.proc.poll() is None and polite is not None:
            try:
                self.send(polite)
                self.proc.wait(timeout=5)
            except (BenchError, subprocess.TimeoutExpired, OSError):
                pass
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        if self in Child.registry:
            Child.registry.remove(self)

    @classmethod
    def end_all(cls) -> None:
        for c in list(cls.registry):
            c.end()


class Victim(Child):
    def __init__(self, exe: str, size_mib: int, name: str):
        super().__init__([exe, str(size_mib)], name)
        # touching every page of 1 GiB takes a moment
        words = self.readline(timeout=120).split()
        if words[0] != "ready" or int(words[1]) != self.pid:
            raise BenchError(f"{name}: unexpected greeting {words}")
        self.start, self.end_addr = int(words[2], 16), int(words[3], 16)
        self.npages = int(words[4])
        self.region = RangeList([(self.start, self.end_addr)])

    def write(self, pages_line: str, k: int) -> None:
        got = self.ask(pages_line)
        if got != f"ok {k}":
            raise BenchError(f"{self.name}: wrote {got!r}, expected ok {k}")

    def spin(self, seconds: float, seed: int, hot: int = 0) -> None:
        self.send(f"s {seconds} {seed} {hot}")

    def spun(self, timeout: float) -> float:
        words = self.readline(timeout).split()
        if words[0] != "spun":
            raise BenchError(f"{self.name}: unexpected {words}")
        return float(words[3])


class Floor(Child):
    def __init__(self, exe: str, mode: str, victim: Victim):
        super().__init__([exe, mode, str(victim.pid), hex(victim.start),
                          hex(victim.end_addr)], f"floor ({mode})")
        words = self.readline(timeout=30).split()
        if words[0] != "ready":
            raise BenchError(f"floor: unexpected greeting {words}")

    def scan(self) -> dict:
        ns, runs, pages, s, sq = map(int, self.ask("s").split())
        return {"ns": ns, "runs": runs, "pages": pages, "sum": s, "sumsq": sq}


# -- helpers ------------------------------------------------------------

def native_sources() -> list[str]:
    """native/build.py's SOURCES (the units the extension is built from),
    read without importing it."""
    import ast
    try:
        tree = ast.parse((ROOT / "native" / "build.py").read_text())
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == "SOURCES"):
                return list(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    return NATIVE


def compile_children(tmp: pathlib.Path) -> tuple[str, str]:
    cc = shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise BenchError("no C compiler (gcc) on PATH")
    victim, floor = tmp / "victim", tmp / "floor"
    base = [cc, "-O2", "-D_GNU_SOURCE", f"-I{ROOT / 'native'}"]
    for cmd in (
            base + [str(ROOT / "benchmarks" / "victim.c"), "-o", str(victim)],
            base + [str(ROOT / "benchmarks" / "floor.c")]
            + [str(ROOT / "native" / s) for s in native_sources()]
            + ["-lpthread", "-o", str(floor)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError(f"compiling failed: {' '.join(cmd)}\n{r.stderr}")
    return str(victim), str(floor)


def available_trackers(caps) -> list[str]:
    out = []
    if caps.uffd_wp_async and caps.pagemap_scan and caps.ptrace_injection:
        out.append("uffd-wp")
    if caps.soft_dirty and caps.ptrace_injection:
        out.append("soft-dirty")
    return out


def floor_mode(name: str, caps) -> str:
    if name == "uffd-wp":
        return "uffd-wp"
    # match what SoftDirtyTracker uses (select.make_tracker)
    return "soft-dirty-scan" if caps.pagemap_scan_soft_dirty else "soft-dirty"


# every tracker made, so that each is stopped on every way out (stop() is
# idempotent and safe after the target died)
TRACKERS: list = []


def python_tracker(name: str, pid: int, caps):
    d = choose(features.arch(), caps, process_facts(pid, caps), forced=name)
    t = make_tracker(d, caps)
    TRACKERS.append(t)
    return t


def stop_trackers() -> None:
    while TRACKERS:
        TRACKERS.pop().stop()


def page_sums(idx) -> tuple[int, int, int]:
    m = (1 << 64) - 1
    return len(idx), sum(idx) & m, sum(i * i for i in idx) & m


def pick_pages(npages: int, frac: float, seed: int) -> list[int]:
    k = max(1, round(frac * npages))
    return sorted(random.Random(seed).sample(range(npages), k))


def found_pages(dirty: RangeList, v: Victim) -> tuple[set[int], int]:
    """Page indices of `dirty` inside v's region, and pages outside it."""
    inside = dirty & v.region
    idx = {(a - v.start) // PAGE_SIZE for a in inside.pages()}
    return idx, dirty.npages() - len(idx)


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def timed_collect(tracker) -> tuple[int, object]:
    gc.collect()
    t0 = time.perf_counter_ns()
    c = tracker.collect()
    return time.perf_counter_ns() - t0, c


def log(msg: str, out) -> None:
    print(msg, file=out, flush=True)


# -- part 1: one collect round -------------------------------------------

def bench_collect(name, caps, va, vb, floor, tracker, args, out, mismatches):
    rows = []
    for frac in FRACTIONS:
        c_ns, py_ns, found_c, found_py, outside = [], [], [], [], []
        for r in range(args.repeats + 1):  # round 0: warm-up, not counted
            seed = args.seed + 1000 * r + round(frac * 1e5)
            idx = pick_pages(va.npages, frac, seed)
            want = set(idx)
            sums = page_sums(idx)
            line = f"w {len(idx)} " + " ".join(map(str, idx))
            sides = ("C", "Py") if r % 2 == 0 else ("Py", "C")
            for side in sides:
                if side == "C":
                    va.write(line, len(idx))
                    res = floor.scan()
                    got = (res["pages"], res["sum"], res["sumsq"])
                    if got != sums:
                        mismatches.append(
                            f"{name} {frac:.1%} round {r}: C floor found "
                            f"{res['pages']} pages, {len(idx)} were written "
                            f"(index sums {got[1:]} vs {sums[1:]})")
                    if r:
                        c_ns.append(res["ns"])
                        found_c.append(res["pages"])
                else:
                    vb.write(line, len(idx))
                    ns, col = timed_collect(tracker)
                    got, extra = found_pages(col.dirty, vb)
                    if got != want:
                        mismatches.append(
                            f"{name} {frac:.1%} round {r}: Python tracker "
                            f"found {len(got)} pages in the region, "
                            f"{len(idx)} were written ({len(want - got)} "
                            f"missed, {len(got - want)} extra)")
                    if r:
                        py_ns.append(ns)
                        found_py.append(len(got))
                        outside.append(extra)
        k = len(idx)
        row = {
            "tracker": name, "fraction": frac, "pages_written": k,
            "found_c": found_c, "found_py": found_py,
            "py_pages_outside_region": outside,
            "c_ms": [n / 1e6 for n in c_ns], "py_ms": [n / 1e6 for n in py_ns],
        }
        row["c_med_ms"], row["c_min_ms"] = med(row["c_ms"]), min(row["c_ms"])
        row["py_med_ms"], row["py_min_ms"] = med(row["py_ms"]), min(row["py_ms"])
        row["ratio_med"] = row["py_med_ms"] / row["c_med_ms"]
        row["ratio_min"] = row["py_min_ms"] / row["c_min_ms"]
        rows.append(row)
        fc = "/".join(sorted({str(x) for x in found_c}))
        fp = "/".join(sorted({str(x) for x in found_py}))
        bad = "" if all(x == k for x in found_c + found_py) else "  MISMATCH"
        log(f"{name:<11} {frac * 100:>6.1f}%  {k:>8}  {fc:>8}  {fp:>8}  "
            f"{row['c_med_ms']:>9.3f}  {row['c_min_ms']:>9.3f}  "
            f"{row['py_med_ms']:>9.3f}  {row['py_min_ms']:>9.3f}  "
            f"{row['ratio_med']:>8.2f}x  {row['ratio_min']:>8.2f}x  "
            f"{'yes' if row['ratio_med'] <= TARGET else 'NO'}{bad}", out)
    return rows


def profile_collect(name, vb, tracker, frac, args, out, rounds=40) -> str:
    """cProfile of `rounds` collects at `frac`; the report as text."""
    prof = cProfile.Profile()
    for r in range(rounds):
        idx = pick_pages(vb.npages, frac, args.seed + 77 + r)
        vb.write(f"w {len(idx)} " + " ".join(map(str, idx)), len(idx))
        gc.collect()
        prof.enable()
        tracker.collect()
        prof.disable()
    s = io.StringIO()
    st = pstats.Stats(prof, stream=s)
    st.sort_stats("cumulative").print_stats(16)
    st.sort_stats("tottime").print_stats(10)
    lines = [ln.replace(str(ROOT) + "/", "") for ln in s.getvalue().splitlines()
             if ln.strip() and "List reduced" not in ln]
    return (f"--- cProfile: {rounds} x {name} collect, {frac:.1%} written, "
            f"{args.size_mib} MiB ---\n" + "\n".join(lines))


# -- part 2: slowdown -----------------------------------------------------

def bench_slowdown(name, va, vb, tracker, args, out, label, hot_frac):
    hot = round(hot_frac * va.npages)
    untracked, tracked, collects, collect_ms, dirty = [], [], [], [], []
    timeout = args.spin_s + 60
    for r in range(args.spin_repeats):
        order = ("u", "t") if r % 2 == 0 else ("t", "u")
        for side in order:
            seed = args.seed + 31 * r + 7
            if side == "u":
                va.spin(args.spin_s, seed, hot)
                untracked.append(va.spun(timeout))
                continue
            tracker.collect()  # start the tracked spin from a clean state
            vb.spin(args.spin_s, seed, hot)
            n, ms, pages = 0, [], []
            nxt = time.monotonic() + args.interval_ms / 1000
            while True:
                left = nxt - time.monotonic()
                if left > 0:
                    select.select([vb.proc.stdout], [], [], left)
                if vb.ready():
                    break
                ns, c = timed_collect(tracker)
                n += 1
                ms.append(ns / 1e6)
                pages.append(c.dirty.npages())
                nxt += args.interval_ms / 1000
                if nxt < time.monotonic():  # a collect overran the interval
                    nxt = time.monotonic()
            tracked.append(vb.spun(timeout))
            collects.append(n)
            collect_ms.extend(ms)
            dirty.extend(pages)
    row = {"tracker": name, "pattern": label, "hot_pages": hot or va.npages,
           "untracked_wps": untracked, "tracked_wps": tracked,
           "collects": collects, "collect_ms_mean":
           statistics.fmean(collect_ms) if collect_ms else float("nan"),
           "dirty_pages_per_collect":
           statistics.fmean(dirty) if dirty else float("nan"),
           "interval_ms": args.interval_ms, "spin_s": args.spin_s}
    row["untracked_med"] = med(untracked)
    row["tracked_med"] = med(tracked)
    row["slowdown"] = row["untracked_med"] / row["tracked_med"]
    log(f"{name:<11} {label:<12} {row['untracked_med']:>16,.0f} "
        f"{row['tracked_med']:>14,.0f}"
        f"  {row['slowdown']:>7.2f}x  {med(collects):>8.0f}  "
        f"{row['collect_ms_mean']:>10.2f}  {row['dirty_pages_per_collect']:>19,.0f}",
        out)
    return row


# -- main -----------------------------------------------------------------

def run(args, out, result) -> None:
    caps = features.probe()
    trackers = available_trackers(caps)
    result.update({
        "kernel": features.kernel_release(), "arch": features.arch(),
        "capabilities": caps.as_dict(), "size_mib": args.size_mib,
        "pages": args.size_mib * (1 << 20) // PAGE_SIZE,
        "page_size": PAGE_SIZE, "repeats": args.repeats, "seed": args.seed,
        "trackers": trackers, "target_ratio": TARGET,
        "loadavg_start": os.getloadavg(), "collect": [], "slowdown": [],
        "mismatches": [], "profiles": {}})
    thp = "?"
    try:
        thp = pathlib.Path(
            "/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    log(f"kernel {result['kernel']} {result['arch']}, {os.cpu_count()} CPUs, "
        f"load {os.getloadavg()[0]:.2f}; region {args.size_mib} MiB = "
        f"{result['pages']} pages of {PAGE_SIZE} B, MADV_NOHUGEPAGE "
        f"(THP {thp}); {args.repeats} repeats (+1 warm-up), median and min",
        out)
    log("capabilities: " + ", ".join(f"{k}={v}" for k, v in
                                     caps.as_dict().items()), out)
    if not trackers:
        log("no dirty-page tracker works on this kernel; nothing to measure",
            out)
        log("\n" + HEADER, out)
        return

    tmp = pathlib.Path(tempfile.mkdtemp(prefix=TMP_PREFIX))
    try:
        victim_exe, floor_exe = compile_children(tmp)
        per_tracker = []
        log("\n1. One collect round: Python tracker.collect() vs the C floor "
            "(bare kernel calls)\n", out)
        log(HEADER, out)
        for name in trackers:
            va = vb = floor = tracker = None
            try:
                va = Victim(victim_exe, args.size_mib, "victim A (C floor)")
                vb = Victim(victim_exe, args.size_mib, "victim B (Python)")
                floor = Floor(floor_exe, floor_mode(name, caps), va)
                floor.scan()  # nothing written yet: drains nothing
                tracker = python_tracker(name, vb.pid, caps)
                tracker.start()
                tracker.collect()  # the first collect after start: drain
                rows = bench_collect(name, caps, va, vb, floor, tracker, args,
                                     out, result["mismatches"])
                result["collect"].extend(rows)
                worst = max(rows, key=lambda r: r["ratio_med"])
                if worst["ratio_med"] > TARGET:
                    result["profiles"][name] = profile_collect(
                        name, vb, tracker, worst["fraction"], args, out)
                floor.end(polite="q")  # A is untracked from here on
                floor = None
                per_tracker.append((name, va, vb, tracker))
                va = vb = tracker = None  # kept for part 2
            finally:  # a way out before part 2: end everything now
                if tracker is not None:
                    tracker.stop()
                for c in (floor, va, vb):
                    if c is not None:
                        c.end()
        for m in result["mismatches"]:
            log(f"MISMATCH: {m}", out)
            print(f"MISMATCH: {m}", file=sys.stderr, flush=True)
        if not result["mismatches"]:
            log("\ndirty pages found agree with the pages written, on both "
                "sides, in every round", out)
        ext = [f"{r['tracker']} {r['fraction']:.1%}: "
               f"{max(r['py_pages_outside_region'])}"
               for r in result["collect"] if any(r["py_pages_outside_region"])]
        if ext:
            log("the Python tracker also reported pages outside the region "
                "(the victim's stack, stdio buffer; max per round): "
                + ", ".join(ext), out)

        log(f"\n2. Slowdown of a process writing one byte in random pages "
            f"(of the whole region, or of a hot 1% of it): untracked vs "
            f"tracked (collect every {args.interval_ms} ms), {args.spin_s} s "
            f"each, {args.spin_repeats} alternations, medians\n", out)
        log(SLOW_HEADER, out)
        try:
            while per_tracker:
                name, va, vb, tracker = per_tracker[0]
                for label, hot in SPIN_PATTERNS:
                    result["slowdown"].append(bench_slowdown(
                        name, va, vb, tracker, args, out, label, hot))
                tracker.stop()
                va.end(polite="q")
                vb.end(polite="q")
                per_tracker.pop(0)
        finally:
            for name, va, vb, tracker in per_tracker:
                tracker.stop()
                va.end()
                vb.end()

        for name, text in result["profiles"].items():
            log(f"\n{name}: Python collect above {TARGET}x the C floor; "
                f"where its time goes:\n{text}", out)
        result["loadavg_end"] = os.getloadavg()
        log(f"\nload average at the end: {result['loadavg_end'][0]:.2f}", out)
    finally:
        try:
            stop_trackers()
        finally:
            Child.end_all()
            shutil.rmtree(tmp, ignore_errors=True)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-mib", type=int, default=None,
                   help="tracked region per victim (default 1024; 64 "
                        "with --quick)")
    p.add_argument("--repeats", type=int, default=None,
                   help="measured rounds per configuration (default 5; 1 "
                        "with --quick)")
    p.add_argument("--spin-s", type=float, default=None,
                   help="seconds per write spin (default 3; 1 with --quick)")
    p.add_argument("--interval-ms", type=int, default=100,
                   help="collect interval while the victim spins")
    p.add_argument("--seed", type=int, default=20240611)
    p.add_argument("--quick", action="store_true",
                   help="tiny sizes: 64 MiB, 1 repeat, 1 s spins")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object with every figure on stdout "
                        "(the human-readable report goes to stderr)")
    a = p.parse_args(argv)
    q = a.quick
    a.size_mib = a.size_mib or (64 if q else 1024)
    a.repeats = a.repeats or (1 if q else 5)
    a.spin_s = a.spin_s or (1.0 if q else 3.0)
    a.spin_repeats = max(1, min(a.repeats, 3))
    if a.size_mib <= 0 or a.repeats <= 0 or a.spin_s <= 0:
        p.error("sizes, repeats and durations must be positive")
    return a


def _finite(x):
    """NaN and infinities as null: strict JSON."""
    if isinstance(x, float) and (x != x or x in (float("inf"), -float("inf"))):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _terminate(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse(argv)
    if os.geteuid() != 0:
        print("collect.py needs root (ptrace, /proc/PID/pagemap, clear_refs)",
              file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    out = sys.stderr if args.json else sys.stdout
    result: dict = {}
    try:
        run(args, out, result)
    except KeyboardInterrupt:
        print("interrupted; every child ended, trackers stopped",
              file=sys.stderr)
        return 130
    except BenchError as e:
        print(f"collect.py: {e}", file=sys.stderr)
        return 1
    finally:
        try:
            stop_trackers()
        finally:
            Child.end_all()
    if args.json:
        json.dump(_finite(result), sys.stdout, indent=1)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
