"""Overhead accounting: AQL time against the whole training time, without a per-step synchronisation.

Two figures, two baselines:

- `overhead_percent`: the machinery alone, AQL time (score bookkeeping, Fisher updates, selection, the
  candidates' scoring forward) against the rest of the same run's training time. The fused loss is
  part of that rest, so its extra cost over `F.cross_entropy` is not in this figure.
- `step_overhead_percent`: a run's whole time per optimizer step against a baseline run's (all data,
  `F.cross_entropy`): the machinery plus the fused loss's extra cost, and the noise between two runs.
"""

from __future__ import annotations

import contextlib
import time

import torch

__all__ = ["OverheadClock", "overhead_percent", "step_overhead_percent"]


class OverheadClock:
    """Time spent between `begin()` and `end()` (or inside `with clock.aql():`) against the whole time
    between `lap()`s.

    CUDA: a pair of events around each AQL region and one at each lap; `lap()` waits for the last
    event, so the only synchronisation is once per log interval. The events come from a pool that
    `lap()` refills, so a region costs two `Event.record` calls and no allocation. CPU: perf_counter
    (CPU ops are synchronous, so wall time is the time they take).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pool: list = []
        self._pairs: list = []
        self.restart()

    def _event(self):
        event = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def restart(self) -> None:
        if self.cuda:
            for start, end in self._pairs:
                self._pool += (start, end)
        self._pairs = []
        self._aql = 0.0
        self._start = self._event() if self.cuda else time.perf_counter()

    def begin(self):
        """Starts an AQL region; pass the returned token to `end`."""
        return self._event() if self.cuda else time.perf_counter()

    def end(self, token) -> None:
        if self.cuda:
            self._pairs.append((token, self._event()))
        else:
            self._aql += time.perf_counter() - token

    @contextlib.contextmanager
    def aql(self):
        token = self.begin()
        yield
        self.end(token)

    def lap(self) -> tuple[float, float]:
        """(aql seconds, total seconds) since the last lap / restart; starts the next interval."""
        if self.cuda:
            end = self._event()
            end.synchronize()
            aql = sum(s.elapsed_time(e) for s, e in self._pairs) / 1000.0
            total = self._start.elapsed_time(end) / 1000.0
            self._pool += (self._start, end)
        else:
            aql, total = self._aql, time.perf_counter() - self._start
        self.restart()
        return aql, total


def overhead_percent(aql_seconds: float, total_seconds: float) -> float:
    """AQL time as a percentage of the rest of training (the baseline's work)."""
    rest = total_seconds - aql_seconds
    return 100.0 * aql_seconds / rest if rest > 0 else 0.0


def step_overhead_percent(train_seconds: float, steps: int, baseline_train_seconds: float, baseline_steps: int) -> float:
    """A run's training time per optimizer step (AQL time included) against a baseline run's, in percent:
    100 * (train_seconds / steps) / (baseline_train_seconds / baseline_steps) - 100. With a baseline that
    trains with `F.cross_entropy` this includes the fused loss's extra cost, which `overhead_percent`
    counts as training."""
    if steps <= 0 or baseline_steps <= 0 or baseline_train_seconds <= 0:
        return 0.0
    return 100.0 * (train_seconds / steps) / (baseline_train_seconds / baseline_steps) - 100.0
