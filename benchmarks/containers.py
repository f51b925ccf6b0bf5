#!/usr/bin/env python3
"""Container migration: migrator's live migration of a runc container
against runc's own stop-and-copy (`runc checkpoint`, the images copied over
the same link, `runc restore`), side by side in two test-bed nodes.

    sudo .venv/bin/python benchmarks/containers.py [--size-mib 256]
        [--churn 2000] [--repeats 3] [--link-mbit 1000] [--quick] [--json]

The container is the demo's (migrator/demo/server.py in the bundle of
migrator/demo/bundle.py, the node's /usr borrowed read-only): a TCP
service holding --size-mib of pages and rewriting --churn of them per
second, with its own address in an external network namespace on a
bridge segment joining the nodes.  Each repeat moves it A -> B with
`migrator send` / `migrator recv` (the real CLI, defaults) and back
B -> A with runc checkpoint + copy + restore, over the veth between the
nodes shaped with tests/beds/net.shape to --link-mbit both ways.  After
each move the service is asked over TCP whether its memory is intact.

Prints one table (medians of --repeats) and the ratios; asserts nothing.
See benchmarks/README.md.
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

NAME = "ctrbench"
ADDRESS = "198.18.5.10"
PREFIX = 24
BRIDGE = "brmig"
PROBE_ADDRESS = {"a": "198.18.5.1", "b": "198.18.5.2"}  # on each node's bridge
SERVICE_PORT = 8080
PORT = 7200
BUNDLE = "/var/lib/ctrbench/bundle"
WORK = "/tmp/ctrbench"            # node tmpfs: images of the baseline
STORE = "/var/tmp/ctrbench-mig"   # migrator recv --dir (overlay disk, as in use)
SHARED = "/shared/ctrbench"

HEADER = "method                       downtime-ms  total-ms  wire-MiB  rounds  service"
BREAK_KEYS = ("dump_ms", "last_collect_ms", "delta_send_ms", "restore_ms", "commit_ms",
              "delta_pages")

# Runs inside the nodes (the image's python3, PYTHONPATH=/src).  The
# baseline is timed inside the nodes, not from the host, so that no
# nsenter start-up lands in its downtime: base-send runs on the source and
# base-recv, already listening, on the destination; both clocks are
# CLOCK_MONOTONIC of the same kernel.
HELPER = r'''
import json, os, shutil, socket, subprocess, sys, tempfile, time

def runc(args):
    # Output through a file, as migrator's runtime adapter does: `restore
    # -d` hands its stdio to the container, and a pipe of ours would stay
    # open there.
    with tempfile.TemporaryFile("w+") as out:
        rc = subprocess.run(["runc", *args], stdin=subprocess.DEVNULL, stdout=out,
                            stderr=subprocess.STDOUT).returncode
        out.seek(0)
        return rc, out.read()[-2000:]

def base_recv(listen, images, work, bundle, cid):
    host, port = listen.rsplit(":", 1)
    srv = socket.create_server((host, int(port)))
    print("listening", flush=True)
    c, _ = srv.accept()
    tar = subprocess.Popen(["tar", "-C", images, "-xf", "-"], stdin=subprocess.PIPE)
    n = 0
    while True:
        b = c.recv(1 << 20)
        if not b:
            break
        tar.stdin.write(b)
        n += len(b)
    tar.stdin.close()
    if tar.wait() != 0:
        c.sendall(json.dumps({"error": "tar -x failed"}).encode() + b"\n")
        sys.exit(1)
    t_copied = time.monotonic()
    rc, out = runc(["restore", "-d", "--tcp-established", "--bundle", bundle,
                    "--image-path", images, "--work-path", work, cid])
    t_restored = time.monotonic()
    ev = {"bytes": n, "t_copied": t_copied, "t_restored": t_restored, "rc": rc,
          "out": out if rc else ""}
    c.sendall(json.dumps(ev).encode() + b"\n")
    c.close()
    print(json.dumps(ev), flush=True)

def base_send(to, images, work, cid):
    host, port = to.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    t0 = time.monotonic()
    # The same flags migrator's adapter gives runc for a container with an
    # external network namespace (runc passes that namespace to CRIU as
    # external by itself); the source is not left running: stop-and-copy.
    rc, out = runc(["checkpoint", "--tcp-established", "--image-path", images,
                    "--work-path", work, cid])
    t_dumped = time.monotonic()
    if rc != 0:
        print(json.dumps({"error": f"runc checkpoint exited {rc}: {out}"}), flush=True)
        sys.exit(1)
    tar = subprocess.Popen(["tar", "-C", images, "-cf", "-", "."], stdout=subprocess.PIPE)
    while True:
        b = tar.stdout.read(1 << 20)
        if not b:
            break
        s.sendall(b)
    if tar.wait() != 0:
        sys.exit(1)
    s.shutdown(socket.SHUT_WR)
    ans = json.loads(s.makefile("rb").readline() or b"{}")
    ans.update(t0=t0, t_dumped=t_dumped)
    print(json.dumps(ans), flush=True)

def ping(addr, port):
    """One request to the service: its tick and whether its pages check out."""
    try:
        with socket.create_connection((addr, int(port)), timeout=5) as s:
            f = s.makefile("rwb", buffering=0)
            f.write(b"ping 1\n")
            print(f.readline().decode().strip(), flush=True)
    except OSError as e:
        print(f"error {e}", flush=True)

globals()[sys.argv[1].replace("-", "_")](*sys.argv[2:])
'''


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def helper(*args) -> list[str]:
    return ["python3", f"{SHARED}/helper.py", *map(str, args)]


# ContainerNetwork.<argv[2]>() for the container: the runtime adapter's own
# code, so the baseline's network is set up exactly as migrator's.
NETNS_CALL = ("import sys; from migrator.runtime.network import ContainerNetwork as N; "
              f"getattr(N(sys.argv[1], '/run/netns/' + sys.argv[1], '{ADDRESS}/{PREFIX}', "
              f"'{BRIDGE}'), sys.argv[2])()")


def netns_call(node, method: str, check: bool = True) -> None:
    run(node, ["python3", "-c", NETNS_CALL, NAME, method], check=check)


def service(node) -> str:
    """Ask the service from ``node``'s side of the segment: "ok", or why not."""
    out = run(node, helper("ping", ADDRESS, SERVICE_PORT), check=False).stdout.strip()
    parts = out.split()
    if len(parts) == 4 and parts[0] == "pong":
        return parts[3] if parts[3] != "ok" else "ok"
    return out or "no answer"


