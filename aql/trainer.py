"""`AQLv2Trainer`: training with per-sample scores, a Fisher-EMA Laplace posterior and data selection.

One optimizer step: for each of `gradient_accumulation` micro-batches, forward (bf16 autocast on
CUDA), `cross_entropy_with_scores(reduction="none")` (per-token losses and their softmax statistics in
one pass), the importance-weighted mean of the losses, backward; then
`LaplacianUncertainty.update_from_grads()` every `fisher_update_freq` steps (it reads the .grad the
training backward left), gradient clipping, AdamW, and the learning-rate schedule (linear warmup, then
cosine to zero over the optimizer steps that the back-propagated samples make: a 20% subset makes 5x
fewer steps per epoch, and the schedule is sized for that).

`aql_v2.selection_strategy`:
- `none`: the baseline, every sample every epoch, plain `F.cross_entropy`, no AQL machinery.
- `random`: the control of data selection: a uniformly random `query_budget` share of the data each
  epoch (a fresh draw per epoch, fixed by (seed, epoch)), plain `F.cross_entropy`, no AQL machinery.
- `stale`: `ScoreStore` holds one score per sample, written from the training forward's statistics
  (`aql_v2.score`: loss, entropy or el2n; no extra forward); between epochs `next_subset()` picks the
  `query_budget` fraction to train on next (never-seen samples first, an `exploration` share at random).
  The loss is the plain mean over the micro-batch; with `aql_v2.importance_weights: true` it is the
  mean weighted by the subset's importance weights. Off by default: the explored share carries weight
  (N - top) / explored, ~41 at budget 0.2 and exploration 0.1, so those few samples dominate the
  gradient (MNIST-1D demo config at learning rate 3e-3: test accuracy 0.76 with the weights and
  exploration 0.1, 0.90 with the weights off or exploration 0.0).
- `streaming`: candidate batches of `batch_size / query_budget` samples are scored without gradients
  (by the model's softmax statistics, or by the estimator with `aql_v2.scorer: estimator`) and
  `StreamingAQL.process_batch` keeps the ones above its running threshold; kept samples are regrouped
  into micro-batches of `batch_size`.
- `curriculum`: `CurriculumAQL.select_batch` draws the samples in the current difficulty range from the
  candidate stream, up to `query_budget` of the epoch; `maybe_advance_stage(val_loss)` after each epoch.

Overhead (`overhead_time`, and `overhead_pct` = AQL time / the rest of the training time), timed with
CUDA events on GPU (read once per log interval, so no per-step synchronisation) and
`time.perf_counter` on CPU (where every op is synchronous):
- timed as AQL: per step, picking the per-sample score out of the fused loss's statistics and handing
  it to the score store, and the Fisher update (every `fisher_update_freq` optimizer steps); per epoch,
  the store's write-back and `next_subset()` and the copy of the epoch's indices to the device; for
  streaming / curriculum, the candidates' scoring forward and the selection;
- timed as training: batch gathering and transfer, forward, the loss, backward, clipping, optimizer
  and scheduler; evaluation, checkpoints and logging are in neither;
- caused by AQL but counted as training: the fused loss's extra cost over the baseline's
  `F.cross_entropy` (the demo prints both runs' time per step, and `benchmarks/` measure the two
  losses side by side) and the estimator's forward hook on the head (a row counter).
The per-step path is lean: the estimator's `_update_from_grads_unchecked` and the store's deferred
`_write` skip the argument checks of their public twins (the trainer guarantees the types), and
nothing in it synchronises with the device.

Checkpoints (`<output_dir>/checkpoint.pt`, written to a temporary file then `os.replace`d) hold the
model, optimizer, scheduler, estimator, selector and score store states, the RNG states (torch, CUDA,
numpy, python), the step, the epoch and the position inside the epoch (batches consumed, kept samples
not yet trained, the epoch's subset), so a resumed run makes the same selections and reaches the same
parameters as an uninterrupted one. A checkpoint is written every `save_every` steps, at every epoch end,
and on Ctrl-C (SIGINT is deferred to the end of the running step, then the checkpoint is written and
KeyboardInterrupt raised; a second Ctrl-C interrupts at once).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from aql_kernels import cross_entropy_with_scores, softmax_scores

from .config import Config

__all__ = ["AQLv2Trainer", "OverheadClock", "WarmupCosine", "seed_everything", "resolve_device", "rng_states", "set_rng_states"]


def seed_everything(seed: int) -> None:
    """Seeds python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"aql.trainer: device {name!r} requested but torch.cuda.is_available() is False; use device=cpu or auto")
    return device


