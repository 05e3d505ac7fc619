"""`meta`: the design document's meta-learned selection policy (Component 4) as a strategy.

Candidates are scored by a no-grad forward as in `online`; `aql.selection.MetaLearnedSelector` maps
each candidate's features to a keep probability p. State (features, per candidate): entropy, loss,
EL2N, margin and training progress in [0, 1] (`MetaLearnedSelector.features`). Action: a Bernoulli(p)
draw, completed to exactly the budget by p (the drawn rows first, then the rest, each by p; with
`balanced`, inside per-class quotas). Reward: the drop of the loss on a fixed holdout batch over the
training step taken on the kept rows (one no-grad forward of `holdout_batch` rows per step, counted
in `extra_forwards`), the design document's "improvement per data point selected" measured without
a second backward. Reading that loss is a host synchronisation per step (the policy's baseline is a
Python float); where the trainer delivers `after_step` a step late (CUDA), the reward pairs with the
right selection (a queue) but measures the loss one step later. The policy takes one REINFORCE step per training step (`MetaLearnedSelector.reinforce`).
Experimental, like the selector it wraps.

Under torch.distributed every rank runs the policy on the whole gathered candidate batch
(`select_global`) with the same generator, and after a step every rank holds the same parameters, so
every rank reads the same holdout loss and takes the same REINFORCE step: the policies never part. The
reward is per row of the global training batch: `after_step` receives this rank's rows, and their
count is summed over the ranks (one all-reduce of a scalar per micro-batch, beside the holdout forward's
own host synchronisation).
"""

from __future__ import annotations

import collections
import math
import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

import aql_kernels
from aql._checks import check_bool, check_int, check_interval, check_tensor

from . import _keys
from .base import EpochPlan, SelectionStrategy, StrategyContext, register_strategy

__all__ = ["MetaSelection"]


