"""A new user's first hour, offline: the design document's template reports an unreachable data set in
one line and says how to use local text; wandb absent warns; data, tokenizer, device and checkpoint
errors are one line (exit code 2, the traceback with --debug / AQL_DEBUG=1); the chosen tokenizer is
printed and sizes the model; any locally cached or saved tokenizer works; the evaluation batch fits a
memory budget; --version and every --help; AQLv2Trainer reads a Hugging Face model's `.logits`; the
run folder holds config.yaml.

Nothing downloads: the hub is switched off, tokenizers are trained here from generated text and saved
to temporary folders (or a temporary Hugging Face cache), models are built from configs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from aql.cli import build_parser, main, one_line_error
from aql.config import config_from_dict, load_config
from aql.errors import AQLError, DataError, MissingExtraError, TokenizerError, require
from aql.training.outputs import eval_batch_size, model_logits

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = str(ROOT / "configs" / "aql_v2_config.yaml")
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
TINY_GPT2 = ["--set", "model.n_layers=1", "--set", "model.d_model=16", "--set", "model.n_heads=2", "--set", "data.seq_len=12",
             "--set", "training.max_steps=3", "--set", "training.batch_size=4", "--set", "training.gradient_accumulation=1",
             "--set", "training.warmup_steps=1", "--set", "logging.log_every=1", "--set", "logging.progress_bar=false",
             "--set", "aql_v2.enable_caching=false", "--set", "aql_v2.parallelize_uncertainty=false", "--set", "device=cpu",
             "--set", "data.max_eval_tokens=400"]


@pytest.fixture(autouse=True)
def _offline_one_thread(monkeypatch):
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(key, "1")
    monkeypatch.delenv("AQL_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _texts(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(3, 25))) for _ in range(count)]


def _corpus(path: Path, count: int = 120) -> Path:
    path.write_text("\n".join(_texts(count)) + "\n", encoding="utf-8")
    return path


def _train_tokenizer(vocab_size: int = 300):
    """A byte-level BPE trained here on generated text (`tokenizers`), wrapped for transformers."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(_texts(300, seed=1), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return backend, transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    backend, wrapped = _train_tokenizer()
    wrapped.save_pretrained(str(folder))
    return folder, backend


# ----------------------------------------------------------------------------------- the template offline
def test_the_template_offline_says_in_one_line_that_the_data_set_is_unreachable(capsys, monkeypatch, tmp_path):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    code = main(["train", "--config", TEMPLATE, "--output-dir", str(tmp_path / "run")])
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    lines = captured.err.splitlines()
    assert lines[-1].startswith("aql: error: data.name: could not reach the data set 'wikitext' (subset 'wikitext-103-raw-v1') "
                                "on the Hugging Face hub")
    assert "--set data.name=path/to/file.txt" in lines[-1]
    assert all(line.startswith("aql: warning: ") for line in lines[:-1])  # warnings are one line each too
    assert any("wandb is not installed; logging to metrics.jsonl only" in line and "pip install 'aql[wandb]'" in line
               for line in lines[:-1])
    # the tokenizer is printed before the data is read; the model's outputs follow it
    assert "aql: tokenizer " in captured.out and "vocabulary" in captured.out


def test_debug_and_aql_debug_show_the_traceback(monkeypatch, tmp_path, capsys):
    args = ["train", "--config", TEMPLATE, "--set", "logging.wandb_project=null", "--output-dir", str(tmp_path / "run")]
    with pytest.raises(DataError, match="could not reach"):
        main(["--debug", *args])
    with pytest.raises(DataError, match="could not reach"):
        main([*args, "--debug"])  # also after the command
    monkeypatch.setenv("AQL_DEBUG", "1")
    with pytest.raises(DataError, match="could not reach"):
        main(args)


