"""Trackers against a live victim, on the running kernel.

Each scenario is a random sequence of rounds; in a round the victim writes
pages and changes its mappings (mmap, munmap, mremap, madvise DONTNEED,
mprotect, fork), then the tracker collects.  Two properties are checked:

- completeness: every page written in the round is reported;
- a simulated destination stays exact: after each collect the test copies
  the reported pages out of the victim into a shadow, and the shadow must
  then equal the victim's memory on every present page.  This is what a
  migration relies on; it catches lost writes of any cause (mremap,
  re-registration, dropped runs) that the first check could miss.

For uffd-wp on plain anonymous memory the report must also be exact: a
region untouched structurally since the previous collect reports its
written pages and nothing else.
"""

from __future__ import annotations

import errno
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from migrator.kernel.vmread import read_ranges
from migrator.ranges import PAGE_SIZE, RangeList
from migrator.tracking import features
from migrator.tracking.select import choose, make_tracker, process_facts
from tests.victims.control import Victim, assert_no_trace, fds

TRACKERS = ["uffd-wp", "soft-dirty", "full"]


@pytest.fixture(params=TRACKERS)
def tracker_name(request):
    name = request.param
    caps = features.probe()
    need = {"uffd-wp": ["uffd_wp_async", "pagemap_scan", "ptrace_injection"],
            "soft-dirty": ["soft_dirty", "ptrace_injection"],
            "full": []}[name]
    for cap in need:
        if not getattr(caps, cap):
            pytest.skip(f"kernel capability {cap} missing: {caps.why[cap]}")
    return name


def tracker_for(name: str, pid: int):
    caps = features.probe()
    d = choose(features.arch(), caps, process_facts(pid, caps), forced=name)
    return make_tracker(d, caps)


