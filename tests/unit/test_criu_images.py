"""CRIU image codec: pagemaps captured from real dumps (tests/unit/data),
pages files read run by run, and malformed input rejected clearly."""

import os
import pathlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from migrator.criu import images as I

DATA = pathlib.Path(__file__).parent / "data"
VECTORS = sorted(DATA.glob("criu-*-pagemap-*.img"))
PSIZE = 4096


def test_vectors_exist():
    assert len(VECTORS) >= 2


@pytest.mark.parametrize("path", VECTORS, ids=lambda p: p.name)
def test_captured_pagemap_round_trips(path):
    raw = path.read_bytes()
    pm = I.decode_pagemap(raw, path.name)
    assert I.encode_pagemap(pm) == raw
    assert pm.pages_id == 1
    assert pm.byteorder == "little"
    # CRIU 4.1.1: page count in field 2, flags always written.
    assert all(e.nr_pages is None and e.flags in (4, 6) for e in pm.entries)
    runs = I.dumped_runs(pm)
    assert runs == [(e.vaddr, e.compat_nr_pages) for e in pm.entries]
    starts = [v for v, _ in runs]
    assert starts == sorted(starts)
    assert all(v % PSIZE == 0 for v in starts)


def test_sleep_vector_facts():
    pm = I.decode_pagemap((DATA / "criu-4.1.1-pagemap-sleep.img").read_bytes())
    assert len(pm.entries) == 13
    # CRIU's pages-1.img of that dump was 126976 bytes: 31 pages.
    assert sum(n for _, n in I.dumped_runs(pm)) == 31
    assert {e.effective_flags for e in pm.entries} == {I.PE_PRESENT, I.PE_PRESENT | I.PE_LAZY}


def test_big_endian_words_are_detected():
    raw = (DATA / "criu-4.1.1-pagemap-sleep.img").read_bytes()
    pm = I.decode_pagemap(raw)
    pm.byteorder = "big"
    swapped = I.encode_pagemap(pm)
    assert swapped[:4] == struct.pack(">I", I.IMG_COMMON_MAGIC)
    back = I.decode_pagemap(swapped)
    assert back.byteorder == "big" and back.entries == pm.entries


def test_flag_semantics_and_old_and_new_formats():
    e = I.PagemapEntry
    entries = [
        e(0x1000, 2, flags=I.PE_PRESENT),                   # in the file
        e(0x3000, 1, flags=I.PE_PARENT),                    # in the parent
        e(0x4000, 3, flags=I.PE_LAZY),                      # lazy-pages daemon
        e(0x7000, 1, flags=I.PE_PRESENT | I.PE_LAZY),       # in the file too
        e(0x8000, 2),                                       # old image: present
        e(0xa000, 2, in_parent=True),                       # old image: parent
        e(0xc000, 0, flags=I.PE_PRESENT, nr_pages=1 << 33),  # CRIU >= 4.2
    ]
    pm = I.Pagemap(7, entries)
    assert I.dumped_runs(pm) == [(0x1000, 2), (0x7000, 1), (0x8000, 2), (0xc000, 1 << 33)]
    assert I.decode_pagemap(I.encode_pagemap(pm)).entries == entries


def test_unknown_fields_are_kept_in_place():
    pm = I.Pagemap(3, [I.PagemapEntry(0x1000, 1, flags=4)])
    raw = bytearray(I.encode_pagemap(pm))
    # Append an unknown length-delimited field 9 and a fixed32 field 10 to
    # the entry, as a newer CRIU might.
    extra = bytes([9 << 3 | 2, 2, 0xAA, 0xBB, 10 << 3 | 5, 1, 2, 3, 4])
    head_len = struct.unpack_from("<I", raw, 8)[0]
    at = 12 + head_len
    size = struct.unpack_from("<I", raw, at)[0]
    raw[at:at + 4] = struct.pack("<I", size + len(extra))
    raw += extra
    got = I.decode_pagemap(bytes(raw))
    assert [n for n, _ in got.entries[0].unknown] == [9, 10]
    assert I.encode_pagemap(got) == bytes(raw)


