import os

from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.migration.store import BLOCK, PageStore
from migrator.ranges import PAGE_SIZE, RangeList

# page numbers spread over a sparse space: near each other and very far
page_numbers = st.one_of(st.integers(0, 2048),
                         st.integers(2**34, 2**34 + 2048))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(page_numbers, st.integers(1, 700),
                          st.integers(0, 255)), max_size=12))
def test_store_behaves_like_a_dict_of_pages(tmp_path_factory, writes):
    path = str(tmp_path_factory.mktemp("store") / "pages")
    model = {}
    with PageStore(path) as s:
        for first, n, fill in writes:
            data = bytes([fill]) * (n * PAGE_SIZE)
            s.put(first * PAGE_SIZE, data)
            for p in range(first, first + n):
                model[p] = fill
        assert set(a // PAGE_SIZE for a in s.held().pages()) == set(model)
        for first, n, _ in writes:
            data, missing = s.get(first * PAGE_SIZE, n)
            assert not missing
            for i in range(n):
                page = data[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]
                assert page == bytes([model[first + i]]) * PAGE_SIZE


def test_missing_pages_are_reported_and_zero(tmp_path):
    with PageStore(str(tmp_path / "p")) as s:
        s.put(BLOCK, b"x" * PAGE_SIZE)
        data, missing = s.get(BLOCK - PAGE_SIZE, 3)
        assert data[PAGE_SIZE:2 * PAGE_SIZE] == b"x" * PAGE_SIZE
        assert data[:PAGE_SIZE] == bytes(PAGE_SIZE)
        assert missing == RangeList([(BLOCK - PAGE_SIZE, BLOCK),
                                     (BLOCK + PAGE_SIZE, BLOCK + 2 * PAGE_SIZE)])


def test_far_apart_pages_stay_sparse(tmp_path):
    with PageStore(str(tmp_path / "p")) as s:
        s.put(0, b"a" * PAGE_SIZE)
        s.put(0x7F00_0000_0000, b"b" * PAGE_SIZE)
        # two 2 MiB slots of file, two pages of disk: not 127 TiB
        assert os.path.getsize(s.segment_path(0)) <= 2 * BLOCK
        assert s.disk_bytes() <= 64 * PAGE_SIZE


def test_another_process_reads_the_store_from_its_state(tmp_path):
    """state() / open_state(): what store_server.py opens in a process of
    its own (after a msgpack round trip, as it gets it), reading the same
    pages, and still reading them once the files are unlinked."""
    import msgpack

    from migrator.migration import store_server
    s = PageStore(str(tmp_path / "s"))
    pages = {5 * BLOCK: b"a", BLOCK + PAGE_SIZE: b"b", 9 * BLOCK: b"c"}
    for addr, tag in pages.items():   # 5 then 1 then 9: two segments
        s.put(addr, tag * PAGE_SIZE)
    path = str(tmp_path / "state")
    store_server.write_state(path, {7: s})
    with open(path, "rb") as f:
        state = msgpack.unpackb(f.read(), strict_map_key=False)
    r = PageStore.open_state(state[7])
    s.remove()
    try:
        assert len(r.segments()) == 2
        for addr, tag in pages.items():
            assert r.get(addr, 1) == (tag * PAGE_SIZE, RangeList())
        data, missing = r.get(BLOCK, 2)
        assert data[PAGE_SIZE:] == b"b" * PAGE_SIZE
        assert missing == RangeList([(BLOCK, BLOCK + PAGE_SIZE)])
    finally:
        r.close()