def present_pages(pid: int, ranges: RangeList) -> set[int]:
    """Pages present or swapped (pagemap bits 63/62); absent pages are
    holes that CRIU's final pagemap, not the page store, decides."""
    out = set()
    with open(f"/proc/{pid}/pagemap", "rb") as f:
        for s, e in ranges:
            f.seek(s // PAGE_SIZE * 8)
            data = f.read((e - s) // PAGE_SIZE * 8)
            for i, (entry,) in enumerate(struct.iter_unpack("<Q", data)):
                if entry & (3 << 62):
                    out.add(s + i * PAGE_SIZE)
    return out


class Scenario:
    def __init__(self, victim: Victim):
        self.v = victim
        self.regions: dict[int, dict] = {}  # id -> {addr, pages, prot}
        self.next_id = 0
        self.written: set[tuple[int, int]] = set()  # (region, page index)
        self.changed: set[int] = set()  # regions changed structurally
        # Pages dropped by MADV_DONTNEED: their content changed (to zero),
        # and uffd-wp may report them, rightly.
        self.zapped: set[tuple[int, int]] = set()
        self.shadow: dict[int, bytes] = {}
        self.children = 0

    # -- the victim's side -----------------------------------------
    def mmap(self, pages: int) -> int:
        addr = self.v.cmd("mmap", pages=pages)["addr"]
        rid = self.next_id
        self.next_id += 1
        self.regions[rid] = {"addr": addr, "pages": pages, "prot": "rw"}
        self.changed.add(rid)
        return rid

    def write(self, rid: int, pages: list[int], seed: int) -> None:
        r = self.regions[rid]
        pages = [p for p in pages if p < r["pages"]]
        if r["prot"] != "rw" or not pages:
            return
        self.v.cmd("write", addr=r["addr"], pages=pages, seed=seed)
        self.written.update((rid, p) for p in pages)

    def munmap_tail(self, rid: int, n: int) -> None:
        r = self.regions[rid]
        n = min(n, r["pages"])
        keep = r["pages"] - n
        self.v.cmd("munmap", addr=r["addr"] + keep * PAGE_SIZE, pages=n)
        self.written = {(i, p) for i, p in self.written
                        if i != rid or p < keep}
        if keep == 0:
            del self.regions[rid]
        else:
            r["pages"] = keep

    def replace(self, rid: int) -> None:
        """A new mapping over the old one, same place and size (MAP_FIXED):
        the old registration is gone, the content is zero."""
        r = self.regions[rid]
        self.v.cmd("mmap", pages=r["pages"], at=r["addr"])
        r["prot"] = "rw"
        self.written = {(i, p) for i, p in self.written if i != rid}
        self.changed.add(rid)

    def mremap(self, rid: int, new_pages: int) -> None:
        r = self.regions[rid]
        r["addr"] = self.v.cmd("mremap", addr=r["addr"], old=r["pages"],
                               new=new_pages)["addr"]
        r["pages"] = new_pages
        self.written = {(i, p) for i, p in self.written
                        if i != rid or p < new_pages}
        self.changed.add(rid)

    def dontneed(self, rid: int, pages: list[int]) -> None:
        r = self.regions[rid]
        pages = [p for p in pages if p < r["pages"]]
        if pages:
            self.v.cmd("dontneed", addr=r["addr"], pages=pages)
            self.written -= {(rid, p) for p in pages}
            self.zapped |= {(rid, p) for p in pages}

    def mprotect(self, rid: int) -> None:
        r = self.regions[rid]
        r["prot"] = "r" if r["prot"] == "rw" else "rw"
        self.v.cmd("mprotect", addr=r["addr"], pages=r["pages"], prot=r["prot"])

    def fork(self) -> None:
        if self.children < 2:
            self.v.cmd("fork")
            self.children += 1

    # -- the test's side --------------------------------------------
    def region_ranges(self) -> RangeList:
        return RangeList((r["addr"], r["addr"] + r["pages"] * PAGE_SIZE)
                         for r in self.regions.values())

    def unregistered_regions(self) -> set[int]:
        """Regions the kernel no longer holds registered for uffd-wp (no
        "uw" in smaps VmFlags).  mremap of one part of a registered mapping
        was seen dropping the registration of the rest of it as well; the
        tracker must then report the region whole, so exactness cannot be
        asked of it."""
        from migrator.kernel.procfs import parse_smaps_vmflags
        with open(f"/proc/{self.v.pid}/smaps") as f:
            vmas = parse_smaps_vmflags(f.read())
        out = set()
        for rid, r in self.regions.items():
            lo, hi = r["addr"], r["addr"] + r["pages"] * PAGE_SIZE
            if any(s < hi and e > lo and "uw" not in fl for s, e, fl in vmas):
                out.add(rid)
        return out

    def written_addrs(self) -> set[int]:
        return {self.regions[i]["addr"] + p * PAGE_SIZE
                for i, p in self.written if i in self.regions}

    def absorb(self, dirty: RangeList) -> None:
        """Copy the reported pages of our regions into the shadow, as a
        migration does: only pages that exist (a hole reads as zero, and
        reading it would map the zero page, itself a change)."""
        mine = self.region_ranges()
        wanted = dirty & mine
        wanted = wanted & RangeList((a, a + PAGE_SIZE)
                                    for a in present_pages(self.v.pid, wanted))
        for a in list(self.shadow):
            if not mine.contains(a):
                del self.shadow[a]
        if not wanted:
            return
        data, gone = read_ranges(self.v.pid, wanted)
        assert not gone, f"pages vanished while the victim was idle: {gone}"
        off = 0
        for a in wanted.pages():
            self.shadow[a] = bytes(data[off:off + PAGE_SIZE])
            off += PAGE_SIZE

    def verify_shadow(self) -> None:
        mine = self.region_ranges()
        present = present_pages(self.v.pid, mine)
        if not present:
            return
        pages = RangeList((a, a + PAGE_SIZE) for a in present)
        data, _ = read_ranges(self.v.pid, pages)
        off = 0
        stale = []
        for a in pages.pages():
            if self.shadow.get(a) != bytes(data[off:off + PAGE_SIZE]):
                stale.append(hex(a))
            off += PAGE_SIZE
        assert not stale, f"destination would hold stale pages: {stale[:8]}"


def play_round(sc: Scenario, data) -> None:
    for _ in range(data.draw(st.integers(0, 6), label="ops")):
        if not sc.regions:
            sc.mmap(data.draw(st.integers(1, 48), label="new pages"))
            continue
        rid = data.draw(st.sampled_from(sorted(sc.regions)), label="region")
        n = sc.regions[rid]["pages"]
        idx = st.lists(st.integers(0, n - 1), min_size=1, max_size=min(n, 12))
        op = data.draw(st.sampled_from(
            ["write", "write", "write", "mmap", "munmap", "mremap",
             "replace", "dontneed", "mprotect", "fork"]), label="op")
        if op == "write":
            sc.write(rid, data.draw(idx, label="pages"),
                     data.draw(st.integers(1, 1000), label="seed"))
        elif op == "mmap":
            sc.mmap(data.draw(st.integers(1, 48), label="new pages"))
        elif op == "munmap":
            sc.munmap_tail(rid, data.draw(st.integers(1, n), label="tail"))
        elif op == "replace":
            sc.replace(rid)
        elif op == "mremap":
            sc.mremap(rid, data.draw(st.integers(1, 2 * n), label="size"))
        elif op == "dontneed":
            sc.dontneed(rid, data.draw(idx, label="pages"))
        elif op == "mprotect":
            sc.mprotect(rid)
        else:
            sc.fork()


@settings(deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(data=st.data())
def test_tracker_reports_every_write(tracker_name, data):
    with Victim() as v:
        before = fds(v.pid)
        sc = Scenario(v)
        for _ in range(data.draw(st.integers(1, 3), label="regions")):
            rid = sc.mmap(data.draw(st.integers(1, 48), label="pages"))
            sc.write(rid, list(range(sc.regions[rid]["pages"])), 7)
        tracker = tracker_for(tracker_name, v.pid)
        try:
            sc.absorb(tracker.start().dirty)
            sc.written.clear()
            sc.changed.clear()
            sc.verify_shadow()
            for _ in range(data.draw(st.integers(1, 4), label="rounds")):
                play_round(sc, data)
                if tracker_name == "uffd-wp":
                    sc.changed |= sc.unregistered_regions()
                c = tracker.collect()
                reported = set((c.dirty & sc.region_ranges()).pages())
                missing = sc.written_addrs() - reported
                assert not missing, f"written pages not reported: " \
                    f"{sorted(map(hex, missing))[:8]}"
                if tracker_name == "uffd-wp":
                    for rid, r in sc.regions.items():
                        if rid in sc.changed:
                            continue
                        span = RangeList([(r["addr"],
                                           r["addr"] + r["pages"] * PAGE_SIZE)])
                        got = set((c.dirty & span).pages())
                        want = {r["addr"] + p * PAGE_SIZE
                                for i, p in sc.written if i == rid}
                        may = {r["addr"] + p * PAGE_SIZE
                               for i, p in sc.zapped if i == rid}
                        assert want <= got <= want | may, \
                            "uffd-wp reported pages nobody wrote"
                sc.absorb(c.dirty)
                sc.verify_shadow()
                sc.written.clear()
                sc.changed.clear()
                sc.zapped.clear()
        finally:
            tracker.stop()
        v.cmd("reap")  # the victim's own pipes to its children
        assert_no_trace(v.pid, before)
        assert v.cmd("ping")["pid"] == v.pid


def test_full_reports_everything_untracked():
    with Victim() as v:
        sc = Scenario(v)
        sc.mmap(8)
        t = tracker_for("full", v.pid)
        c = t.start()
        assert not c.tracked
        assert sc.region_ranges() & c.dirty == sc.region_ranges()
        assert c.dirty == c.untracked
        t.stop()


def test_process_with_own_userfaultfd_gets_full():
    with Victim() as v:
        fd = v.cmd("uffd")["fd"]
        caps = features.probe()
        d = choose(features.arch(), caps, process_facts(v.pid, caps))
        assert d.tracker == "full"
        assert "already uses userfaultfd" in d.reason
        assert f"fd {fd}" in d.reason


def test_forcing_uffd_wp_on_userfaultfd_user_is_an_error():
    from migrator.tracking.base import TrackerError
    with Victim() as v:
        v.cmd("uffd")
        caps = features.probe()
        with pytest.raises(TrackerError, match="already uses userfaultfd"):
            choose(features.arch(), caps, process_facts(v.pid, caps),
                   forced="uffd-wp")


def _kernel_config_has(option: str) -> bool | None:
    """From /proc/config.gz, or Debian's /boot/config-RELEASE."""
    import gzip
    for path, opener in (("/proc/config.gz", gzip.open),
                         (f"/boot/config-{os.uname().release}", open)):
        try:
            with opener(path, "rt") as f:
                return any(line.strip() == f"{option}=y" for line in f)
        except OSError:
            continue
    return None


def test_probe_soft_dirty_matches_kernel_config():
    """clear_refs accepts 4 either way; the probe must follow the config."""
    has = _kernel_config_has("CONFIG_MEM_SOFT_DIRTY")
    if has is None:
        pytest.skip("no kernel config (/proc/config.gz, /boot/config-*): "
                    "cannot know the truth")
    with open(f"/proc/{os.getpid()}/clear_refs", "w") as f:
        f.write("4")  # accepted on every kernel: the trap being tested
    assert features.probe().soft_dirty is has, features.probe().why


def needs_uffd_wp_async():
    caps = features.probe()
    if not caps.uffd_wp_async:
        pytest.skip(f"kernel capability uffd_wp_async missing: "
                    f"{caps.why['uffd_wp_async']}")


def test_uffd_wp_markers_dropped_before_checkpoint():
    """Never-touched pages must not look swapped out to CRIU when it
    checkpoints, and tracking must still see writes afterwards."""
    needs_uffd_wp_async()
    with Victim() as v:
        sc = Scenario(v)
        rid = sc.mmap(16)
        sc.write(rid, [0, 1], 3)
        addr = sc.regions[rid]["addr"]
        t = tracker_for("uffd-wp", v.pid)
        try:
            t.start()
            t.before_checkpoint()
            with open(f"/proc/{v.pid}/pagemap", "rb") as f:
                f.seek(addr // PAGE_SIZE * 8)
                entries = struct.unpack("<16Q", f.read(16 * 8))
            swapped = [i for i, e in enumerate(entries) if e & (1 << 62)]
            assert swapped == [], f"pages {swapped} still look swapped out"
            sc.write(rid, [5, 1], 4)  # a hole and a page that existed
            reported = set(t.collect().dirty.pages())
            assert {addr + 5 * PAGE_SIZE, addr + PAGE_SIZE} <= reported
        finally:
            t.stop()


def test_uffd_wp_mapping_unmapped_while_being_registered(monkeypatch):
    """A mapping seen in /proc/PID/maps can be gone by the time it is
    registered (UFFDIO_WRITEPROTECT then says ENOENT, UFFDIO_REGISTER
    ENOMEM): that is the process changing its mappings, not the process
    gone.  The collect goes on with the mapping untracked, and whatever is
    there at the next collect is registered and reported whole."""
    needs_uffd_wp_async()
    with Victim() as v:
        sc = Scenario(v)
        sc.mmap(8)
        t = tracker_for("uffd-wp", v.pid)
        try:
            t.start()
            new = sc.regions[sc.mmap(4)]["addr"]
            region = RangeList([(new, new + 4 * PAGE_SIZE)])
            real = t._uffd.register_wp
            for err in (errno.ENOENT, errno.ENOMEM):
                def vanished(s, e, err=err):
                    raise OSError(err, os.strerror(err))
                monkeypatch.setattr(t._uffd, "register_wp", vanished)
                c = t.collect()
                assert not c.tracked & region
                assert c.untracked & region == region   # never counted clean
            monkeypatch.setattr(t._uffd, "register_wp", real)
            c = t.collect()
            assert c.tracked & region == region
            assert c.dirty & region == region
        finally:
            t.stop()