def rng_states() -> dict[str, Any]:
    states = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class WarmupCosine:
    """LR factor: linear warmup over `warmup_steps`, then cosine from 1 to 0 at `total_steps` (0 after)."""

    def __init__(self, warmup_steps: int, total_steps: int):
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = min(int(warmup_steps), self.total_steps - 1)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class OverheadClock:
    """Time spent between `begin()` and `end()` (or inside `with clock.aql():`) against the whole time
    between `lap()`s.

    CUDA: a pair of events around each AQL region and one at each lap; `lap()` waits for the last
    event, so the only synchronisation is once per log interval. The events come from a pool that
    `lap()` refills, so a region costs two `Event.record` calls and no allocation. CPU: perf_counter
    (CPU ops are synchronous, so wall time is the time they take).
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pool: list = []
        self._pairs: list = []
        self.restart()

    def _event(self):
        event = self._pool.pop() if self._pool else torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def restart(self) -> None:
        if self.cuda:
            for start, end in self._pairs:
                self._pool += (start, end)
        self._pairs = []
        self._aql = 0.0
        self._start = self._event() if self.cuda else time.perf_counter()

    def begin(self):
        """Starts an AQL region; pass the returned token to `end`."""
        return self._event() if self.cuda else time.perf_counter()

    def end(self, token) -> None:
        if self.cuda:
            self._pairs.append((token, self._event()))
        else:
            self._aql += time.perf_counter() - token

    @contextlib.contextmanager
    def aql(self):
        token = self.begin()
        yield
        self.end(token)

    def lap(self) -> tuple[float, float]:
        """(aql seconds, total seconds) since the last lap / restart; starts the next interval."""
        if self.cuda:
            end = self._event()
            end.synchronize()
            aql = sum(s.elapsed_time(e) for s, e in self._pairs) / 1000.0
            total = self._start.elapsed_time(end) / 1000.0
            self._pool += (self._start, end)
        else:
            aql, total = self._aql, time.perf_counter() - self._start
        self.restart()
        return aql, total


def overhead_percent(aql_seconds: float, total_seconds: float) -> float:
    """AQL time as a percentage of the rest of training (the baseline's work)."""
    rest = total_seconds - aql_seconds
    return 100.0 * aql_seconds / rest if rest > 0 else 0.0


def _atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temporary, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x, y), (x, y, index) or (x, y, index, weight) -> all four (None where absent)."""
    if not isinstance(batch, (tuple, list)) or not 2 <= len(batch) <= 4:
        raise TypeError(f"aql.trainer: batches must be (x, y), (x, y, index) or (x, y, index, weight) tuples, got {type(batch).__name__}"
                        f"{'' if not isinstance(batch, (tuple, list)) else ' of length ' + str(len(batch))}")
    x, y, *rest = batch
    index = rest[0] if rest else None
    weight = rest[1] if len(rest) > 1 else None
    if index is not None and not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index, dtype=torch.long)
    return x, y, index, weight


class _EpochBatches:
    """Batches of sample indices over a dataset for one epoch, in an order fixed by (seed, epoch).

    `device`: where the yielded index (and weight) slices live. The dataset is gathered with the CPU
    order; the per-sample bookkeeping reads the indices on the training device, so they are copied
    there once per epoch rather than once per batch (a per-batch copy from pageable host memory waits
    for the CUDA stream)."""

    def __init__(self, dataset, order: torch.Tensor, batch_size: int, weights: torch.Tensor | None = None, skip: int = 0,
                 device: torch.device | None = None):
        self.dataset, self.order, self.batch_size, self.weights, self.skip = dataset, order, batch_size, weights, skip
        self.iterations = 0  # one pass over a permutation of distinct indices never repeats one
        self.device_order = order if device is None else order.to(device)
        if weights is not None and device is not None:
            self.weights = weights.to(device)

    def __len__(self) -> int:
        return max(0, math.ceil(self.order.numel() / self.batch_size) - self.skip)

    def __iter__(self):
        self.iterations += 1
        for start in range(self.skip * self.batch_size, self.order.numel(), self.batch_size):
            x, y = _gather(self.dataset, self.order[start:start + self.batch_size])
            index = self.device_order[start:start + self.batch_size]
            if self.weights is None:
                yield x, y, index
            else:
                yield x, y, index, self.weights[start:start + self.batch_size]


def _gather(dataset, index: torch.Tensor):
    if hasattr(dataset, "gather"):
        return dataset.gather(index)
    items = [dataset[i] for i in index.tolist()]
    return torch.stack([torch.as_tensor(item[0]) for item in items]), torch.stack([torch.as_tensor(item[1]) for item in items])


class _PerSampleLogits(nn.Module):
    """model(x) reshaped to [B, V] or [B, T, V]: the selectors read one row (or one sequence) per sample,
    while language models here return flat [B * T, V] token logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        if logits.dim() == 2 and logits.shape[0] != x.shape[0]:
            logits = logits.view(x.shape[0], -1, logits.shape[-1])
        return logits


