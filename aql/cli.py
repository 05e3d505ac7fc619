"""`python -m aql [--version] [--debug] {train,info,demo,experiment,bench}`; `COMMAND --help` says what
each does and what each option means.

Errors a user fixes from the message (`aql.errors.AQLError`: config, data, tokenizer, device, a missing
extra; checkpoint, non-finite training, a missing file, a device out of memory) are printed as one line,
`aql: error: <message>`, with exit code 2; `--debug` (before or after the command) or AQL_DEBUG=1 raise
them with their traceback instead. Anything else is a bug and keeps its traceback. Warnings are one
line each (`aql: warning: ...`).

- `train --config FILE [--set section.key=value ...] [--resume | --overwrite] [--output-dir DIR]`: one training
  run; a folder that already holds a run needs --resume (continue it) or --overwrite (start over). Text
  runs print the tokenizer chosen and set model.vocab_size to its vocabulary; a wandb project without
  wandb installed warns and logs to metrics.jsonl only; the run folder receives the resolved config.yaml.
- `info`: backends (what aql_kernels runs on here and why not), versions, devices.
- `demo [--output-dir DIR]`: MNIST-1D, four runs with the same seed, model and schedule shape: all data
  every epoch (baseline), AQL (stale scores, budget 0.2), a random 20% each epoch (the control with
  AQL's sample count and epochs) and all data for budget x epochs (the same sample count, its own full
  schedule); prints test accuracy, samples back-propagated, AQL overhead and time per step, and writes a
  plot of test accuracy against samples back-propagated. Needs no network.
- `experiment uncertainty [--samples N] [--epochs E] [--output-dir D] [--seed S]`: the design
  document's Experiment 1 on MNIST-1D (see aql.experiments): OOD AUROC and cost relative to a forward
  pass of the Laplace, MC-dropout and ensemble estimators; a table, a JSON and a bar chart.
- `experiment efficiency [--config YAML] [--quick] [--output-dir D]`: the selection study (see
  aql.efficiency): every strategy and control at every budget, learning rate tuned on the validation
  split, 3 seeds; runs.jsonl (resumable), summary.json, report.md and a plot of test accuracy against
  samples back-propagated.
- `bench [-k EXPR] [--json PATH]`: the pytest-benchmark suites of the repository's `benchmarks/`
  folder in a subprocess, then `benchmarks/summarize.py`'s table of the JSON they wrote.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

from .errors import AQLError

__all__ = ["main", "build_parser", "backends_table", "info_text", "run_training", "run_demo", "run_bench", "bench_command",
           "BenchError", "one_line_error"]

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "mnist1d_demo.yaml"
REPOSITORY_ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """`python -m aql bench` cannot run here (no pytest-benchmark, no benchmarks folder)."""


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def backends_table() -> str:
    from aql_kernels import backends

    rows = [(name, "yes" if b.available else "no", b.detail) for name, b in backends().items()]
    return _table(rows, ("backend", "available", "detail"))


def _version(distribution: str) -> str:
    """Installed version from the package metadata (importing transformers / datasets would take seconds)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info_text() -> str:
    import torch

    import aql

    versions = [("python", platform.python_version()), ("aql", aql.__version__), ("torch", torch.__version__)]
    versions += [(m, _version(m)) for m in ("triton", "numpy", "transformers", "datasets", "mnist1d", "wandb")]
    devices = [("cpu", f"{os.cpu_count()} cores, torch threads {torch.get_num_threads()}, {platform.machine()}")]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            devices.append((f"cuda:{i}", f"{props.name}, {props.total_memory / 2**30:.0f} GiB"))
    else:
        devices.append(("cuda", "none (torch.cuda.is_available() is False)"))
    return "\n\n".join([backends_table(), _table(versions, ("package", "version")), _table(devices, ("device", "detail"))])


