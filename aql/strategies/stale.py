"""`stale`: a `ScoreStore` keeps one score per sample, written from the training forward's own
statistics (no extra forward); between epochs `next_subset()` picks the `query_budget` share to train
on next (never-seen samples first, an `exploration` share at random). Under torch.distributed the store
is sharded by rank (`ScoreStore.attach_sharding`: ~N / R rows per rank, writes routed to their owners
at the epoch's selection), and plans exactly what one process plans."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from aql._checks import check_bool, check_choice
from aql.config import SCORES
from aql.selection import ScoreStore

from .base import EpochPlan, SelectionStrategy, StrategyContext, register_strategy

__all__ = ["StaleStrategy"]


@register_strategy
class StaleStrategy(SelectionStrategy):
    """Trains each epoch on the subset that the scores of earlier epochs select.

    epoch_plan(epoch): `store.next_subset()` in the order `epoch_permutation(k, epoch)`, made once per
    epoch (a second call for the same epoch returns the same plan, also after `load_state_dict`).
    With `importance_weights=True` the plan carries the subset's importance weights (the loop then
    trains on the normalised weighted mean); off by default: the explored share carries weight
    (N - top) / explored, ~41 at budget 0.2 and exploration 0.1, so those few samples dominate the
    gradient (MNIST-1D demo config at learning rate 3e-3: test accuracy 0.76 with the weights and
    exploration 0.1, 0.90 with the weights off or exploration 0.0).

    after_step(indices, scores): `store.update(indices, scores.<score>, deferred=True)`, no host
    synchronisation and no argument checks (the per-step path: int64 indices and float32 per-sample
    scores on the strategy's device). While the batches of this epoch's own plan are iterated the
    writes are declared distinct (the plan is a permutation of distinct indices and `batches` writes
    back what came before), which spares the write-back its repeated-index pass. `end_epoch` writes
    the scores back.
    """

    name = "stale"
    config_arguments = {**SelectionStrategy.config_arguments, "exploration": "aql_v2.exploration", "score": "aql_v2.score",
                        "importance_weights": "aql_v2.importance_weights"}

    def __init__(self, num_samples: int, *, query_budget: float = 0.2, exploration: float = 0.1, score: str = "loss",
                 importance_weights: bool = False, unseen_score: float = math.inf, seed: int = 0,
                 device: torch.device | str = "cpu"):
        super().__init__(num_samples, query_budget=query_budget, seed=seed, device=device)
        where = f"strategies.{type(self).__name__}"
        check_choice(where, "score", score, SCORES)
        check_bool(where, "importance_weights", importance_weights)
        self.score, self.importance_weights = score, importance_weights
        self.store = ScoreStore(num_samples, query_budget=query_budget, exploration=exploration, device=self.device, seed=seed,
                                unseen_score=unseen_score)
        self._plan_epoch: int | None = None
        self._plan: EpochPlan | None = None
        self._writes_distinct = False

    def epoch_plan(self, epoch: int) -> EpochPlan:
        if epoch != self._plan_epoch:
            subset = self.store.next_subset()
            order = self.epoch_permutation(subset.indices.numel(), epoch)
            weights = subset.weights.float().cpu()[order] if self.importance_weights else None
            self._plan, self._plan_epoch = self.host_plan(subset.indices.cpu()[order], weights), epoch
        return self._plan

    def batches(self, plan: EpochPlan, batch_size: int, *, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        own = plan is self._plan
        if own:
            self.store.flush()  # earlier writes (a previous pass over the plan) first: this pass's are distinct
        self._writes_distinct = own
        try:
            yield from super().batches(plan, batch_size, skip=skip)
        finally:
            self._writes_distinct = False

    def after_step(self, indices: torch.Tensor, scores) -> None:
        self.store.update(indices, getattr(scores, self.score), deferred=True, distinct=self._writes_distinct)

    def end_epoch(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        self.store.flush()
        return {}

    def state_dict(self) -> dict[str, Any]:
        plan = None if self._plan is None else {"epoch": self._plan_epoch, "indices": self._plan.indices.clone(),
                                                "weights": None if self._plan.weights is None else self._plan.weights.clone()}
        return {**super().state_dict(), "store": self.store.state_dict(), "plan": plan}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.store.load_state_dict(state["store"])
        plan = state.get("plan")
        if plan is None:
            self._plan, self._plan_epoch = None, None
        else:
            self._plan, self._plan_epoch = self.host_plan(plan["indices"], plan["weights"]), int(plan["epoch"])

    @classmethod
    def from_config(cls, config, context: StrategyContext) -> StaleStrategy:
        a = config.aql_v2
        return cls(context.num_samples, query_budget=a.query_budget, exploration=a.exploration, score=a.score,
                   importance_weights=a.importance_weights, seed=config.seed, device=context.device, **a.strategy_options)
