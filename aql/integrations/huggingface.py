"""`transformers.Trainer` with per-sample scores, data selection and the Fisher update.

The change to an existing setup is the class and one argument::

    from aql.integrations.huggingface import AQLTrainer
    from aql.strategies import StaleStrategy

    strategy = StaleStrategy(len(train_dataset), query_budget=0.2, device=args.device)
    trainer = AQLTrainer(model=model, args=args, train_dataset=train_dataset, strategy=strategy)  # was Trainer(...)
    trainer.train()

What it does, each at the Trainer's own extension point:

- the training set's items (dicts, as the Trainer's collators take them) get their dataset index under
  `"aql_index"` (`IndexedFeatures`); the key passes the Trainer's unused-column removal, reaches
  `compute_loss` with the batch, and is taken out there: the model never sees it;
- `compute_loss`: the model's forward without `labels`, then `aql_kernels.cross_entropy_with_scores` on
  its logits: the same loss the model (or the Trainer's label smoother) computes, with the same
  reduction (a mean over the valid tokens, or their sum divided by `num_items_in_batch` under gradient
  accumulation), and from the same pass one score per sample (for `[B, T, V]` logits, the mean of each
  statistic over the sequence's valid tokens). Causal LMs (the models whose loss the Trainer knows
  shifts its labels) are scored with `shift=True`: labels[:, 1:] against logits[:, :-1];
- `_get_train_sampler`: an `aql.sampling.SelectionSampler` over the strategy's plan. The Trainer builds
  its DataLoader (and sizes the LR schedule from its length: `samples_per_epoch` per epoch) once; each
  epoch the sampler draws that epoch's selection, so the schedule runs on and never restarts;
- `AQLCallback`: the epoch's plan at `on_epoch_begin`, the Fisher update at `on_pre_optimizer_step`
  (the gradients there are clipped when `max_grad_norm > 0`), the step's scores handed to the strategy
  at `on_step_end` (dropped for a step the gradient scaler skipped), the strategy's write-back at
  `on_epoch_end`, and the strategy's state written into each checkpoint folder (`aql_state.pt`;
  `train(resume_from_checkpoint=...)` reads it back);
- `log`: every training log gains `aql_overhead_pct` (the AQL machinery's time as a percentage of the
  rest of the training time since the last log; the fused loss's own cost counts as training, as in
  `aql.training`) and `aql_data_selected` (the share of the training set the epoch trains on); the
  final summary gains the whole run's `aql_overhead_pct`.

`AQLTrainerMixin` brings the same to another `Trainer` subclass: `class MyTrainer(AQLTrainerMixin,
SomeTrainer)`. Limits (refused with a message, not ignored): one process on one device (the per-rank
tables are not merged across ranks), labels under `"labels"`, no `compute_loss_func`, the Trainer's
default `"random"` train sampling (the strategy decides the order), and strategies that plan whole
epochs (not the candidate-scoring ones).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping

import torch

from aql.errors import require

from ._core import SelectionSession

transformers = require("transformers", "huggingface", "aql.integrations.huggingface")
# the Trainer needs accelerate with PyTorch: say so at import, not at the first train()
require("accelerate", "huggingface", "aql.integrations.huggingface")

import aql_kernels  # noqa: E402

__all__ = ["AQLTrainer", "AQLTrainerMixin", "AQLCallback", "IndexedFeatures", "INDEX_KEY", "STATE_FILE"]

#: the batch key that carries the samples' dataset indices (taken out before the model's forward)
INDEX_KEY = "aql_index"
#: the file each checkpoint folder gets with the strategy's (and estimator's) state
STATE_FILE = "aql_state.pt"


class IndexedFeatures(torch.utils.data.Dataset):
    """`dataset[i]` (a mapping of features) as a dict with `INDEX_KEY: i` added, so the index travels
    through any collator that turns integer features into tensors (the Trainer's default ones do)."""

    def __init__(self, dataset):
        if isinstance(dataset, torch.utils.data.IterableDataset) or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"aql.integrations.huggingface.IndexedFeatures: the training set must be a map-style dataset "
                            f"(with __getitem__ and __len__; the strategy plans over its indices), got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        item = self.dataset[index]
        if not isinstance(item, Mapping):
            raise TypeError(f"aql.integrations.huggingface.IndexedFeatures: items must be mappings of features (as "
                            f"transformers.Trainer takes them), got {type(item).__name__} at index {index}")
        if INDEX_KEY in item:
            raise ValueError(f"aql.integrations.huggingface.IndexedFeatures: item {index} already has a {INDEX_KEY!r} feature")
        return {**item, INDEX_KEY: index}


class AQLCallback(transformers.TrainerCallback):
    """The Trainer's hooks mapped onto a `SelectionSession` (see the module docstring). Added by
    `AQLTrainerMixin`; not meant to be used alone (the loss and the sampler come from the trainer)."""

    def __init__(self, trainer: AQLTrainerMixin):
        self.trainer = trainer

    @property
    def session(self) -> SelectionSession:
        return self.trainer.aql_session

    def on_train_begin(self, args, state, control, **kwargs):
        self.session.start_clock(args.device)

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is the float epoch reached (e.g. 1.5 when resumed halfway through the second epoch)
        self.session.begin_epoch(int(math.floor((state.epoch or 0.0) + 1e-6)))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.session.before_optimizer_step()

    def on_step_end(self, args, state, control, **kwargs):
        accelerator = getattr(self.trainer, "accelerator", None)
        self.session.after_optimizer_step(applied=not getattr(accelerator, "optimizer_step_was_skipped", False))

    def on_epoch_end(self, args, state, control, **kwargs):
        self.session.end_epoch({})

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{transformers.trainer_utils.PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            torch.save(self.session.state_dict(), os.path.join(folder, STATE_FILE))


class AQLTrainerMixin:
    """Per-sample scores, data selection and the Fisher update for a `transformers.Trainer` subclass
    (see the module docstring). Keyword arguments on top of the Trainer's:

    strategy: an `aql.strategies.SelectionStrategy` over `len(train_dataset)` samples, on the device the
      model trains on (e.g. `StaleStrategy(len(train_dataset), query_budget=0.2, device=args.device)`).
    estimator: None, or e.g. `aql.uncertainty.LaplacianUncertainty(model)`: its Fisher EMA is updated at
      every `fisher_update_freq`-th optimizer step.
    shift_labels: score labels[:, 1:] against logits[:, :-1]; None (default): as the Trainer decides
      for the model's own loss (causal LMs shift).
    """

    def __init__(self, *args, strategy, estimator=None, fisher_update_freq: int = 1, shift_labels: bool | None = None, **kwargs):
        where = f"integrations.huggingface.{type(self).__name__}"
        self.aql_session = SelectionSession(strategy, estimator=estimator, fisher_update_freq=fisher_update_freq, where=where)
        if shift_labels is not None and not isinstance(shift_labels, bool):
            raise TypeError(f"aql.{where}: shift_labels must be a bool or None, got {type(shift_labels).__name__} {shift_labels!r}")
        super().__init__(*args, **kwargs)
        self._aql_where = where
        self._aql_shift = shift_labels if shift_labels is not None else self._model_shifts_labels()
        self._check_setup()
        self.add_callback(AQLCallback(self))

    def _model_shifts_labels(self) -> bool:
        """Whether the model's own loss scores labels[:, 1:] against logits[:, :-1]: its loss function is
        transformers' causal-LM loss, or (older versions) its class is a causal LM; never for
        encoder-decoder models (their decoder inputs are already shifted)."""
        model = self.accelerator.unwrap_model(self.model)
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            return False
        try:
            from transformers.loss.loss_utils import ForCausalLMLoss
        except ImportError:  # transformers < 4.46 has no loss registry
            ForCausalLMLoss = None
        if ForCausalLMLoss is not None and getattr(model, "loss_function", None) is ForCausalLMLoss:
            return True
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()

    def _check_setup(self) -> None:
        where, args = self._aql_where, self.args
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(f"aql.{where}: compute_loss_func replaces the loss that the fused scores come from; "
                             "leave it None (the loss is the cross-entropy of the model's logits)")
        sampling = getattr(args, "train_sampling_strategy", "random")
        if getattr(args, "group_by_length", False) or sampling != "random":
            raise ValueError(f"aql.{where}: the strategy decides which samples an epoch trains on and in which order; "
                             f"TrainingArguments train_sampling_strategy must be 'random' (and group_by_length False), got {sampling!r}")
        if args.world_size > 1 or args.n_gpu > 1:
            raise NotImplementedError(f"aql.{where}: one process on one device only (got world_size {args.world_size}, n_gpu "
                                      f"{args.n_gpu}): each rank or replica would keep its own score table, and merging them is "
                                      "not supported yet; set CUDA_VISIBLE_DEVICES to one GPU")
        self._check_train_dataset()

    def _check_train_dataset(self) -> None:
        if self.train_dataset is not None and len(self.train_dataset) != self.aql_session.strategy.num_samples:
            raise ValueError(f"aql.{self._aql_where}: the strategy plans over {self.aql_session.strategy.num_samples} samples but "
                             f"train_dataset has {len(self.train_dataset)}")

    # -- the Trainer's extension points -------------------------------------------------------------
    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if INDEX_KEY not in self._signature_columns:  # the index passes the unused-column removal
            self._signature_columns.append(INDEX_KEY)

    def get_train_dataloader(self):
        """The Trainer's training DataLoader over the training set with each item's index added
        (`IndexedFeatures`), drawn by the strategy's sampler."""
        if self.train_dataset is not None and not isinstance(self.train_dataset, IndexedFeatures):
            self._check_train_dataset()  # also when train_dataset was replaced after construction
            self.train_dataset = IndexedFeatures(self.train_dataset)
        return super().get_train_dataloader()

    def _get_train_sampler(self, *args, **kwargs):
        return self.aql_session.sampler

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """The model's logits (a forward without labels) and `aql_kernels.cross_entropy_with_scores` on
        them: the loss the stock `compute_loss` returns for the batch (same reduction and label
        smoothing), and the per-sample scores of the same pass, queued for the strategy."""
        inputs = dict(inputs)
        index = inputs.pop(INDEX_KEY, None)
        if "labels" not in inputs:
            raise ValueError(f"aql.{self._aql_where}.compute_loss: the batch has no 'labels' (keys: {sorted(inputs)}); the "
                             "fused loss needs the targets under 'labels'")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        # as the stock compute_loss: a sum divided by the step's item count when the model takes loss
        # kwargs and the Trainer counted them (the loss is then already scaled for accumulation)
        scaled = bool(self.model_accepts_loss_kwargs) and num_items_in_batch is not None
        sequence = logits.dim() == 3
        loss, scores = aql_kernels.cross_entropy_with_scores(
            logits, labels.to(logits.device), reduction="sum" if scaled else "mean", label_smoothing=self.args.label_smoothing_factor,
            shift=self._aql_shift and sequence, per_sample="mean" if sequence else None)
        if scaled:
            loss = loss / num_items_in_batch
        if model.training:
            if index is None:
                raise ValueError(f"aql.{self._aql_where}.compute_loss: a training batch without {INDEX_KEY!r}: the per-sample "
                                 "scores cannot be written back (batches come from get_train_dataloader, whose dataset adds it)")
            self.aql_session.record(index, scores)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (evaluation logs carry eval_loss)
            logs.update(self.aql_session.lap())
        elif "train_runtime" in logs:  # the summary at the end of train()
            logs.update(self.aql_session.run_overhead())
        super().log(logs, *args, **kwargs)

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`Trainer.train`; resuming also restores the strategy's state from the checkpoint's
        `aql_state.pt` (warns when the checkpoint has none: the selection then starts afresh)."""
        folder = resume_from_checkpoint
        if folder is True or folder == "True":  # as the Trainer resolves it
            folder = transformers.trainer_utils.get_last_checkpoint(self.args.output_dir)
        if isinstance(folder, (str, os.PathLike)) and folder:
            path = os.path.join(folder, STATE_FILE)
            if os.path.isfile(path):
                self.aql_session.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                warnings.warn(f"aql.{self._aql_where}.train: checkpoint {folder} has no {STATE_FILE}; the selection "
                              "starts from an empty score table", RuntimeWarning, stacklevel=2)
        return super().train(resume_from_checkpoint, *args, **kwargs)


class AQLTrainer(AQLTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` with `AQLTrainerMixin` (see the module docstring)."""
