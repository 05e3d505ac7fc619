"""aql.tokens: token files written in chunks, blocks read without loading the corpus, the lazy
Feistel shuffle, sharding by rank and DataLoader worker (every block exactly once), and memory that
stays flat as the corpus grows."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from aql.data import ByteTokenizer
from aql.tokens import (
    FeistelPermutation,
    TokenBlocks,
    TokenBlockStream,
    TokenFile,
    text_tokens,
    write_token_file,
)

REPO = Path(__file__).resolve().parents[2]


def _reference_blocks(tokens: np.ndarray, block_len: int) -> np.ndarray:
    """int64 [n, block_len + 1]: windows i * L .. i * L + L (inclusive), built by a plain loop."""
    n = (len(tokens) - 1) // block_len if len(tokens) else 0
    return np.array([[int(tokens[i * block_len + j]) for j in range(block_len + 1)] for i in range(n)],
                    dtype=np.int64).reshape(n, block_len + 1)


# ------------------------------------------------------------------------------------------ writing
def test_write_token_file_streams_ints_and_chunks_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 65536, 700), list(range(5)), torch.tensor([7, 65535, 0]), np.array([], dtype=np.int64)]
    expected = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts] + [np.arange(1000, 1010)])

    def tokens():
        yield from parts
        yield from range(1000, 1010)  # single ints, gathered into chunks

    file = write_token_file(tokens(), tmp_path / "c.bin", "uint16", chunk_tokens=64)
    assert file.num_tokens == expected.size and file.dtype == np.uint16
    assert json.loads((tmp_path / "c.bin.json").read_text()) == {"format": "aql-tokens", "version": 1, "dtype": "uint16",
                                                                "num_tokens": expected.size}
    assert (tmp_path / "c.bin").stat().st_size == 2 * expected.size
    np.testing.assert_array_equal(np.fromfile(tmp_path / "c.bin", dtype="<u2"), expected)
    for start, count in ((0, expected.size), (3, 0), (699, 9), (expected.size - 1, 1)):
        got = file.read(start, count)
        assert got.dtype == np.int64
        np.testing.assert_array_equal(got, expected[start:start + count])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.bin.json"]  # no temporary left


def test_write_token_file_uint32_and_text_tokens(tmp_path):
    texts = ["héllo", "   ", "", "world\n"]
    tokenizer = ByteTokenizer()
    file = write_token_file(text_tokens(texts, tokenizer), tmp_path / "t.bin", "uint32")
    expected = list("héllo".encode()) + [256] + list(b"world\n") + [256]
    np.testing.assert_array_equal(file.read(0, file.num_tokens), expected)
    big = write_token_file([np.array([0, 2**32 - 1])], tmp_path / "u.bin", "uint32")
    np.testing.assert_array_equal(big.read(0, 2), [0, 2**32 - 1])


def test_write_token_file_rejects_bad_input_and_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match=r"token 65536 \(at position 3\) does not fit dtype uint16"):
        write_token_file([np.array([1, 2, 3]), np.array([65536])], tmp_path / "bad.bin", "uint16")
    with pytest.raises(ValueError, match=r"token -1 \(at position 1\)"):
        write_token_file([0, -1], tmp_path / "bad.bin", "uint16")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="dtype must be one of"):
        write_token_file([1], tmp_path / "x.bin", "float32")
    with pytest.raises(ValueError, match="must not end in .npy"):
        write_token_file([1], tmp_path / "x.npy")
    with pytest.raises(TypeError, match="1-D integer chunks"):
        write_token_file([np.array([0.5])], tmp_path / "x.bin")
    with pytest.raises(TypeError, match="chunk_tokens must be an int"):
        write_token_file([1], tmp_path / "x.bin", chunk_tokens=1.5)
    with pytest.raises(TypeError, match="texts must yield str"):
        list(text_tokens([b"bytes"], ByteTokenizer()))


def test_token_file_formats_and_errors(tmp_path):
    tokens = np.random.default_rng(1).integers(0, 2**31 - 1, 333)
    for dtype in ("uint16", "uint32", "int32", "int64"):
        values = tokens % 65536 if dtype == "uint16" else tokens
        np.save(tmp_path / f"a_{dtype}.npy", values.astype(dtype))
        file = TokenFile(tmp_path / f"a_{dtype}.npy")
        assert file.num_tokens == 333 and file.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(file.read(100, 50), values[100:150])
    memory = TokenFile(torch.from_numpy(tokens))
    np.testing.assert_array_equal(memory.read(5, 3), tokens[5:8])
    with pytest.raises(IndexError, match=r"range \[330, 334\) is outside the file's \[0, 333\)"):
        memory.read(330, 4)
    with pytest.raises(IndexError, match="outside"):
        memory.read(-1, 1)
    np.save(tmp_path / "two_d.npy", np.zeros((2, 3), dtype=np.uint16))
    with pytest.raises(ValueError, match="1-D little-endian array"):
        TokenFile(tmp_path / "two_d.npy")
    np.save(tmp_path / "floats.npy", np.zeros(3, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D little-endian array"):
        TokenFile(tmp_path / "floats.npy")
    (tmp_path / "raw.bin").write_bytes(b"\0" * 10)
    with pytest.raises(FileNotFoundError, match="has no header raw.bin.json"):
        TokenFile(tmp_path / "raw.bin")
    (tmp_path / "raw.bin.json").write_text(json.dumps({"format": "aql-tokens", "version": 1, "dtype": "uint16", "num_tokens": 6}))
    with pytest.raises(ValueError, match="holds 10 bytes, its header says 6 uint16 tokens"):
        TokenFile(tmp_path / "raw.bin")
    with pytest.raises(FileNotFoundError, match="no token file"):
        TokenFile(tmp_path / "missing.bin")
    with pytest.raises(ValueError, match="1-D integer array"):
        TokenFile(np.zeros(3, dtype=np.float32))
    with pytest.raises(TypeError, match="source must be a path"):
        TokenFile([1, 2, 3])


# ------------------------------------------------------------------------------------------- blocks
@pytest.mark.parametrize("num_tokens, block_len", [(0, 4), (1, 1), (4, 4), (5, 4), (9, 4), (1000, 7), (1001, 1)])
def test_blocks_match_a_plain_reference(tmp_path, num_tokens, block_len):
    tokens = np.random.default_rng(num_tokens).integers(0, 65536, num_tokens)
    blocks = TokenBlocks(write_token_file([tokens], tmp_path / "c.bin"), block_len)
    reference = _reference_blocks(tokens, block_len)
    assert len(blocks) == reference.shape[0] == max(0, (num_tokens - 1) // block_len)
    assert blocks.tokens_per_sample == block_len
    for i in range(len(blocks)):
        x, y, index = blocks[i]
        assert index == i and x.dtype == y.dtype == torch.int64
        np.testing.assert_array_equal(x.numpy(), reference[i, :-1])
        np.testing.assert_array_equal(y.numpy(), reference[i, 1:])
    if len(blocks):
        order = torch.tensor([len(blocks) - 1, 0, len(blocks) - 1])
        x, y = blocks.gather(order)
        np.testing.assert_array_equal(x.numpy(), reference[order.numpy(), :-1])
        np.testing.assert_array_equal(y.numpy(), reference[order.numpy(), 1:])
    with pytest.raises(IndexError, match=rf"index must be an int in \[0, {len(blocks)}\)"):
        blocks[len(blocks)]
    with pytest.raises(IndexError, match="index must be an int"):
        blocks[-1]


def test_blocks_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="block_len must be >= 1, got 0"):
        TokenBlocks(np.arange(10), 0)
    with pytest.raises(TypeError, match="indices must be a 1-D tensor"):
        TokenBlocks(np.arange(10), 3).gather([0, 1])


# ---------------------------------------------------------------------------------------- the shuffle
def test_feistel_is_a_bijection_for_every_small_size_and_large_ones():
    sizes = list(range(1, 300)) + [511, 512, 513, 1000, 4095, 4096, 4097, 65537]
    for n in sizes:
        for key in (0, 1, 2**40 + 7):
            out = FeistelPermutation(n, key)(np.arange(n))
            assert out.dtype == np.int64
            assert np.array_equal(np.sort(out), np.arange(n)), (n, key)


def test_feistel_is_pointwise_keyed_and_mixes():
    n = 1000
    permutation = FeistelPermutation(n, 12345)
    whole = permutation(np.arange(n))
    pieces = np.concatenate([permutation(np.arange(s, min(n, s + 37))) for s in range(0, n, 37)])
    assert np.array_equal(whole, pieces)  # chunk by chunk = all at once (what the stream relies on)
    assert np.array_equal(whole, FeistelPermutation(n, 12345)(np.arange(n)))  # deterministic
    assert not np.array_equal(whole, FeistelPermutation(n, 12346)(np.arange(n)))
    assert np.mean(whole == np.arange(n)) < 0.02  # not near the identity
    assert abs(np.corrcoef(whole, np.arange(n))[0, 1]) < 0.1
    # the image of position 0 over 1600 keys is uniform on [0, 16): chi-square with 15 dof, p ~ 1e-5 at 45
    counts = np.bincount([int(FeistelPermutation(16, key)(np.array([0]))[0]) for key in range(1600)], minlength=16)
    chi_square = float(((counts - 100.0) ** 2 / 100.0).sum())
    assert chi_square < 45.0, counts
    with pytest.raises(ValueError, match=r"positions must be ints in \[0, 16\)"):
        FeistelPermutation(16, 0)(np.array([16]))
    with pytest.raises(ValueError, match="n must be >= 1"):
        FeistelPermutation(0, 0)


# ----------------------------------------------------------------------------------------- sharding
@pytest.mark.parametrize("shuffle", [True, False])
def test_every_block_exactly_once_for_every_rank_and_worker_count(shuffle):
    for num_blocks in (0, 1, 2, 5, 7, 13, 64):
        tokens = np.arange(num_blocks * 3 + 1) % 65536
        blocks = TokenBlocks(tokens, 3)
        for world in (1, 2, 3):
            for workers in (1, 2, 3):  # DataLoader num_workers 0 is one worker in the main process
                for drop_remainder in (False, True):
                    seen = collections.Counter()
                    for rank in range(world):
                        stream = TokenBlockStream(blocks, shuffle=shuffle, seed=3, rank=rank, world_size=world,
                                                  drop_remainder=drop_remainder, chunk=2)
                        stream.set_epoch(1)
                        ids = [int(i) for w in range(workers) for chunk in stream.block_ids(w, workers) for i in chunk]
                        assert len(ids) == len(stream)
                        if drop_remainder:
                            assert len(ids) == num_blocks // world
                        seen.update(ids)
                    assert all(count == 1 for count in seen.values()), (num_blocks, world, workers)
                    expected = num_blocks - (num_blocks % world if drop_remainder else 0)
                    assert len(seen) == expected and all(0 <= i < num_blocks for i in seen)
                    if not drop_remainder:
                        assert set(seen) == set(range(num_blocks))


@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # 3 workers on 2 cores: fine for 13 blocks
@pytest.mark.parametrize("world", [1, 2, 3])
def test_through_dataloader_workers_no_duplicates_no_gaps(world, one_thread):
    tokens = np.random.default_rng(world).integers(0, 65536, 13 * 5 + 3)
    blocks = TokenBlocks(tokens, 5)
    reference = _reference_blocks(tokens, 5)
    for workers in (0, 1, 2, 3):
        seen = collections.Counter()
        for rank in range(world):
            stream = TokenBlockStream(blocks, seed=11, rank=rank, world_size=world)
            stream.set_epoch(2)
            count = 0
            for x, y, index in DataLoader(stream, batch_size=2, num_workers=workers):
                assert x.shape == y.shape == (index.shape[0], 5) and index.dtype == torch.int64
                np.testing.assert_array_equal(x.numpy(), reference[index.numpy(), :-1])
                np.testing.assert_array_equal(y.numpy(), reference[index.numpy(), 1:])
                seen.update(index.tolist())
                count += index.shape[0]
            assert count == len(stream)
        assert sorted(seen) == list(range(13)) and set(seen.values()) == {1}, (world, workers)


def test_shuffle_is_fresh_per_epoch_and_reproducible():
    blocks = TokenBlocks(np.arange(200 * 2 + 1) % 65536, 2)

    def order(seed, epoch, shuffle=True):
        stream = TokenBlockStream(blocks, shuffle=shuffle, seed=seed, rank=0, world_size=1, chunk=16)
        stream.set_epoch(epoch)
        return [index for _, _, index in stream]

    first = order(0, 0)
    assert sorted(first) == list(range(200))
    assert first == order(0, 0)
    assert first != order(0, 1) and first != order(1, 0)
    assert order(0, 5, shuffle=False) == list(range(200))
    assert sum(a == b for a, b in zip(first, order(0, 1))) < 10  # epochs are not near each other


def test_stream_arguments():
    blocks = TokenBlocks(np.arange(10), 3)
    assert (TokenBlockStream(blocks).rank, TokenBlockStream(blocks).world_size) == (0, 1)  # no process group
    with pytest.raises(ValueError, match="give both rank and world_size or neither"):
        TokenBlockStream(blocks, rank=0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 1\], got 2"):
        TokenBlockStream(blocks, rank=2, world_size=2)
    with pytest.raises(ValueError, match="block_len is required"):
        TokenBlockStream(np.arange(10))
    with pytest.raises(ValueError, match="differs from the blocks' 3"):
        TokenBlockStream(blocks, 4)
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        TokenBlockStream(blocks, shuffle=1)
    with pytest.raises(ValueError, match="epoch must be >= 0"):
        TokenBlockStream(blocks).set_epoch(-1)
    with pytest.raises(ValueError, match=r"worker must be in \[0, 1\]"):
        next(TokenBlockStream(blocks).block_ids(2, 2))


# ------------------------------------------------------------------------------------ flat memory
# The bound: streaming an 8M-token corpus (16 MiB as uint16, 64 MiB as int64) raises the process's
# peak RSS by at most MEMORY_BOUND_KIB more than streaming a 2M-token one (4 MiB on disk) does. A
# dataset that held the corpus would grow by >= 12 MiB (the uint16 difference); the control run that
# loads the 8M-token file whole shows the measurement catches that.
MEMORY_BOUND_KIB = 4 * 1024


def _stream_peak(corpus: Path, *extra: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_stream", "--corpus", str(corpus), "--json", "--block-len", "256",
                          "--tokens", str(TokenFile(corpus).num_tokens), *extra],
                         cwd=REPO, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="VmHWM is read from /proc/self/status (Linux)")
def test_memory_stays_flat_as_the_corpus_grows(tmp_path):
    """Peak RSS increment of one streamed, selected pass: 8M tokens minus 2M tokens < 4 MiB."""
    rng = np.random.default_rng(0)
    paths = {}
    for tokens in (2_000_000, 8_000_000):
        paths[tokens] = tmp_path / f"c{tokens}.bin"
        chunks = (rng.integers(0, 50257, min(1 << 20, tokens - start)) for start in range(0, tokens, 1 << 20))
        write_token_file(chunks, paths[tokens])
    small, large = _stream_peak(paths[2_000_000]), _stream_peak(paths[8_000_000])
    assert small["blocks"] == (2_000_000 - 1) // 256 and large["blocks"] == (8_000_000 - 1) // 256
    assert 0.19 < large["kept_fraction"] < 0.21
    growth = large["vmhwm_increment_kib"] - small["vmhwm_increment_kib"]
    assert growth < MEMORY_BOUND_KIB, (small, large)
    control = _stream_peak(paths[8_000_000], "--load-whole")
    assert control["vmhwm_increment_kib"] - small["vmhwm_increment_kib"] > 3 * MEMORY_BOUND_KIB, control
