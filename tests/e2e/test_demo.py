"""`migrator demo` as a new user runs it: two nodes, a container with a
TCP client, a live migration, a summary."""

import json
import subprocess
import sys

import pytest


def test_demo_migrates_and_keeps_the_connection():
    from tests.beds import image
    try:
        image.ensure_image()
    except Exception as e:  # noqa: BLE001 - any reason the image cannot be had
        pytest.skip(f"node image cannot be built: {e}")
    r = subprocess.run([sys.executable, "-m", "migrator", "demo", "--json"],
                       capture_output=True, text=True, timeout=600)
    print(r.stdout[-3000:], r.stderr[-3000:])
    summary = json.loads(r.stdout.splitlines()[-1])
    assert summary["running_on_b"] and not summary["left_on_a"]
    assert summary["migration"]["event"] == "done"
    assert summary["client"]["bad"] == 0
    assert summary["client"]["connection_survived"], summary["client"]
    assert r.returncode == 0
