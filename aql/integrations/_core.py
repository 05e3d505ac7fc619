"""What the framework adapters share: a strategy's epoch plan through a sampler, each step's per-sample
scores handed to the strategy once its optimizer step has run, the Fisher update, and the overhead
clock. The adapters (`huggingface`, `lightning`) only translate their framework's hooks into these
calls; the selection itself is the strategy's (`aql.strategies`).

One optimizer step, in the order the frameworks call it::

    session.begin_epoch(epoch)                     # the strategy's plan for the epoch (timed as AQL)
    ... per micro-batch: forward, fused loss, backward
        session.record(index, per_sample_scores)   # queued, not yet written
    session.before_optimizer_step()                # the Fisher update from the .grad backward left
    ... optimizer.step()
    session.after_optimizer_step(applied=True)     # the queued scores go to strategy.after_step
    session.end_epoch(metrics)                     # the strategy's write-back (timed as AQL)
    session.lap()                                  # {"aql_overhead_pct", "aql_data_selected"} since the last lap
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch

import aql_kernels
from aql._checks import check_int
from aql.sampling import SelectionSampler
from aql.strategies import SelectionStrategy
from aql.training.clock import OverheadClock, overhead_percent

__all__ = ["SelectionSession", "per_sample_scores"]

def per_sample_scores(logits: torch.Tensor, targets: torch.Tensor, *, shift: bool = False, ignore_index: int = -100):
    """No-grad `aql_kernels.SoftmaxScores` with one row per sample: `[N, V]` logits with `[N]` targets
    give one row per sample; `[B, T, V]` logits with `[B, T]` targets give each statistic's mean over
    the sequence's valid tokens (`per_sample="mean"`; with `shift`, targets[:, 1:] against
    logits[:, :-1]). One extra read of the logits: a loop that computes its loss with
    `aql_kernels.cross_entropy_with_scores` already has these scores and needs no second pass."""
    with torch.no_grad():
        if logits.dim() == 3:
            return aql_kernels.softmax_scores(logits.detach(), targets, ignore_index=ignore_index, shift=shift, per_sample="mean")
        if shift:
            raise ValueError(f"aql.integrations: shift=True needs [B, T, V] logits, got shape {tuple(logits.shape)}")
        return aql_kernels.softmax_scores(logits.detach(), targets, ignore_index=ignore_index)


class SelectionSession:
    """A strategy, its sampler, an optional estimator and the overhead clock, driven by a framework's
    hooks (see the module docstring).

    strategy: an `aql.strategies.SelectionStrategy` whose epoch plan is the selection (none, random,
    stale, ranked, ...). Strategies that score candidate batches in the training step
    (`scores_candidates`: streaming, curriculum, online, meta) need a no-grad forward on candidates
    that the frameworks' steps do not make, and are refused.
    estimator: None, or an object with `update_from_grads()` (an `aql.uncertainty.LaplacianUncertainty`
    built on the trained model): its Fisher EMA is updated from the `.grad` of every
    `fisher_update_freq`-th optimizer step, before the optimizer consumes them.
    """

    def __init__(self, strategy: SelectionStrategy, *, estimator=None, fisher_update_freq: int = 1, where: str = "integrations"):
        self.where = where
        if not isinstance(strategy, SelectionStrategy):
            raise TypeError(f"aql.{where}: strategy must be an aql.strategies.SelectionStrategy (e.g. "
                            f"aql.strategies.StaleStrategy(len(train_dataset), query_budget=0.2)), got {type(strategy).__name__}")
        if strategy.scores_candidates:
            raise ValueError(f"aql.{where}: strategy {strategy.name!r} scores candidate batches inside the training step "
                             "(a no-grad forward the framework's step does not make); use a strategy that plans whole "
                             "epochs: 'stale', 'ranked', 'random' or 'none'")
        if estimator is not None and not callable(getattr(estimator, "update_from_grads", None)):
            raise TypeError(f"aql.{where}: estimator must have update_from_grads() (e.g. aql.uncertainty.LaplacianUncertainty) "
                            f"or be None, got {type(estimator).__name__}")
        self.strategy, self.estimator = strategy, estimator
        self.fisher_update_freq = check_int(where, "fisher_update_freq", fisher_update_freq, low=1)
        self.sampler = SelectionSampler(strategy)
        self.epoch = 0
        self.optimizer_steps = 0
        self.epoch_samples = strategy.samples_per_epoch  # the current epoch's planned samples (set by begin_epoch)
        self.trained_samples = 0  # samples whose scores reached the strategy this epoch
        self._pending: list[tuple[torch.Tensor, Any]] = []
        self._strategy_device = torch.empty(0, device=strategy.device).device  # "cuda" -> "cuda:0", as tensors report it
        self._clock: OverheadClock | None = None
        self._run_aql = 0.0
        self._run_total = 0.0

    # -- clock ------------------------------------------------------------------------------------
    def start_clock(self, device: torch.device | str) -> None:
        """Starts timing (at the start of training, on the device the model trains on)."""
        self._clock = OverheadClock(torch.device(device))
        self._run_aql = self._run_total = 0.0

    def _begin(self):
        return None if self._clock is None else self._clock.begin()

    def _end(self, token) -> None:
        if self._clock is not None:
            self._clock.end(token)

    @contextlib.contextmanager
    def timed(self):
        """Counts the time inside as AQL overhead (an adapter's own scoring pass)."""
        token = self._begin()
        yield
        self._end(token)

    def lap(self) -> dict[str, float]:
        """Overhead since the last lap: `aql_overhead_pct` (AQL time as a percentage of the rest of the
        time) and `aql_data_selected` (the share of the training set the current epoch trains on).
        On CUDA this waits for the last timing event (once per call: call it per log interval)."""
        aql_time, total = self._clock.lap() if self._clock is not None else (0.0, 0.0)
        self._run_aql += aql_time
        self._run_total += total
        return {"aql_overhead_pct": overhead_percent(aql_time, total), "aql_data_selected": self.data_selected}

    def run_overhead(self) -> dict[str, float]:
        """The whole run's overhead so far (every lap, and the running interval)."""
        self.lap()
        return {"aql_overhead_pct": overhead_percent(self._run_aql, self._run_total), "aql_overhead_time": self._run_aql}

    @property
    def data_selected(self) -> float:
        return self.epoch_samples / self.strategy.num_samples

    # -- the loop ---------------------------------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        """The strategy's plan for `epoch` (made now, timed as AQL) and the sampler set to it."""
        token = self._begin()
        plan = self.strategy.epoch_plan(epoch)
        self._end(token)
        self.sampler.set_epoch(epoch)
        self.epoch, self.epoch_samples, self.trained_samples = epoch, plan.indices.numel(), 0

    def record(self, index: torch.Tensor, scores) -> None:
        """Queues one micro-batch's per-sample scores (`aql_kernels.SoftmaxScores`, one row per entry of
        `index`, the samples' dataset indices) for `after_optimizer_step`."""
        if not self.strategy.uses_scores:
            return
        token = self._begin()
        if not isinstance(index, torch.Tensor):
            index = torch.as_tensor(index)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise ValueError(f"aql.{self.where}: a batch's index must be a 1-D integer tensor of dataset indices, "
                             f"got {index.dtype} of shape {tuple(index.shape)}")
        if scores.loss is not None and scores.loss.shape != index.shape:
            raise ValueError(f"aql.{self.where}: one score per sample expected ({index.shape[0]} indices), got scores of shape "
                             f"{tuple(scores.loss.shape)}; for [B, T, V] logits the per-sample scores are per_sample='mean'")
        if scores.lse.device != self._strategy_device:
            raise ValueError(f"aql.{self.where}: the strategy's tables live on {self._strategy_device} but the scores are on "
                             f"{scores.lse.device}; build the strategy with device= the model's device")
        self._pending.append((index.to(self._strategy_device, torch.int64, non_blocking=True), scores))
        self._end(token)

    def before_optimizer_step(self) -> None:
        """The Fisher update (every `fisher_update_freq` optimizer steps) from the gradients of the step."""
        if self.estimator is not None and self.optimizer_steps % self.fisher_update_freq == 0:
            token = self._begin()
            self.estimator.update_from_grads()
            self._end(token)

    def after_optimizer_step(self, applied: bool = True) -> None:
        """Hands the step's queued scores to `strategy.after_step` (dropped when the step was not applied,
        e.g. skipped by a gradient scaler on overflow, as the protocol asks)."""
        pending, self._pending = self._pending, []
        self.optimizer_steps += 1
        if not applied or not pending:
            return
        token = self._begin()
        for index, scores in pending:
            self.strategy.after_step(index, scores)
            self.trained_samples += index.shape[0]
        self._end(token)

    def end_epoch(self, metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """`strategy.end_epoch(metrics)` (its write-back), timed as AQL; returns the strategy's metrics."""
        token = self._begin()
        result = self.strategy.end_epoch(dict(metrics or {}))
        self._end(token)
        return result

    # -- persistence ------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = {"strategy": self.strategy.state_dict(), "epoch": self.epoch, "optimizer_steps": self.optimizer_steps}
        if self.estimator is not None and callable(getattr(self.estimator, "state_dict", None)):
            state["estimator"] = self.estimator.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or "strategy" not in state:
            raise ValueError(f"aql.{self.where}.load_state_dict: state must be a mapping with a 'strategy' entry, got "
                             f"{type(state).__name__}{' with keys ' + str(sorted(state)) if isinstance(state, Mapping) else ''}")
        self.strategy.load_state_dict(state["strategy"])
        if self.estimator is not None and "estimator" in state:
            self.estimator.load_state_dict(state["estimator"])
        self.epoch = int(state.get("epoch", 0))
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        # the sampler at the saved epoch: a length asked before the next epoch starts must not plan a
        # different epoch (a plan is made once per epoch and advances the strategy's state)
        self.sampler.set_epoch(self.epoch)
        self._pending = []
