"""The selection study: the quick mode runs end to end and writes finite metrics; the tuning picks by
validation accuracy only; the study resumes without rerunning finished runs; bad configs are refused."""

import json
import math
from pathlib import Path

import pytest
import yaml

from aql import efficiency
from aql.cli import main

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "experiments" / "mnist1d_efficiency.yaml"


def _tiny_config(tmp_path, **changes):
    raw = yaml.safe_load(CONFIG.read_text())
    raw.pop("quick")
    raw.update(num_samples=600, epochs=2, budgets=[0.2, 0.5], seeds=[0], tuning_seeds=[100], learning_rates=[1e-2, 3e-2],
               irreducible_epochs=1, cache_dir=str(tmp_path / "data"))
    keep = {"all_data", "all_data_short", "random", "online_balanced_loss", "online_reducible", "ranked_balanced_aged", "meta",
            "curriculum_only", "aql_curriculum"}
    raw["methods"] = [m for m in raw["methods"] if m["name"] in keep]
    raw.update(changes)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_the_config_quick_section_is_small():
    study = efficiency.load_study(CONFIG, quick=True)
    full = efficiency.load_study(CONFIG)
    assert study.num_samples < full.num_samples and len(study.seeds) == 1 and len(study.methods) < len(full.methods)
    assert set(full.budgets) == {0.1, 0.2, 0.3, 0.5} and full.seeds == [0, 1, 2]


def test_study_runs_end_to_end_and_writes_finite_metrics(tmp_path, capsys):
    config = _tiny_config(tmp_path)
    out = tmp_path / "out"
    assert main(["experiment", "efficiency", "--config", str(config), "--output-dir", str(out)]) == 0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    study = efficiency.load_study(config)
    finals = [r for r in records if r["phase"] == "final"]
    assert len(finals) == 1 + (len(study.methods) - 1) * 2  # all_data once, the rest at both budgets
    for record in finals:
        assert math.isfinite(record["test_accuracy"]) and 0.0 <= record["test_accuracy"] <= 1.0
        assert math.isfinite(record["flops"]) and record["flops"] > 0
    assert not any("test_accuracy" in r for r in records if r["phase"] == "tune")  # test read only by final runs
    # budget matching: every selection method back-propagates budget * train * epochs samples
    # (methods with a holdout add the irreducible model's training, reported apart)
    train = 600 * 0.8 - round(0.1 * 600 * 0.8)
    for record in finals:
        if record["method"].startswith("all_data"):  # all the data, for max(1, round(budget * epochs)) epochs
            expected = train * (2 if record["method"] == "all_data" else max(1, round(record["budget"] * 2)))
        else:
            expected = record["budget"] * train * 2
        assert record["samples_backpropagated"] - record["irreducible_backpropagated"] == pytest.approx(expected, abs=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"]["seeds"] == 1 and set(summary["verdicts"]) == {m.name for m in study.methods} - {"all_data"}
    assert (out / "efficiency.png").stat().st_size > 10_000
    assert "Experiment 2" in (out / "report.md").read_text()
    # resumable: a second call runs nothing new
    before = (out / "runs.jsonl").read_text()
    assert main(["experiment", "efficiency", "--config", str(config), "--output-dir", str(out)]) == 0
    assert (out / "runs.jsonl").read_text() == before
    assert "samples to target" in capsys.readouterr().out


def test_learning_rate_is_chosen_on_validation_accuracy_only():
    records = [
        {"phase": "tune", "method": "m", "budget": 0.2, "seed": 100, "learning_rate": 0.01, "val_accuracy": 0.9},
        {"phase": "tune", "method": "m", "budget": 0.2, "seed": 100, "learning_rate": 0.03, "val_accuracy": 0.8},
        {"phase": "final", "method": "m", "budget": 0.2, "seed": 0, "learning_rate": 0.03, "val_accuracy": 0.99, "test_accuracy": 1.0},
    ]
    assert efficiency.chosen_learning_rate(records, "m", 0.2) == 0.01
    with pytest.raises(efficiency.StudyError, match="no tuning runs"):
        efficiency.chosen_learning_rate(records, "m", 0.5)


def test_samples_to_target_uses_the_smallest_budget_that_reaches_it():
    study = efficiency.StudyConfig(budgets=[0.1, 0.2], methods=[efficiency.Method("all_data", "none"), efficiency.Method("x", "online")])
    runs = []
    for seed, acc in ((0, 0.97), (1, 0.99)):
        runs.append({"phase": "final", "method": "all_data", "budget": 1.0, "seed": seed, "learning_rate": 0.1, "test_accuracy": acc,
                     "val_accuracy": acc, "samples_backpropagated": 1000, "scoring_forwards": 0, "flops": 1.0, "wall_s": 1.0,
                     "selection_s": 0.0})
    for budget, acc in ((0.1, 0.96), (0.2, 0.975)):
        runs.append({"phase": "final", "method": "x", "budget": budget, "seed": 0, "learning_rate": 0.1, "test_accuracy": acc,
                     "val_accuracy": acc, "samples_backpropagated": budget * 1000, "scoring_forwards": 0, "flops": 1.0, "wall_s": 1.0,
                     "selection_s": 0.0})
    summary = efficiency.summarise(study, runs)
    verdict = summary["verdicts"]["x"]
    assert verdict["reached_at_budget"] == 0.2  # 0.975 >= 0.98 - 0.0141 (mean - std of the target)
    assert verdict["reduction_vs_all_data"] == pytest.approx(5.0)


@pytest.mark.parametrize("change, message", [
    ({"budgets": [0.0]}, "budgets must lie in"),
    ({"methods": [{"name": "a", "strategy": "nope"}]}, "strategy must be one of"),
    ({"methods": [{"name": "a", "strategy": "random", "colour": 1}]}, "unknown keys"),
    ({"learning_rate": 0.1}, "unknown keys"),
    ({"seeds": []}, "seeds must be a non-empty list"),
])
def test_bad_study_configs_are_refused(tmp_path, change, message, capsys):
    config = _tiny_config(tmp_path, **change)
    with pytest.raises(efficiency.StudyError, match=message):
        efficiency.load_study(config)
    assert main(["experiment", "efficiency", "--config", str(config), "--output-dir", str(tmp_path / "o")]) == 2
    assert message.split()[0] in capsys.readouterr().err


def test_the_quick_mode_itself_runs_and_writes_finite_metrics(tmp_path):
    """`python -m aql experiment efficiency --quick` as a user runs it (about 1-2 minutes on 2 cores)."""
    out = tmp_path / "quick"
    assert main(["experiment", "efficiency", "--quick", "--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    study = efficiency.load_study(CONFIG, quick=True)
    assert set(summary["rows"]) == {m.name for m in study.methods}
    for rows in summary["rows"].values():
        for cell in rows.values():
            assert math.isfinite(cell["test_accuracy"]) and math.isfinite(cell["flops"]) and cell["samples_backpropagated"] > 0
    assert (out / "efficiency.png").is_file()
