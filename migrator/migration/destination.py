"""The destination side: receive pages and images, restore, hand over.

One migration at a time, each in DIR/<migration id>/:

    store/pages-<pid>.store.K page store per process (sparse segment
                              files, store.py); as they fill, a helper
                              holds as much memory ready for the restore
                              (reserve.py)
    images/                   CRIU's image files as received, pagemaps
                              rewritten to read from levels/
    images/levels/level-K/    the stores as CRIU parent images (levels.py):
                              hard links, so on the store's filesystem
    state                     "restored <root pid>" while the restored
                              tree waits, stopped, for the source's Commit

The restored tree is resumed only on Commit.  If the connection is lost
after the restore succeeded and before Commit, we cannot know whether the
source destroyed its copy: the tree stays stopped, the state file says
so, and `migrator resolve` finishes (--commit) or undoes (--abort) the
hand-over.  Before that point any failure discards everything.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import socket
import subprocess
import sys
import threading
import time
from typing import Callable

from migrator.criu import images, runner
from migrator.criu.lazy import LazyPages
from migrator.migration import levels, store_server, workload
from migrator.migration.reserve import Reserve
from migrator.migration.store import PageStore
from migrator.migration.transport import Auth, Channel, TransportError, describe
from migrator.protocol.connection import ConnectionClosed, State
from migrator.protocol.frames import (Abort, Commit, Error, Images, PageBatch,
                                      ProtocolError, RestoreResult, RoundEnd,
                                      StartMigration, SwitchOver, decode_pages)

log = logging.getLogger("migrator.destination")

STORE_SERVER_LOG = "store-server.log"   # in the images directory
# after the lazy-pages daemon ended, how long its store server may take
STORE_SERVER_TIMEOUT = 30.0


class Undecided(Exception):
    """The hand-over's outcome is unknown; the restored tree waits."""


class PageWriter:
    """Verifies, decompresses and stores received page batches in a worker
    thread, so that the next frame is received while the last one is
    written (crc32c, zstd and pwrite release the GIL).  Each batch's data is
    a view into its own frame buffer, so nothing is copied to hand it over.
    A failure surfaces in the receiving thread at the next submit() or
    drain(); later batches are then dropped."""

    DEPTH = 4  # batches in flight: at most DEPTH frames (2 MiB each) held

    def __init__(self, page_size: int, limits):
        self.page_size = page_size
        self.limits = limits
        self._q: queue.Queue = queue.Queue(self.DEPTH)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="migrator-store",
                                        daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._q.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    store, batch = item
                    data = memoryview(decode_pages(batch, self.page_size, self.limits))
                    off = 0
                    for addr, n in batch.runs:
                        size = n * store.page_size
                        try:
                            store.put(addr, data[off:off + size])
                        except OSError as e:
                            raise OSError(e.errno, f"writing the page store "
                                          f"{store.path}: {e.strerror}") from e
                        off += size
            except BaseException as e:  # noqa: BLE001 - raised in the receiver
                self._error = e
            finally:
                self._q.task_done()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, store: PageStore, batch: PageBatch) -> None:
        self._check()
        self._q.put((store, batch))

    def drain(self) -> None:
        """Wait until every submitted batch is stored (or one failed)."""
        self._q.join()
        self._check()

    def close(self) -> None:
        """Stop the worker once it has finished what it holds."""
        if self._thread.is_alive():
            self._q.put(None)
            self._thread.join()


