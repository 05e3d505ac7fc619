"""The selection study: which strategy reaches the all-data accuracy while back-propagating fewer
samples (`python -m aql experiment efficiency --config configs/experiments/mnist1d_efficiency.yaml`).

Every method and control trains the same model with the same optimizer (AdamW), batch size, seeds and
schedule (linear warm-up, then cosine to zero over the run's own optimizer steps), in the plain loop
of `aql.strategies.base` (so the study also shows the strategies outside the trainer). Per method and
budget, the learning rate is tuned on the validation split over the same grid for every method and
control (runs at `tuning_seeds`); the chosen rate is then run at every seed in `seeds`, and the test
split is read once per run, at its end.

Controls: `all_data` (every sample every epoch: the target accuracy), `all_data_short` (all data for
budget x epochs: the same number of samples back-propagated, the classic budget-matched baseline),
`random` (a fresh uniform budget share each epoch).

Each finished run is appended to `<output_dir>/runs.jsonl` as it ends, and a restarted study skips
the runs already there, so a crash loses at most the run in flight. `summarise` turns the runs into
`summary.json`, `EXPERIMENTS.md`-ready tables (`format_report`) and a plot of test accuracy against
samples back-propagated (`plot_efficiency`).
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml

import aql_kernels
from aql._checks import check_int

from . import strategies
from .data import IndexedTensorDataset, mnist1d_datasets
from .models import MNIST1DCNN
from .strategies.base import split_selection
from .training.schedule import WarmupCosine

__all__ = ["StudyConfig", "Method", "load_study", "train_run", "run_study", "summarise", "format_report", "plot_efficiency",
           "flops_per_sample", "write_outputs", "plot_efficiency_by_method", "run_efficiency_experiment", "StudyError"]


class StudyError(ValueError):
    """A study configuration value that is not allowed (the message names the key)."""


ESTIMATORS = ("none", "laplace", "mc_dropout", "ensemble")


@dataclasses.dataclass
class Method:
    """One row of the study: `strategy` (a registered name) with `options` (its keyword arguments);
    `epochs_scale: budget` trains all data for budget x epochs (the budget-matched control);
    `experiment`: the table it belongs to (`efficiency`, `curriculum`)."""

    name: str
    strategy: str
    options: dict = dataclasses.field(default_factory=dict)
    epochs_scale: str = "none"  # none | budget
    budgets: list | None = None  # None: the study's budgets ([1.0] for all_data)
    holdout: bool = False  # needs a holdout split (reducible loss): carved from the training split
    # an uncertainty estimator whose `estimate_uncertainty` of the candidates ranks them (the strategy's
    # `score: uncertainty`): laplace | mc_dropout | ensemble, built on the run's model with
    # `estimator_options`; its statistics are gathered from the training steps (see `_Estimator`)
    estimator: str = "none"
    estimator_options: dict = dataclasses.field(default_factory=dict)
    note: str = ""


@dataclasses.dataclass
class StudyConfig:
    num_samples: int = 10000
    train_split: float = 0.8
    val_fraction: float = 0.1
    holdout_fraction: float = 0.1  # of the training split, for methods with holdout: true
    data_seed: int = 42
    cache_dir: str = "data_cache"
    channels: list = dataclasses.field(default_factory=lambda: [32, 32, 32])
    kernel_size: int = 5
    dropout: float = 0.0  # of the CNN's head input (MC dropout needs it > 0)
    distill_steps: int = 2  # distillation steps of the ensemble's students per training step
    epochs: int = 20
    batch_size: int = 128
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    learning_rates: list = dataclasses.field(default_factory=lambda: [1e-2, 2e-2, 3e-2, 5e-2])
    budgets: list = dataclasses.field(default_factory=lambda: [0.1, 0.2, 0.3, 0.5])
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    tuning_seeds: list = dataclasses.field(default_factory=lambda: [100])
    irreducible_epochs: int = 10
    # Experiment 2 of the design document: which methods are "AQL only", "curriculum only", "AQL + curriculum"
    experiment2: dict = dataclasses.field(default_factory=dict)
    threads: int = 1
    methods: list = dataclasses.field(default_factory=list)


def _study_from_dict(raw: Mapping[str, Any], where: str) -> StudyConfig:
    if not isinstance(raw, Mapping):
        raise StudyError(f"{where}: the study must be a mapping, got {type(raw).__name__}")
    fields = {f.name: f for f in dataclasses.fields(StudyConfig)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise StudyError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(fields)}")
    values = {k: v for k, v in raw.items() if k != "methods"}
    methods = []
    for i, item in enumerate(raw.get("methods", [])):
        if not isinstance(item, Mapping):
            raise StudyError(f"{where}: methods[{i}] must be a mapping, got {item!r}")
        allowed = {f.name for f in dataclasses.fields(Method)}
        bad = set(item) - allowed
        if bad:
            raise StudyError(f"{where}: methods[{i}] has unknown keys {sorted(bad)}; allowed: {sorted(allowed)}")
        if item.get("strategy") not in strategies.STRATEGIES:
            raise StudyError(f"{where}: methods[{i}].strategy must be one of {sorted(strategies.STRATEGIES)}, got {item.get('strategy')!r}")
        if item.get("epochs_scale", "none") not in ("none", "budget"):
            raise StudyError(f"{where}: methods[{i}].epochs_scale must be 'none' or 'budget', got {item.get('epochs_scale')!r}")
        if item.get("estimator", "none") not in ESTIMATORS:
            raise StudyError(f"{where}: methods[{i}].estimator must be one of {list(ESTIMATORS)}, got {item.get('estimator')!r}")
        if item.get("estimator", "none") != "none" and (item.get("options") or {}).get("score") != "uncertainty":
            raise StudyError(f"{where}: methods[{i}] has an estimator: its options must set score: uncertainty "
                             f"(the strategy ranks by the estimator), got {(item.get('options') or {}).get('score')!r}")
        methods.append(Method(**item))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise StudyError(f"{where}: method names must be unique, got {names}")
    study = StudyConfig(**values, methods=methods)
    if not study.methods:
        raise StudyError(f"{where}: methods must list at least one method")
    for key in ("budgets", "learning_rates", "seeds", "tuning_seeds"):
        if not getattr(study, key):
            raise StudyError(f"{where}: {key} must be a non-empty list")
    if any(not 0 < b <= 1 for b in study.budgets):
        raise StudyError(f"{where}: budgets must lie in (0, 1], got {study.budgets}")
    return study


def read_study_yaml(path: str | os.PathLike, *, quick: bool, error: type[Exception], where: str) -> dict:
    """The mapping of a study's YAML file; `quick=True` applies its `quick:` section on top (its
    `methods:` list keeps those methods by name). A missing file raises `error`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{where}: no study config at {path}")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    quick_section = raw.pop("quick", {}) or {}
    if quick:
        keep = quick_section.pop("methods", None)
        raw.update(quick_section)
        if keep is not None:
            raw["methods"] = [m for m in raw.get("methods", []) if m.get("name") in keep]
    return raw