entry_st = st.builds(
    I.PagemapEntry,
    vaddr=st.integers(0, (1 << 64) - 1),
    compat_nr_pages=st.integers(0, (1 << 32) - 1),
    in_parent=st.none() | st.booleans(),
    flags=st.none() | st.integers(0, (1 << 32) - 1),
    nr_pages=st.none() | st.integers(0, (1 << 64) - 1),
)


@given(st.integers(0, (1 << 32) - 1), st.lists(entry_st, max_size=20),
       st.sampled_from(["little", "big"]))
def test_encode_decode_round_trip(pages_id, entries, order):
    pm = I.Pagemap(pages_id, entries, order)
    raw = I.encode_pagemap(pm)
    back = I.decode_pagemap(raw)
    assert back == pm
    assert I.encode_pagemap(back) == raw


# ---------------------------------------------------------------- malformed

def _sleep_raw():
    return (DATA / "criu-4.1.1-pagemap-sleep.img").read_bytes()


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r[:5], "too short for the magic"),
    (lambda r: b"\0" * 4 + r[4:], "not a CRIU image"),
    (lambda r: r[:4] + struct.pack("<I", 0x58313116) + r[8:], "is not PAGEMAP_MAGIC"),
    (lambda r: r[:8], "no pagemap_head"),
    (lambda r: r[:-3], "runs past the end of the file"),
    (lambda r: r + b"\1\0", "truncated size word"),
    (lambda r: r + struct.pack("<I", 1 << 30), "claims"),
    (lambda r: r + struct.pack("<I", 2) + b"\x08\x80", "truncated varint"),
    (lambda r: r + struct.pack("<I", 12) + b"\x08" + b"\xff" * 11, "longer than 10 bytes"),
    (lambda r: r + struct.pack("<I", 2) + b"\x08\x01", "without nr_pages"),
    (lambda r: r + struct.pack("<I", 2) + b"\x10\x01", "without vaddr"),
    (lambda r: r + struct.pack("<I", 5) + b"\x0a\x01\x00\x10\x01", "wire type 2"),
    (lambda r: r + struct.pack("<I", 6) + b"\x08\x01\x10\x80\x80\x80\x80\x10"[:6], "truncated"),
    (lambda r: r + struct.pack("<I", 8) + b"\x08\x01\x10\x80\x80\x80\x80\x10", "out of range"),
    (lambda r: r + struct.pack("<I", 3) + b"\x08\x01\x13", "unsupported wire type 3"),
    (lambda r: r + struct.pack("<I", 2) + b"\x00\x01", "field number 0"),
    (lambda r: r[:8] + struct.pack("<I", 2) + b"\x10\x01", "without pages_id"),
])
def test_malformed_pagemap_is_rejected_clearly(mutate, message):
    with pytest.raises(I.ImageError, match=message):
        I.decode_pagemap(mutate(_sleep_raw()), "pm")


@given(st.binary(max_size=300))
def test_garbage_never_crashes(data):
    try:
        I.decode_pagemap(_sleep_raw()[:8] + data)
    except I.ImageError:
        pass


# ---------------------------------------------------------------- pages files

