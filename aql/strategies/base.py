"""The selection-strategy protocol: one small interface that the trainer and a plain loop both drive.

A strategy decides which samples are back-propagated. The loop owns the model, the optimizer and the
data; the strategy owns the per-sample bookkeeping. One epoch of a plain loop::

    plan = strategy.epoch_plan(epoch)
    for indices, weights in strategy.batches(plan, batch_size):
        x, y = inputs[indices], targets[indices]
        if strategy.scores_candidates:            # streaming-style: score candidates, keep some
            with torch.no_grad():
                candidate = aql_kernels.softmax_scores(model(x), y)
            kept = strategy.select(indices, candidate)   # positions into `indices`
            indices, x, y = indices[kept], x[kept], y[kept]
            weights = None if weights is None else weights[kept]
        losses, scores = aql_kernels.cross_entropy_with_scores(model(x), y, reduction="none")
        loss = losses.mean() if weights is None else (losses * weights).sum() / weights.sum()
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        strategy.after_step(indices, scores)       # the training forward's per-sample statistics
    strategy.end_epoch({"val_loss": ...})

Under torch.distributed (torchrun) each rank runs the same strategy: the loop calls
`attach_process_group()` once, then trains `shard_plan(plan)` (rank r: positions r, r + R, ... of the
plan every rank computes) and feeds `after_step` only what it trained, so per-sample tables are written
by rank; a strategy selects through `topk_indices(keys, k)`, which in one process is
`aql_kernels.topk_indices` and across ranks the exact global selection of `aql.distributed` (histogram
all-reduces, never the scores). Strategies whose tables are not sharded yet are refused there.
A `scores_candidates` strategy makes the one-process selection instead: every rank iterates the global
candidate batches (`batches(plan, global_batch)`), scores its rows `indices[rank::world]` and calls
`select_global(indices, scores)`, which gathers the candidates' statistics (one all-gather of a few KB,
`aql.strategies._ranks`) and runs `select` on the whole batch on every rank; each rank trains the kept
positions p with p % world == rank.

Everything a strategy needs to resume exactly lives in `state_dict()`; nothing in the protocol
synchronises with the device per step (`after_step` only queues writes, `select` returns a device
tensor). A new strategy is one class in one file under `aql/strategies/`, registered with
`@register_strategy`; the trainer and the experiments find it by its `name`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch

import aql_kernels
from aql._checks import check_int, check_interval, round_half_up

__all__ = ["EpochPlan", "SelectionStrategy", "StrategyContext", "STRATEGIES", "register_strategy", "build_strategy", "split_selection"]


class EpochPlan(NamedTuple):
    """The samples one epoch visits.

    indices: int64 [M] on the CPU, dataset indices in visiting order (already shuffled).
    weights: float32 [M] per-sample loss weights aligned with `indices`, or None for the plain mean.
      With weights, a batch's loss is the self-normalised weighted mean sum(w * loss) / sum(w).
    """

    indices: torch.Tensor
    weights: torch.Tensor | None = None


@dataclass
class StrategyContext:
    """What a strategy may need to build itself from a config (`SelectionStrategy.from_config`).

    num_samples: the training set's size; labels: int64 [N] class labels of the training set (None for
    token data); num_classes; seed: the run's seed; device: where per-sample tables live; model /
    estimator: the trained network and the uncertainty estimator (strategies that score candidates
    with it); train_data / holdout_data: datasets for strategies that fit something before training
    (None when the loop has none).
    """

    num_samples: int
    seed: int = 0
    device: torch.device | str = "cpu"
    labels: torch.Tensor | None = None
    num_classes: int | None = None
    model: Any = None
    estimator: Any = None
    train_data: Any = None
    holdout_data: Any = None


class SelectionStrategy:
    """Base class of the selection strategies (see the module docstring for the loop that drives it).

    Class attributes:
    - `name`: the registry key (`aql_v2.selection_strategy`).
    - `uses_scores`: False when the strategy never reads per-sample statistics (all data, random): the
      loop may then train with plain `F.cross_entropy` and skip `after_step`.
    - `scores_candidates`: True when `batches()` yields candidate batches that the loop scores without
      gradients and passes through `select()` before training on what it keeps.
    """

    name: ClassVar[str] = ""
    uses_scores: ClassVar[bool] = True
    scores_candidates: ClassVar[bool] = False
    #: set by `attach_process_group` under torch.distributed: the `aql.distributed.SampleOwnership` of
    #: this rank (None in one process)
    sharding = None
    #: the process group of `attach_process_group` (None: the default group)
    process_group = None
    #: constructor arguments that `from_config` fills from the config's own keys or the context, with
    #: where each comes from; `aql_v2.strategy_options` may set any other keyword argument
    config_arguments: ClassVar[Mapping[str, str]] = {
        "num_samples": "the training set's size", "query_budget": "aql_v2.query_budget", "seed": "seed", "device": "device"}

    def __init__(self, num_samples: int, *, query_budget: float = 1.0, seed: int = 0, device: torch.device | str = "cpu"):
        where = f"strategies.{type(self).__name__}"
        self.num_samples = check_int(where, "num_samples", num_samples, low=1)
        self.query_budget = check_interval(where, "query_budget", query_budget, 0.0, 1.0, low_open=True, high_open=False)
        self.seed = check_int(where, "seed", seed, low=0)
        self.device = torch.device(device)

    @property
    def samples_per_epoch(self) -> int:
        """max(1, floor(query_budget * num_samples + 1/2)): the samples an epoch back-propagates (what a
        loop sizes its learning-rate schedule by; a budget-capped strategy stops there)."""
        return max(1, round_half_up(self.query_budget * self.num_samples))

    def epoch_permutation(self, n: int, epoch: int) -> torch.Tensor:
        """int64 [n] on the CPU: a uniform permutation of range(n) fixed by (seed, epoch)."""
        return torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def host_plan(self, indices: torch.Tensor, weights: torch.Tensor | None = None) -> EpochPlan:
        """An EpochPlan of CPU tensors, in pinned memory when the strategy's device is CUDA, so that a
        loop's per-batch `index.to(device, non_blocking=True)` does not wait for the stream."""
        indices = indices.to("cpu", torch.int64)
        weights = None if weights is None else weights.to("cpu", torch.float32)
        if self.device.type == "cuda":
            indices = indices.pin_memory()
            weights = None if weights is None else weights.pin_memory()
        return EpochPlan(indices, weights)

    # -- the protocol ----------------------------------------------------------------------------
    def epoch_plan(self, epoch: int) -> EpochPlan:
        """The samples (and loss weights) of epoch `epoch`, a pure function of the strategy's state
        and (seed, epoch): calling it twice for the same epoch gives the same plan."""
        raise NotImplementedError(f"{type(self).__name__}.epoch_plan")

    def candidate_batch_size(self, batch_size: int) -> int:
        """Candidates per batch for `scores_candidates` strategies: enough that keeping `query_budget`
        of them fills a training batch."""
        return max(1, math.ceil(batch_size / self.query_budget)) if self.scores_candidates else batch_size

    def batches(self, plan: EpochPlan, batch_size: int, *, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """(indices, weights) slices of the plan, `candidate_batch_size(batch_size)` long, the first
        `skip` of them left out (resuming inside an epoch)."""
        size = self.candidate_batch_size(batch_size)
        for start in range(skip * size, plan.indices.numel(), size):
            weights = None if plan.weights is None else plan.weights[start:start + size]
            yield plan.indices[start:start + size], weights

    def num_batches(self, plan: EpochPlan, batch_size: int) -> int:
        return math.ceil(plan.indices.numel() / self.candidate_batch_size(batch_size))

    def select(self, indices: torch.Tensor, scores) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Positions (int64, into `indices`) of the candidates to train on; `scores` are the no-grad
        `aql_kernels.SoftmaxScores` of the candidates (one row per sample). Only for
        `scores_candidates` strategies. A strategy that weights what it keeps (importance sampling)
        returns `(positions, weights)`, float32 weights aligned with the positions; `split_selection`
        turns either form into the pair."""
        raise NotImplementedError(f"{type(self).__name__} does not score candidates (scores_candidates is False)")

    def select_global(self, indices: torch.Tensor, scores) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`split_selection(select(indices, scores))` made over the global candidate batch `indices` (the
        same on every rank) when this rank's `scores` are those of its rows only,
        `indices[rank::world]` (`_ranks.local_rows`). Under torch.distributed the ranks' statistics (and
        a `candidate_scorer`'s values of each rank's own rows) are gathered in one-process order by one
        all-gather, and every rank runs `select` on the whole batch: identical state and inputs, so an
        identical decision. In one process `scores` are the whole batch's and this is `select`."""
        if self.sharding is None:
            return split_selection(self.select(indices, scores))
        from . import _ranks

        rank, world = self.sharding.rank, self.sharding.world
        scorer = getattr(self, "candidate_scorer", None)
        mine = indices[_ranks.local_rows(indices.shape[0], rank, world)]
        values = None if scorer is None else scorer(mine)
        scores, values = _ranks.gather_candidate_scores(scores, values, indices.shape[0], rank=rank, world=world,
                                                        group=self.process_group)
        with _ranks.gathered_scorer(self, indices, values):
            return split_selection(self.select(indices, scores))

    def after_step(self, indices: torch.Tensor, scores) -> None:
        """The training forward's per-sample `aql_kernels.SoftmaxScores` (one row per sample of
        `indices`). Must not synchronise with the device. A loop calls it only for micro-batches of an
        optimizer step that it applied: a step skipped for a non-finite loss or gradient calls it for
        none of its samples (the trainer calls it after the step, on CUDA one optimizer step later)."""

    def end_epoch(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Called after each epoch with its metrics (`val_loss` when the loop has validation data);
        returns metrics of the strategy's own to log (may be empty)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        if self.sharding is None:
            return {"name": self.name}
        return {"name": self.name, "ownership": self.sharding.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or state.get("name") != self.name:
            got = state.get("name") if isinstance(state, Mapping) else type(state).__name__
            raise ValueError(f"aql.strategies.{type(self).__name__}.load_state_dict: the state was written by strategy {got!r}, "
                             f"this is {self.name!r}")
        if self.sharding is not None:
            if "ownership" not in state:
                raise ValueError(f"aql.strategies.{type(self).__name__}.load_state_dict: this strategy runs on rank "
                                 f"{self.sharding.rank} of {self.sharding.world}, the state was written by one process")
            self.sharding.load_state_dict(state["ownership"])

    # -- torch.distributed -----------------------------------------------------------------------
    #: whether the strategy shards its own per-sample tables by `self.sharding` (set by
    #: `attach_process_group`: rank i % R owns sample i; writes routed to their owners, as `ranked` does)
    #: and selects from them through it (`SampleOwnership.topk_owned` / `topk_indices`)
    selects_across_ranks = False

    def attach_process_group(self, group=None) -> None:
        """Makes this strategy one rank's part of a selection shared by the ranks of `group` (the default
        process group when None); a no-op in one process. Strategies that read no scores (plans fixed
        by (seed, epoch)) need nothing else; `scores_candidates` strategies select on every rank over the
        global candidate batch (`select_global`), so they need nothing else either; a strategy that keeps
        per-sample tables must keep them in components with an `attach_sharding(ownership)` method
        (`aql.selection.ScoreStore`: sharded by rank and selecting across ranks), or shard them itself by
        `self.sharding` and say so with `selects_across_ranks`. Any other strategy is refused
        (NotImplementedError): its own tables would select from this rank's writes only."""
        from aql import distributed

        if distributed.world_size(group) == 1:
            return
        components = [value for value in vars(self).values() if hasattr(value, "attach_sharding")]
        if self.uses_scores and not self.scores_candidates and not components and not self.selects_across_ranks:
            raise NotImplementedError(f"aql.strategies.{type(self).__name__}: strategy {self.name!r} does not support "
                                      "torch.distributed (its per-sample tables are not sharded by rank: keep them in a "
                                      "component with attach_sharding, e.g. aql.selection.ScoreStore, or shard them by "
                                      "self.sharding and set selects_across_ranks); every built-in strategy runs under torchrun")
        self.process_group = group
        self.sharding = distributed.SampleOwnership(self.num_samples, group=group, device=self.device)
        for component in components:
            component.attach_sharding(self.sharding)

    def shard_plan(self, plan: EpochPlan, *, drop_last: bool = False) -> EpochPlan:
        """This rank's part of `plan` (`aql.distributed.shard_indices`: positions r, r + R, ..., padded by
        wrapping around or cut with `drop_last`, the weights alike), recorded as trained here; `plan`
        itself in one process."""
        if self.sharding is None:
            return plan
        from aql.distributed import shard_indices

        self.sharding.claim(plan.indices, drop_last=drop_last)
        rank, world = self.sharding.rank, self.sharding.world
        weights = None if plan.weights is None else shard_indices(plan.weights, rank, world, drop_last=drop_last)
        return EpochPlan(shard_indices(plan.indices, rank, world, drop_last=drop_last), weights)

    def topk_indices(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        """int64 [k] ascending: the exact top-k of `keys` (float32 [num_samples], one per sample). In one
        process `aql_kernels.topk_indices(keys, k)`; across ranks each rank contributes the entries of
        the samples it owns (`SampleOwnership.topk_indices`: i % R == rank) and all get the same k."""
        if self.sharding is None:
            return aql_kernels.topk_indices(keys, k)
        return self.sharding.topk_indices(keys, k)

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, context: StrategyContext) -> SelectionStrategy:
        """Builds the strategy from an `aql.config.Config` (its `aql_v2` section) and the context; the
        `aql_v2.strategy_options` mapping goes to the constructor as keyword arguments."""
        return cls(context.num_samples, query_budget=config.aql_v2.query_budget, seed=config.seed, device=context.device,
                   **config.aql_v2.strategy_options)

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raises `aql.config.ConfigError` naming `aql_v2.strategy_options.<key>` for a key that is no
        keyword argument of the constructor or that `from_config` fills itself (`config_arguments`).
        `aql.config.load_config` calls it, so a bad option fails when the config loads."""
        from aql.config import ConfigError

        parameters = inspect.signature(cls.__init__).parameters
        open_ended = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
        allowed = [name for name, p in parameters.items() if name != "self" and name not in cls.config_arguments
                   and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
        for key in options:
            if key in cls.config_arguments:
                raise ConfigError(f"aql_v2.strategy_options.{key}: strategy {cls.name!r} takes {key} from "
                                  f"{cls.config_arguments[key]}; set it there")
            if key not in allowed and not open_ended:
                raise ConfigError(f"aql_v2.strategy_options.{key}: not an option of strategy {cls.name!r} "
                                  f"({cls.__name__}); its options: {', '.join(allowed) or 'none'}")


def split_selection(selection) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`select()`'s result as (positions, weights or None)."""
    if isinstance(selection, tuple):
        return selection[0], selection[1]
    return selection, None


STRATEGIES: dict[str, type[SelectionStrategy]] = {}


def register_strategy(cls: type[SelectionStrategy]) -> type[SelectionStrategy]:
    """Class decorator: makes `cls` available as `aql_v2.selection_strategy: <cls.name>`."""
    if not cls.name:
        raise ValueError(f"aql.strategies.register_strategy: {cls.__name__}.name must be a non-empty string")
    if cls.name in STRATEGIES and STRATEGIES[cls.name] is not cls:
        raise ValueError(f"aql.strategies.register_strategy: the name {cls.name!r} is taken by {STRATEGIES[cls.name].__name__}")
    STRATEGIES[cls.name] = cls
    return cls


def build_strategy(name: str, config, context: StrategyContext) -> SelectionStrategy:
    if name not in STRATEGIES:
        raise ValueError(f"aql.strategies.build_strategy: unknown strategy {name!r}; registered: {sorted(STRATEGIES)}")
    return STRATEGIES[name].from_config(config, context)
