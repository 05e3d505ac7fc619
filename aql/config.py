"""Typed configuration for the AQL trainer: `load_config(path, overrides=())`.

The YAML file has the sections of the design document's template (``model``, ``training``, ``aql_v2``,
``logging``) plus ``data`` and two top-level keys (``seed``, ``device``). Every key has a default, so a
file only names what it changes; `configs/aql_v2_config.yaml` is the template itself, loadable as-is.

Rules (each violation is a `ConfigError` naming the key, the value and what is allowed):
unknown sections or keys, values of the wrong type, `aql_v2.query_budget` outside (0, 1], decays outside
[0, 1), unknown choices (`aql_v2.uncertainty_method`, `aql_v2.selection_strategy`, `aql_v2.score`, ...),
`aql_v2.strategy_options` keys that are no option of the chosen strategy, a key or section repeated in
the YAML file (named with its line), seeds outside [0, 2**32 - 1].
`aql_v2.selection_strategy` takes the name of any registered strategy (`aql.strategies.STRATEGIES`;
`SELECTION_STRATEGIES` here is read from that registry, so a new strategy needs no edit of this file).
PyYAML reads `3e-4` as a string (YAML 1.1 wants a dot in a float), so float fields accept numeric strings.
Command-line overrides `section.key=value` are parsed as YAML scalars and validated the same way.
`save_config(config, path)` writes a Config back as YAML (every run folder holds its resolved
`config.yaml` beside `metrics.jsonl`); `load_config` reads it back to an equal Config.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from .errors import AQLError

__all__ = [
    "ConfigError",
    "ModelConfig",
    "TrainingConfig",
    "AQLConfig",
    "LoggingConfig",
    "DataConfig",
    "Config",
    "load_config",
    "save_config",
    "config_from_dict",
    "parse_override",
    "MODEL_TYPES",
    "UNCERTAINTY_METHODS",
    "SELECTION_STRATEGIES",
    "SCORES",
    "SCORERS",
    "DATASETS",
    "TOKENIZERS",
]


class ConfigError(AQLError, ValueError):
    """A configuration value that is not allowed; the message names the key, the value and the rule."""


MODEL_TYPES = ("mnist1d_cnn", "gpt2")
UNCERTAINTY_METHODS = ("laplace", "ensemble", "mc_dropout")
SCORES = ("loss", "entropy", "el2n")
SCORERS = ("model", "estimator")
#: the data sets known by name; data.name also takes any Hugging Face `datasets` name or a local path
DATASETS = ("mnist1d", "wikitext103", "text_files")
#: the tokenizers known by name; data.tokenizer also takes any Hugging Face tokenizer name or folder
TOKENIZERS = ("auto", "gpt2", "byte")
PRECISIONS = ("auto", "bf16", "fp32")
#: the largest seed: numpy's generator takes [0, 2**32 - 1], and the per-epoch orders seed torch
#: generators with seed * 1000003 + epoch, which must stay below 2**64
MAX_SEED = 2**32 - 1


def _selection_strategies() -> tuple[str, ...]:
    from .strategies import STRATEGIES  # torch-heavy: imported when a config is validated, not with aql

    return tuple(STRATEGIES)


def __getattr__(name):
    if name == "SELECTION_STRATEGIES":  # the names registered with aql.strategies.register_strategy
        return _selection_strategies()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class ModelConfig:
    """`model:` — which network to build (`aql.models.build_model`)."""

    type: str = "gpt2"  # one of MODEL_TYPES (mnist1d_cnn needs data.name: mnist1d)
    # gpt2 (transformers.GPT2Config, randomly initialised)
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    vocab_size: int = 50257
    n_positions: int = 1024  # longest sequence the position table holds (>= data.seq_len)
    dropout: float = 0.0
    # mnist1d_cnn: input [B, 40] -> logits [B, 10]
    channels: list[int] = field(default_factory=lambda: [32, 32, 32])
    kernel_size: int = 5
    input_length: int = 40
    num_classes: int = 10


@dataclass
class TrainingConfig:
    """`training:` — optimisation. AdamW, linear warmup then cosine to zero over the optimizer steps
    that the back-propagated samples actually make (a 20% subset makes 5x fewer steps per epoch)."""

    batch_size: int = 32  # samples per micro-batch
    learning_rate: float = 3e-4
    warmup_steps: int = 500  # optimizer steps; clipped to the schedule's length
    max_steps: int = 50000  # optimizer steps; 0 = no limit (epochs decide)
    gradient_accumulation: int = 4  # micro-batches per optimizer step
    epochs: int = 1  # passes over the training set (over its selected subset)
    weight_decay: float = 0.01
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # samples per evaluation batch; 0 = automatic: as many as keep the float32 logits of one batch
    # (samples x tokens x outputs x 4 bytes) within eval_memory_mb (10 sequences of 128 tokens at GPT-2's
    # 50257 outputs, the whole split for MNIST-1D)
    eval_batch_size: int = 0
    eval_memory_mb: float = 256.0
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | bf16 | fp32
    cpu_threads: int = 0  # torch.set_num_threads for CLI runs; 0 = torch's default
    # An optimizer step whose loss or gradient is not finite is skipped (no parameter, Fisher or score
    # update) and counted (nonfinite_steps in the metrics); this many skipped in a row stop the run
    max_nonfinite_steps: int = 10


@dataclass
class AQLConfig:
    """`aql_v2:` — uncertainty estimation and data selection."""

    # Uncertainty estimation
    uncertainty_method: str = "laplace"  # laplace | ensemble | mc_dropout
    fisher_ema_decay: float = 0.95
    fisher_update_freq: int = 1  # optimizer steps between Fisher (or ensemble) updates
    prior_precision: float = 1.0
    n_ensemble: int = 3
    # The ensemble's students: `model:` keys replaced in a copy of the model config (e.g. {n_layers: 1,
    # d_model: 192, n_heads: 3}); empty: the model with hidden widths / 4 (`shrink_model`), or, for a
    # model it cannot shrink (GPT-2), aql.uncertainty.student_overrides of the model config
    ensemble_student: dict[str, Any] = field(default_factory=dict)
    mc_samples: int = 10
    # Data selection
    query_budget: float = 0.2  # fraction of the training set back-propagated per epoch, in (0, 1]
    buffer_size: int = 10000  # streaming: scores kept for the running threshold
    # none (baseline: all data) | random (control: a uniform query_budget share each epoch, no scoring)
    # | stale | streaming | curriculum | any other registered strategy (aql.strategies; one file each)
    selection_strategy: str = "streaming"
    # Keyword arguments of the strategy's constructor beyond the keys below (e.g. streaming:
    # {batch_tolerance: 0.1}; curriculum: {max_lookahead: 8}); a key that is no option of the chosen
    # strategy is refused. On the command line: --set aql_v2.strategy_options.<key>=<value>.
    strategy_options: dict[str, Any] = field(default_factory=dict)
    exploration: float = 0.1  # stale: fraction of each subset drawn at random, in [0, 1)
    score: str = "loss"  # stale / streaming: per-sample score ranking the data: loss | entropy | el2n
    # Weight each sample's loss by the selector's importance weight (the loss is then the weighted mean
    # over the micro-batch). Off by default: stale's explored samples carry weight (N - top) / explored,
    # ~41 at budget 0.2 and exploration 0.1, so a handful of them dominate every gradient (MNIST-1D demo,
    # learning rate 3e-3, seed 0: test accuracy 0.76 with the weights, 0.90 without); the weights make
    # the loss an estimate of the full-data loss, which undoes the emphasis that selection is for, while
    # exploration's job (refreshing stale scores, coverage) needs the samples, not their weight.
    # Stale and streaming have weights (streaming's: one value per candidate batch, 1 / its keep rate).
    importance_weights: bool = False
    # streaming / curriculum: candidates scored by the statistics of a no-grad model forward, or by the
    # estimator's estimate_uncertainty of their inputs (gathered again: an extra copy per candidate batch)
    scorer: str = "model"
    # Curriculum learning (selection_strategy: curriculum; curriculum_enabled must then be true)
    curriculum_enabled: bool = True
    difficulty_stages: list[float] = field(default_factory=lambda: [0.3, 0.6, 1.0])  # upper edges of entropy / log(classes) bands
    stage_advance_threshold: float = 0.1  # relative val-loss reduction within a stage that advances it, in [0, 1]
    # Performance. target_overhead: the AQL overhead budget as a fraction of the rest of the training
    # time (>= 0; above 1 for strategies that score candidates with a forward of their own); fit()
    # reports target_overhead_pct beside overhead_pct and warns when the run's overhead exceeds it.
    target_overhead: float = 0.03
    # Not implemented (nothing is cached; uncertainty is not computed in parallel). Accepted so that the
    # design document's template (which sets both true) loads; true warns once that it has no effect.
    enable_caching: bool = False
    parallelize_uncertainty: bool = False


@dataclass
class LoggingConfig:
    """`logging:` — progress, metrics, checkpoints."""

    log_every: int = 100  # optimizer steps between metric lines (JSONL, progress bar, wandb)
    eval_every: int = 1000  # optimizer steps between validation passes (and at every epoch end); 0 = epoch ends only
    save_every: int = 5000  # optimizer steps between checkpoints (and at every epoch end); 0 = epoch ends only
    wandb_project: Optional[str] = "efficient-llm-training"  # null = no wandb
    wandb_tags: list[str] = field(default_factory=lambda: ["aql-v2", "wikitext-103"])
    output_dir: str = "runs/aql"  # metrics.jsonl and checkpoint.pt go here
    keep_checkpoints: int = 2  # checkpoint.pt and the previous ones (checkpoint.1.pt, ...): resume falls back to them
    progress_bar: bool = True  # training, evaluation and tokenisation progress (shown only on a terminal)
    test_every_epoch: bool = False  # also evaluate the test split after every epoch (learning curves)


@dataclass
class DataConfig:
    """`data:` — what to train on (`aql.data.build_datasets`)."""

    # mnist1d | wikitext103 (the hub's wikitext, subset wikitext-103-raw-v1) | text_files (the lists
    # below) | any Hugging Face `datasets` name (streamed from the hub, or read from the local cache
    # offline) | a local path: a text file, a folder of .txt files (files named train / valid / test
    # become those splits), or a dataset saved with `save_to_disk`
    name: str = "wikitext103"
    subset: Optional[str] = None  # Hugging Face data sets: the configuration (e.g. wikitext-2-raw-v1)
    text_column: str = "text"  # Hugging Face and saved data sets: the column holding the text
    cache_dir: str = "data_cache"
    # mnist1d: generated locally by the mnist1d package
    num_samples: int = 10000  # train + test
    train_split: float = 0.8
    val_fraction: float = 0.1  # of the train part, held out for val_loss
    data_seed: int = 42
    # text
    seq_len: int = 128
    # auto (GPT-2 from the local Hugging Face cache, else bytes) | byte | gpt2 | any Hugging Face
    # tokenizer name or folder (the local cache first, the hub unless HF_HUB_OFFLINE=1). CLI runs print
    # the tokenizer chosen and set model.vocab_size to its vocabulary.
    tokenizer: str = "auto"
    # tokens read from the training stream (0 = all); a source without a validation split holds out
    # val_fraction of these sequences (the last ones) as val
    max_train_tokens: int = 10_000_000
    max_eval_tokens: int = 500_000
    text_files: list[str] = field(default_factory=list)  # text_files: training files
    val_text_files: list[str] = field(default_factory=list)
    test_text_files: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    aql_v2: AQLConfig = field(default_factory=AQLConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:<n>

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTIONS = {
    "model": ModelConfig,
    "training": TrainingConfig,
    "aql_v2": AQLConfig,
    "logging": LoggingConfig,
    "data": DataConfig,
}
_TOP_LEVEL = {"seed": int, "device": str}


def _type_name(annotation) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _coerce(key: str, value: Any, annotation) -> Any:
    """Checks `value` against the field type; float fields also take ints and numeric strings."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        inner = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        return None if value is None else _coerce(key, value, inner)
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: expected a mapping of names to values, got {value!r} ({type(value).__name__})")
        return dict(value)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list of {_type_name(item_type)}, got {value!r} ({type(value).__name__})")
        return [_coerce(f"{key}[{i}]", item, item_type) for i, item in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r} ({type(value).__name__})")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
        return value
    if annotation is float:
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r} (str)") from None
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
        else:
            number = float(value)
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__})")
        return value
    raise ConfigError(f"{key}: unsupported field type {annotation!r}")  # a bug in this file, not in the YAML


