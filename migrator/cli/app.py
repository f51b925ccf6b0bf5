"""`migrator` commands."""

from __future__ import annotations

import json
import signal
import sys
from typing import Annotated, Optional

import typer

from migrator.cli import exits

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
