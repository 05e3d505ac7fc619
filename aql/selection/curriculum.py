"""Curriculum selection: train on difficulty bands of normalised entropy, easy first.

Difficulty is the predictive entropy divided by log V (V classes), so it lies in [0, 1] and the
design document's stage thresholds (0.3, 0.6, 1.0) mean "a third of the maximal entropy", etc.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import torch

import aql_kernels

from aql._checks import check_int, check_interval, check_number, check_tensor

__all__ = ["CurriculumAQL", "CurriculumBatch"]

logger = logging.getLogger(__name__)


class CurriculumBatch(NamedTuple):
    """What `CurriculumAQL.select_batch` found.

    data, targets: up to batch_size in-band samples (fewer when exhausted); exhausted: the band could
    not fill the batch (max_lookahead source batches looked at, or the stream ended); looked_at:
    source batches drawn from the stream by this call; stream_ended: the stream raised StopIteration;
    stage: the stage whose band was used."""

    data: torch.Tensor | None
    targets: torch.Tensor | None
    exhausted: bool
    looked_at: int
    stream_ended: bool = False
    stage: int = 0


class CurriculumAQL:
    """Easy-to-hard selection on bands of normalised entropy.

    Bands: with thresholds ``t_0 < t_1 < ... < t_{S-1}`` in (0, 1], stage 0 takes difficulty in
    ``[0, t_0]`` and stage s > 0 takes ``(t_{s-1}, t_s]``; `get_difficulty_range()` returns
    ``(low, high)`` of the current stage (``training_stage``).

    Difficulty of a sample: without an estimator, the model's predictive entropy
    (``aql_kernels.softmax_scores`` of ``model(data)``; logits ``[B, V]``, or ``[B, T, V]`` averaged
    over T) divided by ``log V``. With an estimator, its ``estimate_uncertainty(data)`` divided by
    ``log(num_classes)`` (the estimator is taken to return an entropy in nats); when ``num_classes`` is
    None it is read once from the width of ``model(data)`` on the first batch.
    Both are clipped to [0, 1]; NaN difficulty belongs to no band.

    Stage advance by validation loss (`maybe_advance_stage`): the first validation loss reported in a
    stage is its reference ``L0``; a later call advances when ``(L0 - val_loss) / |L0| >=
    stage_advance_threshold``, i.e. the relative reduction since the stage started (its first report).
    The loss at which it advances becomes the next stage's reference.

    Stage advance by exhaustion: when `select_batch` looks at ``max_lookahead`` source batches without
    finding ``batch_size`` in-band samples, the band has run dry; with ``advance_if_exhausted=True``
    (default) the stage advances right there (the returned batch still holds what was found) and the
    next stage's reference loss is its first report. A stream that ends (StopIteration) before the
    batch is full also returns ``exhausted=True`` (with ``stream_ended=True``) but does not advance:
    that is the end of an epoch, not evidence that the band is empty.

    Empty band at a stage's start: a stage that has yielded no sample yet and whose first looked-at
    source batches (at least ``batch_size`` samples together) hold no in-band sample is dry at once
    (with ``advance_if_exhausted``), without spending ``max_lookahead`` source batches on it. A fresh
    model predicts nearly uniformly, so every normalised entropy is near 1 and the easy bands are
    empty: without this rule the first two stages consumed ``2 * max_lookahead`` candidate batches
    per epoch before anything trained, and an epoch shorter than that trained nothing at all (and,
    with no training, the validation loss never fell enough to advance the stage either). After a
    stage has yielded samples only the ``max_lookahead`` rule applies.

    In-band samples left over from the last source batch of a call are carried to the next call of
    the same stage (at most one source batch of them), dropped on a stage change or when another
    iterable is passed; `state_dict()` includes it (the position in the stream is the caller's).

    Host synchronisation: one per looked-at source batch (its in-band count decides whether to draw
    another), inherent to filling a batch from a filtered stream.
    """

    def __init__(self, model, uncertainty_estimator=None, stage_thresholds=(0.3, 0.6, 1.0),
                 stage_advance_threshold: float = 0.1, max_lookahead: int = 16, *,
                 num_classes: int | None = None, advance_if_exhausted: bool = True):
        where = "selection.CurriculumAQL"
        self.model = model
        self.uncertainty = uncertainty_estimator
        if isinstance(stage_thresholds, (str, bytes)) or not isinstance(stage_thresholds, Iterable):
            raise TypeError(f"aql.{where}: stage_thresholds must be a sequence of floats, "
                            f"got {type(stage_thresholds).__name__} {stage_thresholds!r}")
        thresholds = tuple(check_interval(where, f"stage_thresholds[{i}]", t, 0.0, 1.0, low_open=True, high_open=False)
                           for i, t in enumerate(stage_thresholds))
        if not thresholds:
            raise ValueError(f"aql.{where}: stage_thresholds must hold at least one threshold, got ()")
        if any(b <= a for a, b in zip(thresholds, thresholds[1:])):
            raise ValueError(f"aql.{where}: stage_thresholds must be strictly increasing, got {thresholds}")
        self.stage_thresholds = thresholds
        self.stage_advance_threshold = check_interval(where, "stage_advance_threshold", stage_advance_threshold,
                                                       0.0, 1.0, low_open=False, high_open=False)
        self.max_lookahead = check_int(where, "max_lookahead", max_lookahead, low=1)
        if num_classes is not None:
            check_int(where, "num_classes", num_classes, low=2)
        elif uncertainty_estimator is not None and model is None:
            raise ValueError(f"aql.{where}: num_classes is required with an uncertainty_estimator and no "
                             "model (its entropy is divided by log(num_classes)), got None")
        self.num_classes = num_classes
        if not isinstance(advance_if_exhausted, bool):
            raise TypeError(f"aql.{where}: advance_if_exhausted must be a bool, "
                            f"got {type(advance_if_exhausted).__name__} {advance_if_exhausted!r}")
        self.advance_if_exhausted = advance_if_exhausted
        self.training_stage = 0
        self._stage_yielded = 0  # samples select_batch returned in the current stage
        self.stage_start_loss: float | None = None
        self._carry: tuple[torch.Tensor, torch.Tensor] | None = None
        self._source = None  # the iterable whose iterator select_batch continues
        self._source_iterator: Iterator | None = None
        self.reset_window()

    @property
    def num_stages(self) -> int:
        return len(self.stage_thresholds)

    # -- bands --------------------------------------------------------------------------------------

    def get_difficulty_range(self) -> tuple[float, float]:
        """``(low, high)`` of the current band: ``[0, t_0]`` for stage 0, ``(t_{s-1}, t_s]`` after."""
        stage = self.training_stage
        low = 0.0 if stage == 0 else self.stage_thresholds[stage - 1]
        return low, self.stage_thresholds[stage]

    def in_band(self, difficulty: torch.Tensor) -> torch.Tensor:
        """bool mask of the difficulties inside the current band (NaN is in none)."""
        low, high = self.get_difficulty_range()
        above = difficulty >= low if self.training_stage == 0 else difficulty > low
        return above & (difficulty <= high)

    def difficulty(self, data: torch.Tensor) -> torch.Tensor:
        """Normalised entropy in [0, 1] of each sample of ``data`` (float32 ``[B]``)."""
        where = "selection.CurriculumAQL.difficulty"
        with torch.no_grad():
            if self.uncertainty is not None:
                entropy = self.uncertainty.estimate_uncertainty(data)
                check_tensor(where, "uncertainty_estimator.estimate_uncertainty(data)", entropy, ndim=1)
                if self.num_classes is None:  # once: the width of the model's output
                    self.num_classes = max(2, int(self.model(data[:1]).shape[-1]))
                scale_classes = self.num_classes
            else:
                logits = self.model(data)
                check_tensor(where, "model(data)", logits)
                if logits.dim() not in (2, 3):
                    raise ValueError(f"aql.{where}: model(data) must return logits [B, V] or [B, T, V], "
                                     f"got shape {tuple(logits.shape)}")
                vocab = logits.shape[-1]
                flat = logits.reshape(-1, vocab)
                entropy = aql_kernels.softmax_scores(flat).entropy.reshape(logits.shape[:-1])
                if entropy.dim() == 2:
                    entropy = entropy.mean(dim=1)
                scale_classes = vocab
        return self.normalised_entropy(entropy, scale_classes)

    @staticmethod
    def normalised_entropy(entropy: torch.Tensor, num_classes: int) -> torch.Tensor:
        """Difficulty from an entropy in nats over ``num_classes`` classes: entropy / log(num_classes)
        clipped to [0, 1] (float32; NaN stays NaN; 1 class divides by 1)."""
        scale = math.log(num_classes) if num_classes > 1 else 1.0
        return (entropy.float() / scale).clamp(0.0, 1.0)

    # -- selection ----------------------------------------------------------------------------------

    def select_batch(self, data_stream, batch_size: int) -> CurriculumBatch:
        """Fill a batch of ``batch_size`` in-band samples from ``data_stream``.

        ``data_stream``: an iterator of ``(data, targets)`` batches (pass the same iterator again to
        continue where this call stopped), or an iterable such as a DataLoader: its iterator is kept
        and continued while the same object is passed, and started afresh (a new epoch) after it
        ended or when another object comes. Looks at no more than ``max_lookahead`` source batches.
        """
        where = "selection.CurriculumAQL.select_batch"
        check_int(where, "batch_size", batch_size, low=1)
        if not isinstance(data_stream, Iterable):
            raise TypeError(f"aql.{where}: data_stream must be an iterable of (data, targets), "
                            f"got {type(data_stream).__name__}")
        if isinstance(data_stream, Iterator):
            iterator: Iterator = data_stream
        else:
            if self._source is not data_stream:
                self._carry = None  # leftovers of another stream
            if self._source is not data_stream or self._source_iterator is None:
                self._source, self._source_iterator = data_stream, iter(data_stream)
            iterator = self._source_iterator
        stage = self.training_stage
        pieces_data: list[torch.Tensor] = []
        pieces_targets: list[torch.Tensor] = []
        found = 0
        if self._carry is not None:
            carry_data, carry_targets = self._carry
            self._carry = None
            pieces_data.append(carry_data)
            pieces_targets.append(carry_targets)
            found = carry_data.shape[0]
        looked_at = 0
        looked_at_rows = 0
        empty_at_start = False
        stream_ended = False
        while found < batch_size and looked_at < self.max_lookahead:
            try:
                item = next(iterator)
            except StopIteration:
                stream_ended = True
                if iterator is self._source_iterator:
                    self._source_iterator = None  # the next call starts the iterable afresh
                break
            looked_at += 1
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise TypeError(f"aql.{where}: data_stream must yield (data, targets) pairs, "
                                f"got {type(item).__name__}")
            data, targets = item[0], item[1]
            check_tensor(where, "data", data)
            check_tensor(where, "targets", targets)
            if data.dim() == 0 or targets.dim() == 0 or data.shape[0] != targets.shape[0]:
                raise ValueError(f"aql.{where}: data and targets must have the same number of rows, "
                                 f"got shapes {tuple(data.shape)} and {tuple(targets.shape)}")
            rows = self.in_band(self.difficulty(data)).nonzero().squeeze(1)  # the per-batch host sync
            count = rows.shape[0]
            looked_at_rows += data.shape[0]
            if count == 0:
                if (self.advance_if_exhausted and found == 0 and self._stage_yielded == 0
                        and looked_at_rows >= batch_size):
                    empty_at_start = True
                    break
                continue
            take = min(count, batch_size - found)
            pieces_data.append(data.index_select(0, rows[:take].to(data.device)))
            pieces_targets.append(targets.index_select(0, rows[:take].to(targets.device)))
            found += take
            if take < count:
                rest = rows[take:]
                self._carry = (data.index_select(0, rest.to(data.device)), targets.index_select(0, rest.to(targets.device)))

        exhausted = found < batch_size
        self._stage_yielded += min(found, batch_size)
        if found > batch_size:  # a carry larger than the batch
            all_data, all_targets = torch.cat(pieces_data), torch.cat(pieces_targets)
            self._carry = (all_data[batch_size:], all_targets[batch_size:])
            pieces_data, pieces_targets = [all_data[:batch_size]], [all_targets[:batch_size]]
        out_data = torch.cat(pieces_data) if pieces_data else None
        out_targets = torch.cat(pieces_targets) if pieces_targets else None
        if exhausted and not stream_ended:
            logger.info("curriculum stage %d: band %s ran dry (%d of %d samples in %d batches%s)", stage,
                        self.get_difficulty_range(), found, batch_size, looked_at,
                        ", empty at the stage's start" if empty_at_start else "")
            if self.advance_if_exhausted:
                self._advance(f"band exhausted after {looked_at} batches")
        return CurriculumBatch(out_data, out_targets, exhausted, looked_at, stream_ended, stage)

    def filter_batch(self, difficulty: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The push form of `select_batch`, for a loop that scores its candidate batches itself and
        keeps dataset indices (`aql.strategies.CurriculumStrategy`): the positions (int64, ascending)
        of the samples of one candidate batch whose ``difficulty`` (float ``[B]`` in [0, 1], e.g. the
        normalised entropy of `difficulty`) lies in the current band.

        The exhaustion rules of `select_batch` apply, with ``batch_size`` the batch being filled and
        the candidate batches since ``batch_size`` in-band samples were last found as the window (the
        in-band samples beyond a full batch start the next window, as the carry does): a window of
        ``max_lookahead`` batches that found fewer, or, at a stage's start with nothing found yet,
        candidate batches of at least ``batch_size`` rows together without an in-band sample, end the
        window and (``advance_if_exhausted``) advance the stage. The batch's in-band samples are
        returned either way. `reset_window()` starts a new window (at an epoch's start). One host
        synchronisation per call (the in-band count).
        """
        where = "selection.CurriculumAQL.filter_batch"
        check_tensor(where, "difficulty", difficulty, ndim=1)
        check_int(where, "batch_size", batch_size, low=1)
        positions = self.in_band(difficulty).nonzero().squeeze(1)  # the host synchronisation
        count = positions.shape[0]
        self._window_looked += 1
        self._window_rows += difficulty.shape[0]
        if (count == 0 and self.advance_if_exhausted and self._window_found == 0 and self._stage_yielded == 0
                and self._window_rows >= batch_size):
            logger.info("curriculum stage %d: band %s empty at the stage's start (%d candidates)", self.training_stage,
                        self.get_difficulty_range(), self._window_rows)
            self._advance(f"band empty at the stage's start ({self._window_rows} candidates)")
            self.reset_window()
            return positions
        self._window_found += count
        self._stage_yielded += count
        if self._window_found >= batch_size:
            self._window_found %= batch_size
            self._window_looked = self._window_rows = 0
        elif self._window_looked >= self.max_lookahead:
            logger.info("curriculum stage %d: band %s ran dry (%d of %d samples in %d batches)", self.training_stage,
                        self.get_difficulty_range(), self._window_found, batch_size, self._window_looked)
            if self.advance_if_exhausted:
                self._advance(f"band exhausted after {self._window_looked} batches")
            self.reset_window()
        return positions

    def reset_window(self) -> None:
        """Starts a new window of `filter_batch` (nothing found, no batch looked at)."""
        self._window_found = self._window_looked = self._window_rows = 0

    # -- stages -------------------------------------------------------------------------------------

    def _advance(self, reason: str) -> bool:
        if self.training_stage + 1 >= self.num_stages:
            return False
        self.training_stage += 1
        self._stage_yielded = 0
        self._carry = None
        self.reset_window()
        logger.info("curriculum: advanced to stage %d, band %s (%s)", self.training_stage,
                    self.get_difficulty_range(), reason)
        return True

    def maybe_advance_stage(self, val_loss) -> bool:
        """Advance when the validation loss fell by ``stage_advance_threshold`` (relative) since the
        stage's first report; returns whether it advanced. ``val_loss``: a float or a 0-dim tensor; a
        non-finite one (NaN, inf) is ignored (no advance, the reference stays; a warning is logged)."""
        where = "selection.CurriculumAQL.maybe_advance_stage"
        if isinstance(val_loss, torch.Tensor):
            if val_loss.numel() != 1:
                raise ValueError(f"aql.{where}: val_loss must be a scalar, got shape {tuple(val_loss.shape)}")
            val_loss = float(val_loss)
        val_loss = check_number(where, "val_loss", val_loss)
        if not math.isfinite(val_loss):  # a diverged evaluation says nothing about progress: no advance, no new reference
            logger.warning("curriculum: validation loss %s is not finite; the stage stays %d", val_loss, self.training_stage)
            return False
        if self.stage_start_loss is None:
            self.stage_start_loss = val_loss
            return False
        reference = self.stage_start_loss
        reduction = (reference - val_loss) / abs(reference) if reference != 0 else 0.0
        # 1e-12: (1.0 - 0.9) / 1.0 is 0.0999...98 in binary floating point and should count as 10%.
        if reduction >= self.stage_advance_threshold - 1e-12 and self._advance(
                f"validation loss {reference:.4g} -> {val_loss:.4g}, relative reduction {reduction:.3f}"):
            self.stage_start_loss = val_loss
            return True
        return False

    # -- persistence --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "training_stage": self.training_stage,
            "stage_start_loss": self.stage_start_loss,
            "stage_thresholds": self.stage_thresholds,
            "stage_advance_threshold": self.stage_advance_threshold,
            "max_lookahead": self.max_lookahead,
            "num_classes": self.num_classes,
            "stage_yielded": self._stage_yielded,
            "carry": None if self._carry is None else tuple(t.clone() for t in self._carry),
            "window": (self._window_found, self._window_looked, self._window_rows),
        }

    def load_state_dict(self, state: dict) -> None:
        where = "selection.CurriculumAQL.load_state_dict"
        if not isinstance(state, dict):
            raise TypeError(f"aql.{where}: state must be a dict, got {type(state).__name__}")
        if "training_stage" not in state:
            raise ValueError(f"aql.{where}: state lacks key 'training_stage'")
        thresholds = tuple(state.get("stage_thresholds", self.stage_thresholds))
        if thresholds != self.stage_thresholds:
            raise ValueError(f"aql.{where}: stage_thresholds must match {self.stage_thresholds}, got {thresholds}")
        stage = state["training_stage"]
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < self.num_stages:
            raise ValueError(f"aql.{where}: training_stage must be an int in [0, {self.num_stages - 1}], got {stage!r}")
        self.training_stage = stage
        self._stage_yielded = int(state.get("stage_yielded", 0))
        start = state.get("stage_start_loss")
        self.stage_start_loss = None if start is None else float(start)
        self.stage_advance_threshold = float(state.get("stage_advance_threshold", self.stage_advance_threshold))
        self.max_lookahead = int(state.get("max_lookahead", self.max_lookahead))
        if state.get("num_classes") is not None:
            self.num_classes = int(state["num_classes"])
        carry = state.get("carry")
        if carry is not None and (not isinstance(carry, (tuple, list)) or len(carry) != 2
                                  or not all(isinstance(t, torch.Tensor) for t in carry)):
            raise TypeError(f"aql.{where}: state['carry'] must be None or a (data, targets) pair of tensors, "
                            f"got {type(carry).__name__}")
        self._carry = None if carry is None else (carry[0].clone(), carry[1].clone())
        self._window_found, self._window_looked, self._window_rows = (int(v) for v in state.get("window", (0, 0, 0)))
