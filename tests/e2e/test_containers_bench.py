"""Smoke test of benchmarks/containers.py: `--quick` runs end to end in two
nodes and prints its table.  No timing is checked: the figures are for
people, not for asserts."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "containers.py"

pytestmark = pytest.mark.e2e

HEADER = "method                       downtime-ms  total-ms  wire-MiB  rounds  service"


def test_containers_bench_quick_runs_and_prints_its_table(bed_image):
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900, check=False,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert HEADER in r.stdout, r.stdout
