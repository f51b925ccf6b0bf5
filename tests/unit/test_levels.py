"""levels.prepare: the final dump reads its pages from the page stores
through CRIU parent images.  A reader written from CRIU's rules
(criu/pagemap.c: entries rise by address; each PE_PRESENT entry takes the
next pages of the pages image; PE_PARENT pages are looked up in the
directory the "parent" link points to) resolves every dumped page and must
find exactly the bytes the store holds.  The real CRIU reads such images in
tests/e2e/test_criu_images.py and in every migration test."""

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from migrator.criu import images as I
from migrator.migration import levels
from migrator.migration.store import BLOCK, PageStore
from migrator.ranges import PAGE_SIZE

PER_BLOCK = BLOCK // PAGE_SIZE


def page(addr: int, tag: int = 0) -> bytes:
    return (addr ^ tag).to_bytes(8, "little") * (PAGE_SIZE // 8)


def read_page(d: str, pid: int, vaddr: int, depth: int = 0) -> bytes:
    """One page as CRIU's page-read would find it, following parents."""
    assert depth < 64, "parent chain loops"
    pm = I.read_pagemap(d, pid)
    starts = [e.vaddr for e in pm.entries]
    assert starts == sorted(starts), f"{d}: entries must rise (CRIU seeks forward)"
    off = 0
    for e in pm.entries:
        end = e.vaddr + e.npages * PAGE_SIZE
        flags = e.effective_flags
        if e.vaddr <= vaddr < end:
            if flags & I.PE_PRESENT:
                with open(os.path.join(d, pm.pages_name), "rb") as f:
                    f.seek(off + vaddr - e.vaddr)
                    data = f.read(PAGE_SIZE)
                return data + bytes(PAGE_SIZE - len(data))  # sparse tail
            assert flags & I.PE_PARENT, f"{vaddr:#x} neither present nor in parent"
            return read_page(os.path.join(d, "parent"), pid, vaddr, depth + 1)
        if flags & I.PE_PRESENT:
            off += e.npages * PAGE_SIZE
    raise AssertionError(f"{vaddr:#x} not in {d}/pagemap-{pid}.img")


def write_final_dump(d: str, pid: int, runs, new_format=True) -> None:
    """A pagemap as CRIU's final dump writes it (present, lazy) and its
    pages image filled with junk that must not be read any more."""
    entries = []
    for vaddr, n in runs:
        if new_format:
            entries.append(I.PagemapEntry(vaddr, 0, flags=I.PE_PRESENT | I.PE_LAZY, nr_pages=n))
        else:
            entries.append(I.PagemapEntry(vaddr, n, flags=I.PE_PRESENT | I.PE_LAZY))
    with open(os.path.join(d, f"pagemap-{pid}.img"), "wb") as f:
        f.write(I.encode_pagemap(I.Pagemap(1, entries)))
    with open(os.path.join(d, "pages-1.img"), "wb") as f:
        f.write(b"J" * sum(n for _, n in runs) * PAGE_SIZE)


# Writes in the order a migration makes them: a round in rising address
# order, then rounds that rewrite pages and find new blocks above and
# below (each "below" opens a new segment).
blocks = st.integers(0, 40)
rounds = st.lists(st.lists(st.tuples(blocks, st.integers(0, PER_BLOCK - 1),
                                     st.integers(1, 600)), min_size=1, max_size=5),
                  min_size=1, max_size=5)


@settings(max_examples=40, deadline=None)
@given(rounds, st.booleans())
def test_every_dumped_page_resolves_to_the_store(tmp_path_factory, rounds, new_format):
    root = tmp_path_factory.mktemp("mig")
    img = str(root / "images")
    os.makedirs(img)
    base = 0x7F00_0000_0000
    held = {}
    with PageStore(str(root / "store")) as store:
        for r, writes in enumerate(rounds):
            for b, first, n in sorted(writes):
                addr = base + b * BLOCK + first * PAGE_SIZE
                data = b"".join(page(addr + i * PAGE_SIZE, r) for i in range(n))
                store.put(addr, data)
                for i in range(n):
                    held[addr + i * PAGE_SIZE] = r
        # the final dump: every held page, in runs as CRIU cuts them
        runs, addrs = [], sorted(held)
        for a in addrs:
            if runs and runs[-1][0] + runs[-1][1] * PAGE_SIZE == a:
                runs[-1][1] += 1
            else:
                runs.append([a, 1])
        write_final_dump(img, 42, runs, new_format)
        got = levels.prepare(img, {42: store})
        assert got.levels == len(store.segments())
        assert got.parent_pages == len(held) and got.copied_pages == 0
        assert os.path.getsize(os.path.join(img, "pages-1.img")) == 0
        for a, r in held.items():
            assert read_page(img, 42, a) == page(a, r), hex(a)


def test_levels_beyond_the_cap_are_copied(tmp_path, monkeypatch):
    monkeypatch.setattr(levels, "MAX_LEVELS", 2)
    img = str(tmp_path / "images")
    os.makedirs(img)
    with PageStore(str(tmp_path / "store")) as store:
        # four segments: each block lower than the one before
        addrs = [10 * BLOCK, 8 * BLOCK, 6 * BLOCK, 4 * BLOCK]
        for a in addrs:
            store.put(a, page(a) + page(a + PAGE_SIZE))
        assert len(store.segments()) == 4
        write_final_dump(img, 7, sorted((a, 2) for a in addrs))
        got = levels.prepare(img, {7: store})
    assert (got.levels, got.parent_pages, got.copied_pages) == (2, 4, 4)
    assert os.path.getsize(os.path.join(img, "pages-1.img")) == 4 * PAGE_SIZE
    for a in addrs:
        for p in (a, a + PAGE_SIZE):
            assert read_page(img, 7, p) == page(p)
    assert sorted(os.listdir(os.path.join(img, "levels"))) == ["level-1", "level-2"]
    # relative links: CRIU follows them from inside a container's root
    assert os.readlink(os.path.join(img, "parent")) == "levels/level-2"
    assert os.readlink(os.path.join(img, "levels", "level-2", "parent")) == "../level-1"


def test_processes_with_fewer_segments_pass_through(tmp_path):
    img = str(tmp_path / "images")
    os.makedirs(img)
    one, three = PageStore(str(tmp_path / "s1")), PageStore(str(tmp_path / "s3"))
    with one, three:
        one.put(BLOCK, page(BLOCK))
        for a in (5 * BLOCK, 3 * BLOCK, BLOCK):
            three.put(a, page(a, 3))
        write_final_dump(img, 1, [(BLOCK, 1)])
        os.rename(os.path.join(img, "pages-1.img"), os.path.join(img, "junk"))
        pm = I.read_pagemap(img, 1)
        pm.pages_id = 2
        with open(os.path.join(img, "pagemap-1.img"), "wb") as f:
            f.write(I.encode_pagemap(pm))
        write_final_dump(img, 3, [(BLOCK, 1), (3 * BLOCK, 1), (5 * BLOCK, 1)])
        got = levels.prepare(img, {1: one, 3: three})
    assert got.levels == 3
    assert read_page(img, 1, BLOCK) == page(BLOCK)
    for a in (BLOCK, 3 * BLOCK, 5 * BLOCK):
        assert read_page(img, 3, a) == page(a, 3)


def test_a_page_the_store_lacks_is_an_error(tmp_path):
    img = str(tmp_path / "images")
    os.makedirs(img)
    with PageStore(str(tmp_path / "store")) as store:
        store.put(BLOCK, page(BLOCK))
        write_final_dump(img, 5, [(BLOCK, 2)])
        with pytest.raises(RuntimeError, match="never sent.*1 pages"):
            levels.prepare(img, {5: store})


def test_an_existing_parent_link_is_refused(tmp_path):
    img = str(tmp_path / "images")
    os.makedirs(img)
    os.symlink("/nonexistent", os.path.join(img, "parent"))
    with PageStore(str(tmp_path / "store")) as store:
        write_final_dump(img, 5, [])
        with pytest.raises(RuntimeError, match="already has a parent"):
            levels.prepare(img, {5: store})


def test_no_levels_copies_every_page_into_the_dump(tmp_path):
    """max_levels=0: no parent link, every page in the dump's own pages
    image, still lazy."""
    img = str(tmp_path / "images")
    os.makedirs(img)
    with PageStore(str(tmp_path / "store")) as store:
        addrs = [4 * BLOCK, 2 * BLOCK]
        for a in addrs:
            store.put(a, page(a))
        write_final_dump(img, 9, sorted((a, 1) for a in addrs))
        got = levels.prepare(img, {9: store}, max_levels=0)
    assert (got.levels, got.parent_pages, got.copied_pages) == (0, 0, 2)
    assert not os.path.lexists(os.path.join(img, "parent"))
    for a in addrs:
        assert read_page(img, 9, a) == page(a)
    assert all(e.effective_flags == I.PE_PRESENT | I.PE_LAZY
               for e in I.read_pagemap(img, 9).entries)


def test_lazy_runs_are_left_to_the_daemon(tmp_path):
    """lazy=True: CRIU's PE_LAZY runs become PE_LAZY alone (a lazy-pages
    daemon asks the stores for them), the other runs read from parent
    levels; a process without a store keeps its pages image and loses
    PE_LAZY, so that CRIU's restore reads those pages itself."""
    img = str(tmp_path / "images")
    os.makedirs(img)
    with PageStore(str(tmp_path / "store")) as store:
        for a in (BLOCK, 3 * BLOCK):
            store.put(a, page(a) + page(a + PAGE_SIZE))
        pm = I.Pagemap(1, [
            I.PagemapEntry(BLOCK, 0, flags=I.PE_PRESENT | I.PE_LAZY, nr_pages=2),
            I.PagemapEntry(3 * BLOCK, 0, flags=I.PE_PRESENT, nr_pages=2)])
        with open(os.path.join(img, "pagemap-6.img"), "wb") as f:
            f.write(I.encode_pagemap(pm))
        open(os.path.join(img, "pages-1.img"), "wb").close()
        orphan = I.Pagemap(2, [
            I.PagemapEntry(BLOCK, 0, flags=I.PE_PRESENT | I.PE_LAZY, nr_pages=1)])
        with open(os.path.join(img, "pagemap-8.img"), "wb") as f:
            f.write(I.encode_pagemap(orphan))
        with open(os.path.join(img, "pages-2.img"), "wb") as f:
            f.write(page(BLOCK, 77))
        got = levels.prepare(img, {6: store}, lazy=True)
        assert (got.lazy_pages, got.parent_pages, got.copied_pages) == (2, 2, 0)
        assert [(e.vaddr, e.npages, e.effective_flags)
                for e in I.read_pagemap(img, 6).entries] == [
            (BLOCK, 2, I.PE_LAZY), (3 * BLOCK, 2, I.PE_PARENT)]
        assert read_page(img, 6, 3 * BLOCK + PAGE_SIZE) == page(3 * BLOCK + PAGE_SIZE)
    assert [e.effective_flags for e in I.read_pagemap(img, 8).entries] == [I.PE_PRESENT]
    assert read_page(img, 8, BLOCK) == page(BLOCK, 77)
