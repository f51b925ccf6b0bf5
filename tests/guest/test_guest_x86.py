"""The linux test tier inside Debian's soft-dirty x86_64 kernel (qemu, TCG).

The host kernel lacks CONFIG_MEM_SOFT_DIRTY, so the soft-dirty cases of
tests/linux skip there.  Here they run inside a guest whose kernel has it;
the guest's junit report comes back to the host and is judged here.  A
guest that boots but fails is a failure; only a missing capability (qemu,
kernel download, node image) skips.

The same boot then runs benchmarks/collect.py, the one kernel here where
soft-dirty and uffd-wp can be measured side by side; its table is printed
(emulation distorts absolute times, ratios on one kernel still compare).

MIGRATOR_GUEST_X86_TESTS  paths/options for the in-guest pytest (default tests/linux)
MIGRATOR_GUEST_BENCH      arguments of the in-guest benchmark
                          (default: --size-mib 256 --repeats 3 --spin-s 1)
MIGRATOR_GUEST_TIMEOUT    seconds for the whole boot (default 780)
"""

import os
import shlex

import pytest

from tests.beds import guest

pytestmark = pytest.mark.guest_x86

TIMEOUT = float(os.environ.get("MIGRATOR_GUEST_TIMEOUT", "780"))
SELECTION = shlex.split(os.environ.get("MIGRATOR_GUEST_X86_TESTS", "tests/linux"))
JUNIT = "junit.xml"
BENCH_ARGS = os.environ.get("MIGRATOR_GUEST_BENCH",
                            "--size-mib 256 --repeats 3 --spin-s 1")


@pytest.fixture(scope="module")
def guest_run():
    command = ("python3 -m pytest -q -rs -p no:cacheprovider "
               + " ".join(shlex.quote(a) for a in SELECTION)
               + f' --junitxml="$MIGRATOR_GUEST_RESULTS/{JUNIT}"; rc=$?; '
               # the benchmark's exit status is judged by its own test
               + f"python3 benchmarks/collect.py {BENCH_ARGS} --json "
               + '>"$MIGRATOR_GUEST_RESULTS/collect.json" '
               + '2>"$MIGRATOR_GUEST_RESULTS/collect.txt"; '
               + 'echo $? >"$MIGRATOR_GUEST_RESULTS/collect.rc"; exit $rc')
    try:
        r = guest.run_guest("x86_64", command, TIMEOUT)
    except guest.GuestUnavailable as e:
        pytest.skip(f"x86_64 soft-dirty guest unavailable: {e}")
    print(f"\nguest kernel: {r.kernel_release}; first output after {r.boot_seconds:.1f} s; "
          f"qemu ran {r.total_seconds:.1f} s; in-guest pytest exit {r.returncode}")
    print("\n".join(r.output.splitlines()[-15:]))
    return r


def test_guest_kernel_has_soft_dirty(guest_run):
    assert guest_run.kernel_release.endswith("-cloud-amd64"), guest_run.kernel_release


def test_guest_linux_tier_passes(guest_run):
    r = guest_run
    if JUNIT not in r.files:
        pytest.fail(f"the guest wrote no junit report (exit {r.returncode}); output tail:\n"
                    + "\n".join(r.output.splitlines()[-40:]))
    cases = list(guest.junit_cases(r.files[JUNIT]))
    failed = [f"{cid}: {msg}" for cid, outcome, msg in cases if outcome == "failed"]
    counts = {o: sum(1 for _, oc, _ in cases if oc == o) for o in ("passed", "failed", "skipped")}
    print(f"guest tests: {counts}")
    for cid, outcome, msg in cases:
        if outcome == "skipped":
            print(f"  skipped in guest: {cid}: {msg}")
    assert not failed, "failed inside the guest:\n" + "\n".join(failed)
    assert r.returncode == 0, (f"in-guest pytest exited {r.returncode}; output tail:\n"
                               + "\n".join(r.output.splitlines()[-40:]))
    assert cases, "the guest ran no tests"


def test_guest_ran_soft_dirty_tests(guest_run):
    if JUNIT not in guest_run.files:
        pytest.fail("the guest wrote no junit report")
    cases = list(guest.junit_cases(guest_run.files[JUNIT]))
    sd = [(cid, o, m) for cid, o, m in cases
          if "soft_dirty" in cid.lower() or "soft-dirty" in cid.lower()]
    passed = [cid for cid, o, _ in sd if o == "passed"]
    for cid, o, m in sd:
        print(f"  {o}: {cid} {m}")
    # Zero is a failure, never a skip: this guest exists to run them.
    assert passed, ("no soft-dirty test passed inside the soft-dirty guest "
                    f"({len(sd)} found: {[(c, o, m) for c, o, m in sd]})")


def test_guest_migrated_with_soft_dirty(guest_run):
    """A whole live migration (there and back) tracked by soft-dirty: the
    only kernel here that has it.  Zero is a failure, never a skip."""
    if JUNIT not in guest_run.files:
        pytest.fail("the guest wrote no junit report")
    cases = list(guest.junit_cases(guest_run.files[JUNIT]))
    mig = [(cid, o, m) for cid, o, m in cases
           if "test_local_migration" in cid and "soft-dirty" in cid]
    assert any(o == "passed" for _, o, _ in mig), (
        f"no live migration with soft-dirty passed in the guest: {mig}")


def test_guest_collect_benchmark(guest_run):
    """Prints the side-by-side table; asserts only that both trackers were
    measured, never a timing."""
    import json
    files = guest_run.files
    if "collect.txt" in files:
        print("\n" + files["collect.txt"].decode(errors="replace"))
    rc = files.get("collect.rc", b"?").decode().strip()
    assert rc == "0", f"benchmark exit status in the guest: {rc}"
    figures = json.loads(files["collect.json"])
    measured = json.dumps(figures)
    for tracker in ("soft-dirty", "uffd-wp"):
        assert tracker in measured, f"{tracker} was not measured in the guest"