def _text_tokenizer(config, *, quiet: bool):
    """The tokenizer of a text run, and the config with model.vocab_size set to its vocabulary (the
    logits' width is the vocabulary: fewer outputs cannot train, more waste memory); both printed."""
    import dataclasses

    from .data import load_tokenizer

    tokenizer = load_tokenizer(config.data.tokenizer)
    before = config.model.vocab_size
    if config.model.type == "gpt2" and before != tokenizer.vocab_size:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=tokenizer.vocab_size))
    if not quiet:
        change = f"{before} -> {tokenizer.vocab_size} (the tokenizer's)" if before != config.model.vocab_size else str(before)
        print(f"aql: tokenizer {tokenizer.name}: {tokenizer.description}, vocabulary {tokenizer.vocab_size}; "
              f"model.vocab_size {change}", flush=True)
    return tokenizer, config


def _without_missing_wandb(config):
    """`config` with logging.wandb_project null, and a warning on stderr, when wandb is not installed:
    the run logs to metrics.jsonl only instead of stopping."""
    import dataclasses
    import importlib.util

    if not config.logging.wandb_project or importlib.util.find_spec("wandb") is not None:
        return config
    print(f"aql: warning: logging.wandb_project is {config.logging.wandb_project!r} but wandb is not installed; logging to "
          "metrics.jsonl only (pip install 'aql[wandb]' to log to wandb, --set logging.wandb_project=null to silence this)",
          file=sys.stderr, flush=True)
    return dataclasses.replace(config, logging=dataclasses.replace(config.logging, wandb_project=None))


def run_training(config, *, output_dir=None, resume: bool = False, overwrite: bool = False, quiet: bool = False) -> dict:
    """Builds data and model from `config`, trains, returns the trainer's fit() result. `resume` /
    `overwrite`: what to do with a run already in the output folder (see `AQLv2Trainer.fit`).

    Text runs print the tokenizer chosen and set model.vocab_size to its vocabulary; a wandb project
    without wandb installed warns and logs to metrics.jsonl only. What cannot be loaded (data set,
    tokenizer, device, checkpoint) raises an `aql.errors.AQLError` / `CheckpointError` with a one-line
    message, which `main` prints without a traceback. The run folder receives the resolved config
    (config.yaml, with these changes) beside metrics.jsonl.
    """
    from .data import build_datasets
    from .models import build_model
    from .trainer import AQLv2Trainer, resolve_device, seed_everything

    resolve_device(config.device)  # a device that is not here fails before the data is read
    if config.training.cpu_threads:
        import torch

        torch.set_num_threads(config.training.cpu_threads)
    config = _without_missing_wandb(config)
    tokenizer = None
    if config.data.name != "mnist1d":
        tokenizer, config = _text_tokenizer(config, quiet=quiet)
    progress = config.logging.progress_bar and not quiet
    train, val, test = build_datasets(config.data, tokenizer=tokenizer, progress=progress)
    seed_everything(config.seed)
    model = build_model(config.model)
    trainer = AQLv2Trainer(model, config, train_data=train, val_data=val, test_data=test, output_dir=output_dir)
    if not quiet:
        print(f"aql: {config.aql_v2.selection_strategy} on {train!r}, {trainer.total_steps} optimizer steps planned, "
              f"device {trainer.device}, output {trainer.output_dir}", flush=True)
    return trainer.fit(resume=resume, overwrite=overwrite)


def _print_result(result: dict) -> None:
    keys = ("strategy", "epochs", "steps", "samples_backpropagated", "tokens_backpropagated", "train_loss", "val_loss",
            "test_loss", "test_accuracy", "test_perplexity", "data_selected", "overhead_time", "overhead_pct", "train_time")
    rows = []
    for key in keys:
        if key in result:
            value = result[key]
            rows.append((key, f"{value:.4f}" if isinstance(value, float) else str(value)))
    print(_table(rows, ("metric", "value")))


