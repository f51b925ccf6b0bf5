"""Smoke test of benchmarks/migration.py: it runs end to end in two nodes
(tiny sizes) and prints its tables.  No timing is checked: the benchmark's
figures are for people, not for asserts."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "migration.py"

pytestmark = pytest.mark.e2e

HEADERS = ("data     method", "vs-floor", "vs-f+s", "floor+store", "vs-criu", "downtime-ms-med",
           "breakdown (ms, median)", "stop-and-copy", "migrator lazy",
           "VmHWM-MiB-max")


def test_migration_bench_quick_runs_and_prints_its_tables(bed_image):
    r = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--profile", "never"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for h in HEADERS:
        assert h in r.stdout, (h, r.stdout)
    # the workload survived every copy and migration
    assert "BAD" not in r.stdout, r.stdout