def load_study(path: str | os.PathLike, *, quick: bool = False) -> StudyConfig:
    """The study in YAML file `path`; `quick=True` applies its `quick:` section on top (a smaller
    study that finishes in minutes)."""
    return _study_from_dict(read_study_yaml(path, quick=quick, error=StudyError, where="aql.efficiency"), str(path))


# ------------------------------------------------------------------------------------------ one run
def flops_per_sample(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward FLOPs of one sample (torch's FlopCounterMode on a batch, divided by its size)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / x.shape[0]


def _loss(model, x, y) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        value = float(F.cross_entropy(model(x), y))
    model.train(was_training)
    return value


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def train_run(study: StudyConfig, method: Method, data: Mapping[str, Any], *, budget: float, learning_rate: float, seed: int,
              evaluate_test: bool) -> dict[str, Any]:
    """Trains one model under `method` at `budget` and returns its metrics (val accuracy; test
    accuracy only when `evaluate_test`; samples back-propagated; scoring forwards; FLOPs; wall time)."""
    torch.manual_seed(seed)
    model = MNIST1DCNN(study.channels, kernel_size=study.kernel_size, dropout=study.dropout)
    train_x, train_y = (data["fit_x"], data["fit_y"]) if method.holdout else (data["train_x"], data["train_y"])
    n = train_x.shape[0]
    epochs = study.epochs if method.epochs_scale == "none" else max(1, round(budget * study.epochs))
    # Budget-matched to the whole training split: a method that keeps a holdout back-propagates
    # budget * len(train) samples per epoch from the rest (plus the irreducible model's training).
    strategy_budget = 1.0 if method.strategy == "none" else min(1.0, budget * data["train_x"].shape[0] / n)
    options = dict(method.options)
    extra_backprops = 0
    cls = strategies.STRATEGIES[method.strategy]
    kwargs: dict[str, Any] = {"seed": seed}
    if _accepts(cls, "query_budget"):
        kwargs["query_budget"] = strategy_budget
    if options.get("score") == "reducible":
        il_options = dict(options.pop("irreducible", {}))
        il_epochs = il_options.pop("epochs", study.irreducible_epochs)
        from .strategies.irreducible import irreducible_losses

        kwargs["irreducible"] = irreducible_losses(
            IndexedTensorDataset(train_x, train_y), IndexedTensorDataset(data["holdout_x"], data["holdout_y"]), seed=seed, epochs=il_epochs,
            model_factory=lambda: MNIST1DCNN(study.channels, kernel_size=study.kernel_size, dropout=study.dropout), **il_options)
        extra_backprops = il_epochs * data["holdout_x"].shape[0]
    if _accepts(cls, "labels"):
        kwargs.update(labels=train_y)
    if _accepts(cls, "num_classes"):
        kwargs.update(num_classes=10)
    if _accepts(cls, "model"):
        kwargs.update(model=model)
    if _accepts(cls, "holdout"):
        kwargs.update(holdout=(data["holdout_x"], data["holdout_y"]))
    if _accepts(cls, "epochs"):
        kwargs.update(epochs=epochs)
    estimator = _Estimator(method, model, train_x, study) if method.estimator != "none" else None
    if estimator is not None:
        kwargs.update(candidate_scorer=estimator.score)
    strategy = cls(n, **kwargs, **options)

    decay, no_decay = [], []
    for parameter in model.parameters():
        (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": study.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=learning_rate)
    steps_per_epoch = strategy.num_batches(strategy.epoch_plan(0), study.batch_size)
    total = max(1, steps_per_epoch * epochs)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(round(study.warmup_fraction * total), total))
    early_step = max(1, math.ceil(0.1 * total))  # "the first 10% of training" (Experiment 2), on the val split
    early_accuracy = None
    backprops = forwards = steps = 0
    start = time.perf_counter()
    selection_time = 0.0
    model.train()
    for epoch in range(epochs):
        plan = strategy.epoch_plan(epoch)
        for indices, weights in strategy.batches(plan, study.batch_size):
            x, y = train_x[indices], train_y[indices]
            if strategy.scores_candidates:
                with torch.no_grad():
                    candidate = aql_kernels.softmax_scores(model(x), y)
                forwards += indices.shape[0]
                tick = time.perf_counter()
                kept, kept_weights = split_selection(strategy.select(indices, candidate))
                selection_time += time.perf_counter() - tick
                indices, x, y = indices[kept], x[kept], y[kept]
                weights = kept_weights if kept_weights is not None else (None if weights is None else weights[kept])
                if indices.shape[0] == 0:
                    continue
            logits = model(x)
            if strategy.uses_scores:
                losses, scores = aql_kernels.cross_entropy_with_scores(logits, y, reduction="none")
            else:
                losses, scores = F.cross_entropy(logits, y, reduction="none"), None
            loss = losses.mean() if weights is None else (losses * weights).sum() / weights.sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if study.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), study.grad_clip)
            if estimator is not None:
                estimator.after_backward(x)
            optimizer.step()
            scheduler.step()
            if estimator is not None:
                estimator.after_step(x)
            steps += 1
            backprops += indices.shape[0]
            if steps == early_step:
                model.eval()
                early_accuracy = _accuracy(model, data["val_x"], data["val_y"])
                model.train()
            if scores is not None:
                tick = time.perf_counter()
                strategy.after_step(indices, scores)
                selection_time += time.perf_counter() - tick
        metrics = {"val_loss": _loss(model, data["val_x"], data["val_y"])} if strategy.uses_scores else {}
        tick = time.perf_counter()
        strategy.end_epoch(metrics)
        selection_time += time.perf_counter() - tick
    wall = time.perf_counter() - start
    model.eval()
    flops = flops_per_sample(model, data["val_x"][:64])
    estimator_flops = 0.0 if estimator is None else estimator.flops(data["val_x"][:64])
    result = {
        "method": method.name, "strategy": method.strategy, "budget": budget, "seed": seed, "learning_rate": learning_rate,
        "epochs": epochs, "steps": steps, "samples_backpropagated": backprops + extra_backprops,
        "irreducible_backpropagated": extra_backprops, "scoring_forwards": forwards + getattr(strategy, "extra_forwards", 0),
        # forward + backward ~ 3 forwards; scoring forwards 1 each; the irreducible model's training likewise;
        # an estimator's scoring passes and its students' distillation (their own FLOPs) on top
        "flops": flops * (3 * (backprops + extra_backprops) + forwards + getattr(strategy, "extra_forwards", 0) + (n if extra_backprops else 0))
        + estimator_flops,
        "wall_s": wall, "selection_s": selection_time, "val_accuracy": _accuracy(model, data["val_x"], data["val_y"]),
        "val_accuracy_first_10pct": early_accuracy,
    }
    if evaluate_test:
        result["test_accuracy"] = _accuracy(model, data["test_x"], data["test_y"])
    return result


