#!/usr/bin/env python3
"""Migration throughput, downtime and sender memory of migrator, measured
side by side with a raw copy floor, CRIU's page server and CRIU
stop-and-copy, in two test-bed nodes (tests/beds).

    sudo .venv/bin/python benchmarks/migration.py [--size-mib 1024]
        [--repeats 3] [--rate-mib 10] [--link-mbit 1000] [--quick] [--json]

Prints figures (medians of --repeats) and ratios; asserts nothing (exit 0
unless the benchmark itself cannot run).  See benchmarks/README.md.

1. One full pre-copy round of an idle --size-mib process over loopback
   inside node A: migrator's round 1 (process_vm_readv, zstd, frame, TCP,
   receive, verify, store) against the floor (benchmarks/dirtier.c
   floor-send: process_vm_readv + send(2) in C, receiver discards), the
   floor whose receiver also writes what it gets to a file (floor+store),
   and `criu dump --page-server --leave-running` to `criu page-server`.
   Random (incompressible) memory and half-zero (compressible) memory;
   each round after --settle seconds of rest.
2. Live migration A -> B of a --size-mib process dirtying --rate-mib MiB/s
   over a veth shaped to --link-mbit both ways: migrator's downtime and
   its breakdown (also with `recv --lazy-restore`, and with
   `recv --no-reserve` to show what holding memory for the restore is
   worth), against stop-and-copy B -> A (criu dump, copy the images over
   the same link, criu restore), whose downtime is all of it.
3. Peak RSS (VmHWM) of the `migrator send` and `migrator recv` processes
   of part 2.

Everything runs in a cluster of two nodes that is torn down on every path
(Ctrl-C, SIGTERM, errors); the workload is compiled with gcc inside node A
into /tmp (a tmpfs of the node).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.nodebench import (BenchError, events, log, read, run,  # noqa: E402
                                  wait_for)  # (after the path set-up)

PORT = 7100
WORK = "/tmp/migbench"            # inside each node (tmpfs)
STORES = {"disk": "/var/tmp/migbench-mig",   # receivers' --dir: the node's overlay disk
          "tmpfs": "/tmp/migbench-mig"}     # or its tmpfs, where stop-and-copy keeps images
STORE = STORES["tmpfs"]
SHARED = "/shared/migbench"
FLOOR_TARGET = 0.8
CRIU_TARGET = 1.0
DOWNTIME_TARGET = 0.25
RSS_TARGET_MIB = 100

ROUND_HEADER = ("data     method            MiB    wire-MiB   sec-med   sec-min  "
                "MiB/s-med  vs-floor  vs-f+s  vs-criu  setup-ms")
DOWN_HEADER = ("method              downtime-ms-med  downtime-ms-min  total-ms-med  "
               "rounds  sent-MiB  verify")
BREAK_HEADER = "breakdown (ms, median)            " + "  ".join(
    ("dump", "last_collect", "delta_send", "restore", "commit", "delta_pages"))
RSS_HEADER = "process              VmHWM-MiB-max  VmHWM-MiB-med  target"

# Runs inside the nodes (python3 3.13 of the image, PYTHONPATH=/src).
HELPER = r'''
import json, os, socket, struct, sys, time

def out(ev):
    ev = dict(ev, t=time.monotonic())
    print(json.dumps(ev), flush=True)

def hwm():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])

def profiled(fn, path):
    if not path:
        return fn()
    import cProfile, pstats, io
    p = cProfile.Profile()
    p.enable()
    try:
        return fn()
    finally:
        p.disable()
        s = io.StringIO()
        pstats.Stats(p, stream=s).sort_stats("tottime").print_stats(16)
        pstats.Stats(p, stream=s).sort_stats("cumulative").print_stats(16)
        with open(path, "w") as f:
            f.write(s.getvalue())

def recv(listen, base, prof=None):
    from migrator.migration.destination import serve
    from migrator.migration.transport import Auth
    profiled(lambda: serve(listen, base, Auth(insecure=True), out, once=True), prof)
    out({"event": "hwm", "kb": hwm()})

def send1(pid, to, level, prof=None):
    """migrator's Source, stopped right after its first round."""
    from migrator.migration.source import MigrationError, SendOptions, Source
    from migrator.migration.transport import Auth
    from migrator.migration.workload import ProcessTree
    class Stop(Exception):
        pass
    def emit(ev):
        out(ev)
        if ev.get("event") == "round":
            raise Stop
    opts = SendOptions(to=to, auth=Auth(insecure=True),
                       level=None if level == "off" else int(level))
    src = Source(ProcessTree(int(pid)), opts, emit)
    def go():
        try:
            src.run()
        except MigrationError as e:
            if not isinstance(e.__cause__, Stop):
                raise
    profiled(go, prof)
    out({"event": "hwm", "kb": hwm()})

