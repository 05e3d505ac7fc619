"""The cost of an exact top-k selection across ranks (`aql.distributed`) on CPU processes with gloo.

    .venv/bin/python -m benchmarks.bench_distributed                   # 2 ranks, 1e6 scores per rank
    .venv/bin/python -m benchmarks.bench_distributed --ranks 2 --per-rank 1000000 --budget 0.2 --repeats 15 --json

Each rank (one torch thread each, gloo over a rendezvous file in a temporary folder, so on one machine
the collectives go through loopback TCP) holds `--per-rank` float32 scores; k = budget * total. Timed,
the median over `--repeats` calls after one warm-up, each preceded by a barrier, the slowest rank's
time (all-reduced max):

- `global_topk_mask`: the selection with the default digits (11, 11, 10): 4 all-reduces of 41 KB in
  all (`aql.distributed.selection_bytes`), 3 histogram reads of the shard, the local `topk_mask`;
- the same with 8-bit digits (5 all-reduces, 8.2 KB) and the kernels' digits (12, 10, 10: 4, 49 KB);
- `SampleOwnership.topk_indices` on a table of all `ranks * per-rank` samples, each rank owning the
  samples i with i mod R == rank (the `stale` strategy's epoch selection: the owned entries, the
  selection, and the selection shared with every rank: the k indices or the ranks' bit masks of their
  owned rows, whichever is smaller, 8 k or about N / 8 bytes received per rank);
- the same on scores with three values only (ties at the threshold span the ranks: the second
  selection over the ties' dataset indices);
- peer: `all_gather` of the scores (4 bytes per score per rank) and `topk_mask` of the concatenation;
- floor: `aql_kernels.topk_mask` of the rank's own shard (no communication);
- latency: one all-reduce of a single int64;
- candidate batches (`--candidates`, C = 64, 640, 4096 by default): `online`'s `select_global` on the
  rank's rows r, r + R, ... of a batch of C candidates (one `all_gather` of ceil(C / R) x 7 float32
  statistics, then the one-process `select` on the gathered batch on every rank), against `select`
  on the whole batch in one process (no communication), which it must equal.

Every selection is checked against `aql_kernels.topk_mask` of the gathered scores before it is timed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import aql_kernels
from aql import distributed


def _timed(function, repeats: int) -> float:
    """Median seconds of `function()` over `repeats` calls after a warm-up; the slowest rank's."""
    function()
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    median = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return float(median)


def _gathered(scores: torch.Tensor, world: int) -> torch.Tensor:
    parts = [torch.empty_like(scores) for _ in range(world)]
    dist.all_gather(parts, scores)
    return torch.cat(parts)