def _pattern(vaddr, npages):
    out = bytearray()
    for i in range(npages):
        out += struct.pack("<Q", vaddr + i * PSIZE) * (PSIZE // 8)
    return bytes(out)


@pytest.fixture
def dump_dir(tmp_path):
    """A dump directory around the captured sleep pagemap, with a pages
    file whose every page holds its own address."""
    raw = _sleep_raw()
    (tmp_path / "pagemap-26.img").write_bytes(raw)
    pm = I.decode_pagemap(raw)
    (tmp_path / "pages-1.img").write_bytes(
        b"".join(_pattern(v, n) for v, n in I.dumped_runs(pm)))
    for name in ("core-26.img", "inventory.img", "pstree.img", "stats-dump",
                 "dump.log", ".tmp-x"):
        (tmp_path / name).write_bytes(b"x")
    return tmp_path


def test_iter_pages_reads_runs_in_file_order(dump_dir):
    seen = list(I.iter_pages(dump_dir, 26, psize=PSIZE))
    pm = I.read_pagemap(dump_dir, 26)
    assert [(v, n) for v, n, _ in seen] == I.dumped_runs(pm)
    for v, n, data in seen:
        assert bytes(data) == _pattern(v, n)
    offsets = [off for _, _, off in I.iter_pages(dump_dir, 26, with_data=False, psize=PSIZE)]
    sizes = [n * PSIZE for _, n, _ in seen]
    assert offsets == [sum(sizes[:i]) for i in range(len(sizes))]


def test_iter_pages_splits_long_runs(dump_dir):
    pieces = list(I.iter_pages(dump_dir, 26, psize=PSIZE, chunk_bytes=PSIZE))
    assert all(n == 1 for _, n, _ in pieces)
    assert all(bytes(d) == _pattern(v, 1) for v, _, d in pieces)
    assert len(pieces) == 31


def test_iter_pages_refuses_wrong_size(dump_dir):
    with open(dump_dir / "pages-1.img", "ab") as f:
        f.write(b"\0" * PSIZE)
    with pytest.raises(I.ImageError, match="the pagemap describes"):
        list(I.iter_pages(dump_dir, 26, psize=PSIZE))


def test_image_files_split(dump_dir):
    memory, other = I.image_files(dump_dir)
    assert memory == ["pagemap-26.img", "pages-1.img"]
    assert other == ["core-26.img", "inventory.img", "pstree.img", "stats-dump"]


def test_image_files_shmem_pagemap_is_other(dump_dir):
    shm = I.Pagemap(2, [I.PagemapEntry(0, 1, flags=I.PE_PRESENT)])
    (dump_dir / "pagemap-shmem-1234.img").write_bytes(I.encode_pagemap(shm))
    (dump_dir / "pages-2.img").write_bytes(b"\0" * PSIZE)
    memory, other = I.image_files(dump_dir)
    assert memory == ["pagemap-26.img", "pages-1.img"]
    assert "pagemap-shmem-1234.img" in other and "pages-2.img" in other


def test_image_files_missing_pages_file(dump_dir):
    os.unlink(dump_dir / "pages-1.img")
    with pytest.raises(I.ImageError, match="missing pages files"):
        I.image_files(dump_dir)


# ---------------------------------------------------------------- runner
# A stand-in criu (MIGRATOR_CRIU): records its argv, writes the log CRIU
# would (-o NAME inside -D DIR), and fails when told to.

from migrator.criu import runner  # noqa: E402

FAKE_CRIU = r"""#!/bin/sh
echo "$@" >> "$FAKE_ARGV"
dir= log=
prev=
for a in "$@"; do
  case "$prev" in -D) dir=$a;; -o) log=$a;; --pidfile) pidfile=$a;; esac
  prev=$a
done
case "$1" in
  --version) echo "Version: 4.1.1"; exit 0;;
  check) echo "Looks good."; exit 0;;
esac
{
  echo "(00.000100) Error (criu/util.c:1): Can't setup RLIMIT_NOFILE"
  echo "(00.000200) some debug line"
  [ -n "$FAKE_FAIL" ] && echo "(00.000300) Error (criu/cr-dump.c:2): Dumping FAILED."
} > "$dir/$log"
[ -n "$FAKE_FAIL" ] && { echo "see log" >&2; exit 1; }
[ "$1" = restore ] && echo 4242 > "$pidfile"
exit 0
"""


@pytest.fixture
def fake_criu(tmp_path, monkeypatch):
    exe = tmp_path / "criu"
    exe.write_text(FAKE_CRIU)
    exe.chmod(0o755)
    argv = tmp_path / "argv"
    monkeypatch.setenv("MIGRATOR_CRIU", str(exe))
    monkeypatch.setenv("FAKE_ARGV", str(argv))
    monkeypatch.delenv("FAKE_FAIL", raising=False)
    return argv


def test_runner_version_and_check(fake_criu):
    assert runner.criu_version() == "4.1.1"
    assert runner.check() == "Looks good."


def test_runner_dump_options(fake_criu, tmp_path):
    d = tmp_path / "img"
    log = runner.dump(123, d, tcp_established=True, extra=["--ext-unix-sk"])
    assert log == str(d / "dump.log")
    args = fake_criu.read_text().split()
    assert args[:3] == ["dump", "-t", "123"]
    assert "--leave-stopped" in args and "--tcp-established" in args
    assert "--shell-job" not in args and args[-1] == "--ext-unix-sk"


def test_runner_restore_returns_root_pid(fake_criu, tmp_path):
    pid = runner.restore(tmp_path)
    assert pid == 4242
    args = fake_criu.read_text().split()
    assert args[0] == "restore"
    assert "--restore-detached" in args and "--leave-stopped" in args
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".pid")], "own pidfile removed"


