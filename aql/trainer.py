"""The trainer's public names (the code lives in `aql.training`: trainer, batches, checkpoint, clock,
schedule; selection strategies in `aql.strategies`)."""

from .training.checkpoint import rng_states, seed_everything, set_rng_states
from .training.clock import OverheadClock, overhead_percent
from .training.schedule import WarmupCosine
from .training.trainer import AQLv2Trainer, resolve_device

__all__ = ["AQLv2Trainer", "OverheadClock", "WarmupCosine", "seed_everything", "resolve_device", "rng_states", "set_rng_states",
           "overhead_percent"]