def run_demo(output_dir: str | os.PathLike = "runs/demo", *, overrides=(), config_path=DEMO_CONFIG) -> dict:
    """The MNIST-1D demo: baseline, AQL (the config's strategy, budget 0.2), a random budget share each
    epoch and all data for budget x epochs, same seed; writes a plot of test accuracy vs samples
    back-propagated."""
    from .config import load_config

    output_dir = Path(output_dir)
    print(backends_table(), end="\n\n", flush=True)
    runs = {}
    base_config = load_config(config_path, overrides)
    budget = base_config.aql_v2.query_budget
    short_epochs = max(1, round(base_config.training.epochs * budget))
    # Learning rates: what the selection study picked on the validation split for each run at budget 0.2
    # (results/experiments/efficiency/summary.json): 3e-2 for all data and both controls; the AQL run
    # takes the config's own (5e-2). An override of training.learning_rate applies to every run.
    controls_lr = [] if any(o.split("=", 1)[0].strip() == "training.learning_rate" for o in overrides) else ["training.learning_rate=0.03"]
    plan = [
        ("baseline", ["aql_v2.selection_strategy=none", "aql_v2.strategy_options={}", *controls_lr], "all data every epoch"),
        ("aql", [], f"{base_config.aql_v2.selection_strategy} selection, {budget:.0%} of the data per epoch"),
        # The control of selection: the same sample count and epochs, the subset drawn at random.
        ("random", ["aql_v2.selection_strategy=random", "aql_v2.strategy_options={}", *controls_lr],
         f"a random {budget:.0%} of the data each epoch"),
        # The fair control of data efficiency: all data, as many samples as the AQL run, its own full schedule.
        ("baseline_short", ["aql_v2.selection_strategy=none", "aql_v2.strategy_options={}", f"training.epochs={short_epochs}",
                            *controls_lr], f"all data for {short_epochs} epochs (the AQL run's sample count)"),
    ]
    for name, extra, what in plan:
        config = load_config(config_path, [*overrides, *extra])
        run_dir = output_dir / name
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        (run_dir / "checkpoint.pt").unlink(missing_ok=True)
        start = time.perf_counter()
        print(f"== {name}: {what}; selection_strategy={config.aql_v2.selection_strategy}, {config.training.epochs} epochs, "
              f"seed {config.seed}", flush=True)
        result = run_training(config, output_dir=run_dir, quiet=True, overwrite=True)
        result["wall_time"] = time.perf_counter() - start
        result["step_time_us"] = 1e6 * (result["train_time"] - result["overhead_time"]) / max(1, result["steps"])
        runs[name] = result
        print(f"   test accuracy {result['test_accuracy']:.4f}, samples back-propagated {result['samples_backpropagated']}, "
              f"AQL overhead {result['overhead_pct']:.2f}% (machinery alone), {result['wall_time']:.1f} s", flush=True)
    base, aql_run, random_run, short = runs["baseline"], runs["aql"], runs["random"], runs["baseline_short"]
    rows = [(name, f"{r['test_accuracy']:.4f}", str(r["samples_backpropagated"]), f"{r['overhead_pct']:.2f}%",
             f"{1e6 * r['overhead_time'] / max(1, r['steps']):.1f}", f"{r['step_time_us']:.0f}", f"{r['wall_time']:.1f}")
            for name, r in runs.items()]
    print()
    print(_table(rows, ("run", "test_accuracy", "samples_backpropagated", "aql_overhead", "aql_us_per_step",
                        "training_us_per_step", "wall_s")))
    ratio = base["samples_backpropagated"] / max(1, aql_run["samples_backpropagated"])
    print(f"\nAQL back-propagated {ratio:.1f}x fewer samples than the baseline: test accuracy {aql_run['test_accuracy']:.4f} "
          f"vs {base['test_accuracy']:.4f}; with the same sample count, a random {budget:.0%} per epoch reaches "
          f"{random_run['test_accuracy']:.4f} and all data for {short_epochs} epochs {short['test_accuracy']:.4f}.")
    from .training.clock import step_overhead_percent

    whole = step_overhead_percent(aql_run["train_time"], aql_run["steps"], base["train_time"], base["steps"])
    print(f"AQL overhead ({aql_run['strategy']}): {aql_run['overhead_pct']:.2f}% for the machinery alone (against the rest of "
          f"the run's own training time); {whole:+.2f}% per optimizer step against the baseline's F.cross_entropy step "
          "(the machinery plus the fused loss's extra cost, and run-to-run noise).")
    print("aql_overhead: AQL time (the no-grad scoring forward of candidates where the strategy has one, score bookkeeping, "
          "Fisher updates, selection) against the rest of the training time "
          "of the same run.\ntraining_us_per_step: the rest, per optimizer step; AQL's fused loss is in it, so its "
          f"difference to the baseline's F.cross_entropy step ({aql_run['step_time_us'] / base['step_time_us'] - 1:+.1%} here) "
          "is the loss's cost plus run-to-run noise (other processes share the cores).")
    plot = _plot_demo(runs, output_dir / "demo_accuracy_vs_samples.png")
    print(f"plot: {plot}")
    summary = {name: {k: v for k, v in r.items() if k != "history"} for name, r in runs.items()}
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return runs


