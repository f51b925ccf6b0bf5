"""What `migrator probe` and `migrator track` do, without any CLI."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

from migrator.ranges import PAGE_SIZE
from migrator.tracking import features
from migrator.tracking.base import TrackerError
from migrator.tracking.select import (Decision, choose, make_tracker,
                                      process_facts)


class ProcessGone(Exception):
    """The target process does not exist (any more)."""


def _facts(pid: int, caps):
    try:
        return process_facts(pid, caps)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(f"no process {pid}") from e


def decide(pid: int, forced: str | None = None) -> Decision:
    caps = features.probe()
    return choose(features.arch(), caps, _facts(pid, caps), forced)


def probe_report(pids: list[int]) -> dict:
    caps = features.probe()
    return {
        "arch": features.arch(),
        "kernel": features.kernel_release(),
        "capabilities": caps.as_dict(),
        "evidence": caps.why,
        "default_tracker": choose(features.arch(), caps).as_dict(),
        "processes": [decide(pid).as_dict() for pid in pids],
    }


@dataclass(frozen=True)
class Round:
    round: int
    tracker: str
    dirty_pages: int
    dirty_bytes_per_s: float
    tracked_pages: int
    untracked_pages: int
    collect_ms: float
    ranges: list[tuple[int, int]] | None = None
    notes: tuple[str, ...] = ()

    def as_dict(self, hex_ranges: bool = True) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "ranges"}
        d["notes"] = list(self.notes)
        if self.ranges is not None:
            d["ranges"] = [[f"{s:#x}", f"{e:#x}"] for s, e in self.ranges]
        return d


def track(pid: int, forced: str | None, interval: float, rounds: int | None,
          with_ranges: bool = False) -> Iterator[Decision | Round]:
    """Yield the decision, then one Round per interval until `rounds` (or
    forever).  The tracker is stopped on every way out, including
    KeyboardInterrupt and the generator being closed."""
    decision = decide(pid, forced)
    yield decision
    tracker = make_tracker(decision, features.probe())
    try:
        tracker.start()
    except (FileNotFoundError, ProcessLookupError) as e:
        raise ProcessGone(f"process {pid} exited") from e
    try:
        last = time.monotonic()
        n = 0
        while rounds is None or n < rounds:
            time.sleep(max(0.0, last + interval - time.monotonic()))
            t0 = time.monotonic()
            try:
                c = tracker.collect()
            except (FileNotFoundError, ProcessLookupError) as e:
                raise ProcessGone(f"process {pid} exited") from e
            except OSError as e:
                if e.errno == 3:  # ESRCH
                    raise ProcessGone(f"process {pid} exited") from e
                raise
            t1 = time.monotonic()
            n += 1
            pages = c.dirty.npages()
            yield Round(
                round=n, tracker=tracker.name, dirty_pages=pages,
                dirty_bytes_per_s=pages * PAGE_SIZE / max(t1 - last, 1e-9),
                tracked_pages=c.tracked.npages(),
                untracked_pages=c.untracked.npages(),
                collect_ms=(t1 - t0) * 1000.0,
                ranges=list(c.dirty) if with_ranges else None,
                notes=c.notes)
            last = t1
    finally:
        tracker.stop()


__all__ = ["ProcessGone", "TrackerError", "Round", "decide", "probe_report",
           "track"]