def cli(*args):
    """The real CLI, in this process, reporting VmHWM at exit."""
    import atexit
    atexit.register(lambda: print(json.dumps({"event": "hwm", "kb": hwm()}),
                                  flush=True))
    sys.argv = ["migrator", *args]
    from migrator.cli.app import main
    main()

def copy_recv(listen, d):
    host, port = listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)))
    print("listening", flush=True)
    c, _ = srv.accept()
    f = c.makefile("rb", buffering=1 << 20)
    n = 0
    while True:
        hdr = f.read(12)
        if not hdr:
            break
        nlen, size = struct.unpack("!IQ", hdr)
        name = f.read(nlen).decode()
        assert "/" not in name and not name.startswith(".")
        with open(os.path.join(d, name), "wb") as o:
            left = size
            while left:
                b = f.read(min(left, 1 << 20))
                if not b:
                    raise EOFError(name)
                o.write(b)
                left -= len(b)
        n += size
    c.sendall(b"k")
    c.close()
    print(json.dumps({"event": "copied", "bytes": n}), flush=True)

def copy_send(to, d):
    host, port = to.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    for name in sorted(os.listdir(d)):
        p = os.path.join(d, name)
        if not os.path.isfile(p):
            continue
        size = os.path.getsize(p)
        s.sendall(struct.pack("!IQ", len(name), size) + name.encode())
        with open(p, "rb") as f:
            if size:
                s.sendfile(f)
    s.shutdown(socket.SHUT_WR)
    s.recv(1)

globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
'''


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def helper(*args) -> list[str]:
    return ["python3", f"{SHARED}/helper.py", *map(str, args)]


# ------------------------------------------------------------------ workload
class Dirtier:
    def __init__(self, node, name, mib, rate, fill):
        self.node = node
        self.progress = f"{SHARED}/{name}.progress"
        self.host_progress = node.host_path(self.progress)
        r = run(node, f"setsid {WORK}/dirtier run {self.progress} {mib} {rate} "
                      f"{fill} </dev/null >/dev/null 2>&1 & echo $!")
        self.pid = int(r.stdout.strip())
        wait_for(lambda: f"ready {self.pid}" in read(self.host_progress),
                 120 + mib / 20, "the dirtier to fill its memory")

    def verify(self, node, timeout=60) -> str:
        """ok / BAD ... / dead, after SIGUSR1 on `node`."""
        before = read(self.host_progress).count("verify ")
        r = node.run(["kill", "-USR1", str(self.pid)], check=False)
        if r.returncode != 0:
            return "dead"
        try:
            wait_for(lambda: read(self.host_progress).count("verify ") > before,
                     timeout, "verify")
        except BenchError:
            return "no answer"
        last = [ln for ln in read(self.host_progress).splitlines()
                if ln.startswith("verify ")][-1].split()
        return last[2] if last[2] == "ok" else " ".join(last[2:])

    def kill(self, *nodes):
        for n in nodes:
            n.run(["kill", "-9", str(self.pid)], check=False)


def host_pid_of(svc, needle: str):
    """Host pid of the python process under a Service's nsenter wrapper."""
    from migrator.kernel.procfs import process_tree
    try:
        for pid in process_tree(svc.pid):
            try:
                cmd = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if needle.encode() in cmd and cmd.startswith(b"python3"):
                return pid
    except OSError:
        pass
    return None


def vmhwm_kb(pid) -> int | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


# ------------------------------------------------------------------ part 1
def floor_round(a, pid, store=False):
    """The raw copy; with store, its receiver also writes what it gets into
    a new file where the receivers keep their pages (--store)."""
    path = f"{STORE}-floor"
    svc = a.spawn([f"{WORK}/dirtier", "floor-recv", "127.0.0.1", str(PORT)]
                  + ([path] if store else []),
                  log=a.dir / "logs" / f"floor-{time.monotonic_ns()}.log")
    try:
        wait_for(lambda: "listening" in read(svc.log), 20, "floor receiver")
        r = run(a, [f"{WORK}/dirtier", "floor-send", str(pid), "127.0.0.1", str(PORT)])
        svc.wait(timeout=30)
    finally:
        svc.stop()
        a.run(f"rm -f {path}", check=False)
    f = r.stdout.split()
    nbytes, sec = int(f[1]), float(f[3])
    return {"bytes": nbytes, "wire": nbytes, "sec": sec, "setup_ms": None}


def criu_round(a, pid):
    ps, dd = f"{WORK}/ps", f"{WORK}/cd"
    run(a, f"rm -rf {ps} {dd}; mkdir -p {ps} {dd}")
    svc = a.spawn(["criu", "page-server", "--images-dir", ps, "--address",
                   "127.0.0.1", "--port", str(PORT)],
                  log=a.dir / "logs" / f"ps-{time.monotonic_ns()}.log")
    try:
        wait_for(lambda: a.run(f"ss -ltn | grep -q ':{PORT} '", check=False)
                 .returncode == 0, 20, "criu page-server")
        t0 = time.monotonic()
        r = run(a, ["criu", "dump", "-t", str(pid), "--page-server", "--address",
                    "127.0.0.1", "--port", str(PORT), "--leave-running",
                    "-D", dd, "-o", "dump.log", "--display-stats"])
        wall = time.monotonic() - t0
        svc.wait(timeout=30)
    finally:
        svc.stop()
        run(a, f"rm -rf {ps} {dd}", check=False)
    stats = {}
    for line in (r.stdout + r.stderr).splitlines():
        k, sep, v = line.partition(":")
        if sep:
            stats[k.strip()] = v.strip()
    pages = int(stats.get("Memory pages written", "0").split()[0] or 0)
    mw = float(stats.get("Memory write time", "0").split()[0] or 0) / 1e6
    if not pages:
        raise BenchError(f"criu dump printed no stats:\n{r.stdout}\n{r.stderr}")
    return {"bytes": pages * 4096, "wire": pages * 4096, "sec": wall,
            "memwrite_sec": mw, "setup_ms": (wall - mw) * 1000 if mw else None,
            "stats": stats}


def migrator_round(a, pid, level, prof=None, rprof=None):
    a.run(f"rm -rf {STORE}", check=False)
    rlog = a.dir / "logs" / f"recv1-{time.monotonic_ns()}.log"
    svc = a.spawn(helper("recv", f"127.0.0.1:{PORT}", STORE, *([rprof] if rprof else [])),
                  log=rlog)
    try:
        wait_for(lambda: "listening" in read(rlog), 30, "migrator receiver")
        args = ["send1", pid, f"127.0.0.1:{PORT}", level] + ([prof] if prof else [])
        r = run(a, helper(*args))
        svc.wait(timeout=60)
    finally:
        svc.stop()
        a.run(f"rm -rf {STORE}", check=False)
    sev = events(r.stdout)
    rev = events(read(rlog))
    start = next(e for e in sev if e["event"] == "start")
    rnd = next((e for e in sev if e["event"] == "round"), None)
    got = next((e for e in rev if e["event"] == "round"), None)
    if rnd is None or got is None:
        raise BenchError(f"no first round:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
                         f"\n{read(rlog)[-2000:]}")
    send_sec = rnd["sent_bytes"] / rnd["bandwidth"]
    began = rnd["t"] - send_sec
    return {"bytes": rnd["dirty_pages"] * 4096, "wire": rnd["sent_bytes"],
            "sec": got["t"] - began, "sender_sec": send_sec,
            "setup_ms": (began - start["t"]) * 1000}


def profile_round(a, pid, level) -> dict:
    """cProfile of migrator's round 1 (random data), sender and receiver,
    for --compress off and the measured level."""
    out = {}
    for lvl in ("off", str(level)):
        sp, rp = f"{SHARED}/profile-send-{lvl}.txt", f"{SHARED}/profile-recv-{lvl}.txt"
        x = migrator_round(a, pid, lvl, sp, rp)
        out[f"sender, --compress {lvl} ({x['bytes'] / 2**20 / x['sec']:.0f} MiB/s profiled)"] = \
            read(a.host_path(sp))
        out[f"receiver, --compress {lvl}"] = read(a.host_path(rp))
    return out


def part1(a, mib, repeats, level, settle, results, profile_dir):
    rows = []
    methods = [("floor", None), ("floor+store", None), ("criu page-srv", None),
               ("migrator off", "off"), (f"migrator zstd{level}", str(level))]
    for fill in ("random", "half"):
        d = Dirtier(a, f"p1-{fill}", mib, 0, fill)
        try:
            got = {m: [] for m, _ in methods}
            for rep in range(repeats):
                order = methods[rep % len(methods):] + methods[:rep % len(methods)]
                for m, lvl in order:
                    # Every method starts from the same state of free memory
                    # (see --settle).
                    time.sleep(settle)
                    if m.startswith("floor"):
                        got[m].append(floor_round(a, d.pid, store=m == "floor+store"))
                    elif m.startswith("criu"):
                        got[m].append(criu_round(a, d.pid))
                    else:
                        got[m].append(migrator_round(a, d.pid, lvl))
                    x = got[m][-1]
                    log(f"  [{fill} rep {rep + 1}] {m:<16} {x['bytes'] / 2**20:8.1f} MiB "
                        f"in {x['sec']:.3f} s")
            ok = d.verify(a)
            if profile_dir is not None and fill == "random":
                profile_dir.update(profile_round(a, d.pid, level))
        finally:
            d.kill(a)
        fl = med([x["bytes"] / x["sec"] for x in got["floor"]])
        fs = med([x["bytes"] / x["sec"] for x in got["floor+store"]])
        cr = med([x["bytes"] / x["sec"] for x in got["criu page-srv"]])
        for m, _ in methods:
            xs = got[m]
            rate = med([x["bytes"] / x["sec"] for x in xs])
            row = {"data": fill, "method": m, "mib": med([x["bytes"] for x in xs]) / 2**20,
                   "wire_mib": med([x["wire"] for x in xs]) / 2**20,
                   "sec_med": med([x["sec"] for x in xs]),
                   "sec_min": min(x["sec"] for x in xs),
                   "mib_s": rate / 2**20, "vs_floor": rate / fl,
                   "vs_floor_store": rate / fs, "vs_criu": rate / cr,
                   "setup_ms": med([x["setup_ms"] for x in xs if x["setup_ms"] is not None])
                   if any(x["setup_ms"] is not None for x in xs) else None,
                   "verify_after": ok, "samples": xs}
            if m.startswith("criu"):
                row["memwrite_mib_s"] = med([x["bytes"] / x["memwrite_sec"] for x in xs
                                             if x.get("memwrite_sec")]) / 2**20
            if m.startswith("migrator"):
                row["sender_only_mib_s"] = med([x["bytes"] / x["sender_sec"] for x in xs]) / 2**20
            rows.append(row)
    results["round"] = rows
    return rows


# ------------------------------------------------------------------ part 2
def migrator_live(src, dst, d, *recv_extra):
    """migrator recv on dst, migrator send of d on src."""
    to = src.peers[dst.name]
    dst.run(f"rm -rf {STORE}", check=False)
    rlog = dst.dir / "logs" / f"recv2-{time.monotonic_ns()}.log"
    slog = src.dir / "logs" / f"send2-{time.monotonic_ns()}.log"
    rsvc = dst.spawn(helper("cli", "recv", "--listen", f"{to}:{PORT}", "--dir", STORE,
                            "--insecure", "--once", "--json", *recv_extra), log=rlog)
    ssvc = None
    peak = {"send": 0, "recv": 0}
    try:
        wait_for(lambda: "listening" in read(rlog), 30, "migrator recv")
        ssvc = src.spawn(helper("cli", "send", "--pid", d.pid, "--to", f"{to}:{PORT}",
                              "--insecure", "--json"), log=slog)
        end = time.monotonic() + 600
        spid = rpid = None
        while ssvc.running() and time.monotonic() < end:
            spid = spid or host_pid_of(ssvc, "helper.py")
            rpid = rpid or host_pid_of(rsvc, "helper.py")
            for k, p in (("send", spid), ("recv", rpid)):
                v = vmhwm_kb(p) if p else None
                if v:
                    peak[k] = max(peak[k], v)
            time.sleep(0.1)
        code = ssvc.wait(timeout=30)
        rsvc.wait(timeout=60)
    finally:
        if ssvc:
            ssvc.stop()
        rsvc.stop()
        dst.run(f"rm -rf {STORE}", check=False)
    sev, rev = events(read(slog)), events(read(rlog))
    done = next((e for e in sev if e.get("event") == "done"), None)
    if code != 0 or done is None:
        raise BenchError(f"migrator send exited {code}:\n{read(slog)[-3000:]}\n"
                         f"{read(rlog)[-2000:]}")
    # the exact figure comes from the process itself at exit
    for k, evs in (("send", sev), ("recv", rev)):
        for e in evs:
            if e.get("event") == "hwm":
                peak[k] = max(peak[k], e["kb"])
    rounds = [e for e in sev if e.get("event") == "round"]
    return {"downtime_ms": done["downtime_ms"], "total_ms": done["total_ms"],
            "rounds": done["rounds"], "sent": done["sent_bytes"],
            "breakdown": done["breakdown_ms"], "round_pages": [r["dirty_pages"] for r in rounds],
            "hwm_send_kb": peak["send"], "hwm_recv_kb": peak["recv"]}


def stop_and_copy(src, dst, d):
    """criu dump on src, images to dst over the link, criu restore on dst."""
    to = src.peers[dst.name]
    sdir, ddir = f"{WORK}/sc-dump", f"{WORK}/sc-restore"
    run(src, f"rm -rf {sdir}; mkdir -p {sdir}")
    run(dst, f"rm -rf {ddir}; mkdir -p {ddir}")
    clog = dst.dir / "logs" / f"copy-{time.monotonic_ns()}.log"
    csvc = dst.spawn(helper("copy-recv", f"{to}:{PORT}", ddir), log=clog)
    try:
        wait_for(lambda: "listening" in read(clog), 30, "copy receiver")
        t0 = time.monotonic()
        run(src, ["criu", "dump", "-t", str(d.pid), "-D", sdir, "-o", "dump.log"])
        t1 = time.monotonic()
        run(src, helper("copy-send", f"{to}:{PORT}", sdir))
        csvc.wait(timeout=60)
        t2 = time.monotonic()
        run(dst, ["criu", "restore", "-D", ddir, "-o", "restore.log", "-d"])
        t3 = time.monotonic()
    finally:
        csvc.stop()
        src.run(f"rm -rf {sdir}", check=False)
        dst.run(f"rm -rf {ddir}", check=False)
    copied = next((e["bytes"] for e in events(read(clog)) if e.get("event") == "copied"), 0)
    return {"downtime_ms": (t3 - t0) * 1000, "total_ms": (t3 - t0) * 1000,
            "dump_ms": (t1 - t0) * 1000, "copy_ms": (t2 - t1) * 1000,
            "restore_ms": (t3 - t2) * 1000, "sent": copied}


# part 2's methods: name -> extra arguments of `migrator recv` (None:
# stop-and-copy); "no-reserve" shows what the memory held for the restore
# (migration/reserve.py) is worth
METHODS = {"migrator": (), "stop-and-copy": None,
           "migrator lazy": ("--lazy-restore",),
           "migrator no-reserve": ("--no-reserve",)}


def part2(a, b, mib, rate, mbit, repeats, results):
    from tests.beds import net
    net.shape(a, a.ifnames["b"], rate_mbit=mbit)
    net.shape(b, b.ifnames["a"], rate_mbit=mbit)
    d = Dirtier(a, "p2", mib, rate, "random")
    runs: dict[str, list] = {m: [] for m in METHODS}
    here, there = a, b
    try:
        for rep in range(repeats):
            # Each move takes the workload to the other node; which method
            # goes first rotates, so that none always runs on the machine
            # another has just left (see the README).
            names = list(METHODS)
            first = rep % len(names)
            for method in names[first:] + names[:first]:
                src, dst = here, there
                way = f"{src.name.upper()}->{dst.name.upper()}"
                if METHODS[method] is None:
                    x = stop_and_copy(src, dst, d)
                    x["verify"] = d.verify(dst)
                    log(f"  [rep {rep + 1}] {method} {way} downtime "
                        f"{x['downtime_ms']:.0f} ms (dump {x['dump_ms']:.0f}, copy "
                        f"{x['copy_ms']:.0f}, restore {x['restore_ms']:.0f}), "
                        f"verify {x['verify']}")
                else:
                    x = migrator_live(src, dst, d, *METHODS[method])
                    x["verify"] = d.verify(dst)
                    log(f"  [rep {rep + 1}] {method} {way} downtime "
                        f"{x['downtime_ms']:.0f} ms, total {x['total_ms']:.0f} ms, "
                        f"rounds {x['round_pages']}, dump "
                        f"{x['breakdown']['dump_ms']:.0f}, restore "
                        f"{x['breakdown']['restore_ms']:.0f}, verify {x['verify']}")
                runs[method].append(x)
                here, there = there, here
    finally:
        d.kill(a, b)
        net.shape(a, a.ifnames["b"])
        net.shape(b, b.ifnames["a"])
    results["downtime"] = {"migrator": runs["migrator"],
                           "stop_and_copy": runs["stop-and-copy"],
                           "migrator_lazy": runs["migrator lazy"],
                           "migrator_no_reserve": runs["migrator no-reserve"]}
    return runs


# ------------------------------------------------------------------ report
def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def report(results, args, out):
    p = lambda s="": print(s, file=out)  # noqa: E731
    p(f"migration benchmark: size {args.size_mib} MiB, repeats {args.repeats}, "
      f"dirty rate {args.rate_mib} MiB/s, link {args.link_mbit} Mbit/s")
    rows = results.get("round")
    if rows:
        p()
        p("1. one full round over loopback inside node A (idle process; MiB/s = "
          "process memory moved / wall time)")
        p(ROUND_HEADER)
        for r in rows:
            p(f"{r['data']:<8} {r['method']:<16} {r['mib']:7.1f} {r['wire_mib']:9.1f} "
              f"{r['sec_med']:9.3f} {r['sec_min']:9.3f} {r['mib_s']:10.1f} "
              f"{r['vs_floor']:9.2f} {r['vs_floor_store']:7.2f} {r['vs_criu']:8.2f} "
              f"{fmt(r['setup_ms'], '9.0f')}")
        for r in rows:
            if r["method"].startswith("criu"):
                p(f"  criu {r['data']}: page transfer only ('Memory write time'): "
                  f"{r['memwrite_mib_s']:.1f} MiB/s")
        for r in rows:
            if r["method"].startswith("migrator"):
                p(f"  {r['method']} {r['data']}: sender side only (read..send returned): "
                  f"{r['sender_only_mib_s']:.1f} MiB/s")
        for r in rows:
            if r["method"].startswith("migrator"):
                f_ok = r["vs_floor"] >= FLOOR_TARGET
                c_ok = r["vs_criu"] >= CRIU_TARGET
                p(f"  target {r['method']} {r['data']}: >= {FLOOR_TARGET}x floor "
                  f"{'met' if f_ok else 'MISSED'} ({r['vs_floor']:.2f}x; "
                  f"{r['vs_floor_store']:.2f}x floor+store), >= "
                  f"{CRIU_TARGET:.0f}x criu {'met' if c_ok else 'MISSED'} "
                  f"({r['vs_criu']:.2f}x)")
        p(f"  workload verified after part 1: {', '.join(sorted({r['verify_after'] for r in rows}))}")
    dt = results.get("downtime")
    if dt:
        mig, sc, lazy = dt["migrator"], dt["stop_and_copy"], dt["migrator_lazy"]
        live = (("migrator", mig), ("migrator lazy", lazy),
                ("migrator no-reserve", dt["migrator_no_reserve"]))
        p()
        p(f"2. downtime, {args.size_mib} MiB dirtying {args.rate_mib} MiB/s, veth "
          f"shaped to {args.link_mbit} Mbit/s both ways (each move to the other "
          "node; which method goes first rotates)")
        p(DOWN_HEADER)
        for name, xs in (live[0], ("stop-and-copy", sc), *live[1:]):
            p(f"{name:<19} {med([x['downtime_ms'] for x in xs]):16.0f} "
              f"{min(x['downtime_ms'] for x in xs):16.0f} "
              f"{med([x['total_ms'] for x in xs]):13.0f} "
              f"{fmt(med([x['rounds'] for x in xs]) if 'rounds' in xs[0] else None, '7.0f')} "
              f"{med([x['sent'] for x in xs]) / 2**20:9.1f}  "
              f"{','.join(sorted({x['verify'] for x in xs}))}")
        keys = ("dump_ms", "last_collect_ms", "delta_send_ms", "restore_ms",
                "commit_ms", "delta_pages")
        p(BREAK_HEADER)
        for name, xs in live:
            p(f"{name:<33}" + "  ".join(
                f"{med([x['breakdown'][k] for x in xs]):>{len(k) - 3 if k != 'delta_pages' else 11}.0f}"
                for k in keys))
            split = [k for k in ("rebuild_ms", "criu_restore_ms", "reserved_mib")
                     if all(k in x['breakdown'] for x in xs)]
            if split:
                p("  restore at the destination: " + ", ".join(
                    f"{k.rsplit('_', 1)[0]} {med([x['breakdown'][k] for x in xs]):.0f}"
                    + (" MiB" if k.endswith("mib") else " ms") for k in split))
        p(f"  migrator pages per round (each repeat): "
          f"{'; '.join(str(x['round_pages']) for x in mig)}")
        p(f"  stop-and-copy parts (ms, median): dump "
          f"{med([x['dump_ms'] for x in sc]):.0f}, copy {med([x['copy_ms'] for x in sc]):.0f}, "
          f"restore {med([x['restore_ms'] for x in sc]):.0f}")
        for name, xs in live:
            ratio = med([x['downtime_ms'] for x in xs]) / med([x['downtime_ms'] for x in sc])
            p(f"  target downtime <= {DOWNTIME_TARGET}x stop-and-copy, {name}: "
              f"{'met' if ratio <= DOWNTIME_TARGET else 'MISSED'} ({ratio:.3f}x)")
        p()
        p(f"3. peak RSS (VmHWM) while migrating {args.size_mib} MiB (part 2's runs)")
        p(RSS_HEADER)
        for name, k in (("migrator send", "hwm_send_kb"), ("migrator recv", "hwm_recv_kb")):
            vals = [x[k] / 1024 for x in mig]
            tgt = "" if name.endswith("recv") else (
                f"< {RSS_TARGET_MIB} MiB {'met' if max(vals) < RSS_TARGET_MIB else 'MISSED'}")
            p(f"{name:<20} {max(vals):13.1f} {med(vals):14.1f}  {tgt}")
    for title, text in (results.get("profile") or {}).items():
        p()
        p(f"cProfile of migrator's round 1, random data, inside node A: {title}")
        p("\n".join(ln for ln in text.splitlines() if ln.strip()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rate-mib", type=float, default=10.0,
                    help="part 2 dirty rate, MiB/s")
    ap.add_argument("--link-mbit", type=float, default=1000.0)
    ap.add_argument("--level", type=int, default=1,
                    help="zstd level measured (1 = migrator send's default)")
    ap.add_argument("--parts", default="1,2", help="which parts (3 comes with 2)")
    ap.add_argument("--settle", type=float, default=4.0,
                    help="part 1: seconds of rest before each measured round, so "
                         "that each starts with free memory in the same state "
                         "(0 = back to back)")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="cProfile a migrator round when it misses a target")
    ap.add_argument("--store", choices=sorted(STORES), default="tmpfs",
                    help="where the receivers keep page stores and images (--dir)")
    ap.add_argument("--quick", action="store_true",
                    help="64 MiB, 1 repeat, dirty rate scaled to the size, no settling")
    ap.add_argument("--json", action="store_true",
                    help="figures as one JSON object on stdout, report on stderr")
    args = ap.parse_args()
    if args.quick:
        args.rate_mib = args.rate_mib * 64 / args.size_mib
        args.size_mib, args.repeats, args.settle = 64, 1, 0.0
    if os.geteuid() != 0:
        log("migration.py needs root (test-bed nodes)")
        return 2
    parts = {p.strip() for p in args.parts.split(",")}
    global STORE
    STORE = STORES[args.store]
    from tests.beds import image, nodes
    results: dict = {"args": vars(args)}
    try:
        nodes.cleanup_stale()
        img = image.ensure_image(log=log)
        with nodes.cluster(2, image=img) as (a, b):
            # workload pids free on B, and on A again after a round trip
            a.run("echo 5000 > /proc/sys/kernel/ns_last_pid")
            for n in (a, b):
                run(n, f"mkdir -p {WORK}")
            (a.host_path(SHARED) / "helper.py").parent.mkdir(parents=True, exist_ok=True)
            (a.host_path(SHARED) / "helper.py").write_text(HELPER)
            run(a, f"gcc -O2 -Wall -o {WORK}/dirtier /src/benchmarks/dirtier.c")
            # the same executable at the same path on B, for CRIU's restore
            run(a, f"cp -p {WORK}/dirtier {SHARED}/dirtier.bin")
            run(b, f"cp -p {SHARED}/dirtier.bin {WORK}/dirtier && rm {SHARED}/dirtier.bin")
            if "1" in parts:
                log("part 1: one full round over loopback")
                prof = {} if args.profile == "always" else None
                rows = part1(a, args.size_mib, args.repeats, args.level, args.settle,
                             results, prof)
                missed = [r for r in rows if r["method"].startswith("migrator")
                          and (r["vs_floor"] < FLOOR_TARGET or r["vs_criu"] < CRIU_TARGET)]
                if prof is None and missed and args.profile == "auto":
                    prof = {}
                    d = Dirtier(a, "p1-prof", args.size_mib, 0, "random")
                    try:
                        prof.update(profile_round(a, d.pid, args.level))
                    finally:
                        d.kill(a)
                if prof:
                    results["profile"] = prof
            if "2" in parts or "3" in parts:
                log("part 2: downtime over a shaped link (and part 3: sender memory)")
                part2(a, b, args.size_mib, args.rate_mib, args.link_mbit,
                      args.repeats, results)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        log(f"benchmark failed: {e}")
        if results.get("round") or results.get("downtime"):
            report(results, args, sys.stderr)
        return 1
    report(results, args, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