@register_strategy
class MetaSelection(SelectionStrategy):
    """A learned keep policy over candidate batches (see the module docstring).

    model: the trained network (read for the holdout reward); holdout: (x, y) tensors of held-out
    samples, of which the first `holdout_batch` form the reward batch; labels / num_classes for
    `balanced`."""

    name = "meta"
    scores_candidates = True
    config_arguments = {**SelectionStrategy.config_arguments,
                        "model": "the trained model",
                        "holdout": "the validation split",
                        "labels": "the training data's targets",
                        "num_classes": "the training data's targets",
                        "epochs": "training.epochs",
                        }

    def __init__(self, num_samples: int, *, query_budget: float = 0.2, seed: int = 0, device: torch.device | str = "cpu",
                 model=None, holdout=None, labels: torch.Tensor | None = None, num_classes: int | None = None,
                 balanced: bool = True, hidden: int = 32, policy_lr: float = 3e-3, holdout_batch: int = 256, epochs: int = 20):
        super().__init__(num_samples, query_budget=query_budget, seed=seed, device=device)
        where = f"strategies.{type(self).__name__}"
        if model is None or not callable(model):
            raise ValueError(f"aql.{where}: model must be the network being trained (its holdout loss is the reward), got {model!r}")
        if not (isinstance(holdout, tuple) and len(holdout) == 2):
            raise ValueError(f"aql.{where}: holdout must be an (x, y) pair of tensors, got {type(holdout).__name__}")
        check_int(where, "holdout_batch", holdout_batch, low=1)
        self.epochs = check_int(where, "epochs", epochs, low=1)
        check_interval(where, "policy_lr", policy_lr, 0.0, math.inf, low_open=True, high_open=True)
        check_bool(where, "balanced", balanced)
        self.model = model
        self.holdout = (holdout[0][:holdout_batch], holdout[1][:holdout_batch])
        self.balanced = balanced
        if balanced:
            if labels is None:
                raise ValueError(f"aql.{where}: balanced=True needs labels (int64 [num_samples])")
            self.labels = check_tensor(where, "labels", labels, ndim=1, dtypes=(torch.int64, torch.int32)).to(self.device, torch.int64)
            self.num_classes = num_classes if num_classes is not None else int(self.labels.max()) + 1
        from aql.selection import MetaLearnedSelector

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the experimental notice: this docstring says it
            self.selector = MetaLearnedSelector(model, n_features=5, hidden=hidden, lr=policy_lr, seed=seed)
        self._generator = torch.Generator(device=self.device).manual_seed(self.seed + 15485863)
        self.epoch, self._seen, self._kept = 0, 0, 0
        # (features, mask) of selections not yet rewarded, oldest first: the trainer may deliver a
        # step's after_step one step late (CUDA, where it reads the non-finite flag without a sync)
        self._pending: collections.deque = collections.deque()
        self._holdout_loss = None
        self.extra_forwards = 0

    def epoch_plan(self, epoch: int) -> EpochPlan:
        if epoch != self.epoch:
            self.epoch, self._seen, self._kept = epoch, 0, 0
        return EpochPlan(torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)))

    def _holdout_value(self) -> float:
        with torch.no_grad():
            self.extra_forwards += self.holdout[0].shape[0]
            return float(F.cross_entropy(self.model(self.holdout[0]), self.holdout[1]))

    def select(self, indices: torch.Tensor, scores):
        batch = indices.shape[0]
        progress = min(1.0, (self.epoch + self._seen / self.num_samples) / self.epochs)
        self._seen += batch
        keep = min(batch, _keys.quota(self._seen, self._kept, self.query_budget))
        self._kept += keep
        features = self.selector.features(scores, progress)
        p = self.selector.probabilities(features)
        draw = torch.rand(p.shape, generator=self._generator, device=self.device).to(p.device) < p
        keys = draw.float() * 2.0 + p  # the drawn rows first, each group by p
        if self.balanced:
            keys = _keys.balanced_keys(keys, self.labels.index_select(0, indices.to(self.device)).to(keys.device), self.num_classes)
        positions = aql_kernels.topk_indices(keys.float().contiguous(), keep)
        mask = torch.zeros(batch, dtype=torch.bool, device=p.device)
        mask[positions] = True
        if self._holdout_loss is None:
            self._holdout_loss = self._holdout_value()
        self._pending.append((features, mask))
        return positions

    def after_step(self, indices: torch.Tensor, scores) -> None:
        if not self._pending:
            return
        after = self._holdout_value()
        features, mask = self._pending.popleft()
        self.selector.reinforce(features, mask, (self._holdout_loss - after) * 1e3 / max(1, self._trained_rows(indices)))
        self._holdout_loss = after

    def _trained_rows(self, indices: torch.Tensor) -> int:
        """Rows of the training batch `indices` belongs to: its own in one process, every rank's under
        torch.distributed (each rank trains its part of the global batch)."""
        if self.sharding is None:
            return int(indices.shape[0])
        from aql import distributed

        count = torch.tensor([indices.shape[0]], dtype=torch.int64, device=indices.device)
        return int(distributed.all_reduce_sum(count, group=self.process_group))

    def end_epoch(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        out = {"policy_episodes": self.selector.episodes_trained}
        self.epoch, self._seen, self._kept = self.epoch + 1, 0, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch, "seen": self._seen, "kept": self._kept,
                "generator": self._generator.get_state(), "selector": self.selector.state_dict(),
                "holdout_loss": self._holdout_loss, "extra_forwards": self.extra_forwards}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch, self._seen, self._kept = int(state["epoch"]), int(state["seen"]), int(state["kept"])
        self._generator.set_state(state["generator"])
        self.selector.load_state_dict(state["selector"])
        self._holdout_loss, self.extra_forwards = state["holdout_loss"], int(state["extra_forwards"])
        self._pending.clear()

    @classmethod
    def from_config(cls, config, context: StrategyContext) -> MetaSelection:
        holdout = context.holdout_data
        if holdout is None:
            raise ValueError("aql.strategies.MetaSelection: needs held-out data for its reward (the trainer's val_data)")
        x, y = holdout.gather(torch.arange(len(holdout))) if hasattr(holdout, "gather") else holdout
        return cls(context.num_samples, query_budget=config.aql_v2.query_budget, seed=config.seed, device=context.device,
                   model=context.model, holdout=(x.to(context.device), y.to(context.device)), labels=context.labels,
                   num_classes=context.num_classes, epochs=config.training.epochs, **dict(config.aql_v2.strategy_options))