class Session:
    def __init__(self, base: str, channel: Channel, emit: Callable[[dict], None],
                 lazy: bool = False, lazy_timeout: float = 600.0,
                 reserve: bool = True):
        self.reserve_memory = reserve
        self.reserve: Reserve | None = None
        self.lazy = lazy  # restore with CRIU's lazy-pages daemon (criu/lazy.py)
        self.lazy_timeout = lazy_timeout
        self.lazy_pages: LazyPages | None = None
        # the process that serves the daemon from the stores (store_server.py)
        self.lazy_server: subprocess.Popen | None = None
        # asked now, not in the downtime
        self.criu_version = runner.criu_version() if lazy else None
        self.base = base
        self.channel = channel
        self.emit = emit
        self.dir: str | None = None
        self.stores: dict[int, PageStore] = {}
        self.writer: PageWriter | None = None
        self.files: dict[str, object] = {}
        self.restored: int | None = None
        self.awaiting_commit = False  # restored, stopped, Commit not yet seen

    # -- paths --------------------------------------------------------
    @property
    def images_dir(self) -> str:
        return os.path.join(self.dir, "images")

    def _begin(self, start: StartMigration) -> None:
        self.id = start.migration_id
        self.dir = os.path.join(self.base, start.migration_id)
        os.makedirs(os.path.join(self.dir, "store"))
        os.makedirs(self.images_dir)
        self.writer = PageWriter(start.page_size, self.channel.conn.limits)
        if self.reserve_memory:
            try:
                self.reserve = Reserve(os.path.join(self.dir, "store"))
            except OSError as e:  # only the downtime suffers
                log.warning("no memory held for the restore: %s", e)
        for p in start.processes:
            self.stores[p.pid] = PageStore(
                os.path.join(self.dir, "store", f"pages-{p.pid}.store"),
                start.page_size)
        self.emit({"event": "receiving", "migration": self.id,
                   "processes": [{"pid": p.pid, "tracker": p.tracker}
                                 for p in start.processes]})

    # -- the conversation ---------------------------------------------
    def run(self) -> dict:
        ch = self.channel
        try:
            while True:
                ev = ch.next_event()
                if isinstance(ev, StartMigration):
                    self._begin(ev)
                elif isinstance(ev, PageBatch):
                    self.writer.submit(self.stores[ev.pid], ev)
                elif isinstance(ev, Images):
                    self._image(ev)
                elif isinstance(ev, SwitchOver):
                    self.emit({"event": "switchover", "round": ev.round,
                               "reason": ev.reason})
                elif isinstance(ev, RoundEnd):
                    self.writer.drain()  # the round's pages are all stored
                    if self.reserve is not None:
                        self.reserve.full_speed()  # paced in round 1: reserve.py
                    if ch.conn.state is State.RESTORING:
                        self._restore()
                    else:
                        self.emit({"event": "round", "round": ev.round,
                                   "pages": ev.dirty_pages})
                elif isinstance(ev, Commit):
                    self.awaiting_commit = False
                    workload.resume_restored(self.images_dir, self.restored)
                    log.info("committed: restored tree %d resumed", self.restored)
                    # Nothing is left to decide, even if we die while a
                    # lazy restore still fills the tree.
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self._state_path())
                    if self.lazy_pages is not None:
                        self._finish_lazy()
                    self._forget_state()
                    return {"event": "done", "migration": self.id,
                            "pid": self.restored}
                elif isinstance(ev, (Abort, Error)):
                    why = ev.reason if isinstance(ev, Abort) else ev.message
                    raise ProtocolError(f"source gave up: {why}")
                elif isinstance(ev, ConnectionClosed):
                    raise ProtocolError("source closed the connection")
        except BaseException as e:
            self._stop_writer()  # nothing writes into the stores they remove
            # The source learns why (it is sending, not reading: see
            # Channel.peer_error); a no-op once the peer stopped or the
            # connection already told it.
            ch.tell_error(ch.conn.state.name.lower(), describe(e))
            self._fail(e)
            raise
        finally:
            self._stop_writer()
            self._release_reserve()
            for f in self.files.values():
                f.close()
            for s in self.stores.values():
                s.close()

    def _release_reserve(self) -> None:
        if self.reserve is not None:
            self.reserve.release()

    def _stop_writer(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _finish_lazy(self) -> None:
        """Wait until the daemon has put every page into the resumed tree.
        If it fails, pages it had not copied would read as zeroes: the tree
        is killed (by _fail) rather than left running on wrong memory."""
        t0 = time.monotonic()
        try:
            self.lazy_pages.wait(self.lazy_timeout)
            self._wait_store_server()
        except runner.CriuError as e:
            raise RuntimeError(f"lazy restore failed after the hand-over ({e}); the "
                               f"restored tree {self.restored} lacked memory and was "
                               "killed") from e
        log.info("lazy restore: every page in %.1f s after the resume",
                 time.monotonic() - t0)

    def _start_store_server(self) -> socket.socket:
        """Start store_server.py on one end of a socket pair; the other end
        is for the lazy-pages daemon."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        state = os.path.join(self.dir, "lazy-stores.msgpack")
        store_server.write_state(state, self.stores)
        with open(os.path.join(self.images_dir, STORE_SERVER_LOG), "wb") as err:
            try:
                self.lazy_server = subprocess.Popen(
                    [sys.executable, "-m", "migrator.migration.store_server", state,
                     str(ours.fileno()), self.criu_version],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                    pass_fds=(ours.fileno(),), start_new_session=True)
            except BaseException:
                theirs.close()
                raise
            finally:
                ours.close()
        return theirs

    def _wait_store_server(self) -> None:
        try:
            rc = self.lazy_server.wait(STORE_SERVER_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.lazy_server.kill()
            self.lazy_server.wait()
            rc = "killed, still running"
        if rc != 0:
            with open(os.path.join(self.images_dir, STORE_SERVER_LOG), errors="replace") as f:
                why = f.read().strip()[-1000:]
            raise runner.CriuError("lazy-pages", f"store server exit status {rc}: {why}")

    def _image(self, chunk: Images) -> None:
        # Names were checked by the protocol (a bare name, no path); refuse
        # dot files too, which are our own temporaries.
        if chunk.name.startswith("."):
            raise ProtocolError(f"image name {chunk.name!r} is not allowed")
        f = self.files.get(chunk.name)
        if f is None:
            f = self.files[chunk.name] = open(
                os.path.join(self.images_dir, chunk.name), "xb")
        f.write(chunk.data)
        if chunk.last:
            f.close()
            del self.files[chunk.name]

    def _restore(self) -> None:
        try:
            t0 = time.monotonic()
            self._prepare_pages()
            t1 = time.monotonic()
            if self.lazy:
                self.lazy_pages = LazyPages.start(self.images_dir,
                                                  ps_socket=self._start_store_server())
            # last before CRIU: the memory it frees meets the restore's faults
            reserved = self.reserve.hand_over() if self.reserve is not None else 0
            self.restored = workload.restore(self.images_dir, lazy=self.lazy)
        except Exception as e:  # noqa: BLE001 - reported to the source
            msg = str(e) or type(e).__name__
            log.error("restore failed: %s", msg)
            self.channel.send(RestoreResult(False, msg[:4000]))
            raise
        t2 = time.monotonic()
        self._write_state()
        self.awaiting_commit = True
        # The timings ride at the end of the message as JSON (the source's
        # breakdown shows them); the protocol has no field for them.
        timings = json.dumps({"rebuild_ms": round((t1 - t0) * 1000, 1),
                              "criu_restore_ms": round((t2 - t1) * 1000, 1),
                              "reserved_mib": reserved >> 20})
        self.channel.send(RestoreResult(True, f"restored as pid {self.restored}, "
                                              f"stopped until Commit {timings}"))
        self._release_reserve()  # what the restore did not take; out of the downtime
        self.emit({"event": "restored", "pid": self.restored})

    def _prepare_pages(self) -> None:
        # Every page of the last dump is in the stores by now (the delta
        # too): CRIU reads them there through parent images, or asks
        # lazy_server for them; no copy.
        flat = workload.needs_flat_images(self.images_dir)
        prepared = levels.prepare(self.images_dir, self.stores,
                                  max_levels=0 if flat else None,
                                  lazy=self.lazy and not flat)
        log.info("pages for CRIU: %d from the stores in %d levels, %d lazy, "
                 "%d copied", prepared.parent_pages, prepared.levels,
                 prepared.lazy_pages, prepared.copied_pages)

    # -- the hand-over's state ----------------------------------------
    def _state_path(self) -> str:
        return os.path.join(self.dir, "state")

    def _write_state(self) -> None:
        with open(self._state_path(), "w") as f:
            f.write(f"restored {self.restored}\n")

    def _forget_state(self) -> None:
        _remove_migration(self.dir)

    def _fail(self, exc: BaseException) -> None:
        if self.awaiting_commit:
            # We said "restored" and then lost the source: it may have
            # destroyed its copy already.  Keep ours stopped and say so.
            msg = (f"hand-over undecided: restored tree {self.restored} waits "
                   f"stopped in {self.dir}; if the source is gone run "
                   f"'migrator resolve --dir {self.base} --migration {self.id} "
                   f"--commit', else '--abort'")
            log.error(msg)
            self.emit({"event": "undecided", "migration": self.id,
                       "pid": self.restored, "message": msg})
            # A lazy-pages daemon and its store server go on filling the
            # stopped tree on their own (they hold the stores open).
            for s in self.stores.values():
                s.remove()
            return
        if self.restored is not None:
            workload.discard_restored(self.images_dir, self.restored)
        if self.lazy_pages is not None:
            self.lazy_pages.kill()
        if self.lazy_server is not None and self.lazy_server.poll() is None:
            self.lazy_server.kill()  # ours, by its pid
            self.lazy_server.wait()
        if self.dir:
            _remove_migration(self.dir)


def _remove_migration(d: str) -> None:
    """rmtree of DIR/<id>, and of its images' home if that is elsewhere
    (receivers before 0.2 kept images in /dev/shm behind a link)."""
    link = os.path.join(d, "images")
    if os.path.islink(link):
        shutil.rmtree(os.path.realpath(link), ignore_errors=True)
    shutil.rmtree(d, ignore_errors=True)


def _serve_one(sock, peer, base: str, auth: Auth, emit, timeout: float,
               live: set, lazy: bool, reserve: bool) -> bool:
    """One migration on an accepted socket; True if it succeeded."""
    try:
        if auth.tls:
            sock = auth.context(server=True).wrap_socket(sock, server_side=True)
        live.add(sock)
        channel = Channel(sock, auth.connection("receiver", socket.gethostname()),
                          timeout=timeout)
        channel.handshake()
        emit(Session(base, channel, emit, lazy=lazy, reserve=reserve).run())
        return True
    except (ProtocolError, TransportError, OSError, runner.CriuError,
            RuntimeError, ValueError, images.ImageError) as e:
        emit({"event": "error", "peer": f"{peer[0]}:{peer[1]}",
              "message": str(e)})
        return False
    finally:
        live.discard(sock)
        try:
            sock.close()
        except OSError:
            pass


def serve(listen: str, base: str, auth: Auth, emit: Callable[[dict], None],
          once: bool = False, timeout: float = 60.0, parallel: int = 4,
          lazy: bool = False, reserve: bool = True) -> int:
    """Accept migrations until stopped, up to `parallel` at once (each in
    its own directory), or exactly one with `once`.  Returns the number
    that failed.  On Ctrl-C / SIGTERM every migration in progress is cut
    off and cleans up like any failed one.  With `reserve`, each holds
    memory ready for its restore while its pages arrive (reserve.py)."""
    from migrator.migration.transport import parse_hostport
    host, port = parse_hostport(listen)
    os.makedirs(base, exist_ok=True)
    _clean_stale(base, emit)
    lock = threading.Lock()

    def say(ev: dict) -> None:  # events of concurrent migrations, whole lines
        with lock:
            emit(ev)

    failures = 0
    live: set = set()
    slots = threading.Semaphore(max(1, parallel))
    workers: list[threading.Thread] = []
    with socket.create_server((host, port), reuse_port=False) as srv:
        say({"event": "listening", "address": listen})
        if once:
            sock, peer = srv.accept()
            ok = _serve_one(sock, peer, base, auth, say, timeout, live, lazy, reserve)
            return 0 if ok else 1

        def work(sock, peer):
            nonlocal failures
            try:
                if not _serve_one(sock, peer, base, auth, say, timeout, live,
                                  lazy, reserve):
                    with lock:
                        failures += 1
            finally:
                slots.release()

        try:
            while True:
                slots.acquire()
                sock, peer = srv.accept()
                t = threading.Thread(target=work, args=(sock, peer),
                                     name=f"migrator-recv-{peer[0]}:{peer[1]}")
                t.start()
                workers = [w for w in workers if w.is_alive()] + [t]
        finally:
            # Cut the migrations in progress: each then fails and cleans up
            # in its own thread (a restored copy awaiting Commit stays, as
            # an undecided hand-over).
            for sock in list(live):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            for w in workers:
                w.join(timeout=60)
    return failures


def _clean_stale(base: str, emit) -> None:
    """Remove what a killed receiver left: partial migrations.  Undecided
    hand-overs (a state file) are kept and reported: they need a person."""
    for name in sorted(os.listdir(base)):
        d = os.path.join(base, name)
        if not os.path.isdir(d):
            continue
        if os.path.exists(os.path.join(d, "state")):
            emit({"event": "undecided", "migration": name,
                  "message": f"run 'migrator resolve --dir {base} --migration "
                             f"{name} --commit' or '--abort'"})
            continue
        _remove_migration(d)
        emit({"event": "cleaned", "migration": name})


def resolve(base: str, migration: str, commit: bool) -> str:
    """Finish (commit) or undo (abort) a hand-over left undecided."""
    d = os.path.join(base, migration)
    try:
        with open(os.path.join(d, "state")) as f:
            word, pid = f.read().split()
    except FileNotFoundError:
        raise FileNotFoundError(f"no undecided migration {migration} in {base}") from None
    root = int(pid)
    if commit:
        # The way its kind resumes (a container: every task of its cgroup,
        # and its registration on this node), as the Commit would have.
        workload.resume_restored(os.path.join(d, "images"), root)
        outcome = f"resumed the restored tree {root}"
    else:
        workload.discard_restored(os.path.join(d, "images"), root)
        outcome = f"destroyed the restored tree {root}; resume the source with SIGCONT"
    _remove_migration(d)
    return outcome