class _Estimator:
    """The uncertainty estimator of a study run (`Method.estimator`), fed by the training loop itself:

    - `laplace`: `aql.uncertainty.LaplacianUncertainty(model, **estimator_options)`; its statistics come
      from the training step (forward hooks and `update_from_grads` after each backward).
    - `mc_dropout`: `MCDropoutUncertainty(model, **estimator_options)`: nothing during training; each
      score costs `n_samples` forwards (the model needs `dropout` > 0).
    - `ensemble`: `EnsembleUncertainty(model, **estimator_options)`: `study.distill_steps` distillation
      steps of the students on each training batch, after the optimizer step.

    `score(indices)` is the candidate scorer of the strategy (`score: uncertainty`): the estimator's
    `estimate_uncertainty` of those training rows. `flops(x)` totals what the estimator computed
    beyond the run's own forwards and backwards, from the counts it kept."""

    def __init__(self, method: Method, model: torch.nn.Module, train_x: torch.Tensor, study: StudyConfig):
        from . import uncertainty

        self.kind, self.model, self.train_x, self.study = method.estimator, model, train_x, study
        options = dict(method.estimator_options)
        if self.kind == "laplace":
            self.estimator = uncertainty.LaplacianUncertainty(model, dataset_size=train_x.shape[0], **options)
        elif self.kind == "mc_dropout":
            self.estimator = uncertainty.MCDropoutUncertainty(model, **options)
        else:
            self.estimator = uncertainty.EnsembleUncertainty(model, **options)
        self.scored = 0  # rows scored
        self.distilled = 0  # rows distilled (each: every student's forward + backward and a teacher forward)

    def score(self, indices: torch.Tensor) -> torch.Tensor:
        self.scored += indices.shape[0]
        was_training = self.model.training
        self.model.eval()
        try:
            return self.estimator.estimate_uncertainty(self.train_x[indices])
        finally:
            self.model.train(was_training)

    def after_backward(self, x: torch.Tensor) -> None:
        if self.kind == "laplace":
            self.estimator.update_from_grads(batch_size=x.shape[0], check=False)

    def after_step(self, x: torch.Tensor) -> None:
        if self.kind == "ensemble":
            for _ in range(self.study.distill_steps):
                self.estimator.train_ensemble(x)
            self.distilled += self.study.distill_steps * x.shape[0]

    def flops(self, x: torch.Tensor) -> float:
        """FLOPs of the scoring passes (one forward each; n_samples for MC dropout; the students' for the
        ensemble) and of the ensemble's distillation (a teacher forward + 3x each student's forward)."""
        main = flops_per_sample(self.model, x)
        if self.kind == "laplace":
            return main * self.scored
        if self.kind == "mc_dropout":
            return main * self.estimator.n_samples * self.scored
        students = sum(flops_per_sample(s, x) for s in self.estimator.students)
        return students * self.scored + (main + 3 * students) * self.distilled


