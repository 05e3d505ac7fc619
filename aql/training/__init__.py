"""The trainer and its parts, split along their seams:

- `trainer`: `AQLv2Trainer` (the loop; selection is the strategy's, see `aql.strategies`), `resolve_device`;
- `batches`: one epoch's plan as batches, the buffer that regroups kept candidates, per-sample statistics;
- `checkpoint`: RNG states, seeding, the checksummed checkpoint file (atomic writes, the last K kept, weights_only loads);
- `clock`: `OverheadClock` and `overhead_percent`;
- `schedule`: `WarmupCosine`.

`aql.trainer` re-exports the public names. Importing this package is light: `aql.strategies` imports
`aql.training.batches` without pulling in the trainer.
"""

__all__ = ["AQLv2Trainer", "OverheadClock", "WarmupCosine", "seed_everything", "resolve_device", "rng_states", "set_rng_states",
           "overhead_percent"]

_HOMES = {"AQLv2Trainer": "trainer", "resolve_device": "trainer", "OverheadClock": "clock", "overhead_percent": "clock",
          "WarmupCosine": "schedule", "seed_everything": "checkpoint", "rng_states": "checkpoint", "set_rng_states": "checkpoint"}


def __getattr__(name):
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
