"""`python -m aql`: info, a tiny train through --set, config errors as exit code 2, a tiny demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from aql.cli import backends_table, info_text, main
from aql.training.checkpoint import read_checkpoint

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "mnist1d_demo.yaml")


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the demo config sets training.cpu_threads


def tiny(tmp_path, *extra):
    return ["--set", "data.num_samples=300", "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "training.epochs=2",
            "--set", "model.channels=[8, 8]", "--set", "training.batch_size=32", *extra]


def test_info_lists_backends_versions_and_devices(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for name in ("triton", "cpu_library", "cuda_library", "cuda_device", "torch", "python", "mnist1d", "cpu"):
        assert name in out, name
    assert torch.__version__ in out
    assert backends_table().splitlines()[0].split() == ["backend", "available", "detail"]
    assert info_text().startswith(backends_table())


def test_module_entry_point_runs():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "aql", "info"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "backend" in done.stdout and "cuda_device" in done.stdout


def test_tiny_train_through_set(tmp_path, capsys):
    out_dir = tmp_path / "run"
    code = main(["train", "--config", DEMO, *tiny(tmp_path, "--set", "aql_v2.selection_strategy=stale", "--set", "aql_v2.strategy_options={}",
                                                    "--set", f"logging.output_dir={out_dir}")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "test_accuracy" in printed and "overhead_pct" in printed
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    final = records[-1]
    assert final["event"] == "fit" and final["strategy"] == "stale" and final["epochs"] == 2
    assert final["samples_backpropagated"] == 2 * round(0.2 * 216)  # 300 -> 240 train -> 216 after val
    state = read_checkpoint(out_dir / "checkpoint.pt")
    assert state["epoch"] == 2 and state["config"]["training"]["batch_size"] == 32
    # --resume on a finished run trains nothing more
    assert main(["train", "--config", DEMO, *tiny(tmp_path, "--set", "aql_v2.selection_strategy=stale", "--set", "aql_v2.strategy_options={}",
                                                    "--set", f"logging.output_dir={out_dir}"), "--resume"]) == 0
    assert read_checkpoint(out_dir / "checkpoint.pt")["step"] == state["step"]


@pytest.mark.parametrize("override, message", [
    ("training.batch_size=many", "training.batch_size: expected an integer, got 'many'"),
    ("aql_v2.query_budget=0", "aql_v2.query_budget: 0.0 is outside (0.0, 1.0]"),
    ("aql_v2.selection_strategy=greedy", "aql_v2.selection_strategy: 'greedy' is not allowed"),
])
def test_config_errors_exit_2_with_the_message(override, message, capsys):
    assert main(["train", "--config", DEMO, "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_missing_config_file(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "no config file" in capsys.readouterr().err


def test_tiny_demo_writes_the_plot(tmp_path, capsys):
    code = main(["demo", "--output-dir", str(tmp_path / "demo"), *tiny(tmp_path, "--set", "training.epochs=5")])
    assert code == 0
    out = capsys.readouterr().out
    assert out.index("backend") < out.index("== baseline")  # the backends table comes first
    for name in ("baseline", "aql", "random", "baseline_short"):
        assert f"== {name}" in out
    assert "aql_us_per_step" in out and "training_us_per_step" in out
    plot = tmp_path / "demo" / "demo_accuracy_vs_samples.png"
    assert f"plot: {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    # 300 samples -> 240 train -> 216 after val; AQL takes round(0.2 * 216) = 43 per epoch
    assert summary["baseline"]["samples_backpropagated"] == 5 * 216
    assert summary["aql"]["samples_backpropagated"] == 5 * 43
    assert summary["random"]["samples_backpropagated"] == 5 * 43 and summary["random"]["strategy"] == "random"
    assert summary["random"]["overhead_pct"] == 0.0
    assert summary["baseline_short"]["samples_backpropagated"] == 1 * 216  # round(5 * 0.2) epochs of all data
    assert summary["baseline"]["overhead_pct"] == 0.0 and summary["aql"]["overhead_pct"] > 0.0


def test_train_refuses_a_folder_with_a_run_and_reports_a_damaged_checkpoint_in_one_line(tmp_path, capsys):
    out_dir = tmp_path / "run"
    args = ["train", "--config", DEMO, *tiny(tmp_path, "--set", "aql_v2.selection_strategy=stale", "--set", "aql_v2.strategy_options={}",
                                             "--set", f"logging.output_dir={out_dir}", "--set", "training.epochs=1")]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2  # neither --resume nor --overwrite
    err = capsys.readouterr().err
    assert err.startswith("aql: error: output folder") and "already holds a run" in err and err.count("\n") == 1
    assert main([*args, "--overwrite"]) == 0
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in records].count("fit") == 1
    capsys.readouterr()
    checkpoint = out_dir / "checkpoint.pt"
    data = bytearray(checkpoint.read_bytes())
    data[-2000:-1996] = bytes(b ^ 0xFF for b in data[-2000:-1996])  # 4 flipped bytes in the weights
    checkpoint.write_bytes(bytes(data))
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert err == f"aql: error: output folder {out_dir}: no usable checkpoint: checkpoint {checkpoint}: checksum mismatch " \
                  f"{err.split('checksum mismatch ', 1)[1]}" and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit):  # argparse: not allowed together
        main([*args, "--resume", "--overwrite"])


@pytest.mark.parametrize("override, message", [
    ("seed=-1", "aql: error: seed: -1 is outside [0, 4294967295]"),
    ("model.num_classes=5", "aql: error: model.num_classes: 5 is too small for the training labels"),
    pytest.param("device=cuda", "aql: error: device: 'cuda' requested but torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
])
def test_run_time_config_errors_are_one_line(override, message, tmp_path, capsys):
    code = main(["train", "--config", DEMO, *tiny(tmp_path, "--set", f"logging.output_dir={tmp_path / 'run'}", "--set", override)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
