"""`online`: fresh scores for every candidate batch, the budget share of it back-propagated.

Each step draws a candidate batch of `ceil(batch_size / query_budget)` samples from the epoch's
shuffled order, scores it with a no-grad forward (`aql_kernels.softmax_scores`, one read of the
logits), and trains on the chosen rows (Selective Backprop, Jiang et al. 2019; with `score:
reducible`, RHO-LOSS, Mindermann et al. 2022). The knobs, each measured in EXPERIMENTS.md:

- `score`: the statistic that ranks candidates (`_keys.SCORE_NAMES`), or `uncertainty`: the values of
  a `candidate_scorer` (indices -> float32 [B]), e.g. an uncertainty estimator's `estimate_uncertainty`
  of the candidates (`aql_v2.scorer: estimator`; an extra scoring forward, or several for MC dropout).
- `pick`: `top` (the exact top of the keys) or `sample` (a draw proportional to
  `score + smoothing * mean(score)`, Katharopoulos & Fleuret 2018), with `importance_weights` bounded
  by `max_weight` (`_keys.inclusion_weights`).
- `balanced`: per-class quotas inside the selection (stratified by label), so a subset never
  collapses onto a few classes. The plain top-loss rule collapses onto the classes the model gets
  wrong and never leaves chance level on MNIST-1D at high learning rates; the quotas fix that.
- `warmup_epochs`: epochs of uniformly random selection before scores rank anything.
- `curriculum_start` / `curriculum_epochs`: an easy-to-hard band on the quantiles of the candidates'
  scores: at epoch progress t only the easiest `start + (1 - start) * min(1, t / curriculum_epochs)`
  of each candidate batch is eligible (never fewer than the rows to keep), so a band never runs dry.
- `order`: `score` (active selection) or `random` (uniform inside the eligible band: curriculum
  without active selection, and with no curriculum the random control with its extra forwards).

The budget is held exactly: after each candidate batch, floor(query_budget * candidates seen + 1/2)
rows have been kept in all. Keys and the top-k (`aql_kernels.topk_indices`) stay on the device; the
only host arithmetic is on batch sizes. Deterministic for a seed: the order, the random keys and the
selections are fixed by (seed, epoch) and the generator's state, which `state_dict` carries.

Under torch.distributed the selection is the one a single process makes over the global candidate
batch: each rank scores its rows of it, the statistics are gathered (`SelectionStrategy.select_global`),
and every rank runs `select` on the whole batch with the same generator state, so the ranks agree on
every kept row, the budget and the epoch progress (`_seen` counts the global candidates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

import aql_kernels
from aql._checks import check_bool, check_choice, check_int, check_interval

from . import _keys
from ._scored import ScoredStrategy
from .base import EpochPlan, register_strategy

__all__ = ["OnlineSelection"]


@register_strategy
class OnlineSelection(ScoredStrategy):
    """Candidate batches scored by a no-grad forward; see the module docstring for the knobs.

    Defaults (score el2n, pick sample, balanced, no importance weights, smoothing 0.5): the variant
    with the best validation accuracy averaged over the study's budgets 0.1-0.5 (the
    `online_balanced_sample_el2n` row of results/experiments/efficiency; top-k variants led at single
    budgets but one seed of the top-loss rule diverged at its tuned learning rate).

    labels: int64 [N] training labels (needed by `balanced`); irreducible: float32 [N] stored
    irreducible losses (needed by `score="reducible"`, e.g. from `aql.strategies.irreducible_losses`);
    candidate_scorer: indices -> float32 [B] scores, higher = more informative (needed by
    `score="uncertainty"`, e.g. `aql.training.batches.estimator_scorer`).
    """

    name = "online"
    scores_candidates = True
    takes_candidate_scorer = True

    def __init__(self, num_samples: int, *, query_budget: float = 0.2, seed: int = 0, device: torch.device | str = "cpu",
                 score: str = "el2n", pick: str = "sample", balanced: bool = True, smoothing: float = 0.5,
                 importance_weights: bool = False, max_weight: float = 4.0, warmup_epochs: float = 0.0,
                 curriculum_start: float | None = None, curriculum_epochs: float = 10.0, order: str = "score",
                 labels: torch.Tensor | None = None, num_classes: int | None = None, irreducible: torch.Tensor | None = None,
                 candidate_scorer: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__(num_samples, query_budget=query_budget, seed=seed, device=device)
        where = f"strategies.{type(self).__name__}"
        self._setup_scoring(score, balanced, labels, num_classes, irreducible, candidate_scorer)
        self.pick = check_choice(where, "pick", pick, ("top", "sample"))
        self.order = check_choice(where, "order", order, ("score", "random"))
        self.importance_weights = check_bool(where, "importance_weights", importance_weights)
        self.smoothing = check_interval(where, "smoothing", smoothing, 0.0, math.inf, low_open=False, high_open=True)
        self.max_weight = check_interval(where, "max_weight", max_weight, 1.0, math.inf, low_open=False, high_open=True)
        self.warmup_epochs = check_interval(where, "warmup_epochs", warmup_epochs, 0.0, math.inf, low_open=False, high_open=True)
        self.curriculum_epochs = check_interval(where, "curriculum_epochs", curriculum_epochs, 0.0, math.inf, low_open=True, high_open=True)
        self.curriculum_start = None if curriculum_start is None else check_interval(
            where, "curriculum_start", curriculum_start, 0.0, 1.0, low_open=True, high_open=False)
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed + 7919)
        self.epoch = 0
        self._seen = 0  # candidates scored this epoch
        self._kept = 0  # of them kept

    # -- the protocol ------------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> EpochPlan:
        check_int(f"strategies.{type(self).__name__}.epoch_plan", "epoch", epoch, low=0)
        if epoch != self.epoch:
            self.epoch, self._seen, self._kept = epoch, 0, 0
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return EpochPlan(torch.randperm(self.num_samples, generator=generator))

    def _progress(self) -> float:
        """Epochs of training so far, fractional inside the running epoch (`select` sees the global
        candidate batches under torch.distributed too)."""
        return self.epoch + self._seen / self.num_samples

    def select(self, indices: torch.Tensor, scores):
        batch = indices.shape[0]
        progress = self._progress()
        self._seen += batch
        keep = min(batch, _keys.quota(self._seen, self._kept, self.query_budget))
        self._kept += keep
        device = scores.lse.device
        if progress < self.warmup_epochs or self.order == "random":
            keys = torch.rand(batch, generator=self._generator, device=self.device).to(device)
            values = None
        else:
            values = self._values(scores, indices)
            keys = values
        weights = None
        if self.pick == "sample" and values is not None:
            # a NaN or +inf score (a diverged row) is drawn last, and does not poison the others' smoothing
            draw = (values.float() + self.smoothing * values.float().nanmean()).clamp_min(0)
            draw = torch.nan_to_num(draw, nan=0.0, posinf=0.0)
            keys = _keys.sampling_keys(draw, self._generator).to(device)
            if self.importance_weights:
                weights = _keys.inclusion_weights(draw, keep, self.max_weight)
        if self.curriculum_start is not None and progress >= self.warmup_epochs:
            difficulty = values if values is not None else self._values(scores, indices)
            upper = self.curriculum_start + (1.0 - self.curriculum_start) * min(1.0, progress / self.curriculum_epochs)
            keys = _keys.band_keys(difficulty, keys, max(upper, keep / max(1, batch)))
        keys = self._quota_keys(keys, indices)
        positions = aql_kernels.topk_indices(keys.float().contiguous(), keep)
        if weights is not None:
            return positions, weights.index_select(0, positions)
        return positions

    def end_epoch(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        out = {"candidates_scored": self._seen, "selected": self._kept}
        self.epoch, self._seen, self._kept = self.epoch + 1, 0, 0
        return out

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "epoch": self.epoch, "seen": self._seen, "kept": self._kept,
                "generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        self.epoch, self._seen, self._kept = int(state["epoch"]), int(state["seen"]), int(state["kept"])
        self._generator.set_state(state["generator"])