def running_on(node) -> bool:
    r = node.run(["runc", "state", NAME], check=False)
    return r.returncode == 0 and json.loads(r.stdout).get("status") == "running"


def remove_container(node) -> None:
    node.run(f"runc kill {NAME} KILL; sleep 0.2; runc delete -f {NAME}", check=False)
    netns_call(node, "remove", check=False)


# ------------------------------------------------------------------ moves
def migrator_move(src, dst) -> dict:
    to = src.peers[dst.name]
    dst.run(f"rm -rf {STORE}", check=False)
    rlog = dst.dir / "logs" / f"recv-{time.monotonic_ns()}.log"
    slog = src.dir / "logs" / f"send-{time.monotonic_ns()}.log"
    rsvc = dst.spawn(["python3", "-m", "migrator", "recv", "--listen", f"{to}:{PORT}",
                      "--dir", STORE, "--insecure", "--once", "--json"], log=rlog)
    ssvc = None
    try:
        wait_for(lambda: "listening" in read(rlog), 30, "migrator recv")
        ssvc = src.spawn(["python3", "-m", "migrator", "send", NAME, "--to",
                          f"{to}:{PORT}", "--insecure", "--json"], log=slog)
        code = ssvc.wait(timeout=600)
        rsvc.wait(timeout=60)
    finally:
        if ssvc:
            ssvc.stop()
        rsvc.stop()
        dst.run(f"rm -rf {STORE}", check=False)
    done = next((e for e in events(read(slog)) if e.get("event") == "done"), None)
    if code != 0 or done is None:
        raise BenchError(f"migrator send exited {code}:\n{read(slog)[-3000:]}\n"
                         f"{read(rlog)[-2000:]}")
    rounds = [e["dirty_pages"] for e in events(read(slog)) if e.get("event") == "round"]
    return {"downtime_ms": done["downtime_ms"], "total_ms": done["total_ms"],
            "sent": done["sent_bytes"], "rounds": done["rounds"],
            "round_pages": rounds, "breakdown": done["breakdown_ms"]}


