"""A per-sample score table and the between-epoch subset it selects.

The training forward already produces per-sample scores (`aql_kernels.cross_entropy_with_scores`
returns the loss, EL2N, entropy, ... of every sample of the batch), so the table is filled for free:
`update(indices, scores)` writes them at their dataset indices without a host synchronisation.
Between epochs `next_subset()` picks what to train on next: the exact top of the stored scores
(`aql_kernels.topk_indices`) plus a uniformly random exploration share of the rest, with importance
weights for the explored part.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

import aql_kernels
from aql._checks import check_bool, check_int, check_interval, check_number, check_tensor, round_half_up

__all__ = ["ScoreStore", "SelectedSubset"]

_TENSOR = torch.Tensor
_INT64, _FLOAT32 = torch.int64, torch.float32


class SelectedSubset(NamedTuple):
    """The samples to train on next: dataset `indices` (int64, ascending) and a float32 importance
    weight for each (1 for the deterministic top part, rest_size / n_explore for explored ones)."""

    indices: torch.Tensor
    weights: torch.Tensor


class ScoreStore:
    """A float32 score per dataset sample, and the subset of ``query_budget * N`` samples it selects.

    ``next_subset()`` returns ``k = floor(query_budget * N + 1/2)`` (at least 1) indices:

    * the top part: ``n_top = k - n_explore`` indices, the exact top of the stored scores
      (``aql_kernels.topk_indices``: NaN ranks lowest, ties go to the lowest index), weight 1; with
      ``smallest=True`` the exact bottom instead, for scores where low means informative (margin,
      maxprob; ties still to the lowest index);
    * the explored part: ``n_explore = floor(exploration * k + 1/2)`` indices drawn uniformly without
      replacement from the ``rest = N - n_top`` others, weight ``rest / n_explore`` (the inverse of a
      rest sample's inclusion probability), so that ``sum(weights * x)`` over the subset estimates the
      sum of ``x`` over the whole data set without bias for the explored part.

    The weights are for estimating full-data sums from the subset. Training on the subset should
    usually ignore them (the trainer does unless ``aql_v2.importance_weights`` is set): at budget 0.2
    and exploration 0.1 an explored sample weighs ~41, so a few explored samples dominate a weighted
    mean loss, and a gradient that estimates the full-data one undoes the emphasis on the top part.

    A NaN score (e.g. from a diverged batch) is not kept: the sample is marked never-seen again and gets
    ``unseen_score``, so it is re-scored rather than excluded forever (NaN ranks lowest in the top-k).

    Never-seen samples hold ``unseen_score`` (+inf by default, -inf with ``smallest=True``) and so fill
    the top part first; while
    never-seen samples remain outside the top part, the explored slots also go to never-seen samples
    (uniformly among them) before seen ones. Every epoch therefore visits ``k`` new samples until all
    have been seen: over the first ``ceil(N / k)`` (= ``1 / query_budget``) epochs each sample is
    visited once. During that coverage phase the explored weights keep the formula above, which then
    is the weight of a uniform draw rather than an exact inverse probability.

    ``update(indices, scores)`` writes scores (float32, e.g. the per-sample loss or EL2N from the
    training forward) without a host synchronisation; an index outside ``[0, N)`` raises from torch's
    own bounds check (an IndexError on CPU, a device-side assertion on CUDA). Repeated indices in one
    call leave one of their values (which one is unspecified on CUDA). Keep the store on the device of
    the scores: tensors from another device are copied with ``non_blocking=True``.

    Any budget in (0, 1] is honoured exactly, 20% included (a loss-below-the-mean pruning rule such
    as InfoBatch's keeps at least the samples above the mean and so cannot go that low).

    ``state_dict()`` holds the table, the seen flags, the epoch counter and the random generator's
    state, so a resumed run selects exactly the subsets an uninterrupted run would have.

    Under torch.distributed (``attach_sharding``) the table is sharded: rank r keeps the rows of the
    samples it owns (`aql.distributed.SampleOwnership`: i mod R == r, ~N / R rows), and ``scores`` /
    ``seen`` are those rows (sample ``r + j R`` at row j). ``update`` queues every write
    (`aql.distributed.RoutedWrites`, no op per step); the writes reach their owners when the table is
    next read (``flush``, ``scores``, ``seen``, ``next_subset``: collectives that every rank calls
    together), the latest write of a sample winning as in one process. ``next_subset`` then selects
    both parts across ranks from the owned rows (`SampleOwnership.topk_owned`: digit histograms
    all-reduced, the selected indices shared), so every rank gets the subset that one store holding
    all writes would select; the exploration keys are drawn for all N samples from the generator (the
    same on every rank, as in one process) and each rank keeps its rows' (a transient [N] float32).
    ``state_dict`` holds the rank's rows and its pending writes (no collective).
    """

    #: the `aql.distributed.SampleOwnership` of this rank (``attach_sharding``); None in one process
    sharding = None
    _routed = None  # the `aql.distributed.RoutedWrites` of the sharded store

    def __init__(self, num_samples: int, *, query_budget: float = 0.2, exploration: float = 0.1,
                 device: str | torch.device = "cpu", seed: int = 0, unseen_score: float | None = None,
                 smallest: bool = False):
        where = "selection.ScoreStore"
        self.smallest = check_bool(where, "smallest", smallest)
        if unseen_score is None:
            unseen_score = -math.inf if self.smallest else math.inf
        self.num_samples = check_int(where, "num_samples", num_samples, low=1)
        self.query_budget = check_interval(where, "query_budget", query_budget, 0.0, 1.0, low_open=True, high_open=False)
        self.exploration = check_interval(where, "exploration", exploration, 0.0, 1.0, low_open=False, high_open=True)
        self.seed = check_int(where, "seed", seed, low=0)
        self.unseen_score = check_number(where, "unseen_score", unseen_score)
        if math.isnan(self.unseen_score):
            raise ValueError(f"aql.{where}: unseen_score must not be NaN (NaN ranks below every score, so never-seen "
                             "samples would never be selected, and NaN marks a score to redo); got nan")
        try:
            self.device = torch.device(device)
        except (TypeError, RuntimeError) as error:
            raise ValueError(f"aql.selection.ScoreStore: device must name a torch device, got {device!r} ({error})") from None

        self.num_selected = max(1, round_half_up(self.query_budget * self.num_samples))
        self.num_explore = round_half_up(self.exploration * self.num_selected)
        self.num_top = self.num_selected - self.num_explore
        self._explore_weight = (self.num_samples - self.num_top) / self.num_explore if self.num_explore else 1.0

        # The table as written: NaN where no score is kept (never written, or a NaN score written). One
        # scatter per write; `_scores` (NaN -> unseen_score) and `_seen` (not NaN) are derived from it
        # when the table is next read, i.e. once per epoch rather than four more ops per write.
        self._written = torch.full((self.num_samples,), math.nan, dtype=torch.float32, device=self.device)
        self._scores = torch.full((self.num_samples,), self.unseen_score, dtype=torch.float32, device=self.device)
        self._seen = torch.zeros(self.num_samples, dtype=torch.bool, device=self.device)
        self._stale = False  # `_written` changed since `_scores` and `_seen` were derived
        self._on_cpu = self.device.type == "cpu"  # update's device check: one attribute per tensor
        self._deferred: list[tuple[torch.Tensor, torch.Tensor]] = []  # update(..., deferred=True) pairs not yet scattered
        self._deferred_rows = 0
        self._deferred_distinct = True  # no index occurs in two of the pending calls
        self.epoch = 0
        self._generator = torch.Generator(device=self.device)
        self._generator.manual_seed(self.seed)

    # -- writing ------------------------------------------------------------------------------------

    @property
    def scores(self) -> torch.Tensor:
        """float32 [N]: the stored score of every sample (``unseen_score`` where none was written). The
        store's own tensor, brought up to date by each read: read it again after `update`s. Sharded:
        this rank's rows only (sample r + j R at row j), and the read is a collective (`flush`)."""
        self.flush()
        return self._scores

    @property
    def seen(self) -> torch.Tensor:
        """bool [N]: whether a score was ever written for the sample (sharded: this rank's rows, as `scores`)."""
        self.flush()
        return self._seen

    def update(self, indices: torch.Tensor, scores: torch.Tensor, *, deferred: bool = False, distinct: bool = False) -> None:
        """Store ``scores[i]`` as the score of dataset sample ``indices[i]`` (no host synchronisation).

        ``deferred=True`` is the per-step fast path of a training loop: no argument checks, and the
        pair is kept by reference and scattered with the other deferred pairs when the table is next
        read (`scores`, `seen`, `next_subset`, `state_dict`) or `flush()`ed, i.e. once per epoch instead
        of twice per step (in the demo's training loop on the 2-core CI-class CPU the two scatters per
        step took ~20 us; ~2.8 us when timed back to back: the step in between evicts them from cache).
        The caller guarantees int64 ``[B]`` indices and float32 ``[B]`` scores on the store's device,
        neither modified in place afterwards (a loop's are slices of the epoch's fixed order and fresh
        loss outputs). At most ~``num_samples`` rows wait; beyond that the table is written at once.
        A sample written several times keeps its last value, deferred or not.

        ``distinct=True`` (with ``deferred``): the caller guarantees that none of these indices was
        written by another deferred call since the table was last written back (the batches of one
        epoch's subset), so the write-back needs no pass that resolves repeated indices (4 ops instead
        of 9 per write-back).

        Without ``deferred`` the arguments are checked, and the common case (plain int64 indices and
        float32 scores on the store's device) costs one ``index_copy_`` plus ~1 us of checks: the
        ``scores`` / ``seen`` views are derived from the written table when next read.
        """
        if self._routed is not None:
            self._queue(indices, scores, deferred)
            return
        if deferred:
            self._deferred_distinct = self._deferred_distinct and distinct
            self._deferred.append((indices, scores.detach()))
            self._deferred_rows += indices.shape[0]
            if self._deferred_rows > self.num_samples:
                self.flush()
            return
        if (type(indices) is _TENSOR and type(scores) is _TENSOR and indices.dtype is _INT64 and scores.dtype is _FLOAT32
                and indices.dim() == 1 and scores.dim() == 1 and indices.numel() == scores.numel()
                and (indices.is_cpu and scores.is_cpu if self._on_cpu
                     else indices.device == self.device and scores.device == self.device)):
            if self._deferred:
                self.flush()  # earlier deferred writes first: the later value of a sample wins
            self._written.index_copy_(0, indices, scores.detach() if scores.requires_grad else scores)  # as _write
            self._stale = True
            return
        indices, scores = self._checked(indices, scores)
        self.flush()  # earlier deferred writes first: the later value of a sample wins
        self._write(indices, scores)

    def _checked(self, indices: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`update`'s arguments checked, as int64 indices and float32 scores on the store's device: int32
        indices and half-precision scores (a bf16 training forward) are widened, not refused."""
        where = "selection.ScoreStore.update"
        check_tensor(where, "indices", indices, ndim=1, dtypes=(torch.int64, torch.int32))
        check_tensor(where, "scores", scores, ndim=1, dtypes=(torch.float32, torch.bfloat16, torch.float16))
        if indices.shape[0] != scores.shape[0]:
            raise ValueError(f"aql.{where}: indices and scores must have the same length, "
                             f"got {indices.shape[0]} and {scores.shape[0]}")
        return (indices.to(self.device, torch.int64, non_blocking=True),
                scores.detach().to(self.device, torch.float32, non_blocking=True))

    def _queue(self, indices: torch.Tensor, scores: torch.Tensor, deferred: bool) -> None:
        """The sharded store's write: queued for the owners (checked unless `deferred`)."""
        if not deferred:
            indices, scores = self._checked(indices, scores)
        self._routed.append(indices, scores.detach())

    def _write(self, indices: torch.Tensor, scores: torch.Tensor) -> None:
        """Scatter into the written table (a NaN score there makes its sample never-seen again)."""
        self._written.index_copy_(0, indices, scores)
        self._stale = True

    def _derive(self) -> None:
        """`_scores` and `_seen` from the written table: NaN (no score kept) -> unseen_score, not seen."""
        if self._stale:
            torch.eq(self._written, self._written, out=self._seen)  # not NaN
            unseen = torch.tensor(self.unseen_score, dtype=torch.float32, device=self.device)
            torch.where(self._seen, self._written, unseen, out=self._scores)
            self._stale = False

    def flush(self) -> None:
        """Writes the deferred updates (``update(..., deferred=True)``) into the table and brings the
        ``scores`` / ``seen`` views up to date; a no-op when nothing waits. Reading the table does it
        too; a loop calls it to do the work at a time it chooses (e.g. inside its timed selection work
        rather than inside a checkpoint). Sharded: the exchange of the queued writes, a collective."""
        if self._routed is not None:
            from aql.distributed import float_column

            rows, payload = self._routed.exchange()
            self._write(rows, float_column(payload[:, 0]))
            self._derive()
            return
        if not self._deferred:
            self._derive()
            return
        deferred, self._deferred, self._deferred_rows = self._deferred, [], 0
        distinct, self._deferred_distinct = self._deferred_distinct, True
        if len(deferred) == 1:
            indices, scores = deferred[0]
        elif distinct:
            indices = torch.cat([pair[0] for pair in deferred])
            scores = torch.cat([pair[1] for pair in deferred])
        else:
            indices = torch.cat([pair[0] for pair in deferred])
            scores = torch.cat([pair[1] for pair in deferred])
            # A sample written by several deferred calls keeps its last value: every occurrence writes
            # the value at the sample's last position, so the scatter's order does not matter.
            positions = torch.arange(indices.shape[0], device=indices.device)
            last = torch.full((self.num_samples,), -1, dtype=torch.int64, device=indices.device)
            last.scatter_reduce_(0, indices, positions, reduce="amax")
            scores = scores.gather(0, last.gather(0, indices))
        self._write(indices, scores)
        self._derive()

    # -- selecting ----------------------------------------------------------------------------------

    def next_subset(self) -> SelectedSubset:
        """The subset for the next epoch (see the class docstring); advances the random generator."""
        self.flush()
        if self.sharding is not None:
            return self._next_subset_sharded()
        # the bottom of the scores is the top of their negation (-(-inf) = inf: never-seen first; -0.0 and
        # +0.0 stay equal, so ties still go to the lowest index)
        top = self._topk_indices(self._scores.neg() if self.smallest else self._scores, self.num_top)
        if self.num_explore:
            # Uniform keys in [0, 1) for seen samples and [2, 3) for never-seen ones; the top part gets
            # -1. The n_explore largest keys are then a uniform sample of the never-seen rest, topped up
            # with a uniform sample of the seen rest (exact: topk of i.i.d. keys is a uniform subset).
            keys = torch.rand(self.num_samples, generator=self._generator, device=self.device)
            keys = keys + 2.0 * (~self._seen).to(keys.dtype)
            keys.index_fill_(0, top, -1.0)
            explore = self._topk_indices(keys, self.num_explore)
            indices = torch.cat([top, explore])
            weights = torch.cat([
                torch.ones(self.num_top, dtype=torch.float32, device=self.device),
                torch.full((self.num_explore,), self._explore_weight, dtype=torch.float32, device=self.device),
            ])
            indices, order = torch.sort(indices)
            weights = weights[order]
        else:
            indices = top
            weights = torch.ones(self.num_top, dtype=torch.float32, device=self.device)
        self.epoch += 1
        return SelectedSubset(indices, weights)

    def _next_subset_sharded(self) -> SelectedSubset:
        """`next_subset` across ranks on the owned rows (the table flushed): the same subset."""
        owner = self.sharding
        top = owner.topk_owned(self._scores.neg() if self.smallest else self._scores, self.num_top)
        indices, weights = top, torch.ones(self.num_top, dtype=torch.float32, device=self.device)
        if self.num_explore:
            keys = torch.rand(self.num_samples, generator=self._generator, device=self.device)[owner.rank::owner.world]
            keys = keys + 2.0 * (~self._seen).to(keys.dtype)
            keys.index_fill_(0, owner.local_rows(top[owner.owns(top)]), -1.0)
            explore = owner.topk_owned(keys, self.num_explore)
            weights = torch.cat([weights, torch.full((self.num_explore,), self._explore_weight, dtype=torch.float32,
                                                     device=self.device)])
            indices, order = torch.sort(torch.cat([top, explore]))
            weights = weights[order]
        self.epoch += 1
        return SelectedSubset(indices, weights)

    def attach_sharding(self, ownership) -> None:
        """Shards the table from now on: `ownership` (an `aql.distributed.SampleOwnership` of
        `num_samples` samples) says which rows this rank keeps; the rows written so far are kept for
        the owned samples (see the class docstring)."""
        from aql.distributed import RoutedWrites, SampleOwnership

        if not isinstance(ownership, SampleOwnership) or ownership.num_samples != self.num_samples:
            raise ValueError(f"aql.selection.ScoreStore.attach_sharding: ownership must be an aql.distributed.SampleOwnership "
                             f"of {self.num_samples} samples, got {type(ownership).__name__} of "
                             f"{getattr(ownership, 'num_samples', None)}")
        self.flush()
        rows = slice(ownership.rank, None, ownership.world)
        self._written = self._written[rows].clone()
        self._scores = self._scores[rows].clone()
        self._seen = self._seen[rows].clone()
        self._routed = RoutedWrites(ownership, 1)
        self.sharding = ownership

    def _topk_indices(self, keys: torch.Tensor, k: int) -> torch.Tensor:
        return aql_kernels.topk_indices(keys, k)

    # -- persistence --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        if self.sharding is not None:  # this rank's rows and its queued writes: no collective
            self._derive()
            return {**self._settings(), "scores": self._scores.clone(), "seen": self._seen.clone(),
                    "sharding": {"rank": self.sharding.rank, "world": self.sharding.world},
                    "pending": self._routed.state_dict()}
        return {
            "num_samples": self.num_samples,
            "query_budget": self.query_budget,
            "exploration": self.exploration,
            "seed": self.seed,
            "unseen_score": self.unseen_score,
            "smallest": self.smallest,
            "epoch": self.epoch,
            "scores": self.scores.clone(),
            "seen": self.seen.clone(),
            "generator": self._generator.get_state(),
        }

    def _settings(self) -> dict:
        return {"num_samples": self.num_samples, "query_budget": self.query_budget, "exploration": self.exploration,
                "seed": self.seed, "unseen_score": self.unseen_score, "smallest": self.smallest, "epoch": self.epoch,
                "generator": self._generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        where = "selection.ScoreStore.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"aql.{where}: state must be a dict, got {type(state).__name__}")
        missing = {"num_samples", "query_budget", "exploration", "epoch", "scores", "seen", "generator"} - state.keys()
        if missing:
            raise ValueError(f"aql.{where}: state lacks keys {sorted(missing)}")
        for key in ("num_samples", "query_budget", "exploration", "smallest"):
            if state.get(key, False) != getattr(self, key):
                raise ValueError(f"aql.{where}: {key} must match this store's {getattr(self, key)!r}, "
                                 f"got {state[key]!r}")
        check_tensor(where, "state['scores']", state["scores"], ndim=1, dtypes=(torch.float32,))
        check_tensor(where, "state['seen']", state["seen"], ndim=1, dtypes=(torch.bool,))
        sharded = None if self.sharding is None else {"rank": self.sharding.rank, "world": self.sharding.world}
        if state.get("sharding") != sharded:
            raise ValueError(f"aql.{where}: the state was written by {state.get('sharding') or 'one process'}, this store is "
                             f"{sharded or 'one process'} (resume with the same number of ranks)")
        rows = self.num_samples if sharded is None else self.sharding.num_owned
        if state["scores"].shape[0] != rows or state["seen"].shape[0] != rows:
            raise ValueError(f"aql.{where}: state['scores'] and state['seen'] must have length "
                             f"{rows}, got {state['scores'].shape[0]} and {state['seen'].shape[0]}")
        if sharded is not None:
            self._routed.load_state_dict(state["pending"])
        self._deferred, self._deferred_rows, self._deferred_distinct = [], 0, True  # the loaded table replaces them
        self.epoch = int(state["epoch"])
        self.seed = int(state.get("seed", self.seed))
        self.unseen_score = float(state.get("unseen_score", self.unseen_score))
        # a seen sample keeps its score; the others (and a NaN of a table saved before NaN scores were
        # re-scored) hold no score: unseen_score, never-seen
        kept = state["seen"].to(self.device) & ~torch.isnan(state["scores"].to(self.device))
        self._written.copy_(state["scores"]).masked_fill_(~kept, math.nan)
        self._stale = True
        self._derive()
        self._generator.set_state(state["generator"])
