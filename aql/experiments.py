"""Experiments of the design document, runnable from `python -m aql experiment <name>`.

`uncertainty` (the design document's Experiment 1, on MNIST-1D): trains a small MLP
(40 -> 256 -> 256 -> 10, ReLU, dropout 0.1 after each hidden layer) with AdamW on the train split while
several `LaplacianUncertainty` (the default and each option, `LAPLACE_VARIANTS`) keep their statistics
from the training step (`update_from_grads` after every backward: gradients of the head, inputs and
outputs of the training forward) and an `EnsembleUncertainty` distils its students from the model for a
few steps per batch.
It then scores the test split and two out-of-distribution sets built from it -- every test input with
its 40 positions shuffled (a permutation drawn per sample) and Gaussian noise with the test inputs'
mean and standard deviation -- with each method:

- each Laplace variant's `estimate_uncertainty` (one forward pass) and the plain predictive entropy;
- 10-pass MC dropout: BALD (mutual information) and the predictive entropy;
- the distilled ensemble: the variance of the students' probabilities.

For each score it reports the OOD AUROC (test vs shuffled, test vs noise; ranks with ties averaged)
and the cost of the estimator's call relative to one plain forward pass of the model over the same
batch, both timed alternately in the same process (median over rounds of the ratio).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_int

__all__ = ["auroc", "uncertainty_mlp", "ood_inputs", "relative_cost", "run_uncertainty_experiment",
           "format_uncertainty_table", "plot_uncertainty", "summarize_uncertainty_runs", "format_uncertainty_summary",
           "LAPLACE_VARIANTS", "EXPERIMENTS", "training_step_overhead"]

def auroc(in_distribution: torch.Tensor, out_of_distribution: torch.Tensor) -> float:
    """Area under the ROC curve of separating `out_of_distribution` scores (positives, expected higher)
    from `in_distribution` scores: the probability that a random positive scores above a random
    negative, ties counting one half. Computed from ranks (Mann-Whitney U), tied values getting the
    average of their ranks; float64 throughout. NaN scores are rejected."""
    where = "aql.experiments.auroc"
    for name, scores in (("in_distribution", in_distribution), ("out_of_distribution", out_of_distribution)):
        if not isinstance(scores, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(scores).__name__}")
        if scores.dim() != 1 or scores.shape[0] == 0:
            raise ValueError(f"{where}: {name} must be a non-empty 1-D tensor, got shape {tuple(scores.shape)}")
        if scores.dtype == torch.bool or scores.is_complex():
            raise TypeError(f"{where}: {name} must hold real numbers, got {scores.dtype}")
    negatives = in_distribution.detach().to("cpu", torch.float64)
    positives = out_of_distribution.detach().to("cpu", torch.float64)
    if torch.isnan(negatives).any() or torch.isnan(positives).any():
        raise ValueError(f"{where}: scores must not be NaN")
    values = torch.cat([negatives, positives])
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, counts = torch.unique_consecutive(sorted_values, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)  # 1-based rank of each tie group's last member
    average_ranks = ends - (counts.to(torch.float64) - 1) / 2
    ranks = torch.empty_like(values)
    ranks[order] = torch.repeat_interleave(average_ranks, counts)
    n_neg, n_pos = negatives.shape[0], positives.shape[0]
    rank_sum = ranks[n_neg:].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def uncertainty_mlp(dropout: float = 0.1) -> nn.Module:
    """40 -> 256 -> 256 -> 10 with ReLU and dropout after each hidden layer; the last Linear is the head."""
    return nn.Sequential(nn.Linear(40, 256), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(256, 256), nn.ReLU(), nn.Dropout(dropout), nn.Linear(256, 10))


def ood_inputs(x: torch.Tensor, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """{"shuffled": each row's positions permuted (one permutation per row), "noise": Gaussian with the
    mean and standard deviation of all of x's values}, each the shape of x; the experiment's metric
    (`auroc_mean`) is over these two. Then three sets that keep more of the data's structure, reported
    beside it: "reversed" (positions in reverse order), "mixup" (the mean of each row and another row
    drawn at random), "scaled" (3 x)."""
    permutations = torch.argsort(torch.rand(x.shape, generator=generator, device=x.device), dim=1)
    shuffled = torch.gather(x, 1, permutations)
    noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * x.std() + x.mean()
    partners = torch.randperm(x.shape[0], generator=generator, device=x.device)
    return {"shuffled": shuffled, "noise": noise, "reversed": x.flip(1), "mixup": 0.5 * (x + x[partners]), "scaled": 3.0 * x}


def relative_cost(run: Callable[[], object], forward: Callable[[], object], *, rounds: int = 21, min_block_s: float = 0.01) -> float:
    """Median over `rounds` of time(run) / time(forward), the two timed back to back in each round, so
    that load from other processes hits both alike. Each timed block repeats its call often enough that
    the forward block lasts about `min_block_s` (a sub-millisecond forward timed once is mostly timer
    and scheduler noise)."""
    def timed(fn, repeats: int) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - start

    run()
    forward()  # warm-up: first-call allocations and library loading stay out of the rounds
    repeats = max(1, min(1000, math.ceil(min_block_s / max(timed(forward, 3) / 3, 1e-7))))
    return statistics.median(timed(run, repeats) / timed(forward, repeats) for _ in range(rounds))


# (name in the results, LaplacianUncertainty options): the default first, then the options it was chosen over
LAPLACE_VARIANTS = (
    ("laplace_epistemic", {}),
    ("laplace_mahalanobis_head", {"layers": "head"}),
    ("laplace_mahalanobis_all", {"layers": "all"}),
    ("laplace_kfac", {"method": "kfac"}),
    ("laplace_diagonal", {"method": "diagonal"}),
    ("laplace_prior", {"method": "prior"}),
)


def training_step_overhead(*, batch_size: int = 128, steps: int = 50, rounds: int = 15, distill_steps: int = 2,
                           n_ensemble: int = 3, seed: int = 0, quiet: bool = False) -> dict:
    """What each estimator adds to a training step of Experiment 1's MLP, measured inside the training
    loop: blocks of `steps` optimizer steps (forward, loss, backward, AdamW step) of each variant,
    interleaved round by round in one process; per variant the median over `rounds` of its block time
    divided by the bare block's (F.cross_entropy, no estimator) of the same round, as a % overhead.

    Variants: `bare`; `mc_dropout` (nothing during training: the same step, so its figure is the noise
    floor); `entropy` (the fused `cross_entropy_with_scores`, whose statistics give the predictive
    entropy of the training batch); `laplace` (the default `LaplacianUncertainty`: its forward hooks and
    `update_from_grads` after each backward); `laplace_kfac` (the K-FAC option); `ensemble`
    (`distill_steps` distillation steps of `n_ensemble` students after each step). Data: random MNIST-1D
    shaped batches (the cost does not depend on the values)."""
    import aql_kernels

    from .uncertainty import EnsembleUncertainty, LaplacianUncertainty

    where = "experiments.training_step_overhead"
    for name, value, low in (("batch_size", batch_size, 1), ("steps", steps, 1), ("rounds", rounds, 1),
                             ("distill_steps", distill_steps, 1), ("n_ensemble", n_ensemble, 2)):
        check_int(where, name, value, low=low)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, batch_size, 40, generator=generator)
    y = torch.randint(0, 10, (steps, batch_size), generator=generator)

    def variant(name):
        torch.manual_seed(seed)
        model = uncertainty_mlp(0.1)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-2)
        estimator = None
        if name == "laplace":
            estimator = LaplacianUncertainty(model, dataset_size=8000)
        elif name == "laplace_kfac":
            estimator = LaplacianUncertainty(model, dataset_size=8000, method="kfac")
        elif name == "ensemble":
            estimator = EnsembleUncertainty(model, n_ensemble=n_ensemble)

        def block():
            start = time.perf_counter()
            for i in range(steps):
                logits = model(x[i])
                if name == "entropy":
                    loss, _ = aql_kernels.cross_entropy_with_scores(logits, y[i])
                else:
                    loss = F.cross_entropy(logits, y[i])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if name in ("laplace", "laplace_kfac"):
                    estimator.update_from_grads(batch_size=batch_size, check=False)
                optimizer.step()
                if name == "ensemble":
                    for _ in range(distill_steps):
                        estimator.train_ensemble(x[i])
            return time.perf_counter() - start

        return block

    names = ("bare", "mc_dropout", "entropy", "laplace", "laplace_kfac", "ensemble")
    blocks = {name: variant(name) for name in names}
    for block in blocks.values():
        block()  # warm-up
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            times[name].append(blocks[name]())
    result = {"settings": {"batch_size": batch_size, "steps_per_block": steps, "rounds": rounds, "distill_steps": distill_steps,
                           "n_ensemble": n_ensemble, "model": "MLP 40-256-256-10, dropout 0.1", "torch_threads": torch.get_num_threads()},
              "bare_step_ms": statistics.median(times["bare"]) / steps * 1e3, "variants": {}}
    for name in names:
        ratios = [t / b for t, b in zip(times[name], times["bare"])]
        result["variants"][name] = {"step_ms": statistics.median(times[name]) / steps * 1e3,
                                    "overhead_percent": 100.0 * (statistics.median(ratios) - 1.0),
                                    "overhead_percent_iqr": [100.0 * (q - 1.0) for q in statistics.quantiles(ratios, n=4)[::2]]
                                    if len(ratios) > 1 else None}
        if not quiet:
            v = result["variants"][name]
            print(f"  {name:13s} {v['step_ms']:.3f} ms/step, {v['overhead_percent']:+.1f}% against the bare step", flush=True)
    return result


def run_uncertainty_experiment(output_dir: str | os.PathLike = "runs/experiment_uncertainty", *, samples: int = 10000,
                               epochs: int = 20, seed: int = 0, batch_size: int = 128, learning_rate: float = 1e-3,
                               distill_steps: int = 2, mc_samples: int = 10, n_ensemble: int = 3,
                               cost_rounds: int = 21, data_seed: int = 42, cache_dir: str | os.PathLike = "data_cache",
                               quiet: bool = False, keep_model: bool = False) -> dict:
    """Experiment 1 (see the module docstring). Writes `experiment_uncertainty.json` and
    `experiment_uncertainty.png` into `output_dir` and returns the JSON's content; with `keep_model`
    also `"artifacts"`: the trained model, the training split and the scored inputs ({"test": ...,
    <OOD set>: ...}), e.g. to score the same inputs with another library (scripts/laplace_torch_peer.py)."""
    from .data import mnist1d_datasets
    from .trainer import seed_everything
    from .uncertainty import EnsembleUncertainty, LaplacianUncertainty, MCDropoutUncertainty

    where = "experiments.run_uncertainty_experiment"
    samples = check_int(where, "samples", samples, low=100)
    epochs = check_int(where, "epochs", epochs, low=1)
    seed = check_int(where, "seed", seed, low=0)
    batch_size = check_int(where, "batch_size", batch_size, low=1)
    distill_steps = check_int(where, "distill_steps", distill_steps, low=0)
    mc_samples = check_int(where, "mc_samples", mc_samples, low=2)
    n_ensemble = check_int(where, "n_ensemble", n_ensemble, low=2)
    cost_rounds = check_int(where, "cost_rounds", cost_rounds, low=1)
    say = (lambda *a, **k: None) if quiet else (lambda *a, **k: print(*a, **k, flush=True))
    output_dir = Path(output_dir)
    started = time.perf_counter()

    train, _, test = mnist1d_datasets(samples, train_split=0.8, val_fraction=0.0, seed=data_seed, cache_dir=cache_dir)
    seed_everything(seed)
    model = uncertainty_mlp(0.1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-2)
    laplaces = {name: LaplacianUncertainty(model, dataset_size=len(train), **options) for name, options in LAPLACE_VARIANTS}
    entropy = LaplacianUncertainty(model, dataset_size=len(train), score="entropy")
    ensemble = EnsembleUncertainty(model, n_ensemble=n_ensemble)
    say(f"experiment uncertainty: MNIST-1D {len(train)} train / {len(test)} test, MLP 40-256-256-10 (dropout 0.1), "
        f"{epochs} epochs, seed {seed}", )

    generator = torch.Generator().manual_seed(seed)
    history = []
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        total, steps = 0.0, 0
        for batch in order.split(batch_size):
            x, y = train.gather(batch)
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for laplace in laplaces.values():
                laplace.update_from_grads(batch_size=x.shape[0], check=False)
            optimizer.step()
            for _ in range(distill_steps):
                ensemble.train_ensemble(x)
            total += loss.detach()
            steps += 1
        model.eval()
        with torch.no_grad():
            accuracy = (model(test.inputs).argmax(dim=1) == test.targets).float().mean().item()
        history.append({"epoch": epoch + 1, "train_loss": (total / steps).item(), "test_accuracy": accuracy})
        say(f"  epoch {epoch + 1}/{epochs}: train loss {history[-1]['train_loss']:.4f}, test accuracy {accuracy:.4f}")

    model.eval()
    x_test = test.inputs
    ood = ood_inputs(x_test, generator)
    mc_dropout = MCDropoutUncertainty(model, n_samples=mc_samples)

    def laplace_scores(x):
        return {"entropy": entropy.estimate_uncertainty(x), **{name: e.estimate_uncertainty(x) for name, e in laplaces.items()}}

    def mc_scores(x):
        result = mc_dropout.estimate(x)
        return {"mc_dropout_bald": result.mutual_information, "mc_dropout_entropy": result.entropy}

    def ensemble_scores(x):
        return {"ensemble_variance": ensemble.estimate_uncertainty(x)}

    scores: dict[str, dict[str, torch.Tensor]] = {}
    for name, x in (("test", x_test), *ood.items()):
        scores[name] = {**laplace_scores(x), **mc_scores(x), **ensemble_scores(x)}

    def forward():
        with torch.no_grad():
            return model(x_test)

    # Which call each score costs: every Laplace score is its estimator's `estimate_uncertainty` (one
    # forward and the score's matmuls); the entropy is `estimate_uncertainty` with score="entropy".
    options = dict(LAPLACE_VARIANTS)
    calls = {
        **{name: (f"LaplacianUncertainty({', '.join(f'{k}={v!r}' for k, v in options[name].items())}).estimate_uncertainty",
                  (lambda e: lambda: e.estimate_uncertainty(x_test))(e)) for name, e in laplaces.items()},
        "entropy": ("LaplacianUncertainty(score='entropy').estimate_uncertainty", lambda: entropy.estimate_uncertainty(x_test)),
        "mc_dropout_bald": (f"MCDropoutUncertainty.estimate_uncertainty ({mc_samples} passes)", lambda: mc_dropout.estimate_uncertainty(x_test)),
        "ensemble_variance": (f"EnsembleUncertainty.estimate_uncertainty ({n_ensemble} students)", lambda: ensemble.estimate_uncertainty(x_test)),
    }
    costs = {}
    for method, (call, run) in calls.items():
        costs[method] = relative_cost(run, forward, rounds=cost_rounds)
    costs["mc_dropout_entropy"] = costs["mc_dropout_bald"]  # the same call yields both
    call_names = {method: call for method, (call, _) in calls.items()}
    call_names["mc_dropout_entropy"] = call_names["mc_dropout_bald"]

    methods = {}
    for method in (*laplaces, "entropy", "mc_dropout_bald", "mc_dropout_entropy", "ensemble_variance"):
        by_set = {name: auroc(scores["test"][method], scores[name][method]) for name in ood}
        methods[method] = {
            "auroc_shuffled": by_set["shuffled"],
            "auroc_noise": by_set["noise"],
            "auroc_mean": (by_set["shuffled"] + by_set["noise"]) / 2,
            **{f"auroc_{name}": value for name, value in by_set.items() if name not in ("shuffled", "noise")},
            "relative_cost": costs[method],
            "call": call_names[method],
        }

    result = {
        "experiment": "uncertainty",
        "dataset": f"MNIST-1D ({len(train)} train, {len(test)} test; OOD: {len(test)} each of shuffled, noise (the metric), "
                   "reversed, mixup, scaled (reported beside it))",
        "model": "MLP 40-256-256-10, ReLU, dropout 0.1",
        "settings": {"samples": samples, "epochs": epochs, "seed": seed, "batch_size": batch_size, "learning_rate": learning_rate,
                     "distill_steps_per_batch": distill_steps, "mc_samples": mc_samples, "n_ensemble": n_ensemble,
                     "cost_rounds": cost_rounds, "cost_batch": len(test), "data_seed": data_seed},
        "test_accuracy": history[-1]["test_accuracy"],
        "history": history,
        "methods": methods,
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "laplace_options": {name: options for name, options in LAPLACE_VARIANTS},
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    result["plot"] = str(plot_uncertainty(methods, output_dir / "experiment_uncertainty.png"))
    result["wall_time_s"] = time.perf_counter() - started
    json_path = output_dir / "experiment_uncertainty.json"
    json_path.write_text(json.dumps(result, indent=2))
    result["json"] = str(json_path)
    if keep_model:
        result["artifacts"] = {"model": model, "train": train, "inputs": {"test": x_test, **ood}}
    say("")
    say(format_uncertainty_table(result))
    say(f"\nresults: {json_path}\nplot:    {result['plot']}\nwall time {result['wall_time_s']:.1f} s")
    return result


def summarize_uncertainty_runs(results: list[dict]) -> dict:
    """Mean and sample standard deviation over runs (e.g. seeds) of each method's AUROCs and relative
    cost: {"seeds": [...], "methods": {name: {metric: {"mean", "std", "values"}}}, "test_accuracy": ...}.
    Every run must report the same methods."""
    where = "aql.experiments.summarize_uncertainty_runs"
    if not isinstance(results, (list, tuple)) or not results:
        raise ValueError(f"{where}: results must be a non-empty list of run_uncertainty_experiment results, got {results!r}")
    names = list(results[0]["methods"])
    for result in results[1:]:
        if list(result["methods"]) != names:
            raise ValueError(f"{where}: every run must report the methods {names}, got {list(result['methods'])}")

    def stats(values: list[float]) -> dict:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}

    metrics = [k for k in results[0]["methods"][names[0]] if k.startswith("auroc_")] + ["relative_cost"]
    return {
        "seeds": [r["settings"]["seed"] for r in results],
        "test_accuracy": stats([r["test_accuracy"] for r in results]),
        "methods": {name: {**{m: stats([r["methods"][name][m] for r in results]) for m in metrics},
                           "call": results[0]["methods"][name]["call"]} for name in names},
    }


def format_uncertainty_summary(summary: dict) -> str:
    """Markdown table (mean +- std over the runs) of `summarize_uncertainty_runs`."""
    first = next(iter(summary["methods"].values()))
    keys = ["auroc_shuffled", "auroc_noise", "auroc_mean"]
    keys += [k for k in first if k.startswith("auroc_") and k not in keys]
    header = " | ".join("AUROC " + k[len("auroc_"):] for k in keys)
    lines = [f"| method | {header} | cost (x forward) | call |", "|---|" + "---|" * (len(keys) + 2)]
    for name, m in summary["methods"].items():
        cells = [f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in keys]
        cells.append(f"{m['relative_cost']['mean']:.2f} ± {m['relative_cost']['std']:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | `{m['call']}` |")
    return "\n".join(lines)


def format_uncertainty_table(result: dict) -> str:
    """The per-method table of a `run_uncertainty_experiment` result."""
    header = ("method", "auroc_shuffled", "auroc_noise", "auroc_mean", "x_forward", "call")
    rows = [(name, f"{m['auroc_shuffled']:.3f}", f"{m['auroc_noise']:.3f}", f"{m['auroc_mean']:.3f}",
             f"{m['relative_cost']:.2f}", m["call"]) for name, m in result["methods"].items()]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    lines = [f"test accuracy {result['test_accuracy']:.4f}; x_forward: cost of the call relative to one plain forward "
             f"of the model over the same {result['settings']['cost_batch']} rows (median of {result['settings']['cost_rounds']} alternating rounds)",
             line(header), line(tuple("-" * w for w in widths)), *map(line, rows)]
    return "\n".join(lines)


def plot_uncertainty(methods: dict, path: str | os.PathLike) -> Path:
    """Bar chart: OOD AUROC (shuffled, noise) and relative cost (log scale) per method, PNG via Agg."""
    from .plots import pyplot, save_png

    plt = pyplot()

    path = Path(path)
    names = list(methods)
    positions = range(len(names))
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.38
    left.bar([p - width / 2 for p in positions], [methods[n]["auroc_shuffled"] for n in names], width, label="vs shuffled")
    left.bar([p + width / 2 for p in positions], [methods[n]["auroc_noise"] for n in names], width, label="vs noise")
    left.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    left.set_ylim(0, 1)
    left.set_ylabel("OOD AUROC")
    left.set_xticks(list(positions), names, rotation=25, ha="right")
    left.legend(loc="lower right")
    left.set_title("MNIST-1D MLP: out-of-distribution AUROC")
    right.bar(list(positions), [methods[n]["relative_cost"] for n in names], color="tab:green")
    right.set_yscale("log")
    right.set_ylabel("cost / one forward pass")
    right.set_xticks(list(positions), names, rotation=25, ha="right")
    right.set_title("cost of the estimator call")
    return save_png(figure, path, dpi=110)


EXPERIMENTS = {"uncertainty": run_uncertainty_experiment}


# ------------------------------------------------------------------------------ Experiment 1 report
#: the estimators of Experiment 1's table: (row label, OOD/cost key in the uncertainty summary, step
#: overhead variant, method of the estimator-driven selection study)
EXPERIMENT1_ROWS = (
    ("Laplace default (class-conditional density of the first Linear's input)", "laplace_epistemic", "laplace", "laplace"),
    ("Laplace K-FAC last layer, marginal-likelihood prior", "laplace_kfac", "laplace_kfac", "laplace_kfac"),
    ("plain entropy", "entropy", "entropy", "entropy"),
    ("MC dropout, 10 passes, BALD", "mc_dropout_bald", "mc_dropout", "mc_dropout"),
    ("distilled ensemble, 3 students", "ensemble_variance", "ensemble", "ensemble"),
)


def experiment1_report(results_dir: str | os.PathLike = "results/experiments", *, budget: float = 0.2) -> tuple[str, Path]:
    """Experiment 1's table (markdown) and figure (`<results_dir>/uncertainty/experiment1.png`) from the
    committed result files: `uncertainty/summary.json` (OOD AUROC and call cost, 3 seeds),
    `uncertainty/step_overhead.json` (`training_step_overhead`, one run per seed),
    `uncertainty/laplace_torch_peer.json` (scripts/laplace_torch_peer.py) and
    `uncertainty_selection/summary.json` (the selection study driven by each estimator's score)."""
    from .efficiency import _mean_std
    from .plots import pyplot, save_png

    root = Path(results_dir)
    ood = json.loads((root / "uncertainty" / "summary.json").read_text())["methods"]
    overhead_runs = json.loads((root / "uncertainty" / "step_overhead.json").read_text())["runs"]
    peer = json.loads((root / "uncertainty" / "laplace_torch_peer.json").read_text())["summary"]["methods"]
    selection = json.loads((root / "uncertainty_selection" / "summary.json").read_text())["rows"]
    key = str(float(budget))

    def cell(entry, digits=3):
        return f"{entry[0]:.{digits}f} ± {entry[1]:.{digits}f}"

    def accuracy(method):
        row = selection.get(method, {}).get(key) or selection.get(method, {}).get("1.0")
        return None if row is None else (row["test_accuracy"], row["test_accuracy_std"], row["flops"])

    flops_all = accuracy("all_data")[2]
    lines = [f"| estimator | OOD AUROC mean | call cost (x forward) | training-step overhead (%) "
             f"| test accuracy, its score selecting {budget:.0%} | FLOPs (x all data) |",
             "|---|---|---|---|---|---|"]
    rows = []
    for label, ood_key, overhead_key, selection_key in EXPERIMENT1_ROWS:
        auroc_entry = (ood[ood_key]["auroc_mean"]["mean"], ood[ood_key]["auroc_mean"]["std"])
        cost_entry = (ood[ood_key]["relative_cost"]["mean"], ood[ood_key]["relative_cost"]["std"])
        step = _mean_std([r["variants"][overhead_key]["overhead_percent"] for r in overhead_runs])
        acc = accuracy(selection_key)
        rows.append((label, auroc_entry, cost_entry, step, acc))
        lines.append(f"| {label} | {cell(auroc_entry)} | {cell(cost_entry, 2)} | {step[0]:+.1f} ± {step[1]:.1f} | "
                     f"{cell(acc[:2], 4)} | {acc[2] / flops_all:.2f} |")
    for name, metrics in peer.items():
        if name.endswith("_entropy"):
            label = "laplace-torch " + name.replace("laplace_torch_last_layer_", "last layer ").replace("_entropy", ", GLM predictive entropy")
            lines.append(f"| {label} | {cell((metrics['auroc_mean']['mean'], metrics['auroc_mean']['std']))} | "
                         f"{cell((metrics['relative_cost']['mean'], metrics['relative_cost']['std']), 1)} | "
                         f"fit after training: {metrics['fit_s']['mean']:.1f} s | not run | |")
    for control, label in (("all_data", "control: all data, every epoch (the target)"), ("all_data_short", f"control: all data for {budget:.0%} of the epochs"),
                           ("random", f"control: random {budget:.0%}"), ("el2n", f"the online default's score (EL2N), {budget:.0%}")):
        acc = accuracy(control)
        lines.append(f"| {label} | | | | {cell(acc[:2], 4)} | {acc[2] / flops_all:.2f} |")

    figure, axes = pyplot().subplots(1, 3, figsize=(15, 4.2))
    names = [r[0].split(" (")[0].split(",")[0] for r in rows]
    ypos = range(len(rows))
    axes[0].barh(ypos, [r[1][0] for r in rows], xerr=[r[1][1] for r in rows], color="tab:blue")
    for name, metrics in peer.items():
        if name.endswith("_entropy"):
            axes[0].axvline(metrics["auroc_mean"]["mean"], color="tab:red", linestyle="--", linewidth=1)
    axes[0].axvline(0.5, color="grey", linewidth=0.8)
    axes[0].set_yticks(list(ypos), names)
    axes[0].set_xlabel("OOD AUROC (shuffled, noise); red: laplace-torch")
    axes[0].set_xlim(0.4, 1.02)
    axes[1].barh(ypos, [r[2][0] for r in rows], color="tab:orange", label="call (x forward)")
    axes[1].set_xscale("log")
    axes[1].set_yticks(list(ypos), [])
    axes[1].set_xlabel("cost of a score call (x one forward, log)")
    axes[2].barh(ypos, [r[4][0] for r in rows], xerr=[r[4][1] for r in rows], color="tab:green")
    controls = (("all_data", "-", "all data"), ("all_data_short", "--", "all data, short"), ("random", ":", "random"),
                ("el2n", "-.", "EL2N (online default)"))
    for control, style, label in controls:
        axes[2].axvline(accuracy(control)[0], color="black", linestyle=style, linewidth=1, label=label)
    axes[2].set_yticks(list(ypos), [])
    axes[2].set_xlabel(f"test accuracy when the score selects {budget:.0%}")
    values = [r[4][0] - r[4][1] for r in rows] + [accuracy(c)[0] for c, _, _ in controls]
    axes[2].set_xlim(min(values) - 0.004, accuracy("all_data")[0] + 0.004)
    axes[2].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    figure.suptitle("Experiment 1 on MNIST-1D: out-of-distribution detection, cost, and data efficiency per estimator (3 seeds)")
    figure.tight_layout()
    path = save_png(figure, root / "uncertainty" / "experiment1.png")
    return "\n".join(lines), Path(path)


def main(argv: list[str] | None = None) -> int:
    """`python -m aql.experiments step-overhead | report`: the training-step overhead of each estimator
    (3 seeds, written to results/experiments/uncertainty/step_overhead.json) and Experiment 1's table
    and figure from the committed result files."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m aql.experiments", description=main.__doc__)
    parser.add_argument("what", choices=["step-overhead", "report"])
    parser.add_argument("--results-dir", default="results/experiments", help="where the result files are (and go)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="step-overhead: one run per seed")
    args = parser.parse_args(argv)
    root = Path(args.results_dir)
    if args.what == "step-overhead":
        torch.set_num_threads(1)
        runs = []
        for seed in args.seeds:
            print(f"seed {seed}:", flush=True)
            runs.append({"seed": seed, **training_step_overhead(seed=seed)})
        out = root / "uncertainty" / "step_overhead.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"command": "python -m aql.experiments step-overhead", "torch": torch.__version__,
                                   "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()}, "runs": runs}, indent=2))
        print(f"results: {out}")
        return 0
    table, figure = experiment1_report(root)
    print(table)
    print(f"\nfigure: {figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
