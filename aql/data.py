"""Datasets for the trainer. Every dataset returns `(x, y, index)` so that per-sample scores can be
written back to the sample they belong to (`aql.selection.ScoreStore`).

- MNIST-1D, generated locally with the `mnist1d` package (`make_dataset`, never its downloading
  `get_dataset`) and cached as an .npz under a cache directory.
- Text (`data.name`): any Hugging Face `datasets` name (`wikitext103` is wikitext-103-raw-v1), streamed
  from the hub or, when the hub is switched off (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE), read from the
  local cache; a local path: a text file, a folder of text files (files whose names say train, valid or
  test become those splits) or a dataset saved with `save_to_disk`; or the `text_files` lists. A source
  without a validation split holds out the last `val_fraction` of its training sequences.
  Tokenised by `load_tokenizer` (`byte`, `auto`, or any Hugging Face tokenizer name or folder) and cut
  into fixed-length sequences (x = tokens[:-1], y = tokens[1:]).

What cannot be loaded raises `aql.errors.DataError` / `TokenizerError` with a one-line message saying
what to do instead (the command line prints it without a traceback).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .errors import DataError, DataNotFoundError, MissingExtraError, TokenizerError, require

__all__ = [
    "IndexedTensorDataset",
    "ByteTokenizer",
    "load_tokenizer",
    "hub_offline",
    "local_data_path",
    "text_splits",
    "TEXT_SUFFIXES",
    "mnist1d_datasets",
    "token_sequences",
    "sequence_dataset",
    "text_file_dataset",
    "hf_text_dataset",
    "wikitext103_dataset",
    "build_datasets",
]


class IndexedTensorDataset(Dataset):
    """Inputs and targets held as tensors; item i is `(inputs[i], targets[i], i)`.

    `gather(indices)` returns whole batches by one index operation (the trainer uses it instead of a
    per-sample DataLoader, which on MNIST-1D sized inputs costs more than the model).
    `ignore_index` marks target positions that carry no loss (text padding); `tokens_per_sample` is the
    number of target positions per sample (1 for classification, seq_len for text).
    """

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, name: str = "data"):
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise TypeError(f"aql.data.IndexedTensorDataset: inputs and targets must be tensors, got {type(inputs).__name__}, {type(targets).__name__}")
        if inputs.shape[0] != targets.shape[0]:
            raise ValueError(f"aql.data.IndexedTensorDataset: inputs and targets must have the same length, got {inputs.shape[0]} and {targets.shape[0]}")
        self.inputs = inputs
        self.targets = targets
        self.ignore_index = ignore_index
        self.name = name

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int):
        return self.inputs[index], self.targets[index], index

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[indices], self.targets[indices]

    @property
    def tokens_per_sample(self) -> int:
        return int(np.prod(self.targets.shape[1:])) if self.targets.dim() > 1 else 1

    def __repr__(self) -> str:
        return f"IndexedTensorDataset({self.name}, n={len(self)}, x={tuple(self.inputs.shape[1:])}, y={tuple(self.targets.shape[1:])})"


# ----------------------------------------------------------------------------------------------- MNIST-1D
def _mnist1d_arrays(num_samples: int, train_split: float, seed: int, cache_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """Generates (or reads from the cache) the MNIST-1D arrays x, y, x_test, y_test."""
    require("mnist1d", "data", "data.name: mnist1d")
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args(as_dict=True)
    args.update(num_samples=int(num_samples), train_split=float(train_split), seed=int(seed))
    args.pop("url", None)  # only the download path uses it
    key = hashlib.sha256(json.dumps(args, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"mnist1d_{num_samples}_{key}.npz"
    if cache.is_file():
        with np.load(cache) as stored:
            return {name: stored[name] for name in ("x", "y", "x_test", "y_test")}
    # make_dataset reseeds the global numpy / python generators; keep the caller's streams intact.
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        from mnist1d.utils import ObjectView

        arrays = make_dataset(ObjectView(dict(args)))
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    out = {name: np.asarray(arrays[name]) for name in ("x", "y", "x_test", "y_test")}
    cache.parent.mkdir(parents=True, exist_ok=True)
    temporary = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(temporary, **out)
    os.replace(temporary, cache)
    return out


def mnist1d_datasets(num_samples: int = 10000, *, train_split: float = 0.8, val_fraction: float = 0.1, seed: int = 42,
                     cache_dir: str | os.PathLike = "data_cache") -> tuple[IndexedTensorDataset, IndexedTensorDataset | None, IndexedTensorDataset]:
    """MNIST-1D as (train, val, test): x float32 [n, 40], y int64 [n].

    `num_samples` is split into train and test by `train_split`; `val_fraction` of the train part is
    held out as val (None when 0). Generated by `mnist1d.data.make_dataset` (no network), cached.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 20:
        raise ValueError(f"aql.data.mnist1d_datasets: num_samples must be an int >= 20, got {num_samples!r}")
    if not 0.0 < train_split < 1.0:
        raise ValueError(f"aql.data.mnist1d_datasets: train_split must be in (0, 1), got {train_split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"aql.data.mnist1d_datasets: val_fraction must be in [0, 1), got {val_fraction!r}")
    arrays = _mnist1d_arrays(num_samples, train_split, seed, cache_dir)
    x = torch.from_numpy(arrays["x"]).float()
    y = torch.from_numpy(arrays["y"]).long()
    n_val = int(round(val_fraction * x.shape[0]))
    train = IndexedTensorDataset(x[n_val:].contiguous(), y[n_val:].contiguous(), name="mnist1d/train")
    val = IndexedTensorDataset(x[:n_val].contiguous(), y[:n_val].contiguous(), name="mnist1d/val") if n_val else None
    test = IndexedTensorDataset(torch.from_numpy(arrays["x_test"]).float(), torch.from_numpy(arrays["y_test"]).long(), name="mnist1d/test")
    return train, val, test


# --------------------------------------------------------------------------------------------------- text
_TRUE = ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off for this process (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE
    or HF_DATASETS_OFFLINE set to 1 / true / yes / on), read at each call."""
    return any(os.environ.get(key, "").strip().lower() in _TRUE for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"))


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, end-of-text 256: works everywhere, vocabulary 257."""

    name = "byte"
    vocab_size = 257
    eos_id = 256

    def __init__(self, description: str = "UTF-8 bytes"):
        self.description = description

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class _HFTokenizer:
    """A `transformers` tokenizer behind the small interface the data code uses (name, vocab_size,
    eos_id, encode). eos_id is the end-of-text token (else the separator token; None: documents are
    concatenated without one)."""

    def __init__(self, tokenizer, name: str, where: str):
        self._tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        self.description = f"{type(tokenizer).__name__} from {where}"

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False)