def _accepts(cls, name: str) -> bool:
    """Whether the strategy's constructor takes `name` (labels, model, holdout, epochs, ...)."""
    return name in inspect.signature(cls.__init__).parameters


def load_data(study: StudyConfig) -> dict[str, torch.Tensor]:
    train, val, test = mnist1d_datasets(study.num_samples, train_split=study.train_split, val_fraction=study.val_fraction,
                                        seed=study.data_seed, cache_dir=study.cache_dir)
    if val is None:
        raise StudyError("aql.efficiency: val_fraction must be > 0: the learning rate is tuned on the validation split")
    n_holdout = max(1, round(study.holdout_fraction * len(train)))
    return {"train_x": train.inputs, "train_y": train.targets, "val_x": val.inputs, "val_y": val.targets,
            "test_x": test.inputs, "test_y": test.targets,
            "holdout_x": train.inputs[:n_holdout], "holdout_y": train.targets[:n_holdout],
            "fit_x": train.inputs[n_holdout:], "fit_y": train.targets[n_holdout:]}


# -------------------------------------------------------------------------------------------- study
def _budgets(study: StudyConfig, method: Method) -> list[float]:
    if method.budgets is not None:
        return list(method.budgets)
    return [1.0] if method.strategy == "none" and method.epochs_scale == "none" else list(study.budgets)


