"""The arm64 guests: Debian's arm64 cloud kernel under qemu (TCG).

arm64 has no soft-dirty at all, so dirty tracking there rests on
userfaultfd write-protect.  Two boots of the real arm64 kernel:

* the native self-test from a tiny initramfs: it must pass and exercise
  uffd-wp;
* the Python tier (trackers, syscall injection, CLI, a live migration into
  a pid namespace and back with each tracker the kernel offers) inside the
  arm64 node image, with the cffi extension built for its Python; its
  junit report comes back to the host and is judged here.  This is the
  only place the aarch64 injection code, the Python uffd-wp tracker and a
  whole migration run on arm64.

A guest that boots but fails is a failure; only a missing capability
(qemu, cross compiler, kernel download, qemu-user binfmt to bootstrap the
arm64 image) skips, and says which.

MIGRATOR_GUEST_ARM64_TIMEOUT       seconds for the self-test boot (default 300)
MIGRATOR_GUEST_ARM64_TIER_TIMEOUT  seconds for the Python-tier boot (default 1200)
MIGRATOR_GUEST_ARM64_TESTS         paths/options for the in-guest pytest
                                   (default: the trackers, inject, CLI and
                                   local migration tests, and the checksum's)
MIGRATOR_GUEST_ARM64_EXAMPLES      hypothesis examples per property test in the
                                   guest (default: the project's profile, 60;
                                   one uffd-wp scenario costs about 2.5 s
                                   under TCG, the whole default run about
                                   8 minutes)
"""

import os
import re
import shlex

import pytest

from tests.beds import guest

pytestmark = pytest.mark.guest_arm64

TIMEOUT = float(os.environ.get("MIGRATOR_GUEST_ARM64_TIMEOUT", "300"))
TIER_TIMEOUT = float(os.environ.get("MIGRATOR_GUEST_ARM64_TIER_TIMEOUT", "1200"))
TIER_SELECTION = shlex.split(os.environ.get(
    "MIGRATOR_GUEST_ARM64_TESTS",
    "tests/linux/test_trackers.py tests/linux/test_inject.py tests/linux/test_cli.py "
    "tests/linux/test_local_migration.py tests/unit/test_checksum.py"))
TIER_EXAMPLES = os.environ.get("MIGRATOR_GUEST_ARM64_EXAMPLES")
JUNIT = "junit.xml"


@pytest.fixture(scope="module")
def selftest():
    try:
        r = guest.run_guest("arm64", None, TIMEOUT)
    except guest.GuestUnavailable as e:
        pytest.skip(f"arm64 guest unavailable: {e}")
    print(f"\nguest kernel: {r.kernel_release}; first output after {r.boot_seconds:.1f} s; "
          f"qemu ran {r.total_seconds:.1f} s; self-test exit {r.returncode}")
    print(r.output)
    return r


def test_arm64_kernel(selftest):
    assert selftest.kernel_release.endswith("-cloud-arm64"), selftest.kernel_release


def test_arm64_selftest_passes(selftest):
    assert re.search(r"^selftest: PASS\s*$", selftest.output, re.M), selftest.output
    assert selftest.returncode == 0, selftest.output


def test_arm64_crc32c_instruction(selftest):
    # the page checksum runs on the CPU's CRC32 extension, checked against
    # the table loop by the self-test
    assert re.search(r"^crc32c: armv8-crc32, agrees", selftest.output, re.M), selftest.output


def test_arm64_uffd_wp_exercised(selftest):
    lines = [l for l in selftest.output.splitlines() if re.search(r"uffd[-_ ]?wp", l, re.I)]
    assert lines, "the self-test output has no uffd-wp line:\n" + selftest.output
    bad = [l for l in lines if re.search(r"\b(skip|skipped|fail|failed|unsupported)\b", l, re.I)]
    assert not bad, "uffd-wp was not exercised:\n" + "\n".join(bad)
    sd = [l for l in selftest.output.splitlines() if re.search(r"soft[-_ ]?dirty", l, re.I)]
    print("soft-dirty on arm64: " + ("; ".join(sd) if sd else "(no soft-dirty line)"))


