"""Experiment 3 of the design document: a GPT-2 language model trained on all data, on an AQL-selected
20% and on a random 20% (`python -m aql.experiments_lm --config configs/experiments/gpt2_pydoc.yaml`,
`--quick` for a smoke run of a few minutes).

The protocol follows the MNIST-1D selection study (`aql.efficiency`): every method and control trains
the same model (a randomly initialised `transformers` GPT-2 from a `GPT2Config`) with the same
optimizer (AdamW), batch size, seeds and schedule (linear warm-up over `warmup_fraction` of the run's
own optimizer steps, then cosine to zero, so every run, the all-data baseline included, ends at a
learning rate of zero). Training is `aql.training.AQLv2Trainer` with the method's registered strategy
(`aql.strategies`); the data are `aql.tokens.TokenBlocks` over token files (blocks of `seq_len`
tokens, read a block at a time). When `learning_rates` lists several rates, each method's rate is
chosen by validation loss at `tuning_seeds` (the same grid for every method); the chosen rate is then
run at every seed in `seeds`, and the test split is read once per run, at its end.

Controls: `all_data` (every block every epoch: the target perplexity), `all_data_short` (all data for
budget x epochs: the same tokens back-propagated), `random` (a fresh uniform budget share each epoch).

Per run: validation and test perplexity, tokens back-propagated, candidate tokens scored by no-grad
forwards, FLOPs (FlopCounterMode's forward count per sample x (3 x samples back-propagated + samples
scored): scoring included), wall-clock of the training (the trainer's `train_time`: evaluation and
checkpoints excluded) and of the whole run. Each finished run is appended to
`<output_dir>/runs.jsonl` as it ends (a restarted study skips those already there); then
`summary.json`, `report.md` and `perplexity.png`.

Data (`source`): `directory`: every file under `data_path` matching `pattern` is one document (the
split of a document is fixed by a hash of its relative path: `val_fraction`, `test_fraction`, the rest
trains); `wikitext103`: WikiText-103 (raw) streamed by Hugging Face `datasets`. Tokenised once
(`tokenizer`: byte-level or GPT-2 BPE from the local cache) into token files under `cache_dir`
(`aql.tokens.write_token_file`), the first `max_train_tokens` / `max_eval_tokens` tokens of each split
(0 = all) in a fixed hash order of documents.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aql._checks import round_half_up

from . import strategies
from .efficiency import Method, _append, _mean_std, flops_per_sample, open_runs, read_study_yaml
from .tokens import TokenBlocks, text_tokens, write_token_file

__all__ = ["LMStudyConfig", "LMStudyError", "load_lm_study", "prepare_data", "train_lm_run", "run_lm_study", "summarise_lm",
           "format_lm_report", "plot_lm", "write_lm_outputs", "main"]

SOURCES = ("directory", "wikitext103")


class LMStudyError(ValueError):
    """A study configuration value that is not allowed (the message names the key)."""


@dataclasses.dataclass
class LMStudyConfig:
    name: str = "gpt2_lm"
    # data
    source: str = "directory"
    data_path: str = ""
    pattern: str = "*.rst.txt"
    tokenizer: str = "byte"  # byte | gpt2 | auto (aql.data.load_tokenizer)
    seq_len: int = 128
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    max_train_tokens: int = 0
    max_eval_tokens: int = 0
    cache_dir: str = "data_cache/lm"
    # model (transformers GPT2Config)
    n_layers: int = 2
    n_heads: int = 4
    d_model: int = 128
    dropout: float = 0.0
    # training
    epochs: int = 4
    batch_size: int = 32
    gradient_accumulation: int = 1
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    eval_batch_size: int = 64
    learning_rates: list = dataclasses.field(default_factory=lambda: [3e-3])
    tuning_seeds: list = dataclasses.field(default_factory=lambda: [100])
    budget: float = 0.2
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    threads: int = 1  # torch threads (0: torch's default)
    device: str = "cpu"  # cpu | cuda | auto
    precision: str = "auto"  # the trainer's: bf16 autocast on CUDA, fp32 on CPU
    methods: list = dataclasses.field(default_factory=list)


def _study_from_dict(raw: Mapping[str, Any], where: str) -> LMStudyConfig:
    if not isinstance(raw, Mapping):
        raise LMStudyError(f"{where}: the study must be a mapping, got {type(raw).__name__}")
    fields = {f.name for f in dataclasses.fields(LMStudyConfig)}
    unknown = set(raw) - fields
    if unknown:
        raise LMStudyError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
    methods = []
    allowed = {f.name for f in dataclasses.fields(Method)}
    for i, item in enumerate(raw.get("methods", [])):
        if not isinstance(item, Mapping) or set(item) - allowed:
            raise LMStudyError(f"{where}: methods[{i}] must be a mapping with keys among {sorted(allowed)}, got {item!r}")
        if item.get("strategy") not in strategies.STRATEGIES:
            raise LMStudyError(f"{where}: methods[{i}].strategy must be one of {sorted(strategies.STRATEGIES)}, got {item.get('strategy')!r}")
        if item.get("epochs_scale", "none") not in ("none", "budget"):
            raise LMStudyError(f"{where}: methods[{i}].epochs_scale must be 'none' or 'budget', got {item.get('epochs_scale')!r}")
        if item.get("holdout") or item.get("budgets") is not None:
            raise LMStudyError(f"{where}: methods[{i}]: holdout and budgets are not supported here (one study budget), got {item!r}")
        methods.append(Method(**item))
    names = [m.name for m in methods]
    if not methods or len(set(names)) != len(names):
        raise LMStudyError(f"{where}: methods must list at least one method, with unique names, got {names}")
    study = LMStudyConfig(**{**{k: v for k, v in raw.items() if k != "methods"}, "methods": methods})
    if study.source not in SOURCES:
        raise LMStudyError(f"{where}: source must be one of {SOURCES}, got {study.source!r}")
    if study.source == "directory" and not study.data_path:
        raise LMStudyError(f"{where}: source 'directory' needs data_path (the folder of text files), got {study.data_path!r}")
    for key in ("learning_rates", "seeds", "tuning_seeds"):
        if not isinstance(getattr(study, key), list) or not getattr(study, key):
            raise LMStudyError(f"{where}: {key} must be a non-empty list, got {getattr(study, key)!r}")
    if not 0 < study.budget <= 1:
        raise LMStudyError(f"{where}: budget must lie in (0, 1], got {study.budget!r}")
    if not (0 <= study.val_fraction < 1 and 0 <= study.test_fraction < 1 and study.val_fraction + study.test_fraction < 1):
        raise LMStudyError(f"{where}: val_fraction and test_fraction must be in [0, 1) with a sum below 1, "
                           f"got {study.val_fraction!r}, {study.test_fraction!r}")
    for key in ("seq_len", "n_layers", "n_heads", "d_model", "epochs", "batch_size", "gradient_accumulation", "eval_batch_size"):
        value = getattr(study, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LMStudyError(f"{where}: {key} must be an int >= 1, got {value!r}")
    if study.d_model % study.n_heads:
        raise LMStudyError(f"{where}: d_model ({study.d_model}) must be a multiple of n_heads ({study.n_heads})")
    return study


def load_lm_study(path: str | os.PathLike, *, quick: bool = False) -> LMStudyConfig:
    """The study in YAML file `path`; `quick=True` applies its `quick:` section on top."""
    return _study_from_dict(read_study_yaml(path, quick=quick, error=LMStudyError, where="aql.experiments_lm"), str(path))


# -------------------------------------------------------------------------------------------- data
def _hash_fraction(text: str) -> float:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:12], 16) / float(16**12)


def _directory_splits(study: LMStudyConfig) -> dict[str, list[Path]]:
    """The documents of each split, in a fixed hash order (so a token cap takes a mix of documents)."""
    root = Path(study.data_path)
    if not root.is_dir():
        raise LMStudyError(f"aql.experiments_lm: data_path {root} is not a directory (for the Python documentation: "
                           "apt-get download python3.11-doc && dpkg -x python3.11-doc_*.deb <dir>)")
    files = sorted(p for p in root.rglob(study.pattern) if p.is_file())
    if not files:
        raise LMStudyError(f"aql.experiments_lm: no file under {root} matches pattern {study.pattern!r}")
    splits: dict[str, list[Path]] = {"train": [], "val": [], "test": []}
    for path in sorted(files, key=lambda p: _hash_fraction("order/" + p.relative_to(root).as_posix())):
        u = _hash_fraction("split/" + path.relative_to(root).as_posix())
        splits["val" if u < study.val_fraction else "test" if u < study.val_fraction + study.test_fraction else "train"].append(path)
    return splits


def _limited(chunks: Iterable[np.ndarray], max_tokens: int) -> Iterator[np.ndarray]:
    """The chunks, cut after `max_tokens` tokens in all (0: all of them)."""
    left = max_tokens
    for chunk in chunks:
        if max_tokens:
            chunk = chunk[:left]
            left -= chunk.size
        yield chunk
        if max_tokens and left <= 0:
            return


def _split_texts(study: LMStudyConfig, split: str, documents: dict[str, list[Path]] | None) -> Iterator[str]:
    if study.source == "directory":
        for path in documents[split]:
            yield path.read_text(encoding="utf-8", errors="replace")
        return
    from datasets import load_dataset

    hf_split = {"train": "train", "val": "validation", "test": "test"}[split]
    for row in load_dataset("wikitext", "wikitext-103-raw-v1", split=hf_split, streaming=True):
        yield row["text"]


def prepare_data(study: LMStudyConfig, *, progress: bool = False) -> dict[str, Any]:
    """Token files of the three splits (written once under `cache_dir`, then reused) as `TokenBlocks`
    of `seq_len`, with the tokenizer's name and vocabulary size."""
    from .data import load_tokenizer

    tokenizer = load_tokenizer(study.tokenizer)
    documents = _directory_splits(study) if study.source == "directory" else None
    identity = {"source": study.source, "tokenizer": tokenizer.name, "vocab": tokenizer.vocab_size,
                "max_train_tokens": study.max_train_tokens, "max_eval_tokens": study.max_eval_tokens}
    if documents is not None:
        root = Path(study.data_path)
        identity["documents"] = {split: [(p.relative_to(root).as_posix(), p.stat().st_size) for p in paths]
                                 for split, paths in documents.items()}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    folder = Path(study.cache_dir) / f"{study.name}_{key}"
    dtype = "uint16" if tokenizer.vocab_size <= 65536 else "uint32"
    out: dict[str, Any] = {"tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size, "folder": str(folder)}
    for split in ("train", "val", "test"):
        path = folder / f"{split}.bin"
        if not (path.is_file() and path.with_name(path.name + ".json").is_file()):
            if documents is not None and not documents[split]:
                raise LMStudyError(f"aql.experiments_lm: the {split} split has no documents; raise its fraction or add files")
            limit = study.max_train_tokens if split == "train" else study.max_eval_tokens
            write_token_file(_limited(text_tokens(_split_texts(study, split, documents), tokenizer), limit), path, dtype,
                             progress=progress, total=limit or None)
        blocks = TokenBlocks(path, study.seq_len, name=f"{study.name}/{split}")
        if len(blocks) == 0:
            raise LMStudyError(f"aql.experiments_lm: the {split} split holds fewer than seq_len + 1 = {study.seq_len + 1} tokens")
        out[split] = blocks
    return out


# ----------------------------------------------------------------------------------------- one run
def _schedule(study: LMStudyConfig, method: Method, num_samples: int) -> tuple[int, int, int]:
    """(epochs, max_steps, optimizer steps) of a run. `epochs_scale: budget` trains all data for
    budget x epochs: ceil(budget x epochs) epochs cut after round(budget x epochs x steps per epoch)
    optimizer steps, the steps a budget-sized epoch plan makes (the trainer's schedule reaches zero
    there); its tokens match the budget's up to the partial last batch of each selected epoch."""
    budget = 1.0 if method.strategy == "none" else study.budget
    per_epoch = max(1, round_half_up(budget * num_samples))  # SelectionStrategy.samples_per_epoch
    steps_per_epoch = max(1, math.ceil(math.ceil(per_epoch / study.batch_size) / study.gradient_accumulation))
    if method.epochs_scale == "none":
        return study.epochs, 0, steps_per_epoch * study.epochs
    max_steps = max(1, round_half_up(study.budget * study.epochs * steps_per_epoch))
    return max(1, math.ceil(study.budget * study.epochs)), max_steps, max_steps


def _trainer_config(study: LMStudyConfig, method: Method, *, vocab_size: int, num_samples: int, learning_rate: float, seed: int,
                    output_dir: Path):
    from .config import config_from_dict

    budget = 1.0 if method.strategy == "none" else study.budget
    epochs, max_steps, steps = _schedule(study, method, num_samples)
    return config_from_dict({
        "seed": seed, "device": study.device,
        "model": {"type": "gpt2", "n_layers": study.n_layers, "n_heads": study.n_heads, "d_model": study.d_model,
                  "vocab_size": vocab_size, "n_positions": study.seq_len, "dropout": study.dropout},
        "training": {"batch_size": study.batch_size, "learning_rate": learning_rate, "warmup_steps": round(study.warmup_fraction * steps),
                     "max_steps": max_steps, "gradient_accumulation": study.gradient_accumulation, "epochs": epochs,
                     "weight_decay": study.weight_decay, "grad_clip": study.grad_clip, "eval_batch_size": study.eval_batch_size,
                     "precision": study.precision},
        "aql_v2": {"selection_strategy": method.strategy, "query_budget": budget, "strategy_options": dict(method.options),
                   "target_overhead": 1.0},
        "data": {"seq_len": study.seq_len},  # the trainer takes the data as datasets; the section is only checked
        "logging": {"wandb_project": None, "progress_bar": False, "output_dir": str(output_dir), "eval_every": 0, "save_every": 0,
                    "keep_checkpoints": 1, "log_every": 1000},
    })


def train_lm_run(study: LMStudyConfig, method: Method, data: Mapping[str, Any], *, learning_rate: float, seed: int,
                 evaluate_test: bool) -> dict[str, Any]:
    """Trains one model under `method` with `aql.training.AQLv2Trainer` and returns its record."""
    from .models import GPT2LM
    from .training import AQLv2Trainer

    train = data["train"]
    torch.manual_seed(seed)
    model = GPT2LM(n_layers=study.n_layers, n_heads=study.n_heads, d_model=study.d_model, vocab_size=data["vocab_size"],
                   n_positions=study.seq_len, dropout=study.dropout)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="aql_lm_run_") as work:
        config = _trainer_config(study, method, vocab_size=data["vocab_size"], num_samples=len(train), learning_rate=learning_rate,
                                 seed=seed, output_dir=Path(work))
        trainer = AQLv2Trainer(model, config, train_data=train, val_data=data["val"], test_data=data["test"] if evaluate_test else None,
                               output_dir=work)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*exceeds aql_v2.target_overhead.*", category=RuntimeWarning)
            result = trainer.fit(overwrite=True)
        strategy = trainer.strategy
    wall = time.perf_counter() - start
    history = result["history"]
    scored = sum(int(h.get("candidates_scored", 0)) for h in history)
    if strategy.scores_candidates and not scored:  # strategies that score every sample of the plan
        scored = len(train) * result["epochs"]
    model.eval()
    x, _ = train.gather(torch.arange(min(8, len(train))))
    per_sample = flops_per_sample(model, x.to(next(model.parameters()).device))
    backprops = result["samples_backpropagated"]
    record = {
        "method": method.name, "strategy": method.strategy, "budget": 1.0 if method.strategy == "none" and method.epochs_scale == "none"
        else study.budget, "seed": seed, "learning_rate": learning_rate, "epochs": result["epochs"], "steps": result["steps"],
        "samples_backpropagated": backprops, "tokens_backpropagated": result["tokens_backpropagated"],
        "scoring_forwards": scored, "scoring_tokens": scored * train.block_len,
        "flops": per_sample * (3 * backprops + scored), "flops_scoring": per_sample * scored,
        "train_s": result["train_time"], "wall_s": wall, "overhead_pct": result["overhead_pct"],
        "val_loss": history[-1]["val_loss"], "val_perplexity": math.exp(min(history[-1]["val_loss"], 50.0)),
        "nonfinite_steps": result["nonfinite_steps"], "final_learning_rate": history[-1]["lr"],
    }
    if evaluate_test:
        record.update(test_loss=result["test_loss"], test_perplexity=result["test_perplexity"])
    return record


