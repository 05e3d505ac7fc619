"""Experiment 3's runner (aql.experiments_lm) end to end on a tiny generated corpus: data splits and
token-file cache, every method through the trainer, budget-matched token counts, the schedule at zero
at the end of every run, scoring counted in the FLOPs, resumption and the outputs."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from aql import experiments_lm
from aql.experiments_lm import (LMStudyError, chosen_learning_rate, load_lm_study, prepare_data, run_lm_study, summarise_lm,
                                write_lm_outputs)

WORDS = ("the function returns a new list of values from the module when called with keyword arguments and raises "
         "an error if the object is not iterable").split()

STUDY = {
    "name": "tiny_lm", "source": "directory", "pattern": "*.rst.txt", "tokenizer": "byte", "seq_len": 16,
    "val_fraction": 0.2, "test_fraction": 0.2, "max_train_tokens": 40 * 16 + 1, "max_eval_tokens": 200,
    "n_layers": 1, "n_heads": 2, "d_model": 16, "epochs": 4, "batch_size": 8, "eval_batch_size": 16,
    "learning_rates": [3.0e-3], "budget": 0.2, "seeds": [0], "threads": 1, "device": "cpu",
    "methods": [
        {"name": "all_data", "strategy": "none"},
        {"name": "all_data_short", "strategy": "none", "epochs_scale": "budget"},
        {"name": "random", "strategy": "random"},
        {"name": "aql_online", "strategy": "online", "options": {"score": "loss", "pick": "sample", "balanced": False}},
        {"name": "aql_streaming", "strategy": "streaming"},
    ],
    "quick": {"epochs": 2, "methods": ["all_data", "random"]},
}


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    root = tmp_path / "docs"
    for i in range(24):
        folder = root / ("library" if i % 2 else "tutorial")
        folder.mkdir(parents=True, exist_ok=True)
        text = " ".join(rng.choice(WORDS) for _ in range(120)) + "\n"
        (folder / f"page{i:02d}.rst.txt").write_text(text, encoding="utf-8")
    (root / "ignored.html").write_text("<html>not a source</html>", encoding="utf-8")
    return root


def _study_file(tmp_path, corpus, **changes):
    raw = {**STUDY, "data_path": str(corpus), "cache_dir": str(tmp_path / "cache"), **changes}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_splits_are_disjoint_cached_and_capped(tmp_path, corpus):
    study = load_lm_study(_study_file(tmp_path, corpus))
    splits = experiments_lm._directory_splits(study)
    names = {split: {p.name for p in paths} for split, paths in splits.items()}
    assert all(names.values()) and not (names["train"] & names["val"] or names["train"] & names["test"] or names["val"] & names["test"])
    assert sum(len(n) for n in names.values()) == 24  # the .html file is not a document
    data = prepare_data(study)
    assert data["vocab_size"] == 257 and data["tokenizer"] == "byte"
    assert len(data["train"]) == 40 and data["train"].tokens.num_tokens == 40 * 16 + 1
    assert data["val"].tokens.num_tokens == 200 and len(data["test"]) == (200 - 1) // 16
    # the train file holds the train documents' bytes, in the split's order, each followed by end-of-text
    first = splits["train"][0].read_bytes()
    assert data["train"].tokens.read(0, len(first) + 1).tolist() == list(first) + [256]
    stamp = (tmp_path / "cache").glob("tiny_lm_*/train.bin").__next__().stat().st_mtime_ns
    again = prepare_data(study)  # reused, not written again
    assert next((tmp_path / "cache").glob("tiny_lm_*/train.bin")).stat().st_mtime_ns == stamp and again["folder"] == data["folder"]


def test_every_method_runs_budget_matched_with_the_schedule_at_zero(tmp_path, corpus, one_thread, monkeypatch):
    study = load_lm_study(_study_file(tmp_path, corpus))
    out = tmp_path / "out"
    records = run_lm_study(study, out, progress=False)
    by_name = {r["method"]: r for r in records}
    assert set(by_name) == {m.name for m in study.methods} and all(r["phase"] == "final" for r in records)
    blocks, length, epochs = 40, 16, 4
    assert by_name["all_data"]["tokens_backpropagated"] == epochs * blocks * length
    budget_tokens = epochs * 8 * length  # 20% of 40 blocks = 8 per epoch
    for name in ("all_data_short", "random", "aql_online"):
        assert by_name[name]["tokens_backpropagated"] == budget_tokens, name
    assert abs(by_name["aql_streaming"]["tokens_backpropagated"] - budget_tokens) <= 0.25 * budget_tokens  # a running threshold
    assert by_name["all_data_short"]["steps"] == 4 and by_name["all_data"]["steps"] == 20  # 0.8 epochs: cut by max_steps
    for record in records:
        assert record["final_learning_rate"] == pytest.approx(0.0, abs=1e-12), record["method"]
        assert record["test_perplexity"] > 1.0 and record["val_perplexity"] > 1.0
    for name in ("aql_online", "aql_streaming"):
        assert by_name[name]["scoring_tokens"] == epochs * blocks * length
        assert by_name[name]["flops"] == pytest.approx(by_name[name]["flops_scoring"] * (1 + 3 * by_name[name]["samples_backpropagated"]
                                                                                        / by_name[name]["scoring_forwards"]))
    assert by_name["random"]["scoring_tokens"] == 0 and by_name["aql_online"]["flops"] > 1.5 * by_name["random"]["flops"]
    # resumed: nothing runs again
    monkeypatch.setattr(experiments_lm, "train_lm_run", lambda *a, **k: pytest.fail("a finished run ran again"))
    assert len(run_lm_study(study, out, progress=False)) == len(records)
    summary = write_lm_outputs(study, records, out, note="test")
    assert summary["target"]["tokens_backpropagated"] == epochs * blocks * length
    assert summary["verdicts"]["random"]["token_reduction"] == pytest.approx(5.0)
    assert (out / "perplexity.png").stat().st_size > 0 and "| aql_online |" in (out / "report.md").read_text()
    assert json.loads((out / "summary.json").read_text())["study"] == "tiny_lm"
    assert len((out / "runs.jsonl").read_text().splitlines()) == 5


def test_main_quick_writes_the_outputs(tmp_path, corpus, one_thread):
    out = tmp_path / "quick"
    assert experiments_lm.main(["--config", str(_study_file(tmp_path, corpus)), "--quick", "--output-dir", str(out), "--no-progress"]) == 0
    records = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == ["all_data", "random"] and {r["epochs"] for r in records} == {2}
    assert (out / "config.yaml").is_file() and "Smoke run" in (out / "report.md").read_text()


def test_learning_rate_choice_and_bad_configs(tmp_path, corpus):
    study = load_lm_study(_study_file(tmp_path, corpus, learning_rates=[1.0e-3, 3.0e-3]))
    records = [{"phase": "tune", "method": "random", "learning_rate": lr, "val_loss": loss}
               for lr, loss in ((1e-3, 2.0), (3e-3, 1.5), (1e-3, 2.2), (3e-3, 1.9))]
    assert chosen_learning_rate(study, records, "random") == 3e-3
    # finals at another rate (an earlier grid's) stay in the records but not in the summary
    keys = ("val_perplexity", "test_loss", "tokens_backpropagated", "samples_backpropagated", "scoring_tokens", "flops",
            "flops_scoring", "train_s", "wall_s", "overhead_pct", "steps")
    finals = [{"phase": "final", "method": "random", "learning_rate": lr, "seed": seed, "test_perplexity": ppl, "budget": 0.2,
               "epochs": 1, **{key: 1.0 for key in keys}}
              for lr, seed, ppl in ((1e-3, 0, 50.0), (3e-3, 0, 10.0), (3e-3, 1, 12.0), (1e-3, 1, 70.0))]
    row = summarise_lm(study, records + finals)["rows"]["random"]
    assert (row["learning_rate"], row["seeds"], row["test_perplexity"]) == (3e-3, 2, pytest.approx(11.0))
    with pytest.raises(LMStudyError, match="no tuning runs for method 'aql_online'"):
        chosen_learning_rate(study, records, "aql_online")
    for changes, match in (({"colour": 1}, r"unknown keys \['colour'\]"),
                           ({"methods": [{"name": "x", "strategy": "nope"}]}, "methods\\[0\\].strategy must be one of"),
                           ({"data_path": ""}, "needs data_path"),
                           ({"budget": 0.0}, r"budget must lie in \(0, 1\]"),
                           ({"d_model": 15}, "must be a multiple of n_heads"),
                           ({"val_fraction": 0.6, "test_fraction": 0.5}, "sum below 1"),
                           ({"seeds": []}, "seeds must be a non-empty list")):
        with pytest.raises(LMStudyError, match=match):
            load_lm_study(_study_file(tmp_path, corpus, **changes))
    with pytest.raises(LMStudyError, match="no study config"):
        load_lm_study(tmp_path / "missing.yaml")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(LMStudyError, match="no file under"):
        prepare_data(load_lm_study(_study_file(tmp_path, empty)))


def test_wikitext_source_streams_through_datasets(tmp_path, monkeypatch):
    """source: wikitext103 reads each split's rows from datasets.load_dataset(..., streaming=True)
    (replaced here by a local fake: tests never download)."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, *, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": f" = {split} heading = \n"}, {"text": ""}, {"text": "body text " * 20 + "\n"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    raw = {**STUDY, "source": "wikitext103", "cache_dir": str(tmp_path / "cache"), "max_train_tokens": 0, "max_eval_tokens": 0}
    path = tmp_path / "wiki.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    data = prepare_data(load_lm_study(path))
    assert calls == [("wikitext", "wikitext-103-raw-v1", split, True) for split in ("train", "validation", "test")]
    expected = list(" = validation heading = \n".encode()) + [256] + list(("body text " * 20 + "\n").encode()) + [256]
    assert data["val"].tokens.read(0, data["val"].tokens.num_tokens).tolist() == expected
