from hypothesis import given
from hypothesis import strategies as st

from migrator.ranges import PAGE_SIZE, RangeList

pages = st.sets(st.integers(0, 200), max_size=60)


def rl(ps):
    return RangeList((p * PAGE_SIZE, (p + 1) * PAGE_SIZE) for p in ps)


def as_pages(r):
    return {a // PAGE_SIZE for a in r.pages()}


@given(pages, pages)
def test_set_algebra_matches_python_sets(a, b):
    assert as_pages(rl(a) | rl(b)) == a | b
    assert as_pages(rl(a) & rl(b)) == a & b
    assert as_pages(rl(a) - rl(b)) == a - b


@given(pages)
def test_normalised_runs_do_not_touch(a):
    r = rl(a)
    runs = list(r)
    assert all(e1 < s2 for (_, e1), (s2, _) in zip(runs, runs[1:]))
    assert r.npages() == len(a)
    for p in range(0, 201):
        assert r.contains(p * PAGE_SIZE) == (p in a)


def test_overlapping_input_is_merged():
    r = RangeList([(0, 10), (5, 20), (20, 30), (40, 50)])
    assert list(r) == [(0, 30), (40, 50)]
    assert r.nbytes() == 40


def test_empty_ranges_are_dropped():
    assert not RangeList([(5, 5), (9, 3)])


@given(pages, st.integers(0, 201), st.integers(0, 201), st.integers(0, PAGE_SIZE - 1))
def test_clip_is_intersection_with_a_window(a, lo, hi, shift):
    # byte-granular edges too: the window may cut a page
    start, end = lo * PAGE_SIZE + shift, hi * PAGE_SIZE
    got = rl(a).clip(start, end)
    assert got == rl(a) & RangeList([(start, end)])
    assert all(start <= s < e <= end for s, e in got)