# ------------------------------------------------------------------------------------------- study
def _key(record: Mapping[str, Any]) -> tuple:
    return (record["phase"], record["method"], int(record["seed"]), float(record["learning_rate"]))


def chosen_learning_rate(study: LMStudyConfig, records: Iterable[Mapping[str, Any]], method: str) -> float:
    """The study's only rate, or the one with the lowest mean validation loss over the tuning runs of
    `method` (ties go to the smaller rate)."""
    if len(study.learning_rates) == 1:
        return float(study.learning_rates[0])
    by_lr: dict[float, list[float]] = {}
    for r in records:
        if r["phase"] == "tune" and r["method"] == method:
            by_lr.setdefault(float(r["learning_rate"]), []).append(r["val_loss"])
    if not by_lr:
        raise LMStudyError(f"aql.experiments_lm: no tuning runs for method {method!r}")
    return min(sorted(by_lr), key=lambda lr: statistics.fmean(by_lr[lr]))


def run_lm_study(study: LMStudyConfig, output_dir: str | os.PathLike, *, progress: bool = True, data=None) -> list[dict]:
    """Tunes (when several learning rates are listed) and runs every method at every seed; returns all
    run records. Resumable: records already in `<output_dir>/runs.jsonl` are not run again."""
    runs_path, records = open_runs(output_dir, study.threads, "experiments_lm.run_lm_study")
    done = {_key(r) for r in records}
    data = data if data is not None else prepare_data(study, progress=progress)
    tuning = [("tune", m, seed, float(lr)) for m in study.methods for lr in study.learning_rates for seed in study.tuning_seeds] \
        if len(study.learning_rates) > 1 else []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(tuning) + len(study.methods) * len(study.seeds), desc=study.name, unit="run", disable=not progress,
               dynamic_ncols=True)

    def run(phase: str, method: Method, seed: int, lr: float) -> None:
        if (phase, method.name, seed, lr) not in done:
            record = {"phase": phase, **train_lm_run(study, method, data, learning_rate=lr, seed=seed, evaluate_test=phase == "final")}
            _append(runs_path, record)
            records.append(record)
        bar.update(1)

    try:
        for phase, method, seed, lr in tuning:
            run(phase, method, seed, lr)
        for method in study.methods:
            lr = chosen_learning_rate(study, records, method.name)
            for seed in study.seeds:
                run("final", method, seed, lr)
    finally:
        bar.close()
    return records


