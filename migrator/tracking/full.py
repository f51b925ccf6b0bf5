"""full: no tracking.

No page is ever known to have stayed clean, so every collect reports all
of the process's memory as dirty and as untracked: it crosses in the
frozen final step (copying it in earlier rounds would only mean copying it
again).  Used for processes that already use userfaultfd, whose seccomp
filter refuses the injected userfaultfd(2), and on kernels with neither
soft-dirty nor uffd-wp.
"""

from __future__ import annotations

from migrator.ranges import RangeList
from migrator.tracking.base import Collect, Tracker
from migrator.tracking.memory import memory_map


class FullTracker(Tracker):
    name = "full"

    def start(self) -> Collect:
        self.started = True
        return self.collect()

    def collect(self, stopped: bool = False) -> Collect:
        tracked, untracked = memory_map(self.pid)
        everything = tracked | untracked
        return Collect(dirty=everything, tracked=RangeList(),
                       untracked=everything)

    def stop(self) -> None:
        self.started = False
