"""The destination's PageWriter: batches verified and stored by a worker
thread; a bad batch fails the receiver at its next step, and nothing after
it is stored."""

import dataclasses

import pytest

from migrator.migration.destination import PageWriter
from migrator.migration.store import PageStore
from migrator.protocol.frames import DEFAULT_LIMITS, PageDataError, make_page_batch
from migrator.ranges import PAGE_SIZE


def pages(addr: int, n: int) -> bytes:
    return b"".join((addr + i * PAGE_SIZE).to_bytes(8, "little") * (PAGE_SIZE // 8)
                    for i in range(n))


def test_batches_are_stored_when_drained(tmp_path):
    w = PageWriter(PAGE_SIZE, DEFAULT_LIMITS)
    with PageStore(str(tmp_path / "s")) as store:
        try:
            for k in range(20):  # more than the queue holds
                addr = 0x10000000 + k * 8 * PAGE_SIZE
                w.submit(store, make_page_batch(1, ((addr, 8),), pages(addr, 8),
                                                level=3 if k % 2 else None))
            w.drain()
        finally:
            w.close()
        for k in range(20):
            addr = 0x10000000 + k * 8 * PAGE_SIZE
            data, missing = store.get(addr, 8)
            assert not missing and data == pages(addr, 8)


def test_a_bad_batch_fails_the_next_step_and_stops_storing(tmp_path):
    w = PageWriter(PAGE_SIZE, DEFAULT_LIMITS)
    with PageStore(str(tmp_path / "s")) as store:
        try:
            good = make_page_batch(1, ((0x1000, 1),), pages(0x1000, 1), level=None)
            bad = dataclasses.replace(good, checksum=good.checksum ^ 1)
            w.submit(store, good)
            w.submit(store, bad)
            with pytest.raises(PageDataError, match="checksum mismatch"):
                # raises here if the worker got to the bad batch already
                w.submit(store, make_page_batch(1, ((0x9000, 1),), pages(0x9000, 1)))
                w.drain()
            with pytest.raises(PageDataError):
                w.submit(store, good)
        finally:
            w.close()
        data, missing = store.get(0x1000, 1)
        assert data == pages(0x1000, 1) and missing.npages() == 0
        assert store.get(0x9000, 1)[1].npages() == 1, "nothing stored after the bad batch"