def _build_section(name: str, cls, raw: Any):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a mapping of keys, got {raw!r} ({type(raw).__name__})")
    hints = typing.get_type_hints(cls)
    allowed = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in hints:
            raise ConfigError(f"{name}.{key}: unknown key (value {value!r}); allowed keys in {name}: {', '.join(allowed)}")
        values[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**values)


def _choice(key: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {', '.join(allowed)}")


def _range(key: str, value: float, low: float, high: float, *, low_open=False, high_open=False) -> None:
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"{key}: {value!r} is outside {interval}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key}: {value!r} must be >= {low}")


def _validate(config: Config) -> None:
    m, t, a, lg, d = config.model, config.training, config.aql_v2, config.logging, config.data
    _choice("model.type", m.type, MODEL_TYPES)
    for key in ("n_layers", "n_heads", "d_model", "vocab_size", "n_positions", "kernel_size", "input_length", "num_classes"):
        _at_least(f"model.{key}", getattr(m, key), 1)
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model: {m.d_model} must be a multiple of model.n_heads ({m.n_heads})")
    if not m.channels:
        raise ConfigError("model.channels: [] must name at least one convolution width")
    for i, width in enumerate(m.channels):
        _at_least(f"model.channels[{i}]", width, 1)
    _range("model.dropout", m.dropout, 0.0, 1.0, high_open=True)

    _at_least("training.batch_size", t.batch_size, 1)
    _range("training.learning_rate", t.learning_rate, 0.0, math.inf, low_open=True)
    _at_least("training.warmup_steps", t.warmup_steps, 0)
    _at_least("training.max_steps", t.max_steps, 0)
    _at_least("training.gradient_accumulation", t.gradient_accumulation, 1)
    _at_least("training.epochs", t.epochs, 1)
    _range("training.weight_decay", t.weight_decay, 0.0, math.inf)
    _range("training.grad_clip", t.grad_clip, 0.0, math.inf)
    _at_least("training.eval_batch_size", t.eval_batch_size, 0)
    _range("training.eval_memory_mb", t.eval_memory_mb, 0.0, math.inf, low_open=True)
    _choice("training.precision", t.precision, PRECISIONS)
    _at_least("training.cpu_threads", t.cpu_threads, 0)
    _at_least("training.max_nonfinite_steps", t.max_nonfinite_steps, 1)

    _choice("aql_v2.uncertainty_method", a.uncertainty_method, UNCERTAINTY_METHODS)
    _range("aql_v2.fisher_ema_decay", a.fisher_ema_decay, 0.0, 1.0, high_open=True)
    _at_least("aql_v2.fisher_update_freq", a.fisher_update_freq, 1)
    _range("aql_v2.prior_precision", a.prior_precision, 0.0, math.inf, low_open=True)
    _at_least("aql_v2.n_ensemble", a.n_ensemble, 1)
    if not isinstance(a.ensemble_student, dict):
        raise ConfigError(f"aql_v2.ensemble_student must be a mapping of model: keys, got {a.ensemble_student!r}")
    unknown = sorted(set(a.ensemble_student) - ({f.name for f in dataclasses.fields(ModelConfig)} - {"type"}))
    if unknown:
        raise ConfigError(f"aql_v2.ensemble_student: unknown model keys {unknown}; allowed: every model: key but type")
    _at_least("aql_v2.mc_samples", a.mc_samples, 1)
    _range("aql_v2.query_budget", a.query_budget, 0.0, 1.0, low_open=True)
    _at_least("aql_v2.buffer_size", a.buffer_size, 1)
    _choice("aql_v2.selection_strategy", a.selection_strategy, _selection_strategies())
    from .strategies import STRATEGIES

    STRATEGIES[a.selection_strategy].check_options(a.strategy_options)
    _range("aql_v2.exploration", a.exploration, 0.0, 1.0, high_open=True)
    _choice("aql_v2.score", a.score, SCORES)
    _choice("aql_v2.scorer", a.scorer, SCORERS)
    if not a.difficulty_stages:
        raise ConfigError("aql_v2.difficulty_stages: [] must name at least one stage threshold")
    if any(not 0 < s <= 1 for s in a.difficulty_stages) or any(x >= y for x, y in zip(a.difficulty_stages, a.difficulty_stages[1:])):
        raise ConfigError(f"aql_v2.difficulty_stages: {a.difficulty_stages!r} must be strictly increasing values in (0, 1] "
                          "(bands of entropy / log(classes))")
    _range("aql_v2.stage_advance_threshold", a.stage_advance_threshold, 0.0, 1.0)
    # the AQL time can exceed the rest of the training time (a scoring forward over 5x the trained rows)
    _range("aql_v2.target_overhead", a.target_overhead, 0.0, math.inf, high_open=True)
    for key, what in (("enable_caching", "nothing is cached"), ("parallelize_uncertainty", "uncertainty is not computed in parallel")):
        if getattr(a, key) and key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"aql_v2.{key}: true is not implemented ({what}); the key is accepted so that the design "
                          "document's template loads, and has no effect; set it false to silence this warning",
                          UserWarning, stacklevel=4)
    if a.selection_strategy == "curriculum" and not a.curriculum_enabled:
        raise ConfigError("aql_v2.curriculum_enabled: false contradicts aql_v2.selection_strategy: curriculum; set it true or pick another strategy")

    _at_least("logging.log_every", lg.log_every, 1)
    _at_least("logging.eval_every", lg.eval_every, 0)
    _at_least("logging.save_every", lg.save_every, 0)
    _at_least("logging.keep_checkpoints", lg.keep_checkpoints, 1)
    if lg.wandb_project == "":
        raise ConfigError("logging.wandb_project: '' is not a project name; use null for no wandb")

    if not d.name.strip():
        raise ConfigError(f"data.name: {d.name!r} names no data set; use one of {', '.join(DATASETS)}, a Hugging Face "
                          "`datasets` name or a local path (a text file, a folder of .txt files, a saved dataset)")
    _at_least("data.num_samples", d.num_samples, 20)
    _range("data.data_seed", d.data_seed, 0, MAX_SEED)
    _range("data.train_split", d.train_split, 0.0, 1.0, low_open=True, high_open=True)
    _range("data.val_fraction", d.val_fraction, 0.0, 1.0, high_open=True)
    _at_least("data.seq_len", d.seq_len, 1)
    if not d.tokenizer.strip():
        raise ConfigError(f"data.tokenizer: {d.tokenizer!r} names no tokenizer; use one of {', '.join(TOKENIZERS)} or a "
                          "Hugging Face tokenizer name or folder")
    if d.subset == "":
        raise ConfigError("data.subset: '' names no configuration; use null for the data set's default")
    if d.subset is not None and d.name in DATASETS:
        raise ConfigError(f"data.subset: {d.subset!r} applies to Hugging Face data sets, not to data.name {d.name!r}; "
                          "use null")
    if not d.text_column:
        raise ConfigError("data.text_column: '' names no column; the default is text")
    _at_least("data.max_train_tokens", d.max_train_tokens, 0)
    _at_least("data.max_eval_tokens", d.max_eval_tokens, 0)
    if d.name == "text_files" and not d.text_files:
        raise ConfigError("data.text_files: [] must list at least one file when data.name is text_files")

    if m.type == "gpt2" and d.name == "mnist1d":
        raise ConfigError("data.name: 'mnist1d' does not fit model.type 'gpt2'; use wikitext103, a Hugging Face data set "
                          "or a local text path")
    if m.type == "mnist1d_cnn" and d.name != "mnist1d":
        raise ConfigError(f"data.name: {d.name!r} does not fit model.type 'mnist1d_cnn'; use mnist1d")
    if m.type == "gpt2" and d.seq_len > m.n_positions:
        raise ConfigError(f"data.seq_len: {d.seq_len} exceeds model.n_positions ({m.n_positions})")

    _range("seed", config.seed, 0, MAX_SEED)
    if config.device != "auto" and config.device != "cpu" and not (
        config.device == "cuda" or (config.device.startswith("cuda:") and config.device[5:].isdigit())
    ):
        raise ConfigError(f"device: {config.device!r} is not allowed; choose auto, cpu, cuda or cuda:<n>")


