"""`migrator hook STAGE` (the OCI hook entry point) and `migrator list`.

Registered on the main app by `register(app)`; also runnable on its own as
`python3 -m migrator.cli.hook hook STAGE`, which never loads the native
module: a hook runs at every container start and must not fail (and fail
the start) because the dirty-tracking layer is missing or stale.

Exit codes: 0 done (or nothing to do), 1 the hook failed or ran out of
time, 2 bad usage or a malformed state on stdin.  The values are
migrator.cli.exits' FAILURE and USAGE; that module is not imported here
because it loads the native module (tests check the values agree).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from contextlib import contextmanager
from typing import Annotated, Optional

import typer

FAILURE = 1
USAGE = 2
DEFAULT_TIMEOUT = 5.0
# After the soft deadline (an exception in the main thread), this much more
# for cleanup before the watchdog ends the process outright.
_GRACE = 1.0


@contextmanager
def _time_limit(seconds: float, stage: str):
    """Bound the whole hook: SIGALRM raises HookTimeout in the main thread
    (unwinding through every `finally`), and a watchdog thread exits the
    process if that cannot happen (stuck in C code, a handler swallowed)."""
    from migrator.hooks.stages import HookTimeout

    def on_alarm(signum, frame):
        raise HookTimeout(f"timed out after {seconds:g}s")

    def hard_exit():
        os.write(2, f"migrator hook {stage}: timed out after {seconds:g}s "
                    "(forced exit)\n".encode())
        os._exit(FAILURE)

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    watchdog = threading.Timer(seconds + _GRACE, hard_exit)
    watchdog.daemon = True
    watchdog.start()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
        watchdog.cancel()


def hook(
    stage: Annotated[str, typer.Argument(
        help="OCI hook stage: poststart, poststop or createRuntime.")],
    runtime: Annotated[Optional[str], typer.Option(
        "--runtime", help="Runtime name to record (default: the hook's parent process).")] = None,
    registry_dir: Annotated[Optional[str], typer.Option(
        "--registry", help="Registry directory (default $MIGRATOR_REGISTRY or "
                           "/run/migrator/containers).")] = None,
    timeout: Annotated[float, typer.Option(
        "--timeout", min=0.1, help="Seconds the hook may take at most.")] = DEFAULT_TIMEOUT,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print what the hook did as one JSON object.")] = False,
):
    """OCI runtime hook: reads the container state on stdin."""
    from migrator.hooks import stages
    try:
        stage = stages.canonical_stage(stage)
    except stages.HookError as e:
        print(f"migrator hook: {e}", file=sys.stderr, flush=True)
        raise typer.Exit(USAGE)
    try:
        with _time_limit(timeout, stage):
            deadline = stages.Deadline(timeout)
            text = stages.read_state(sys.stdin.fileno(), deadline)
            result = stages.run(stage, text, deadline, runtime, registry_dir)
    except stages.StateError as e:
        print(f"migrator hook {stage}: {e}", file=sys.stderr, flush=True)
        raise typer.Exit(USAGE)
    except (stages.HookError, OSError) as e:
        # One line: runtimes quote the hook's stderr in their own error.
        msg = " ".join(str(e).split())
        print(f"migrator hook {stage}: {msg}", file=sys.stderr, flush=True)
        raise typer.Exit(FAILURE)
    if as_json:
        print(json.dumps(result), flush=True)


def list_(
    as_json: Annotated[bool, typer.Option("--json", help="A JSON array.")] = False,
    registry_dir: Annotated[Optional[str], typer.Option(
        "--registry", help="Registry directory (default $MIGRATOR_REGISTRY or "
                           "/run/migrator/containers).")] = None,
):
    """Containers registered by the poststart hook."""
    from migrator.hooks import registry
    try:
        entries = registry.all(registry_dir)
    except OSError as e:
        print(f"migrator: cannot read the registry: {e}", file=sys.stderr)
        raise typer.Exit(FAILURE)
    if as_json:
        print(json.dumps(entries), flush=True)
        return
    if not entries:
        print(f"no registered containers in {registry.directory(registry_dir)}")
        return
    print(f"{'ID':<24} {'PID':>8} {'RUNTIME':<8} {'ALIVE':<5} CGROUP")
    for e in entries:
        print(f"{e['id']:<24} {e['pid']:>8} {str(e.get('runtime')):<8} "
              f"{'yes' if e['alive'] else 'no':<5} {e.get('cgroup') or '-'}")


def register(app: typer.Typer) -> None:
    """Add `hook` and `list` to ``app``."""
    app.command("hook")(hook)
    app.command("list")(list_)


cli = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="migrator's OCI hook and container registry.")
register(cli)

if __name__ == "__main__":
    cli()
