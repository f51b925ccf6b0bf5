"""Both ends of CRIU's page-server protocol that migrator holds.

CRIU can send or fetch pages over a socket instead of its image files; a
socket handed over with ``--ps-socket FD`` keeps the other end ours.

DumpPageServer (the sender): with ``criu dump --page-server``, CRIU writes
no pagemap or pages images itself but sends every page it dumps.  We write
the images exactly as CRIU's own page server would, except that the bytes
of pages the destination already holds clean are left out: the pages file
keeps its layout (every offset is where CRIU's would put it) but those
pages are holes.  A 1 GiB dump then costs no 1 GiB of fresh tmpfs pages in
the downtime; on the VMs measured, filling fresh memory was most of the
final dump's 1-6 s (first touches of guest memory the host had taken back).
Which pages hold bytes is returned (``kept``): the caller must never send a
hole.  Pages that were clean when the dump started but turned out dirty
afterwards (the last collect runs after the dump) are holes it fills from
the stopped process itself.

StorePageServer (the destination, lazy restore): ``criu lazy-pages
--page-server`` asks for the pages of lazy pagemap entries (PS_IOV_GET)
instead of reading image files; we answer from the page stores, so a lazy
restore copies nothing before the tree resumes.  It runs in a process of
its own (migration/store_server.py), serve() in its main thread.

Protocol (CRIU's criu/page-xfer.c; host byte order, one header per
message)::

    struct page_server_iov { u32 cmd; u64 nr_pages; u64 vaddr; u64 dst_id; }
        CRIU >= 4.2; 32 bytes (4 bytes of padding after cmd)
    struct page_server_iov { u32 cmd; u32 nr_pages; u64 vaddr; u64 dst_id; }
        CRIU < 4.2; 24 bytes

    cmd    low 16 bits: the command; high 16 bits: PE_* flags (ADD_F)
    dst_id id << 8 | type; type 1: a task's pagemap (pagemap-<id>.img),
           type 2: shared memory (pagemap-shmem-<id>.img)

    GET          (lazy-pages -> us) nr_pages pages at vaddr of task dst_id
                 (a bare pid here); answer ADD_F PE_PRESENT with the same
                 nr_pages, vaddr and dst_id, then the pages
    OPEN2        start the images of dst_id; answer 1 byte: has a parent (0)
    OPEN         the same without an answer (old)
    PARENT       answer s32: has a parent (0)
    ADD_F        one pagemap entry (vaddr, nr_pages, flags); an entry with
                 PE_PRESENT is followed by its nr_pages pages
    ADD / HOLE   (old) ADD_F with PE_PRESENT / with PE_PARENT
    CLOSE, FORCE_CLOSE   the end; answer s32 0 ("all received")

Images are named as CRIU's page server names them: pages ids count from
0x10001, clear of the ids CRIU's dump may give images it writes itself.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
import struct
import threading
from typing import Optional

from migrator import faults
from migrator.criu import images
from migrator.criu.images import PE_PARENT, PE_PRESENT, Pagemap, PagemapEntry
from migrator.ranges import PAGE_SIZE, RangeList

log = logging.getLogger(__name__)

PS_IOV_ADD = 1
PS_IOV_HOLE = 2
PS_IOV_OPEN = 3
PS_IOV_OPEN2 = 4
PS_IOV_PARENT = 5
PS_IOV_ADD_F = 6
PS_IOV_GET = 7
PS_IOV_CLOSE = 0x1023
PS_IOV_FORCE_CLOSE = 0x1024

PS_TYPE_PID = 1
PS_TYPE_SHMEM = 2

FIRST_PAGES_ID = 0x10001
HEADER_NEW = struct.Struct("=I4xQQQ")   # CRIU >= 4.2
HEADER_OLD = struct.Struct("=IIQQ")     # CRIU < 4.2
CHUNK = 4 << 20                         # bytes received at a time
MAX_ID = (1 << 32) - 1
MAX_GET = 64 << 20                      # bytes one GET may ask (CRIU: 4 MiB)
JOIN_TIMEOUT = 30.0
# Where the TCP mode listens (start(tcp=True)), for a runtime that starts
# CRIU itself.
LOOPBACK = "127.0.0.1"


class _Sink:
    """Drops bytes from a socket inside the kernel: spliced into a pipe and
    from the pipe into /dev/null, never copied into this process.  The
    dump's clean pages are most of a final dump, and reading them cost
    the page server 0.5 CPU-seconds per GiB, inside the downtime."""

    PIPE_SIZE = 1 << 20

    def __init__(self):
        self.r, self.w = os.pipe()
        try:
            fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, self.PIPE_SIZE)
        except OSError:
            pass            # the default size: more calls, same result
        self.null = os.open(os.devnull, os.O_WRONLY)

    def drop(self, fd: int, n: int) -> None:
        """Drop exactly n bytes read from fd; EOFError(bytes left) if it
        ends first.  An OSError from the first call consumed nothing."""
        left = n
        try:
            while left > 0:
                k = os.splice(fd, self.w, left)
                if k == 0:
                    raise EOFError(left)
                left -= k
                while k > 0:
                    k -= os.splice(self.r, self.null, k)
        except OSError as e:
            if left < n:
                raise OSError(errno.EIO, f"dropping bytes of the stream failed "
                                         f"{n - left} bytes in: {e.strerror}") from e
            raise

    def close(self) -> None:
        for fd in (self.r, self.w, self.null):
            os.close(fd)


class PageServerError(RuntimeError):
    """CRIU sent something this page server cannot take, or stopped
    before the end; the dump's images are incomplete."""


