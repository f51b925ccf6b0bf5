import pytest

from migrator.tracking.base import TrackerError
from migrator.tracking.features import Capabilities
from migrator.tracking.select import ProcessFacts, choose

ALL = dict(soft_dirty=True, uffd_wp_async=True, pagemap_scan=True,
           pagemap_scan_soft_dirty=True, ptrace_injection=True)


def caps(*off):
    """Capabilities with the named ones missing."""
    flags = {**ALL, **{k: False for k in off}}
    return Capabilities(**flags, why={k: ("ok" if v else "probe said no")
                                      for k, v in flags.items()})


@pytest.mark.parametrize("arch,want", [("arm64", "uffd-wp"),
                                       ("x86_64", "uffd-wp"),
                                       ("ppc64", "soft-dirty"),
                                       ("s390x", "soft-dirty")])
def test_architecture_preference(arch, want):
    assert choose(arch, caps()).tracker == want


def test_arm64_without_uffd_wp_gets_full():
    d = choose("arm64", caps("uffd_wp_async", "soft_dirty"))
    assert d.tracker == "full"
    assert "uffd-wp" in d.reason and "soft-dirty" in d.reason


def test_x86_falls_back_to_soft_dirty_with_reason():
    d = choose("x86_64", caps("uffd_wp_async"))
    assert d.tracker == "soft-dirty"
    assert "not uffd-wp" in d.reason


def test_process_with_userfaultfd_gets_full_even_when_forced_elsewhere():
    facts = ProcessFacts(pid=7, uffd_fds=(5,))
    d = choose("x86_64", caps(), facts)
    assert d.tracker == "full" and "fd 5" in d.reason
    with pytest.raises(TrackerError, match="already uses userfaultfd"):
        choose("x86_64", caps(), facts, forced="uffd-wp")


def test_seccomp_refusal_moves_to_next_tracker():
    facts = ProcessFacts(pid=7, seccomp_mode=2, seccomp_uffd="errno")
    d = choose("x86_64", caps(), facts)
    assert d.tracker == "soft-dirty" and "seccomp" in d.reason
    assert choose("arm64", caps("soft_dirty"), facts).tracker == "full"


def test_forced_impossible_tracker_is_a_clear_error():
    with pytest.raises(TrackerError, match="soft-dirty cannot be used"):
        choose("x86_64", caps("soft_dirty"), forced="soft-dirty")
    with pytest.raises(TrackerError, match="unknown tracker"):
        choose("x86_64", caps(), forced="magic")


def test_forced_possible_tracker():
    d = choose("x86_64", caps(), ProcessFacts(pid=3), forced="full")
    assert (d.tracker, d.pid, d.reason) == ("full", 3, "forced by the user")
