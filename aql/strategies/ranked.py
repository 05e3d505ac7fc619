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

Under torch.distributed the tables (`scores`, `written`, and the labels of `balanced`) are sharded:
rank r keeps the rows of the samples it owns (`aql.distributed.SampleOwnership`: i mod R == r, row
i // R), and queues the scores of what it trains (`aql.distributed.RoutedWrites`, no op per step);
at the epoch's selection (and at `end_epoch`) the queued writes go to their owners, the latest write of
a sample winning as in one process. The top-k then runs across ranks over the owned rows
(`SampleOwnership.topk_owned`), per-class quotas included (`_keys.balanced_topk_owned`: the quotas
from the all-reduced class counts, one selection per class), and the exploration draw too (its keys
drawn for all N samples from the seeded generator, as in one process, each rank keeping its rows'),
so every rank plans exactly what one process would.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

import aql_kernels
from aql._checks import check_interval, round_half_up

from . import _keys
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

    selects_across_ranks = True

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
        self._routed = None  # the queued writes of a sharded run (`attach_process_group`)
        self._sharding_hook = _ShardingHook(self)

    def after_step(self, indices: torch.Tensor, scores) -> None:
        indices = indices.to(self.device)
        values = self._values(scores, indices).detach().float().to(self.device)
        if self._routed is not None:  # sharded: the owner writes it at the next read
            self._routed.append(indices, values, self.epoch)
            return
        self.scores.index_copy_(0, indices, values)
        # a non-finite score marks the sample unseen again (re-scored, never excluded forever)
        epoch = torch.where(torch.isfinite(values), self.epoch, -1)
        self.written.index_copy_(0, indices, epoch)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        if epoch in self._plans:
            return self._plans[epoch]
        self.epoch = epoch
        if self._routed is not None:
            return self._sharded_plan(epoch)
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
        if self._routed is None:
            return {"never_seen": int((self.written < 0).sum())}
        from aql.distributed import all_reduce_sum

        self._apply_routed()  # a collective: every rank ends the epoch
        unseen = (self.written < 0).sum().reshape(1)
        return {"never_seen": int(all_reduce_sum(unseen, self.sharding.group)[0])}

    # -- torch.distributed ---------------------------------------------------------------------------
    def _attach_sharding(self, ownership) -> None:
        """Keeps the owned rows of the tables (and of the labels) from now on; see the module docstring."""
        from aql.distributed import RoutedWrites

        rows = slice(ownership.rank, None, ownership.world)
        self.scores, self.written = self.scores[rows].clone(), self.written[rows].clone()
        if self.labels is not None:
            self.labels = self.labels[rows].clone()  # the owned rows' labels (the quotas' classes)
        self._routed = RoutedWrites(ownership, 2)  # payload: score (float32 bits), epoch

    def _apply_routed(self) -> None:
        """Writes the queued writes of every rank into their owners' rows (a collective)."""
        from aql.distributed import float_column

        rows, payload = self._routed.exchange()
        values = float_column(payload[:, 0])
        self.scores.index_copy_(0, rows, values)
        self.written.index_copy_(0, rows, torch.where(torch.isfinite(values), payload[:, 1], -1))

    def _sharded_plan(self, epoch: int) -> EpochPlan:
        """`epoch_plan` across ranks from the owned rows: the plan one process makes."""
        owner = self.sharding
        self._apply_routed()
        generator = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + epoch)
        unseen = self.written < 0
        age = (epoch - self.written).clamp_min(0).float()
        aged = self.scores * self.ageing ** age if self.ageing < 1.0 else self.scores
        offsets = torch.rand(self.num_samples, generator=generator, device=self.device)[owner.rank::owner.world]
        keys = torch.where(unseen, _UNSEEN + 1e29 * offsets, aged).contiguous()
        k = self.num_selected - self.num_explore
        if self.balanced:
            top = _keys.balanced_topk_owned(owner, keys, self.labels, self.num_classes, k)
        else:
            top = owner.topk_owned(keys, k)
        if self.num_explore:
            rest = torch.rand(self.num_samples, generator=generator, device=self.device)[owner.rank::owner.world].contiguous()
            rest.index_fill_(0, owner.local_rows(top[owner.owns(top)]), -1.0)
            top = torch.cat([top, owner.topk_owned(rest, self.num_explore)])
        order = torch.randperm(top.numel(), generator=generator, device=self.device)
        plan = EpochPlan(top[order].cpu())
        self._plans = {epoch: plan}
        return plan

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "epoch": self.epoch, "scores": self.scores.clone(), "written": self.written.clone(),
                 "plans": {k: v.indices.clone() for k, v in self._plans.items()}}
        if self._routed is not None:  # this rank's rows and its queued writes: no collective
            state["pending"] = self._routed.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        where = f"aql.strategies.{type(self).__name__}.load_state_dict"
        for key in ("scores", "written"):
            if tuple(state[key].shape) != tuple(getattr(self, key).shape):
                raise ValueError(f"{where}: state['{key}'] must have {getattr(self, key).shape[0]} rows (this rank's), "
                                 f"got {tuple(state[key].shape)}")
        self.epoch = int(state["epoch"])
        self.scores.copy_(state["scores"])
        self.written.copy_(state["written"])
        if self._routed is not None:
            self._routed.load_state_dict(state["pending"])
        self._plans = {int(k): EpochPlan(v) for k, v in state["plans"].items()}


class _ShardingHook:
    """What `SelectionStrategy.attach_process_group` finds among a strategy's attributes (it calls
    `attach_sharding(ownership)` on them): shards the ranked tables, which stay plain attributes so
    that the one-process step pays nothing for it."""

    def __init__(self, strategy: RankedSelection):
        self._strategy = strategy

    def attach_sharding(self, ownership) -> None:
        self._strategy._attach_sharding(ownership)
