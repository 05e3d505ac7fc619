"""Tokenised corpora that are never loaded whole: a token file on disk, read a block at a time.

    write_token_file(text_tokens(texts, tokenizer), "corpus.bin", "uint16", progress=True)
    stream = TokenBlockStream(TokenBlocks("corpus.bin", block_len=1024), seed=0)   # IterableDataset
    loader = DataLoader(stream, batch_size=64, num_workers=2)
    for epoch in range(epochs):
        stream.set_epoch(epoch)                  # a fresh shuffle of the block order
        for x, y, index in loader:               # x, y int64 [64, 1024]; index: global block ids
            ...

File formats (a flat array of token ids):
- `<name>.bin`: raw little-endian uint16 or uint32, with a sidecar `<name>.bin.json`
  (`{"format": "aql-tokens", "version": 1, "dtype": "uint16", "num_tokens": N}`), written by
  `write_token_file` (text -> tokens -> file in chunks, so memory stays flat while it writes);
- `<name>.npy`: numpy's own format, 1-D uint16 / uint32 / int32 / int64 (the header gives dtype and
  length; nothing else is read at open).

Blocks. Block i is tokens[i L : i L + L + 1] (L = `block_len`): x = its first L tokens, y = its last L
(the next-token targets); the last token of a block starts the next one, as in
`aql.data.token_sequences`, so a corpus of T tokens holds floor((T - 1) / L) blocks and a short tail is
left out. `TokenBlocks` is the map-style view (item i, `gather(indices)` for whole batches: the
`aql.training` trainer takes it as training data); `TokenBlockStream` the iterable one.

Reads are `os.pread` calls of one block each, not a memory map: the pages of a map count in the
process's resident set until the kernel reclaims them, so one epoch over a memory-mapped 202 MB file
shows as 202 MB more RSS, whereas pread's pages stay in the shared page cache, which the kernel drops
freely. What the process holds is the block being read and the batch being built, whatever the corpus's
size (`benchmarks/bench_stream.py` measures it; `tests/aql/test_tokens.py` bounds it).

Sharding. Each epoch's order is a sequence of positions 0..n-1 mapped to block ids (the identity, or a
seeded permutation); rank r of R takes positions r, r + R, r + 2R, ... and DataLoader worker w of W
within that rank takes every W-th of those, starting at its w-th: every block exactly once per epoch
across all ranks and workers (rank sizes differ by at most one; `drop_remainder=True` leaves out the
last n mod R positions of the order so that every rank yields floor(n / R) blocks, as DDP needs equal
batch counts).

Shuffling in constant memory. The permutation is never materialised: position p maps to block
`FeistelPermutation(n, key)(p)`, a 6-round Feistel network over the smallest even-bit power of two
>= n, with cycle walking (re-encrypting any value >= n until it falls below n) to restrict it to
[0, n) (Black & Rogaway, "Ciphers with arbitrary finite domains", CT-RSA 2002). The keys come from
(seed, epoch), so every rank, worker and restart computes the same order independently, a chunk of
positions at a time.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ._checks import check_bool, check_int

__all__ = ["TOKEN_DTYPES", "TokenFile", "TokenBlocks", "TokenBlockStream", "FeistelPermutation", "write_token_file",
           "text_tokens", "distributed_rank_world"]

#: dtypes a token file may hold (uint16 fits vocabularies up to 65,536, GPT-2's 50,257 included)
TOKEN_DTYPES = ("uint16", "uint32", "int32", "int64")
_HEADER_FORMAT = "aql-tokens"
_HEADER_VERSION = 1
_MASK64 = (1 << 64) - 1


def _header_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


# ------------------------------------------------------------------------------------------- the file
class TokenFile:
    """A flat array of token ids read a range at a time (see the module docstring for the formats).

    source: a path to a `.bin` file with its `.bin.json` header or to a 1-D `.npy` file; or a 1-D numpy
    array / torch tensor of integer tokens held in memory (small corpora, tests).
    `read(start, count)` returns int64 tokens [count] (a fresh array). Picklable: each process opens
    its own file handle on first read (DataLoader workers included).
    """

    def __init__(self, source):
        where = "tokens.TokenFile"
        self._array: np.ndarray | None = None
        self.path: Path | None = None
        if isinstance(source, torch.Tensor):
            source = source.detach().cpu().numpy()
        if isinstance(source, np.ndarray):
            if source.ndim != 1 or source.dtype.kind not in "iu":
                raise ValueError(f"aql.{where}: an in-memory source must be a 1-D integer array, got {source.dtype} {source.shape}")
            self._array = source
            self.dtype = source.dtype
            self.num_tokens = int(source.shape[0])
            self._offset = 0
        elif isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            if not self.path.is_file():
                raise FileNotFoundError(f"aql.{where}: no token file at {self.path}")
            if self.path.suffix == ".npy":
                self.dtype, self.num_tokens, self._offset = _npy_layout(self.path)
            else:
                self.dtype, self.num_tokens = _bin_layout(self.path)
                self._offset = 0
        else:
            raise TypeError(f"aql.{where}: source must be a path, a numpy array or a torch tensor, got {type(source).__name__}")
        self._fd: int | None = None
        self._fd_pid: int | None = None

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"TokenFile({where}, {self.num_tokens:,} tokens, {self.dtype})"

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"], state["_fd_pid"] = None, None  # a worker process opens its own
        return state

    def __del__(self):
        self.close()

    def close(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd_pid == os.getpid():
            os.close(self._fd)
        self._fd, self._fd_pid = None, None

    def _handle(self) -> int:
        if self._fd is None or self._fd_pid != os.getpid():
            self._fd, self._fd_pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        return self._fd

    def read(self, start: int, count: int) -> np.ndarray:
        """int64 tokens[start:start + count]; the range must lie inside the file."""
        if start < 0 or count < 0 or start + count > self.num_tokens:
            raise IndexError(f"aql.tokens.TokenFile.read: range [{start}, {start + count}) is outside the file's "
                             f"[0, {self.num_tokens})")
        if self._array is not None:
            return self._array[start:start + count].astype(np.int64)
        nbytes = count * self.dtype.itemsize
        data = os.pread(self._handle(), nbytes, self._offset + start * self.dtype.itemsize) if hasattr(os, "pread") \
            else self._read_seek(start, nbytes)
        if len(data) != nbytes:
            raise OSError(f"aql.tokens.TokenFile.read: {self.path} ended early ({len(data)} of {nbytes} bytes at token {start})")
        return np.frombuffer(data, dtype=self.dtype.newbyteorder("<") if self.dtype.itemsize > 1 else self.dtype).astype(np.int64)

    def _read_seek(self, start: int, nbytes: int) -> bytes:  # platforms without os.pread
        with open(self.path, "rb") as handle:
            handle.seek(self._offset + start * self.dtype.itemsize)
            return handle.read(nbytes)


def _bin_layout(path: Path) -> tuple[np.dtype, int]:
    header_path = _header_path(path)
    if not header_path.is_file():
        raise FileNotFoundError(f"aql.tokens.TokenFile: {path} has no header {header_path.name} (write token files with "
                                "aql.tokens.write_token_file, or save a 1-D .npy)")
    header = json.loads(header_path.read_text(encoding="utf-8"))
    if header.get("format") != _HEADER_FORMAT or header.get("dtype") not in TOKEN_DTYPES:
        raise ValueError(f"aql.tokens.TokenFile: {header_path} is not an aql token header (format {_HEADER_FORMAT!r}, "
                         f"dtype one of {TOKEN_DTYPES}), got {header!r}")
    dtype = np.dtype(header["dtype"])
    num_tokens = int(header["num_tokens"])
    size = path.stat().st_size
    if size != num_tokens * dtype.itemsize:
        raise ValueError(f"aql.tokens.TokenFile: {path} holds {size} bytes, its header says {num_tokens} {dtype} tokens "
                         f"({num_tokens * dtype.itemsize} bytes)")
    return dtype, num_tokens


def _npy_layout(path: Path) -> tuple[np.dtype, int, int]:
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(f"aql.tokens.TokenFile: {path} is a .npy of format version {version}; 1.0 and 2.0 are read")
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read_header(handle)
        offset = handle.tell()
    if len(shape) != 1 or dtype.name not in TOKEN_DTYPES or dtype.byteorder == ">":
        raise ValueError(f"aql.tokens.TokenFile: {path} must hold a 1-D little-endian array of {', '.join(TOKEN_DTYPES)}, "
                         f"got {dtype.str} {shape}")
    return dtype, int(shape[0]), offset


# ------------------------------------------------------------------------------------------ writing
def write_token_file(tokens: Iterable, path: str | os.PathLike, dtype: str = "uint16", *, chunk_tokens: int = 1 << 20,
                     progress: bool = False, total: int | None = None) -> TokenFile:
    """Streams `tokens` into the token file `path` (`.bin` + `.bin.json` header) and returns it opened.

    tokens: an iterable of ints or of chunks (1-D int arrays / lists / tensors, e.g. `text_tokens`'s
    output), consumed once; at most `chunk_tokens` tokens are buffered, so memory stays flat whatever
    the corpus's size. Every token must fit `dtype` (`uint16`: 0..65535), else ValueError naming the
    first bad value; nothing is left at `path` then (the file is written under a temporary name and
    renamed when complete). `progress=True` shows a tqdm bar in tokens (`total`: the expected count).
    """
    where = "tokens.write_token_file"
    if dtype not in TOKEN_DTYPES:
        raise ValueError(f"aql.{where}: dtype must be one of {TOKEN_DTYPES}, got {dtype!r}")
    check_int(where, "chunk_tokens", chunk_tokens, low=1)
    check_bool(where, "progress", progress)
    path = Path(path)
    if path.suffix == ".npy":
        raise ValueError(f"aql.{where}: path must not end in .npy (this writes the .bin + .json format), got {path}")
    np_dtype = np.dtype(dtype)
    info = np.iinfo(np_dtype)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.tmp{os.getpid()}")
    written = 0
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="tok", unit_scale=True, desc=f"tokens -> {path.name}", disable=not progress, dynamic_ncols=True)
    try:
        with open(temporary, "wb") as handle:
            for chunk in _chunks(tokens, chunk_tokens, where):
                if chunk.size and (chunk.min() < info.min or chunk.max() > info.max):
                    bad = chunk[(chunk < info.min) | (chunk > info.max)][0]
                    raise ValueError(f"aql.{where}: token {int(bad)} (at position {written + int(np.argmax(chunk == bad))}) "
                                     f"does not fit dtype {dtype} [{info.min}, {info.max}]")
                handle.write(chunk.astype(np_dtype.newbyteorder("<"), copy=False).tobytes())
                written += int(chunk.size)
                bar.update(int(chunk.size))
        header = {"format": _HEADER_FORMAT, "version": _HEADER_VERSION, "dtype": dtype, "num_tokens": written}
        header_temporary = temporary.with_name(temporary.name + ".json")
        header_temporary.write_text(json.dumps(header) + "\n", encoding="utf-8")
        os.replace(temporary, path)
        os.replace(header_temporary, _header_path(path))
    finally:
        bar.close()
        for leftover in (temporary, temporary.with_name(temporary.name + ".json")):
            if leftover.exists():
                leftover.unlink()
    return TokenFile(path)


def _chunks(tokens: Iterable, chunk_tokens: int, where: str) -> Iterator[np.ndarray]:
    """int64 chunks of `tokens` (ints are gathered into chunks of `chunk_tokens`)."""
    pending: list[int] = []
    for item in tokens:
        if isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            pending.append(int(item))
            if len(pending) >= chunk_tokens:
                yield np.asarray(pending, dtype=np.int64)
                pending = []
            continue
        if pending:
            yield np.asarray(pending, dtype=np.int64)
            pending = []
        if isinstance(item, torch.Tensor):
            item = item.detach().cpu().numpy()
        chunk = np.asarray(item)
        if chunk.ndim != 1 or (chunk.size and chunk.dtype.kind not in "iu"):
            raise TypeError(f"aql.{where}: tokens must yield ints or 1-D integer chunks, got {chunk.dtype} {chunk.shape}")
        for start in range(0, chunk.size, chunk_tokens):
            yield chunk[start:start + chunk_tokens].astype(np.int64, copy=False)
    if pending:
        yield np.asarray(pending, dtype=np.int64)


def text_tokens(texts: Iterable[str], tokenizer) -> Iterator[np.ndarray]:
    """Each non-blank text of `texts` tokenised (`tokenizer.encode`) and followed by
    `tokenizer.eos_id`, as an int64 chunk: the input of `write_token_file`. `texts` may be a Hugging
    Face streaming dataset's text column, so a corpus goes from the hub to disk without being held."""
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"aql.tokens.text_tokens: texts must yield str, got {type(text).__name__}")
        if not text.strip():
            continue
        ids = tokenizer.encode(text)
        ids.append(tokenizer.eos_id)
        yield np.asarray(ids, dtype=np.int64)


