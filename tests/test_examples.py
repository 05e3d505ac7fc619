"""Every example in examples/ runs end to end on tiny generated data (its `main(argv)` with small sizes),
trains (the loss falls), and trains on the budget's share of the data."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is as fast and does not stall on a shared machine
    yield
    torch.set_num_threads(threads)


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"aql_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_loop():
    result = _example("plain_loop").main(["--samples", "600", "--epochs", "5", "--budget", "0.2"])
    assert result["samples_trained"] == 5 * round(0.2 * 480)  # the budget of the 480 training samples, every epoch
    assert result["test_accuracy"] > 0.5  # 5 classes: chance is 0.2


def test_gpt2_causal_lm():
    pytest.importorskip("transformers")
    result = _example("gpt2_causal_lm").main(["--samples", "160", "--length", "16", "--epochs", "3", "--budget", "0.25",
                                               "--batch-size", "8"])
    assert result["sequences_trained"] == 3 * round(0.25 * 144)
    assert result["val_loss"] < result["val_loss_before"]
    assert math.isfinite(result["val_perplexity"])


def test_gpt2_causal_lm_on_a_local_text_and_tokenizer(tmp_path):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(40)]
    text = " ".join(words[(i * 7) % 40] for i in range(2000))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    model = tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]", *words])}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]").save_pretrained(tmp_path / "tokenizer")
    result = _example("gpt2_causal_lm").main(["--text", str(tmp_path / "corpus.txt"), "--tokenizer", str(tmp_path / "tokenizer"),
                                               "--length", "16", "--epochs", "2", "--batch-size", "8"])
    blocks = 2000 // 16
    assert result["sequences_trained"] == 2 * round(0.25 * int(0.9 * blocks))
    assert result["val_loss"] < result["val_loss_before"]


def test_huggingface_trainer():
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    result = _example("huggingface_trainer").main(["--samples", "96", "--length", "16", "--epochs", "2", "--batch-size", "8",
                                                    "--fisher"])
    assert result["data_selected"] == 0.25
    assert result["steps"] == 2 * math.ceil(24 / 8)  # the schedule is sized for the selected samples
    assert result["eval_loss"] < result["eval_loss_before"]
    assert math.isfinite(result["overhead_pct"])


def test_lightning_module():
    pytest.importorskip("lightning")
    result = _example("lightning_module").main(["--samples", "600", "--epochs", "4", "--fisher"])
    assert result["aql/data_selected"] == 0.25
    assert result["val_accuracy"] > 0.5