def test_runner_failure_quotes_error_lines(fake_criu, tmp_path, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "1")
    with pytest.raises(runner.CriuError) as info:
        runner.dump(1, tmp_path)
    e = info.value
    assert e.phase == "dump" and e.returncode == 1
    assert e.log == str(tmp_path / "dump.log")
    assert "Error (criu/cr-dump.c:2): Dumping FAILED." in str(e)
    assert "some debug line" not in str(e)


def test_runner_missing_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("MIGRATOR_CRIU", str(tmp_path / "nope"))
    with pytest.raises(runner.CriuError, match="cannot run"):
        runner.criu_version()


def _pstree_image(entries, packed=False) -> bytes:
    from migrator.criu.images import IMG_COMMON_MAGIC, PSTREE_MAGIC, _varint
    out = [struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC)]
    for pid, ppid, threads in entries:
        body = b"".join(_varint(n << 3) + _varint(v)
                        for n, v in ((1, pid), (2, ppid), (3, pid), (4, pid)))
        if packed:
            payload = b"".join(_varint(t) for t in threads)
            body += _varint(5 << 3 | 2) + _varint(len(payload)) + payload
        else:
            body += b"".join(_varint(5 << 3) + _varint(t) for t in threads)
        out.append(struct.pack("<I", len(body)) + body)
    return b"".join(out)


@pytest.mark.parametrize("packed", [False, True])
def test_pstree_pids_and_threads(packed):
    from migrator.criu.images import decode_pstree
    data = _pstree_image([(5002, 1, [5002, 5003, 70000]), (5010, 5002, [5010])],
                         packed)
    assert decode_pstree(data) == [(5002, (5002, 5003, 70000)), (5010, (5010,))]


def test_pstree_refuses_other_images():
    from migrator.criu.images import IMG_COMMON_MAGIC, PAGEMAP_MAGIC, decode_pstree
    with pytest.raises(I.ImageError, match="PSTREE_MAGIC"):
        decode_pstree(struct.pack("<II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC))


def test_restore_refuses_a_tree_whose_pids_are_taken(tmp_path):
    from migrator.migration import workload
    free = 4_000_000          # above any pid_max: never in use
    while os.path.exists(f"/proc/{free}"):
        free -= 1
    (tmp_path / "pstree.img").write_bytes(
        _pstree_image([(free, 1, [free]), (os.getpid(), free, [os.getpid()])]))
    with pytest.raises(workload.PidsInUse, match=rf"in use on this node: {os.getpid()} \("):
        workload.check_pids_free(str(tmp_path))
    (tmp_path / "pstree.img").write_bytes(_pstree_image([(free, 1, [free])]))
    workload.check_pids_free(str(tmp_path))