def header_for(criu_version: str) -> struct.Struct:
    """The page_server_iov layout of a CRIU version ("4.2.1")."""
    try:
        major, minor = (int(x) for x in criu_version.split(".")[:2])
    except ValueError:
        return HEADER_NEW
    return HEADER_NEW if (major, minor) >= (4, 2) else HEADER_OLD


class _Images:
    """The pagemap and pages images of one dst_id, being written."""

    def __init__(self, dir: str, name: str, pages_id: int,
                 held: Optional[RangeList]):
        self.pagemap_path = os.path.join(dir, name)
        self.pagemap = Pagemap(pages_id)
        self.pages_path = os.path.join(dir, self.pagemap.pages_name)
        self.fd = os.open(self.pages_path,
                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.size = 0            # bytes of pages the pagemap describes so far
        self.held = held         # pages whose bytes are left out (None: none)
        self.kept: list[tuple[int, int]] = []

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            # Holes at the end leave the file short: give it the length the
            # pagemap describes, as CRIU's reader and iter_pages expect.
            os.ftruncate(self.fd, self.size)
        finally:
            os.close(self.fd)
            self.fd = -1
        with open(self.pagemap_path, "wb") as f:
            f.write(images.encode_pagemap(self.pagemap))


class _Peer:
    """One CRIU process at the other end of a socket, served by a thread
    of ours until it says CLOSE.

        ps.start()            # or ps.start(tcp=True): see below
        run criu with ps.criu_args(), passing ps.criu_fd
        ps.finish()           # after CRIU exited: raises PageServerError
                              # if it did not end the conversation properly
        ps.close()            # on every path

    The socket is one end of a socketpair whose other end CRIU inherits
    (``--ps-socket``).  A runtime that starts CRIU itself (runc, crun)
    cannot pass it a descriptor: start(tcp=True) listens on 127.0.0.1 (an
    ephemeral ``port``) instead, and takes the first connection made by a
    socket of our own uid, as only CRIU run by us (root) can.
    """

    name = "criu-page-server"

    def __init__(self, criu_version: str, psize: int):
        self.header = header_for(criu_version)
        self.psize = psize
        self.bytes_received = 0
        self.port: Optional[int] = None
        self._sock: Optional[socket.socket] = None
        self._criu_sock: Optional[socket.socket] = None
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None
        self._done = False
        self._buf = bytearray(CHUNK)

    def start(self, tcp: bool = False) -> None:
        if tcp:
            self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._listener.bind((LOOPBACK, 0))
            self._listener.listen(4)
            self.port = self._listener.getsockname()[1]
        else:
            self._sock, self._criu_sock = socket.socketpair(
                socket.AF_UNIX, socket.SOCK_STREAM)
            self._criu_sock.set_inheritable(True)
        self._thread = threading.Thread(target=self._serve, daemon=True,
                                        name=self.name)
        self._thread.start()

    @property
    def criu_fd(self) -> int:
        return self._criu_sock.fileno()

    def criu_args(self) -> list[str]:
        if self.port is not None:
            return ["--page-server", "--address", LOOPBACK, "--port", str(self.port)]
        return ["--page-server", "--ps-socket", str(self.criu_fd)]

    def criu_started(self) -> None:
        """CRIU holds its end now: drop ours, so that CRIU's exit reads as
        the end of the stream here."""
        if self._criu_sock is not None:
            self._criu_sock.close()
            self._criu_sock = None

    def _stop_listening(self) -> None:
        if self._listener is not None:
            try:
                self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
            except OSError:
                pass

    def finish(self, timeout: float = JOIN_TIMEOUT) -> None:
        self.criu_started()
        self._stop_listening()  # CRIU has exited: nobody else may connect
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise PageServerError("the page server did not finish")
        if self._error is not None:
            raise PageServerError(f"page server: {self._error}") from self._error
        if not self._done:
            raise PageServerError("CRIU ended without closing the page server")

    def close(self) -> None:
        self.criu_started()
        self._stop_listening()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(JOIN_TIMEOUT)
        for attr in ("_sock", "_listener"):
            sk = getattr(self, attr)
            if sk is not None:
                sk.close()
                setattr(self, attr, None)

    def serve(self, sock: socket.socket) -> None:
        """Serve `sock` in the calling thread until CRIU says CLOSE (a
        process whose only job this is); PageServerError otherwise."""
        self._sock = sock
        self._serve()
        if self._error is not None:
            raise PageServerError(str(self._error)) from self._error
        if not self._done:
            raise PageServerError("CRIU ended without closing the page server")

    def _accept(self) -> socket.socket:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError as e:
                raise PageServerError("CRIU never connected to the page server "
                                      f"({e.strerror or e})") from None
            uid = _loopback_peer_uid(conn)
            if uid == os.geteuid():
                self._listener.close()
                self._listener = None
                return conn
            log.warning("page server: refused a connection from uid %s", uid)
            conn.close()

    def _serve(self) -> None:
        try:
            if self._listener is not None:
                self._sock = self._accept()
            while not self._done:
                hdr = self._recv_exact(self.header.size, boundary=True)
                raw_cmd, nr_pages, vaddr, dst_id = self.header.unpack(hdr)
                cmd, flags = raw_cmd & 0xFFFF, raw_cmd >> 16
                if cmd in (PS_IOV_CLOSE, PS_IOV_FORCE_CLOSE):
                    self._at_close()
                    self._sock.sendall(struct.pack("=i", 0))
                    self._done = True
                else:
                    self._one(cmd, flags, nr_pages, vaddr, dst_id)
        except BaseException as e:  # noqa: BLE001 - handed to finish()
            self._error = e
            log.debug("%s: %s", self.name, e)
            # CRIU may be waiting for an answer: the end of the stream
            # makes it fail instead of hang.
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _recv_exact(self, n: int, boundary: bool = False) -> memoryview:
        view = memoryview(self._buf)[:n]
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:])
            if k == 0:
                if boundary and got == 0:
                    raise PageServerError("CRIU closed the connection before "
                                          "saying CLOSE")
                raise PageServerError(f"connection closed {got} bytes into a "
                                      f"{n}-byte message")
            got += k
        self.bytes_received += n
        return view

    def _at_close(self) -> None:
        pass

    def _one(self, cmd: int, flags: int, nr_pages: int, vaddr: int,
             dst_id: int) -> None:
        raise NotImplementedError


