"""aql.distributed on 2 gloo processes (CPU): the selection across ranks equals one process's selection of
the concatenated scores (ties, NaN, -0.0, empty shards, k = 0 and k = N), sample ownership, the even
split of a plan; and a 2-rank `AQLv2Trainer` run: it completes, is deterministic, resumes exactly, and
matches a 1-rank run with the same global batch.

Each test spawns 2 processes (torch.multiprocessing, gloo over a rendezvous file); a case list runs in
one spawn to pay the start-up once."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import aql_kernels
from aql import distributed
from aql.sampling import SelectionSampler
from aql.strategies import build_strategy

WORLD = 2

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------- spawn
def _worker(rank: int, world: int, folder: str, function, args) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        result = function(rank, world, *args)
        torch.save(result, os.path.join(folder, f"result{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_ranks(tmp_path, function, *args, world: int = WORLD) -> list:
    """`function(rank, world, *args)` on `world` gloo processes; the list of their results."""
    folder = str(tmp_path)
    mp.spawn(_worker, args=(world, folder, function, args), nprocs=world, join=True)
    return [torch.load(os.path.join(folder, f"result{r}.pt"), weights_only=False) for r in range(world)]


# ------------------------------------------------------------------------------------------- selection
def reference_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The first k of a stable descending order with NaN lowest and -0.0 == +0.0 (numpy lexsort, float64)."""
    values = scores.double().numpy()
    nan = np.isnan(values)
    clean = np.where(nan, 0.0, values) + 0.0  # + 0.0 turns -0.0 into +0.0
    order = np.lexsort((np.arange(values.size), -clean, nan))
    mask = np.zeros(values.size, dtype=bool)
    mask[order[:k]] = True
    return torch.from_numpy(mask)


def _select_cases(rank: int, world: int, cases):
    out = []
    for shards, k, valid, digit_bits, index in cases:
        kwargs = {} if digit_bits is None else {"digit_bits": digit_bits}
        mine = None if valid is None else valid[rank]
        where = None if index is None else index[rank]
        out.append(distributed.global_topk_mask(shards[rank], k, valid=mine, index=where, **kwargs))
    errors = []
    for k in ((3, 4)[rank], 10**6):  # different k on the ranks; k above the total
        try:
            distributed.global_topk_mask(torch.zeros(5), k)
        except ValueError as error:
            errors.append(str(error))
    return out, errors


