"""When to stop copying rounds and switch over.

After each round the source knows how many pages are dirty now (what a
switch-over would have to send while the workload is frozen), how fast the
link moved the last round, and how fast the workload dirties memory.  It
switches over when

- the predicted frozen transfer fits the downtime budget, or
- the dirty set stopped shrinking (the workload dirties memory as fast as
  the link drains it: more rounds would only burn bandwidth), or
- the round or time limit is reached.

The prediction covers the memory transfer only; CRIU's own dump and
restore time comes on top and is reported separately in the breakdown.
"""

from __future__ import annotations

from dataclasses import dataclass

# A round "did not shrink" the dirty set unless it left at most this share.
SHRINK = 0.9
# This many non-shrinking rounds in a row mean convergence has stalled.
STALLED_ROUNDS = 2


@dataclass(frozen=True)
class Limits:
    downtime_ms: float = 300.0
    max_rounds: int = 30
    max_time_s: float = 300.0


@dataclass(frozen=True)
class RoundStats:
    round: int
    dirty_bytes: int       # dirty now, i.e. what a switch-over would send
    sent_bytes: int        # wire bytes of this round
    seconds: float         # wall time of this round
    elapsed_s: float       # since the migration started
    bandwidth: float       # bytes/s of page content the link moves

    def predicted_downtime_ms(self) -> float:
        if self.dirty_bytes == 0:
            return 0.0
        if self.bandwidth <= 0:
            return float("inf")
        return self.dirty_bytes / self.bandwidth * 1000.0


@dataclass(frozen=True)
class Verdict:
    switch: bool
    reason: str


class Convergence:
    def __init__(self, limits: Limits):
        self.limits = limits
        self._last_dirty: int | None = None
        self._stalled = 0

    def after_round(self, s: RoundStats) -> Verdict:
        lim = self.limits
        pred = s.predicted_downtime_ms()
        if pred <= lim.downtime_ms:
            return Verdict(True, f"predicted transfer {pred:.0f} ms fits the "
                                 f"{lim.downtime_ms:.0f} ms budget")
        if self._last_dirty is not None and \
                s.dirty_bytes > self._last_dirty * SHRINK:
            self._stalled += 1
        else:
            self._stalled = 0
        self._last_dirty = s.dirty_bytes
        if self._stalled >= STALLED_ROUNDS:
            return Verdict(True, f"dirty set stopped shrinking for "
                                 f"{self._stalled} rounds")
        if s.round >= lim.max_rounds:
            return Verdict(True, f"reached --max-rounds {lim.max_rounds}")
        if s.elapsed_s >= lim.max_time_s:
            return Verdict(True, f"reached --max-time {lim.max_time_s:.0f} s")
        return Verdict(False, f"predicted transfer {pred:.0f} ms exceeds "
                              f"{lim.downtime_ms:.0f} ms")