def _hf_tokenizer(name: str, *, allow_download: bool):
    """`AutoTokenizer` by name or folder: the local cache (or folder) first; the hub only when
    allow_download and the hub is not switched off. Raises TokenizerError (one line)."""
    AutoTokenizer = require("transformers", "data", f"data.tokenizer: {name!r} (or use data.tokenizer=byte)").AutoTokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=True)
        where = "the folder " + name if Path(name).is_dir() else "the local Hugging Face cache"
    except Exception as local_error:  # OSError when not cached; ValueError for a folder that holds no tokenizer
        if not allow_download or hub_offline() or Path(name).is_dir():
            reason = "the hub is switched off by HF_HUB_OFFLINE" if allow_download and hub_offline() else _first_line(local_error)
            raise TokenizerError(f"data.tokenizer: {name!r} is not in the local Hugging Face cache ({reason}); run once with "
                                 "network to cache it, point it at a tokenizer folder (save_pretrained), or use "
                                 "data.tokenizer=byte") from None
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except Exception as error:
            raise TokenizerError(f"data.tokenizer: {name!r} could not be loaded from the Hugging Face hub nor the local cache "
                                 f"({_first_line(error)}); use a tokenizer folder (save_pretrained) or data.tokenizer=byte") from None
        where = "the Hugging Face hub"
    tokenizer.model_max_length = int(1e30)  # we cut sequences ourselves; silence the length warning
    return _HFTokenizer(tokenizer, name, where)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def load_tokenizer(name: str = "auto"):
    """A tokenizer with `name`, `vocab_size`, `eos_id`, `encode(text)` and a `description` (what was
    loaded and from where).

    - `byte`: `ByteTokenizer` (vocabulary 257), needs nothing;
    - `auto`: GPT-2 when it loads from the local Hugging Face cache (nothing downloads), else bytes (the
      description says why);
    - any other name: a Hugging Face tokenizer name (`gpt2`, `EleutherAI/gpt-neox-20b`, ...) or a folder
      written by `save_pretrained`: the local cache first, then the hub unless it is switched off
      (HF_HUB_OFFLINE=1). Raises `aql.errors.TokenizerError` (one line) when it cannot be loaded.
    """
    if not isinstance(name, str) or not name.strip():
        raise TokenizerError(f"aql.data.load_tokenizer: name must be a non-empty str (auto, byte or a Hugging Face tokenizer "
                             f"name or folder), got {name!r}")
    if name == "byte":
        return ByteTokenizer()
    if name == "auto":
        try:
            return _hf_tokenizer("gpt2", allow_download=False)
        except (TokenizerError, MissingExtraError):
            return ByteTokenizer("UTF-8 bytes (auto: the GPT-2 tokenizer is not in the local Hugging Face cache)")
    return _hf_tokenizer(name, allow_download=True)