def runc_move(src, dst) -> dict:
    """runc checkpoint on src, the images to dst over the link (tar over one
    TCP connection), runc restore on dst."""
    to = src.peers[dst.name]
    for n in (src, dst):
        run(n, f"rm -rf {WORK}; mkdir -p {WORK}/images {WORK}/work")
    # The destination's network namespace is made before the clock starts
    # (migrator makes it inside its downtime, in its restore): this and the
    # link-up and announcement below favour the baseline, never migrator.
    netns_call(dst, "prepare")
    clog = dst.dir / "logs" / f"base-recv-{time.monotonic_ns()}.log"
    rsvc = dst.spawn(helper("base-recv", f"{to}:{PORT}", f"{WORK}/images",
                            f"{WORK}/work", BUNDLE, NAME), log=clog)
    try:
        wait_for(lambda: "listening" in read(clog), 30, "the baseline's receiver")
        r = run(src, helper("base-send", f"{to}:{PORT}", f"{WORK}/images",
                            f"{WORK}/work", NAME), check=False)
        rsvc.wait(timeout=120)
    finally:
        rsvc.stop()
        for n in (src, dst):
            n.run(f"rm -rf {WORK}", check=False)
    ev = (events(r.stdout) or [{}])[-1]
    if r.returncode != 0 or ev.get("rc") != 0 or "t_restored" not in ev:
        netns_call(dst, "undo_prepare", check=False)
        raise BenchError(f"runc checkpoint/restore failed: {r.stdout[-2000:]}"
                         f"{r.stderr[-2000:]}\n{read(clog)[-2000:]}")
    # As migrator's commit does: the source's copy (runc already removed
    # the container) and its network go; the address is announced from
    # where the container now runs.
    remove_container(src)
    netns_call(dst, "go_live")
    return {"downtime_ms": (ev["t_restored"] - ev["t0"]) * 1000,
            "total_ms": (ev["t_restored"] - ev["t0"]) * 1000,
            "sent": ev["bytes"], "rounds": None,
            "checkpoint_ms": (ev["t_dumped"] - ev["t0"]) * 1000,
            "copy_ms": (ev["t_copied"] - ev["t_dumped"]) * 1000,
            "restore_ms": (ev["t_restored"] - ev["t_copied"]) * 1000}


# ------------------------------------------------------------------ bench
def bench(a, b, args, results) -> None:
    from tests.beds import net
    net.bridge_segment(a, b, BRIDGE)
    for n in (a, b):
        run(n, f"ip addr add {PROBE_ADDRESS[n.name]}/{PREFIX} dev {BRIDGE}")
        # The same bundle on both nodes: runc restores from its config.json.
        run(n, ["python3", "-m", "migrator.demo.bundle", BUNDLE, "--name", NAME,
                "--network", f"{ADDRESS}/{PREFIX}@{BRIDGE}", "--", "python3",
                "/app/server.py", str(SERVICE_PORT), str(args.size_mib), str(args.churn)])
    shared = a.host_path(SHARED)
    shared.mkdir(parents=True, exist_ok=True)
    (shared / "helper.py").write_text(HELPER)
    run(a, ["ip", "netns", "add", NAME])
    netns_call(a, "prepare")
    netns_call(a, "go_live")
    run(a, f"runc run -d --bundle {BUNDLE} {NAME} </dev/null >/dev/null 2>&1")
    # The service listens once its memory is filled.
    wait_for(lambda: service(a) == "ok", 120 + args.size_mib / 4, "the service to listen")
    log(f"container {NAME} runs on a: {args.size_mib} MiB, {args.churn} pages/s rewritten")
    # Only the link the migrations cross is shaped, not the bridge segment
    # (the service's own traffic, which none of the timings use).
    net.shape(a, a.ifnames["b"], rate_mbit=args.link_mbit)
    net.shape(b, b.ifnames["a"], rate_mbit=args.link_mbit)
    mig, base = [], []
    results["migrator"], results["runc"] = mig, base
    for rep in range(args.repeats):
        m = migrator_move(a, b)
        m["service"] = service(b) if running_on(b) else "not running on b"
        mig.append(m)
        log(f"  [rep {rep + 1}] migrator a->b: downtime {m['downtime_ms']:.0f} ms, total "
            f"{m['total_ms']:.0f} ms, {m['sent'] / 2**20:.1f} MiB, rounds {m['round_pages']}, "
            f"service {m['service']}")
        s = runc_move(b, a)
        s["service"] = service(a) if running_on(a) else "not running on a"
        base.append(s)
        log(f"  [rep {rep + 1}] runc b->a: downtime {s['downtime_ms']:.0f} ms "
            f"(checkpoint {s['checkpoint_ms']:.0f}, copy {s['copy_ms']:.0f}, restore "
            f"{s['restore_ms']:.0f}), {s['sent'] / 2**20:.1f} MiB, service {s['service']}")


