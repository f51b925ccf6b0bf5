"""What the benchmarks that run in test-bed nodes (migration.py,
containers.py) share: their error, their log, reading the logs and JSON
event lines their services write, waiting, and running a command in a
node that must succeed."""

from __future__ import annotations

import json
import pathlib
import sys

from tests.beds import waiting


class BenchError(Exception):
    """The benchmark cannot go on."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read(path) -> str:
    try:
        return pathlib.Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return ""


def events(text: str) -> list[dict]:
    """The JSON objects among the lines of `text` (other lines skipped)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def wait_for(cond, timeout, what):
    return waiting.wait_for(cond, timeout, what, interval=0.05, error=BenchError)


def run(node, cmd, timeout=600, check=True):
    r = node.run(cmd, check=False, timeout=timeout)
    if check and r.returncode != 0:
        raise BenchError(f"{node.name}: {cmd if isinstance(cmd, str) else ' '.join(cmd)}"
                         f" exited {r.returncode}\n{r.stdout[-1500:]}\n{r.stderr[-1500:]}")
    return r
