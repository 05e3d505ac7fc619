"""aql.data on generated data: MNIST-1D made locally, text from a local file and an in-memory Dataset.

Nothing here may touch the network: the Hugging Face libraries are put offline, and the MNIST-1D
package's download function is made to fail loudly if anything calls it.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from aql.config import config_from_dict
from aql.data import (
    ByteTokenizer,
    IndexedTensorDataset,
    build_datasets,
    hf_text_dataset,
    load_tokenizer,
    local_data_path,
    mnist1d_datasets,
    text_file_dataset,
    token_sequences,
)
from aql.errors import DataError, DataNotFoundError, TokenizerError


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    import requests

    def no_network(*args, **kwargs):
        raise AssertionError(f"a network call was made: {args!r}")

    monkeypatch.setattr(requests, "get", no_network)
    monkeypatch.setattr(requests.Session, "request", no_network)


def test_mnist1d_generated_locally_split_cached_and_indexed(tmp_path):
    numpy_state, python_state = np.random.get_state(), random.getstate()
    train, val, test = mnist1d_datasets(400, train_split=0.75, val_fraction=0.2, seed=3, cache_dir=tmp_path)
    # the package reseeds the global generators; the caller's streams must be left as they were
    assert np.array_equal(np.random.get_state()[1], numpy_state[1]) and random.getstate() == python_state
    assert (len(train), len(val), len(test)) == (240, 60, 100)
    for dataset in (train, val, test):
        assert dataset.inputs.dtype == torch.float32 and dataset.inputs.shape[1:] == (40,)
        assert dataset.targets.dtype == torch.int64 and int(dataset.targets.min()) >= 0 and int(dataset.targets.max()) <= 9
        assert torch.isfinite(dataset.inputs).all()
    # 10 classes, balanced by construction (num_samples // 10 per class before the split)
    labels = torch.cat([train.targets, val.targets, test.targets])
    assert torch.bincount(labels, minlength=10).tolist() == [40] * 10
    x, y, i = train[17]
    assert i == 17 and torch.equal(x, train.inputs[17]) and int(y) == int(train.targets[17])
    xs, ys = train.gather(torch.tensor([5, 1, 5]))
    assert torch.equal(xs, train.inputs[[5, 1, 5]]) and torch.equal(ys, train.targets[[5, 1, 5]])
    cached = list(tmp_path.glob("mnist1d_400_*.npz"))
    assert len(cached) == 1
    # a second call reads the cache (same arrays); another seed makes other data
    again, _, _ = mnist1d_datasets(400, train_split=0.75, val_fraction=0.2, seed=3, cache_dir=tmp_path)
    assert torch.equal(again.inputs, train.inputs) and torch.equal(again.targets, train.targets)
    other, _, _ = mnist1d_datasets(400, train_split=0.75, val_fraction=0.2, seed=4, cache_dir=tmp_path)
    assert not torch.equal(other.inputs, train.inputs)
    assert len(list(tmp_path.glob("mnist1d_400_*.npz"))) == 2


def test_mnist1d_no_val_and_bad_arguments(tmp_path):
    train, val, test = mnist1d_datasets(100, val_fraction=0.0, cache_dir=tmp_path)
    assert val is None and len(train) == 80 and len(test) == 20
    with pytest.raises(ValueError, match="num_samples must be an int >= 20, got 5"):
        mnist1d_datasets(5, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="train_split must be in"):
        mnist1d_datasets(100, train_split=1.0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="val_fraction must be in"):
        mnist1d_datasets(100, val_fraction=1.0, cache_dir=tmp_path)


def test_indexed_dataset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="same length, got 3 and 2"):
        IndexedTensorDataset(torch.zeros(3, 4), torch.zeros(2))
    with pytest.raises(TypeError, match="must be tensors"):
        IndexedTensorDataset([1, 2], torch.zeros(2))


def _reference_windows(texts, seq_len, max_tokens=0):
    """Independent spelling of the windowing rule: bytes + end-of-text, overlap of one token."""
    stream = []
    for text in texts:
        if text.strip():
            stream += list(text.encode("utf-8")) + [256]
    if max_tokens:
        stream = stream[:max_tokens]
    windows = []
    start = 0
    while start + seq_len + 1 <= len(stream):
        windows.append(stream[start:start + seq_len + 1])
        start += seq_len
    return windows


def _random_texts(count):
    alphabet = "abcdefghij klmnop.\u00e9\u4e2d"
    return ["".join(random.choice(alphabet) for _ in range(random.randrange(0, 40))) for _ in range(count)]


@pytest.mark.parametrize("seq_len", [1, 7, 16])
def test_token_sequences_match_an_independent_reference(seq_len):
    texts = _random_texts(30) + ["   ", ""]
    random.shuffle(texts)
    tokenizer = ByteTokenizer()
    windows = token_sequences(texts, tokenizer, seq_len)
    expected = _reference_windows(texts, seq_len)
    assert windows.dtype == torch.int64 and windows.shape == (len(expected), seq_len + 1)
    assert windows.tolist() == expected
    limited = token_sequences(texts, tokenizer, seq_len, max_tokens=50)
    assert limited.tolist() == _reference_windows(texts, seq_len, max_tokens=50)


def test_token_sequences_bad_arguments():
    with pytest.raises(ValueError, match="seq_len must be an int >= 1, got 0"):
        token_sequences(["abc"], ByteTokenizer(), 0)
    with pytest.raises(ValueError, match="max_tokens must be an int >= 0"):
        token_sequences(["abc"], ByteTokenizer(), 2, max_tokens=-1)
    with pytest.raises(TypeError, match="must yield str, got int"):
        token_sequences([1, 2], ByteTokenizer(), 2)


def test_text_file_dataset_shifts_targets_by_one(tmp_path):
    lines = _random_texts(40)
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    dataset = text_file_dataset(path, ByteTokenizer(), 12)
    with path.open(encoding="utf-8") as handle:
        expected = _reference_windows(list(handle), 12)
    assert len(dataset) == len(expected) > 0
    x, y, index = dataset[len(dataset) - 1]
    assert index == len(dataset) - 1 and x.shape == (12,) and y.shape == (12,)
    assert x.tolist() == expected[-1][:-1] and y.tolist() == expected[-1][1:]
    assert dataset.tokens_per_sample == 12
    with pytest.raises(FileNotFoundError, match="no text file"):
        text_file_dataset(tmp_path / "missing.txt", ByteTokenizer(), 4)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        text_file_dataset(path, ByteTokenizer(), 10**6)


def test_hf_in_memory_dataset_and_streaming_view():
    datasets = pytest.importorskip("datasets")
    texts = _random_texts(25)
    table = datasets.Dataset.from_dict({"text": texts, "id": list(range(len(texts)))})
    dataset = hf_text_dataset(table, ByteTokenizer(), 9)
    expected = _reference_windows(texts, 9)
    assert dataset.inputs.tolist() == [w[:-1] for w in expected]
    assert dataset.targets.tolist() == [w[1:] for w in expected]
    streamed = hf_text_dataset(table.to_iterable_dataset(), ByteTokenizer(), 9)
    assert torch.equal(streamed.inputs, dataset.inputs)
    with pytest.raises(DataError, match="no column 'body'.*data.text_column"):
        hf_text_dataset(table, ByteTokenizer(), 9, text_column="body")


def test_tokenizers_offline():
    byte = load_tokenizer("byte")
    assert byte.encode("h\u00e9") == [104, 195, 169] and byte.vocab_size == 257 and byte.eos_id == 256
    auto = load_tokenizer("auto")  # GPT-2 only when it is in the local cache; never a download
    assert auto.name in ("gpt2", "byte")
    assert all(0 <= t < auto.vocab_size for t in auto.encode("Hello world"))
    if auto.name == "byte":
        assert "auto: the GPT-2 tokenizer is not in the local Hugging Face cache" in auto.description
        with pytest.raises(TokenizerError, match="'gpt2' is not in the local Hugging Face cache.*HF_HUB_OFFLINE.*byte"):
            load_tokenizer("gpt2")
    # any other name is looked up (the cache only, the hub being off): one clear error, never a download
    with pytest.raises(TokenizerError, match="'no-such/tokenizer' is not in the local Hugging Face cache"):
        load_tokenizer("no-such/tokenizer")
    with pytest.raises(TokenizerError, match="name must be a non-empty str"):
        load_tokenizer("")
    assert issubclass(TokenizerError, ValueError)


def test_build_datasets_from_config(tmp_path):
    (tmp_path / "train.txt").write_text("\n".join(_random_texts(60)), encoding="utf-8")
    (tmp_path / "val.txt").write_text("\n".join(_random_texts(20)), encoding="utf-8")
    config = config_from_dict({"data": {"name": "text_files", "tokenizer": "byte", "seq_len": 8,
                                        "text_files": [str(tmp_path / "train.txt")], "val_text_files": [str(tmp_path / "val.txt")]}})
    train, val, test = build_datasets(config.data)
    assert test is None and len(train) > len(val) > 0 and train.inputs.shape[1] == 8
    config = config_from_dict({"model": {"type": "mnist1d_cnn"}, "data": {"name": "mnist1d", "num_samples": 100, "cache_dir": str(tmp_path)}})
    train, val, test = build_datasets(config.data)
    assert (len(train), len(val), len(test)) == (72, 8, 20)


# ------------------------------------------------------------------------------------ data.name: local paths
def _text_config(name, **data):
    return config_from_dict({"data": {"name": name, "tokenizer": "byte", "seq_len": 8, **data}}).data


def _windows(dataset):
    return torch.cat([dataset.inputs, dataset.targets[:, -1:]], dim=1).tolist()


def _write(path, texts):
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    return [line + "\n" for line in texts]


def test_a_local_text_file_trains_and_holds_out_its_last_sequences_as_val(tmp_path):
    lines = _write(tmp_path / "corpus.txt", _random_texts(80))
    expected = _reference_windows(lines, 8)
    train, val, test = build_datasets(_text_config(str(tmp_path / "corpus.txt"), val_fraction=0.25))
    n_val = round(0.25 * len(expected))
    assert test is None and len(val) == n_val and len(train) == len(expected) - n_val
    assert _windows(train) + _windows(val) == expected  # contiguous: val is the tail of the text
    assert train.name == "corpus.txt" and "held out as val" in val.name
    train, val, _ = build_datasets(_text_config(str(tmp_path / "corpus.txt"), val_fraction=0.0))
    assert val is None and _windows(train) == expected
    limited, _, _ = build_datasets(_text_config(str(tmp_path / "corpus.txt"), val_fraction=0.0, max_train_tokens=60))
    assert _windows(limited) == _reference_windows(lines, 8, max_tokens=60)


def test_a_folder_of_text_files_maps_file_names_onto_splits(tmp_path):
    folder = tmp_path / "wikitext-like"
    folder.mkdir()
    train_lines = _write(folder / "wiki.train.raw", _random_texts(60))
    val_lines = _write(folder / "wiki.valid.raw", _random_texts(30))
    test_lines = _write(folder / "test.txt", _random_texts(30))
    (folder / "notes.md").write_text("not a text suffix: ignored")
    (folder / ".hidden.txt").write_text("hidden: ignored " * 20)
    train, val, test = build_datasets(_text_config(str(folder)))
    assert _windows(train) == _reference_windows(train_lines, 8)
    assert _windows(val) == _reference_windows(val_lines, 8)
    assert _windows(test) == _reference_windows(test_lines, 8)
    # files that name no split all train, in sorted order; val is then held out from them
    plain = tmp_path / "plain"
    (plain / "sub").mkdir(parents=True)
    b = _write(plain / "b.txt", _random_texts(40))
    a = _write(plain / "sub" / "a.txt", _random_texts(40))  # sub/a.txt sorts after b.txt
    train, val, test = build_datasets(_text_config(str(plain), val_fraction=0.1))
    assert test is None and _windows(train) + _windows(val) == _reference_windows(b + a, 8)


def test_a_dataset_saved_to_disk_is_read_with_its_splits(tmp_path):
    datasets = pytest.importorskip("datasets")
    train_texts, val_texts = _random_texts(60), _random_texts(30)
    saved = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": train_texts}),
                                  "validation": datasets.Dataset.from_dict({"body": val_texts})})
    saved.save_to_disk(str(tmp_path / "saved"))
    train, val, test = build_datasets(_text_config(str(tmp_path / "saved"), text_column="body"))
    assert test is None
    assert _windows(train) == _reference_windows(train_texts, 8) and _windows(val) == _reference_windows(val_texts, 8)
    with pytest.raises(DataError, match="data.text_column: saved split 'train' has no column 'text'"):
        build_datasets(_text_config(str(tmp_path / "saved")))
    # one Dataset (no splits): it trains, val held out
    datasets.Dataset.from_dict({"text": train_texts}).save_to_disk(str(tmp_path / "single"))
    train, val, _ = build_datasets(_text_config(str(tmp_path / "single"), val_fraction=0.2))
    assert _windows(train) + _windows(val) == _reference_windows(train_texts, 8) and len(val) > 0


def test_local_paths_that_cannot_train_are_one_line_data_errors(tmp_path):
    assert local_data_path("Salesforce/wikitext") is None  # a hub name
    assert local_data_path(str(tmp_path)) == tmp_path
    with pytest.raises(DataNotFoundError, match="data.name: no file or folder at .*missing.txt"):
        build_datasets(_text_config("missing.txt"))
    with pytest.raises(FileNotFoundError):  # still what library callers catch
        build_datasets(_text_config("./nothing/here"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no text files"):
        build_datasets(_text_config(str(tmp_path / "empty")))
    (tmp_path / "only_test").mkdir()
    _write(tmp_path / "only_test" / "test.txt", _random_texts(20))
    with pytest.raises(DataError, match="has test files but none for training"):
        build_datasets(_text_config(str(tmp_path / "only_test")))
    _write(tmp_path / "short.txt", ["ab"])
    with pytest.raises(DataError, match="fewer than seq_len"):
        build_datasets(_text_config(str(tmp_path / "short.txt")))


# ------------------------------------------------------------------------------ data.name: Hugging Face names
def test_a_hub_name_offline_says_it_could_not_be_reached_and_how_to_use_local_text():
    with pytest.raises(DataError) as caught:
        build_datasets(_text_config("wikitext103"))
    message = str(caught.value)
    assert message.startswith("data.name: could not reach the data set 'wikitext' (subset 'wikitext-103-raw-v1')")
    assert "HF_HUB_OFFLINE" in message and "--set data.name=path/to/file.txt" in message and "\n" not in message
    with pytest.raises(DataError, match="could not reach the data set 'someone/corpus'"):
        build_datasets(_text_config("someone/corpus"))


def test_a_hub_name_loads_its_splits_by_name_and_subset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    texts = {"train": _random_texts(50), "dev": _random_texts(20), "test": _random_texts(20), "other": _random_texts(5)}
    calls = []

    def fake_load_dataset(name, subset, *, streaming):
        calls.append((name, subset, streaming))
        tables = {split: datasets.Dataset.from_dict({"text": t}) for split, t in texts.items()}
        return datasets.IterableDatasetDict({k: v.to_iterable_dataset() for k, v in tables.items()}) if streaming \
            else datasets.DatasetDict(tables)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    train, val, test = build_datasets(_text_config("someone/corpus", subset="small"))
    assert calls == [("someone/corpus", "small", False)]  # the hub is off: read the local cache, no streaming
    assert _windows(train) == _reference_windows(texts["train"], 8)
    assert _windows(val) == _reference_windows(texts["dev"], 8) and _windows(test) == _reference_windows(texts["test"], 8)
    assert train.name == "small/train" and val.name == "small/dev"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE")
    streamed, _, _ = build_datasets(_text_config("wikitext103"))
    assert calls[-1] == ("wikitext", "wikitext-103-raw-v1", True)  # online: streamed
    assert torch.equal(streamed.inputs, train.inputs)


def test_tokenisation_progress_shows_on_a_terminal_only(monkeypatch):
    import io
    import sys

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    texts = _random_texts(50)
    quiet = token_sequences(texts, ByteTokenizer(), 8)
    for progress, shown in ((True, True), (False, False)):
        terminal = Terminal()
        with monkeypatch.context() as patch:
            patch.setattr(sys, "stderr", terminal)
            windows = token_sequences(texts, ByteTokenizer(), 8, progress=progress, desc="tokenising demo")
        assert torch.equal(windows, quiet)
        assert ("tokenising demo" in terminal.getvalue()) is shown
