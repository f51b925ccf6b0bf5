"""Hand the page stores to CRIU as parent images, without copying them.

CRIU restores incremental dumps: a pagemap entry flagged ``PE_PARENT`` has
its pages in the image directory that ``<images>/parent`` points to, looked
up there by address, and that directory may have a parent of its own.  A
store segment (store.py) is laid out exactly as a pages image: blocks in
rising address order, back to back.  So at switch-over the destination

- builds one *level* directory per segment index k in the images
  directory (``levels/level-1`` holds every process's segment 0,
  ``levels/level-2`` segment 1, ...): per process a
  pagemap listing the blocks of segments 0..k-1 in address order, those of
  segment k-1 ``PE_PRESENT`` (their bytes are the segment file, hard-linked
  in as that level's pages image), the older ones ``PE_PARENT``; each level
  links to the one below as its parent;
- rewrites each process's final pagemap (CRIU's own, from the last dump)
  so that its present runs point to the parent (``PE_PARENT``), and links
  ``<images>/parent`` to the top level.

The delta of the final dump was put in the stores like every round, so no
page is copied during the downtime.  Only runs in segments beyond
``MAX_LEVELS`` (a process that kept mapping memory below what was already
sent, round after round) are copied into the process's own pages image.
A page the dump holds and no store holds is an error, never a zero page.

Facts from CRIU (criu/pagemap.c): a parent pagemap is searched forward by
address, so its entries must rise; each ``PE_PRESENT`` entry takes the next
``nr_pages`` pages of its pages image; a process with no pagemap in the
parent directory has no parent there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from migrator.criu import images
from migrator.criu.images import PE_LAZY, PE_PARENT, PE_PRESENT, Pagemap, PagemapEntry
from migrator.migration.store import PageStore

# Each level costs CRIU one more pagemap to walk per read that reaches it.
MAX_LEVELS = 16

PARENT_LINK = "parent"  # CRIU's name for the link to the parent images
LEVELS = "levels"       # the level directories, inside the images directory


@dataclass
class Prepared:
    levels: int = 0
    parent_pages: int = 0   # pages CRIU reads from the stores
    copied_pages: int = 0   # pages copied into a process's own pages image
    lazy_pages: int = 0     # pages left to a lazy-pages daemon


def _entry(like: PagemapEntry | None, vaddr: int, npages: int, flags: int) -> PagemapEntry:
    # Write the page count the way the dump did: CRIU >= 4.2 writes the
    # 64-bit field 5 (and 0 in the old field 2), older CRIU field 2 only.
    if like is not None and like.nr_pages is None:
        return PagemapEntry(vaddr=vaddr, compat_nr_pages=npages, flags=flags)
    return PagemapEntry(vaddr=vaddr, compat_nr_pages=0, flags=flags, nr_pages=npages)


def _append(entries: list[PagemapEntry], e: PagemapEntry, psize: int) -> None:
    """Append, merging with the previous entry when it continues it."""
    if entries:
        last = entries[-1]
        if (last.flags == e.flags and last.vaddr + last.npages * psize == e.vaddr
                and (last.nr_pages is None) == (e.nr_pages is None)):
            n = last.npages + e.npages
            if last.nr_pages is None:
                last.compat_nr_pages = n
            else:
                last.nr_pages = n
            return
    entries.append(e)


def _write_atomically(path: str, data: bytes) -> None:
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)  # as CRIU writes its images
    os.rename(tmp, path)


def _rewrite_final(images_dir: str, pid: int, store: PageStore, nlevels: int,
                   out: Prepared, lazy: bool) -> str:
    """Point the present runs of pid's final pagemap to the parent levels;
    copy what lies beyond them into its own pages image.  With `lazy`,
    runs CRIU flagged PE_LAZY become PE_LAZY alone: a lazy-pages daemon
    asks for them (criu/page_server.py StorePageServer).  Returns the
    dump's byte order, which the levels' pagemaps keep."""
    pm = images.read_pagemap(images_dir, pid)
    psize = store.page_size
    entries: list[PagemapEntry] = []
    copies: list[tuple[int, int]] = []  # (vaddr, npages) in file order
    for e in pm.entries:
        if not e.present or not e.npages:
            entries.append(e)  # no bytes in the pages image: kept as is
            continue
        missing = store.check_held(e.vaddr, e.npages)
        if missing:
            raise RuntimeError(
                f"pid {pid}: the dump holds pages the source never sent "
                f"({missing.npages()} pages, first at {next(iter(missing))[0]:#x})")
        if lazy and e.effective_flags & PE_LAZY:
            _append(entries, _entry(e, e.vaddr, e.npages, PE_LAZY), psize)
            out.lazy_pages += e.npages
            continue
        for vaddr, n, seg in store.segment_runs(e.vaddr, e.npages):
            if seg < nlevels:
                # PE_LAZY is kept as CRIU wrote it; a plain restore ignores it.
                flags = PE_PARENT | (e.effective_flags & PE_LAZY)
                _append(entries, _entry(e, vaddr, n, flags), psize)
                out.parent_pages += n
            else:
                flags = PE_PRESENT | (e.effective_flags & PE_LAZY)
                _append(entries, _entry(e, vaddr, n, flags), psize)
                copies.append((vaddr, n))
                out.copied_pages += n
    pages = os.path.join(images_dir, pm.pages_name)
    tmp = os.path.join(images_dir, f".{pm.pages_name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        off = 0
        for vaddr, n in copies:
            store.copy_to(vaddr, n, fd, off)
            off += n * psize
    finally:
        os.close(fd)
    os.rename(tmp, pages)
    new = Pagemap(pm.pages_id, entries, pm.byteorder, pm.head_unknown)
    _write_atomically(os.path.join(images_dir, f"pagemap-{pid}.img"),
                      images.encode_pagemap(new))
    return pm.byteorder


def _write_level(level_dir: str, k: int, pid: int, store: PageStore,
                 byteorder: str) -> None:
    """Level k (1-based) of one process: segments 0..k-1, k-1 present."""
    psize, per_block = store.page_size, store.per_block
    segments = store.segments()
    blocks = sorted((b, seg) for seg, (_, bl) in enumerate(segments[:k]) for b in bl)
    entries: list[PagemapEntry] = []
    for block, seg in blocks:
        flags = PE_PRESENT if seg == k - 1 else PE_PARENT
        _append(entries, _entry(None, block, per_block, flags), psize)
    pages_name = f"pages-{pid}.img"
    target = os.path.join(level_dir, pages_name)
    if k <= len(segments):
        os.link(segments[k - 1][0], target)
    else:  # nothing of this process at this level: every entry points down
        open(target, "wb").close()
    pm = Pagemap(pid, entries, byteorder)
    _write_atomically(os.path.join(level_dir, f"pagemap-{pid}.img"),
                      images.encode_pagemap(pm))


def _not_lazy(images_dir: str, pid: int) -> None:
    """A process without a store keeps its pages image; in a lazy restore
    CRIU must read those pages itself, the daemon asks only the stores."""
    pm = images.read_pagemap(images_dir, pid)
    if not any(e.effective_flags & PE_LAZY for e in pm.entries):
        return
    for e in pm.entries:
        if e.effective_flags & PE_LAZY:  # only images with flags have it
            e.flags = e.effective_flags & ~PE_LAZY
    _write_atomically(os.path.join(images_dir, f"pagemap-{pid}.img"),
                      images.encode_pagemap(pm))


def prepare(images_dir: str, stores: dict[int, PageStore],
            max_levels: int | None = None, lazy: bool = False) -> Prepared:
    """Make the final dump in images_dir read its pages from the stores.

    stores: checkpoint pid -> store, for the processes whose pagemap is in
    images_dir (others keep the pages image that came with the dump).  The
    levels go to images_dir/levels, which must be on the stores'
    filesystem (hard links).  Links between levels are relative: CRIU
    follows them from inside a container, whose root is not ours.
    max_levels (default MAX_LEVELS) 0 copies every page into the dump's
    own pages image.  lazy: PE_LAZY runs are left to a lazy-pages daemon
    fed from the stores, never to parent levels: CRIU 4.2's daemon never
    completes a read that goes to a parent (its parent page-read has no
    io_complete)."""
    if max_levels is None:
        max_levels = MAX_LEVELS
    out = Prepared()
    pids = [pid for pid in sorted(stores)
            if os.path.exists(os.path.join(images_dir, f"pagemap-{pid}.img"))]
    if os.path.lexists(os.path.join(images_dir, PARENT_LINK)):
        raise RuntimeError(f"{images_dir} already has a parent link")
    out.levels = min(max_levels, max((len(stores[p].segments()) for p in pids), default=0))
    byteorder = {pid: _rewrite_final(images_dir, pid, stores[pid], out.levels,
                                     out, lazy)
                 for pid in pids}
    if lazy:
        for pid in images.pagemap_pids(images_dir):
            if pid not in stores:
                _not_lazy(images_dir, pid)
    if out.levels == 0:
        return out
    for k in range(1, out.levels + 1):
        level_dir = os.path.join(images_dir, LEVELS, f"level-{k}")
        os.makedirs(level_dir)
        for pid in pids:
            _write_level(level_dir, k, pid, stores[pid], byteorder[pid])
        if k > 1:
            os.symlink(f"../level-{k - 1}", os.path.join(level_dir, PARENT_LINK))
    os.symlink(f"{LEVELS}/level-{out.levels}", os.path.join(images_dir, PARENT_LINK))
    return out