class AQLv2Trainer:
    """Trains `model` on `train_data` under `config` (an `aql.config.Config`).

    train_data / val_data / test_data: datasets whose items are `(x, y[, index])` (an
    `aql.data.IndexedTensorDataset` is fastest: whole batches by one index). `output_dir` defaults to
    `config.logging.output_dir`; `callbacks` are called as `callback(trainer)` after every optimizer step.
    """

    def __init__(self, model: nn.Module, config: Config, *, train_data=None, val_data=None, test_data=None,
                 output_dir: str | os.PathLike | None = None, callbacks: Iterable[Callable] = (), ignore_index: int = -100):
        if not isinstance(model, nn.Module):
            raise TypeError(f"aql.trainer.AQLv2Trainer: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, Config):
            raise TypeError(f"aql.trainer.AQLv2Trainer: config must be an aql.config.Config (see load_config), got {type(config).__name__}")
        for name, data in (("train_data", train_data), ("val_data", val_data), ("test_data", test_data)):
            if data is not None and not hasattr(data, "__len__"):
                raise TypeError(f"aql.trainer.AQLv2Trainer: {name} must be a dataset with a length, got {type(data).__name__}")
        if train_data is not None and len(train_data) == 0:
            raise ValueError("aql.trainer.AQLv2Trainer: train_data is empty")
        self.config = config
        self.device = resolve_device(config.device)
        self.model = model.to(self.device)
        # the device as tensors report it ("cuda" -> "cuda:0"), for per-step comparisons that must not
        # fail on the missing index
        self._tensor_device = torch.empty(0, device=self.device).device
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.output_dir = Path(output_dir if output_dir is not None else config.logging.output_dir)
        self.callbacks = list(callbacks)
        self.ignore_index = ignore_index
        self.strategy = config.aql_v2.selection_strategy
        self._score_name = config.aql_v2.score  # the SoftmaxScores field that ranks samples
        self._distinct_indices = False  # set per epoch by train_epoch
        t = config.training
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                (decay if parameter.dim() >= 2 else no_decay).append(parameter)
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.learning_rate)
        self.steps_per_epoch = self._planned_steps_per_epoch()
        total = self.steps_per_epoch * t.epochs
        if t.max_steps:
            total = min(total, t.max_steps)
        self.total_steps = max(1, total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(t.warmup_steps, self.total_steps))

        self.uncertainty = None
        self.selector = None
        self.score_store = None
        if self.strategy not in ("none", "random"):
            self._build_aql_components()

        self.step = 0
        self.epoch = 0
        self.metrics: dict[str, list] = {"train_loss": [], "val_loss": [], "data_selected": [], "overhead_time": [], "overhead_pct": []}
        self.history: list[dict] = []
        self.total_samples = 0
        self.total_tokens = 0
        self._reset_epoch_state()
        self._clock = OverheadClock(self.device)
        self._stop_requested = False
        self._step_rows = 0  # loss rows back-propagated in the running optimizer step
        self._at_boundary = True  # no optimizer step half done: the state is consistent to checkpoint
        self._progress = None
        self._wandb = None
        self._wandb_module = self._import_wandb() if config.logging.wandb_project else None

    # ------------------------------------------------------------------------------------------ setup
    def _planned_samples_per_epoch(self) -> int:
        n = len(self.train_data) if self.train_data is not None else 0
        if self.strategy == "none":
            return n
        return max(1, round(self.config.aql_v2.query_budget * n))

    def _planned_steps_per_epoch(self) -> int:
        t = self.config.training
        micro = math.ceil(self._planned_samples_per_epoch() / t.batch_size)
        return max(1, math.ceil(micro / t.gradient_accumulation))

    def _build_aql_components(self) -> None:
        from . import selection, uncertainty

        a = self.config.aql_v2
        head = getattr(self.model, "head", None)
        if a.uncertainty_method == "laplace":
            self.uncertainty = uncertainty.LaplacianUncertainty(self.model, head=head, ema_decay=a.fisher_ema_decay, prior_precision=a.prior_precision)
        elif a.uncertainty_method == "ensemble":
            self.uncertainty = uncertainty.EnsembleUncertainty(self.model, n_ensemble=a.n_ensemble)
        else:
            self.uncertainty = uncertainty.MCDropoutUncertainty(self.model, n_samples=a.mc_samples)
        if self.strategy == "stale":
            if self.train_data is None:
                raise ValueError("aql.trainer.AQLv2Trainer: selection_strategy 'stale' needs train_data (the score store has one slot per sample)")
            self.score_store = selection.ScoreStore(len(self.train_data), query_budget=a.query_budget, exploration=a.exploration,
                                                    device=self.device, seed=self.config.seed)
        elif self.strategy == "streaming":
            self.selector = selection.StreamingAQL(self.model, self.uncertainty, query_budget=a.query_budget, buffer_size=a.buffer_size)
        elif self.strategy == "curriculum":
            # Difficulty from the model's own entropy (scorer: model) or from the estimator's.
            use_estimator = a.scorer == "estimator"
            num_classes = self.config.model.num_classes if self.config.model.type == "mnist1d_cnn" else self.config.model.vocab_size
            self.selector = selection.CurriculumAQL(_PerSampleLogits(self.model), self.uncertainty if use_estimator else None,
                                                    stage_thresholds=tuple(a.difficulty_stages),
                                                    stage_advance_threshold=a.stage_advance_threshold,
                                                    num_classes=num_classes if use_estimator else None)

    def _import_wandb(self):
        try:
            import wandb
        except ImportError:
            raise RuntimeError(
                f"aql.trainer: logging.wandb_project is {self.config.logging.wandb_project!r} but wandb is not installed; "
                "install the optional extra (pip install 'aql[wandb]'; WANDB_MODE=offline works without network) "
                "or turn it off with --set logging.wandb_project=null") from None
        return wandb

    def _reset_epoch_state(self) -> None:
        self._consumed = 0  # batches of the epoch's loader taken so far
        self._pending: list[tuple] = []  # selected samples not yet trained on (streaming, curriculum)
        self._epoch_subset = None  # stale: (indices, weights) of this epoch
        self._epoch_loss_sum = torch.zeros((), dtype=torch.float64)
        self._epoch_loss_count = torch.zeros((), dtype=torch.float64)
        self._epoch_samples = 0
        self._epoch_tokens = torch.zeros((), dtype=torch.int64)
        self._epoch_aql_time = 0.0
        self._epoch_total_time = 0.0
        self._epoch_looked_at = 0
        self._interval_loss_sum = torch.zeros((), dtype=torch.float64)
        self._interval_loss_count = torch.zeros((), dtype=torch.float64)

    def _move_epoch_state(self) -> None:
        for name in ("_epoch_loss_sum", "_epoch_loss_count", "_epoch_tokens", "_interval_loss_sum", "_interval_loss_count"):
            setattr(self, name, getattr(self, name).to(self.device))

    # ------------------------------------------------------------------------------ the training step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _per_sample(self, per_token: torch.Tensor, batch: int) -> torch.Tensor:
        """Mean of a per-row statistic over each sample's rows ([B * T] -> [B]), ignored rows excluded."""
        if per_token.shape[0] == batch:
            return per_token
        return per_token.view(batch, -1).sum(dim=1) / self._valid.view(batch, -1).sum(dim=1).clamp_min(1)

    def _score_field(self, scores) -> torch.Tensor:
        return getattr(scores, self.config.aql_v2.score)

    def _micro_step(self, x, y, index, weight, scale: float) -> None:
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        batch = x.shape[0]
        with self._autocast():
            logits = self.model(x)
        targets = y.reshape(-1)
        if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"aql.trainer: the model must return 2-D logits with one row per target, got {tuple(logits.shape)} "
                             f"for {targets.shape[0]} targets")
        if self.strategy in ("none", "random"):
            per_token = F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index, reduction="none")
            scores = None
        else:
            per_token, scores = cross_entropy_with_scores(logits, targets, ignore_index=self.ignore_index, reduction="none")
        valid = (targets != self.ignore_index).to(per_token.dtype)
        self._valid = valid
        row_weight = valid
        if weight is not None and self.config.aql_v2.importance_weights:
            weight = weight.to(self.device, non_blocking=True).to(per_token.dtype)
            row_weight = valid * weight.repeat_interleave(targets.shape[0] // batch)
        loss = (per_token * row_weight).sum() / row_weight.sum().clamp_min(1e-12)
        (loss * scale).backward()

        detached = loss.detach().double()
        self._interval_loss_sum += detached
        self._interval_loss_count += 1
        self._epoch_loss_sum += detached
        self._epoch_loss_count += 1
        self._epoch_samples += batch
        self._step_rows += targets.shape[0]
        self._epoch_tokens += valid.sum().long()
        if self.score_store is not None and index is not None:
            token = self._clock.begin()
            sample_scores = self._per_sample(getattr(scores, self._score_name), batch)
            if index.device != self._tensor_device or index.dtype != torch.int64 or index.dim() != 1 or index.shape[0] != batch:
                index = self._check_index(index, batch)
            # float32 [B] on the store's device, int64 [B]; distinct across the epoch's batches when they
            # come from the epoch's own subset loader (see train_epoch)
            self.score_store._write(index, sample_scores, distinct=self._distinct_indices)
            self._clock.end(token)
        self._last_batch = (x, y)

    def _check_index(self, index: torch.Tensor, batch: int) -> torch.Tensor:
        """A sample-index tensor from a user's loader, as the store's `_write` needs it."""
        if index.dim() != 1 or index.shape[0] != batch:
            raise ValueError(f"aql.trainer: a batch's index must be 1-D with one entry per sample ({batch}), "
                             f"got shape {tuple(index.shape)}")
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
            raise TypeError(f"aql.trainer: a batch's index must hold integer sample indices, got {index.dtype}")
        return index.to(self.device, torch.int64, non_blocking=True)

    def _optimizer_step(self, micro_batches: int) -> None:
        a, t = self.config.aql_v2, self.config.training
        if micro_batches != t.gradient_accumulation:  # a short last group: rescale to a mean over what came
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, t.gradient_accumulation / micro_batches)
        if self.uncertainty is not None and self.step % a.fisher_update_freq == 0:
            token = self._clock.begin()
            if a.uncertainty_method == "laplace":
                # the loss of this step is a mean over its rows (tokens for language models), unscaled,
                # and backward ran since the last zero_grad: the estimator's unchecked per-step path
                self.uncertainty._update_from_grads_unchecked(max(1, self._step_rows))
            elif a.uncertainty_method == "ensemble":
                self.uncertainty.train_ensemble(*self._last_batch)
            self._clock.end(token)
        if t.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), t.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step_rows = 0
        self.step += 1

    # ---------------------------------------------------------------------------------- selection
    def _counted(self, data_loader) -> Iterator:
        for batch in data_loader:
            self._consumed += 1
            yield batch

    def _take_pending(self, size: int) -> tuple:
        """Concatenates pending pieces and splits off the first `size` samples."""
        xs, ys, idx, ws = zip(*self._pending)
        x, y = torch.cat(xs), torch.cat(ys)
        index = None if any(i is None for i in idx) else torch.cat(idx)
        weight = None if any(w is None for w in ws) else torch.cat(ws)
        take = min(size, x.shape[0])
        head = (x[:take], y[:take], None if index is None else index[:take], None if weight is None else weight[:take])
        self._pending = [] if take == x.shape[0] else [(x[take:], y[take:], None if index is None else index[take:],
                                                       None if weight is None else weight[take:])]
        return head

    def _pending_count(self) -> int:
        return sum(piece[0].shape[0] for piece in self._pending)

    def _model_scores(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample scores of candidates from a no-grad forward of the model."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            logits = self.model(x)
        self.model.train(was_training)
        targets = y.reshape(-1)
        self._valid = (targets != self.ignore_index).float()
        stats = softmax_scores(logits, targets, ignore_index=self.ignore_index)
        return self._per_sample(self._score_field(stats), x.shape[0]).float()

    def _training_batches(self, data_loader) -> Iterator[tuple]:
        """Micro-batches (x, y, index, weight) to back-propagate, after the strategy's selection."""
        batch_size = self.config.training.batch_size
        stream = self._counted(data_loader)
        if self.strategy in ("none", "random", "stale"):
            for batch in stream:
                yield _split_batch(batch)
        elif self.strategy == "streaming":
            for batch in stream:
                x, y, index, _ = _split_batch(batch)
                with self._clock.aql():
                    x = x.to(self.device, non_blocking=True)
                    y = y.to(self.device, non_blocking=True)
                    scores = self._model_scores(x, y) if self.config.aql_v2.scorer == "model" else None
                    kept = self.selector.process_batch(x, y, scores)
                    kept_index = None if index is None else index.to(self.device)[kept.mask]
                    if kept.data.shape[0]:
                        self._pending.append((kept.data, kept.targets, kept_index, kept.weights))
                    self._epoch_looked_at += x.shape[0]
                while self._pending_count() >= batch_size:
                    yield self._take_pending(batch_size)
        else:  # curriculum
            budget = self._planned_samples_per_epoch()
            pairs = ((b[0].to(self.device, non_blocking=True), b[1].to(self.device, non_blocking=True))
                     for b in (_split_batch(batch) for batch in stream))
            stream_ended = False
            while not stream_ended and self._epoch_samples + self._pending_count() < budget:
                with self._clock.aql():
                    chosen = self.selector.select_batch(pairs, batch_size)
                    # `exhausted` without `stream_ended` is a band that ran dry (the selector moves on to
                    # the next stage); only the end of the stream ends the epoch.
                    stream_ended = bool(getattr(chosen, "stream_ended", chosen.exhausted))
                    if chosen.data is not None and chosen.data.shape[0]:
                        room = budget - self._epoch_samples - self._pending_count()
                        data, targets = chosen.data[:room], chosen.targets[:room]
                        self._pending.append((data.to(self.device), targets.to(self.device), None, None))
                while self._pending_count() >= batch_size:
                    yield self._take_pending(batch_size)
        while self._pending:
            yield self._take_pending(batch_size)

    # ---------------------------------------------------------------------------------- epoch loop
    def train_epoch(self, data_loader) -> dict[str, Any]:
        """Trains one epoch on `data_loader` (training batches for none / stale, candidate batches for
        streaming / curriculum), evaluates val, checkpoints; returns the epoch's metrics."""
        self.model.train()
        self._move_epoch_state()
        # The stale loader of `epoch_loader` iterates a permutation of the store's subset (distinct
        # indices), and the store was written back when it was made: on its first pass the epoch's
        # score writes never repeat a sample.
        self._distinct_indices = self.strategy == "stale" and isinstance(data_loader, _EpochBatches) and data_loader.iterations == 0
        accumulation = self.config.training.gradient_accumulation
        micro = 0
        max_steps = self.config.training.max_steps
        for x, y, index, weight in self._training_batches(data_loader):
            self._at_boundary = False
            self._micro_step(x, y, index, weight, 1.0 / accumulation)
            micro += 1
            if micro == accumulation:
                self._optimizer_step(micro)
                micro = 0
                self._after_step()
                if max_steps and self.step >= max_steps:
                    break
        if micro:
            self._optimizer_step(micro)
            self._after_step()
        return self._end_epoch()

    def _after_step(self) -> None:
        self._at_boundary = True
        lg = self.config.logging
        if self._progress is not None:
            self._progress.update(1)
        for callback in self.callbacks:
            callback(self)
        if self.step % lg.log_every == 0:
            self._log_interval()
        if lg.eval_every and self.step % lg.eval_every == 0 and self.val_data is not None:
            aql_time, total = self._clock.lap()
            self._epoch_aql_time += aql_time
            self._epoch_total_time += total
            val = self.evaluate(self.val_data)
            self._write_record({"event": "eval", "step": self.step, "epoch": self.epoch, **{f"val_{k}": v for k, v in val.items()}})
            self._clock.restart()  # evaluation is neither training nor AQL
        if lg.save_every and self.step % lg.save_every == 0:
            self._write_back_scores()
            self.save_checkpoint()
        if self._stop_requested:
            self._write_back_scores()
            self.save_checkpoint()
            raise KeyboardInterrupt(f"aql.trainer: interrupted; checkpoint written at step {self.step} to {self.checkpoint_path}")

    def _log_interval(self) -> None:
        aql_time, total = self._clock.lap()
        self._epoch_aql_time += aql_time
        self._epoch_total_time += total
        count = float(self._interval_loss_count)
        record = {
            "event": "train", "step": self.step, "epoch": self.epoch,
            "train_loss": float(self._interval_loss_sum) / count if count else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
            "overhead_time": aql_time, "overhead_pct": overhead_percent(aql_time, total), "interval_time": total,
            "samples_backpropagated": self.total_samples + self._epoch_samples,
            "tokens_backpropagated": self.total_tokens + int(self._epoch_tokens),
        }
        self._interval_loss_sum.zero_()
        self._interval_loss_count.zero_()
        self._write_record(record)
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{record['train_loss']:.4f}", overhead=f"{record['overhead_pct']:.2f}%")

    def _write_back_scores(self) -> None:
        """Applies the score store's deferred writes as timed AQL work; a checkpoint would otherwise
        do it in time that is counted as neither AQL nor training."""
        if self.score_store is not None:
            token = self._clock.begin()
            self.score_store._flush()
            self._clock.end(token)

    def _end_epoch(self) -> dict[str, Any]:
        self._write_back_scores()
        aql_time, total = self._clock.lap()
        self._epoch_aql_time += aql_time
        self._epoch_total_time += total
        count = float(self._epoch_loss_count)
        tokens = int(self._epoch_tokens)
        self.total_samples += self._epoch_samples
        self.total_tokens += tokens
        n = len(self.train_data) if self.train_data is not None else max(1, self._epoch_looked_at)
        metrics: dict[str, Any] = {
            "epoch": self.epoch, "step": self.step,
            "train_loss": float(self._epoch_loss_sum) / count if count else float("nan"),
            "data_selected": self._epoch_samples / n,
            "overhead_time": self._epoch_aql_time,
            "overhead_pct": overhead_percent(self._epoch_aql_time, self._epoch_total_time),
            "train_time": self._epoch_total_time,
            "samples_backpropagated": self._epoch_samples,
            "tokens_backpropagated": tokens,
            "total_samples_backpropagated": self.total_samples,
            "total_tokens_backpropagated": self.total_tokens,
            "lr": self.scheduler.get_last_lr()[0],
        }
        if self.val_data is not None:
            val = self.evaluate(self.val_data)
            metrics.update({f"val_{k}": v for k, v in val.items()})
            if self.strategy == "curriculum":
                metrics["stage_advanced"] = bool(self.selector.maybe_advance_stage(val["loss"]))
                metrics["training_stage"] = int(self.selector.training_stage)
        else:
            metrics["val_loss"] = float("nan")
        if self.config.logging.test_every_epoch and self.test_data is not None:
            test = self.evaluate(self.test_data)
            metrics.update({f"test_{k}": v for k, v in test.items()})
        for key in self.metrics:
            self.metrics[key].append(metrics[key])
        self.history.append(metrics)
        self._write_record({"event": "epoch", **metrics})
        if self._wandb is not None:
            self._wandb.log({f"epoch/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}, step=self.step)
        self.epoch += 1
        self._reset_epoch_state()
        self.save_checkpoint()
        self._clock.restart()
        return metrics

    @torch.no_grad()
    def evaluate(self, dataset) -> dict[str, float]:
        """Mean loss per target (and accuracy; perplexity for token data) over `dataset`."""
        was_training = self.model.training
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.int64, device=self.device)
        count = torch.zeros((), dtype=torch.int64, device=self.device)
        size = self.config.training.eval_batch_size
        for start in range(0, len(dataset), size):
            x, y = _gather(dataset, torch.arange(start, min(start + size, len(dataset))))
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x)
            targets = y.reshape(-1)
            valid = targets != self.ignore_index
            loss_sum += F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index, reduction="sum").double()
            correct += ((logits.argmax(dim=1) == targets) & valid).sum()
            count += valid.sum()
        self.model.train(was_training)
        n = max(1, int(count))
        loss = float(loss_sum) / n
        out = {"loss": loss, "accuracy": int(correct) / n}
        if getattr(dataset, "tokens_per_sample", 1) > 1:
            out["perplexity"] = math.exp(min(loss, 50.0))
        return out

    # ------------------------------------------------------------------------------------------ fit
    def epoch_loader(self, epoch: int):
        """The loader `fit` trains epoch `epoch` on: training batches (none / stale) or candidate
        batches (streaming / curriculum) in an order fixed by (seed, epoch), minus the batches
        already consumed when resuming inside the epoch."""
        if self.train_data is None:
            raise ValueError("aql.trainer.AQLv2Trainer.fit: needs train_data")
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        batch_size = self.config.training.batch_size
        if self.strategy == "stale":
            if self._epoch_subset is None:
                with self._clock.aql():
                    subset = self.score_store.next_subset()
                    self._epoch_subset = (subset.indices.cpu(), subset.weights.float().cpu())
            indices, weights = self._epoch_subset
            permutation = torch.randperm(indices.numel(), generator=generator)
            token = self._clock.begin()
            self.score_store._flush()  # (nothing to write when next_subset just ran)
            batches = _EpochBatches(self.train_data, indices[permutation], batch_size, weights[permutation], skip=self._consumed,
                                    device=self.device)
            self._clock.end(token)
            return batches
        order = torch.randperm(len(self.train_data), generator=generator)
        if self.strategy == "random":  # the first k of a uniform permutation: a uniform k-subset, in random order
            order = order[:self._planned_samples_per_epoch()]
        if self.strategy == "streaming":
            batch_size = max(1, math.ceil(batch_size / self.config.aql_v2.query_budget))
        return _EpochBatches(self.train_data, order, batch_size, skip=self._consumed)

    def fit(self, epochs: int | None = None, *, resume: bool = False) -> dict[str, Any]:
        """Trains `config.training.epochs` epochs (or until max_steps); evaluates test at the end.

        resume=True continues from `<output_dir>/checkpoint.pt` when it exists.
        """
        epochs = self.config.training.epochs if epochs is None else epochs
        if resume and self.checkpoint_path.is_file():
            self.load_checkpoint(self.checkpoint_path)
        max_steps = self.config.training.max_steps
        self._start_logging()
        previous_handler = self._install_sigint()
        try:
            with self._progress_bar():
                self._clock.restart()
                while self.epoch < epochs and not (max_steps and self.step >= max_steps):
                    self.train_epoch(self.epoch_loader(self.epoch))
        except KeyboardInterrupt:
            if self._stop_requested:
                pass  # written at the step boundary already, or a second Ctrl-C asked to stop at once
            elif self._at_boundary:  # raised between steps (e.g. by a callback): the state is consistent
                self.save_checkpoint()
            else:  # raised inside a step: keep the last consistent checkpoint rather than half a step
                print(f"aql: interrupted inside a step; the last checkpoint ({self.checkpoint_path}) stands", flush=True)
            raise
        finally:
            self._restore_sigint(previous_handler)
            self._stop_requested = False
        result = self.summary()
        if self.test_data is not None:
            test = self.evaluate(self.test_data)
            result.update({f"test_{k}": v for k, v in test.items()})
        self._write_record({"event": "fit", **{k: v for k, v in result.items() if k != "history"}})
        if self._wandb is not None:
            self._wandb.log({f"final/{k}": v for k, v in result.items() if isinstance(v, (int, float))}, step=self.step)
            self._wandb.finish()
            self._wandb = None
        return result

    def summary(self) -> dict[str, Any]:
        aql = sum(m["overhead_time"] for m in self.history)
        total = sum(m["train_time"] for m in self.history)
        return {
            "strategy": self.strategy, "epochs": self.epoch, "steps": self.step,
            "samples_backpropagated": self.total_samples, "tokens_backpropagated": self.total_tokens,
            "train_loss": self.history[-1]["train_loss"] if self.history else float("nan"),
            "val_loss": self.history[-1]["val_loss"] if self.history else float("nan"),
            "data_selected": (sum(m["data_selected"] for m in self.history) / len(self.history)) if self.history else 0.0,
            "overhead_time": aql, "overhead_pct": overhead_percent(aql, total), "train_time": total,
            "history": list(self.history),
        }

    @contextlib.contextmanager
    def _progress_bar(self):
        if not self.config.logging.progress_bar:
            yield
            return
        from tqdm.auto import tqdm

        self._progress = tqdm(total=self.total_steps, initial=self.step, desc=f"aql[{self.strategy}]", unit="step", dynamic_ncols=True)
        try:
            yield
        finally:
            self._progress.close()
            self._progress = None

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame):
            if self._stop_requested:  # second Ctrl-C: stop now
                raise KeyboardInterrupt
            self._stop_requested = True
            print("\naql: finishing the current step, writing a checkpoint, then stopping (Ctrl-C again to stop at once)", flush=True)

        return signal.signal(signal.SIGINT, request_stop)

    @staticmethod
    def _restore_sigint(previous) -> None:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)

    # --------------------------------------------------------------------------------------- logging
    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoint.pt"

    def _start_logging(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        if self._wandb_module is not None and self._wandb is None:
            lg = self.config.logging
            self._wandb = self._wandb_module.init(project=lg.wandb_project, tags=list(lg.wandb_tags), config=self.config.to_dict(),
                                                  dir=str(self.output_dir), resume="allow")

    def _write_record(self, record: dict) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        record = {"time": time.time(), **record}
        with open(self.metrics_path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, default=float) + "\n")
        if self._wandb is not None and record.get("event") in ("train", "eval"):
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "time"}, step=self.step)

    # ------------------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        def cpu(value):
            return value.detach().cpu() if isinstance(value, torch.Tensor) else value

        return {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "uncertainty": self.uncertainty.state_dict() if self.uncertainty is not None and hasattr(self.uncertainty, "state_dict") else None,
            "selector": self.selector.state_dict() if self.selector is not None else None,
            "score_store": self.score_store.state_dict() if self.score_store is not None else None,
            "rng": rng_states(),
            "step": self.step,
            "epoch": self.epoch,
            "strategy": self.strategy,
            "config": self.config.to_dict(),
            "totals": {"samples": self.total_samples, "tokens": self.total_tokens},
            "history": self.history,
            "metrics": self.metrics,
            "position": {
                "consumed": self._consumed,
                "pending": [tuple(cpu(v) for v in piece) for piece in self._pending],
                "epoch_subset": self._epoch_subset,
                "loss_sum": float(self._epoch_loss_sum), "loss_count": float(self._epoch_loss_count),
                "samples": self._epoch_samples, "tokens": int(self._epoch_tokens),
                "aql_time": self._epoch_aql_time, "total_time": self._epoch_total_time, "looked_at": self._epoch_looked_at,
                # CurriculumAQL carries in-band samples of its last source batch to its next call, outside
                # its state_dict; without them a resumed epoch would differ from an uninterrupted one.
                "curriculum_carry": tuple(cpu(v) for v in self.selector._carry)
                if self.strategy == "curriculum" and getattr(self.selector, "_carry", None) is not None else None,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("strategy") != self.strategy:
            raise ValueError(f"aql.trainer.AQLv2Trainer.load_state_dict: the checkpoint was written by selection_strategy "
                             f"{state.get('strategy')!r}, this trainer runs {self.strategy!r}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.uncertainty is not None and state["uncertainty"] is not None:
            self.uncertainty.load_state_dict(state["uncertainty"])
        if self.selector is not None and state["selector"] is not None:
            self.selector.load_state_dict(state["selector"])
        if self.score_store is not None and state["score_store"] is not None:
            self.score_store.load_state_dict(state["score_store"])
        set_rng_states(state["rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.total_samples, self.total_tokens = state["totals"]["samples"], state["totals"]["tokens"]
        self.history = list(state["history"])
        self.metrics = {k: list(v) for k, v in state["metrics"].items()}
        position = state["position"]
        self._reset_epoch_state()
        self._consumed = position["consumed"]
        self._pending = [tuple(None if v is None else v.to(self.device) for v in piece) for piece in position["pending"]]
        self._epoch_subset = position["epoch_subset"]
        self._epoch_loss_sum = torch.tensor(position["loss_sum"], dtype=torch.float64)
        self._epoch_loss_count = torch.tensor(position["loss_count"], dtype=torch.float64)
        self._epoch_samples = position["samples"]
        self._epoch_tokens = torch.tensor(position["tokens"], dtype=torch.int64)
        self._epoch_aql_time, self._epoch_total_time = position["aql_time"], position["total_time"]
        self._epoch_looked_at = position["looked_at"]
        if self.strategy == "curriculum" and hasattr(self.selector, "_carry"):
            carry = position.get("curriculum_carry")
            self.selector._carry = None if carry is None else tuple(v.to(self.device) for v in carry)

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Writes the full training state atomically (temporary file, then os.replace)."""
        path = Path(path) if path is not None else self.checkpoint_path
        _atomic_torch_save(self.state_dict(), path)
        return path

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        path = Path(path) if path is not None else self.checkpoint_path
        if not path.is_file():
            raise FileNotFoundError(f"aql.trainer.AQLv2Trainer.load_checkpoint: no checkpoint at {path}")
        # weights_only=False: the RNG states are numpy / python objects. Only load checkpoints you wrote.
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=False))
