"""Test tiers and capability probes.

Tiers are directories, and each directory's tests get the tier's marker:
tests/unit (no privileges), tests/linux (root on the host kernel),
tests/e2e (test-bed nodes), tests/guest (kernels under qemu).  A tier skips
only when the capability it needs is really missing, and says which.
"""

import os
import pathlib

import pytest

TIERS = {"linux": "linux", "e2e": "e2e"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        parts = pathlib.Path(str(item.fspath)).parts
        if "tests" not in parts:
            continue
        tier = parts[parts.index("tests") + 1]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, TIERS[tier]))
        if tier == "linux" and os.geteuid() != 0:
            item.add_marker(pytest.mark.skip(
                reason="needs root (ptrace, /proc/PID/pagemap, userfaultfd "
                       "of other processes)"))

# Scenario counts for property tests: modest by default (CI's 90 minutes
# cover every tier), "thorough" for a long local run.
from hypothesis import settings  # noqa: E402

settings.register_profile("default", max_examples=60)
settings.register_profile("thorough", max_examples=600)
settings.load_profile(os.environ.get("MIGRATOR_HYPOTHESIS", "default"))
