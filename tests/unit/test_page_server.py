"""Both page servers against a peer that speaks CRIU's side of the
protocol as criu/page-xfer.c does (criu/page_server.py)."""

import os
import socket
import struct

import pytest

from migrator.criu import images
from migrator.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT
from migrator.criu.page_server import (HEADER_NEW, HEADER_OLD, PS_IOV_ADD,
                                       PS_IOV_ADD_F, PS_IOV_FORCE_CLOSE,
                                       PS_IOV_GET, PS_IOV_OPEN2, PS_IOV_PARENT,
                                       PS_TYPE_PID, PS_TYPE_SHMEM, DumpPageServer,
                                       PageServerError, StorePageServer, header_for)
from migrator.migration.store import PageStore
from migrator.ranges import PAGE_SIZE, RangeList

P = PAGE_SIZE


def page(tag: int, n: int = 1) -> bytes:
    return b"".join(bytes([(tag + i) % 251 + 1]) * P for i in range(n))


class Criu:
    """CRIU's end: what criu dump / criu lazy-pages send and expect."""

    def __init__(self, server, header=HEADER_NEW):
        if server.port is not None:   # start(tcp=True)
            self.sock = socket.create_connection(("127.0.0.1", server.port))
        else:
            self.sock = socket.socket(fileno=os.dup(server.criu_fd))
        self.h = header

    def send(self, cmd, nr=0, vaddr=0, dst=0, flags=0, data=b""):
        self.sock.sendall(self.h.pack(cmd | flags << 16, nr, vaddr, dst) + data)

    def recv(self, n):
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"{len(out)} of {n} bytes")
            out += chunk
        return out

    def open2(self, kind, ident):
        self.send(PS_IOV_OPEN2, dst=ident << 8 | kind)
        assert self.recv(1) == b"\0"   # no parent

    def close(self):
        self.send(PS_IOV_FORCE_CLOSE)
        assert struct.unpack("=i", self.recv(4)) == (0,)
        self.sock.close()


@pytest.fixture
def dump(tmp_path):
    held = {7: RangeList([(0x11000, 0x13000)])}
    ps = DumpPageServer(str(tmp_path), held)
    ps.start()
    yield ps
    ps.close()


def test_dump_writes_criu_images_without_held_bytes(dump, tmp_path):
    c = Criu(dump)
    pid_dst = 7 << 8 | PS_TYPE_PID
    c.open2(PS_TYPE_PID, 7)
    c.send(PS_IOV_ADD_F, 4, 0x10000, pid_dst, PE_PRESENT | PE_LAZY, page(1, 4))
    c.send(PS_IOV_ADD_F, 3, 0x18000, pid_dst, PE_PARENT)     # no data follows
    c.send(PS_IOV_ADD_F, 2, 0x20000, pid_dst, PE_PRESENT, page(9, 2))
    c.send(PS_IOV_PARENT, dst=pid_dst)
    assert struct.unpack("=i", c.recv(4)) == (0,)
    c.open2(PS_TYPE_SHMEM, 3)
    c.send(PS_IOV_ADD, 1, 0, 3 << 8 | PS_TYPE_SHMEM, 0, page(20))
    c.close()
    kept = dump.finish()

    assert kept == {7: RangeList([(0x10000, 0x11000), (0x13000, 0x14000),
                                  (0x20000, 0x22000)])}
    pm = images.read_pagemap(tmp_path, 7)
    assert [(e.vaddr, e.npages, e.flags) for e in pm.entries] == [
        (0x10000, 4, PE_PRESENT | PE_LAZY), (0x18000, 3, PE_PARENT),
        (0x20000, 2, PE_PRESENT)]
    assert all(e.compat_nr_pages == 0 and e.nr_pages for e in pm.entries)
    got = {v: bytes(d) for v, _, d in images.iter_pages(tmp_path, 7, chunk_bytes=P)}
    want = dict(zip(range(0x10000, 0x14000, P), (page(1 + i) for i in range(4))))
    want.update({0x20000: page(9), 0x21000: page(10)})
    want[0x11000] = want[0x12000] = bytes(P)   # held: holes, read as zeroes
    assert got == want
    shm = images.decode_pagemap((tmp_path / "pagemap-shmem-3.img").read_bytes())
    assert shm.pages_id != pm.pages_id
    assert (tmp_path / shm.pages_name).read_bytes() == page(20)
    assert dump.bytes_written == 5 * P


