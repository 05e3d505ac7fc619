"""aql.experiments (Experiment 1 on a tiny setting, the rank AUROC) and `python -m aql experiment / bench`."""

from __future__ import annotations

import itertools
import math
import json
import sys

import pytest
import torch

from aql import cli
from aql.experiments import (auroc, format_uncertainty_summary, ood_inputs, run_uncertainty_experiment,
                             summarize_uncertainty_runs)

METHODS = ("laplace_epistemic", "laplace_mahalanobis_head", "laplace_mahalanobis_all", "laplace_kfac", "laplace_diagonal",
           "laplace_prior", "entropy", "mc_dropout_bald", "mc_dropout_entropy", "ensemble_variance")


def pairwise_auroc(negatives, positives) -> float:
    """Independent definition: P(positive > negative) + 0.5 P(equal), over all pairs, in float64."""
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for n, p in itertools.product(negatives.tolist(), positives.tolist()))
    return total / (len(negatives) * len(positives))


@pytest.mark.parametrize("negatives, positives, expected", [
    ([0.1, 0.2, 0.3], [0.4, 0.5], 1.0),
    ([0.4, 0.5], [0.1, 0.2, 0.3], 0.0),
    ([1.0, 1.0, 1.0], [1.0, 1.0], 0.5),  # all tied
    ([0.0, 1.0], [1.0, 2.0], 0.875),  # one tie: (1 + 0.5 + 1 + 1) / 4
    ([1.0, 2.0, 2.0, 3.0], [2.0], 0.5),  # 1 above, 2 ties, 1 below: (1 + 0.5 + 0.5) / 4
    ([-float("inf"), 0.0], [float("inf"), -0.0], 0.875),  # -0.0 ties 0.0; infinities rank at the ends
])
def test_auroc_hand_computed_cases_with_ties(negatives, positives, expected):
    assert auroc(torch.tensor(negatives), torch.tensor(positives)) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n_neg, n_pos, levels", [(1, 1, 2), (37, 53, 4), (200, 1, 1000), (300, 250, 7)])
def test_auroc_matches_pairwise_definition_on_random_ties(n_neg, n_pos, levels):
    # few distinct values: many ties across and within the two sets
    negatives = torch.randint(0, levels, (n_neg,)).float()
    positives = torch.randint(0, levels, (n_pos,)).float() + 0.5 * torch.randint(0, 2, (n_pos,)).float()
    assert auroc(negatives, positives) == pytest.approx(pairwise_auroc(negatives, positives), abs=1e-12)
    assert auroc(negatives, positives) + auroc(positives, negatives) == pytest.approx(1.0, abs=1e-12)


def test_auroc_rejects_bad_input():
    with pytest.raises(TypeError, match=r"aql.experiments.auroc: in_distribution must be a torch.Tensor, got list"):
        auroc([0.1], torch.tensor([0.2]))
    with pytest.raises(ValueError, match=r"out_of_distribution must be a non-empty 1-D tensor, got shape \(0,\)"):
        auroc(torch.tensor([0.1]), torch.empty(0))
    with pytest.raises(ValueError, match=r"non-empty 1-D tensor, got shape \(2, 2\)"):
        auroc(torch.zeros(2, 2), torch.zeros(3))
    with pytest.raises(ValueError, match="must not be NaN"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0.2]))


def test_ood_inputs_shuffle_each_row_and_match_noise_moments():
    x = torch.randn(500, 40) * 3 + 1
    out = ood_inputs(x, torch.Generator().manual_seed(0))
    assert out["shuffled"].shape == x.shape and out["noise"].shape == x.shape
    torch.testing.assert_close(out["shuffled"].sort(dim=1).values, x.sort(dim=1).values, rtol=0, atol=0)
    assert (out["shuffled"] != x).any(dim=1).float().mean() > 0.99  # permuted, not copied
    assert abs(out["noise"].mean() - x.mean()) < 0.1 and abs(out["noise"].std() / x.std() - 1) < 0.05


