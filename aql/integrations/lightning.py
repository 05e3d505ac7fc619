"""A Lightning `Callback` with per-sample scores, data selection and the Fisher update.

The contract with the LightningModule: the training batches carry each sample's dataset index (the
callback's `dataloader(dataset, ...)` wraps the dataset in `aql.sampling.WithIndices` and draws the
strategy's selection through its sampler), and `training_step` returns a dict::

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self(x)
        loss, scores = aql_kernels.cross_entropy_with_scores(logits, y)    # was F.cross_entropy(logits, y)
        return {"loss": loss, "scores": scores, "index": index}

- "loss": what Lightning back-propagates (as always);
- "index": int [B], the dataset indices of the batch's samples;
- "scores": the `aql_kernels.SoftmaxScores` of the same pass, one row per sample (for `[B, T, V]`
  logits: `cross_entropy_with_scores(..., per_sample="mean")`); or, for a module that keeps
  `F.cross_entropy`, "logits" and "targets" instead, which the callback scores itself without
  gradients (`[N, V]` / `[N]`, or `[B, T, V]` / `[B, T]` reduced to per-sequence means, with
  `shift=True` for causal LMs): one extra read of the logits, timed as overhead.

Hooks: the epoch's plan at `on_train_epoch_start`; the batch's scores queued at `on_train_batch_end`
and handed to the strategy once its optimizer step has run (all micro-batches of an accumulated
step together); the Fisher update at `on_before_optimizer_step` (the gradients there are unscaled and
not yet clipped); the strategy's write-back at `on_train_epoch_end`, where `aql/overhead_pct` (the AQL
machinery's time as a percentage of the rest of the epoch's time, validation included when it runs
inside the epoch; the fused loss's own cost counts as training) and `aql/data_selected` (the share of
the training set the epoch trained on) are logged with `pl_module.log`. The strategy's state (the
score table, the plan, the random state) and the estimator's are saved in Lightning's checkpoints
(`state_dict` / `load_state_dict`), so a run resumed with `trainer.fit(..., ckpt_path=...)` selects
what the uninterrupted run would have.

The LR schedule: the DataLoader is built once; its length (and so `trainer.estimated_stepping_batches`)
counts `strategy.samples_per_epoch` samples per epoch, and each epoch the sampler draws that epoch's
selection, so a schedule sized from it runs on without restarting.

Limits (refused with a message): one process (the per-rank tables are not merged across ranks), and
strategies that plan whole epochs (not the candidate-scoring ones). `lightning` is an optional extra
(`pip install "aql[lightning]"`); the callback is a `lightning.pytorch.Callback` (for the
`lightning.pytorch.Trainer`, not the separate `pytorch_lightning` package).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from aql._checks import check_bool
from aql.sampling import WithIndices

from aql.errors import require

from ._core import SelectionSession, per_sample_scores

pl = require("lightning.pytorch", "lightning", "aql.integrations.lightning")

__all__ = ["AQLCallback"]


class AQLCallback(pl.Callback):
    """Per-sample scores, selection and the Fisher update for a LightningModule (see the module docstring).

    strategy: an `aql.strategies.SelectionStrategy` over `len(train_dataset)` samples, on the device the
      module trains on. estimator: None, or e.g. `aql.uncertainty.LaplacianUncertainty(module)`, whose
      Fisher EMA is updated every `fisher_update_freq`-th optimizer step. shift / ignore_index: how the
      callback scores "logits" and "targets" when the step returns those instead of "scores".
    """

    def __init__(self, strategy, *, estimator=None, fisher_update_freq: int = 1, shift: bool = False, ignore_index: int = -100):
        where = "integrations.lightning.AQLCallback"
        self.session = SelectionSession(strategy, estimator=estimator, fisher_update_freq=fisher_update_freq, where=where)
        self.shift = check_bool(where, "shift", shift)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"aql.{where}: ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
        self.ignore_index = ignore_index
        self._where = where
        self._delivered_step = 0

    @property
    def strategy(self):
        return self.session.strategy

    @property
    def sampler(self):
        """The `aql.sampling.SelectionSampler` to give the training DataLoader (with a `WithIndices` dataset)."""
        return self.session.sampler

    def dataloader(self, dataset, **kwargs) -> DataLoader:
        """`DataLoader(WithIndices(dataset), sampler=self.sampler, **kwargs)`: batches `(*item, index)`
        in the order of the strategy's plan. kwargs: any DataLoader argument but `shuffle`, `sampler`
        and `batch_sampler` (the strategy decides the order)."""
        taken = sorted({"shuffle", "sampler", "batch_sampler"} & kwargs.keys())
        if taken:
            raise ValueError(f"aql.{self._where}.dataloader: the strategy decides which samples come in which order; "
                             f"drop {taken}")
        if len(dataset) != self.strategy.num_samples:
            raise ValueError(f"aql.{self._where}.dataloader: the strategy plans over {self.strategy.num_samples} samples "
                             f"but the dataset has {len(dataset)}")
        return DataLoader(WithIndices(dataset), sampler=self.sampler, **kwargs)

    # -- hooks ------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            raise NotImplementedError(f"aql.{self._where}: one process only (world_size {trainer.world_size}): each rank "
                                      "would keep its own score table")

    def on_fit_start(self, trainer, pl_module) -> None:
        self.session.start_clock(pl_module.device)
        self._delivered_step = trainer.global_step

    def on_train_start(self, trainer, pl_module) -> None:
        loaders = trainer.train_dataloader
        loaders = list(loaders.values()) if isinstance(loaders, Mapping) else list(loaders) if isinstance(loaders, (list, tuple)) else [loaders]
        if not any(self._draws_from_sampler(loader) for loader in loaders):
            raise ValueError(f"aql.{self._where}: the training DataLoader does not draw from the callback's sampler, so the "
                             "strategy's selection would not be applied; build it with callback.dataloader(dataset, ...) "
                             "(or DataLoader(WithIndices(dataset), sampler=callback.sampler, ...))")

    def _draws_from_sampler(self, loader) -> bool:
        batch_sampler = getattr(loader, "batch_sampler", None)
        return getattr(loader, "sampler", None) is self.sampler or getattr(batch_sampler, "sampler", None) is self.sampler

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.session.begin_epoch(trainer.current_epoch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if outputs is None:  # a step the module skipped (training_step returned None)
            return
        index, scores = self._unpack(outputs)
        self.session.record(index, scores)
        if trainer.global_step != self._delivered_step:  # an optimizer step ran in this batch
            self.session.after_optimizer_step(applied=True)
            self._delivered_step = trainer.global_step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.session.before_optimizer_step()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        metrics = {key: value for key, value in trainer.callback_metrics.items() if key == "val_loss"}
        strategy_metrics = self.session.end_epoch(metrics)
        logs = {f"aql/{key[len('aql_'):]}": value for key, value in self.session.lap().items()}
        logs.update({f"aql/{key}": float(value) for key, value in strategy_metrics.items() if isinstance(value, (int, float))})
        pl_module.log_dict(logs, on_step=False, on_epoch=True)

    def _unpack(self, outputs) -> tuple[torch.Tensor, Any]:
        if not isinstance(outputs, Mapping) or "index" not in outputs or not ("scores" in outputs or {"logits", "targets"} <= outputs.keys()):
            got = sorted(outputs) if isinstance(outputs, Mapping) else type(outputs).__name__
            raise ValueError(f"aql.{self._where}: training_step must return a dict with 'loss', 'index' and either 'scores' "
                             f"(from aql_kernels.cross_entropy_with_scores) or 'logits' and 'targets'; got {got}")
        if "scores" in outputs:
            return outputs["index"], outputs["scores"]
        with self.session.timed():
            scores = per_sample_scores(outputs["logits"], outputs["targets"], shift=self.shift, ignore_index=self.ignore_index)
        return outputs["index"], scores

    # -- checkpoints ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return self.session.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.session.load_state_dict(state_dict)