def _progress(progress: bool, **kwargs):
    """A tqdm bar when progress is on and stderr is a terminal (tqdm's disable=None), else a disabled one."""
    from tqdm.auto import tqdm

    return tqdm(disable=None if progress else True, dynamic_ncols=True, leave=False, **kwargs)


def token_sequences(texts: Iterable[str], tokenizer, seq_len: int, *, max_tokens: int = 0, progress: bool = False,
                    desc: str = "tokenising") -> torch.Tensor:
    """Tokenises `texts` (end-of-text between documents), concatenates them and cuts windows of
    seq_len + 1 tokens (the last token of one window starts the next); int64 [n, seq_len + 1].
    Stops reading once max_tokens tokens are in (0 = read everything); a short tail is dropped.
    progress: a tqdm bar of the tokens read (on a terminal only), labelled `desc`."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"aql.data.token_sequences: seq_len must be an int >= 1, got {seq_len!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 0:
        raise ValueError(f"aql.data.token_sequences: max_tokens must be an int >= 0, got {max_tokens!r}")
    eos = getattr(tokenizer, "eos_id", None)
    buffer: list[int] = []
    with _progress(progress, total=max_tokens or None, desc=desc, unit="tok", unit_scale=True) as bar:
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"aql.data.token_sequences: texts must yield str, got {type(text).__name__}")
            if not text.strip():
                continue
            before = len(buffer)
            buffer.extend(tokenizer.encode(text))
            if eos is not None:
                buffer.append(eos)
            if max_tokens and len(buffer) >= max_tokens:
                del buffer[max_tokens:]
                bar.update(len(buffer) - before)
                break
            bar.update(len(buffer) - before)
    n = (len(buffer) - 1) // seq_len if buffer else 0
    if n < 1:
        return torch.empty(0, seq_len + 1, dtype=torch.long)
    tokens = torch.tensor(buffer[: n * seq_len + 1], dtype=torch.long)
    return tokens.unfold(0, seq_len + 1, seq_len).contiguous()


def sequence_dataset(texts: Iterable[str], tokenizer, seq_len: int, *, max_tokens: int = 0, name: str = "text",
                     progress: bool = False) -> IndexedTensorDataset:
    """`(x, y, i)` with x = window[:-1], y = window[1:], both int64 [seq_len]. Raises DataError when the
    texts hold fewer than seq_len + 1 tokens."""
    windows = token_sequences(texts, tokenizer, seq_len, max_tokens=max_tokens, progress=progress, desc=f"tokenising {name}")
    if windows.shape[0] == 0:
        raise DataError(f"aql.data.sequence_dataset: {name} holds fewer than seq_len + 1 = {seq_len + 1} tokens")
    return IndexedTensorDataset(windows[:, :-1].contiguous(), windows[:, 1:].contiguous(), name=name)


def _read_lines(paths: Iterable[str | os.PathLike]) -> Iterator[str]:
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise DataNotFoundError(f"aql.data.text_file_dataset: no text file at {path}")
        with path.open("r", encoding="utf-8", errors="replace") as handle:
            yield from handle


def text_file_dataset(paths, tokenizer, seq_len: int, *, max_tokens: int = 0, name: str = "text_files",
                      progress: bool = False) -> IndexedTensorDataset:
    """Local UTF-8 text files, line by line, as fixed-length token sequences."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    return sequence_dataset(_read_lines(paths), tokenizer, seq_len, max_tokens=max_tokens, name=name, progress=progress)


def hf_text_dataset(dataset, tokenizer, seq_len: int, *, text_column: str = "text", max_tokens: int = 0, name: str = "hf",
                    progress: bool = False) -> IndexedTensorDataset:
    """Any Hugging Face `datasets.Dataset` / `IterableDataset` (streaming) with a text column."""
    def texts():
        for row in dataset:
            if text_column not in row:
                raise DataError(f"aql.data.hf_text_dataset: {name}: rows have no column {text_column!r} (columns: {', '.join(row)}); "
                                "set data.text_column")
            yield row[text_column]

    return sequence_dataset(texts(), tokenizer, seq_len, max_tokens=max_tokens, name=name, progress=progress)


