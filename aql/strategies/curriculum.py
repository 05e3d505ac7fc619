"""`curriculum`: easy-to-hard bands of normalised entropy (`CurriculumAQL`); candidate batches are
scored without gradients, the samples inside the current band are kept, up to `query_budget` of the
data per epoch; the stage advances on the validation loss (or when a band runs dry).

Under torch.distributed every rank filters the whole gathered candidate batch
(`SelectionStrategy.select_global`) with the global batch size as the fill, so the bands, the kept
count and the early end of an epoch are one process's on every rank; every rank evaluates the whole
validation set with the same parameters, so `end_epoch` advances the stage alike everywhere."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from aql._checks import check_int
from aql.selection import CurriculumAQL

from ._keys import rank_fraction
from .base import EpochPlan, SelectionStrategy, StrategyContext, register_strategy

__all__ = ["CurriculumStrategy"]


@register_strategy
class CurriculumStrategy(SelectionStrategy):
    """Every sample is a candidate each epoch (order `epoch_permutation`), in candidate batches of
    the training batch size; `select` keeps the in-band ones (`CurriculumAQL.filter_batch`: the
    difficulty is the candidates' entropy / log(num_classes), or, with `candidate_scorer(indices)`
    (an estimator's score, whose scale is its own), the score's quantile among the candidates) until
    `samples_per_epoch`
    are kept, after which `batches` yields no more candidates. `end_epoch` passes `val_loss` (when
    finite) to `maybe_advance_stage` and reports `stage_advanced` and `training_stage`.

    stage_thresholds, stage_advance_threshold, max_lookahead, advance_if_exhausted: see `CurriculumAQL`.
    One host synchronisation per candidate batch (the in-band count).
    """

    name = "curriculum"
    scores_candidates = True
    config_arguments = {**SelectionStrategy.config_arguments, "num_classes": "the model config (classes or vocabulary)",
                        "stage_thresholds": "aql_v2.difficulty_stages",
                        "stage_advance_threshold": "aql_v2.stage_advance_threshold", "candidate_scorer": "aql_v2.scorer"}

    def __init__(self, num_samples: int, *, num_classes: int, query_budget: float = 0.2, stage_thresholds=(0.3, 0.6, 1.0),
                 stage_advance_threshold: float = 0.1, max_lookahead: int = 16, advance_if_exhausted: bool = True,
                 candidate_scorer: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 device: torch.device | str = "cpu"):
        super().__init__(num_samples, query_budget=query_budget, seed=seed, device=device)
        where = f"strategies.{type(self).__name__}"
        self.num_classes = check_int(where, "num_classes", num_classes, low=2)
        if candidate_scorer is not None and not callable(candidate_scorer):
            raise TypeError(f"aql.{where}: candidate_scorer must be callable (indices -> float32 scores), "
                            f"got {type(candidate_scorer).__name__}")
        self.candidate_scorer = candidate_scorer
        self.selector = CurriculumAQL(None, None, stage_thresholds=stage_thresholds, stage_advance_threshold=stage_advance_threshold,
                                      max_lookahead=max_lookahead, num_classes=num_classes, advance_if_exhausted=advance_if_exhausted)
        self._epoch: int | None = None  # the epoch of the last plan
        self._epoch_kept = 0  # samples kept in it
        self._fill = None  # the loop's batch size (the batch that filter_batch's exhaustion rules fill)

    @property
    def training_stage(self) -> int:
        return self.selector.training_stage

    def candidate_batch_size(self, batch_size: int) -> int:
        return batch_size

    def epoch_plan(self, epoch: int) -> EpochPlan:
        if epoch != self._epoch:  # a new epoch (not the same one again, as after a resume)
            self._epoch, self._epoch_kept = epoch, 0
            self.selector.reset_window()
        return self.host_plan(self.epoch_permutation(self.num_samples, epoch))

    def batches(self, plan: EpochPlan, batch_size: int, *, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        self._fill = batch_size
        for batch in super().batches(plan, batch_size, skip=skip):
            if self._epoch_kept >= self.samples_per_epoch:
                return
            yield batch

    def select(self, indices: torch.Tensor, scores) -> torch.Tensor:
        if self.candidate_scorer is None:
            difficulty = CurriculumAQL.normalised_entropy(scores.entropy, self.num_classes)
        else:  # an estimator's score has no fixed scale: its quantile within the candidates is the difficulty
            difficulty = rank_fraction(self.candidate_scorer(indices))
        positions = self.selector.filter_batch(difficulty, self._fill or indices.shape[0])
        positions = positions[:max(0, self.samples_per_epoch - self._epoch_kept)]
        self._epoch_kept += positions.shape[0]
        return positions

    def end_epoch(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        val_loss = metrics.get("val_loss")
        advanced = False
        if isinstance(val_loss, (int, float)) and math.isfinite(val_loss):
            advanced = self.selector.maybe_advance_stage(float(val_loss))
        return {"stage_advanced": bool(advanced), "training_stage": self.selector.training_stage}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "selector": self.selector.state_dict(), "epoch": self._epoch, "epoch_kept": self._epoch_kept}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.selector.load_state_dict(dict(state["selector"]))
        self._epoch, self._epoch_kept = state["epoch"], int(state["epoch_kept"])

    @classmethod
    def from_config(cls, config, context: StrategyContext) -> CurriculumStrategy:
        a = config.aql_v2
        from aql.training.batches import config_scorer

        scorer = config_scorer(config, context)
        if context.num_classes is None:
            raise ValueError("aql.strategies.CurriculumStrategy.from_config: the context must name num_classes "
                             "(entropy is normalised by log(num_classes)), got None")
        return cls(context.num_samples, num_classes=context.num_classes, query_budget=a.query_budget,
                   stage_thresholds=tuple(a.difficulty_stages), stage_advance_threshold=a.stage_advance_threshold,
                   candidate_scorer=scorer, seed=config.seed, device=context.device, **a.strategy_options)
