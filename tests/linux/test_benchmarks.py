"""Smoke test of benchmarks/collect.py: it runs end to end on this kernel
(tiny sizes) and prints its table.  No timing is checked: the benchmark's
figures are for people, not for asserts."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "collect.py"


def _bench_processes() -> list[str]:
    """Processes still running from a benchmark's temporary directory."""
    left = []
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            argv0 = (d / "cmdline").read_bytes().split(b"\0")[0].decode()
        except OSError:
            continue
        if "/migrator-bench-" in argv0:
            left.append(f"{d.name}: {argv0}")
    return left


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_collect_quick_runs_and_prints_its_table():
    before = set(_bench_processes())
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "tracker" in r.stdout and "ratio-med" in r.stdout, r.stdout
    # every child it started is gone
    assert set(_bench_processes()) <= before
