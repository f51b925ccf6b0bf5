"""What migrator needs of CRIU's image directory: the process memory.

A dump directory holds one ``pagemap-<pid>.img`` per process (which pages
exist, and where their content is) and the raw ``pages-<id>.img`` it names
(the content).  The destination rewrites CRIU's own final pagemap to read
those pages from its page stores (migration/levels.py), so CRIU's view of
which pages exist stays authoritative; every other file crosses the
network as is.

Image grammar (CRIU 2.x .. 4.x "v1.1" images, facts from CRIU's
``images/pagemap.proto`` and ``criu/include/magic.h``)::

    pagemap-<pid>.img = magic entry_head entry*
    magic             = u32 IMG_COMMON_MAGIC (0x54564319)
                        u32 PAGEMAP_MAGIC    (0x56084025)
    entry_head        = u32 size, size bytes of protobuf pagemap_head
    entry             = u32 size, size bytes of protobuf pagemap_entry

    pagemap_head  { 1: pages_id        uint32 (required) }
    pagemap_entry { 1: vaddr           uint64 (required)
                    2: nr_pages        uint32 (required; "compat_nr_pages"
                                       since CRIU 4.2, written as 0 there)
                    3: in_parent       bool   (optional; images before flags)
                    4: flags           uint32 (optional, PE_* below)
                    5: nr_pages        uint64 (optional; CRIU >= 4.2) }

    pages-<id>.img    = raw pages, no magic and no framing: the pages of
                        every entry whose flags have PE_PRESENT, in pagemap
                        file order, npages * PAGE_SIZE bytes each.

The u32 words are in the byte order of the machine that dumped (CRIU writes
them raw); the reader detects it from the magic, so a vector captured on
x86_64 also reads on s390x.  Protobuf bodies are byte-order free.

Entry flags (CRIU's ``PE_*``):

- ``PE_PARENT`` (1): the pages are in the parent image directory (a
  pre-dump); nothing of them is in this ``pages-*.img``.
- ``PE_LAZY`` (2): the pages may be restored lazily (CRIU sets it for
  private anonymous memory, except stacks, on *every* dump, not only with
  ``--lazy-pages``).  With PE_PRESENT they are in the file as well; without
  it a lazy-pages daemon serves them.
- ``PE_PRESENT`` (4): the pages are in ``pages-<pages_id>.img``.  This is the
  one flag that decides file offsets: CRIU's reader advances its offset in
  the pages file by an entry's size exactly when PE_PRESENT is set.

Images written before the flags field existed carry ``in_parent`` instead:
in_parent true means PE_PARENT, otherwise an entry without flags means
PE_PRESENT.  A ``nr_pages`` of field 5 wins over field 2.

Only what pagemaps need of protobuf is implemented: varints (wire type 0)
and, to keep unknown fields of a newer CRIU intact, the length-delimited
(2) and fixed (1, 5) wire types as opaque bytes.
"""

from __future__ import annotations

import os
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import Iterator, Optional, Union

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
PAGEMAP_MAGIC = 0x56084025
PSTREE_MAGIC = 0x50273030

PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2

# A pagemap entry is 8 to ~25 bytes; a head is ~2.  Anything larger than
# this is not a pagemap, and refusing it keeps a corrupt size word from
# making us allocate gigabytes.
MAX_ENTRY_SIZE = 1 << 16

# Runs are read in pieces of at most this many bytes, so that
# a gigabyte mapping never needs a gigabyte buffer.
DEFAULT_CHUNK_BYTES = 16 << 20

_PAGEMAP_RE = re.compile(r"^pagemap-(\d+)\.img$")
_PAGES_RE = re.compile(r"^pages-(\d+)\.img$")

_U32 = (1 << 32) - 1
_U64 = (1 << 64) - 1


class ImageError(ValueError):
    """A CRIU image is malformed or not what we expected; the message says
    which file, where, and what."""


def page_size() -> int:
    # CRIU's PAGE_SIZE is the dumping machine's page size; the destination
    # runs the same architecture (and kernel page size) or CRIU refuses.
    return os.sysconf("SC_PAGE_SIZE")


# ---------------------------------------------------------------- protobuf