def _adversarial_cases(generator: torch.Generator):
    def split(values, first):
        return [values[:first].contiguous(), values[first:].contiguous()]

    cases = []

    def case(shards, k, valid=None, digit_bits=None, index=None):
        cases.append((shards, k, valid, digit_bits, index))

    normal = torch.randn(1037, generator=generator)
    for k in (0, 1, 517, 1036, 1037):
        case(split(normal, 1000), k)
    # few distinct values: k lands inside a tie group that both ranks hold
    few = torch.randint(0, 4, (301,), generator=generator).float()
    for k in (1, 75, 150, 151, 299):
        case(split(few, 120), k)
    # all equal: pure index order across ranks
    case(split(torch.full((64,), 2.5), 20), 33)
    # NaN, +-0.0, +-inf, subnormals: k inside the zeros and inside the NaNs
    special = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.0, float("nan"), -0.0,
                            0.0, -float("inf"), float("nan"), 3.0, -0.0, 1.0])
    special = special[torch.randperm(special.numel(), generator=generator)]
    for k in range(0, special.numel() + 1):
        case(split(special, 7), k)
    # an empty shard, on either side
    for first in (0, 50):
        case(split(torch.randn(50, generator=generator), first), 25)
    # bfloat16 (ties from rounding) and the kernels' 12/10/10 digits
    half = torch.randn(400, generator=generator).bfloat16()
    case(split(half, 150), 123)
    case(split(normal, 400), 300, digit_bits=(12, 10, 10))
    case(split(few, 100), 200, digit_bits=(16, 16))
    # only some entries valid
    valid = torch.rand(1037, generator=generator) < 0.6
    case(split(normal, 500), 311, valid=split(valid, 500))
    # ties by a global index spread over the ranks in any pattern (dataset indices), NaN ties included
    for values in (few, special.repeat(5)):
        index = torch.randperm(values.numel(), generator=generator) * 3 + 1  # distinct, not contiguous
        for k in (0, 1, values.numel() // 3, values.numel() // 2 + 1, values.numel()):
            case(split(values, values.numel() // 3), k, index=split(index, values.numel() // 3))
    case(split(few, 120), 100, valid=split(valid[:301], 120), index=split(torch.randperm(301, generator=generator), 120))
    return cases


def test_global_selection_equals_one_process_on_the_concatenation(tmp_path):
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    cases = _adversarial_cases(generator)
    results = run_ranks(tmp_path, _select_cases, cases)
    for i, (shards, k, valid, _, index) in enumerate(cases):
        union = torch.cat([results[r][0][i] for r in range(WORLD)])
        scores = torch.cat(shards)
        keep = torch.ones(scores.numel(), dtype=torch.bool) if valid is None else torch.cat(valid)
        # the entries laid out at their global index (rank order when none is given), then one process
        order = torch.arange(scores.numel()) if index is None else torch.sort(torch.cat(index)).indices
        order = order[keep[order]]
        expected = torch.zeros_like(keep)
        expected[order] = reference_mask(scores[order], k)
        if valid is None and index is None:  # the two single-process oracles agree
            torch.testing.assert_close(expected, aql_kernels.topk_mask(scores, k))
        assert union.dtype == torch.bool and union.shape == scores.shape
        assert torch.equal(union, expected), f"case {i}: k={k}, sizes {[s.numel() for s in shards]}"
        assert int(union.sum()) == k
    for errors in (results[0][1], results[1][1]):
        assert "every rank must pass the same k" in errors[0]
        assert "k must be in [0, 10]" in errors[1]


def test_global_selection_in_one_process_is_the_kernel():
    scores = torch.randn(999)
    assert torch.equal(distributed.global_topk_mask(scores, 100), aql_kernels.topk_mask(scores, 100))
    valid = torch.rand(999) < 0.5
    expected = torch.zeros(999, dtype=torch.bool)
    expected[valid] = aql_kernels.topk_mask(scores[valid], 50)
    assert torch.equal(distributed.global_topk_mask(scores, 50, valid=valid), expected)
    ties = torch.randint(0, 3, (999,)).float()
    index = torch.randperm(999)
    expected = torch.zeros(999, dtype=torch.bool)
    expected[index.argsort()] = aql_kernels.topk_mask(ties[index.argsort()], 400)
    assert torch.equal(distributed.global_topk_mask(ties, 400, index=index), expected)
    assert distributed.selection_bytes(2) == 24 + 32 + 8 * 4 * 256


@pytest.mark.parametrize("bad, match", [
    (dict(scores=torch.zeros(3, 2), k=1), "scores must be 1-D"),
    (dict(scores=torch.zeros(3, dtype=torch.int64), k=1), "scores must have dtype"),
    (dict(scores=torch.zeros(3), k=-1), "k must be >= 0"),
    (dict(scores=torch.zeros(3), k=4), r"k must be in \[0, 3\]"),
    (dict(scores=torch.zeros(3), k=1, valid=torch.ones(2, dtype=torch.bool)), "valid must have the shape"),
    (dict(scores=torch.zeros(3), k=1, digit_bits=(8, 8, 8)), "digit_bits must sum to 32"),
])
def test_global_selection_rejects_bad_input(bad, match):
    with pytest.raises((TypeError, ValueError), match=match):
        distributed.global_topk_mask(**bad)


def _ownership(rank: int, world: int, num_samples: int, plans, merged_keys, k):
    ownership = distributed.SampleOwnership(num_samples)
    initially = ownership.held.clone()
    for plan in plans:
        ownership.claim(plan)
    # this rank's table: the merged table where it holds the sample, garbage elsewhere
    garbage = torch.full((num_samples,), 1e9 if rank else float("nan"))
    keys = torch.where(ownership.held, merged_keys, garbage)
    union = distributed.union_of_disjoint_masks(ownership.held)
    return initially, ownership.held.clone(), ownership.topk_indices(keys, k), union


def test_ownership_selects_from_the_latest_writer(tmp_path):
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
    n = 203
    plans = [torch.randperm(n, generator=generator)[:61], torch.randperm(n, generator=generator)[:77]]
    keys = torch.randn(n, generator=generator)
    keys[torch.randperm(n, generator=generator)[:20]] = 0.5  # ties
    results = run_ranks(tmp_path, _ownership, n, plans, keys, 90)
    held = [results[r][1] for r in range(WORLD)]
    assert torch.equal(held[0] ^ held[1], torch.ones(n, dtype=torch.bool))  # every sample held by exactly one rank
    assert torch.equal(results[0][0], torch.arange(n) % 2 == 0)
    # the last plan's positions decide, then the first plan's for the rest, then i mod 2
    expected_holder = torch.arange(n) % 2
    for plan in plans:
        expected_holder[plan] = torch.arange(plan.numel()) % 2
    assert torch.equal(held[1], expected_holder == 1)
    expected = aql_kernels.topk_indices(keys, 90)
    for r in range(WORLD):
        assert torch.equal(results[r][2], expected)
        assert torch.equal(results[r][3], torch.ones(n, dtype=torch.bool))


@pytest.mark.parametrize("total, drop_last", [(0, False), (1, False), (10, False), (11, False), (11, True), (3, True)])
def test_shard_indices_splits_evenly_like_the_sampler(total, drop_last):
    plan = torch.randperm(max(total, 1))[:total]
    shards = [distributed.shard_indices(plan, r, 3, drop_last=drop_last) for r in range(3)]
    per_rank = total // 3 if drop_last else math.ceil(total / 3)
    assert all(s.numel() == per_rank for s in shards)
    interleaved = torch.stack(shards, 1).reshape(-1) if per_rank else torch.empty(0, dtype=torch.int64)
    padded = plan.repeat(3)[:per_rank * 3]  # wrapped around (cut with drop_last)
    assert torch.equal(interleaved, padded)
    strategy = build_strategy_none(max(total, 1))
    if total == strategy.num_samples:
        for r in range(3):
            sampler = SelectionSampler(strategy, num_replicas=3, rank=r, drop_last=drop_last)
            assert list(sampler) == distributed.shard_indices(strategy.epoch_plan(0).indices, r, 3, drop_last=drop_last).tolist()


def build_strategy_none(n: int):
    from aql.strategies.none import AllDataStrategy

    return AllDataStrategy(n, seed=3)


def test_helpers_in_one_process():
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main()
    t = torch.arange(3.0)
    assert distributed.all_reduce_sum(t) is t and torch.equal(t, torch.arange(3.0))
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}
    assert distributed.gather_objects(5) == [5]
    assert distributed.init_from_env(torch.device("cpu")) is False or distributed.world_size() > 1
    _ = build_strategy  # the registry import keeps every strategy registered