def _plot_demo(runs: dict, path: Path) -> Path:
    from .plots import pyplot, save_png

    plt = pyplot()

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, result in runs.items():
        points = [(m["total_samples_backpropagated"], m["test_accuracy"]) for m in result["history"] if "test_accuracy" in m]
        if points:
            xs, ys = zip(*points)
            label = f"{name} ({result['strategy']}): {result['test_accuracy']:.3f}"
            axes.plot(xs, ys, marker="o", markersize=3, label=label)
    axes.set_xlabel("samples back-propagated")
    axes.set_ylabel("test accuracy")
    axes.set_title("MNIST-1D: test accuracy vs samples back-propagated")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right")
    return save_png(figure, path, dpi=120)


def bench_command(json_path: str | os.PathLike, *, expression: str | None = None, python: str = sys.executable) -> list[str]:
    """The pytest command line that `run_bench` runs from the repository root."""
    command = [python, "-m", "pytest", "benchmarks", "--benchmark-only", "--benchmark-columns=median,iqr,rounds",
               f"--benchmark-json={os.fspath(json_path)}"]
    if expression:
        command += ["-k", expression]
    return command


def run_bench(expression: str | None = None, json_path: str | os.PathLike | None = None, *, root: str | os.PathLike | None = None) -> int:
    """Runs the benchmark suites under `root`/benchmarks (pytest-benchmark, a subprocess with cwd `root`;
    root defaults to the repository this module lies in), then prints benchmarks/summarize.py's table of
    the JSON. Returns pytest's exit code. Raises BenchError when pytest-benchmark is missing or there is
    no benchmarks folder (an installed package without the repository)."""
    import importlib.util
    import subprocess

    root = Path(root if root is not None else REPOSITORY_ROOT).resolve()
    benchmarks = root / "benchmarks"
    summarize_script = benchmarks / "summarize.py"
    if not benchmarks.is_dir() or not summarize_script.is_file():
        raise BenchError(f"aql bench: no benchmarks folder with summarize.py at {benchmarks}; the suites ship with the "
                         "source repository, not with the installed package: run it from a checkout of the repository")
    if importlib.util.find_spec("pytest_benchmark") is None:
        raise BenchError(f"aql bench: pytest-benchmark is not installed in {sys.executable}; "
                         "install it with `python -m pip install pytest-benchmark` (or the dev extra)")
    if json_path is None:
        json_path = root / "runs" / "bench" / f"bench_{time.strftime('%Y%m%d_%H%M%S', time.gmtime())}.json"
    json_path = Path(json_path).resolve()
    json_path.parent.mkdir(parents=True, exist_ok=True)
    command = bench_command(json_path, expression=expression)
    print("$ " + " ".join(command), flush=True)
    code = subprocess.run(command, cwd=root).returncode
    if not json_path.is_file():
        print(f"aql bench: pytest exited with code {code} and wrote no JSON at {json_path}", file=sys.stderr)
        return code or 1
    spec = importlib.util.spec_from_file_location("_aql_bench_summarize", summarize_script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    print()
    print(module.summarize(str(json_path)))
    print(f"\njson: {json_path}")
    return code


def _debug_flag(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback of an error instead of its one-line message (or set AQL_DEBUG=1)")


TRAIN_DESCRIPTION = """\
Train one run under a YAML config (configs/aql_v2_config.yaml is the design document's GPT-2
template, configs/mnist1d_demo.yaml a CPU-sized one). Text runs print the tokenizer chosen and size
the model's vocabulary to it. data.name takes any Hugging Face data set name (streamed; read from the
local cache when HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1) or a local path: a text file, a folder of
.txt files or a dataset saved with save_to_disk, e.g. --set data.name=path/to/file.txt. The run folder
receives config.yaml (the resolved config), metrics.jsonl and checkpoints; a folder that already holds
a run needs --resume or --overwrite. Errors are one line (`aql: error: ...`, exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="python -m aql", description="Adaptive query-based learning: train with data "
                                     "selection, inspect the kernels' backends, run the demo, the experiments and the benchmarks.")
    parser.add_argument("--version", action="version", version=f"aql {__version__}", help="print aql's version and exit")
    _debug_flag(parser, False)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", help="what to do; `COMMAND --help` says more")

    def command(name: str, summary: str, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=description or summary)
        _debug_flag(sub, argparse.SUPPRESS)  # also after the command; the top-level value stands otherwise
        return sub

    train = command("train", "train under a YAML config", TRAIN_DESCRIPTION)
    train.add_argument("--config", required=True, help="YAML config (e.g. configs/aql_v2_config.yaml)")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override one config value (YAML scalar), repeatable: --set training.batch_size=64")
    train.add_argument("--output-dir", default=None, help="where config.yaml, metrics.jsonl and checkpoint.pt go "
                                                          "(default logging.output_dir)")
    once = train.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help="continue the run in the output folder from its newest checkpoint "
                                                            "that verifies (a fresh start when there is none)")
    once.add_argument("--overwrite", action="store_true", help="delete the run already in the output folder (checkpoints, "
                                                               "metrics.jsonl) and start over")
    command("info", "backends, versions, devices",
            "Print which backends aql_kernels runs on here (and why not the others), the versions of aql, torch and "
            "the optional packages, and the devices.")
    demo = command("demo", "MNIST-1D: all data, AQL (budget 0.2), a random 20%% per epoch and all data for the same "
                           "sample count, with a plot",
                   "The MNIST-1D demo (no network): four runs with the same seed and model: all data every epoch, AQL "
                   "(budget 0.2), a random 20% each epoch and all data for as many samples as AQL; prints test accuracy, "
                   "samples back-propagated and AQL overhead, and writes a plot of accuracy against samples.")
    demo.add_argument("--output-dir", default="runs/demo", help="where the four runs, the summary JSON and the plot go "
                                                                "(default runs/demo)")
    demo.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                      help="override a value of configs/mnist1d_demo.yaml for every run")
    experiment = command("experiment", "the design document's experiments (uncertainty: OOD AUROC and cost of the "
                                       "estimators on MNIST-1D; efficiency: the selection study)")
    experiment.add_argument("name", choices=["uncertainty", "efficiency"], help="which experiment")
    experiment.add_argument("--config", default="configs/experiments/mnist1d_efficiency.yaml",
                            help="efficiency: the study's YAML (methods, budgets, seeds, learning-rate grid)")
    experiment.add_argument("--quick", action="store_true", help="efficiency: the config's quick: section (a few minutes)")
    experiment.add_argument("--samples", type=int, default=10000, help="MNIST-1D samples, 80%% train / 20%% test (default 10000)")
    experiment.add_argument("--epochs", type=int, default=20, help="training epochs (default 20)")
    experiment.add_argument("--output-dir", default=None, help="where the JSON and the PNG go (default runs/experiment_uncertainty; "
                                                                "efficiency: results/experiments/efficiency, runs/experiment_efficiency_quick with --quick)")
    experiment.add_argument("--seed", type=int, default=0, help="seed of the model, training and OOD draws (default 0)")
    bench = command("bench", "run the pytest-benchmark suites of benchmarks/ and summarise them",
                    "Run the pytest-benchmark suites of the repository's benchmarks/ folder in a subprocess, then print "
                    "benchmarks/summarize.py's table of the JSON they wrote.")
    bench.add_argument("-k", dest="expression", default=None, metavar="EXPR", help="pytest -k expression selecting benchmarks")
    bench.add_argument("--json", dest="json_path", default=None, metavar="PATH",
                       help="where pytest-benchmark writes its JSON (default runs/bench/bench_<UTC time>.json in the repository)")
    return parser


def one_line_error(error: BaseException) -> str | None:
    """The one-line message `main` prints for an error a user fixes from the message (aql.errors.AQLError,
    config, checkpoint, non-finite training, bench, study, a missing file, a device out of memory), or
    None for anything else (a bug: its traceback is wanted)."""
    user_errors: list[type] = [AQLError, FileNotFoundError, BenchError]
    # only modules already imported can have raised their errors; importing the others here would cost seconds
    for module, name in (("aql.training.checkpoint", "CheckpointError"), ("aql.training.trainer", "NonFiniteError"),
                         ("aql.efficiency", "StudyError")):
        if module in sys.modules:
            user_errors.append(getattr(sys.modules[module], name))
    if isinstance(error, tuple(user_errors)):
        message = str(error)
    elif type(error).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError (torch.cuda.OutOfMemoryError)
        first = (str(error).strip().splitlines() or ["out of memory"])[0]
        message = (f"the device ran out of memory ({first}); lower training.batch_size, or training.eval_batch_size / "
                   "training.eval_memory_mb when it happens in evaluation")
    elif isinstance(error, (TypeError, ValueError)) and str(error).startswith("aql.experiments."):
        message = str(error)
    else:
        return None
    return " ".join(message.split()) or type(error).__name__


def _debug_requested(args) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get("AQL_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")


def _run(args) -> int:
    from .config import load_config

    if args.command == "info":
        print(info_text())
    elif args.command == "train":
        config = load_config(args.config, args.overrides)
        result = run_training(config, output_dir=args.output_dir, resume=args.resume, overwrite=args.overwrite)
        _print_result(result)
    elif args.command == "demo":
        run_demo(args.output_dir, overrides=args.overrides)
    elif args.command == "experiment" and args.name == "efficiency":
        from .efficiency import run_efficiency_experiment

        default = "runs/experiment_efficiency_quick" if args.quick else "results/experiments/efficiency"
        run_efficiency_experiment(args.config, args.output_dir or default, quick=args.quick)
    elif args.command == "experiment":
        from .experiments import EXPERIMENTS

        EXPERIMENTS[args.name](args.output_dir or "runs/experiment_uncertainty", samples=args.samples, epochs=args.epochs,
                               seed=args.seed)
    elif args.command == "bench":
        return run_bench(args.expression, args.json_path)
    return 0


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as `aql: warning: <message>` lines (their source line is for --debug)."""
    print(f"aql: warning: {' '.join(str(message).split())}", file=sys.stderr if file is None else file, flush=True)


def main(argv=None) -> int:
    """`python -m aql ...`; returns the exit code: 0, 2 for an error reported as one line
    (`aql: error: <message>` on stderr; `--debug` or AQL_DEBUG=1 raise it with its traceback instead),
    130 when interrupted."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            if not _debug_requested(args):
                warnings.showwarning = _show_warning
            return _run(args)
    except KeyboardInterrupt as error:
        print(f"\n{error or 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as error:
        message = one_line_error(error)
        if message is None or _debug_requested(args):
            raise
        print(f"aql: error: {message}", file=sys.stderr)
        return 2