def _read_varint(buf: bytes, pos: int, end: int, where: str) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end:
            raise ImageError(f"{where}: truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ImageError(f"{where}: varint longer than 10 bytes")


def _varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("negative varint")
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _fields(body: bytes, where: str) -> list[tuple[int, int, int, bytes]]:
    """(field number, wire type, varint value or 0, raw bytes incl. tag)."""
    out = []
    pos, end = 0, len(body)
    while pos < end:
        start = pos
        tag, pos = _read_varint(body, pos, end, where)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise ImageError(f"{where}: field number 0 at byte {start}")
        value = 0
        if wire == 0:
            value, pos = _read_varint(body, pos, end, where)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            n, pos = _read_varint(body, pos, end, where)
            pos += n
        else:
            raise ImageError(f"{where}: unsupported wire type {wire} "
                             f"(field {number}) at byte {start}")
        if pos > end:
            raise ImageError(f"{where}: field {number} runs past the entry")
        out.append((number, wire, value, bytes(body[start:pos])))
    return out


def _field(number: int, value: int) -> tuple[int, bytes]:
    return number, _varint(number << 3) + _varint(value)


def _join(known: list[tuple[int, bytes]], unknown: tuple[tuple[int, bytes], ...]) -> bytes:
    # protobuf-c writes fields in field-number order; sorting (stable) by
    # number with unknown fields in between reproduces its bytes.
    return b"".join(raw for _, raw in sorted(known + list(unknown), key=lambda f: f[0]))


# ---------------------------------------------------------------- pagemap

@dataclass
class PagemapEntry:
    vaddr: int
    compat_nr_pages: int  # field 2: the page count before CRIU 4.2, else 0
    in_parent: Optional[bool] = None
    flags: Optional[int] = None
    nr_pages: Optional[int] = None  # field 5 (CRIU >= 4.2)
    unknown: tuple[tuple[int, bytes], ...] = ()  # (number, raw field)

    @property
    def npages(self) -> int:
        return self.nr_pages if self.nr_pages is not None else self.compat_nr_pages

    @property
    def effective_flags(self) -> int:
        """PE_* as CRIU's reader sees them (old images: from in_parent)."""
        if self.in_parent:
            return (self.flags or 0) | PE_PARENT
        if self.flags is None:
            return PE_PRESENT
        return self.flags

    @property
    def present(self) -> bool:
        return bool(self.effective_flags & PE_PRESENT)


@dataclass
class Pagemap:
    pages_id: int
    entries: list[PagemapEntry] = field(default_factory=list)
    byteorder: str = sys.byteorder  # of the u32 words, as found in the file
    head_unknown: tuple[tuple[int, bytes], ...] = ()

    @property
    def pages_name(self) -> str:
        return f"pages-{self.pages_id}.img"


def _decode_head(body: bytes, where: str) -> tuple[int, tuple]:
    pages_id, unknown = None, []
    for number, wire, value, raw in _fields(body, where):
        if number == 1:
            if wire != 0 or value > _U32:
                raise ImageError(f"{where}: bad pages_id")
            pages_id = value
        else:
            unknown.append((number, raw))
    if pages_id is None:
        raise ImageError(f"{where}: pagemap_head without pages_id")
    return pages_id, tuple(unknown)


def _decode_entry(body: bytes, where: str) -> PagemapEntry:
    got: dict[int, int] = {}
    unknown = []
    limits = {1: _U64, 2: _U32, 3: 1, 4: _U32, 5: _U64}
    for number, wire, value, raw in _fields(body, where):
        if number in limits:
            if wire != 0:
                raise ImageError(f"{where}: field {number} has wire type {wire}, "
                                 "expected a varint")
            if value > limits[number]:
                raise ImageError(f"{where}: field {number} value {value:#x} "
                                 "out of range")
            got[number] = value
        else:
            unknown.append((number, raw))
    for required, name in ((1, "vaddr"), (2, "nr_pages")):
        if required not in got:
            raise ImageError(f"{where}: pagemap_entry without {name}")
    return PagemapEntry(
        vaddr=got[1], compat_nr_pages=got[2],
        in_parent=bool(got[3]) if 3 in got else None,
        flags=got.get(4), nr_pages=got.get(5), unknown=tuple(unknown))


def _encode_entry(e: PagemapEntry) -> bytes:
    known = [_field(1, e.vaddr), _field(2, e.compat_nr_pages)]
    if e.in_parent is not None:
        known.append(_field(3, int(e.in_parent)))
    if e.flags is not None:
        known.append(_field(4, e.flags))
    if e.nr_pages is not None:
        known.append(_field(5, e.nr_pages))
    return _join(known, e.unknown)


def _image_bodies(data, name: str, magic: int, magic_name: str
                  ) -> tuple[str, str, list[tuple[int, bytes]]]:
    """(byte order, struct prefix, [(offset, protobuf body)]) of a CRIU
    image file: magic words, then size-prefixed entries."""
    data = memoryview(data)
    if len(data) < 8:
        raise ImageError(f"{name}: {len(data)} bytes, too short for the magic")
    for order, fmt in (("little", "<"), ("big", ">")):
        common, got = struct.unpack_from(fmt + "II", data, 0)
        if common == IMG_COMMON_MAGIC:
            break
    else:
        raise ImageError(f"{name}: not a CRIU image (first word "
                         f"{bytes(data[:4]).hex()}, expected IMG_COMMON_MAGIC)")
    if got != magic:
        raise ImageError(f"{name}: magic {got:#010x} is not {magic_name} "
                         f"({magic:#010x})")
    pos, end = 8, len(data)
    bodies = []
    while pos < end:
        if end - pos < 4:
            raise ImageError(f"{name}: truncated size word at byte {pos}")
        (size,) = struct.unpack_from(fmt + "I", data, pos)
        if size > MAX_ENTRY_SIZE:
            raise ImageError(f"{name}: entry at byte {pos} claims {size} bytes")
        if pos + 4 + size > end:
            raise ImageError(f"{name}: entry at byte {pos} ({size} bytes) runs "
                             f"past the end of the file ({end} bytes)")
        bodies.append((pos, bytes(data[pos + 4:pos + 4 + size])))
        pos += 4 + size
    return order, fmt, bodies


def decode_pagemap(data: bytes, name: str = "pagemap") -> Pagemap:
    """Parse the bytes of a pagemap-*.img (see the grammar above)."""
    order, _, bodies = _image_bodies(data, name, PAGEMAP_MAGIC, "PAGEMAP_MAGIC")
    if not bodies:
        raise ImageError(f"{name}: no pagemap_head")
    pages_id, head_unknown = _decode_head(bodies[0][1], f"{name} head")
    entries = [_decode_entry(body, f"{name} entry at byte {off}")
               for off, body in bodies[1:]]
    return Pagemap(pages_id, entries, order, head_unknown)


def decode_pstree(data: bytes, name: str = "pstree") -> list[tuple[int, tuple[int, ...]]]:
    """(pid, thread ids) of each process in a pstree.img:
    pstree_entry { 1: pid, 2: ppid, 3: pgid, 4: sid, 5: threads (repeated
    uint32, packed or not) }, all in the dumped tree's pid namespace."""
    _, _, bodies = _image_bodies(data, name, PSTREE_MAGIC, "PSTREE_MAGIC")
    out = []
    for off, body in bodies:
        where = f"{name} entry at byte {off}"
        pid, threads = None, []
        for number, wire, value, raw in _fields(body, where):
            if number == 1 and wire == 0:
                pid = value
            elif number == 5 and wire == 0:
                threads.append(value)
            elif number == 5 and wire == 2:
                _, pos = _read_varint(raw, 0, len(raw), where)     # the tag
                _, pos = _read_varint(raw, pos, len(raw), where)   # the length
                while pos < len(raw):
                    tid, pos = _read_varint(raw, pos, len(raw), where)
                    threads.append(tid)
        if pid is None:
            raise ImageError(f"{where}: no pid")
        out.append((pid, tuple(threads)))
    return out


def read_pstree(dir: Union[str, os.PathLike]) -> list[tuple[int, tuple[int, ...]]]:
    path = os.path.join(dir, "pstree.img")
    with open(path, "rb") as f:
        return decode_pstree(f.read(), path)


def encode_pagemap(pm: Pagemap) -> bytes:
    """The bytes of a pagemap-*.img; encode_pagemap(decode_pagemap(x)) == x
    for what CRIU writes."""
    fmt = "<" if pm.byteorder == "little" else ">"
    out = [struct.pack(fmt + "II", IMG_COMMON_MAGIC, PAGEMAP_MAGIC)]
    bodies = [_join([_field(1, pm.pages_id)], pm.head_unknown)]
    bodies += [_encode_entry(e) for e in pm.entries]
    for body in bodies:
        out.append(struct.pack(fmt + "I", len(body)))
        out.append(body)
    return b"".join(out)


def read_pagemap(dir: Union[str, os.PathLike], pid: int) -> Pagemap:
    path = os.path.join(dir, f"pagemap-{pid}.img")
    with open(path, "rb") as f:
        return decode_pagemap(f.read(), path)


def pagemap_pids(dir: Union[str, os.PathLike]) -> list[int]:
    """The pids that have a pagemap-<pid>.img in `dir`, ascending."""
    return sorted(int(m.group(1)) for m in map(_PAGEMAP_RE.match, os.listdir(dir))
                  if m)


def dumped_runs(pm: Pagemap) -> list[tuple[int, int]]:
    """(vaddr, npages) of the entries whose content is in pages-<id>.img
    (PE_PRESENT, whether or not PE_LAZY is also set; PE_PARENT-only and
    lazy-only entries have no bytes there), in file order, which is the
    order of their bytes in the pages file."""
    return [(e.vaddr, e.npages) for e in pm.entries if e.present and e.npages]


def _pages_path(dir, pm: Pagemap) -> str:
    return os.path.join(dir, pm.pages_name)


def _split(runs, psize: int, chunk_bytes: int) -> Iterator[tuple[int, int]]:
    per = max(1, chunk_bytes // psize)
    for vaddr, n in runs:
        while n > 0:
            k = min(n, per)
            yield vaddr, k
            vaddr += k * psize
            n -= k


def iter_pages(dir: Union[str, os.PathLike], pid: int, *, with_data: bool = True,
               psize: Optional[int] = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES
               ) -> Iterator[tuple[int, int, Union[memoryview, int]]]:
    """The content of pages-<id>.img of `pid`'s dump, run by run.

    Yields (vaddr, npages, data): data is a memoryview of the pages, or,
    with ``with_data=False``, their offset in the pages file (nothing is
    read).  Runs longer than ``chunk_bytes`` come in consecutive pieces.
    The pages file must be exactly as long as the pagemap says.
    """
    psize = psize or page_size()
    pm = read_pagemap(dir, pid)
    path = _pages_path(dir, pm)
    runs = dumped_runs(pm)
    want = sum(n for _, n in runs) * psize
    with open(path, "rb", buffering=0) as f:
        have = os.fstat(f.fileno()).st_size
        if have != want:
            raise ImageError(f"{path}: {have} bytes, the pagemap describes {want}")
        off = 0
        for vaddr, n in _split(runs, psize, chunk_bytes):
            size = n * psize
            if with_data:
                data = os.pread(f.fileno(), size, off)
                if len(data) != size:
                    raise ImageError(f"{path}: short read at {off}")
                yield vaddr, n, memoryview(data)
            else:
                yield vaddr, n, off
            off += size


# ---------------------------------------------------------------- the directory

def image_files(dir: Union[str, os.PathLike]) -> tuple[list[str], list[str]]:
    """(memory_files, other_files): names of the files of a dump in `dir`.

    memory_files are what the destination rebuilds or reads from CRIU's
    pagemap: every per-process ``pagemap-<pid>.img`` and the
    ``pages-<id>.img`` each one names.  other_files must be sent as they
    are: all other images, including ``pagemap-shmem-*.img`` and the pages
    files those name (shared memory is addressed by object offset, not by a
    process's virtual address, so the page store cannot supply it), and
    CRIU's ``stats-dump``.  Left out of both: CRIU's logs (``*.log``, this
    side's diagnostics, not state), dot files (our temporaries) and
    anything that is not a regular file.
    """
    names = sorted(n for n in os.listdir(dir)
                   if not n.startswith(".") and not n.endswith(".log")
                   and os.path.isfile(os.path.join(dir, n)))
    memory = []
    for n in names:
        if _PAGEMAP_RE.match(n):
            pm = read_pagemap(dir, int(_PAGEMAP_RE.match(n).group(1)))
            memory.append(n)
            memory.append(pm.pages_name)
    missing = [m for m in memory if m not in names]
    if missing:
        raise ImageError(f"{dir}: pagemaps name missing pages files {missing}")
    mem = set(memory)
    return sorted(mem), [n for n in names if n not in mem]