def _key(record: Mapping[str, Any]) -> tuple:
    return (record["phase"], record["method"], float(record["budget"]), int(record["seed"]), float(record["learning_rate"]))


def open_runs(output_dir: str | os.PathLike, threads: int, where: str) -> tuple[Path, list[dict]]:
    """The start of a resumable study: torch's thread count set to `threads` (0: left alone), and
    (`<output_dir>/runs.jsonl`, the run records already in it), the folder created if missing."""
    check_int(where, "threads", threads, low=0)
    if threads:
        torch.set_num_threads(threads)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    runs_path = output_dir / "runs.jsonl"
    return runs_path, _read_runs(runs_path)


def run_study(study: StudyConfig, output_dir: str | os.PathLike, *, progress: bool = True, log: Callable[[str], None] = print) -> list[dict]:
    """Tunes and runs every method (see the module docstring); returns all run records. Resumable:
    records already in `<output_dir>/runs.jsonl` are not run again."""
    runs_path, records = open_runs(output_dir, study.threads, "efficiency.run_study")
    done = {_key(r) for r in records}
    data = load_data(study)
    jobs = []
    for method in study.methods:
        for budget in _budgets(study, method):
            for lr in study.learning_rates:
                for seed in study.tuning_seeds:
                    jobs.append(("tune", method, budget, seed, lr))
    total = len(jobs) + sum(len(_budgets(study, m)) * len(study.seeds) for m in study.methods)
    bar = _progress_bar(total, progress)
    try:
        for phase, method, budget, seed, lr in jobs:
            if (phase, method.name, float(budget), seed, float(lr)) not in done:
                record = {"phase": phase, **train_run(study, method, data, budget=budget, learning_rate=lr, seed=seed, evaluate_test=False)}
                _append(runs_path, record)
                records.append(record)
            bar.update(1)
        for method in study.methods:
            for budget in _budgets(study, method):
                lr = chosen_learning_rate(records, method.name, budget)
                for seed in study.seeds:
                    if ("final", method.name, float(budget), seed, float(lr)) not in done:
                        record = {"phase": "final", **train_run(study, method, data, budget=budget, learning_rate=lr, seed=seed,
                                                                  evaluate_test=True)}
                        _append(runs_path, record)
                        records.append(record)
                    bar.update(1)
    finally:
        bar.close()
    return records


def chosen_learning_rate(records: Iterable[Mapping[str, Any]], method: str, budget: float) -> float:
    """The learning rate with the best mean validation accuracy over the tuning runs of (method,
    budget); ties go to the smaller rate."""
    by_lr: dict[float, list[float]] = {}
    for r in records:
        if r["phase"] == "tune" and r["method"] == method and float(r["budget"]) == float(budget):
            by_lr.setdefault(float(r["learning_rate"]), []).append(r["val_accuracy"])
    if not by_lr:
        raise StudyError(f"aql.efficiency: no tuning runs for method {method!r} at budget {budget}")
    return max(sorted(by_lr), key=lambda lr: statistics.fmean(by_lr[lr]))


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="efficiency study", unit="run", disable=not enabled, dynamic_ncols=True)