#: file name parts that put a file of a text folder, or a data set's split, into train / val / test
_SPLIT_NAMES = {"train": ("train", "training"), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
#: the files of a text folder that are read (`wikitext-103-raw` ships .raw files)
TEXT_SUFFIXES = (".txt", ".text", ".raw")
_LOCAL_HINT = ("point data.name at local text: --set data.name=path/to/file.txt (a text file, a folder of .txt files, "
               "or a dataset saved with save_to_disk)")


def _split_of(name: str) -> str | None:
    parts = set(re.split(r"[^a-z0-9]+", name.lower()))
    for split, names in _SPLIT_NAMES.items():
        if parts.intersection(names):
            return split
    return None


def local_data_path(name: str) -> Path | None:
    """The local file or folder that `data.name` names, or None when it names a Hugging Face data set.
    A name that exists on disk is a path; so is one that starts with /, ., ~ or ends in a text suffix,
    and then a missing file is an `aql.errors.DataNotFoundError`."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if name.startswith(("/", ".", "~")) or path.suffix.lower() in TEXT_SUFFIXES:
        raise DataNotFoundError(f"data.name: no file or folder at {path.resolve()}")
    return None


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _local_splits(path: Path, text_column: str) -> dict[str, tuple[str, Callable[[], Iterable[str]]]]:
    """split -> (label, texts) of a text file, a folder of text files or a saved dataset."""
    if path.is_file():
        return {"train": (path.name, lambda: _read_lines([path]))}
    if _is_saved_dataset(path):
        load_from_disk = require("datasets", "data", f"data.name: {path} (a saved dataset)").load_from_disk
        try:
            saved = load_from_disk(str(path))
        except Exception as error:
            raise DataError(f"data.name: {path} could not be read as a saved dataset ({_first_line(error)})") from None
        tables = dict(saved) if hasattr(saved, "keys") else {"train": saved}
        return _hf_splits(tables, text_column, path.name)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(f"data.name: the folder {path} holds no text files ({', '.join(TEXT_SUFFIXES)}) and is not a saved dataset")
    grouped: dict[str, list[Path]] = {}
    for file in files:  # a file naming no split trains
        grouped.setdefault(_split_of(file.name) or "train", []).append(file)
    if "train" not in grouped:
        raise DataError(f"data.name: the folder {path} has {', '.join(grouped)} files but none for training (name one "
                        "train.txt, or give the folder files that name no split)")
    return {split: (f"{path.name}/{split}", lambda chosen=chosen: _read_lines(chosen)) for split, chosen in grouped.items()}


def _hf_splits(tables: dict, text_column: str, label: str) -> dict[str, tuple[str, Callable[[], Iterable[str]]]]:
    """split -> (label, texts) of a Hugging Face data set's splits, its names mapped onto train / val / test;
    a data set of one split trains on it, whatever its name."""
    def texts(table, split):
        def rows():
            for row in table:
                if text_column not in row:
                    raise DataError(f"data.text_column: {label} split {split!r} has no column {text_column!r} (columns: "
                                    f"{', '.join(row)})")
                yield row[text_column]
        return rows

    out: dict[str, tuple[str, Callable[[], Iterable[str]]]] = {}
    for split, table in tables.items():
        ours = _split_of(split) or ("train" if len(tables) == 1 else None)
        if ours is not None and ours not in out:
            out[ours] = (f"{label}/{split}", texts(table, split))
    if "train" not in out:
        raise DataError(f"data.name: {label} has no training split (its splits: {', '.join(tables)})")
    return out


def _hub_splits(name: str, subset: str | None, text_column: str) -> dict[str, tuple[str, Callable[[], Iterable[str]]]]:
    """A Hugging Face data set's splits: streamed from the hub, or read from the local cache when the hub
    is switched off. Raises DataError (one line, with how to use local text) when it cannot be loaded."""
    what = f"{name!r}" + (f" (subset {subset!r})" if subset else "")
    load_dataset = require("datasets", "data", f"data.name: {what} (or {_LOCAL_HINT})").load_dataset
    offline = hub_offline()
    try:
        tables = load_dataset(name, subset, streaming=not offline)
    except ConnectionError as error:
        where = "the hub is switched off by HF_HUB_OFFLINE / HF_DATASETS_OFFLINE" if offline else f"no network? {_first_line(error)}"
        raise DataError(f"data.name: could not reach the data set {what} on the Hugging Face hub ({where}) and it is not in "
                        f"the local cache; {_LOCAL_HINT}") from None
    except Exception as error:  # DatasetNotFoundError, a wrong subset (ValueError), a broken cache, ...
        raise DataError(f"data.name: the data set {what} could not be loaded ({_first_line(error)}); check data.name and "
                        f"data.subset, or {_LOCAL_HINT}") from None
    label = subset or name.rstrip("/").rsplit("/", 1)[-1]
    return _hf_splits(dict(tables), text_column, label)


def _hold_out(train: IndexedTensorDataset, fraction: float) -> tuple[IndexedTensorDataset, IndexedTensorDataset | None]:
    """The last `fraction` of the sequences as val (contiguous text, so no sequence of val overlaps train's)."""
    n_val = min(int(round(fraction * len(train))), len(train) - 1)
    if n_val < 1:
        return train, None
    cut = len(train) - n_val
    kept = IndexedTensorDataset(train.inputs[:cut], train.targets[:cut], ignore_index=train.ignore_index, name=train.name)
    val = IndexedTensorDataset(train.inputs[cut:], train.targets[cut:], ignore_index=train.ignore_index,
                               name=f"{train.name} (last {fraction:.0%} held out as val)")
    return kept, val


def wikitext103_dataset(split: str, tokenizer, seq_len: int, *, max_tokens: int = 0, progress: bool = False) -> IndexedTensorDataset:
    """WikiText-103 (raw) from the Hugging Face hub (the local cache when the hub is switched off), the
    first max_tokens tokens of `split`."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"aql.data.wikitext103_dataset: split must be train, validation or test, got {split!r}")
    splits = _hub_splits("wikitext", "wikitext-103-raw-v1", "text")
    label, texts = splits[_split_of(split)]
    return sequence_dataset(texts(), tokenizer, seq_len, max_tokens=max_tokens, name=label, progress=progress)


def text_splits(data_config) -> dict[str, tuple[str, Callable[[], Iterable[str]]]]:
    """The text source of a `DataConfig` as split ("train", "val", "test") -> (label, a function returning
    its texts); nothing is read or tokenised yet. `text_files`, a local path, `wikitext103` or a Hugging
    Face data set name (see `DataConfig.name`). Raises DataError / DataNotFoundError (one line)."""
    name = data_config.name
    if name == "text_files":
        lists = {"train": data_config.text_files, "val": data_config.val_text_files, "test": data_config.test_text_files}
        return {split: (f"text_files/{split}", lambda files=files: _read_lines(files)) for split, files in lists.items() if files}
    path = local_data_path(name)
    if path is not None:
        return _local_splits(path, data_config.text_column)
    if name == "wikitext103":
        return _hub_splits("wikitext", "wikitext-103-raw-v1", "text")
    return _hub_splits(name, data_config.subset, data_config.text_column)


def build_datasets(data_config, *, tokenizer=None, progress: bool = False):
    """(train, val, test) for a `DataConfig`; val / test may be None (a source without those splits:
    val is then the last `val_fraction` of the training sequences, test is None). Text is tokenised
    with `tokenizer` (default: `load_tokenizer(data_config.tokenizer)`), the first max_train_tokens
    of train and max_eval_tokens of val and test; progress: tqdm bars on a terminal."""
    if data_config.name == "mnist1d":
        return mnist1d_datasets(data_config.num_samples, train_split=data_config.train_split, val_fraction=data_config.val_fraction,
                                seed=data_config.data_seed, cache_dir=data_config.cache_dir)
    splits = text_splits(data_config)
    tokenizer = tokenizer or load_tokenizer(data_config.tokenizer)
    seq_len = data_config.seq_len

    def tokenised(split: str, max_tokens: int):
        if split not in splits:
            return None
        label, texts = splits[split]
        return sequence_dataset(texts(), tokenizer, seq_len, max_tokens=max_tokens, name=label, progress=progress)

    train = tokenised("train", data_config.max_train_tokens)
    val = tokenised("val", data_config.max_eval_tokens)
    if val is None and data_config.name != "text_files":
        train, val = _hold_out(train, data_config.val_fraction)
    return train, val, tokenised("test", data_config.max_eval_tokens)