def _candidate_cases(rank: int, world: int, size: int):
    """(select_global on this rank's rows, select in one process, bytes gathered per rank) for `online`
    on a candidate batch of `size`; checks that both select the same rows first."""
    from aql.strategies.online import OnlineSelection
    from aql_kernels import SoftmaxScores

    generator = torch.Generator().manual_seed(size)  # the same batch on every rank
    logits, targets = torch.randn(size, 10, generator=generator), torch.randint(0, 10, (size,), generator=generator)
    scores = aql_kernels.softmax_scores(logits, targets)
    mine = SoftmaxScores(*(None if field is None else field[rank::world].contiguous() for field in scores))
    num_samples = 20 * size
    index = torch.randperm(num_samples, generator=generator)[:size]
    labels = torch.randint(0, 10, (num_samples,), generator=generator)
    shared = OnlineSelection(num_samples, query_budget=0.2, labels=labels, num_classes=10)
    shared.attach_process_group()
    alone = OnlineSelection(num_samples, query_budget=0.2, labels=labels, num_classes=10)
    if not torch.equal(shared.select_global(index, mine)[0], alone.select(index, scores)):
        raise SystemExit(f"rank {rank}: select_global differs from the one-process select for C = {size}")
    return (lambda: shared.select_global(index, mine)), (lambda: alone.select(index, scores)), 7 * 4 * -(-size // world)


def _rank_main(rank: int, world: int, folder: str, per_rank: int, budget: float, repeats: int,
               candidates: tuple[int, ...] = ()) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    generator = torch.Generator().manual_seed(1000 + rank)
    scores = torch.rand(per_rank, generator=generator)
    total = per_rank * world
    k = round(budget * total)
    everything = _gathered(scores, world)
    expected = aql_kernels.topk_mask(everything, k)
    mine = distributed.global_topk_mask(scores, k)
    if not torch.equal(mine, expected[rank * per_rank:(rank + 1) * per_rank]):
        raise SystemExit(f"rank {rank}: global_topk_mask differs from topk_mask of the gathered scores")
    # the table a strategy holds: every sample; this rank holds the interleaved positions i = rank mod world
    table = torch.full((total,), float("nan"))
    table[rank::world] = scores
    ownership = distributed.SampleOwnership(total)
    merged = _gathered(scores, world).view(world, per_rank).t().reshape(-1)  # sample i from rank i mod world
    if not torch.equal(ownership.topk_indices(table, k), aql_kernels.topk_indices(merged, k)):
        raise SystemExit(f"rank {rank}: SampleOwnership.topk_indices differs from topk_indices of the merged table")
    ties = torch.randint(0, 3, (total,), generator=torch.Generator().manual_seed(7)).float()  # the same on every rank
    if not torch.equal(ownership.topk_indices(ties, k), aql_kernels.topk_indices(ties, k)):
        raise SystemExit(f"rank {rank}: SampleOwnership.topk_indices differs on ties")

    cases = {
        "global_topk_mask (11,11,10), the default": lambda: distributed.global_topk_mask(scores, k),
        "global_topk_mask (8,8,8,8)": lambda: distributed.global_topk_mask(scores, k, digit_bits=(8, 8, 8, 8)),
        "global_topk_mask (12,10,10)": lambda: distributed.global_topk_mask(scores, k, digit_bits=(12, 10, 10)),
        "SampleOwnership.topk_indices": lambda: ownership.topk_indices(table, k),
        "SampleOwnership.topk_indices, 3 values (ties span ranks)": lambda: ownership.topk_indices(ties, k),
        "peer: all_gather scores + topk_mask": lambda: aql_kernels.topk_mask(_gathered(scores, world), k),
        "floor: topk_mask of the local shard": lambda: aql_kernels.topk_mask(scores, round(budget * per_rank)),
        "latency: all_reduce of one int64": lambda: dist.all_reduce(torch.zeros(1, dtype=torch.int64)),
    }
    candidate_bytes = {}
    for size in candidates:
        select_global, select_one, payload = _candidate_cases(rank, world, size)
        cases[f"online select_global, C = {size} candidates"] = select_global
        cases[f"floor: online select in one process, C = {size}"] = select_one
        candidate_bytes[f"online select_global, C = {size} candidates"] = payload
    results = {name: _timed(function, repeats) for name, function in cases.items()}
    if rank == 0:
        report = {
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "torch": torch.__version__,
            "ranks": world, "per_rank": per_rank, "k": k, "threads_per_rank": 1, "backend": "gloo",
            "bytes_per_rank": {"global_topk_mask (11,11,10), the default": distributed.selection_bytes(world),
                               "global_topk_mask (8,8,8,8)": distributed.selection_bytes(world, (8, 8, 8, 8)),
                               "global_topk_mask (12,10,10)": distributed.selection_bytes(world, (12, 10, 10)),
                               "SampleOwnership.topk_indices": distributed.selection_bytes(world) + 8 + min(
                                   8 * k, world * -(-(-(-total // world)) // 8)),
                               "peer: all_gather scores + topk_mask": 4 * per_rank, **candidate_bytes},
            "median_ms": {name: 1e3 * seconds for name, seconds in results.items()},
        }
        with open(os.path.join(folder, "report.json"), "w") as handle:
            json.dump(report, handle)
    dist.destroy_process_group()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--per-rank", type=int, default=1_000_000)
    parser.add_argument("--budget", type=float, default=0.2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--candidates", type=int, nargs="*", default=[64, 640, 4096],
                        help="candidate batch sizes for online's select_global (none: skip)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if args.ranks < 2 or args.per_rank < 1 or not 0 < args.budget <= 1 or args.repeats < 1 or any(c < 1 for c in args.candidates):
        parser.error(f"need --ranks >= 2, --per-rank >= 1, 0 < --budget <= 1, --repeats >= 1, --candidates >= 1; got {vars(args)}")
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank_main, args=(args.ranks, folder, args.per_rank, args.budget, args.repeats, tuple(args.candidates)), nprocs=args.ranks, join=True)
        with open(os.path.join(folder, "report.json")) as handle:
            report = json.load(handle)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(f"{report['ranks']} gloo ranks x {report['per_rank']:,} float32 scores, k = {report['k']:,}, 1 thread per rank "
              f"({report['machine']}, torch {report['torch']})")
        for name, ms in report["median_ms"].items():
            sent = report["bytes_per_rank"].get(name)
            print(f"  {name:58s} {ms:9.2f} ms" + (f"   {sent:,} B all-reduced/gathered per rank" if sent else ""))
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
