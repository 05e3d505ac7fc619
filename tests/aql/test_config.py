"""aql.config: the template loads as-is, every rule rejects with a message naming key, value and rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from aql.config import Config, ConfigError, config_from_dict, load_config, parse_override

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "configs" / "aql_v2_config.yaml"
DEMO = ROOT / "configs" / "mnist1d_demo.yaml"


def test_template_is_the_design_documents_and_loads_as_is():
    design = (ROOT.parent / "shared" / "seed" / "aql_v2_design.md")
    text = TEMPLATE.read_text(encoding="utf-8")
    if design.is_file():  # the shipped file starts with the template, verbatim
        doc = design.read_text(encoding="utf-8")
        start = doc.index("# configs/aql_v2_config.yaml")
        assert text.startswith(doc[start:doc.index("```", start)])
    raw = yaml.safe_load(text)
    assert raw["training"]["learning_rate"] == "3e-4"  # why float fields take numeric strings
    config = load_config(TEMPLATE)
    assert isinstance(config, Config)
    assert config.model.type == "gpt2" and config.model.n_layers == 12 and config.model.vocab_size == 50257
    assert isinstance(config.training.learning_rate, float) and config.training.learning_rate == pytest.approx(3e-4)
    assert config.training.gradient_accumulation == 4 and config.training.max_steps == 50000
    assert config.aql_v2.selection_strategy == "streaming" and config.aql_v2.query_budget == 0.2
    assert config.aql_v2.difficulty_stages == [0.3, 0.6, 1.0]
    assert config.logging.wandb_project == "efficient-llm-training"
    assert config.logging.wandb_tags == ["aql-v2", "wikitext-103"]


def test_demo_config_loads():
    config = load_config(DEMO)
    assert config.model.type == "mnist1d_cnn" and config.data.name == "mnist1d"
    assert config.aql_v2.query_budget == 0.2 and config.logging.wandb_project is None


def test_defaults_and_empty_file(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(empty) == Config()
    assert load_config(None) == Config()


@pytest.mark.parametrize("value, expected", [("3e-4", 3e-4), ("1.5E-3", 1.5e-3), (2, 2.0), ("7", 7.0)])
def test_float_fields_accept_numbers_and_numeric_strings(value, expected):
    config = config_from_dict({"training": {"learning_rate": value}})
    assert isinstance(config.training.learning_rate, float)
    assert config.training.learning_rate == pytest.approx(expected)


# (raw mapping, fragments the message must hold)
BAD = [
    ({"modle": {}}, ["modle", "unknown", "model"]),
    ({"training": {"batch_sise": 3}}, ["training.batch_sise", "unknown", "batch_size"]),
    ({"training": {"batch_size": "64"}}, ["training.batch_size", "'64'", "integer"]),
    ({"training": {"batch_size": 6.5}}, ["training.batch_size", "6.5", "integer"]),
    ({"training": {"batch_size": True}}, ["training.batch_size", "True", "integer"]),
    ({"training": {"learning_rate": "fast"}}, ["training.learning_rate", "'fast'", "number"]),
    ({"training": {"learning_rate": "nan"}}, ["training.learning_rate", "finite"]),
    ({"training": {"learning_rate": 0}}, ["training.learning_rate", "0.0", "outside"]),
    ({"training": {"batch_size": 0}}, ["training.batch_size", "0", ">= 1"]),
    ({"training": {"gradient_accumulation": 0}}, ["training.gradient_accumulation", ">= 1"]),
    ({"training": {"precision": "fp8"}}, ["training.precision", "'fp8'", "bf16"]),
    ({"aql_v2": {"query_budget": 0}}, ["aql_v2.query_budget", "0.0", "(0.0, 1.0]"]),
    ({"aql_v2": {"query_budget": 1.5}}, ["aql_v2.query_budget", "1.5", "(0.0, 1.0]"]),
    ({"aql_v2": {"query_budget": -0.2}}, ["aql_v2.query_budget", "-0.2"]),
    ({"aql_v2": {"fisher_ema_decay": 1.0}}, ["aql_v2.fisher_ema_decay", "1.0", "[0.0, 1.0)"]),
    ({"aql_v2": {"fisher_ema_decay": -0.01}}, ["aql_v2.fisher_ema_decay", "-0.01", "[0.0, 1.0)"]),
    ({"aql_v2": {"uncertainty_method": "bayes"}}, ["aql_v2.uncertainty_method", "'bayes'", "laplace", "ensemble", "mc_dropout"]),
    ({"aql_v2": {"selection_strategy": "greedy"}}, ["aql_v2.selection_strategy", "'greedy'", "none", "random", "stale", "streaming", "curriculum"]),
    ({"aql_v2": {"score": "margin"}}, ["aql_v2.score", "'margin'", "loss", "entropy", "el2n"]),
    ({"aql_v2": {"exploration": 1.2}}, ["aql_v2.exploration", "1.2"]),
    ({"aql_v2": {"difficulty_stages": [0.6, 0.3]}}, ["aql_v2.difficulty_stages", "increasing"]),
    ({"aql_v2": {"difficulty_stages": [0.5, 1.5]}}, ["aql_v2.difficulty_stages", "(0, 1]"]),
    ({"aql_v2": {"difficulty_stages": "0.3"}}, ["aql_v2.difficulty_stages", "list"]),
    ({"aql_v2": {"curriculum_enabled": "yes please"}}, ["aql_v2.curriculum_enabled", "true or false"]),
    ({"aql_v2": {"selection_strategy": "curriculum", "curriculum_enabled": False}}, ["aql_v2.curriculum_enabled", "curriculum"]),
    ({"logging": {"wandb_tags": "aql"}}, ["logging.wandb_tags", "list"]),
    ({"logging": {"wandb_project": ""}}, ["logging.wandb_project", "null"]),
    ({"logging": "often"}, ["logging", "mapping"]),
    ({"model": {"type": "resnet"}}, ["model.type", "'resnet'", "mnist1d_cnn", "gpt2"]),
    ({"model": {"d_model": 100, "n_heads": 12}}, ["model.d_model", "n_heads"]),
    ({"model": {"channels": [8, 0]}}, ["model.channels[1]", ">= 1"]),
    ({"data": {"name": "mnist1d"}}, ["data.name", "'mnist1d'", "gpt2"]),
    ({"model": {"type": "mnist1d_cnn"}, "data": {"name": "mnist1d", "num_samples": 5}}, ["data.num_samples", ">= 20"]),
    ({"data": {"seq_len": 2048}}, ["data.seq_len", "n_positions"]),
    ({"data": {"name": "text_files"}}, ["data.text_files", "at least one"]),
    ({"data": {"name": " "}}, ["data.name", "names no data set", "local path"]),
    ({"data": {"tokenizer": ""}}, ["data.tokenizer", "names no tokenizer", "Hugging Face"]),
    ({"data": {"subset": ""}}, ["data.subset", "null"]),
    ({"data": {"subset": "wikitext-2-raw-v1"}}, ["data.subset", "'wikitext-2-raw-v1'", "not to data.name 'wikitext103'"]),
    ({"data": {"text_column": ""}}, ["data.text_column", "text"]),
    ({"training": {"eval_batch_size": -1}}, ["training.eval_batch_size", "-1", ">= 0"]),
    ({"training": {"eval_memory_mb": 0}}, ["training.eval_memory_mb", "0.0", "outside"]),
    ({"device": "tpu"}, ["device", "'tpu'", "cuda"]),
    ({"seed": "zero"}, ["seed", "'zero'", "integer"]),
]


@pytest.mark.parametrize("raw, fragments", BAD, ids=[next(iter(r)) + ":" + str(r[next(iter(r))])[:40] for r, _ in BAD])
def test_each_rule_rejects_with_a_message_naming_key_and_value(raw, fragments):
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw)
    assert isinstance(caught.value, ValueError)
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))


def test_overrides_are_yaml_scalars_validated_like_the_file():
    config = load_config(TEMPLATE, ["training.batch_size=64", "training.learning_rate=1e-3", "aql_v2.selection_strategy=stale",
                                    "logging.wandb_project=null", "aql_v2.difficulty_stages=[0.5, 1.0]", "seed=7",
                                    "training.epochs=3"])
    assert config.training.batch_size == 64 and config.training.learning_rate == pytest.approx(1e-3)
    assert config.aql_v2.selection_strategy == "stale" and config.logging.wandb_project is None
    assert config.aql_v2.difficulty_stages == [0.5, 1.0] and config.seed == 7 and config.training.epochs == 3
    # the file itself is untouched by overrides
    assert load_config(TEMPLATE).training.batch_size == 32


@pytest.mark.parametrize("override, fragments", [
    ("training.batch_size=big", ["training.batch_size", "'big'", "integer"]),
    ("aql_v2.query_budget=2", ["aql_v2.query_budget", "2.0", "(0.0, 1.0]"]),
    ("training.batchsize=3", ["training.batchsize", "unknown"]),
    ("trainin.batch_size=3", ["trainin", "unknown section"]),
    ("training=3", ["training", "section"]),
    ("training.batch_size", ["section.key=value"]),
    ("a.b.c.d=1", ["section.key"]),
    ("training.batch_size.x=1", ["training.batch_size is not a mapping"]),
    ("aql_v2.strategy_options.bogus=1", ["aql_v2.strategy_options.bogus", "not an option of strategy 'online'"]),
    ("training.batch_size={a: 1}", ["one key at a time"]),
])
def test_bad_overrides(override, fragments):
    with pytest.raises(ConfigError) as caught:
        load_config(DEMO, [override])
    for fragment in fragments:
        assert fragment in str(caught.value), (fragment, str(caught.value))


def test_parse_override():
    assert parse_override("training.batch_size=64") == (["training", "batch_size"], 64)
    assert parse_override("logging.wandb_project=null") == (["logging", "wandb_project"], None)
    assert parse_override("device=cuda:1") == (["device"], "cuda:1")
    assert parse_override("training.learning_rate=3e-4") == (["training", "learning_rate"], "3e-4")


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config file"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: {batch_size: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_to_dict_round_trips():
    config = load_config(DEMO)
    assert config_from_dict(config.to_dict()) == config


def test_unimplemented_performance_keys_warn_once_and_false_is_silent(monkeypatch):
    import warnings

    from aql import config as config_module

    monkeypatch.setattr(config_module, "_WARNED", set())
    with pytest.warns(UserWarning, match=r"aql_v2.enable_caching: true is not implemented.*has no effect") as caught:
        load_config(TEMPLATE)
    assert any("aql_v2.parallelize_uncertainty: true is not implemented" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(TEMPLATE)  # once per process
        monkeypatch.setattr(config_module, "_WARNED", set())
        config = load_config(DEMO)  # false (the default): nothing to warn about
    assert config.aql_v2.enable_caching is False and config.aql_v2.parallelize_uncertainty is False


def test_strategy_options_from_the_command_line():
    config = load_config(DEMO, ["aql_v2.selection_strategy=streaming", "aql_v2.strategy_options={}",
                                "aql_v2.strategy_options.batch_tolerance=0.5", "aql_v2.strategy_options.budget_feedback=false"])
    assert config.aql_v2.strategy_options == {"batch_tolerance": 0.5, "budget_feedback": False}
    assert load_config(DEMO, ["aql_v2.strategy_options.smoothing=0.25"]).aql_v2.strategy_options["smoothing"] == 0.25


@pytest.mark.parametrize("text, key, line, first", [
    ("training:\n  epochs: 3\nlogging:\n  log_every: 2\ntraining:\n  batch_size: 8\n", "training", 5, 1),
    ("training:\n  epochs: 3\n  batch_size: 4\n  epochs: 5\n", "epochs", 4, 2),
])
def test_duplicate_yaml_keys_are_an_error_naming_key_and_line(text, key, line, first, tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"dup.yaml: duplicate key '{key}' at line {line} \(first at line {first}\)"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("seed=-1", r"seed: -1 is outside \[0, 4294967295\]"),
    ("seed=4294967296", r"seed: 4294967296 is outside"),
    ("data.data_seed=-3", r"data.data_seed: -3 is outside"),
    ("training.max_nonfinite_steps=0", r"training.max_nonfinite_steps: 0 must be >= 1"),
    ("logging.keep_checkpoints=0", r"logging.keep_checkpoints: 0 must be >= 1"),
])
def test_reliability_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_data_name_and_tokenizer_take_any_name_or_path():
    config = config_from_dict({"data": {"name": "someone/corpus", "subset": "small", "text_column": "body",
                                        "tokenizer": "EleutherAI/gpt-neox-20b"}})
    assert (config.data.name, config.data.subset, config.data.text_column) == ("someone/corpus", "small", "body")
    assert config.data.tokenizer == "EleutherAI/gpt-neox-20b"
    assert config_from_dict({"data": {"name": "path/to/file.txt"}}).data.name == "path/to/file.txt"
    # the evaluation batch is automatic by default (sized by eval_memory_mb), a number when given
    assert Config().training.eval_batch_size == 0 and Config().training.eval_memory_mb == 256.0
    assert config_from_dict({"training": {"eval_batch_size": 64}}).training.eval_batch_size == 64


def test_config_errors_are_aql_errors():
    from aql.errors import AQLError

    with pytest.raises(AQLError):
        config_from_dict({"seed": -1})
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("path, overrides", [(DEMO, []), (TEMPLATE, ["data.name=corpus.txt", "model.vocab_size=283"]),
                                             (None, ["data.subset=x", "data.name=a/b", "aql_v2.strategy_options.batch_tolerance=0.5"])])
def test_save_config_round_trips_through_load_config(path, overrides, tmp_path):
    import warnings

    from aql.config import save_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the template's unimplemented keys
        config = load_config(path, overrides)
        written = save_config(config, tmp_path / "run" / "config.yaml")
        assert written == tmp_path / "run" / "config.yaml"
        again = load_config(written)
    assert again == config
    assert yaml.safe_load(written.read_text())["model"]["vocab_size"] == config.model.vocab_size
    assert not list((tmp_path / "run").glob(".*tmp*"))  # no temporary left behind
    with pytest.raises(TypeError, match="config must be an aql.config.Config, got dict"):
        save_config(config.to_dict(), tmp_path / "x.yaml")


def test_target_overhead_may_exceed_the_training_time_but_not_go_negative():
    """A strategy with a scoring forward of its own spends about as much time on it as on training:
    the budget takes values above 1 (the demo's is 2.0), never below 0."""
    assert config_from_dict({"aql_v2": {"target_overhead": 2.0}}).aql_v2.target_overhead == 2.0
    with pytest.raises(ConfigError, match=r"aql_v2.target_overhead: -0.1 is outside \[0.0, inf\)"):
        config_from_dict({"aql_v2": {"target_overhead": -0.1}})
