"""`streaming`: candidate batches of `batch_size / query_budget` samples are scored without gradients
and `StreamingAQL` keeps those above its running threshold (about `query_budget` of them, in
constant memory); the loop trains on what it keeps.

Under torch.distributed every rank feeds the selector the whole gathered candidate batch
(`SelectionStrategy.select_global`), so the running threshold histogram, the budget feedback and the
importance weights are those of one process on every rank."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from aql._checks import check_bool, check_choice
from aql.config import SCORES
from aql.selection import StreamingAQL

from .base import EpochPlan, SelectionStrategy, StrategyContext, register_strategy

__all__ = ["StreamingStrategy"]


@register_strategy
class StreamingStrategy(SelectionStrategy):
    """Every sample is a candidate each epoch (order `epoch_permutation`); `select` keeps the
    candidates whose score (`score`: a field of the candidates' `SoftmaxScores`, or
    `candidate_scorer(indices)` when given, e.g. an estimator's uncertainty) passes the running
    threshold of `StreamingAQL` (`buffer_size`, `batch_tolerance`, `budget_feedback`: see there).

    With `importance_weights=True`, `select` returns `(positions, weights)`: each kept sample weighs
    1 / the running keep rate (one value per candidate batch). One host synchronisation per
    candidate batch (the kept count).
    """

    name = "streaming"
    scores_candidates = True
    config_arguments = {**SelectionStrategy.config_arguments, "buffer_size": "aql_v2.buffer_size", "score": "aql_v2.score",
                        "importance_weights": "aql_v2.importance_weights", "candidate_scorer": "aql_v2.scorer"}

    def __init__(self, num_samples: int, *, query_budget: float = 0.2, buffer_size: int = 10000, score: str = "loss",
                 importance_weights: bool = False, batch_tolerance: float = 0.25, budget_feedback: bool = True,
                 candidate_scorer: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 device: torch.device | str = "cpu"):
        super().__init__(num_samples, query_budget=query_budget, seed=seed, device=device)
        where = f"strategies.{type(self).__name__}"
        check_choice(where, "score", score, SCORES)
        check_bool(where, "importance_weights", importance_weights)
        if candidate_scorer is not None and not callable(candidate_scorer):
            raise TypeError(f"aql.{where}: candidate_scorer must be callable (indices -> float32 scores), got {type(candidate_scorer).__name__}")
        self.score, self.importance_weights, self.candidate_scorer = score, importance_weights, candidate_scorer
        self.selector = StreamingAQL(None, None, query_budget=query_budget, buffer_size=buffer_size, weighting=importance_weights,
                                     seed=seed, batch_tolerance=batch_tolerance, budget_feedback=budget_feedback)

    def epoch_plan(self, epoch: int) -> EpochPlan:
        return self.host_plan(self.epoch_permutation(self.num_samples, epoch))

    def select(self, indices: torch.Tensor, scores):
        values = getattr(scores, self.score) if self.candidate_scorer is None else self.candidate_scorer(indices)
        decision = self.selector.keep(values)
        return (decision.positions, decision.weights) if self.importance_weights else decision.positions

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "selector": self.selector.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.selector.load_state_dict(state["selector"])

    @classmethod
    def from_config(cls, config, context: StrategyContext) -> StreamingStrategy:
        a = config.aql_v2
        from aql.training.batches import config_scorer

        scorer = config_scorer(config, context)
        return cls(context.num_samples, query_budget=a.query_budget, buffer_size=a.buffer_size, score=a.score,
                   importance_weights=a.importance_weights, candidate_scorer=scorer, seed=config.seed, device=context.device,
                   **a.strategy_options)