def test_dump_pages_arrive_in_pieces_larger_than_a_chunk(tmp_path, monkeypatch):
    monkeypatch.setattr("migrator.criu.page_server.CHUNK", 3 * P)
    held = {5: RangeList([(0x2000, 0x5000)])}
    ps = DumpPageServer(str(tmp_path), held)
    ps.start()
    try:
        c = Criu(ps)
        c.open2(PS_TYPE_PID, 5)
        c.send(PS_IOV_ADD_F, 8, 0, 5 << 8 | PS_TYPE_PID, PE_PRESENT, page(1, 8))
        c.close()
        assert ps.finish() == {5: RangeList([(0, 0x2000), (0x5000, 0x8000)])}
    finally:
        ps.close()
    data = (tmp_path / images.read_pagemap(tmp_path, 5).pages_name).read_bytes()
    want = bytearray(page(1, 8))
    want[0x2000:0x5000] = bytes(0x3000)
    assert data == want


@pytest.mark.parametrize("tcp", [False, True], ids=["socketpair", "tcp"])
@pytest.mark.parametrize("splice", [True, False], ids=["splice", "no-splice"])
def test_dump_drops_held_pages_unread(tmp_path, monkeypatch, tcp, splice):
    """Pages the destination holds are dropped in the kernel (spliced to
    /dev/null), runs larger than a chunk or not; the stream stays in step
    around them.  Without splice they are read and dropped."""
    monkeypatch.setattr("migrator.criu.page_server.CHUNK", 2 * P)
    held = {5: RangeList([(0x2000, 0x6000), (0x9000, 0xA000)])}
    ps = DumpPageServer(str(tmp_path), held)
    if not splice:
        ps._sink.close()
        ps._sink = None
    ps.start(tcp=tcp)
    try:
        c = Criu(ps)
        c.open2(PS_TYPE_PID, 5)
        c.send(PS_IOV_ADD_F, 10, 0, 5 << 8 | PS_TYPE_PID, PE_PRESENT, page(1, 10))
        c.send(PS_IOV_ADD_F, 2, 0x20000, 5 << 8 | PS_TYPE_PID, PE_PRESENT, page(40, 2))
        c.close()
        assert ps.finish() == {5: RangeList([(0, 0x2000), (0x6000, 0x9000),
                                             (0x20000, 0x22000)])}
    finally:
        ps.close()
    assert ps.bytes_dropped == (5 * P if splice else 0)
    assert ps.bytes_written == 7 * P
    data = (tmp_path / images.read_pagemap(tmp_path, 5).pages_name).read_bytes()
    want = bytearray(page(1, 10) + page(40, 2))
    want[0x2000:0x6000] = bytes(0x4000)
    want[0x9000:0xA000] = bytes(0x1000)
    assert data == want


def test_dump_stream_cut_while_dropping(tmp_path):
    ps = DumpPageServer(str(tmp_path), {5: RangeList([(0, 0x100000)])})
    ps.start()
    try:
        c = Criu(ps)
        c.open2(PS_TYPE_PID, 5)
        c.send(PS_IOV_ADD_F, 256, 0, 5 << 8 | PS_TYPE_PID, PE_PRESENT, page(1, 10))
        c.sock.close()
        with pytest.raises(PageServerError, match="connection closed 40960 bytes "
                                                  "into 1048576 bytes of pages"):
            ps.finish()
    finally:
        ps.close()


def test_dump_that_ends_without_close_is_an_error(dump):
    c = Criu(dump)
    c.open2(PS_TYPE_PID, 7)
    c.send(PS_IOV_ADD_F, 2, 0x30000, 7 << 8 | PS_TYPE_PID, PE_PRESENT, page(1))
    c.sock.close()  # CRIU died one page into a two-page entry
    with pytest.raises(PageServerError, match="closed"):
        dump.finish()


@pytest.mark.parametrize("msg, why", [
    ((99, 0, 0, 0), "unknown command"),
    ((PS_IOV_GET, 1, 0, 7), "lazy dump"),
    ((PS_IOV_ADD_F | PE_PRESENT << 16, 1, 0, 7 << 8 | 1), "not open"),
    ((PS_IOV_OPEN2, 0, 0, 7 << 8 | 9), "unknown pagemap type"),
])
def test_dump_refuses_what_it_cannot_take(dump, msg, why):
    c = Criu(dump)
    c.sock.sendall(HEADER_NEW.pack(*msg))
    with pytest.raises(PageServerError, match=why):
        dump.finish()


def test_dump_over_loopback_tcp(tmp_path):
    """start(tcp=True), for runtimes that start CRIU themselves; the
    connection of a socket of our own uid (root here) is taken."""
    ps = DumpPageServer(str(tmp_path), {})
    ps.start(tcp=True)
    try:
        assert ps.criu_args() == ["--page-server", "--address", "127.0.0.1",
                                  "--port", str(ps.port)]
        c = Criu(ps)
        c.open2(PS_TYPE_PID, 1)
        c.send(PS_IOV_ADD_F, 1, 0x5000, 1 << 8 | PS_TYPE_PID, PE_PRESENT, page(4))
        c.close()
        assert ps.finish() == {1: RangeList([(0x5000, 0x6000)])}
    finally:
        ps.close()
    assert (tmp_path / images.read_pagemap(tmp_path, 1).pages_name).read_bytes() == page(4)