# ----------------------------------------------------------------------------------------- results
def summarise_lm(study: LMStudyConfig, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per method: test perplexity mean/std over seeds, and the means of the costs; the all-data
    target and, per method, whether its mean test perplexity is within the target's mean + std. Only
    the final runs at the method's chosen learning rate count (`chosen_learning_rate`): a study whose
    grid changed keeps its earlier runs in runs.jsonl without mixing them in."""
    records = list(records)
    final = [r for r in records if r["phase"] == "final"]
    rows: dict[str, dict] = {}
    for method in study.methods:
        chosen = chosen_learning_rate(study, records, method.name) if any(
            r["phase"] == "tune" and r["method"] == method.name for r in records) or len(study.learning_rates) == 1 else None
        runs = [r for r in final if r["method"] == method.name and (chosen is None or float(r["learning_rate"]) == chosen)]
        if not runs:
            continue
        ppl, ppl_std = _mean_std([r["test_perplexity"] for r in runs])
        row = {"test_perplexity": ppl, "test_perplexity_std": ppl_std, "seeds": len(runs), "learning_rate": runs[0]["learning_rate"],
               "budget": runs[0]["budget"], "epochs": runs[0]["epochs"]}
        for key in ("val_perplexity", "test_loss", "tokens_backpropagated", "samples_backpropagated", "scoring_tokens", "flops",
                    "flops_scoring", "train_s", "wall_s", "overhead_pct", "steps"):
            row[key] = statistics.fmean(r[key] for r in runs)
        rows[method.name] = row
    target = rows.get("all_data")
    verdicts = {}
    if target is not None:
        threshold = target["test_perplexity"] + target["test_perplexity_std"]
        for name, row in rows.items():
            if name != "all_data":
                verdicts[name] = {"reaches_all_data": row["test_perplexity"] <= threshold, "threshold": threshold,
                                  "perplexity_ratio": row["test_perplexity"] / target["test_perplexity"],
                                  "token_reduction": target["tokens_backpropagated"] / max(1.0, row["tokens_backpropagated"]),
                                  "flops_ratio": row["flops"] / target["flops"], "train_time_ratio": row["train_s"] / target["train_s"]}
    return {"study": study.name, "rows": rows, "target": target, "verdicts": verdicts}


def format_lm_report(study: LMStudyConfig, summary: Mapping[str, Any]) -> str:
    """One markdown table: test perplexity (mean ± std over seeds) and what each method spent."""
    target = summary.get("target")
    lines = ["| method | test perplexity | val perplexity | tokens back-propagated | tokens scored | FLOPs (scoring incl.) "
             "| training wall-clock | AQL time / other training time | lr | within all-data ppl + std |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method in study.methods:
        row = summary["rows"].get(method.name)
        if row is None:
            continue
        relative = (lambda key: f" ({row[key] / target[key]:.2f}x)") if target else (lambda key: "")
        verdict = summary["verdicts"].get(method.name)
        reached = "target" if method.name == "all_data" else ("—" if verdict is None else ("yes" if verdict["reaches_all_data"] else "no"))
        lines.append(f"| {method.name} | {row['test_perplexity']:.3f} ± {row['test_perplexity_std']:.3f} | {row['val_perplexity']:.3f} "
                     f"| {row['tokens_backpropagated']:,.0f} | {row['scoring_tokens']:,.0f} | {row['flops']:.3g}{relative('flops')} "
                     f"| {row['train_s']:.0f} s{relative('train_s')} | {row['overhead_pct']:.1f}% | {row['learning_rate']:g} | {reached} |")
    return "\n".join(lines)


def plot_lm(study: LMStudyConfig, summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Test perplexity (mean ± std) against tokens back-propagated and against FLOPs (scoring
    included), one point per method, the all-data band in grey."""
    from .plots import pyplot, save_png

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    target = summary.get("target")
    colours = plt.get_cmap("tab10").colors
    for axis, key, label in ((axes[0], "tokens_backpropagated", "tokens back-propagated"), (axes[1], "flops", "FLOPs, scoring included")):
        if target is not None:
            axis.axhspan(target["test_perplexity"] - target["test_perplexity_std"], target["test_perplexity"] + target["test_perplexity_std"],
                         color="0.85", zorder=0)
        for i, method in enumerate(study.methods):
            row = summary["rows"].get(method.name)
            if row is not None:
                axis.errorbar([row[key]], [row["test_perplexity"]], yerr=[row["test_perplexity_std"]], marker="*" if method.name == "all_data"
                              else "o", ms=10, capsize=3, ls="none", color=colours[i % len(colours)], label=method.name)
        axis.set_xscale("log")
        axis.set_xlabel(label + " (log scale)")
        axis.set_ylabel("test perplexity (mean ± std over seeds)")
        axis.grid(alpha=0.3, which="both")
    axes[1].legend(fontsize=8)
    figure.suptitle(f"{study.name}: GPT-2 ({study.n_layers} layers, {study.d_model} wide), budget {study.budget}, "
                    f"seeds {', '.join(str(s) for s in study.seeds)}")
    return save_png(figure, path)


def write_lm_outputs(study: LMStudyConfig, records: list[dict], output_dir: str | os.PathLike, *, note: str = "") -> dict[str, Any]:
    """summary.json, report.md and perplexity.png in `output_dir`; returns the summary."""
    output_dir = Path(output_dir)
    summary = summarise_lm(study, records)
    temporary = output_dir / "summary.json.tmp"
    temporary.write_text(json.dumps(summary, indent=1, default=float) + "\n", encoding="utf-8")
    os.replace(temporary, output_dir / "summary.json")
    report = f"# {study.name}\n\n{note}\n\n" if note else f"# {study.name}\n\n"
    (output_dir / "report.md").write_text(report + format_lm_report(study, summary) + "\n", encoding="utf-8")
    if summary["rows"]:
        plot_lm(study, summary, output_dir / "perplexity.png")
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m aql.experiments_lm --config <yaml> [--quick] [--output-dir DIR]`."""
    parser = argparse.ArgumentParser(prog="python -m aql.experiments_lm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the study's YAML file (configs/experiments/gpt2_*.yaml)")
    parser.add_argument("--quick", action="store_true", help="apply the config's quick: section (a smoke run of a few minutes)")
    parser.add_argument("--output-dir", default=None, help="default: results/experiments/<name>[_quick]")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    study = load_lm_study(args.config, quick=args.quick)
    output_dir = Path(args.output_dir or f"results/experiments/{study.name}{'_quick' if args.quick else ''}")
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(Path(args.config).read_text(encoding="utf-8"), encoding="utf-8")
    start = time.perf_counter()
    records = run_lm_study(study, output_dir, progress=not args.no_progress)
    note = ("Smoke run (`--quick`): one seed, a small corpus slice and few epochs; it shows that the pipeline runs end to "
            "end, not how the methods compare." if args.quick else "")
    summary = write_lm_outputs(study, records, output_dir, note=note)
    print(format_lm_report(study, summary))
    print(f"\n{len(records)} runs in {output_dir}/runs.jsonl; summary.json, report.md and perplexity.png there "
          f"({time.perf_counter() - start:.0f} s this invocation)")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
