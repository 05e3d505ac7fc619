"""The learning-rate schedule of the trainer."""

from __future__ import annotations

import math

__all__ = ["WarmupCosine"]


class WarmupCosine:
    """LR factor: linear warmup over `warmup_steps`, then cosine from 1 to 0 at `total_steps` (0 after)."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = min(int(warmup_steps), self.total_steps - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