def test_uncertainty_experiment_tiny_run_writes_json_and_png(tmp_path, capsys):
    result = run_uncertainty_experiment(tmp_path / "out", samples=600, epochs=1, seed=3, cost_rounds=3,
                                        cache_dir=tmp_path / "cache")
    out = capsys.readouterr().out
    written = json.loads((tmp_path / "out" / "experiment_uncertainty.json").read_text())
    png = (tmp_path / "out" / "experiment_uncertainty.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert set(written["methods"]) == set(METHODS)
    methods = written["methods"]
    for name, method in methods.items():
        assert method["auroc_mean"] == pytest.approx((method["auroc_shuffled"] + method["auroc_noise"]) / 2, abs=1e-12), name
        assert name in out
    # each method scores its own way: not one set of scores reported five times
    assert len({round(m["auroc_shuffled"], 9) for m in methods.values()}) >= 4
    # cost relative to one forward pass: ten MC-dropout passes cost several times one Laplace pass (2x: the bound leaves room for timing noise on a loaded machine)
    # (measured ~30x against ~1.3x); a cost that is not time(method) / time(forward) breaks this
    assert methods["mc_dropout_bald"]["relative_cost"] > 2 * methods["laplace_epistemic"]["relative_cost"]
    assert methods["laplace_epistemic"]["relative_cost"] > 0.5
    # the default epistemic score reads the statistics of the training forward: it beats the prior alone
    # (the squared feature norm) even after one epoch (measured 1.00 against 0.50)
    assert methods["laplace_epistemic"]["auroc_mean"] > methods["laplace_prior"]["auroc_mean"] + 0.2
    assert written["settings"]["samples"] == 600 and written["settings"]["epochs"] == 1
    assert result["methods"] == written["methods"]
    assert "experiment_uncertainty.json" in out and "experiment_uncertainty.png" in out


def test_uncertainty_experiment_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match=r"aql.experiments.run_uncertainty_experiment: samples must be >= 100, got 5"):
        run_uncertainty_experiment(tmp_path, samples=5)
    with pytest.raises(TypeError, match=r"epochs must be an int, got float 1.5"):
        run_uncertainty_experiment(tmp_path, epochs=1.5)
    assert cli.main(["experiment", "uncertainty", "--epochs", "0", "--output-dir", str(tmp_path)]) == 2


def test_experiment_parser():
    args = cli.build_parser().parse_args(["experiment", "uncertainty", "--samples", "700", "--epochs", "2", "--seed", "5",
                                          "--output-dir", "d"])
    assert (args.command, args.name, args.samples, args.epochs, args.seed, args.output_dir) == ("experiment", "uncertainty", 700, 2, 5, "d")
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["experiment", "nope"])


def test_bench_parser_and_command():
    args = cli.build_parser().parse_args(["bench", "-k", "select and cpu", "--json", "out.json"])
    assert (args.command, args.expression, args.json_path) == ("bench", "select and cpu", "out.json")
    args = cli.build_parser().parse_args(["bench"])
    assert (args.expression, args.json_path) == (None, None)
    command = cli.bench_command("out.json", expression="fisher")
    assert command[:5] == [sys.executable, "-m", "pytest", "benchmarks", "--benchmark-only"]
    assert "--benchmark-json=out.json" in command and command[-2:] == ["-k", "fisher"]
    assert "-k" not in cli.bench_command("out.json")


def test_bench_without_benchmarks_folder_is_a_clear_error(tmp_path, monkeypatch, capsys):
    def no_subprocess(*args, **kwargs):
        raise AssertionError("the benchmark suites must not run")

    monkeypatch.setattr("subprocess.run", no_subprocess)
    with pytest.raises(cli.BenchError, match=r"no benchmarks folder .* source repository"):
        cli.run_bench(root=tmp_path)
    monkeypatch.setattr(cli, "REPOSITORY_ROOT", tmp_path)  # as for an installed package without the repository
    assert cli.main(["bench"]) == 2
    assert "no benchmarks folder" in capsys.readouterr().err