_WARNED: set[str] = set()  # keys whose "not implemented" warning was given in this process


def config_from_dict(raw: dict | None) -> Config:
    """Builds and validates a Config from a parsed YAML mapping (sections and top-level keys)."""
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"<root>: expected a mapping of sections, got {raw!r} ({type(raw).__name__})")
    kwargs = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[key] = _build_section(key, _SECTIONS[key], value)
        elif key in _TOP_LEVEL:
            kwargs[key] = _coerce(key, value, _TOP_LEVEL[key])
        else:
            allowed = ", ".join([*_SECTIONS, *_TOP_LEVEL])
            raise ConfigError(f"{key}: unknown section or key (value {value!r}); allowed: {allowed}")
    config = Config(**kwargs)
    _validate(config)
    return config


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"training.batch_size=64"` -> (["training", "batch_size"], 64); the value is a YAML scalar."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(f"override {text!r}: expected section.key=value (e.g. training.batch_size=64)")
    key, _, value_text = text.partition("=")
    path = key.strip().split(".")
    if not all(path) or len(path) > 3:
        raise ConfigError(f"override {text!r}: the key must be section.key, section.key.name (for a mapping such as "
                          "aql_v2.strategy_options) or a top-level key (seed, device)")
    try:
        value = yaml.safe_load(value_text) if value_text.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override {text!r}: the value is not a YAML scalar or list: {error}") from None
    if isinstance(value, dict) and value:  # `{}` empties a mapping (aql_v2.strategy_options={})
        raise ConfigError(f"override {text!r}: set one key at a time, not a mapping")
    return path, value


def _mapping_at(container: dict, key: str, what: str) -> dict:
    """`container[key]`, created empty when absent; a ConfigError (`what`, got ...) when not a mapping."""
    mapping = container.get(key)
    if mapping is None:
        mapping = container[key] = {}
    if not isinstance(mapping, dict):
        raise ConfigError(f"{what}, got {mapping!r}")
    return mapping


def _apply_override(raw: dict, text: str) -> None:
    path, value = parse_override(text)
    if len(path) == 1:
        if path[0] in _SECTIONS:
            raise ConfigError(f"override {text!r}: {path[0]} is a section; set its keys one by one ({path[0]}.<key>=...)")
        raw[path[0]] = value
        return
    section, key, *name = path
    if section not in _SECTIONS:
        raise ConfigError(f"override {text!r}: unknown section {section!r}; allowed: {', '.join(_SECTIONS)}")
    current = _mapping_at(raw, section, f"{section}: expected a mapping of keys")
    if name:
        if typing.get_origin(typing.get_type_hints(_SECTIONS[section]).get(key)) is not dict:
            raise ConfigError(f"override {text!r}: {section}.{key} is not a mapping; set it as {section}.{key}=value")
        _mapping_at(current, key, f"{section}.{key}: expected a mapping of names to values")[name[0]] = value
        return
    current[key] = value


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key repeated in one mapping (a second `training:` section,
    a key given twice) is an error naming the key and both lines instead of the last one winning."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            self.flatten_mapping(node)
            first: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # the base class reports an unhashable key
                if key in first:
                    raise ConfigError(f"{self.name}: duplicate key {key!r} at line {key_node.start_mark.line + 1} "
                                      f"(first at line {first[key] + 1}); each section and key may appear once")
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def save_config(config: Config, path: str | os.PathLike) -> Path:
    """Writes `config` as YAML to `path` (atomically: a temporary file, then a rename); `load_config`
    reads it back to an equal Config. Returns the path."""
    if not isinstance(config, Config):
        raise TypeError(f"aql.config.save_config: config must be an aql.config.Config, got {type(config).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# the resolved configuration of this run (every key, defaults included)\n"
    text += yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)
    return path


def load_config(path: str | Path | None = None, overrides=()) -> Config:
    """Reads a YAML config (None: all defaults), applies `section.key=value` overrides, validates."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"aql.config.load_config: no config file at {path}")
        with path.open("r", encoding="utf-8") as handle:
            try:
                raw = yaml.load(handle, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
            except yaml.YAMLError as error:
                raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top, got {type(raw).__name__}")
    if isinstance(overrides, str):
        overrides = [overrides]
    for text in overrides:
        _apply_override(raw, text)
    return config_from_dict(raw)
