"""The native self-test inside Debian's arm64 cloud kernel (qemu, TCG).

arm64 has no soft-dirty at all, so dirty tracking there rests on
userfaultfd write-protect; this boots the real arm64 kernel and checks that
the self-test passed and exercised uffd-wp.  A guest that boots but fails
is a failure; only a missing capability (qemu, cross compiler, kernel
download) skips.
"""

import os
import re

import pytest

from tests.beds import guest

pytestmark = pytest.mark.guest_arm64

TIMEOUT = float(os.environ.get("MIGRATOR_GUEST_ARM64_TIMEOUT", "300"))


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


def test_arm64_uffd_wp_exercised(selftest):
    lines = [l for l in selftest.output.splitlines() if re.search(r"uffd[-_ ]?wp", l, re.I)]
    assert lines, "the self-test output has no uffd-wp line:\n" + selftest.output
    bad = [l for l in lines if re.search(r"\b(skip|skipped|fail|failed|unsupported)\b", l, re.I)]
    assert not bad, "uffd-wp was not exercised:\n" + "\n".join(bad)
    sd = [l for l in selftest.output.splitlines() if re.search(r"soft[-_ ]?dirty", l, re.I)]
    print("soft-dirty on arm64: " + ("; ".join(sd) if sd else "(no soft-dirty line)"))