def test_tcp_page_server_that_criu_never_reached(tmp_path):
    ps = DumpPageServer(str(tmp_path), {})
    ps.start(tcp=True)
    try:
        with pytest.raises(PageServerError, match="never connected"):
            ps.finish()
    finally:
        ps.close()


def test_dump_from_criu_before_4_2(tmp_path):
    """CRIU 4.1: a 24-byte header, and pagemaps whose page count is the
    32-bit field 2 (it does not know field 5)."""
    ps = DumpPageServer(str(tmp_path), {}, criu_version="4.1.1")
    ps.start()
    try:
        c = Criu(ps, header=HEADER_OLD)
        c.open2(PS_TYPE_PID, 3)
        c.send(PS_IOV_ADD_F, 2, 0x9000, 3 << 8 | PS_TYPE_PID, PE_PRESENT, page(6, 2))
        c.close()
        assert ps.finish() == {3: RangeList([(0x9000, 0xB000)])}
    finally:
        ps.close()
    (e,) = images.read_pagemap(tmp_path, 3).entries
    assert (e.vaddr, e.compat_nr_pages, e.nr_pages, e.flags) == (0x9000, 2, None, PE_PRESENT)


def test_header_layout_follows_the_criu_version():
    assert header_for("4.2.1") is HEADER_NEW and HEADER_NEW.size == 32
    assert header_for("4.1.1") is HEADER_OLD and HEADER_OLD.size == 24
    assert header_for("5.0") is HEADER_NEW


@pytest.fixture
def store(tmp_path):
    s = PageStore(str(tmp_path / "pages-7.store"))
    s.put(0x40000, page(3, 6))
    yield s
    s.close()


def test_store_server_answers_get_from_the_store(store):
    ps = StorePageServer({7: store})
    ps.start()
    try:
        c = Criu(ps)
        for vaddr, n in ((0x41000, 1), (0x40000, 6), (0x43000, 2)):
            c.send(PS_IOV_GET, n, vaddr, 7)
            cmd, nr, va, dst = HEADER_NEW.unpack(c.recv(HEADER_NEW.size))
            assert (cmd, nr, va, dst) == (PS_IOV_ADD_F | PE_PRESENT << 16, n, vaddr, 7)
            first = (vaddr - 0x40000) // P
            assert c.recv(n * P) == page(3 + first, n)
        c.close()
        ps.finish()
        assert ps.bytes_sent == 9 * P
    finally:
        ps.close()


@pytest.mark.parametrize("get, why", [
    ((0x46000, 1, 7), "not in the store"),   # never sent: no zero page
    ((0x40000, 1, 8), "no store"),
    ((0x40800, 1, 7), "bad request"),
])
def test_store_server_never_invents_pages(store, get, why):
    ps = StorePageServer({7: store})
    ps.start()
    try:
        c = Criu(ps)
        vaddr, n, pid = get
        c.send(PS_IOV_GET, n, vaddr, pid)
        assert c.sock.recv(1) == b""   # the daemon sees the end, not data
        with pytest.raises(PageServerError, match=why):
            ps.finish()
    finally:
        ps.close()


@pytest.mark.parametrize("vaddr, ok", [(0x41000, True), (0x46000, False)])
def test_store_server_process(store, tmp_path, vaddr, ok):
    """migration/store_server.py, as the receiver starts it: a process of
    its own serving a daemon's GETs; exit 0 after CLOSE, else 1 and why."""
    import subprocess
    import sys

    from migrator.migration import store_server
    state = str(tmp_path / "state")
    store_server.write_state(state, {7: store})
    ours, theirs = socket.socketpair()
    proc = subprocess.Popen([sys.executable, "-m", "migrator.migration.store_server",
                             state, str(ours.fileno()), "4.2.1"],
                            pass_fds=(ours.fileno(),), stderr=subprocess.PIPE, text=True)
    ours.close()
    try:
        theirs.sendall(HEADER_NEW.pack(PS_IOV_GET, 1, vaddr, 7))
        if ok:
            assert HEADER_NEW.unpack(theirs.recv(HEADER_NEW.size, socket.MSG_WAITALL))[1:] \
                == (1, vaddr, 7)
            assert theirs.recv(P, socket.MSG_WAITALL) == page(4)
            theirs.sendall(HEADER_NEW.pack(PS_IOV_FORCE_CLOSE, 0, 0, 0))
            assert theirs.recv(4, socket.MSG_WAITALL) == struct.pack("=i", 0)
        _, err = proc.communicate(timeout=30)
    finally:
        theirs.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == (0 if ok else 1), err
    if not ok:
        assert "not in the store" in err
