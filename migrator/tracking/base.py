"""The tracker interface."""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from migrator.ranges import RangeList


class TrackerError(Exception):
    """A tracker cannot be used for this process (the reason says why)."""


@dataclass(frozen=True)
class Collect:
    """One round's answer.

    dirty: pages whose content may differ from what was read before this
        collect (written, or in memory that was not tracked continuously
        since: new, moved, grown or re-registered mappings).
    tracked: memory followed continuously from now on; a page outside it
        cannot be known clean next round either.
    untracked: memory of the process that no tracker follows (shared
        mappings, or everything for `full`): it must cross at switch-over.
    """

    dirty: RangeList
    tracked: RangeList
    untracked: RangeList = field(default_factory=RangeList)
    notes: tuple[str, ...] = ()


class Tracker(abc.ABC):
    name: str = "?"

    def __init__(self, pid: int):
        self.pid = pid
        self.started = False

    @abc.abstractmethod
    def start(self) -> Collect:
        """Arm tracking; returns the initial state (everything dirty)."""

    @abc.abstractmethod
    def collect(self, stopped: bool = False) -> Collect:
        """Pages written since the previous collect (or start).  stopped:
        the caller guarantees no task of the target can run (e.g. CRIU left
        them stopped), so the tracker need not stop them itself."""

    def before_checkpoint(self) -> None:
        """Called right before the final checkpoint (CRIU reads the page
        tables then).  Tracking must go on."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Remove every trace of tracking from the target.  Idempotent,
        and safe after the target died."""

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