class DumpPageServer(_Peer):
    """Take ``criu dump --page-server --ps-socket FD`` into `dir`, leaving
    out the bytes of `held` (checkpoint pid -> pages); ``finish()`` returns
    the pages whose bytes were written, per checkpoint pid."""

    name = "criu-dump-pages"

    def __init__(self, dir: str, held: dict[int, RangeList],
                 criu_version: str = "4.2", psize: int = PAGE_SIZE):
        super().__init__(criu_version, psize)
        self.dir = dir
        self.held = held
        self.kept: dict[int, RangeList] = {}
        self.bytes_written = 0
        self.bytes_dropped = 0   # of bytes_received: held pages, not read
        self._sink = _Sink() if hasattr(os, "splice") else None
        self._cur: Optional[_Images] = None
        self._cur_id: Optional[int] = None   # checkpoint pid of _cur
        self._cur_dst: Optional[int] = None
        self._next_id = FIRST_PAGES_ID
        self._opened: set[str] = set()

    def finish(self, timeout: float = JOIN_TIMEOUT) -> dict[int, RangeList]:
        super().finish(timeout)
        return self.kept

    def close(self) -> None:
        super().close()
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        if self._cur is not None:
            try:
                self._cur.close()
            except OSError:
                pass
            self._cur = None

    def _one(self, cmd: int, flags: int, nr_pages: int, vaddr: int,
             dst_id: int) -> None:
        if cmd in (PS_IOV_OPEN, PS_IOV_OPEN2):
            self._open(dst_id)
            if cmd == PS_IOV_OPEN2:
                self._sock.sendall(b"\0")
        elif cmd == PS_IOV_PARENT:
            self._sock.sendall(struct.pack("=i", 0))
        elif cmd in (PS_IOV_ADD_F, PS_IOV_ADD, PS_IOV_HOLE):
            if cmd == PS_IOV_ADD:
                flags = PE_PRESENT
            elif cmd == PS_IOV_HOLE:
                flags = PE_PARENT
            self._add(dst_id, vaddr, nr_pages, flags)
        elif cmd == PS_IOV_GET:
            raise PageServerError("CRIU asked for pages (a lazy dump): not "
                                  "served here")
        else:
            raise PageServerError(f"unknown command {cmd:#x}")

    def _at_close(self) -> None:
        self._finish_images()

    def _open(self, dst_id: int) -> None:
        self._finish_images()
        kind, ident = dst_id & 0xFF, dst_id >> 8
        if ident > MAX_ID:
            raise PageServerError(f"image id {ident} out of range")
        if kind == PS_TYPE_PID:
            name, held = f"pagemap-{ident}.img", self.held.get(ident)
        elif kind == PS_TYPE_SHMEM:
            name, held = f"pagemap-shmem-{ident}.img", None
        else:
            raise PageServerError(f"unknown pagemap type {kind}")
        if name in self._opened:
            raise PageServerError(f"{name} opened twice")
        self._opened.add(name)
        self._cur = _Images(self.dir, name, self._next_id, held)
        self._cur_id = ident if kind == PS_TYPE_PID else None
        self._cur_dst = dst_id
        self._next_id += 1

    def _finish_images(self) -> None:
        cur, self._cur = self._cur, None
        if cur is None:
            return
        cur.close()
        if self._cur_id is not None:
            self.kept[self._cur_id] = RangeList(cur.kept)

    def _add(self, dst_id: int, vaddr: int, nr_pages: int, flags: int) -> None:
        cur = self._cur
        if cur is None or dst_id != self._cur_dst:
            raise PageServerError(f"pages of {dst_id:#x}, which is not open")
        size = nr_pages * self.psize
        if nr_pages == 0 or vaddr % self.psize or vaddr + size > 1 << 64:
            raise PageServerError(f"bad entry {vaddr:#x} + {nr_pages} pages")
        if self.header is HEADER_OLD:   # CRIU < 4.2: a 32-bit count in field 2
            entry = PagemapEntry(vaddr=vaddr, compat_nr_pages=nr_pages, flags=flags)
        else:
            entry = PagemapEntry(vaddr=vaddr, compat_nr_pages=0, flags=flags,
                                 nr_pages=nr_pages)
        cur.pagemap.entries.append(entry)
        if not flags & PE_PRESENT:
            return
        run = RangeList([(vaddr, vaddr + size)])
        keep = run - cur.held.clip(vaddr, vaddr + size) if cur.held else run
        cur.kept.extend(keep)
        base = cur.size
        cur.size += size
        # The bytes of kept runs are read and written at their offsets;
        # those in between (held at the destination) are dropped unread.
        pos = vaddr
        for s, t in keep:
            self._skip(s - pos)
            while s < t:
                n = min(CHUNK, t - s)
                pwrite_all(cur.fd, self._recv_exact(n), base + (s - vaddr))
                self.bytes_written += n
                s += n
            pos = t
        self._skip(vaddr + size - pos)

    def _skip(self, n: int) -> None:
        if n and not self._drop(n):
            while n:
                k = min(CHUNK, n)
                self._recv_exact(k)
                n -= k

    def _drop(self, n: int) -> bool:
        """Drop the next n bytes of the stream without reading them; False
        if this socket cannot be spliced (nothing consumed then)."""
        if self._sink is None:
            return False
        try:
            self._sink.drop(self._sock.fileno(), n)
        except EOFError as e:
            raise PageServerError(f"connection closed {n - e.args[0]} bytes into "
                                  f"{n} bytes of pages") from None
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            self._sink.close()      # not for this socket; nothing consumed
            self._sink = None
            return False
        self.bytes_received += n
        self.bytes_dropped += n
        return True


