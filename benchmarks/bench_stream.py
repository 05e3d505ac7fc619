"""101M tokens through the streaming selection path in bounded memory: tokens/s and peak RSS.

    .venv/bin/python -m benchmarks.bench_stream                      # 101M tokens (202 MB, generated once)
    .venv/bin/python -m benchmarks.bench_stream --tokens 2000000 --corpus /tmp/small.bin --json

The corpus: `--tokens` uint16 tokens drawn i.i.d. from a Zipf(1.1) distribution over GPT-2's
50,257 ids, written in 1M-token chunks by `aql.tokens.write_token_file` (into `--corpus`, by default
`data_cache/stream_bench/zipf_<tokens>.bin`; reused when it is already there).

The path: `aql.tokens.TokenBlockStream` (shuffled block order, `--block-len` tokens per block) through a
`torch.utils.data.DataLoader` (`--batch-size`, `--workers`), each batch scored and passed to
`aql.strategies.StreamingStrategy.select` (the `StreamingAQL` running threshold at `--budget`, constant
memory). Scores: a cheap deterministic function of the block, not a model: the block's mean unigram
cross-entropy -log p(y) under the generating Zipf distribution, handed to the strategy as the `loss`
field of the candidates' scores (a model's forward would measure the model, not the stream).

Reported: tokens/s over the whole pass (reading, collation, scoring, selection), the kept fraction,
and the process's peak resident set (`VmHWM` from /proc/self/status) before and after the pass; the
increment is what streaming the corpus cost in memory. With `--workers N > 0` the blocks are read in
worker processes, whose peak is `ru_maxrss` of the children (reported too). `--load-whole` reads the
whole file into memory first (the control that shows what the measurement catches).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from aql.strategies import StreamingStrategy
from aql.tokens import TokenBlocks, TokenBlockStream, TokenFile, write_token_file

VOCAB = 50257
ZIPF_EXPONENT = 1.1
GENERATION_CHUNK = 1 << 20


class BlockScores(NamedTuple):
    """What `StreamingStrategy.select` reads of the candidates' scores (its `score` field, `loss`)."""

    loss: torch.Tensor


def memory_kib() -> dict[str, int]:
    """VmHWM (peak resident set) and VmRSS of this process in KiB, from /proc/self/status."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(("VmHWM:", "VmRSS:")):
                name, value = line.split(":")
                out[name] = int(value.split()[0])
    return out


def zipf_probabilities(vocab: int = VOCAB, exponent: float = ZIPF_EXPONENT) -> np.ndarray:
    weights = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** exponent
    return weights / weights.sum()


def generate_corpus(path: Path, tokens: int, *, seed: int = 0, progress: bool = True) -> TokenFile:
    """`tokens` i.i.d. Zipf tokens at `path` (generated and written a chunk at a time)."""
    probabilities = zipf_probabilities()
    rng = np.random.default_rng(seed)

    def chunks():
        for start in range(0, tokens, GENERATION_CHUNK):
            yield rng.choice(VOCAB, size=min(GENERATION_CHUNK, tokens - start), p=probabilities)

    return write_token_file(chunks(), path, "uint16", progress=progress, total=tokens)


def stream(corpus: TokenFile, *, block_len: int, batch_size: int, workers: int, budget: float, seed: int) -> dict:
    """One shuffled pass over the corpus through the streaming selection; counts and seconds."""
    blocks = TokenBlocks(corpus, block_len)
    dataset = TokenBlockStream(blocks, shuffle=True, seed=seed, rank=0, world_size=1)
    strategy = StreamingStrategy(len(blocks), query_budget=budget, seed=seed)
    loss_table = torch.from_numpy(-np.log(zipf_probabilities())).float()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    seen_blocks = kept = tokens = 0
    start = time.perf_counter()
    for x, y, index in loader:
        scores = BlockScores(loss=loss_table[y].mean(dim=1))
        kept += strategy.select(index, scores).numel()
        seen_blocks += index.numel()
        tokens += x.numel()
    seconds = time.perf_counter() - start
    return {"blocks": seen_blocks, "tokens": tokens, "kept_blocks": kept, "kept_fraction": kept / max(1, seen_blocks),
            "seconds": seconds, "tokens_per_s": tokens / seconds, "num_blocks": len(blocks)}


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__, "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(), "commit": commit}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=101_000_000)
    parser.add_argument("--corpus", type=Path, default=None, help="token file (.bin); generated when absent")
    parser.add_argument("--block-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--load-whole", action="store_true", help="control: read the whole file into memory first")
    parser.add_argument("--json", action="store_true", help="print one JSON line only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = args.corpus or Path("data_cache") / "stream_bench" / f"zipf_{args.tokens}.bin"
    generation_s = None
    if not (path.is_file() and TokenFile(path).num_tokens == args.tokens):
        tick = time.perf_counter()
        generate_corpus(path, args.tokens, seed=args.seed, progress=not args.json)
        generation_s = time.perf_counter() - tick
    # warm-up: one small pass over generated tokens allocates what every pass allocates (the
    # selector's histogram, the loader's first batches); the corpus is opened only after the first
    # reading, so that whatever opening or streaming it costs shows in the increment
    warm_tokens = np.random.default_rng(args.seed).integers(0, VOCAB, 4 * args.batch_size * args.block_len + 1)
    stream(TokenFile(warm_tokens), block_len=args.block_len, batch_size=args.batch_size, workers=0, budget=args.budget, seed=args.seed)
    del warm_tokens
    before = memory_kib()
    corpus = TokenFile(path)
    if args.load_whole:
        corpus = TokenFile(np.fromfile(path, dtype=corpus.dtype))
    result = stream(corpus, block_len=args.block_len, batch_size=args.batch_size, workers=args.workers, budget=args.budget,
                    seed=args.seed)
    after = memory_kib()
    result.update({
        "corpus": str(path), "corpus_bytes": path.stat().st_size, "generation_s": generation_s, "block_len": args.block_len,
        "batch_size": args.batch_size, "workers": args.workers, "budget": args.budget, "load_whole": args.load_whole,
        "vmhwm_before_kib": before["VmHWM"], "vmhwm_after_kib": after["VmHWM"],
        "vmhwm_increment_kib": after["VmHWM"] - before["VmHWM"],
        "children_maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss if args.workers else None,
        "machine": machine(),
    })
    if args.json:
        print(json.dumps(result))
    else:
        mib = 1024.0
        print(f"corpus: {result['corpus']} ({result['corpus_bytes'] / 2**20:.1f} MiB, {corpus.num_tokens:,} uint16 tokens"
              + (f", generated in {generation_s:.1f} s" if generation_s is not None else ", reused") + ")")
        print(f"streamed {result['tokens']:,} tokens in {result['blocks']:,} shuffled blocks of {args.block_len} "
              f"(batch {args.batch_size}, workers {args.workers}) through StreamingStrategy at budget {args.budget}: "
              f"kept {result['kept_blocks']:,} ({100 * result['kept_fraction']:.2f}%)")
        print(f"time {result['seconds']:.2f} s: {result['tokens_per_s'] / 1e6:.2f} M tokens/s")
        print(f"peak RSS (VmHWM): {before['VmHWM'] / mib:.1f} MiB before the pass, {after['VmHWM'] / mib:.1f} MiB after: "
              f"+{result['vmhwm_increment_kib'] / mib:.1f} MiB for a {result['corpus_bytes'] / 2**20:.1f} MiB corpus")
        if args.workers:
            print(f"worker processes' peak RSS (ru_maxrss of the children): {result['children_maxrss_kib'] / mib:.1f} MiB")
        print("machine: " + json.dumps(result["machine"]))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
