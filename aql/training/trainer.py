"""`AQLv2Trainer`: training with per-sample scores, a Fisher-EMA Laplace posterior and data selection.

One optimizer step: for each of `gradient_accumulation` micro-batches, forward (bf16 autocast on
CUDA), `cross_entropy_with_scores(reduction="none")` (per-token losses and their softmax statistics in
one pass), the mean of the losses (weighted when the batch carries weights), backward; then
`LaplacianUncertainty.update_from_grads(check=False)` every `fisher_update_freq` steps (it reads the
.grad the training backward left), gradient clipping, AdamW, and the learning-rate schedule (linear
warmup, then cosine to zero over the optimizer steps that the back-propagated samples make: a 20%
subset makes 5x fewer steps per epoch, and the schedule is sized for that).

Selection is the strategy's (`aql_v2.selection_strategy`, an `aql.strategies.SelectionStrategy` built
by its `from_config`; see each strategy's file for what it does). The trainer knows only the protocol:
- each epoch it trains on `strategy.epoch_plan(epoch)` through `strategy.batches(...)` (`epoch_loader`);
- `scores_candidates` strategies get each candidate batch's no-grad `SoftmaxScores` (model in eval
  mode) in `select()`; the kept samples are regrouped into micro-batches of `batch_size`;
- `after_step(indices, scores)` gets every micro-batch's per-sample statistics from the fused loss;
- `end_epoch(metrics)` after the validation pass; its metrics join the epoch's;
- strategies with `uses_scores` False (none, random) train with plain `F.cross_entropy` and run no
  AQL machinery: no estimator, no `after_step`, nothing timed as overhead.

Overhead (`overhead_time`, and `overhead_pct` = AQL time / the rest of the training time), timed with
CUDA events on GPU (read once per log interval, so no per-step synchronisation) and
`time.perf_counter` on CPU (where every op is synchronous):
- timed as AQL: per step, the per-sample statistics handed to `after_step` (the score store's
  deferred write), and the Fisher update (every `fisher_update_freq` optimizer steps); per epoch, the
  epoch's plan (`next_subset()`) and `end_epoch` (the store's write-back); for candidate-scoring
  strategies, the candidates' scoring forward and the selection;
- timed as training: batch gathering and transfer (the sample indices included), forward, the loss,
  backward, clipping, optimizer and scheduler; evaluation, checkpoints and logging are in neither;
- caused by AQL but counted as training: the fused loss's extra cost over the baseline's
  `F.cross_entropy` (the demo prints both runs' time per step, and `benchmarks/` measure the two
  losses side by side) and the estimator's forward hook on the head (a row counter).
`aql_v2.target_overhead` is the budget: `fit()` reports `target_overhead_pct` beside `overhead_pct` and
warns (RuntimeWarning) when the run's measured overhead exceeds it.
The per-step path is lean: the documented fast paths `update_from_grads(check=False)` and the
store's `update(deferred=True)` skip the argument checks of their public twins (the trainer
guarantees the types), and nothing in it synchronises with the device.

Non-finite steps. Each optimizer step computes, on the device, one flag: the step's loss or the
global gradient norm (the norm that clipping uses anyway) is not finite. A flagged step is skipped
whole: no parameter or optimizer-state update, no Fisher update, no `after_step` (the strategies'
score writes), its loss stays out of the means; the LR schedule and the data position advance (its
batches are consumed). Skipped steps are counted (`nonfinite_steps` in the train, epoch and fit
records), each warns (RuntimeWarning), and `training.max_nonfinite_steps` in a row stop the run with a
`NonFiniteError`; a checkpoint is never written from non-finite parameters. How the flag is acted on
without a per-step synchronisation:
- CPU: the flag is a CPU tensor and CPU ops are synchronous, so reading it waits for nothing; the step
  is skipped in Python (the optimizer, Fisher and strategy are simply not called).
- CUDA: the flag is never read per step. AdamW is the fused kernel, which takes the flag as
  `found_inf` (as `torch.amp.GradScaler` passes it) and skips the update of the parameters, the
  moments and the step counts on the device; the Fisher EMA is restored from a copy with `torch.where`
  where the flag is set; loss means are masked. The flag is copied to pinned memory with an event and
  read one optimizer step later, when it has long been computed (the queue still holds the next step's
  work, so nothing drains): only then are the step's `after_step` calls delivered (or dropped), and the
  count and the in-a-row limit updated. A strategy therefore sees `after_step` one step late on CUDA.

Checkpoints (`<output_dir>/checkpoint.pt`, see `aql.training.checkpoint`: a checksummed file written
atomically, loaded with `torch.load(weights_only=True)`) hold the model, optimizer, scheduler,
estimator and strategy states, the RNG states (torch, CUDA, numpy, python), the step, the epoch and
the position inside the epoch (batches consumed, kept samples not yet trained), so a resumed run makes
the same selections and reaches the same parameters as an uninterrupted one. The last
`logging.keep_checkpoints` are kept (`checkpoint.1.pt`, ...); resuming falls back to the newest one
that verifies. A checkpoint is written every `save_every` steps, at every epoch end, and on SIGINT,
SIGTERM or SIGHUP (deferred to the end of the running step, then the checkpoint is written and
KeyboardInterrupt raised; a second signal interrupts at once).

Distributed (torchrun). Under `torchrun --nproc_per_node=R -m aql train ...` (or with a default
process group already initialised) the trainer joins the group (NCCL on CUDA, each rank on
cuda:LOCAL_RANK; gloo on CPU) and trains data-parallel:
- the model is wrapped in `DistributedDataParallel`; `training.batch_size` stays the global batch
  (each rank takes batch_size / R, which must divide), so a config makes the same run on any R;
- every rank computes the strategy's epoch plan and trains `strategy.shard_plan(plan)`: positions r,
  r + R, ... (`aql.distributed.shard_indices`), so global batch i is the one-process batch i; the plan
  is padded by wrapping around to a multiple of R (at most R - 1 samples of the epoch's last batch are
  repeats), so every rank runs the same number of micro-batches and optimizer steps;
- gradient accumulation skips DDP's all-reduce (`no_sync`) on all but the last micro-batch of a step;
  an epoch's short last step averages its gradients with one all-reduce per tensor;
- the Fisher update (`update_from_grads`), the gradient norm, clipping and AdamW read the gradients
  after DDP's all-reduce (the global mean gradient), so the Fisher, the non-finite flag (also
  all-reduced) and the parameters are identical on every rank;
- each rank feeds `after_step` with what it trained: a strategy's per-sample tables are sharded by
  rank (rank i mod R keeps sample i; the writes are routed to their owners at the next read), and its
  epoch selection runs across ranks over the owned rows (`SampleOwnership.topk_owned`, digit histograms
  all-reduced, never the scores; see `aql.distributed`). A custom strategy whose tables are not sharded
  is refused with a ConfigError;
- `scores_candidates` strategies (online, streaming, curriculum, meta) make exactly the one-process
  selection and batches: every rank iterates the global candidate batches (`candidate_batch_size` of
  the global batch; no padding of the plan) and scores its rows r, r + R, ... of each; one all-gather
  of the candidates' statistics (C x <= 8 float32, `aql.strategies._ranks`) puts them in one-process
  order, and every rank runs `select` on the whole batch (identical state, identical decision). Every
  rank mirrors the global queue of kept rows (`SharedPendingSamples`); each global batch of
  `batch_size` kept rows is the one-process batch, each rank training its own rows of it (a
  zero-weighted filler row when it holds none, so that DDP's all-reduce runs). A rank's loss is
  sum(row loss * weight) over its rows / the global weight sum (one all-reduce of a scalar per
  micro-batch) * R, so DDP's mean is the one-process loss; the Fisher update counts the global rows.
  Per candidate batch: one all-gather and one host synchronisation (which kept rows are this rank's).
  Curriculum's `end_epoch` reads the validation loss that every rank computes alike, meta's reward the
  holdout loss of the parameters every rank shares. With `aql_v2.scorer: estimator` each rank scores
  its own rows and the ranks still agree on every selection, but the values are not one process's:
  `LaplacianUncertainty` folds its feature statistics from each rank's own rows (its Fisher, from the
  all-reduced gradients and the global row count, is one process's);
- rank 0 alone writes metrics.jsonl, config.yaml, wandb and checkpoints; the train/epoch records hold
  global sums (losses, samples, tokens all-reduced at each log interval and epoch end); every rank
  evaluates the whole validation set (no communication);
- a checkpoint holds the shared state once and each rank's own part (strategy tables, sample
  ownership, RNG states, epoch position) in `ranks`; resuming needs the same number of ranks and an
  output folder that every rank reads (a shared file system across nodes);
- a stop signal (SIGINT / SIGTERM / SIGHUP) takes effect at the next `logging.log_every` step, agreed by
  an all-reduce, so that every rank stops (and checkpoints) at the same step;
- FSDP is refused (the diagonal Fisher and the fused step need whole gradients on every rank), as is
  a model already wrapped in DDP (the trainer wraps the bare module).

Runs (`fit(resume=..., overwrite=...)`): a fresh trainer refuses an output folder that already holds a
run (a checkpoint or metrics.jsonl) unless told to resume it or to overwrite it. Resuming compares the
saved config with this one: keys that would make a different run (`RESUME_BREAKING`: model, data,
seed, the selection settings, batch size and accumulation) are refused with the list of differences;
the others (epochs, max_steps, learning rate and the rest of `training`, `logging`, device) are
applied and reported. The LR schedule is a function of the step and the current config: on resume the
warmup-cosine is re-planned over the new total, i.e. from the resumed step on the LR is what a run
planned with the new settings from the start would use there (a finished 12-epoch run given
`training.epochs=13` continues at the small LR that a 13-epoch cosine has after 12 epochs and decays
to zero at the new end; a new `training.learning_rate` scales the whole schedule). Records in
metrics.jsonl after the resumed step (and the old `fit` summary) are dropped, so a resumed run writes
none twice.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from aql_kernels import cross_entropy_with_scores, softmax_scores

from .. import distributed
from ..config import Config, ConfigError, save_config
from ..strategies import STRATEGIES, SelectionStrategy, StrategyContext
from ..strategies import _ranks
from ..strategies.base import split_selection
from .batches import EpochLoader, PendingSamples, SharedPendingSamples, gather, sample_view, split_batch
from .checkpoint import (CHECKPOINT_FORMAT, CheckpointError, checkpoint_files, read_checkpoint, remove_stale_temporaries,
                         rng_states, set_rng_states, write_checkpoint)
from .clock import OverheadClock, overhead_percent
from .outputs import eval_batch_size, model_logits, num_outputs
from .schedule import WarmupCosine

__all__ = ["AQLv2Trainer", "resolve_device", "NonFiniteError", "RESUME_BREAKING", "config_differences"]

#: config keys (dotted, or a prefix ending in ".") whose change makes a different run: resume refuses them
RESUME_BREAKING = ("model.", "data.", "seed", "aql_v2.", "training.batch_size", "training.gradient_accumulation")
#: exceptions to RESUME_BREAKING: where the data is cached, and reporting or no-op keys
_RESUME_HARMLESS = ("data.cache_dir", "aql_v2.target_overhead", "aql_v2.enable_caching", "aql_v2.parallelize_uncertainty")


#: the parts of the training state that differ between ranks (each rank's own in a checkpoint's `ranks`)
_PER_RANK = ("selection", "rng", "position")


def _on_cpu(value):
    """`value` with every tensor in it (nested dicts, lists, tuples) copied to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