# ----------------------------------------------------------------------------------------- blocks
class TokenBlocks(Dataset):
    """Fixed-length blocks of a token file (see the module docstring), map-style.

    Item i is `(x, y, i)`: int64 [block_len] inputs and next-token targets. `gather(indices)` returns
    x, y int64 [B, block_len] for a CPU index tensor (one read per block), so the trainer
    (`aql.training.AQLv2Trainer`) and the experiments take it as an `IndexedTensorDataset` would be
    taken; `tokens_per_sample` is `block_len`.
    """

    def __init__(self, tokens, block_len: int, *, name: str = "tokens"):
        self.tokens = tokens if isinstance(tokens, TokenFile) else TokenFile(tokens)
        self.block_len = check_int("tokens.TokenBlocks", "block_len", block_len, low=1)
        self.name = name
        self.num_blocks = max(0, (self.tokens.num_tokens - 1) // self.block_len)

    def __len__(self) -> int:
        return self.num_blocks

    @property
    def tokens_per_sample(self) -> int:
        return self.block_len

    def block(self, index: int) -> np.ndarray:
        """int64 [block_len + 1]: the tokens of block `index`."""
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < self.num_blocks:
            raise IndexError(f"aql.tokens.TokenBlocks: index must be an int in [0, {self.num_blocks}), got {index!r}")
        return self.tokens.read(int(index) * self.block_len, self.block_len + 1)

    def __getitem__(self, index: int):
        window = torch.from_numpy(self.block(index))
        return window[:-1], window[1:], int(index)

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(indices, torch.Tensor) or indices.dim() != 1:
            raise TypeError(f"aql.tokens.TokenBlocks.gather: indices must be a 1-D tensor, got {type(indices).__name__}")
        rows = np.empty((indices.shape[0], self.block_len + 1), dtype=np.int64)
        for row, index in enumerate(indices.tolist()):
            rows[row] = self.block(index)
        windows = torch.from_numpy(rows)
        return windows[:, :-1], windows[:, 1:]

    def __repr__(self) -> str:
        return f"TokenBlocks({self.name}, {self.num_blocks:,} blocks of {self.block_len}, {self.tokens!r})"


# ------------------------------------------------------------------------------------- the shuffle
def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a bijective 64-bit hash."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A seeded bijection of [0, n) computed pointwise: `perm(positions)` maps an int array of
    positions to block ids without building the permutation (memory O(len(positions))).

    A `rounds`-round balanced Feistel network on 2h-bit values (h = ceil(bits(n - 1) / 2), so the
    domain 4**h is < 4 n), round function splitmix64(right ^ round key) truncated to h bits, and cycle
    walking for values >= n (fewer than 4 passes expected). `key`: any non-negative int (e.g. from
    the seed and the epoch)."""

    def __init__(self, n: int, key: int, *, rounds: int = 6):
        where = "tokens.FeistelPermutation"
        self.n = check_int(where, "n", n, low=1)
        check_int(where, "key", key, low=0)
        self.rounds = check_int(where, "rounds", rounds, low=1)
        self.half_bits = max(1, math.ceil((n - 1).bit_length() / 2))
        self._mask = np.uint64((1 << self.half_bits) - 1)
        keys = []
        state = key & _MASK64
        for _ in range(rounds):  # splitmix64's stream from the key
            state = (state + 0x9E3779B97F4A7C15) & _MASK64
            keys.append(int(_mix64(np.array([state], dtype=np.uint64))[0]))
        self._keys = np.array(keys, dtype=np.uint64)

    def _encrypt(self, values: np.ndarray) -> np.ndarray:
        h = np.uint64(self.half_bits)
        left, right = values >> h, values & self._mask
        for k in self._keys:
            left, right = right, left ^ (_mix64(right ^ k) & self._mask)
        return (left << h) | right

    def __call__(self, positions) -> np.ndarray:
        """int64 block ids of int `positions` (each in [0, n))."""
        positions = np.asarray(positions)
        if positions.size and (positions.dtype.kind not in "iu" or positions.min() < 0 or positions.max() >= self.n):
            raise ValueError(f"aql.tokens.FeistelPermutation: positions must be ints in [0, {self.n}), got "
                             f"{positions.dtype} in [{positions.min()}, {positions.max()}]")
        out = self._encrypt(positions.astype(np.uint64))
        outside = out >= np.uint64(self.n)
        while outside.any():  # cycle walking: the cycle through a value < n comes back below n
            out[outside] = self._encrypt(out[outside])
            outside = out >= np.uint64(self.n)
        return out.astype(np.int64)


def epoch_key(seed: int, epoch: int) -> int:
    """The permutation key of (seed, epoch)."""
    return (seed * 1_000_003 + epoch) & _MASK64


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of the default torch.distributed process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------- the stream
class TokenBlockStream(IterableDataset):
    """The blocks of `blocks` (a `TokenBlocks`, or a token source with `block_len`) as an
    `IterableDataset` of `(x, y, index)`: int64 [block_len] tensors and the global block id (an int;
    a DataLoader batches it into int64 [B]), so per-sample scores can be keyed by it.

    shuffle: a fresh seeded order each epoch (`FeistelPermutation` of (seed, epoch); `set_epoch`),
    else the file's order. rank / world_size: this process's shard (None: from torch.distributed when
    it is initialised, else 0 / 1). drop_remainder: every rank yields floor(n / world_size) blocks
    (see the module docstring). chunk: positions whose block ids are computed at once.
    Memory: the positions and ids of one chunk (16 bytes each) and the block being read.
    """

    def __init__(self, blocks, block_len: int | None = None, *, shuffle: bool = True, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, drop_remainder: bool = False, chunk: int = 4096):
        where = "tokens.TokenBlockStream"
        if isinstance(blocks, TokenBlocks):
            if block_len is not None and block_len != blocks.block_len:
                raise ValueError(f"aql.{where}: block_len {block_len} differs from the blocks' {blocks.block_len}")
            self.blocks = blocks
        else:
            if block_len is None:
                raise ValueError(f"aql.{where}: block_len is required when blocks is a token source, got None")
            self.blocks = TokenBlocks(blocks, block_len)
        self.shuffle = check_bool(where, "shuffle", shuffle)
        self.seed = check_int(where, "seed", seed, low=0)
        self.drop_remainder = check_bool(where, "drop_remainder", drop_remainder)
        self.chunk = check_int(where, "chunk", chunk, low=1)
        if (rank is None) != (world_size is None):
            raise ValueError(f"aql.{where}: give both rank and world_size or neither, got rank={rank!r}, world_size={world_size!r}")
        if rank is None:
            rank, world_size = distributed_rank_world()
        self.world_size = check_int(where, "world_size", world_size, low=1)
        self.rank = check_int(where, "rank", rank, low=0)
        if self.rank >= self.world_size:
            raise ValueError(f"aql.{where}: rank must be in [0, {self.world_size - 1}], got {rank}")
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose order the next iteration follows (as `DistributedSampler.set_epoch`)."""
        self.epoch = check_int("tokens.TokenBlockStream.set_epoch", "epoch", epoch, low=0)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _positions_in_order(self) -> int:
        n = self.num_blocks
        return (n // self.world_size) * self.world_size if self.drop_remainder else n

    def __len__(self) -> int:
        """Blocks this rank yields per epoch (all its DataLoader workers together)."""
        total = self._positions_in_order()
        return max(0, math.ceil((total - self.rank) / self.world_size))

    def block_ids(self, worker: int = 0, num_workers: int = 1) -> Iterator[np.ndarray]:
        """int64 chunks of the block ids that (this rank, `worker` of `num_workers`) yields this epoch,
        in order."""
        check_int("tokens.TokenBlockStream.block_ids", "num_workers", num_workers, low=1)
        if not 0 <= worker < num_workers:
            raise ValueError(f"aql.tokens.TokenBlockStream.block_ids: worker must be in [0, {num_workers - 1}], got {worker}")
        total = self._positions_in_order()
        stride = self.world_size * num_workers
        first = self.rank + self.world_size * worker
        permutation = FeistelPermutation(self.num_blocks, epoch_key(self.seed, self.epoch)) if self.shuffle and total else None
        for start in range(first, total, stride * self.chunk):
            positions = np.arange(start, min(total, start + stride * self.chunk), stride, dtype=np.int64)
            yield positions if permutation is None else permutation(positions)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for ids in self.block_ids(worker, num_workers):
            for index in ids.tolist():
                window = torch.from_numpy(self.blocks.block(index))
                yield window[:-1], window[1:], index

    def __repr__(self) -> str:
        return (f"TokenBlockStream({self.blocks!r}, shuffle={self.shuffle}, seed={self.seed}, rank={self.rank}/{self.world_size}, "
                f"epoch={self.epoch})")