# ---------------------------------------------------------------- Python tier

def _tier_command() -> str:
    pytest_cmd = "python3 -m pytest"
    if TIER_EXAMPLES:
        # The project's conftest loads the hypothesis profile named by
        # MIGRATOR_HYPOTHESIS; one registered before pytest starts sets the
        # property tests' scenario count without changing what they check.
        runner = ("import sys, pytest; from hypothesis import settings; "
                  f"settings.register_profile('guest-arm64', "
                  f"max_examples={int(TIER_EXAMPLES)}); "
                  "sys.exit(pytest.main(sys.argv[1:]))")
        pytest_cmd = "MIGRATOR_HYPOTHESIS=guest-arm64 python3 -c " + shlex.quote(runner)
    return (pytest_cmd + " -q -rs -p no:cacheprovider --durations=15 "
            + " ".join(shlex.quote(a) for a in TIER_SELECTION)
            + f' --junitxml="$MIGRATOR_GUEST_RESULTS/{JUNIT}"')


@pytest.fixture(scope="module")
def tier():
    try:
        r = guest.run_guest("arm64", _tier_command(), TIER_TIMEOUT, rootfs=True)
    except guest.GuestUnavailable as e:
        pytest.skip(f"arm64 root-disk guest unavailable: {e}")
    print(f"\narm64 guest kernel: {r.kernel_release}; first output after "
          f"{r.boot_seconds:.1f} s; qemu ran {r.total_seconds:.1f} s; "
          f"in-guest pytest exit {r.returncode}")
    print("\n".join(r.output.splitlines()[-25:]))
    return r


def _tier_cases(r):
    if JUNIT not in r.files:
        pytest.fail(f"the arm64 guest wrote no junit report (exit {r.returncode}); "
                    "output tail:\n" + "\n".join(r.output.splitlines()[-40:]))
    return list(guest.junit_cases(r.files[JUNIT]))


def test_arm64_tier_kernel(tier):
    assert tier.kernel_release.endswith("-cloud-arm64"), tier.kernel_release


def test_arm64_tier_passes(tier):
    cases = _tier_cases(tier)
    counts = {o: sum(1 for _, oc, _ in cases if oc == o) for o in ("passed", "failed", "skipped")}
    print(f"arm64 guest ({tier.kernel_release}) tests: {counts}")
    for cid, outcome, msg in cases:
        if outcome == "skipped":
            print(f"  skipped in arm64 guest: {cid}: {msg}")
    failed = [f"{cid}: {msg}" for cid, outcome, msg in cases if outcome == "failed"]
    assert not failed, "failed inside the arm64 guest:\n" + "\n".join(failed)
    assert tier.returncode == 0, (f"in-guest pytest exited {tier.returncode}; output tail:\n"
                                  + "\n".join(tier.output.splitlines()[-40:]))
    assert cases, "the arm64 guest ran no tests"


def test_arm64_tier_ran_uffd_wp_trackers(tier):
    cases = _tier_cases(tier)
    wp = [(cid, o, m) for cid, o, m in cases
          if "test_trackers" in cid and re.search(r"uffd[-_]?wp", cid, re.I)]
    for cid, o, m in wp:
        print(f"  {o}: {cid} {m}")
    # Zero is a failure, never a skip: uffd-wp is arm64's only tracker.
    assert any(o == "passed" for _, o, _ in wp), (
        f"no uffd-wp tracker test passed inside the arm64 guest ({len(wp)} found: {wp})")


def test_arm64_tier_migrated_with_uffd_wp(tier):
    """A whole live migration (there and back) on arm64, tracked by uffd-wp:
    the pre-copy no other tool has there.  Zero is a failure, never a skip."""
    cases = _tier_cases(tier)
    mig = [(cid, o, m) for cid, o, m in cases
           if "test_local_migration" in cid and "uffd-wp" in cid]
    assert any(o == "passed" for _, o, _ in mig), (
        f"no live migration with uffd-wp passed inside the arm64 guest: {mig}")