class StorePageServer(_Peer):
    """Answer ``criu lazy-pages --page-server --ps-socket FD`` from page
    stores (checkpoint pid -> PageStore, migration/store.py)."""

    name = "criu-lazy-pages"

    def __init__(self, stores: dict, criu_version: str = "4.2",
                 psize: int = PAGE_SIZE):
        super().__init__(criu_version, psize)
        self.stores = stores
        self.bytes_sent = 0

    def _one(self, cmd: int, flags: int, nr_pages: int, vaddr: int,
             dst_id: int) -> None:
        if cmd != PS_IOV_GET:
            raise PageServerError(f"lazy-pages sent command {cmd:#x}, "
                                  "expected GET")
        store = self.stores.get(dst_id)
        if store is None:
            raise PageServerError(f"pages of pid {dst_id} asked for; no store")
        if nr_pages == 0 or nr_pages * self.psize > MAX_GET or vaddr % self.psize:
            raise PageServerError(f"bad request {vaddr:#x} + {nr_pages} pages")
        faults.pause("store-server-slow", 0.05)
        data, missing = store.get(vaddr, nr_pages)
        if missing:
            # never a zero page for one that was not sent
            raise PageServerError(f"pid {dst_id}: pages {missing!r} asked for "
                                  "and not in the store")
        self._sock.sendall(self.header.pack(PS_IOV_ADD_F | PE_PRESENT << 16,
                                            nr_pages, vaddr, dst_id))
        self._sock.sendall(data)
        self.bytes_sent += len(data)


def _loopback_peer_uid(conn: socket.socket) -> Optional[int]:
    """The uid owning the other end of a loopback TCP connection, from
    /proc/net/tcp (our network namespace), None if not found."""
    ours = conn.getsockname()[1]
    theirs = conn.getpeername()[1]
    try:
        with open("/proc/net/tcp") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) < 8:
            continue
        local, remote = fields[1], fields[2]
        if (int(local.rsplit(":", 1)[1], 16) == theirs
                and int(remote.rsplit(":", 1)[1], 16) == ours):
            return int(fields[7])
    return None


def pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data:
        n = os.pwrite(fd, data, offset)
        data, offset = data[n:], offset + n
