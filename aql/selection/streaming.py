"""Streaming selection in bounded memory: keep ~query_budget of a stream of batches.

The design document's filter keeps a growing buffer of data and recomputes a percentile over it.
Here nothing of the data is kept: the running threshold comes from an exponentially decayed
histogram of recent scores (fixed size, whatever the length of the stream), and each batch's
decision is refined exactly with `aql_kernels.topk_mask`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

import aql_kernels

from aql._checks import check_int, check_interval, check_tensor

__all__ = ["StreamingAQL", "StreamingBatch", "StreamingDecision"]

# Histogram bins: the top 16 bits of the order-preserving 32-bit key of a float32 score. Within one
# binade that is 2**7 bins, i.e. a relative bin width below 1%, and the range needs no adapting: any
# float32 from -inf to +inf has its bin. 65536 float64 counts = 512 KiB, allocated once.
_KEY_SHIFT = 16
_NUM_BINS = 1 << (32 - _KEY_SHIFT)
_BIN_OFFSET = _NUM_BINS // 2
# The kernels' key (aql_kernels.order_keys, an unsigned 32-bit order as int64) shifted by 2**31 so
# that the bins are signed around zero. NaN is mapped to -inf first: it shares -inf's bin (the kernels'
# own key puts NaN one below -inf; both rank below every score).
_KEY_OFFSET = 1 << 31
_KEY_NEG_INF, _KEY_POS_INF = (int(k) - _KEY_OFFSET for k in aql_kernels.order_keys(torch.tensor([-math.inf, math.inf])))


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """int64 keys with key(a) < key(b) <=> a < b for float32 scores; -0.0 counts as +0.0 and NaN as
    -inf (NaN ranks lowest, as in aql_kernels.topk_mask)."""
    x = torch.where(torch.isnan(scores), torch.full_like(scores, -math.inf), scores)
    return aql_kernels.order_keys(x) - _KEY_OFFSET


def _key_to_float(key: torch.Tensor) -> torch.Tensor:
    return aql_kernels.key_to_float(key.to(torch.int64) + _KEY_OFFSET)


class StreamingBatch(NamedTuple):
    """What `StreamingAQL.process_batch` kept of one batch.

    data, targets: the kept rows of the input (in input order); weights: float32 per kept row
    (1 / running keep rate, or ones with weighting=False); mask: bool over the input rows;
    threshold: 0-dim float32, the running threshold this batch was compared with; seen, kept: totals
    over the stream so far (Python ints, this batch included)."""

    data: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    threshold: torch.Tensor
    seen: int
    kept: int


class StreamingDecision(NamedTuple):
    """What `StreamingAQL.keep` decided for one batch of scores: positions (int64, ascending) of the
    kept samples, their float32 weights (as `StreamingBatch.weights`), the bool mask over the batch and
    the 0-dim running threshold it was compared with."""

    positions: torch.Tensor
    weights: torch.Tensor
    mask: torch.Tensor
    threshold: torch.Tensor


class StreamingAQL:
    """Keep the ~``query_budget`` most uncertain samples of a stream, in constant memory.

    Running threshold. Each score goes into a histogram of 65536 bins over the order-preserving
    32-bit keys of float32 (the top 16 bits of the key; no range to adapt), weighted so that every
    sample decays by ``d = 1 - 1/buffer_size`` per sample that arrives after it: a batch of B scores
    multiplies the histogram by ``d**B`` and adds sample i (0-based, in batch order) with weight
    ``d**(B-1-i)`` (carried out lazily, without touching every bin per batch: `_add_to_histogram`).
    The effective window is therefore ~``buffer_size`` samples. The histogram (512 KiB, allocated
    once) and a few scalars are all the state: nothing grows with the stream. The current batch
    is added before its threshold is read, so the first batch already has one. The running threshold
    ``tau`` is the ``(1 - query_budget)`` quantile of the histogram: the bin in which the mass counted
    from the top reaches ``query_budget * total`` and, inside that bin, linear interpolation in key
    space (the bin's mass taken as spread evenly over its keys).

    Per-batch exact refinement. With ``k_min = floor(q B (1 - t))`` and ``k_max = ceil(q B (1 + t))``
    (``q = query_budget``, ``t = batch_tolerance``, clipped to [0, B]) the batch keeps

        keep = topk_mask(scores, k_min) | (topk_mask(scores, k_max) & (scores >= tau))

    i.e. exactly the samples at or above the running threshold when their count lies in
    ``[k_min, k_max]``, else the exact top ``k_min`` or top ``k_max`` of the batch (both masks are
    prefixes of one stable descending order, so the result is too). ``batch_tolerance=0`` keeps
    ``floor``/``ceil`` of ``q B`` in every batch; larger values let a batch richer (or poorer) in
    uncertain samples than the recent stream keep more (or fewer). NaN scores never pass ``tau``.

    Budget feedback (``budget_feedback=True``, the default). A running threshold lags a stream that
    drifts: while a model trains, its losses fall, so the threshold of the recent window is too high
    for the current batch and the clip ``k_min`` binds batch after batch (in the trainer on MNIST-1D:
    ~15% kept at a 20% budget, i.e. ``q (1 - t)``). With ``debt = q * seen - kept`` (the totals before
    this batch), a positive debt raises ``k_min`` by ``round(debt)`` and a negative one lowers ``k_max``
    by ``round(-debt)`` (each staying within ``[k_min, k_max]`` of the plain rule). On a steady
    drift the debt settles at ``q B t`` after one batch and the long-run kept fraction is ``q``; on a
    stationary stream the threshold alone already keeps ~``q`` and the debt stays within a few samples.

    Weights. The running keep rate ``r = kept / seen`` is kept with the same per-sample decay, this
    batch included; every kept sample gets weight ``1 / r`` (``weighting=True``), the inverse of the
    estimated probability that a sample of the stream is kept: a kept sample stands for ``1 / r``
    samples of the stream, so ``sum(weights * loss)`` over the kept rows is on the scale of the sum
    over the whole batch. Selection is deterministic given the scores, so this is a rescaling, not an
    unbiased estimate of the stream's mean loss (ScoreStore's random exploration share is where an
    unbiased estimate comes from). ``seed`` is recorded for the interface and the state but draws
    nothing.

    Host synchronisation: one per batch, the compaction of data/targets/weights by the mask (the kept
    batch has a data-dependent size); everything else stays on the scores' device.
    """

    def __init__(self, model, uncertainty_estimator, query_budget: float = 0.2, buffer_size: int = 10000, *,
                 weighting: bool = True, seed: int = 0, batch_tolerance: float = 0.25, budget_feedback: bool = True):
        where = "selection.StreamingAQL"
        self.model = model
        self.uncertainty = uncertainty_estimator
        self.query_budget = check_interval(where, "query_budget", query_budget, 0.0, 1.0, low_open=True, high_open=False)
        self.buffer_size = check_int(where, "buffer_size", buffer_size, low=1)
        if not isinstance(weighting, bool):
            raise TypeError(f"aql.{where}: weighting must be a bool, got {type(weighting).__name__} {weighting!r}")
        self.weighting = weighting
        if not isinstance(budget_feedback, bool):
            raise TypeError(f"aql.{where}: budget_feedback must be a bool, got {type(budget_feedback).__name__} "
                            f"{budget_feedback!r}")
        self.budget_feedback = budget_feedback
        self.seed = check_int(where, "seed", seed, low=0)
        self.batch_tolerance = check_interval(where, "batch_tolerance", batch_tolerance, 0.0, math.inf,
                                               low_open=False, high_open=True)
        self.decay = 1.0 - 1.0 / self.buffer_size
        self.seen = 0
        self.kept = 0
        self._device = torch.device("cpu")
        self._histogram = torch.zeros(_NUM_BINS, dtype=torch.float64)
        self._lazy_count = 0  # the histogram holds d**-_lazy_count times the decayed counts
        self._seen_mass = torch.zeros((), dtype=torch.float64)
        self._kept_mass = torch.zeros((), dtype=torch.float64)

    # -- the decayed histogram ----------------------------------------------------------------------

    def _to_device(self, device: torch.device) -> None:
        if device != self._device:
            self._histogram = self._histogram.to(device)
            self._seen_mass = self._seen_mass.to(device)
            self._kept_mass = self._kept_mass.to(device)
            self._device = device

    def _sample_weights(self, batch_size: int, device: torch.device) -> torch.Tensor:
        # d**(B-1-i): the decay each sample of the batch has undergone by the end of the batch.
        exponents = torch.arange(batch_size - 1, -1, -1, dtype=torch.float64, device=device)
        return torch.pow(self.decay, exponents)

    def _add_to_histogram(self, keys: torch.Tensor, sample_weights: torch.Tensor) -> None:
        # Lazy decay: the histogram is stored in units of d**-n (n = samples since it was last
        # rescaled), so a batch adds its samples with weights d**-(n+1+i) instead of multiplying all
        # 65536 bins by d**B; the bins are rescaled once the factor nears 1e100 (every ~230 windows).
        # Only ratios of bins are read, so the unit never shows. Same values as the eager update up
        # to float64 rounding. On the shared 2-core CI CPU the eager multiply plus flipped cumsum
        # took 0.7-1.4 ms per batch, the cumsum alone 0.07-0.08 ms.
        batch_size = keys.shape[0]
        bins = (keys >> _KEY_SHIFT) + _BIN_OFFSET
        log_growth = -math.log(self.decay) if self.decay > 0 else math.inf
        if (self._lazy_count + batch_size) * log_growth > 230.0:
            if self._lazy_count:
                self._histogram.mul_(self.decay ** self._lazy_count)
                self._lazy_count = 0
            if batch_size * log_growth > 230.0:  # a batch longer than ~230 windows: decay eagerly
                self._histogram.mul_(self.decay ** batch_size).index_add_(0, bins, sample_weights)
                return
        exponents = torch.arange(self._lazy_count + 1, self._lazy_count + batch_size + 1, dtype=torch.float64,
                                 device=keys.device)
        self._histogram.index_add_(0, bins, torch.pow(1.0 / self.decay, exponents))
        self._lazy_count += batch_size

    def _running_threshold(self, keys: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
        self._add_to_histogram(keys, sample_weights)
        # Ascending cumulative mass c; the mass at or above bin b is total - c[b-1]. The threshold bin
        # is the highest b whose mass at or above reaches q * total, i.e. the number of c[j] <= total - q * total.
        cumulative = torch.cumsum(self._histogram, dim=0)
        total = cumulative[-1:]
        target = self.query_budget * total
        bin_index = torch.searchsorted(cumulative, total - target, right=True).clamp_(max=_NUM_BINS - 1)
        mass_in_bin = self._histogram.gather(0, bin_index)
        mass_above = total - cumulative.gather(0, bin_index)
        fraction = ((target - mass_above) / mass_in_bin.clamp_min(1e-300)).clamp_(0.0, 1.0)
        bin_top_key = ((bin_index - _BIN_OFFSET) << _KEY_SHIFT) + (1 << _KEY_SHIFT)  # one past the bin
        key = bin_top_key.to(torch.float64) - fraction * float(1 << _KEY_SHIFT)
        key = torch.floor(key).to(torch.int64).clamp_(_KEY_NEG_INF, _KEY_POS_INF)
        return _key_to_float(key).reshape(())

    # -- the public step ----------------------------------------------------------------------------

    def _decide(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keep mask, running threshold and the kept samples' weight for one batch; updates the
        running state; no host synchronisation."""
        batch_size = scores.shape[0]
        device = scores.device
        self._to_device(device)

        sample_weights = self._sample_weights(batch_size, device)
        keys = _order_keys(scores)
        threshold = self._running_threshold(keys, sample_weights)

        expected = self.query_budget * batch_size
        k_min = max(0, int(math.floor(expected * (1.0 - self.batch_tolerance) + 1e-9)))
        k_max = min(batch_size, int(math.ceil(expected * (1.0 + self.batch_tolerance) - 1e-9)))
        k_min, k_max = self._feedback_bounds(k_min, k_max)
        keep = aql_kernels.topk_mask(scores, k_min) | (aql_kernels.topk_mask(scores, k_max) & (scores >= threshold))

        batch_decay = self.decay ** batch_size
        self._seen_mass.mul_(batch_decay).add_(sample_weights.sum())
        self._kept_mass.mul_(batch_decay).add_((sample_weights * keep).sum())
        if self.weighting:
            rate = self._kept_mass / self._seen_mass
            weight = torch.where(rate > 0, 1.0 / rate, torch.ones_like(rate)).to(torch.float32)
        else:
            weight = torch.ones((), dtype=torch.float32, device=device)

        return keep, threshold, weight

    def _feedback_bounds(self, k_min: int, k_max: int) -> tuple[int, int]:
        """(k_min, k_max) of this batch after the budget feedback (see the class docstring)."""
        if not self.budget_feedback:
            return k_min, k_max
        debt = self.query_budget * self.seen - self.kept  # Python numbers: no synchronisation
        correction = int(math.floor(abs(debt) + 0.5))
        if debt > 0:
            return min(k_max, k_min + correction), k_max
        return k_min, max(k_min, k_max - correction)

    def keep(self, scores: torch.Tensor) -> StreamingDecision:
        """Decide which of one batch's samples to keep from their float32 ``[B]`` scores alone (see the
        class docstring for the rule): the form a loop uses when it keeps dataset indices rather than
        the data (`aql.strategies.StreamingStrategy`). Updates the running state like
        `process_batch`; one host synchronisation (the kept count)."""
        where = "selection.StreamingAQL.keep"
        check_tensor(where, "scores", scores, ndim=1, dtypes=(torch.float32,))
        if scores.shape[0] == 0:
            raise ValueError(f"aql.{where}: scores must hold a batch of B >= 1 scores, got shape {tuple(scores.shape)}")
        return self._keep(scores.detach())

    def _keep(self, scores: torch.Tensor) -> StreamingDecision:
        keep, threshold, weight = self._decide(scores)
        positions = keep.nonzero().squeeze(1)  # the one host synchronisation: the kept batch's size
        kept_count = positions.shape[0]
        self.seen += scores.shape[0]
        self.kept += kept_count
        return StreamingDecision(positions, weight.expand(kept_count).clone(), keep, threshold)

    def process_batch(self, data: torch.Tensor, targets: torch.Tensor, scores: torch.Tensor | None = None) -> StreamingBatch:
        """Decide which samples of one batch to keep (see the class docstring for the rule).

        ``scores``: float32 ``[B]`` uncertainty scores the caller already has (e.g. from the training
        forward); when None the estimator's ``estimate_uncertainty(data)`` provides them.
        """
        where = "selection.StreamingAQL.process_batch"
        check_tensor(where, "data", data)
        check_tensor(where, "targets", targets)
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(f"aql.{where}: data must hold a batch of B >= 1 samples along dim 0, "
                             f"got shape {tuple(data.shape)}")
        batch_size = data.shape[0]
        if targets.dim() == 0 or targets.shape[0] != batch_size:
            raise ValueError(f"aql.{where}: targets must have B={batch_size} rows like data, "
                             f"got shape {tuple(targets.shape)}")
        if scores is None:
            if self.uncertainty is None or not callable(getattr(self.uncertainty, "estimate_uncertainty", None)):
                raise ValueError(f"aql.{where}: scores is None and this StreamingAQL has no uncertainty_estimator with "
                                 f"estimate_uncertainty (got {type(self.uncertainty).__name__}); pass scores=, or construct it "
                                 "with an estimator")
            with torch.no_grad():
                scores = self.uncertainty.estimate_uncertainty(data)
            name = "uncertainty_estimator.estimate_uncertainty(data)"
        else:
            name = "scores"
        check_tensor(where, name, scores, ndim=1, dtypes=(torch.float32,))
        if scores.shape[0] != batch_size:
            raise ValueError(f"aql.{where}: {name} must have length B={batch_size}, got {scores.shape[0]}")
        decision = self._keep(scores.detach())
        kept_rows = decision.positions
        return StreamingBatch(
            data=data.index_select(0, kept_rows.to(data.device)),
            targets=targets.index_select(0, kept_rows.to(targets.device)),
            weights=decision.weights,
            mask=decision.mask,
            threshold=decision.threshold,
            seen=self.seen,
            kept=self.kept,
        )

    @property
    def keep_rate(self) -> torch.Tensor:
        """The decayed running keep rate (0-dim float64 tensor; 0 before the first batch)."""
        return torch.where(self._seen_mass > 0, self._kept_mass / self._seen_mass.clamp_min(1e-300),
                           torch.zeros_like(self._seen_mass))

    # -- persistence --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "query_budget": self.query_budget,
            "buffer_size": self.buffer_size,
            "batch_tolerance": self.batch_tolerance,
            "weighting": self.weighting,
            "budget_feedback": self.budget_feedback,
            "seed": self.seed,
            "seen": self.seen,
            "kept": self.kept,
            "histogram": self._histogram.clone(),
            "histogram_lazy_count": self._lazy_count,
            "seen_mass": self._seen_mass.clone(),
            "kept_mass": self._kept_mass.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        where = "selection.StreamingAQL.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"aql.{where}: state must be a dict, got {type(state).__name__}")
        missing = {"query_budget", "buffer_size", "batch_tolerance", "seen", "kept", "histogram", "seen_mass",
                   "kept_mass"} - state.keys()
        if missing:
            raise ValueError(f"aql.{where}: state lacks keys {sorted(missing)}")
        histogram = check_tensor(where, "state['histogram']", state["histogram"], ndim=1, dtypes=(torch.float64,))
        if histogram.shape[0] != _NUM_BINS:
            raise ValueError(f"aql.{where}: state['histogram'] must have {_NUM_BINS} bins, got {histogram.shape[0]}")
        self.query_budget = check_interval(where, "state['query_budget']", state["query_budget"], 0.0, 1.0,
                                            low_open=True, high_open=False)
        self.buffer_size = check_int(where, "state['buffer_size']", state["buffer_size"], low=1)
        self.batch_tolerance = check_interval(where, "state['batch_tolerance']", state["batch_tolerance"], 0.0,
                                               math.inf, low_open=False, high_open=True)
        self.weighting = bool(state.get("weighting", self.weighting))
        self.budget_feedback = bool(state.get("budget_feedback", self.budget_feedback))
        self.seed = int(state.get("seed", self.seed))
        self.decay = 1.0 - 1.0 / self.buffer_size
        self.seen = int(state["seen"])
        self.kept = int(state["kept"])
        self._histogram = histogram.detach().to(self._device, copy=True)
        self._lazy_count = int(state.get("histogram_lazy_count", 0))
        self._seen_mass = state["seen_mass"].detach().to(self._device, torch.float64, copy=True).reshape(())
        self._kept_mass = state["kept_mass"].detach().to(self._device, torch.float64, copy=True).reshape(())
