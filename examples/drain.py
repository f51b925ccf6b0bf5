#!/usr/bin/env python3
"""Drain a node: move every registered container to another node.

    drain.py --to HOST:PORT [--parallel N] [--migrator CMD] [--send-arg ARG]...

Lists the containers the poststart hook registered (`migrator list --json`),
then runs `migrator send ID --to TARGET --json` for each, N at a time, and
prints one line per container:

    migrated   the container runs on the target; the source copy is gone
    failed     the migration failed and the container still runs here
               (exit code 6), or it could not start (the reason says why)
    undecided  the hand-over's outcome is unknown (exit code 7): the message
               says which side is stopped and the `migrator resolve` command
               that finishes or undoes it; neither copy is running meanwhile

It knows the CLI only through its stable interface: JSON events on stdout
(one object per line, `{"event": ...}`; errors as `{"event": "error",
"message", "exit_code"}`) and exit codes (migrator/cli/exits.py).  Exit
status: 0 all migrated, 1 some failed (their sources run), 7 at least one
undecided (look at those first), 130 interrupted.

Ctrl-C (or SIGTERM) sends SIGTERM to the running `migrator send`s, which
roll back (the source keeps running), and waits for them.
"""

from __future__ import annotations

import argparse
import json
import shlex
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

# migrator/cli/exits.py; copied, not imported: this script runs wherever
# the CLI is, without the package on its path.
OK, NO_PROCESS, MIGRATION, UNDECIDED, INTERRUPTED = 0, 3, 6, 7, 130


@dataclass
class Outcome:
    id: str
    status: str                  # migrated | failed | undecided | skipped | interrupted
    detail: str = ""
    exit_code: Optional[int] = None
    events: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"id": self.id, "status": self.status, "detail": self.detail,
                "exit_code": self.exit_code}


class Drain:
    def __init__(self, migrator: list[str], target: str, send_args: list[str],
                 parallel: int, timeout: Optional[float]):
        self.migrator = migrator
        self.target = target
        self.send_args = send_args
        self.parallel = parallel
        self.timeout = timeout
        self.stopping = threading.Event()
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    def containers(self) -> list[dict]:
        res = subprocess.run([*self.migrator, "list", "--json"], capture_output=True,
                             text=True, timeout=30)
        if res.returncode != 0:
            raise RuntimeError(f"'migrator list' failed ({res.returncode}): "
                               f"{res.stderr.strip()}")
        return json.loads(res.stdout)

    def send(self, cid: str) -> Outcome:
        if self.stopping.is_set():
            return Outcome(cid, "interrupted", "not started: drain interrupted")
        argv = [*self.migrator, "send", cid, "--to", self.target, "--json", *self.send_args]
        with self._lock:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, text=True)
            self._procs[cid] = proc
        events, errors = [], []
        # stderr in a thread: a full stderr pipe must not stall the child
        # while we read stdout.
        err_reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()),
                                      daemon=True)
        err_reader.start()
        timer = None
        if self.timeout:
            timer = threading.Timer(self.timeout, proc.send_signal, args=(signal.SIGTERM,))
            timer.start()
        try:
            for line in proc.stdout:
                line = line.strip()
                if not line:
                    continue
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue  # not an event (the CLI's contract says it is)
                if isinstance(ev, dict):
                    events.append(ev)
            code = proc.wait()
        finally:
            if timer:
                timer.cancel()
            err_reader.join(5)
            with self._lock:
                self._procs.pop(cid, None)
        return classify(cid, code, events, "".join(errors))

    def interrupt(self) -> None:
        """SIGTERM every running send, by pid: each rolls back on its own."""
        self.stopping.set()
        with self._lock:
            for proc in self._procs.values():
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)

    def run(self, ids: list[str]) -> list[Outcome]:
        with ThreadPoolExecutor(max_workers=self.parallel) as pool:
            futures = [pool.submit(self.send, cid) for cid in ids]
            return [f.result() for f in futures]


def _last_error(events: list) -> Optional[dict]:
    for ev in reversed(events):
        if ev.get("event") == "error":
            return ev
    return None


def classify(cid: str, code: int, events: list, stderr: str) -> Outcome:
    """What one `migrator send` run means, from its exit code and events."""
    err = _last_error(events)
    message = (err or {}).get("message") or (stderr.strip().splitlines() or [""])[-1]
    if code == OK:
        done = next((e for e in reversed(events) if e.get("event") == "done"), {})
        bits = []
        if done.get("downtime_ms") is not None:
            bits.append(f"downtime {done['downtime_ms']:.0f} ms")
        if done.get("rounds") is not None:
            bits.append(f"{done['rounds']} rounds")
        return Outcome(cid, "migrated", ", ".join(bits), code, events)
    if code == UNDECIDED:
        return Outcome(cid, "undecided",
                       f"{message} -- finish or undo it with 'migrator resolve' "
                       "on the target (see the message) before anything else", code, events)
    if code == MIGRATION:
        return Outcome(cid, "failed", f"{message} (still running here)", code, events)
    if code == NO_PROCESS:
        return Outcome(cid, "failed", f"{message} (the container is gone)", code, events)
    if code in (INTERRUPTED, -signal.SIGTERM):
        return Outcome(cid, "interrupted", message or "interrupted", code, events)
    return Outcome(cid, "failed", message or f"exit code {code}", code, events)


def exit_status(outcomes: list[Outcome]) -> int:
    statuses = {o.status for o in outcomes}
    if "undecided" in statuses:
        return UNDECIDED
    if "interrupted" in statuses:
        return INTERRUPTED
    if "failed" in statuses:
        return 1
    return OK


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--to", required=True, help="target HOST:PORT ('migrator recv' there)")
    ap.add_argument("--parallel", type=int, default=2, help="migrations at a time (2)")
    ap.add_argument("--migrator", default="migrator",
                    help="the CLI command, split like a shell would ('migrator')")
    ap.add_argument("--send-arg", action="append", default=[],
                    help="extra argument for every 'migrator send' (repeatable), "
                         "e.g. --send-arg=--psk-file=/etc/migrator/psk")
    ap.add_argument("--only", action="append", default=[], help="drain only this id (repeatable)")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per migration before it is asked to stop")
    ap.add_argument("--json", action="store_true", help="the report as one JSON array")
    args = ap.parse_args(argv)
    if args.parallel < 1:
        ap.error("--parallel must be at least 1")

    drain = Drain(shlex.split(args.migrator), args.to, args.send_arg, args.parallel,
                  args.timeout)
    try:
        entries = drain.containers()
    except (OSError, RuntimeError, ValueError, subprocess.TimeoutExpired) as e:
        print(f"drain: cannot list containers: {e}", file=sys.stderr)
        return 1
    outcomes, ids = [], []
    for e in entries:
        if args.only and e["id"] not in args.only:
            continue
        if not e.get("alive", True):
            # poststop never ran for it: nothing to migrate.
            outcomes.append(Outcome(e["id"], "skipped", "registered but not running"))
        else:
            ids.append(e["id"])

    def on_signal(signum, frame):
        drain.interrupt()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        outcomes += drain.run(ids)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)

    if args.json:
        print(json.dumps([o.as_dict() for o in outcomes]))
    else:
        for o in outcomes:
            print(f"{o.id:<24} {o.status:<11} {o.detail}", flush=True)
        counts = {}
        for o in outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        print("drain: " + (", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
                           or "nothing registered"))
    return exit_status(outcomes)


if __name__ == "__main__":
    sys.exit(main())
