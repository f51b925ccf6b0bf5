"""The source side of a live migration (a process tree or a container:
what moves is a Workload, see workload.py).

    rounds:      collect -> (converged? switch over) -> read, compress, send
    switch-over: trackers' markers dropped -> the workload's checkpoint,
                 which leaves every task stopped (CRIU --leave-stopped, or a
                 frozen cgroup); for a process tree CRIU hands its pages to
                 our page server, which writes only those not clean at the
                 destination (criu/page_server.py)
                 -> last collect, tasks stopped (invariant 4)
                 -> trackers removed
                 -> delta = dumped pages not known clean at the destination;
                 the few the page server left out because they were clean
                 when the dump began are read from the stopped tasks
                 -> delta pages + CRIU's other images -> wait for the restore
    commit:      the destination restored the tree, stopped; we destroy the
                 source (THE COMMIT POINT, logged) and say Commit; the
                 destination resumes its copy.

Any failure before the commit point leaves the source running as before:
trackers are removed, a workload the checkpoint left stopped is resumed,
the dump is deleted, and the destination is told to discard what it has.

"Clean at the destination" per process: pages whose content was sent and
that no collect has reported dirty since.  It is only ever computed from
tracker reports, so a process tracked `full` has no clean pages, and its
memory crosses in the frozen step.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import queue
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

from migrator import faults
from migrator.criu import images, runner
from migrator.criu.page_server import DumpPageServer, pwrite_all
from migrator.kernel import procfs
from migrator.kernel.pagemap import Pagemap
from migrator.kernel.vmread import read_ranges
from migrator.migration.policy import Convergence, Limits, RoundStats
from migrator.migration.transport import (Auth, Channel, TransportError, describe,
                                          stop_reason)
from migrator.migration.workload import ProcessTree, Workload, write_manifest
from migrator.protocol.frames import (Abort, Commit, Images, PageEncoder,
                                      Process, ProtocolError,
                                      RestoreResult, RoundEnd, StartMigration,
                                      SwitchOver)
from migrator.ranges import PAGE_SIZE, RangeList
from migrator.tracking import features
from migrator.tracking.base import Tracker, TrackerError
from migrator.tracking.scan import concat
from migrator.tracking.select import choose, make_tracker, process_facts

log = logging.getLogger("migrator.source")

IMAGE_CHUNK = 1 << 20
# Batches read and encoded ahead of the one being sent (the reader thread
# and the socket then work at the same time).  Memory: (AHEAD + 2) read
# buffers of batch_pages pages, plus up to AHEAD compressed payloads.
AHEAD = 4


class MigrationError(Exception):
    """The migration failed in `phase`; the source is running as before
    unless the message says otherwise."""

    def __init__(self, phase: str, message: str):
        super().__init__(message)
        self.phase = phase


@dataclass(frozen=True)
class SendOptions:
    to: str
    auth: Auth
    limits: Limits = field(default_factory=Limits)
    bandwidth: float | None = None     # bytes/s cap, None = unlimited
    level: int | None = 1              # zstd level, None = no compression
    tracker: str | None = None         # forced tracker
    workdir: str | None = None         # local tmpfs for the final dump
    batch_pages: int = 512             # pages per PageBatch (2 MiB)
    tcp_established: bool = False
    shell_job: bool = False
    restore_timeout: float = 600.0
    io_timeout: float = 60.0           # a silent peer for this long is dead


def _workdir(opts: SendOptions) -> str:
    # CRIU writes every page of the final dump here; tmpfs keeps that off
    # the disk and fast.
    base = opts.workdir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    return tempfile.mkdtemp(prefix="migrator-dump-", dir=base)


def _batches(ranges: RangeList, max_pages: int):
    """Runs of `ranges` grouped into lists of at most max_pages pages."""
    batch, n = [], 0
    for s, e in ranges:
        while s < e:
            take = min((e - s) // PAGE_SIZE, max_pages - n)
            batch.append((s, s + take * PAGE_SIZE))
            n += take
            s += take * PAGE_SIZE
            if n == max_pages:
                yield batch
                batch, n = [], 0
    if batch:
        yield batch


class Source:
    def __init__(self, workload: Workload, opts: SendOptions,
                 emit: Callable[[dict], None]):
        self.workload = workload
        self.opts = opts
        self.emit = emit
        self.trackers: dict[int, Tracker] = {}
        self.pagemaps: dict[int, Pagemap] = {}
        # Keyed by checkpoint pid: the name CRIU gives a process in its
        # images, its pid in its own pid namespace (a container's init is
        # 1).  Trackers and reads use our pid; the wire and the clean sets
        # use CRIU's, so the dump's pagemaps match what was sent.
        self.ckpt: dict[int, int] = {}
        self.clean: dict[int, RangeList] = {}
        self.channel: Channel | None = None
        self.dump_dir: str | None = None
        self.criu_version: str | None = None
        # checkpoint pid -> pages whose bytes the dump's pages file holds
        # (None: CRIU wrote every page itself)
        self.kept: dict[int, RangeList] | None = None
        self.dumped = False        # CRIU left the tree stopped
        self.committed = False
        self.t0 = time.monotonic()
        # One zstd context for the whole migration, used by one thread at
        # a time (the page reader of a round, then the delta).
        self.encoder = PageEncoder(opts.level)

    # -- the whole migration ------------------------------------------
    def run(self) -> dict:
        phase = "connect"
        try:
            self.channel = Channel.connect(
                self.opts.to, self.opts.auth, socket.gethostname(),
                bandwidth=self.opts.bandwidth, timeout=self.opts.io_timeout)
            phase = "track"
            if self.workload.page_server_via:
                # asked now, not in the downtime (and a missing criu
                # fails here, before anything is stopped)
                self.criu_version = runner.criu_version()
            self._start_tracking()
            phase = "precopy"
            rounds, reason, pending = self._precopy()
            phase = "switchover"
            breakdown = self._switch_over(rounds, reason, pending)
            return {"event": "done", "rounds": rounds,
                    "tracker": self._tracker_summary(),
                    "downtime_ms": round(breakdown["downtime_ms"], 1),
                    "total_ms": round((time.monotonic() - self.t0) * 1000, 1),
                    "sent_bytes": self.channel.sent_bytes,
                    "breakdown_ms": {k: round(v, 1) for k, v in breakdown.items()
                                     if k != "downtime_ms"}}
        except BaseException as e:
            if self.committed:
                raise
            # A broken link is often the destination's doing: say why it
            # stopped when it told us.
            why = (self.channel.peer_error()
                   if isinstance(e, TransportError) and self.channel else None)
            if why:
                told = _destination_failed(phase, why)
                told.__cause__ = e
                e = told
            self._roll_back(phase, e)
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            if isinstance(e, MigrationError):
                raise e
            raise MigrationError(phase, describe(e)) from e
        finally:
            self._cleanup()

    # -- tracking -----------------------------------------------------
    def _start_tracking(self) -> None:
        caps = features.probe()
        tree = self.workload.pids()
        decisions = []
        for p in tree:
            try:
                d = choose(features.arch(), caps, process_facts(p, caps),
                           self.opts.tracker)
                k = procfs.innermost_pid(p)
            except OSError as e:
                # a child gone since the tree was listed: not to move
                if p == tree[0] or not _ended(p, e):
                    raise
                log.info("pid %d exited before its tracking started", p)
                continue
            decisions.append(d)
            self.ckpt[p] = k
        self.emit({"event": "start", "pid": tree[0], "processes": [
            d.as_dict() for d in decisions]})
        if len(set(self.ckpt.values())) != len(self.ckpt):
            raise MigrationError("track", "the processes do not share one pid "
                                 f"namespace: {self.ckpt}")
        self.channel.send(StartMigration(
            uuid.uuid4().hex,
            [Process(self.ckpt[d.pid], d.tracker) for d in decisions],
            PAGE_SIZE))
        self._first = {}
        for d in decisions:
            t = make_tracker(d, caps)
            self.trackers[d.pid] = t
            self.clean[self.ckpt[d.pid]] = RangeList()
            try:
                self.pagemaps[d.pid] = Pagemap(d.pid)
                self._first[d.pid] = t.start()
            except (OSError, TrackerError):
                # announced, then gone: like an exit during pre-copy
                if d.pid == tree[0] or not procfs.ended(d.pid):
                    raise
                self._exited(d.pid)

    def _tracker_summary(self) -> str:
        names = sorted({t.name for t in self.trackers.values()})
        return names[0] if len(names) == 1 else ",".join(names)

    def _exited(self, pid: int) -> None:
        """A tracked process ended during pre-copy: it will not be in the
        checkpoint, so stop following it (the rest migrates as usual)."""
        log.info("pid %d exited during pre-copy; no longer tracked", pid)
        t = self.trackers.pop(pid)
        try:
            t.stop()
        except OSError:
            pass
        pm = self.pagemaps.pop(pid, None)
        if pm is not None:
            pm.close()
        self.clean[self.ckpt[pid]] = RangeList()

    def _collect(self, stopped: bool = False) -> dict[int, object]:
        out = {}
        for pid, t in list(self.trackers.items()):
            first = self._first.pop(pid, None)
            try:
                c = first if first is not None else t.collect(stopped=stopped)
            except OSError as e:
                if stopped or not _ended(pid, e):
                    raise
                self._exited(pid)
                continue
            # Invariant 2: only memory tracked continuously stays clean.
            k = self.ckpt[pid]
            self.clean[k] = (self.clean[k] & c.tracked) - c.dirty
            out[pid] = c
        return out

    def _present(self, pid: int, dirty: RangeList, tracked: RangeList) -> RangeList:
        """The dirty pages that are in memory: never-touched memory is zero
        and is not sent; swapped-out pages cross in the final step rather
        than being swapped in by reading them.  One scan per tracked run
        (a few) rather than per dirty run (thousands in a busy round)."""
        pm = self.pagemaps[pid]
        return concat([pm.scan_present(s, e) for s, e in tracked]) & dirty

    # -- pre-copy -----------------------------------------------------
    def _precopy(self) -> tuple[int, str, dict]:
        conv = Convergence(self.opts.limits)
        rnd = 0
        last_end = time.monotonic()
        last_seconds = 0.0
        # How fast page content crossed (uncompressed bytes per second), at
        # best so far: a switch-over sends pages, and one big round measures
        # the link better than a small one dominated by fixed costs.
        page_rate = 0.0
        while True:
            collects = self._collect()
            to_send = {}
            for pid, c in collects.items():
                try:
                    to_send[pid] = self._present(pid, c.dirty & c.tracked, c.tracked)
                except OSError as e:
                    if not _ended(pid, e):
                        raise
                    self._exited(pid)
            for pid, ranges in to_send.items():
                c = collects[pid]
                log.debug("pid %d: %d dirty, %d tracked, %d to send", pid,
                          c.dirty.npages(), c.tracked.npages(), ranges.npages())
            pages = sum(r.npages() for r in to_send.values())
            if rnd >= 1:
                stats = RoundStats(round=rnd, dirty_bytes=pages * PAGE_SIZE,
                                   sent_bytes=0, seconds=last_seconds,
                                   elapsed_s=time.monotonic() - self.t0,
                                   bandwidth=page_rate)
                verdict = conv.after_round(stats)
                if verdict.switch:
                    return rnd, verdict.reason, to_send
            rnd += 1
            t0 = time.monotonic()
            sent0 = self.channel.sent_bytes
            sent_pages = sum(self._send_pages(pid, ranges)
                             for pid, ranges in to_send.items())
            self.channel.send(RoundEnd(rnd, sent_pages,
                                       self.channel.sent_bytes - sent0))
            t1 = time.monotonic()
            sent = self.channel.sent_bytes - sent0
            last_seconds = t1 - t0
            bandwidth = sent / last_seconds if last_seconds > 0 else 0.0
            if last_seconds > 0:
                page_rate = max(page_rate, pages * PAGE_SIZE / last_seconds)
            dirty_rate = pages * PAGE_SIZE / max(t1 - last_end, 1e-6)
            last_end = t1
            # What the next collect should find: what the workload dirties
            # in one round's time, capped by what there is.
            expect = min(pages * PAGE_SIZE, dirty_rate * last_seconds)
            predicted = expect / page_rate * 1000 if page_rate else None
            self.emit({"event": "round", "round": rnd, "dirty_pages": pages,
                       "sent_bytes": sent, "dirty_rate": round(dirty_rate),
                       "bandwidth": round(bandwidth),
                       "page_rate": round(page_rate),
                       "predicted_downtime_ms":
                           None if predicted is None else round(predicted, 1)})

    def _send_pages(self, pid: int, ranges: RangeList) -> int:
        """Send `ranges` of `pid`; returns the pages sent (fewer if the
        process exited meanwhile)."""
        sent = 0
        try:
            with contextlib.closing(self._read_ahead(pid, ranges)) as batches:
                for rl, gone, batch in batches:
                    self.channel.send(batch)
                    sent += batch.npages()
                    # Sent after the collect that reported them: clean from
                    # now on, unless they vanished while being read.
                    k = self.ckpt[pid]
                    self.clean[k] = self.clean[k] | (rl - gone)
        except OSError as e:
            if not _ended(pid, e):
                raise
            self._exited(pid)
        return sent

    def _read_ahead(self, pid: int, ranges: RangeList):
        """(runs, vanished, PageBatch) for the batches of `ranges`, read
        and encoded by a worker thread up to AHEAD batches ahead.
        process_vm_readv, crc32c and zstd release the GIL, so reading the
        next batches overlaps sending this one.  A batch's data is a view
        of a reused buffer, valid until the consumer asks for the next
        batch.  Closing the generator (any error, Ctrl-C) stops and joins
        the worker; an error of the worker is raised here."""
        size = self.opts.batch_pages * PAGE_SIZE
        free: queue.Queue = queue.Queue()
        for _ in range(AHEAD + 2):
            free.put(bytearray(size))
        ready: queue.Queue = queue.Queue(maxsize=AHEAD)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    ready.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    pass
            return False

        def work() -> None:
            try:
                for runs in _batches(ranges, self.opts.batch_pages):
                    buf = None
                    while buf is None:
                        if stop.is_set():
                            return
                        try:
                            buf = free.get(timeout=0.1)
                        except queue.Empty:
                            pass
                    rl = RangeList(runs)
                    data, gone = read_ranges(pid, rl, buf)
                    batch = self.encoder.batch(
                        self.ckpt[pid], [(s, (e - s) // PAGE_SIZE) for s, e in runs], data)
                    if not put((rl, gone, batch, buf)):
                        return
                put(done)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(e)

        worker = threading.Thread(target=work, name=f"migrator-read-{pid}",
                                  daemon=True)
        worker.start()
        try:
            while True:
                item = ready.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                rl, gone, batch, buf = item
                yield rl, gone, batch
                del batch
                free.put(buf)
        finally:
            stop.set()
            worker.join()

    # -- switch-over --------------------------------------------------
    def _switch_over(self, rounds: int, reason: str, pending: dict) -> dict:
        final = rounds + 1
        self.channel.send(SwitchOver(final, reason))
        self.emit({"event": "switchover", "round": final, "reason": reason})
        t_freeze = time.monotonic()
        self.dump_dir = _workdir(self.opts)
        for t in self.trackers.values():
            t.before_checkpoint()
        log.info("freezing %s: checkpoint into %s", self.workload.kind,
                 self.dump_dir)
        ps = None
        if self.workload.page_server_via:
            # What is clean now may be written before the freeze; the last
            # collect finds those pages and _send_delta reads them back.
            ps = DumpPageServer(self.dump_dir, dict(self.clean), self.criu_version)
            ps.start(tcp=self.workload.page_server_via == "tcp")
        try:
            try:
                if ps:
                    self.workload.checkpoint(self.dump_dir, page_server=ps)
                else:
                    self.workload.checkpoint(self.dump_dir)
            finally:
                # CRIU may have stopped the tree even when it failed.
                self.dumped = True
            if ps:
                self.kept = ps.finish()
                log.info("page server: %d MiB received from CRIU (%d MiB held at the "
                         "destination, dropped unread), %d MiB written",
                         ps.bytes_received >> 20, ps.bytes_dropped >> 20,
                         ps.bytes_written >> 20)
        finally:
            if ps:
                ps.close()
        t_dumped = time.monotonic()
        for pid, c in self._collect(stopped=True).items():
            log.info("pid %d: last collect, frozen: %d pages dirty, %d tracked, "
                     "%d untracked", pid, c.dirty.npages(), c.tracked.npages(),
                     c.untracked.npages())
        for t in self.trackers.values():
            t.stop()
        t_collected = time.monotonic()
        sent0 = self.channel.sent_bytes
        delta_pages = self._send_delta()
        self._send_images()
        self.channel.send(RoundEnd(final, delta_pages,
                                   self.channel.sent_bytes - sent0))
        t_sent = time.monotonic()
        self.channel.sock.settimeout(self.opts.restore_timeout)
        ev = self.channel.next_event()
        t_restored = time.monotonic()
        why = stop_reason(ev)
        if why:
            raise _destination_failed("restore", why)
        if not isinstance(ev, RestoreResult):
            raise MigrationError("restore", f"destination answered {ev!r}")
        if not ev.ok:
            raise MigrationError("restore", f"destination could not restore: "
                                 f"{ev.message}")
        self._commit()
        t_done = time.monotonic()
        return {**_restore_timings(ev.message),
                "downtime_ms": (t_done - t_freeze) * 1000,
                "dump_ms": (t_dumped - t_freeze) * 1000,
                "last_collect_ms": (t_collected - t_dumped) * 1000,
                "delta_send_ms": (t_sent - t_collected) * 1000,
                "restore_ms": (t_restored - t_sent) * 1000,
                "commit_ms": (t_done - t_restored) * 1000,
                "delta_pages": delta_pages}

    def _send_delta(self) -> int:
        """Pages of the dump that the destination does not hold clean.
        The pagemap is compared with the clean set first; only the pages
        needed are read from the dump's pages file, after the holes the
        page server left among them are filled (_fill_holes)."""
        total = 0
        max_pages = self.opts.batch_pages
        buf = bytearray(max_pages * PAGE_SIZE)
        ours = {k: p for p, k in self.ckpt.items()}
        for pid in images.pagemap_pids(self.dump_dir):
            if pid not in self.clean:
                continue  # not announced: its pages travel as image files
            clean = self.clean[pid]
            kept = None if self.kept is None else self.kept.get(pid, RangeList())
            before = total
            filled = 0
            pm = images.read_pagemap(self.dump_dir, pid)
            path = os.path.join(self.dump_dir, pm.pages_name)
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            try:
                pending: list[tuple[int, int, int]] = []   # (addr, npages, offset)
                count = 0

                def flush() -> None:
                    nonlocal pending, count
                    if not pending:
                        return
                    view = memoryview(buf)
                    pos = 0
                    for addr, n, off in pending:
                        want = n * PAGE_SIZE
                        got = os.preadv(fd, [view[pos:pos + want]], off)
                        if got != want:
                            raise images.ImageError(f"{path}: short read at {off}")
                        pos += want
                    self.channel.send(self.encoder.batch(
                        pid, [(a, n) for a, n, _ in pending], view[:pos]))
                    pending, count = [], 0

                for vaddr, n, off in images.iter_pages(
                        self.dump_dir, pid, with_data=False, chunk_bytes=1 << 62):
                    end = vaddr + n * PAGE_SIZE
                    need = RangeList([(vaddr, end)]) - clean.clip(vaddr, end)
                    if kept is not None:
                        filled += self._fill_holes(fd, pid, ours.get(pid),
                                                   need - kept.clip(vaddr, end),
                                                   vaddr, off)
                    for s, e in need:
                        if pending and s < pending[-1][0] + pending[-1][1] * PAGE_SIZE:
                            flush()  # runs of a batch must ascend
                        while s < e:
                            take = min((e - s) // PAGE_SIZE, max_pages - count)
                            pending.append((s, take, off + (s - vaddr)))
                            count += take
                            total += take
                            s += take * PAGE_SIZE
                            if count == max_pages:
                                flush()
                flush()
            finally:
                os.close(fd)
            dumped = sum(n for _, n in images.dumped_runs(pm))
            if filled:
                log.info("pid %d: %d pages written since the last round read "
                         "from the stopped process", pid, filled)
            log.info("pid %d: %d of %d dumped pages cross in the final step "
                     "(%d pages known clean)", pid, total - before, dumped,
                     clean.npages())
        return total

    @staticmethod
    def _fill_holes(fd: int, pid: int, ours: int | None, holes: RangeList,
                    vaddr: int, off: int) -> int:
        """Write into the pages file (fd; the entry at vaddr starts at off)
        the pages of the delta the page server left out (clean when the
        dump began, written before the freeze): read from the stopped
        tasks, whose memory is what they resume with, so that no page of
        the delta is sent from a hole.  Returns the pages written."""
        if not holes:
            return 0
        if ours is None:
            raise MigrationError("switchover", f"pid {pid}: dumped pages "
                                 "left out and no process to read them from")
        data, gone = read_ranges(ours, holes)
        if gone:
            raise MigrationError(
                "switchover", f"pid {pid}: pages {gone!r} changed during "
                "the checkpoint and cannot be read back")
        pos = 0
        for s, e in holes:
            pwrite_all(fd, data[pos:pos + e - s], off + (s - vaddr))
            pos += e - s
        return holes.npages()

    def _send_images(self) -> None:
        write_manifest(self.dump_dir, self.workload.manifest())
        mem, other = images.image_files(self.dump_dir)
        names = list(other)
        for n in mem:
            pid_part = n[len("pagemap-"):-len(".img")] if n.startswith("pagemap-") else None
            if pid_part is not None:
                names.append(n)  # the destination rebuilds pages from it
                if int(pid_part) not in self.clean:
                    names.append(images.read_pagemap(self.dump_dir, int(pid_part)).pages_name)
        for name in names:
            path = os.path.join(self.dump_dir, name)
            with open(path, "rb") as f:
                chunk = f.read(IMAGE_CHUNK)
                while True:
                    nxt = f.read(IMAGE_CHUNK)
                    self.channel.send(Images(name, chunk, not nxt))
                    if not nxt:
                        break
                    chunk = nxt

    def _commit(self) -> None:
        # THE COMMIT POINT.  From here on the migration cannot be undone:
        # the destination holds the only copy (stopped until Commit).
        log.warning("commit point: destroying the source copy (%s %s)",
                    self.workload.kind, sorted(self.trackers))
        self.committed = True
        self.workload.destroy()
        try:
            faults.check("commit-send")
            self.channel.send(Commit())
        except (TransportError, ProtocolError, OSError) as e:
            raise MigrationError(
                "commit", "the source was destroyed but Commit did not reach "
                f"the destination ({e}); its restored copy waits stopped: run "
                "'migrator resolve --commit' there") from e

    # -- failure ------------------------------------------------------
    def _roll_back(self, phase: str, exc: BaseException) -> None:
        log.warning("migration failed in %s (%s): rolling back", phase,
                    describe(exc))
        for t in self.trackers.values():
            try:
                t.stop()
            except Exception:  # noqa: BLE001 - keep undoing the rest
                log.exception("stopping a tracker")
        if self.dumped:
            self.workload.resume()
        if self.channel:
            try:
                self.channel.send(Abort(f"{phase}: {describe(exc)}"[:900]))
            except Exception:  # noqa: BLE001 - the link may be what failed
                pass

    def _cleanup(self) -> None:
        for pm in self.pagemaps.values():
            pm.close()
        if self.channel:
            self.channel.close()
        if self.dump_dir:
            shutil.rmtree(self.dump_dir, ignore_errors=True)


def _destination_failed(phase: str, why: str) -> MigrationError:
    return MigrationError(phase, f"the destination failed ({why})")


def _ended(pid: int, e: OSError) -> bool:
    """Whether error `e` about pid means that the process ended: ESRCH and
    ENOENT also come from a mapping unmapped under a call, so the process
    itself is checked."""
    return e.errno in (errno.ESRCH, errno.ENOENT) and procfs.ended(pid)


def _restore_timings(message: str) -> dict:
    """rebuild_ms / criu_restore_ms / reserved_mib from the JSON object a
    destination puts at the end of RestoreResult's message (none from an
    older one)."""
    m = re.search(r"(\{[^{}]*\})\s*$", message)
    try:
        d = json.loads(m.group(1)) if m else {}
    except ValueError:
        return {}
    return {k: float(d[k]) for k in ("rebuild_ms", "criu_restore_ms", "reserved_mib")
            if isinstance(d.get(k), (int, float))}


def send(pid: int, opts: SendOptions, emit: Callable[[dict], None]) -> dict:
    """Live-migrate the process tree rooted at `pid`."""
    tree = ProcessTree(pid, shell_job=opts.shell_job,
                       tcp_established=opts.tcp_established)
    return Source(tree, opts, emit).run()