class NonFiniteError(RuntimeError):
    """Training stopped on non-finite values (too many skipped steps in a row, or parameters that are
    not finite when a checkpoint is due)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but torch.cuda.is_available() is False (no usable GPU here); "
                          "use device=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device: {name!r} requested but there are {torch.cuda.device_count()} CUDA devices")
    return device


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and prefix == "":  # sections; mappings inside a section (strategy_options) are one value
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_differences(saved: dict, current: dict) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(breaking, applied): the keys where two `Config.to_dict()`s differ, as {key: (saved, current)},
    split by `RESUME_BREAKING`."""
    old, new = _flatten(saved), _flatten(current)
    breaking, applied = {}, {}
    for key in sorted(old.keys() | new.keys()):
        before, after = old.get(key, "<absent>"), new.get(key, "<absent>")
        if before == after:
            continue
        refused = key not in _RESUME_HARMLESS and any(key == rule or (rule.endswith(".") and key.startswith(rule))
                                                      for rule in RESUME_BREAKING)
        (breaking if refused else applied)[key] = (before, after)
    return breaking, applied


class AQLv2Trainer:
    """Trains `model` on `train_data` under `config` (an `aql.config.Config`).

    train_data / val_data / test_data: datasets whose items are `(x, y[, index])` (an
    `aql.data.IndexedTensorDataset` is fastest: whole batches by one index). `output_dir` defaults to
    `config.logging.output_dir`; `callbacks` are called as `callback(trainer)` after every optimizer step.
    `strategy`: the `aql.strategies.SelectionStrategy` (built from the config); `uncertainty`: the
    estimator (None for strategies that use no scores).
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
        if train_data is None:
            raise ValueError("aql.trainer.AQLv2Trainer: train_data is required (the strategy plans over its samples), got None")
        if len(train_data) == 0:
            raise ValueError("aql.trainer.AQLv2Trainer: train_data is empty")
        self.config = config
        self.device = resolve_device(config.device)
        self._join_process_group(model)
        self.model = model.to(self.device)
        # the device as tensors report it ("cuda" -> "cuda:0"), for per-step comparisons that must not
        # fail on the missing index
        self._tensor_device = torch.empty(0, device=self.device).device
        self.train_data, self.val_data, self.test_data = train_data, val_data, test_data
        self.output_dir = Path(output_dir if output_dir is not None else config.logging.output_dir)
        self.callbacks = list(callbacks)
        self.ignore_index = ignore_index
        self._check_data_fits_model(train_data)
        t = config.training
        use_bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None

        strategy_class = STRATEGIES[config.aql_v2.selection_strategy]
        self.uncertainty = self._build_estimator() if strategy_class.uses_scores else None
        self.strategy: SelectionStrategy = strategy_class.from_config(config, self._strategy_context())
        # the per-step work the strategy asked for: none when it reads no scores or keeps the default
        # (empty) after_step
        self._feeds_steps = self.strategy.uses_scores and type(self.strategy).after_step is not SelectionStrategy.after_step
        # several ranks and a strategy that selects among candidates: the one-process selection over the
        # global candidate batch, and the one-process training batches (see _shared_training_batches)
        self._shared_candidates = self.world_size > 1 and self.strategy.scores_candidates
        self._filler = None  # (x, y) of one sample: the zero-weighted row of a rank with no rows in a step
        self._train_model = self._wrap_for_ranks()  # the model itself in one process

        decay, no_decay = [], []
        for parameter in self.model.parameters():
            if parameter.requires_grad:
                (decay if parameter.dim() >= 2 else no_decay).append(parameter)
        # in the model's order: the gradient norm sums per-tensor norms in this order (clip_grad_norm_'s)
        self._parameters = [p for p in self.model.parameters() if p.requires_grad]
        groups = [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # CUDA: non-finite steps are skipped on the device (the fused AdamW's found_inf); CPU: in Python
        self._skip_on_device = self._device_skips_steps()
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=t.learning_rate,
                                           fused=True if self._skip_on_device else None)
        micro = math.ceil(self.strategy.samples_per_epoch / t.batch_size)
        self.steps_per_epoch = max(1, math.ceil(micro / t.gradient_accumulation))
        total = self.steps_per_epoch * t.epochs
        if t.max_steps:
            total = min(total, t.max_steps)
        self.total_steps = max(1, total)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, WarmupCosine(t.warmup_steps, self.total_steps))
        self.nonfinite_steps = 0  # optimizer steps skipped for a non-finite loss or gradient (whole run)
        self._nonfinite_in_a_row = 0
        self._unresolved: list[tuple] = []  # CUDA: (flag on the host, event, step, after_step calls) not yet read
        self._step_scores: list[tuple] = []  # this step's (indices, per-sample scores) for after_step
        self._step_losses: list[torch.Tensor] = []  # this step's micro-batch losses

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
    def _join_process_group(self, model: nn.Module) -> None:
        """torchrun: joins the default process group (creating it from the environment when needed) and
        picks this rank's GPU; refuses FSDP and pre-wrapped models. Sets world_size and rank (1 and 0
        in one process)."""
        for module in model.modules():
            if any(cls.__name__ in ("FullyShardedDataParallel", "FSDPModule") for cls in type(module).__mro__):
                raise ValueError("aql.trainer.AQLv2Trainer: FSDP is not supported: the diagonal Fisher (update_from_grads) and "
                                 "the fused optimizer step read whole gradients on every rank; pass the bare module and launch "
                                 "with torchrun, the trainer wraps it in DistributedDataParallel")
        if isinstance(model, DistributedDataParallel):
            raise TypeError("aql.trainer.AQLv2Trainer: model is already wrapped in DistributedDataParallel; pass the bare "
                            "module (model.module), the trainer wraps it itself")
        launched = os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1")
        if self.device.type == "cuda" and self.device.index is None and (launched or distributed.world_size() > 1):
            local = os.environ.get("LOCAL_RANK")
            index = int(local) if local is not None and local.isdigit() else distributed.rank() % torch.cuda.device_count()
            self.device = torch.device("cuda", index)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        distributed.init_from_env(self.device)
        self.world_size, self.rank = distributed.world_size(), distributed.rank()
        self._is_main = self.rank == 0
        batch = self.config.training.batch_size
        if batch % self.world_size:
            raise ConfigError(f"training.batch_size: {batch} is the global batch and must be divisible by the number of "
                              f"ranks ({self.world_size}), e.g. {batch - batch % self.world_size or self.world_size}")

    def _wrap_for_ranks(self) -> nn.Module:
        """One process: the model. Several ranks: the strategy joins the group (or is refused) and the
        model is wrapped in DistributedDataParallel (which broadcasts rank 0's parameters)."""
        if self.world_size == 1:
            return self.model
        try:
            self.strategy.attach_process_group()
        except NotImplementedError as error:
            raise ConfigError(f"aql_v2.selection_strategy: {error}") from None
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _gradient_sync(self, sync: bool):
        """DDP's all-reduce in this backward (the last micro-batch of a step) or not (`no_sync`)."""
        if self.world_size == 1 or sync:
            return contextlib.nullcontext()
        return self._train_model.no_sync()

    def _average_gradients(self) -> None:
        """The mean of the ranks' gradients, for a step whose backwards all ran under `no_sync`."""
        if self.world_size == 1:
            return
        for p in self._parameters:
            if p.grad is not None:
                distributed.all_reduce_sum(p.grad).div_(self.world_size)

    def _global_sums(self, *values) -> list[float]:
        """The sums over the ranks of numbers (ints, floats, 0-dim tensors): one all-reduce of a float64
        vector; the values themselves in one process."""
        numbers = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(self.device).reshape(()) for v in values])
        return distributed.all_reduce_sum(numbers).tolist()

    def _stop_now(self) -> bool:
        """Whether to stop after this step: a signal arrived (one process); under torchrun, whether one
        arrived on any rank, asked at each `logging.log_every` step so that all ranks stop together."""
        if self.world_size == 1:
            return bool(self._stop_requested)
        if self.step % self.config.logging.log_every:
            return False
        anywhere = distributed.all_reduce_max(torch.tensor([int(bool(self._stop_requested))], device=self.device))
        if bool(anywhere) and not self._stop_requested:
            self._stop_requested = "a stop signal on another rank"
        return bool(anywhere)

    def _device_skips_steps(self) -> bool:
        """Whether non-finite steps are skipped on the device without reading the flag per step (CUDA),
        rather than in Python (CPU, where reading a CPU tensor waits for nothing)."""
        return self.device.type == "cuda"

    def _check_data_fits_model(self, data) -> None:
        """Label range and input length against the model config, named by config key (once, at set-up)."""
        m = self.config.model
        targets = getattr(data, "targets", None)
        inputs = getattr(data, "inputs", None)
        if not isinstance(targets, torch.Tensor) or targets.numel() == 0:
            return
        if m.type == "mnist1d_cnn":
            largest = int(targets.max())
            if largest >= m.num_classes:
                raise ConfigError(f"model.num_classes: {m.num_classes} is too small for the training labels (largest label "
                                  f"{largest}, so at least {largest + 1} classes)")
            if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and inputs.shape[1] != m.input_length:
                raise ConfigError(f"model.input_length: {m.input_length} does not fit the data, whose samples have "
                                  f"{inputs.shape[1]} values")
        elif m.type == "gpt2":
            valid = targets[targets != self.ignore_index] if targets.dtype != torch.bool else targets
            if valid.numel() and int(valid.max()) >= m.vocab_size:
                raise ConfigError(f"model.vocab_size: {m.vocab_size} is too small for the data's token ids (largest "
                                  f"{int(valid.max())})")
            if isinstance(inputs, torch.Tensor) and inputs.dim() == 2 and inputs.shape[1] > m.n_positions:
                raise ConfigError(f"model.n_positions: {m.n_positions} is shorter than the data's sequences "
                                  f"({inputs.shape[1]} tokens)")

    def _build_estimator(self):
        from .. import uncertainty

        a = self.config.aql_v2
        if a.uncertainty_method == "laplace":
            head = getattr(self.model, "head", None)
            return uncertainty.LaplacianUncertainty(self.model, head=head, ema_decay=a.fisher_ema_decay, prior_precision=a.prior_precision)
        if a.uncertainty_method == "ensemble":
            factory = uncertainty.config_student_factory(self.model, self.config.model, a.ensemble_student)
            return uncertainty.EnsembleUncertainty(self.model, n_ensemble=a.n_ensemble, student_factory=factory)
        return uncertainty.MCDropoutUncertainty(self.model, n_samples=a.mc_samples)

    def _strategy_context(self) -> StrategyContext:
        m = self.config.model
        labels = getattr(self.train_data, "targets", None)
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
            labels = None  # token data (or a dataset without a label tensor)
        return StrategyContext(num_samples=len(self.train_data), seed=self.config.seed, device=self.device, labels=labels,
                               num_classes=m.num_classes if m.type == "mnist1d_cnn" else m.vocab_size, model=self.model,
                               estimator=self.uncertainty, train_data=self.train_data, holdout_data=self.val_data)

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
        # kept candidates not yet trained on (under ranks: the global queue, this rank's rows in it)
        self._pending = SharedPendingSamples() if self._shared_candidates else PendingSamples()
        self._epoch_loss_sum = torch.zeros((), dtype=torch.float64)
        self._epoch_loss_count = torch.zeros((), dtype=torch.float64)
        self._epoch_samples = 0
        self._epoch_tokens = torch.zeros((), dtype=torch.int64)
        self._epoch_aql_time = 0.0
        self._epoch_total_time = 0.0
        self._epoch_looked_at = 0
        self._interval_loss_sum = torch.zeros((), dtype=torch.float64)
        self._interval_loss_count = torch.zeros((), dtype=torch.float64)
        self._epoch_nonfinite = 0
        self._interval_nonfinite = 0

    def _move_epoch_state(self) -> None:
        for name in ("_epoch_loss_sum", "_epoch_loss_count", "_epoch_tokens", "_interval_loss_sum", "_interval_loss_count"):
            setattr(self, name, getattr(self, name).to(self.device))

    # ------------------------------------------------------------------------------ the training step
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _micro_step(self, x, y, index, weight, scale: float, shared: tuple[int, bool] | None = None) -> None:
        """Forward, loss and backward of one micro-batch. `shared`: None in one process; under ranks for a
        `scores_candidates` strategy (global rows of the batch, whether this rank trains the filler row)."""
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        batch = x.shape[0]
        with self._autocast():
            logits = model_logits(self._train_model(x))
        targets = y.reshape(-1)
        if logits.dim() != 2 or logits.shape[0] != targets.shape[0]:
            raise ValueError(f"aql.trainer: the model must return 2-D logits with one row per target, got {tuple(logits.shape)} "
                             f"for {targets.shape[0]} targets")
        if self.strategy.uses_scores:
            per_token, scores = cross_entropy_with_scores(*sample_view(logits, targets, batch), ignore_index=self.ignore_index, reduction="none")
        else:
            per_token = F.cross_entropy(logits.float(), targets, ignore_index=self.ignore_index, reduction="none")
            scores = None
        valid = (targets != self.ignore_index).to(per_token.dtype)
        row_weight = valid
        if weight is not None:  # the strategy's (or the loader's) importance weights: a normalised weighted mean
            weight = weight.to(self.device, non_blocking=True).to(per_token.dtype)
            row_weight = valid * weight.repeat_interleave(targets.shape[0] // batch)
        if shared is None:
            loss = (per_token * row_weight).sum() / row_weight.sum().clamp_min(1e-12)
        else:
            loss, valid, scores, batch = self._shared_loss(per_token, row_weight, valid, scores, batch, shared)
        (loss * scale).backward()

        self._step_losses.append(loss.detach().double())
        self._epoch_samples += batch
        self._step_rows += targets.shape[0] if shared is None else shared[0] * (targets.shape[0] // x.shape[0])
        self._epoch_tokens += valid.sum().long()
        if self._feeds_steps and index is not None:
            # handed to after_step once the optimizer step is known to be finite (see _optimizer_step)
            token = self._clock.begin()
            if index.device != self._tensor_device or index.dtype != torch.int64 or index.dim() != 1 or index.shape[0] != batch:
                index = self._check_index(index, batch)
            self._step_scores.append((index, scores))
            self._clock.end(token)
        self._last_batch = (x, y)

    def _shared_loss(self, per_token, row_weight, valid, scores, batch: int, shared: tuple[int, bool]):
        """A rank's part of the one-process loss of a global batch: sum(loss * weight) over its rows / the
        global sum of the weights (one all-reduce of a scalar) * world_size, as DDP averages the ranks'
        gradients. The filler row weighs 0 (a non-finite filler loss is zeroed; its logits could still
        make the gradient non-finite, and the step is then skipped on every rank). Returns (loss, valid,
        scores, rows) with the filler row left out of the counts and the statistics."""
        if shared[1]:
            per_token, row_weight, valid = torch.nan_to_num(per_token, 0.0, 0.0, 0.0), torch.zeros_like(row_weight), valid[:0]
            scores = None if scores is None else type(scores)(*(None if f is None else f[:0] for f in scores))
            batch = 0
        total = distributed.all_reduce_sum(row_weight.sum().reshape(1))
        loss = (per_token * row_weight).sum() / total[0].clamp_min(1e-12) * self.world_size
        return loss, valid, scores, batch

    def _check_index(self, index: torch.Tensor, batch: int) -> torch.Tensor:
        """A sample-index tensor from a user's loader, as the strategy's `after_step` needs it."""
        if index.dim() != 1 or index.shape[0] != batch:
            raise ValueError(f"aql.trainer: a batch's index must be 1-D with one entry per sample ({batch}), "
                             f"got shape {tuple(index.shape)}")
        if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
            raise TypeError(f"aql.trainer: a batch's index must hold integer sample indices, got {index.dtype}")
        return index.to(self.device, torch.int64, non_blocking=True)

    def _optimizer_step(self, micro_batches: int) -> None:
        t = self.config.training
        grads = [p.grad for p in self._parameters if p.grad is not None]
        if micro_batches != t.gradient_accumulation and grads:  # a short last group: rescale to a mean over what came
            torch._foreach_mul_(grads, t.gradient_accumulation / micro_batches)
        # one flag on the device: the step's loss or the global gradient norm (clipping's) is not finite
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        losses = self._step_losses
        loss_sum = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
        nonfinite = ~torch.isfinite(norm + loss_sum)
        if self.world_size > 1:  # the norm is global already; a rank's own loss is not
            nonfinite = distributed.all_reduce_max(nonfinite.to(torch.int32)).bool()
        if self._skip_on_device:
            self._masked_step(nonfinite, norm)
        elif bool(nonfinite):  # a CPU tensor: the read waits for nothing
            self._skipped_step(self.step)
        else:
            self._apply_step(norm)
        with warnings.catch_warnings():  # a skipped first step: torch warns that the schedule stepped first
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._step_rows = 0
        self._step_losses = []
        self._step_scores = []
        self.step += 1

    def _update_fisher(self) -> bool:
        a = self.config.aql_v2
        if self.uncertainty is None or self.step % a.fisher_update_freq != 0:
            return False
        token = self._clock.begin()
        if a.uncertainty_method == "laplace":
            # the loss of this step is a mean over its rows (tokens for language models), unscaled,
            # and backward ran since the last zero_grad: the estimator's per-step path
            self.uncertainty.update_from_grads(max(1, self._step_rows), check=False)
        elif a.uncertainty_method == "ensemble":
            self.uncertainty.train_ensemble(*self._last_batch)
        self._clock.end(token)
        return True

    def _deliver_scores(self, calls) -> None:
        if calls:
            token = self._clock.begin()
            for index, scores in calls:
                self.strategy.after_step(index, scores)
            self._clock.end(token)

    def _apply_step(self, norm: torch.Tensor) -> None:
        """A finite step: Fisher, clipping, AdamW, the strategy's after_step, the loss means."""
        self._update_fisher()
        if self.config.training.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._parameters, self.config.training.grad_clip, norm)
        self.optimizer.step()
        self._deliver_scores(self._step_scores)
        for loss in self._step_losses:
            self._interval_loss_sum += loss
            self._interval_loss_count += 1
            self._epoch_loss_sum += loss
            self._epoch_loss_count += 1
        self._nonfinite_in_a_row = 0

    def _skipped_step(self, step: int) -> None:
        """Bookkeeping of a step skipped for a non-finite loss or gradient; raises at the in-a-row limit."""
        self.nonfinite_steps += 1
        self._epoch_nonfinite += 1
        self._interval_nonfinite += 1
        self._nonfinite_in_a_row += 1
        limit = self.config.training.max_nonfinite_steps
        if self._nonfinite_in_a_row >= limit:
            raise NonFiniteError(f"aql.trainer: {self._nonfinite_in_a_row} optimizer steps in a row (up to step {step + 1}) had a "
                                 f"non-finite loss or gradient (training.max_nonfinite_steps={limit}); stopped. The parameters are "
                                 f"those of the last finite step; the last checkpoint ({self.checkpoint_path}) stands. Lower "
                                 "training.learning_rate or look for bad inputs")
        warnings.warn(f"aql.trainer: step {step + 1}: non-finite loss or gradient; the step was skipped (no parameter, Fisher "
                      f"or score update); {self.nonfinite_steps} skipped so far, {self._nonfinite_in_a_row} in a row "
                      f"(training.max_nonfinite_steps={limit})", RuntimeWarning, stacklevel=2)

    def _masked_step(self, nonfinite: torch.Tensor, norm: torch.Tensor) -> None:
        """The step with the flag left on the device (CUDA; see the module docstring)."""
        fisher = getattr(self.uncertainty, "fisher", None) if self.config.aql_v2.uncertainty_method == "laplace" else None
        backup = [f.clone() for f in fisher] if fisher is not None and self.step % self.config.aql_v2.fisher_update_freq == 0 else None
        if self._update_fisher() and backup is not None:
            for f, old in zip(fisher, backup):
                torch.where(nonfinite, old, f, out=f)
        if self.config.training.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self._parameters, self.config.training.grad_clip, norm)
        self.optimizer.found_inf = nonfinite.float()  # the fused AdamW skips the whole update where it is 1
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf
        finite = ~nonfinite
        for loss in self._step_losses:
            kept = torch.where(finite, loss, torch.zeros_like(loss))
            self._interval_loss_sum += kept
            self._interval_loss_count += finite
            self._epoch_loss_sum += kept
            self._epoch_loss_count += finite
        if nonfinite.device.type == "cuda":
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(nonfinite, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            flag, event = nonfinite.clone(), None
        self._resolve(keep_last=0)  # the previous step's flag: computed long ago
        self._unresolved.append((flag, event, self.step, self._step_scores))

    def _resolve(self, keep_last: int = 0) -> None:
        """Reads the flags of masked steps (all but the newest `keep_last`), delivers their after_step
        calls or counts them as skipped."""
        while len(self._unresolved) > keep_last:
            flag, event, step, calls = self._unresolved.pop(0)
            if event is not None:
                event.synchronize()
            if bool(flag):
                self._skipped_step(step)
            else:
                self._deliver_scores(calls)
                self._nonfinite_in_a_row = 0

    # ---------------------------------------------------------------------------------- selection
    def _counted(self, data_loader) -> Iterator:
        for batch in data_loader:
            self._consumed += 1
            yield batch

    def _candidate_scores(self, x: torch.Tensor, y: torch.Tensor):
        """Per-sample `SoftmaxScores` of candidates from a no-grad forward of the model in eval mode."""
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad(), self._autocast():
            logits = model_logits(self.model(x))
        self.model.train(was_training)
        targets = y.reshape(-1)
        return softmax_scores(*sample_view(logits, targets, x.shape[0]), ignore_index=self.ignore_index)

    def _candidate_batch(self, batch) -> tuple:
        """(x, y, index, weight) of a candidate batch, which must carry its samples' dataset indices."""
        x, y, index, weight = split_batch(batch)
        if index is None:
            raise TypeError(f"aql.trainer: strategy {self.strategy.name!r} selects among candidates by their dataset "
                            "indices: batches must be (x, y, index) or (x, y, index, weight)")
        return x, y, index, weight

    def _training_batches(self, data_loader) -> Iterator[tuple]:
        """Micro-batches (x, y, index, weight) to back-propagate, after the strategy's selection."""
        stream = self._counted(data_loader)
        if not self.strategy.scores_candidates:
            for batch in stream:
                yield (*split_batch(batch), None)
            return
        if self._shared_candidates:
            yield from self._shared_training_batches(stream)
            return
        batch_size = self.config.training.batch_size // self.world_size  # this rank's micro-batch
        pending = self._pending
        for batch in stream:
            x, y, index, weight = self._candidate_batch(batch)
            with self._clock.aql():
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                index = index.to(self.device, non_blocking=True)
                kept, kept_weight = split_selection(self.strategy.select(index, self._candidate_scores(x, y)))
                if kept.shape[0]:
                    if weight is not None:
                        weight = weight.to(self.device).index_select(0, kept)
                        kept_weight = weight if kept_weight is None else weight * kept_weight
                    pending.append(x.index_select(0, kept), y.index_select(0, kept), index.index_select(0, kept), kept_weight)
                self._epoch_looked_at += x.shape[0]
            while len(pending) >= batch_size:
                yield (*pending.take(batch_size), None)
        while pending.pieces:
            yield (*pending.take(batch_size), None)

    def _shared_training_batches(self, stream) -> Iterator[tuple]:
        """`_training_batches` under torch.distributed for a `scores_candidates` strategy: the one-process
        selection and batching. Each candidate batch is the global one (its index and weights; x, y of
        this rank's rows `index[rank::world]`, `epoch_loader`); `select_global` makes the one-process
        selection on every rank; the global queue of kept rows (`SharedPendingSamples`, the same on every
        rank) hands out the one-process training batches of `training.batch_size`, each rank training its
        own rows of each (a zero-weighted filler row where it holds none: DDP's all-reduce needs every
        rank's backward). Yields (x, y, index, weight, (global rows of the batch, filler?))."""
        batch_size = self.config.training.batch_size  # the global batch
        rank, world = self.rank, self.world_size
        pending = self._pending
        for batch in stream:
            x, y, index, weight = self._candidate_batch(batch)
            rows = len(range(rank, index.shape[0], world))
            if x.shape[0] != rows:
                raise ValueError(f"aql.trainer: under torch.distributed a candidate batch is the global batch's index with x, y "
                                 f"of this rank's rows index[{rank}::{world}] ({rows} of {index.shape[0]}), got {x.shape[0]} rows "
                                 "of x; train on trainer.epoch_loader(epoch)")
            with self._clock.aql():
                x = x.to(self.device, non_blocking=True)
                y = y.to(self.device, non_blocking=True)
                index = index.to(self.device, non_blocking=True)
                mine = index[rank::world]
                if rows:
                    scores = self._candidate_scores(x, y)
                else:  # fewer candidates than ranks: statistics of no rows, of the same fields
                    filler = self._candidate_scores(*(v.to(self.device) for v in self._filler_row()))
                    scores = type(filler)(*(None if field is None else field[:0] for field in filler))
                kept, kept_weight = self.strategy.select_global(index, scores)
                if kept.shape[0]:
                    if weight is not None:
                        weight = weight.to(self.device).index_select(0, kept)
                        kept_weight = weight if kept_weight is None else weight * kept_weight
                    owned, local = _ranks.owned_positions(kept, rank, world)
                    pending.append(owned, x.index_select(0, local), y.index_select(0, local), mine.index_select(0, local),
                                   None if kept_weight is None else kept_weight[owned.to(kept_weight.device)])
                self._epoch_looked_at += index.shape[0]
            while len(pending) >= batch_size:
                yield self._shared_batch(*pending.take(batch_size))
        while len(pending):
            yield self._shared_batch(*pending.take(batch_size))

    def _filler_row(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the training set's first sample: the row a rank trains with weight 0 when it holds no
        row of a step (and the shape of statistics of no rows)."""
        if self._filler is None:
            self._filler = gather(self.train_data, torch.zeros(1, dtype=torch.int64))
        return self._filler

    def _shared_batch(self, rows, total: int) -> tuple:
        """A training batch of the global queue as this rank trains it: its rows, or the filler row."""
        if rows is not None:
            return (*rows, (total, False))
        x, y = self._filler_row()
        return x, y, torch.zeros(0, dtype=torch.int64, device=self.device), None, (total, True)

    # ---------------------------------------------------------------------------------- epoch loop
    def train_epoch(self, data_loader) -> dict[str, Any]:
        """Trains one epoch on `data_loader` (training batches for strategies that select before the
        epoch, candidate batches for `scores_candidates` strategies), evaluates val, checkpoints;
        returns the epoch's metrics."""
        self.model.train()
        self._move_epoch_state()
        accumulation = self.config.training.gradient_accumulation
        micro = 0
        max_steps = self.config.training.max_steps
        for x, y, index, weight, shared in self._training_batches(data_loader):
            self._at_boundary = False
            with self._gradient_sync(micro + 1 == accumulation):
                if shared is None:
                    self._micro_step(x, y, index, weight, 1.0 / accumulation)
                else:
                    self._micro_step(x, y, index, weight, 1.0 / accumulation, shared)
            micro += 1
            if micro == accumulation:
                self._optimizer_step(micro)
                micro = 0
                self._after_step()
                if max_steps and self.step >= max_steps:
                    break
        if micro:
            self._average_gradients()  # its backwards ran under no_sync
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
            self.save_checkpoint()
        if self._stop_now():
            self.save_checkpoint()
            raise KeyboardInterrupt(f"aql.trainer: interrupted ({self._stop_requested}); checkpoint written at step {self.step} "
                                    f"to {self.checkpoint_path}")

    def _log_interval(self) -> None:
        self._resolve()
        aql_time, total = self._clock.lap()
        self._epoch_aql_time += aql_time
        self._epoch_total_time += total
        epoch_samples, epoch_tokens = self._epoch_samples, int(self._epoch_tokens)
        if self.world_size > 1:
            loss_sum, count, epoch_samples, epoch_tokens = self._global_sums(
                self._interval_loss_sum, self._interval_loss_count, self._epoch_samples, self._epoch_tokens)
            self._interval_loss_sum.fill_(loss_sum)
            self._interval_loss_count.fill_(count)
            epoch_samples, epoch_tokens = int(epoch_samples), int(epoch_tokens)
        count = float(self._interval_loss_count)
        record = {
            "event": "train", "step": self.step, "epoch": self.epoch,
            "train_loss": float(self._interval_loss_sum) / count if count else float("nan"),
            "lr": self.scheduler.get_last_lr()[0],
            "overhead_time": aql_time, "overhead_pct": overhead_percent(aql_time, total), "interval_time": total,
            "samples_backpropagated": self.total_samples + epoch_samples,
            "tokens_backpropagated": self.total_tokens + epoch_tokens,
            "nonfinite_steps": self._interval_nonfinite,
        }
        self._interval_loss_sum.zero_()
        self._interval_loss_count.zero_()
        self._interval_nonfinite = 0
        self._write_record(record)
        if self._progress is not None:
            self._progress.set_postfix(loss=f"{record['train_loss']:.4f}", overhead=f"{record['overhead_pct']:.2f}%")

    def _end_epoch(self) -> dict[str, Any]:
        self._resolve()
        if self.world_size > 1:  # the epoch's sums over the ranks (the per-rank ones are reset below)
            loss_sum, loss_count, samples, tokens = self._global_sums(
                self._epoch_loss_sum, self._epoch_loss_count, self._epoch_samples, self._epoch_tokens)
            self._epoch_loss_sum.fill_(loss_sum)
            self._epoch_loss_count.fill_(loss_count)
            self._epoch_samples = int(samples)
            self._epoch_tokens.fill_(int(tokens))
        aql_time, total = self._clock.lap()
        self._epoch_aql_time += aql_time
        self._epoch_total_time += total
        count = float(self._epoch_loss_count)
        tokens = int(self._epoch_tokens)
        self.total_samples += self._epoch_samples
        self.total_tokens += tokens
        metrics: dict[str, Any] = {
            "epoch": self.epoch, "step": self.step,
            "train_loss": float(self._epoch_loss_sum) / count if count else float("nan"),
            "data_selected": self._epoch_samples / len(self.train_data),
            "samples_backpropagated": self._epoch_samples,
            "tokens_backpropagated": tokens,
            "total_samples_backpropagated": self.total_samples,
            "total_tokens_backpropagated": self.total_tokens,
            "nonfinite_steps": self._epoch_nonfinite,
            "lr": self.scheduler.get_last_lr()[0],
        }
        if self.val_data is not None:
            val = self.evaluate(self.val_data)
            metrics.update({f"val_{k}": v for k, v in val.items()})
        else:
            metrics["val_loss"] = float("nan")
        # the strategy's end of epoch (e.g. the score store's write-back) is AQL work, evaluation is not
        self._clock.restart()
        if self.strategy.uses_scores:
            with self._clock.aql():
                metrics.update(self.strategy.end_epoch(metrics))
        else:
            metrics.update(self.strategy.end_epoch(metrics))
        aql_time, total = self._clock.lap()
        self._epoch_aql_time += aql_time
        self._epoch_total_time += total
        metrics["overhead_time"] = self._epoch_aql_time
        metrics["overhead_pct"] = overhead_percent(self._epoch_aql_time, self._epoch_total_time)
        metrics["train_time"] = self._epoch_total_time
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
        t = self.config.training
        size = eval_batch_size(t.eval_batch_size, rows_per_sample=getattr(dataset, "tokens_per_sample", 1),
                               outputs=num_outputs(self.config.model), memory_mb=t.eval_memory_mb)
        from tqdm.auto import tqdm  # a bar on a terminal only (disable=None), unless logging.progress_bar is off

        for start in tqdm(range(0, len(dataset), size), disable=None if self.config.logging.progress_bar else True,
                          leave=False, desc="evaluating", unit="batch", dynamic_ncols=True):
            x, y = gather(dataset, torch.arange(start, min(start + size, len(dataset))))
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = model_logits(self.model(x))
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
    def epoch_loader(self, epoch: int) -> EpochLoader:
        """The loader `fit` trains epoch `epoch` on: the strategy's plan for the epoch as
        (x, y, index, weight) batches (training batches, or candidate batches for `scores_candidates`
        strategies), minus the batches already consumed when resuming inside the epoch."""
        if self.strategy.uses_scores:  # the plan may select (next_subset): AQL work
            with self._clock.aql():
                plan = self.strategy.epoch_plan(epoch)
        else:
            plan = self.strategy.epoch_plan(epoch)
        if self._shared_candidates:  # every rank iterates the global candidate batches, scoring its rows of each
            return EpochLoader(self.train_data, self.strategy, plan, self.config.training.batch_size, skip=self._consumed,
                               device=self.device, rank=self.rank, world=self.world_size)
        plan = self.strategy.shard_plan(plan)  # this rank's positions r, r + R, ... (the plan itself in one process)
        return EpochLoader(self.train_data, self.strategy, plan, self.config.training.batch_size // self.world_size,
                           skip=self._consumed, device=self.device)

    def fit(self, epochs: int | None = None, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
        """Trains `config.training.epochs` epochs (or until max_steps); evaluates test at the end.

        resume=True continues from the newest checkpoint of `<output_dir>` that verifies (checkpoint.pt,
        else checkpoint.1.pt, ...; a fresh start when there is none); overwrite=True deletes the
        checkpoints and metrics.jsonl of a run already there. A fresh trainer whose output folder holds a
        run and that is given neither raises `CheckpointError` (see the module docstring).
        """
        epochs = self.config.training.epochs if epochs is None else epochs
        self._prepare_output_on_main(resume=resume, overwrite=overwrite)
        if resume:
            self._resume()
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
        self._resolve()
        result = self.summary()
        if result["overhead_pct"] > result["target_overhead_pct"]:
            warnings.warn(f"aql.trainer: the AQL overhead of this run, {result['overhead_pct']:.2f}% of the training time, exceeds "
                          f"aql_v2.target_overhead ({result['target_overhead_pct']:.2f}%)", RuntimeWarning, stacklevel=2)
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
            "strategy": self.strategy.name, "epochs": self.epoch, "steps": self.step,
            "samples_backpropagated": self.total_samples, "tokens_backpropagated": self.total_tokens,
            "train_loss": self.history[-1]["train_loss"] if self.history else float("nan"),
            "val_loss": self.history[-1]["val_loss"] if self.history else float("nan"),
            "data_selected": (sum(m["data_selected"] for m in self.history) / len(self.history)) if self.history else 0.0,
            "overhead_time": aql, "overhead_pct": overhead_percent(aql, total), "train_time": total,
            "nonfinite_steps": self.nonfinite_steps,
            "target_overhead_pct": 100.0 * self.config.aql_v2.target_overhead,
            "history": list(self.history),
        }

    @contextlib.contextmanager
    def _progress_bar(self):
        if not self.config.logging.progress_bar or not self._is_main:
            yield
            return
        from tqdm.auto import tqdm

        self._progress = tqdm(total=self.total_steps, initial=self.step, desc=f"aql[{self.strategy.name}]", unit="step",
                              dynamic_ncols=True)
        try:
            yield
        finally:
            self._progress.close()
            self._progress = None

    #: the signals that stop a run at the end of the running step, with a checkpoint (SIGINT: Ctrl-C;
    #: SIGTERM: kill, schedulers, containers stopping; SIGHUP: the terminal closed)
    STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))

    def _install_sigint(self):
        """Defers SIGINT, SIGTERM and SIGHUP to the end of the running step; returns the previous handlers."""
        if threading.current_thread() is not threading.main_thread():
            return None

        def request_stop(signum, frame):
            if self._stop_requested:  # the second signal: stop now
                raise KeyboardInterrupt(f"aql.trainer: {signal.Signals(signum).name} again; stopped inside a step")
            self._stop_requested = signal.Signals(signum).name
            print(f"\naql: {self._stop_requested}: finishing the current step, writing a checkpoint, then stopping "
                  "(send it again to stop at once)", flush=True)

        return {number: signal.signal(number, request_stop) for number in self.STOP_SIGNALS}

    @staticmethod
    def _restore_sigint(previous) -> None:
        for number, handler in (previous or {}).items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    # --------------------------------------------------------------------------------------- logging
    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.jsonl"

    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / "checkpoint.pt"

    def _start_logging(self) -> None:
        if not self._is_main:
            return  # rank 0 logs and writes files
        self.output_dir.mkdir(parents=True, exist_ok=True)
        save_config(self.config, self.output_dir / "config.yaml")  # the resolved config beside metrics.jsonl
        if self._wandb_module is not None and self._wandb is None:
            lg = self.config.logging
            self._wandb = self._wandb_module.init(project=lg.wandb_project, tags=list(lg.wandb_tags), config=self.config.to_dict(),
                                                  dir=str(self.output_dir), resume="allow")

    def _write_record(self, record: dict) -> None:
        if not self._is_main:
            return
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
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "uncertainty": self.uncertainty.state_dict() if self.uncertainty is not None and hasattr(self.uncertainty, "state_dict") else None,
            "strategy": self.strategy.name,
            "selection": self.strategy.state_dict(),
            "rng": rng_states(),
            "step": self.step,
            "epoch": self.epoch,
            "config": self.config.to_dict(),
            "totals": {"samples": self.total_samples, "tokens": self.total_tokens, "nonfinite_steps": self.nonfinite_steps,
                       "nonfinite_in_a_row": self._nonfinite_in_a_row},
            "history": self.history,
            "metrics": self.metrics,
            "position": {
                "consumed": self._consumed,
                "pending": [tuple(cpu(v) for v in piece) for piece in self._local_pending().pieces],
                # under ranks for a scores_candidates strategy: the global queue's rows, True where this rank's
                **({"pending_owners": [m.clone() for m in self._pending.owners]} if self._shared_candidates else {}),
                "loss_sum": float(self._epoch_loss_sum), "loss_count": float(self._epoch_loss_count),
                "samples": self._epoch_samples, "tokens": int(self._epoch_tokens),
                "aql_time": self._epoch_aql_time, "total_time": self._epoch_total_time, "looked_at": self._epoch_looked_at,
                "nonfinite": self._epoch_nonfinite,
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        where = "aql.trainer.AQLv2Trainer.load_state_dict"
        saved_world = state.get("world_size", 1)
        if saved_world != self.world_size:
            raise CheckpointError(f"{where}: the checkpoint was written by {saved_world} rank(s), this run has {self.world_size}; "
                             "resume with the same number of processes (torchrun --nnodes / --nproc_per_node)")
        if self.world_size > 1:
            state = {**state, **state["ranks"][self.rank]}  # this rank's own part
        if state.get("strategy") != self.strategy.name:
            raise ValueError(f"{where}: the checkpoint was written by selection_strategy {state.get('strategy')!r}, "
                             f"this trainer runs {self.strategy.name!r}")
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{where}: checkpoint format {state.get('format')!r} is not this version's {CHECKPOINT_FORMAT}; "
                             "resume it with the aql version that wrote it")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        # the schedule's shape (total steps, warmup) is this config's, not the checkpoint's: see the module docstring
        self.scheduler.load_state_dict({**state["scheduler"], "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        self._apply_optimizer_settings()
        if self.uncertainty is not None and state["uncertainty"] is not None:
            self.uncertainty.load_state_dict(state["uncertainty"])
        self.strategy.load_state_dict(state["selection"])
        set_rng_states(state["rng"])
        self.step, self.epoch = state["step"], state["epoch"]
        self.total_samples, self.total_tokens = state["totals"]["samples"], state["totals"]["tokens"]
        self.nonfinite_steps = int(state["totals"].get("nonfinite_steps", 0))
        self._nonfinite_in_a_row = int(state["totals"].get("nonfinite_in_a_row", 0))
        self.history = list(state["history"])
        self.metrics = {k: list(v) for k, v in state["metrics"].items()}
        position = state["position"]
        self._reset_epoch_state()
        self._consumed = position["consumed"]
        local = PendingSamples(tuple(None if v is None else v.to(self.device) for v in piece) for piece in position["pending"])
        self._pending = SharedPendingSamples(local, position["pending_owners"]) if self._shared_candidates else local
        self._epoch_loss_sum = torch.tensor(position["loss_sum"], dtype=torch.float64)
        self._epoch_loss_count = torch.tensor(position["loss_count"], dtype=torch.float64)
        self._epoch_samples = position["samples"]
        self._epoch_tokens = torch.tensor(position["tokens"], dtype=torch.int64)
        self._epoch_aql_time, self._epoch_total_time = position["aql_time"], position["total_time"]
        self._epoch_looked_at = position["looked_at"]
        self._epoch_nonfinite = int(position.get("nonfinite", 0))

    def _local_pending(self) -> PendingSamples:
        """The kept rows this process holds (under ranks for a scores_candidates strategy: its own)."""
        return self._pending.local if self._shared_candidates else self._pending

    def _apply_optimizer_settings(self) -> None:
        """This config's learning rate, weight decay and kernel choice on the loaded optimizer and
        schedule (optimizer.load_state_dict restores the saved ones), and the LR of the current step."""
        t = self.config.training
        schedule = WarmupCosine(t.warmup_steps, self.total_steps)
        self.scheduler.lr_lambdas = [schedule] * len(self.optimizer.param_groups)
        self.scheduler.base_lrs = [t.learning_rate] * len(self.optimizer.param_groups)
        for group in self.optimizer.param_groups:
            group["weight_decay"] = t.weight_decay if group["params"][0].dim() >= 2 else 0.0  # the groups of __init__
            group["initial_lr"] = t.learning_rate
            group["fused"] = True if self._skip_on_device else None
            group["foreach"] = None
        self.scheduler._last_lr = [base * schedule(self.scheduler.last_epoch) for base in self.scheduler.base_lrs]
        for group, lr in zip(self.optimizer.param_groups, self.scheduler._last_lr):
            group["lr"] = lr

    def save_checkpoint(self, path: str | os.PathLike | None = None) -> Path:
        """Writes the full training state (checksummed, atomically; see `aql.training.checkpoint`), keeping
        the last `logging.keep_checkpoints` when `path` is the run's checkpoint. Refuses (NonFiniteError)
        to write parameters that are not finite: the last good checkpoint stands."""
        self._resolve()
        path = Path(path) if path is not None else self.checkpoint_path
        finite = torch.stack([torch.isfinite(p).all() for p in self.model.parameters()]).all() if self._parameters else True
        if not bool(finite):
            raise NonFiniteError(f"aql.trainer: the parameters hold non-finite values at step {self.step}; not writing {path} "
                                 "(the last checkpoint stands)")
        keep = self.config.logging.keep_checkpoints if path == self.checkpoint_path else 1
        state = self.state_dict()
        if self.world_size > 1:  # every rank's own part, gathered to rank 0, which alone writes
            shards = distributed.gather_objects(_on_cpu({key: state[key] for key in _PER_RANK}))
            if not self._is_main:
                return path
            state["ranks"], state["world_size"] = shards, self.world_size
        return write_checkpoint(state, path, keep=keep)

    def load_checkpoint(self, path: str | os.PathLike | None = None) -> None:
        """Loads a checkpoint written by `save_checkpoint` (verified, weights_only; `CheckpointError`
        when the file is not usable; `CheckpointError` listing the keys when its config would make a
        different run)."""
        path = Path(path) if path is not None else self.checkpoint_path
        state = read_checkpoint(path)
        self._check_resumable(state, path)
        self.load_state_dict(state)

    def _check_resumable(self, state: dict, path: Path) -> dict[str, tuple]:
        """Refuses a checkpoint whose config differs in `RESUME_BREAKING` keys; returns the other differences."""
        saved = state.get("config")
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path}: holds no config")
        breaking, applied = config_differences(saved, self.config.to_dict())
        if breaking:
            listed = "; ".join(f"{key}: {before!r} -> {after!r}" for key, before, after in
                               ((k, *v) for k, v in breaking.items()))
            raise CheckpointError(f"checkpoint {path}: cannot resume with this config, these keys would make a different run: "
                                  f"{listed}. Restore them, or start a new run (--overwrite or another --output-dir)")
        return applied

    # ------------------------------------------------------------------------------------- run folder
    def _prepare_output(self, *, resume: bool, overwrite: bool) -> None:
        """Start-up checks of the output folder: refuse what would fail only after training (a dangling
        checkpoint link, a folder in its place), delete temporaries of killed writes, refuse to start a
        fresh run over an existing one unless resume or overwrite."""
        if resume and overwrite:
            raise ValueError("aql.trainer.AQLv2Trainer.fit: resume and overwrite exclude each other; pass one")
        if self.output_dir.exists() and not self.output_dir.is_dir():
            raise CheckpointError(f"output folder {self.output_dir}: exists and is not a folder")
        for path in (self.checkpoint_path, self.metrics_path):
            if path.is_symlink() and not path.exists():
                raise CheckpointError(f"{path}: a dangling symbolic link (to {os.readlink(path)}); remove it or point it at a file")
            if path.is_dir():
                raise CheckpointError(f"{path}: a directory where the run writes a file; remove it or choose another output folder")
        for removed in remove_stale_temporaries(self.checkpoint_path):
            print(f"aql: removed {removed}, the temporary file of a checkpoint write that did not finish", flush=True)
        fresh = self.step == 0 and self.epoch == 0 and not self.history
        existing = checkpoint_files(self.checkpoint_path)
        if self.metrics_path.is_file() and self.metrics_path.stat().st_size:
            existing.append(self.metrics_path)
        if not existing or not fresh:
            return
        if overwrite:
            for path in existing:
                path.unlink()
            return
        if not resume:
            names = ", ".join(p.name for p in existing)
            raise CheckpointError(f"output folder {self.output_dir}: already holds a run ({names}); resume it (--resume, "
                                  "fit(resume=True)) or replace it (--overwrite, fit(overwrite=True)), or choose another folder")

    def _prepare_output_on_main(self, *, resume: bool, overwrite: bool) -> None:
        """`_prepare_output` on rank 0, its refusal raised on every rank (the others wait for it)."""
        if self.world_size == 1:
            self._prepare_output(resume=resume, overwrite=overwrite)
            return
        error = None
        if self._is_main:
            try:
                self._prepare_output(resume=resume, overwrite=overwrite)
            except (CheckpointError, ValueError) as caught:
                error = caught
        error = distributed.broadcast_object(error)
        if error is not None:
            raise error

    def _resume(self) -> None:
        """Loads the newest checkpoint that verifies (saying which ones did not), applies and reports the
        config changes, and drops the metrics records written after it."""
        failures = []
        for path in checkpoint_files(self.checkpoint_path):
            try:
                state = read_checkpoint(path)
            except CheckpointError as error:
                failures.append(str(error))
                continue
            applied = self._check_resumable(state, path)
            self.load_state_dict(state)
            break
        else:
            if failures:
                raise CheckpointError(f"output folder {self.output_dir}: no usable checkpoint: " + "; ".join(failures))
            self._truncate_metrics(0)
            return
        for failure in failures:
            print(f"aql: {failure}", flush=True)
        if failures:
            print(f"aql: resuming from {path}, the newest checkpoint that verifies (step {self.step})", flush=True)
        changes = {key: [before, after] for key, (before, after) in applied.items()}
        if changes:
            listed = "; ".join(f"{key}: {before!r} -> {after!r}" for key, (before, after) in changes.items())
            print(f"aql: resuming {path} at step {self.step} with config changes: {listed}", flush=True)
        self._truncate_metrics(self.step)
        self._write_record({"event": "resume", "step": self.step, "epoch": self.epoch, "checkpoint": str(path),
                            "skipped_checkpoints": failures, "changes": changes})

    def _truncate_metrics(self, step: int) -> None:
        """Drops metrics.jsonl records after `step` and the old `fit` summaries (written again at the end)."""
        if not self._is_main:
            return
        if not self.metrics_path.is_file():
            return
        kept = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(record, dict) and record.get("event") != "fit" and record.get("step", 0) <= step:
                kept.append(line)
        temporary = self.metrics_path.with_name(f".{self.metrics_path.name}.tmp{os.getpid()}")
        temporary.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(temporary, self.metrics_path)
