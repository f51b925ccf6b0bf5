"""`migrator` commands."""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Annotated, Optional

import typer

from migrator.cli import exits
from migrator.cli import hook as hook_commands

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Live migration of Linux processes and containers.")


def _emitter(as_json: bool):
    def emit(message: str, code: int) -> None:
        if as_json:
            print(json.dumps({"event": "error", "message": message,
                              "exit_code": code}), flush=True)
        print(f"migrator: {message}", file=sys.stderr, flush=True)
    return emit


def _sigterm_as_interrupt() -> None:
    """SIGTERM ends a command like Ctrl-C: through every `finally`, so
    trackers are detached and nothing is left in the target."""
    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, raise_interrupt)


@app.command()
def probe(
    pid: Annotated[Optional[list[int]], typer.Option(
        "--pid", help="Also decide the tracker for this process (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
):
    """Kernel capabilities for dirty tracking, and the tracker each process would get."""
    from migrator.tracking.report import probe_report
    with exits.errors_to_exit(_emitter(as_json)):
        report = probe_report(pid or [])
    if as_json:
        print(json.dumps(report, indent=None))
        return
    print(f"arch      {report['arch']}")
    print(f"kernel    {report['kernel']}")
    for cap, ok in report["capabilities"].items():
        print(f"  {cap:<24} {'yes' if ok else 'no ':<4} {report['evidence'][cap]}")
    d = report["default_tracker"]
    print(f"default tracker: {d['tracker']} ({d['reason']})")
    for p in report["processes"]:
        print(f"pid {p['pid']}: {p['tracker']} ({p['reason']})")


@app.command()
def track(
    pid: Annotated[int, typer.Option("--pid", help="Process to track.")],
    tracker: Annotated[Optional[str], typer.Option(
        "--tracker", help="Force a tracker: uffd-wp, soft-dirty or full.")] = None,
    interval: Annotated[float, typer.Option(
        "--interval", min=0.0, help="Seconds between collects.")] = 1.0,
    rounds: Annotated[Optional[int], typer.Option(
        "--rounds", min=1, help="Stop after this many rounds (default: until Ctrl-C).")] = None,
    ranges: Annotated[bool, typer.Option(
        "--ranges", help="Include the dirty ranges ([start, end) in hex).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="One JSON object per round, one per line.")] = False,
):
    """Track the pages a process writes, round by round, then detach without a trace."""
    from migrator.tracking.report import Round, track as run
    _sigterm_as_interrupt()
    with exits.errors_to_exit(_emitter(as_json)):
        for item in run(pid, tracker, interval, rounds, ranges):
            if not isinstance(item, Round):
                if not as_json:
                    print(f"pid {pid}: tracker {item.tracker} ({item.reason})",
                          flush=True)
                continue
            if as_json:
                print(json.dumps(item.as_dict()), flush=True)
                continue
            rate = item.dirty_bytes_per_s / 2**20
            print(f"round {item.round:>4}  {item.tracker:<10} "
                  f"dirty {item.dirty_pages:>9} pages  {rate:9.2f} MiB/s  "
                  f"collect {item.collect_ms:7.2f} ms", flush=True)
            if item.ranges is not None:
                for s, e in item.ranges:
                    print(f"    [{s:#x}, {e:#x})")
            for note in item.notes:
                print(f"    note: {note}")


def _auth(psk_file, tls_cert, tls_key, tls_ca, insecure):
    from migrator.migration.transport import Auth
    psk = None
    if psk_file:
        with open(psk_file, "rb") as f:
            psk = f.read().strip()
    a = Auth(psk=psk, tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca,
             insecure=insecure)
    a.check()
    return a


PskFile = Annotated[Optional[str], typer.Option(
    "--psk-file", help="Pre-shared key file (the same on both nodes).")]
TlsCert = Annotated[Optional[str], typer.Option("--tls-cert", help="TLS certificate (PEM).")]
TlsKey = Annotated[Optional[str], typer.Option("--tls-key", help="TLS private key (PEM).")]
TlsCa = Annotated[Optional[str], typer.Option(
    "--tls-ca", help="CA that signed the peer's certificate (mutual TLS).")]
Insecure = Annotated[bool, typer.Option(
    "--insecure", help="Accept an unauthenticated peer (test setups only).")]


class _Progress:
    """Events as JSON lines (--json), or as short human lines."""

    def __init__(self, as_json: bool):
        self.as_json = as_json

    def __call__(self, ev: dict) -> None:
        if self.as_json:
            print(json.dumps(ev), flush=True)
            return
        kind = ev.get("event")
        if kind == "round" and "sent_bytes" in ev:
            bw = (ev["bandwidth"] or 0) / 2**20
            pred = ev.get("predicted_downtime_ms")
            print(f"round {ev['round']:>3}: {ev['dirty_pages']:>8} pages, "
                  f"{ev['sent_bytes'] / 2**20:8.1f} MiB sent, {bw:7.1f} MiB/s"
                  + (f", next switch-over ~{pred:.0f} ms" if pred is not None else ""),
                  flush=True)
        elif kind == "done" and "downtime_ms" in ev:
            print(f"done: {ev['rounds']} rounds, tracker {ev['tracker']}, "
                  f"downtime {ev['downtime_ms']:.0f} ms, total "
                  f"{ev['total_ms']:.0f} ms, {ev['sent_bytes'] / 2**20:.1f} MiB sent",
                  flush=True)
            for k, v in ev["breakdown_ms"].items():
                print(f"    {k:<16} {v:10.1f}", flush=True)
        else:
            detail = ", ".join(f"{k}={v}" for k, v in ev.items() if k != "event")
            print(f"{kind}: {detail}", flush=True)


@app.command()
def send(
    container: Annotated[Optional[str], typer.Argument(
        help="runc/crun container id or podman container name to migrate "
        "(instead of --pid).")] = None,
    pid: Annotated[Optional[int], typer.Option("--pid", help="Root of the process tree to migrate.")] = None,
    to: Annotated[str, typer.Option("--to", help="Destination HOST:PORT (migrator recv).")] = ...,
    runtime: Annotated[Optional[str], typer.Option(
        "--runtime", help="runc, crun or podman (default: the one that has CONTAINER).")] = None,
    shared_storage: Annotated[bool, typer.Option(
        "--shared-storage", help="The destination sees the same rootfs: do not copy it.")] = False,
    downtime_ms: Annotated[float, typer.Option(
        "--downtime-ms", min=1, help="Switch over when the final transfer should fit this.")] = 300,
    max_rounds: Annotated[int, typer.Option("--max-rounds", min=1)] = 30,
    max_time: Annotated[float, typer.Option("--max-time", min=1, help="Seconds of pre-copy at most.")] = 300,
    bandwidth: Annotated[Optional[float], typer.Option(
        "--bandwidth", min=0.1, help="Cap the send rate, MiB/s.")] = None,
    compress: Annotated[str, typer.Option(
        "--compress", help="zstd level (e.g. 1, 3, 19; negative = faster) or 'off'. "
        "Batches that do not compress are sent raw after a 64 KiB probe.")] = "1",
    tracker: Annotated[Optional[str], typer.Option("--tracker", help="Force a tracker.")] = None,
    workdir: Annotated[Optional[str], typer.Option(
        "--workdir", help="Local directory (tmpfs) for the final dump.")] = None,
    tcp_established: Annotated[bool, typer.Option(
        "--tcp-established", help="Checkpoint established TCP connections (CRIU).")] = False,
    shell_job: Annotated[bool, typer.Option("--shell-job", help="The tree is attached to a terminal.")] = False,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Seconds of peer silence that end the migration.")] = 60,
    psk_file: PskFile = None, tls_cert: TlsCert = None, tls_key: TlsKey = None,
    tls_ca: TlsCa = None, insecure: Insecure = False,
    as_json: Annotated[bool, typer.Option("--json", help="JSON events, one per line.")] = False,
):
    """Live-migrate a process tree or a container to a node running 'migrator recv'."""
    from migrator.migration.policy import Limits
    from migrator.migration.source import SendOptions, Source
    from migrator.migration.workload import ProcessTree
    if (pid is None) == (container is None):
        raise typer.BadParameter("give exactly one of --pid or CONTAINER")
    if runtime not in (None, "runc", "crun", "podman"):
        raise typer.BadParameter("--runtime is runc, crun or podman")
    if container is None and (runtime or shared_storage):
        raise typer.BadParameter("--runtime and --shared-storage need CONTAINER")
    _sigterm_as_interrupt()
    emit = _Progress(as_json)
    with exits.errors_to_exit(_emitter(as_json)):
        level = None if compress == "off" else int(compress)
        opts = SendOptions(
            to=to, auth=_auth(psk_file, tls_cert, tls_key, tls_ca, insecure),
            limits=Limits(downtime_ms, max_rounds, max_time),
            bandwidth=bandwidth * 2**20 if bandwidth else None, level=level,
            tracker=tracker, workdir=workdir, tcp_established=tcp_established,
            shell_job=shell_job, io_timeout=timeout)
        if container is None:
            work = ProcessTree(pid, shell_job=shell_job, tcp_established=tcp_established)
        else:
            from migrator.runtime import container_workload
            from migrator.runtime.oci import OciError
            try:
                work = container_workload(container, runtime, shared_storage)
            except OciError as e:
                raise ValueError(str(e)) from None  # a usage problem: exit 1, no traceback
        emit(Source(work, opts, emit).run())


@app.command()
def recv(
    listen: Annotated[str, typer.Option("--listen", help="ADDR:PORT to listen on.")],
    dir: Annotated[str, typer.Option("--dir", help="Where page stores and images go.")],
    once: Annotated[bool, typer.Option("--once", help="Serve one migration, then exit.")] = False,
    parallel: Annotated[int, typer.Option(
        "--parallel", min=1, help="Migrations received at the same time.")] = 4,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Seconds of peer silence that end a migration.")] = 60,
    psk_file: PskFile = None, tls_cert: TlsCert = None, tls_key: TlsKey = None,
    tls_ca: TlsCa = None, insecure: Insecure = False,
    lazy_restore: Annotated[bool, typer.Option(
        "--lazy-restore",
        help="Process trees: resume before their memory is copied in; CRIU's "
             "lazy-pages daemon fills it from the page store meanwhile. Shorter "
             "downtime; if that daemon dies in those seconds, the tree is "
             "killed.")] = False,
    reserve: Annotated[bool, typer.Option(
        "--reserve/--no-reserve",
        help="While pages arrive, hold as much memory as the page stores (paced "
             "in the first round; never more than the node and its cgroups can "
             "spare) and free it step by step as the restore fills the tree, "
             "whose page faults then take memory freed a moment before. "
             "Shortened the restore on the VMs measured.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="JSON events, one per line.")] = False,
):
    """Receive and restore migrations, one after another, until stopped."""
    from migrator.migration.destination import serve
    _sigterm_as_interrupt()
    with exits.errors_to_exit(_emitter(as_json)):
        failures = serve(listen, dir, _auth(psk_file, tls_cert, tls_key, tls_ca,
                                            insecure),
                         _Progress(as_json), once=once, timeout=timeout,
                         parallel=parallel, lazy=lazy_restore, reserve=reserve)
        if once and failures:
            raise SystemExit(exits.MIGRATION)


@app.command()
def resolve(
    dir: Annotated[str, typer.Option("--dir", help="The --dir of 'migrator recv'.")],
    migration: Annotated[str, typer.Option("--migration", help="Migration id.")],
    commit: Annotated[bool, typer.Option(
        "--commit/--abort", help="Resume the restored copy, or destroy it.")] = ...,
):
    """Finish or undo a hand-over whose Commit never arrived."""
    from migrator.migration.destination import resolve as run
    with exits.errors_to_exit(_emitter(False)):
        print(run(dir, migration, commit))


@app.command()
def demo(
    mib: Annotated[int, typer.Option("--mib", min=1, help="Memory of the demo service.")] = 64,
    churn: Annotated[int, typer.Option(
        "--churn", min=1, help="Pages the service rewrites per second.")] = 2000,
    as_json: Annotated[bool, typer.Option("--json", help="The summary as one JSON object.")] = False,
):
    """Live-migrate a sample container between two local nodes and show how it went."""
    from migrator.demo import DemoError, run
    with exits.errors_to_exit(_emitter(as_json)):
        try:
            summary = run(out=(lambda s: None) if as_json else print, mib=mib,
                          churn=churn)
        except DemoError as e:
            raise exits.DemoFailed(str(e)) from e
    if as_json:
        print(json.dumps(summary))
    if not (summary["running_on_b"] and summary["client"].get("connection_survived")):
        raise SystemExit(exits.FAILURE)


# `hook` and `list`: the OCI hook entry and the container registry.
hook_commands.register(app)


def main() -> None:
    # Diagnostics (the commit point, rollbacks) go to stderr; stdout stays
    # for results and --json events.
    import logging
    logging.basicConfig(format="migrator: %(message)s",
                        level=os.environ.get("MIGRATOR_LOG", "INFO").upper(),
                        stream=sys.stderr)
    app()


if __name__ == "__main__":
    main()
