"""Dirty-page trackers and their selection.

A tracker follows one process: ``start()`` arms it, every ``collect()``
returns the pages written since the previous one (and re-arms them before
returning, so reading their contents afterwards can never miss a write:
invariant 1 of docs/ARCHITECTURE.md), ``stop()`` removes every trace.
"""

from migrator.tracking.base import Collect, Tracker, TrackerError
from migrator.tracking.select import Decision, choose, make_tracker

__all__ = ["Collect", "Tracker", "TrackerError", "Decision", "choose",
           "make_tracker"]