def fmt(x, spec):
    """``x`` formatted, or "-" in the same width."""
    if x is None:
        width = spec.split(".")[0].lstrip("<>^")
        return "-".rjust(int(width) if width.isdigit() else 1)
    return format(x, spec)


def report(results, args, out) -> None:
    p = lambda s="": print(s, file=out)
    mig, base = results.get("migrator") or [], results.get("runc") or []
    p(f"container benchmark: runc container {NAME} (demo service), {args.size_mib} MiB, "
      f"{args.churn} pages/s rewritten, veth between the nodes shaped to "
      f"{args.link_mbit:g} Mbit/s both ways (tbf), medians of {args.repeats}")
    p(HEADER)
    rows = []
    if mig:
        rows.append(("migrator live (a->b)", mig))
    if base:
        rows.append(("runc ckpt+copy+restore (b->a)", base))
    for name, xs in rows:
        rounds = med([x["rounds"] for x in xs])
        p(f"{name:<29}{fmt(med([x['downtime_ms'] for x in xs]), '11.0f')} "
          f"{fmt(med([x['total_ms'] for x in xs]), '9.0f')} "
          f"{med([x['sent'] for x in xs]) / 2**20:9.1f} {fmt(rounds, '7.0f')}  "
          f"{','.join(sorted({x['service'] for x in xs}))}")
    if mig:
        p("migrator breakdown (ms, median): " + ", ".join(
            f"{k.removesuffix('_ms')} {med([x['breakdown'].get(k) for x in mig]):.0f}"
            for k in BREAK_KEYS if med([x['breakdown'].get(k) for x in mig]) is not None))
        extra = [k for k in ("rebuild_ms", "criu_restore_ms")
                 if med([x["breakdown"].get(k) for x in mig]) is not None]
        if extra:
            p("  restore at the destination: " + ", ".join(
                f"{k[:-3]} {med([x['breakdown'][k] for x in mig]):.0f}" for k in extra))
        p("  pages per round (each repeat): "
          + "; ".join(str(x["round_pages"]) for x in mig))
    if base:
        p(f"runc parts (ms, median): checkpoint {med([x['checkpoint_ms'] for x in base]):.0f}, "
          f"copy {med([x['copy_ms'] for x in base]):.0f}, "
          f"restore {med([x['restore_ms'] for x in base]):.0f}")
    if mig and base:
        d = med([x["downtime_ms"] for x in mig]) / med([x["downtime_ms"] for x in base])
        t = med([x["total_ms"] for x in mig]) / med([x["total_ms"] for x in base])
        w = med([x["sent"] for x in mig]) / med([x["sent"] for x in base])
        results["ratios"] = {"downtime": d, "total": t, "wire": w}
        p(f"ratios migrator / runc: downtime {d:.3f}x, total time {t:.2f}x, "
          f"bytes on the wire {w:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-mib", type=int, default=256, help="the service's memory (256)")
    ap.add_argument("--churn", type=int, default=2000,
                    help="pages the service rewrites per second (2000, about 8 MiB/s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--link-mbit", type=float, default=1000.0)
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 repeat")
    ap.add_argument("--json", action="store_true",
                    help="figures as one JSON object on stdout, report on stderr")
    args = ap.parse_args()
    if args.quick:
        args.size_mib, args.repeats = 64, 1
    if os.geteuid() != 0:
        log("containers.py needs root (test-bed nodes)")
        return 2
    from tests.beds import image, nodes
    results: dict = {"args": vars(args)}
    try:
        nodes.cleanup_stale()
        img = image.ensure_image(log=log)
        with nodes.cluster(2, image=img) as (a, b):
            try:
                bench(a, b, args, results)
            finally:
                # runc state and host-side veths live in the nodes' own
                # namespaces and die with them; removing the container
                # first is what lets its cgroup go quietly.
                for n in (a, b):
                    remove_container(n)
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    except (BenchError, subprocess.SubprocessError, OSError) as e:
        log(f"benchmark failed: {e}")
        report(results, args, sys.stderr)
        return 1
    report(results, args, sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(results, default=str))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