def test_the_template_offline_in_a_subprocess_exits_2_without_a_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env.pop("AQL_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "aql", "train", "--config", TEMPLATE, "--output-dir", str(tmp_path / "run")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and done.stderr.splitlines()[-1].startswith("aql: error: data.name: could not reach")


# ------------------------------------------------------------------------------------ one-line errors
@pytest.mark.parametrize("override, message", [
    ("data.name=no/such/file.txt", "aql: error: data.name: no file or folder at "),
    ("data.tokenizer=someone/never-cached", "aql: error: data.tokenizer: 'someone/never-cached' is not in the local Hugging Face cache"),
    pytest.param("device=cuda", "aql: error: device: 'cuda' requested but torch.cuda.is_available() is False",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")),
    ("model.n_positions=8", "aql: error: data.seq_len: 12 exceeds model.n_positions (8)"),
])
def test_data_tokenizer_device_and_config_errors_are_one_line(override, message, tmp_path, capsys):
    corpus = _corpus(tmp_path / "corpus.txt")
    code = main(["train", "--config", TEMPLATE, *TINY_GPT2, "--set", f"data.name={corpus}", "--set", "data.tokenizer=byte",
                 "--set", "logging.wandb_project=null", "--set", override, "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err


def test_one_line_error_classifies_errors():
    assert one_line_error(DataError("data.name: x\n  y")) == "data.name: x y"
    assert one_line_error(FileNotFoundError("no config file at c.yaml")) == "no config file at c.yaml"
    assert one_line_error(TokenizerError("data.tokenizer: 'x' is not cached")) == "data.tokenizer: 'x' is not cached"
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.80 GiB\nmore detail")
    message = one_line_error(oom)
    assert message.startswith("the device ran out of memory (CUDA out of memory. Tried to allocate 8.80 GiB)")
    assert "training.batch_size" in message and "training.eval_memory_mb" in message
    assert one_line_error(RuntimeError("a bug")) is None  # anything else keeps its traceback
    assert one_line_error(KeyError("x")) is None


def test_a_bug_is_not_swallowed(monkeypatch, tmp_path):
    import aql.cli

    def broken(*args, **kwargs):
        raise RuntimeError("a bug in aql")

    monkeypatch.setattr(aql.cli, "run_training", broken)
    with pytest.raises(RuntimeError, match="a bug in aql"):
        main(["train", "--config", TEMPLATE, "--set", "logging.wandb_project=null"])


def test_missing_extras_name_the_pip_command(tmp_path, monkeypatch):
    with pytest.raises(MissingExtraError, match=r"thing needs the no_such_package_aql package, which is not installed; "
                                                r"pip install 'aql\[data\]'") as caught:
        require("no_such_package_aql", "data", "thing")
    assert isinstance(caught.value, ImportError) and isinstance(caught.value, AQLError)
    (tmp_path / "half_installed_aql.py").write_text("import no_such_dependency_aql\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_aql"):  # the real cause, not "not installed"
        require("half_installed_aql", "data", "thing")
    assert require("json", "data", "thing") is json


# ------------------------------------------------------------------------------ tokenizer and vocabulary
def test_a_saved_tokenizer_folder_loads_and_encodes_like_its_backend(tokenizer_folder):
    from aql.data import load_tokenizer

    folder, backend = tokenizer_folder
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.name == str(folder) and tokenizer.description.endswith(f"from the folder {folder}")
    assert tokenizer.vocab_size == backend.get_vocab_size() and tokenizer.eos_id == backend.token_to_id("<|endoftext|>")
    for text in _texts(20, seed=7) + ["unseen wörds ∑ and spaces  "]:
        assert tokenizer.encode(text) == backend.encode(text).ids


def test_a_local_text_run_prints_the_tokenizer_and_sizes_the_model_to_it(tokenizer_folder, tmp_path, capsys):
    folder, backend = tokenizer_folder
    corpus = _corpus(tmp_path / "corpus.txt")
    run = tmp_path / "run"
    code = main(["train", "--config", TEMPLATE, *TINY_GPT2, "--set", f"data.name={corpus}", "--set", f"data.tokenizer={folder}",
                 "--set", "logging.wandb_project=null", "--output-dir", str(run)])
    out = capsys.readouterr().out
    vocab = backend.get_vocab_size()
    assert code == 0
    assert f"aql: tokenizer {folder}: " in out and f"vocabulary {vocab}; model.vocab_size 50257 -> {vocab}" in out
    saved = load_config(run / "config.yaml")  # the resolved config, beside the metrics
    assert saved.model.vocab_size == vocab and saved.data.name == str(corpus) and saved.logging.wandb_project is None
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["event"] == "fit" and records[-1]["steps"] == 3
    from aql.training.checkpoint import read_checkpoint

    assert read_checkpoint(run / "checkpoint.pt")["config"]["model"]["vocab_size"] == vocab


def test_the_auto_tokenizer_falls_back_to_bytes_visibly(tmp_path, capsys):
    from aql.data import load_tokenizer

    if load_tokenizer("auto").name != "byte":
        pytest.skip("the GPT-2 tokenizer is in this machine's Hugging Face cache")
    corpus = _corpus(tmp_path / "corpus.txt")
    code = main(["train", "--config", TEMPLATE, *TINY_GPT2, "--set", f"data.name={corpus}", "--set", "logging.wandb_project=null",
                 "--output-dir", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0
    assert ("aql: tokenizer byte: UTF-8 bytes (auto: the GPT-2 tokenizer is not in the local Hugging Face cache), "
            "vocabulary 257; model.vocab_size 50257 -> 257") in out
    assert load_config(tmp_path / "run" / "config.yaml").model.vocab_size == 257


def test_a_tokenizer_cached_by_name_works_offline(tokenizer_folder, tmp_path):
    """A name (not a folder) resolved from a Hugging Face cache laid out as the hub writes it."""
    transformers = pytest.importorskip("transformers")
    folder, backend = tokenizer_folder
    snapshot = tmp_path / "hub" / "models--local--tiny-bpe" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    transformers.GPT2Config(vocab_size=backend.get_vocab_size(), bos_token_id=0, eos_token_id=0).save_pretrained(str(snapshot))
    (tmp_path / "hub" / "models--local--tiny-bpe" / "refs").mkdir()
    (tmp_path / "hub" / "models--local--tiny-bpe" / "refs" / "main").write_text("0" * 40)
    corpus = _corpus(tmp_path / "corpus.txt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", "aql", "train", "--config", TEMPLATE, *TINY_GPT2, "--set", f"data.name={corpus}",
                           "--set", "data.tokenizer=local/tiny-bpe", "--set", "logging.wandb_project=null",
                           "--output-dir", str(tmp_path / "run")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "aql: tokenizer local/tiny-bpe: " in done.stdout and "from the local Hugging Face cache" in done.stdout
    assert load_config(tmp_path / "run" / "config.yaml").model.vocab_size == backend.get_vocab_size()


# -------------------------------------------------------------------------------------- --version, --help
def test_version():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    import aql

    with pytest.raises(SystemExit) as caught:
        main(["--version"])
    assert caught.value.code == 0
    assert aql.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_prints(capsys):
    import aql

    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"aql {aql.__version__}"


def test_every_command_and_option_says_what_it_does(capsys):
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(commands.choices) == {"train", "info", "demo", "experiment", "bench"}
    summaries = {action.dest: action.help for action in commands._choices_actions}
    for name, sub in commands.choices.items():
        assert summaries[name] and sub.description and len(sub.description) >= len(summaries[name]) - 2, name
        for action in sub._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
        with pytest.raises(SystemExit) as caught:
            main([name, "--help"])
        assert caught.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: python -m aql {name}") and sub.description.split()[0] in out
        assert "%%" not in out  # descriptions are not %-formatted, help strings are
    for action in parser._actions:
        assert action.help, action.dest


# ------------------------------------------------------------------------------- model outputs, evaluation
class _Output:
    def __init__(self, logits):
        self.logits = logits


def test_model_logits_reads_every_output_form():
    logits = torch.randn(3, 5)
    assert model_logits(logits) is logits
    assert model_logits(_Output(logits)) is logits
    assert model_logits({"logits": logits, "loss": None}) is logits
    assert model_logits((logits, "cache")) is logits and model_logits([logits]) is logits
    sequence = torch.randn(2, 4, 5)
    flat = model_logits(_Output(sequence))
    assert flat.shape == (8, 5) and flat.data_ptr() == sequence.data_ptr()  # a view, no copy
    assert torch.equal(flat, sequence.reshape(8, 5))
    for bad, named in ((None, "NoneType"), ({"loss": 1.0}, "dict"), ((), "tuple"), (_Output("x"), "_Output holding str")):
        with pytest.raises(TypeError, match=f"must return logits as a tensor.*got {named}"):
            model_logits(bad)


def test_eval_batch_size_fits_the_memory_budget():
    # GPT-2 at 128 tokens: one sequence's float32 logits are 128 * 50257 * 4 bytes = 24.5 MiB
    assert eval_batch_size(0, rows_per_sample=128, outputs=50257, memory_mb=256) == 10
    assert 10 * 128 * 50257 * 4 <= 256 * 2**20 < 11 * 128 * 50257 * 4
    assert eval_batch_size(0, rows_per_sample=1, outputs=10, memory_mb=256) == 256 * 2**20 // 40
    assert eval_batch_size(0, rows_per_sample=4096, outputs=10**6, memory_mb=1) == 1  # at least one sample
    assert eval_batch_size(64, rows_per_sample=128, outputs=50257, memory_mb=256) == 64  # a number given stands
    for kwargs, message in (({"requested": -1}, "requested must be an int >= 0, got -1"),
                            ({"rows_per_sample": 0}, "rows_per_sample must be an int >= 1"),
                            ({"outputs": 2.5}, "outputs must be an int >= 1, got 2.5"),
                            ({"memory_mb": float("nan")}, "memory_mb must be a finite number > 0")):
        args = {"requested": 0, "rows_per_sample": 1, "outputs": 2, "memory_mb": 1.0, **kwargs}
        with pytest.raises(ValueError, match=message):
            eval_batch_size(args.pop("requested"), **args)


def _hf_config(tmp_path, strategy, **training):
    return config_from_dict({
        "seed": 3, "device": "cpu",
        "model": {"type": "gpt2", "n_layers": 1, "n_heads": 2, "d_model": 16, "vocab_size": 257, "n_positions": 32},
        "data": {"name": "text_files", "text_files": ["unused.txt"], "tokenizer": "byte", "seq_len": 8},
        "training": {"batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 1, "max_steps": 4, "gradient_accumulation": 1,
                     "epochs": 1, **training},
        "aql_v2": {"selection_strategy": strategy, "query_budget": 0.5, "target_overhead": 1.0},
        "logging": {"wandb_project": None, "output_dir": str(tmp_path / strategy), "progress_bar": False, "log_every": 2},
    })


@pytest.mark.parametrize("strategy", ["none", "streaming"])
def test_the_trainer_trains_and_evaluates_a_hugging_face_model(strategy, tmp_path):
    transformers = pytest.importorskip("transformers")
    from aql.data import ByteTokenizer, sequence_dataset
    from aql.trainer import AQLv2Trainer

    train = sequence_dataset(_texts(80), ByteTokenizer(), 8)
    val = sequence_dataset(_texts(30, seed=5), ByteTokenizer(), 8)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=257, n_positions=32))
    config = _hf_config(tmp_path, strategy)
    trainer = AQLv2Trainer(model, config, train_data=train, val_data=val)
    rows = []
    handle = model.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]) if not module.training else None,
                                         with_kwargs=False)
    result = trainer.fit()
    assert result["steps"] == 4 and all(torch.isfinite(p).all() for p in model.parameters())
    rows.clear()
    metrics = trainer.evaluate(val)
    handle.remove()
    # the automatic evaluation batch: as many sequences as fit 256 MiB of float32 logits -> the whole split here
    assert rows == [len(val)]
    with torch.no_grad():  # an independent float64 reference from the model's own logits
        model.eval()
        logits = model(val.inputs).logits.double()
        reference = F.cross_entropy(logits.reshape(-1, 257), val.targets.reshape(-1))
    assert metrics["loss"] == pytest.approx(float(reference), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(float(reference.exp()), rel=1e-5)
    saved = load_config(tmp_path / strategy / "config.yaml")
    assert saved == config  # the run folder holds the config it ran with, beside metrics.jsonl
    assert (tmp_path / strategy / "metrics.jsonl").is_file()


def test_a_small_memory_budget_splits_evaluation_and_the_loss_stays(tmp_path):
    from aql.data import ByteTokenizer, sequence_dataset
    from aql.models import build_model
    from aql.trainer import AQLv2Trainer

    val = sequence_dataset(_texts(60, seed=9), ByteTokenizer(), 8)
    config = _hf_config(tmp_path, "none")
    model = build_model(config.model)
    whole = AQLv2Trainer(model, config, train_data=val).evaluate(val)
    # 0.05 MiB / (8 tokens * 257 outputs * 4 bytes) = 6 sequences per batch
    small = _hf_config(tmp_path, "none", eval_memory_mb=0.05)
    rows = []
    handle = model.register_forward_hook(lambda module, args, output: rows.append(args[0].shape[0]))
    split = AQLv2Trainer(model, small, train_data=val).evaluate(val)
    handle.remove()
    assert rows[0] == 6 and sum(rows) == len(val) and len(rows) == -(-len(val) // 6)
    assert split["loss"] == pytest.approx(whole["loss"], rel=1e-6) and split["accuracy"] == whole["accuracy"]


def test_evaluation_shows_progress_on_a_terminal_unless_progress_is_off(tmp_path, monkeypatch):
    import io

    from aql.data import ByteTokenizer, sequence_dataset
    from aql.models import build_model
    from aql.trainer import AQLv2Trainer

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    val = sequence_dataset(_texts(30, seed=9), ByteTokenizer(), 8)
    for progress in (True, False):
        config = _hf_config(tmp_path, "none", eval_batch_size=4)
        config.logging.progress_bar = progress
        trainer = AQLv2Trainer(build_model(config.model), config, train_data=val)
        terminal = Terminal()
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stderr", terminal)
            trainer.evaluate(val)
        assert ("evaluating" in terminal.getvalue()) is progress
