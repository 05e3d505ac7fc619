"""`ranked`: stale scores from the training forward, a ranked subset per epoch, no extra forward.

The training forward's per-sample statistics are stored as they come (`after_step`); at each epoch
start the next `query_budget` share of the data is chosen from the stored scores:

- never-seen samples first, in a fresh random order per (seed, epoch) (ties among them no longer go
  to the lowest index, so seeds differ from their first epoch); a NaN score counts as never seen, so
  the sample is re-scored instead of excluded forever;
- seen samples by their score aged by the epochs since it was written: score * ageing ** age (a
  score's trust decays; `ageing: 1.0` turns it off);
- `balanced`: per-class quotas inside the top-k (see `_keys.balanced_keys`);
- `exploration`: that share of the subset drawn uniformly from the rest.

Costs per step two `index_copy_`s of the batch's scores; per epoch one top-k over N keys.

Under torch.distributed (without `balanced`) each rank writes the scores of the samples it trains and
the epoch's top-k is taken across ranks over the values of the rank that trained each sample last
(`SelectionStrategy.topk_indices`), so every rank plans what one process would. Per-class quotas rank
samples inside their class over the whole table and are refused there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import aql_kernels
from aql._checks import check_interval, round_half_up

from ._scored import ScoredStrategy
from .base import EpochPlan, register_strategy

__all__ = ["RankedSelection"]

_UNSEEN = 1e30  # keys of never-seen samples: above any score, a random offset below 1e29 orders them


@register_strategy
class RankedSelection(ScoredStrategy):
    """A ranked subset per epoch from stale training-forward scores (see the module docstring).

    Defaults (loss, no quotas, no ageing, no exploration): the better of the two variants of the study
    by validation accuracy averaged over budgets (`ranked_loss`; quotas plus ageing 0.7 measured
    lower, see EXPERIMENTS.md)."""

    name = "ranked"

    @property
    def selects_across_ranks(self) -> bool:
        return not self.balanced

    def __init__(self, num_samples: int, *, query_budget: float = 0.2, seed: int = 0, device: torch.device | str = "cpu",
                 score: str = "loss", balanced: bool = False, ageing: float = 1.0, exploration: float = 0.0,
                 labels: torch.Tensor | None = None, num_classes: int | None = None, irreducible: torch.Tensor | None = None):
        super().__init__(num_samples, query_budget=query_budget, seed=seed, device=device)
        where = f"strategies.{type(self).__name__}"
        self._setup_scoring(score, balanced, labels, num_classes, irreducible)
        self.ageing = check_interval(where, "ageing", ageing, 0.0, 1.0, low_open=True, high_open=False)
        self.exploration = check_interval(where, "exploration", exploration, 0.0, 1.0, low_open=False, high_open=True)
        self.num_selected = max(1, round_half_up(self.query_budget * self.num_samples))
        self.num_explore = round_half_up(self.exploration * self.num_selected)
        self.scores = torch.zeros(self.num_samples, dtype=torch.float32, device=self.device)
        self.written = torch.full((self.num_samples,), -1, dtype=torch.int64, device=self.device)  # epoch of the last write, -1 never
        self.epoch = 0
        self._plans: dict[int, EpochPlan] = {}

    def after_step(self, indices: torch.Tensor, scores) -> None:
        indices = indices.to(self.device)
        values = self._values(scores, indices).detach().float().to(self.device)
        self.scores.index_copy_(0, indices, values)
        # a non-finite score marks the sample unseen again (re-scored, never excluded forever)
        epoch = torch.where(torch.isfinite(values), self.epoch, -1)
        self.written.index_copy_(0, indices, epoch)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        if epoch in self._plans:
            return self._plans[epoch]
        self.epoch = epoch
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        unseen = self.written < 0
        age = (epoch - self.written).clamp_min(0).float()
        aged = self.scores * self.ageing ** age if self.ageing < 1.0 else self.scores
        offsets = torch.rand(self.num_samples, generator=generator, device=self.device)
        keys = torch.where(unseen, _UNSEEN + 1e29 * offsets, aged)
        keys = self._quota_keys(keys)
        top = self.topk_indices(keys.contiguous(), self.num_selected - self.num_explore)
        if self.num_explore:
            rest = torch.rand(self.num_samples, generator=generator, device=self.device)
            rest.index_fill_(0, top, -1.0)
            top = torch.cat([top, aql_kernels.topk_indices(rest, self.num_explore)])
        order = torch.randperm(top.numel(), generator=generator, device=self.device)
        plan = EpochPlan(top[order].cpu())
        self._plans = {epoch: plan}
        return plan

    def end_epoch(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        self.epoch += 1
        return {"never_seen": int((self.written < 0).sum())}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch, "scores": self.scores.clone(), "written": self.written.clone(),
                "plans": {k: v.indices.clone() for k, v in self._plans.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch = int(state["epoch"])
        self.scores.copy_(state["scores"])
        self.written.copy_(state["written"])
        self._plans = {int(k): EpochPlan(v) for k, v in state["plans"].items()}