def _read_runs(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a crash: that run is simply run again
    return records


def _append(path: Path, record: Mapping[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())


# ------------------------------------------------------------------------------------------ results
def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(study: StudyConfig, records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Per (method, budget): test accuracy mean/std over seeds, samples back-propagated, FLOPs, wall
    time, the chosen learning rate; per method: the samples needed to reach the all-data accuracy."""
    final = [r for r in records if r["phase"] == "final"]
    rows: dict[str, dict[float, dict]] = {}
    for method in study.methods:
        for budget in _budgets(study, method):
            runs = [r for r in final if r["method"] == method.name and float(r["budget"]) == float(budget)]
            if not runs:
                continue
            acc_mean, acc_std = _mean_std([r["test_accuracy"] for r in runs])
            val_mean, _ = _mean_std([r["val_accuracy"] for r in runs])
            rows.setdefault(method.name, {})[float(budget)] = {
                "test_accuracy": acc_mean, "test_accuracy_std": acc_std, "val_accuracy": val_mean, "seeds": len(runs),
                "learning_rate": runs[0]["learning_rate"],
                "samples_backpropagated": statistics.fmean(r["samples_backpropagated"] for r in runs),
                "scoring_forwards": statistics.fmean(r["scoring_forwards"] for r in runs),
                "flops": statistics.fmean(r["flops"] for r in runs), "wall_s": statistics.fmean(r["wall_s"] for r in runs),
                "selection_s": statistics.fmean(r["selection_s"] for r in runs),
                "val_accuracy_first_10pct": statistics.fmean(r.get("val_accuracy_first_10pct") or math.nan for r in runs),
                "selection_pct": 100.0 * statistics.fmean(r["selection_s"] / max(1e-12, r["wall_s"] - r["selection_s"]) for r in runs),
            }
    target = rows.get("all_data", {}).get(1.0)
    verdicts = {}
    for name, by_budget in rows.items():
        if target is None or name == "all_data":
            continue
        threshold = target["test_accuracy"] - target["test_accuracy_std"]
        reached = [b for b in sorted(by_budget) if by_budget[b]["test_accuracy"] >= threshold]
        verdicts[name] = {
            "target_accuracy": target["test_accuracy"], "threshold": threshold,
            "reached_at_budget": reached[0] if reached else None,
            "samples_to_target": by_budget[reached[0]]["samples_backpropagated"] if reached else None,
            "reduction_vs_all_data": (target["samples_backpropagated"] / by_budget[reached[0]]["samples_backpropagated"]) if reached else None,
        }
    return {"rows": {m: {str(b): v for b, v in r.items()} for m, r in rows.items()}, "target": target, "verdicts": verdicts}


def format_report(study: StudyConfig, summary: Mapping[str, Any]) -> str:
    """Markdown tables: test accuracy (mean +- std over seeds) per method and budget, and the samples
    to reach the all-data accuracy."""
    budgets = [str(float(b)) for b in study.budgets]
    lines = ["| method | " + " | ".join(f"budget {b}" for b in budgets) + " | samples to target |",
             "|---|" + "---|" * (len(budgets) + 1)]
    target = summary.get("target")
    for method in study.methods:
        row = summary["rows"].get(method.name, {})
        if method.name == "all_data" and target is not None:
            lines.insert(2, f"| all_data (target, 1.0) | {target['test_accuracy']:.4f} ± {target['test_accuracy_std']:.4f} "
                            f"| {'| ' * (len(budgets) - 1)}{target['samples_backpropagated']:,.0f} |")
            continue
        cells = []
        for b in budgets:
            cell = row.get(b)
            cells.append(f"{cell['test_accuracy']:.4f} ± {cell['test_accuracy_std']:.4f}" if cell else "—")
        verdict = summary["verdicts"].get(method.name, {})
        samples = verdict.get("samples_to_target")
        reach = f"{samples:,.0f} ({verdict['reduction_vs_all_data']:.1f}x fewer)" if samples else "not reached"
        lines.append(f"| {method.name} | " + " | ".join(cells) + f" | {reach} |")
    return "\n".join(lines)


def plot_efficiency(study: StudyConfig, summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """Test accuracy against samples back-propagated (log x), one line per method (controls dashed),
    the all-data run as a star and a band (mean +- std); left the whole range, right a zoom on the
    top (points below it are left out there)."""
    from .plots import pyplot, save_png

    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [1, 1.25]})
    target = summary.get("target")
    colours = plt.get_cmap("tab20").colors
    markers = "osD^vP*Xh<>p"
    methods = [m for m in study.methods if m.name != "all_data" and summary["rows"].get(m.name)]
    for panel, axis in enumerate(axes):
        if target is not None:
            low, high = target["test_accuracy"] - target["test_accuracy_std"], target["test_accuracy"] + target["test_accuracy_std"]
            axis.axhspan(low, high, color="0.85", zorder=0)
            axis.axhline(target["test_accuracy"], color="0.3", lw=1, zorder=1)
            axis.plot([target["samples_backpropagated"]], [target["test_accuracy"]], marker="*", ms=14, color="black", ls="none",
                      label=f"all data, {study.epochs} epochs: {target['test_accuracy']:.4f} ± {target['test_accuracy_std']:.4f}")
        for i, method in enumerate(methods):
            row = summary["rows"][method.name]
            budgets = sorted(row, key=float)
            xs = [row[b]["samples_backpropagated"] for b in budgets]
            ys = [row[b]["test_accuracy"] for b in budgets]
            es = [row[b]["test_accuracy_std"] for b in budgets]
            control = method.name in ("random", "all_data_short")
            axis.errorbar(xs, ys, yerr=es, marker=markers[i % len(markers)], ms=5, capsize=2, lw=2.2 if control else 1.3,
                          ls="--" if control else "-", color="black" if method.name == "random" else
                          ("0.45" if method.name == "all_data_short" else colours[i % len(colours)]),
                          label=method.name + (" (control)" if control else ""))
        axis.set_xscale("log")
        axis.set_xlabel("samples back-propagated (log scale)")
        axis.grid(alpha=0.3, which="both")
        if panel == 1 and target is not None:
            axis.set_ylim(target["test_accuracy"] - 0.06, target["test_accuracy"] + 0.01)
            axis.set_title("zoom on the top (lower points left out)")
        else:
            axis.set_ylabel("test accuracy (mean ± std over seeds)")
            axis.set_title("every method, whole range")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.suptitle(f"MNIST-1D: test accuracy against samples back-propagated (budgets {', '.join(str(b) for b in study.budgets)})")
    return save_png(figure, path)


def plot_efficiency_by_method(study: StudyConfig, summary: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """One small panel per method: the method (solid), the two controls (dashed: random, all data
    for budget x epochs) and the all-data band, test accuracy against samples back-propagated (log x)."""
    from .plots import pyplot, save_png

    plt = pyplot()
    controls = [m for m in ("random", "all_data_short") if summary["rows"].get(m)]
    methods = [m.name for m in study.methods if m.name not in ("all_data", *controls) and summary["rows"].get(m.name)]
    columns = 4
    rows = max(1, math.ceil(len(methods) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), sharex=True, sharey=True, squeeze=False)
    target = summary.get("target")

    def line(axis, name, **style):
        row = summary["rows"][name]
        budgets = sorted(row, key=float)
        axis.errorbar([row[b]["samples_backpropagated"] for b in budgets], [row[b]["test_accuracy"] for b in budgets],
                      yerr=[row[b]["test_accuracy_std"] for b in budgets], capsize=2, ms=4, **style)

    for index, axis in enumerate(axes.flat):
        if index >= len(methods):
            axis.axis("off")
            continue
        if target is not None:
            axis.axhspan(target["test_accuracy"] - target["test_accuracy_std"], target["test_accuracy"] + target["test_accuracy_std"],
                         color="0.8", zorder=0)
            axis.axhline(target["test_accuracy"], color="0.3", lw=0.8)
        for name, colour in zip(controls, ("black", "0.5")):
            line(axis, name, marker="s", ls="--", lw=1.2, color=colour, label=name)
        line(axis, methods[index], marker="o", lw=2, color="tab:blue", label=methods[index])
        axis.set_title(methods[index], fontsize=9)
        axis.set_xscale("log")
        axis.grid(alpha=0.3, which="both")
        if target is not None:
            axis.set_ylim(target["test_accuracy"] - 0.08, target["test_accuracy"] + 0.01)
    ticks = sorted({round(cell["samples_backpropagated"]) for name in controls for cell in summary["rows"][name].values()})
    for axis in axes.flat:
        if ticks:
            axis.set_xticks(ticks, [f"{t / 1000:g}k" for t in ticks])
            axis.xaxis.set_minor_formatter(plt.NullFormatter())
    for axis in axes[-1]:
        axis.set_xlabel("samples back-propagated")
    for axis in axes[:, 0]:
        axis.set_ylabel("test accuracy")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    figure.legend(handles[:len(controls)], labels[:len(controls)], loc="upper right", fontsize=8)
    figure.suptitle("Each method (blue) against the controls (dashed) and the all-data band (grey); points below the frame "
                    "are left out", fontsize=10)
    return save_png(figure, path)


def format_experiment2(study: StudyConfig, summary: Mapping[str, Any]) -> str:
    """Experiment 2's table: validation accuracy after the first 10% of training, final test accuracy
    and samples to the all-data accuracy, for AQL only / curriculum only / AQL + curriculum."""
    lines = ["| variant | method | budget | val acc. after 10% of training | final test acc. | samples to target |",
             "|---|---|---|---|---|---|"]
    for variant, name in study.experiment2.items():
        row = summary["rows"].get(name, {})
        verdict = summary["verdicts"].get(name, {})
        samples = verdict.get("samples_to_target")
        reach = f"{samples:,.0f}" if samples else "not reached"
        for budget in sorted(row, key=float):
            cell = row[budget]
            lines.append(f"| {variant} | {name} | {budget} | {cell['val_accuracy_first_10pct']:.4f} | "
                         f"{cell['test_accuracy']:.4f} ± {cell['test_accuracy_std']:.4f} | {reach} |")
    return "\n".join(lines)


def format_costs(study: StudyConfig, summary: Mapping[str, Any], budget: float) -> str:
    """What each method spent at `budget`: samples back-propagated, scoring forwards, FLOPs and wall
    time relative to the all-data run, the chosen learning rate, and the selection's own time as a
    share of the rest of the run (the strategy's select / after_step / end_epoch calls)."""
    target = summary.get("target")
    lines = [f"| method (budget {budget}) | samples back-propagated | scoring forwards | FLOPs vs all data | wall time vs all data "
             "| learning rate | selection time |", "|---|---|---|---|---|---|---|"]
    for method in study.methods:
        cell = summary["rows"].get(method.name, {}).get(str(float(budget)))
        if cell is None or target is None:
            continue
        lines.append(f"| {method.name} | {cell['samples_backpropagated']:,.0f} | {cell['scoring_forwards']:,.0f} | "
                     f"{cell['flops'] / target['flops']:.2f}x | {cell['wall_s'] / target['wall_s']:.2f}x | {cell['learning_rate']:g} | "
                     f"{cell['selection_pct']:.2f}% |")
    return "\n".join(lines)


def write_outputs(study: StudyConfig, records: list[dict], output_dir: str | os.PathLike) -> dict[str, Any]:
    """summary.json, report.md (the tables) and efficiency.png in `output_dir`; returns the summary."""
    output_dir = Path(output_dir)
    summary = summarise(study, records)
    temporary = output_dir / "summary.json.tmp"
    temporary.write_text(json.dumps(summary, indent=1, default=float) + "\n", encoding="utf-8")
    os.replace(temporary, output_dir / "summary.json")
    report = "## Test accuracy by budget (mean ± std over seeds)\n\n" + format_report(study, summary) + "\n"
    for budget in study.budgets:
        report += f"\n## Cost at budget {budget}\n\n" + format_costs(study, summary, budget) + "\n"
    if study.experiment2:
        report += "\n## Experiment 2: curriculum\n\n" + format_experiment2(study, summary) + "\n"
    (output_dir / "report.md").write_text(report, encoding="utf-8")
    if summary["rows"]:
        plot_efficiency(study, summary, output_dir / "efficiency.png")
        plot_efficiency_by_method(study, summary, output_dir / "efficiency_by_method.png")
    return summary


def run_efficiency_experiment(config: str | os.PathLike, output_dir: str | os.PathLike = "results/experiments/efficiency", *,
                              quick: bool = False, progress: bool = True) -> dict[str, Any]:
    """`python -m aql experiment efficiency`: runs (or resumes) the study and writes its outputs."""
    study = load_study(config, quick=quick)
    records = run_study(study, output_dir, progress=progress)
    summary = write_outputs(study, records, output_dir)
    print(format_report(study, summary))
    if study.experiment2:
        print()
        print(format_experiment2(study, summary))
    print(f"\nruns, summary.json, report.md and efficiency.png in {output_dir}")
    return summary