def test_bench_without_pytest_benchmark_is_a_clear_error(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pytest_benchmark" else real_find_spec(name, *a))
    monkeypatch.setattr("subprocess.run", lambda *a, **k: pytest.fail("the benchmark suites must not run"))
    with pytest.raises(cli.BenchError, match="pytest-benchmark is not installed"):
        cli.run_bench()


def test_summary_of_runs_is_the_mean_and_sample_std_per_method():
    def run(seed, values):
        return {"settings": {"seed": seed}, "test_accuracy": 0.5 + seed,
                "methods": {name: {"auroc_shuffled": v, "auroc_noise": v / 2, "auroc_mean": 3 * v / 4, "relative_cost": 1 + v,
                                   "call": f"{name}()"} for name, v in values.items()}}

    summary = summarize_uncertainty_runs([run(0, {"a": 0.6, "b": 0.9}), run(1, {"a": 0.8, "b": 0.7}), run(2, {"a": 1.0, "b": 0.8})])
    assert summary["seeds"] == [0, 1, 2]
    a = summary["methods"]["a"]
    assert a["auroc_shuffled"]["mean"] == pytest.approx(0.8, abs=1e-12)
    assert a["auroc_shuffled"]["std"] == pytest.approx(0.2, abs=1e-12)  # sample std of 0.6, 0.8, 1.0
    assert a["relative_cost"]["values"] == [1.6, 1.8, 2.0] and a["call"] == "a()"
    assert summary["methods"]["b"]["auroc_noise"]["mean"] == pytest.approx(0.4, abs=1e-12)
    table = format_uncertainty_summary(summary)
    assert "| a | 0.800 ± 0.200 | 0.400 ± 0.100 | 0.600 ± 0.150 | 1.80 ± 0.20 | `a()` |" in table
    with pytest.raises(ValueError, match=r"every run must report the methods \['a', 'b'\], got \['a'\]"):
        summarize_uncertainty_runs([run(0, {"a": 0.6, "b": 0.9}), run(1, {"a": 0.8})])
    with pytest.raises(ValueError, match="results must be a non-empty list"):
        summarize_uncertainty_runs([])


def test_training_step_overhead_times_every_variant_against_the_bare_step(one_thread):
    from aql.experiments import training_step_overhead

    result = training_step_overhead(batch_size=16, steps=2, rounds=2, quiet=True)
    assert set(result["variants"]) == {"bare", "mc_dropout", "entropy", "laplace", "laplace_kfac", "ensemble"}
    assert result["variants"]["bare"]["overhead_percent"] == 0.0
    for name, v in result["variants"].items():
        assert v["step_ms"] > 0 and math.isfinite(v["overhead_percent"]), name
    # the ensemble runs 2 x 3 student steps (each with a teacher forward) after every training step
    assert result["variants"]["ensemble"]["step_ms"] > result["variants"]["bare"]["step_ms"]
    with pytest.raises(ValueError, match="rounds"):
        training_step_overhead(rounds=0)


def test_experiment1_report_reads_every_result_file(tmp_path):
    """The report's table comes from the four result files: change one number, the table shows it."""
    from aql.experiments import EXPERIMENT1_ROWS, experiment1_report, main

    stat = lambda m, s=0.01: {"mean": m, "std": s, "values": [m]}  # noqa: E731
    ood = {key: {"auroc_mean": stat(0.5 + 0.05 * i), "relative_cost": stat(1.0 + i)} for i, (_, key, _, _) in enumerate(EXPERIMENT1_ROWS)}
    ood["laplace_epistemic"]["auroc_mean"] = stat(0.987)
    runs = [{"variants": {v: {"overhead_percent": 3.0 + seed} for _, _, v, _ in EXPERIMENT1_ROWS}} for seed in range(3)]
    peer = {"laplace_torch_last_layer_diag_entropy": {"auroc_mean": stat(0.512), "relative_cost": stat(90.0), "fit_s": stat(20.0)}}
    row = lambda acc, flops: {"0.2": {"test_accuracy": acc, "test_accuracy_std": 0.001, "flops": flops}}  # noqa: E731
    selection = {key: row(0.9 + 0.01 * i, 2.0) for i, (_, _, _, key) in enumerate(EXPERIMENT1_ROWS)}
    selection.update(all_data={"1.0": {"test_accuracy": 0.98, "test_accuracy_std": 0.002, "flops": 10.0}},
                     all_data_short=row(0.95, 2.0), random=row(0.96, 2.0), el2n=row(0.97, 3.0))
    (tmp_path / "uncertainty").mkdir()
    (tmp_path / "uncertainty_selection").mkdir()
    (tmp_path / "uncertainty" / "summary.json").write_text(json.dumps({"methods": ood}))
    (tmp_path / "uncertainty" / "step_overhead.json").write_text(json.dumps({"runs": runs}))
    (tmp_path / "uncertainty" / "laplace_torch_peer.json").write_text(json.dumps({"summary": {"methods": peer}}))
    (tmp_path / "uncertainty_selection" / "summary.json").write_text(json.dumps({"rows": selection}))
    table, figure = experiment1_report(tmp_path)
    assert figure.is_file() and figure.stat().st_size > 10_000
    lines = table.splitlines()
    assert len(lines) == 2 + len(EXPERIMENT1_ROWS) + 1 + 4
    default = lines[2]
    assert "0.987 ± 0.010" in default and "+4.0 ± 1.0" in default and "0.9000 ± 0.0010" in default and "| 0.20 |" in default
    assert any("laplace-torch" in line and "0.512" in line and "90.0" in line for line in lines)
    assert any("random 20%" in line and "0.9600" in line for line in lines)
    assert main(["report", "--results-dir", str(tmp_path)]) == 0
