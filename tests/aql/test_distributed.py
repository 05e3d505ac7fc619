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
    case(split(special.repeat(3), 20), 30, digit_bits=(8, 8, 8, 8))
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


def _sampler(rank: int, world: int):
    """A plain loop's path: a strategy attached to the group, its plan through SelectionSampler."""
    from aql.strategies.stale import StaleStrategy

    strategy = StaleStrategy(101, query_budget=0.5, exploration=0.2, seed=4)
    strategy.attach_process_group()
    sampler = SelectionSampler(strategy, num_replicas=world, rank=rank)
    sampler.set_epoch(0)
    drawn = list(sampler)
    try:
        SelectionSampler(strategy, num_replicas=world, rank=1 - rank).__len__()
        mismatch = None
    except ValueError as error:
        mismatch = str(error)
    return strategy.epoch_plan(0).indices.clone(), drawn, strategy.sharding.losers.clone(), mismatch


def _selection_worker(rank: int, world: int, cases, ownership_inputs):
    return _select_cases(rank, world, cases), _ownership(rank, world, *ownership_inputs), _sampler(rank, world)


@pytest.fixture(scope="module")
def selection_run(tmp_path_factory):
    """One 2-rank spawn for the selection and ownership tests: (cases, ownership inputs, per-rank results);
    fresh inputs each run, the seed in every failure message."""
    seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    cases = _adversarial_cases(generator)
    n = 203
    plans = [torch.randperm(n, generator=generator)[:61], torch.randperm(n, generator=generator)[:77]]
    keys = torch.randn(n, generator=generator)
    keys[torch.randperm(n, generator=generator)[:20]] = 0.5  # ties
    ownership_inputs = (n, plans, keys, 90)
    results = run_ranks(tmp_path_factory.mktemp("selection"), _selection_worker, cases, ownership_inputs)
    return cases, ownership_inputs, results, seed


def test_global_selection_equals_one_process_on_the_concatenation(selection_run):
    cases, _, both, seed = selection_run
    results = [both[r][0] for r in range(WORLD)]
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
        assert torch.equal(union, expected), f"seed {seed}, case {i}: k={k}, sizes {[s.numel() for s in shards]}"
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
    assert torch.equal(distributed.global_topk_indices(ties, 400, index=index), torch.nonzero(expected).squeeze(1))
    assert distributed.selection_bytes(2) == 8 + 24 * 2 + 8 * (2048 + 2048 + 1024)


def test_under_prefix_keeps_exactly_the_keys_under_the_prefix():
    seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    bits = torch.randint(-2**31, 2**31 - 1, (4000,), generator=generator, dtype=torch.int64).to(torch.int32)
    special = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf"), 1e-45, -1e-45, 3.4e38, -3.4e38, 1.0, -1.0])
    values = torch.cat([bits.view(torch.float32), special, torch.randn(500, generator=generator)])
    keys = aql_kernels.order_keys(values)
    for prefix_bits in (1, 2, 9, 11, 12):
        prefixes = set((keys >> (32 - prefix_bits)).tolist()) | {0, (1 << prefix_bits) - 1, (0x7FFFFFFF >> (32 - prefix_bits))}
        for prefix in prefixes:
            expected = values[(keys >> (32 - prefix_bits)) == prefix]
            got = distributed.under_prefix(values, prefix, prefix_bits)
            assert torch.equal(aql_kernels.order_keys(got), aql_kernels.order_keys(expected)), (seed, prefix_bits, prefix)
    with pytest.raises(ValueError, match="prefix_bits in"):
        distributed.under_prefix(values, 4, 2)
    half = torch.randn(300, generator=generator).bfloat16()
    expected = half.float()[(aql_kernels.order_keys(half) >> 21) == 0x7F8 >> 0]
    assert torch.equal(distributed.under_prefix(half, 0x7F8, 11), expected)


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
    owned = ownership.owned_indices()
    for plan in plans:
        ownership.claim(plan)
    # this rank's table: the merged table where it owns the sample, garbage elsewhere
    garbage = torch.full((num_samples,), 1e9 if rank else float("nan"))
    mine = torch.zeros(num_samples, dtype=torch.bool).index_fill_(0, owned, True)
    keys = torch.where(mine, merged_keys, garbage)
    union = distributed.union_of_disjoint_masks(mine)
    return owned, ownership.generation, ownership.topk_indices(keys, k), union, ownership.topk_owned(merged_keys[owned], k)


def test_ownership_selects_from_the_owners(selection_run):
    _, (n, plans, keys, k), both, seed = selection_run
    results = [both[r][1] for r in range(WORLD)]
    assert torch.equal(results[0][0], torch.arange(0, n, 2)) and torch.equal(results[1][0], torch.arange(1, n, 2))
    assert results[0][1] == results[1][1] == len(plans)
    expected = aql_kernels.topk_indices(keys, k)
    for r in range(WORLD):
        assert torch.equal(results[r][2], expected), f"seed {seed}"
        assert torch.equal(results[r][4], expected), f"seed {seed}"
        assert torch.equal(results[r][3], torch.ones(n, dtype=torch.bool))


def test_sampler_of_an_attached_strategy_records_who_trains_what(selection_run):
    *_, both, _ = selection_run
    (plan, drawn0, losers0, mismatch), (plan1, drawn1, losers1, _) = both[0][2], both[1][2]
    assert torch.equal(plan, plan1) and plan.numel() == 51  # every rank plans the same epoch
    assert drawn0 == plan[0::2].tolist() and drawn1 == torch.cat([plan, plan[:1]])[1::2].tolist()  # padded to 52
    # plan[0] is trained at position 0 (rank 0) and again at the padded position 51 (rank 1), which wins
    assert losers0.tolist() == [int(plan[0])] and losers1.tolist() == []
    assert "attached to rank 0 of 2, the sampler was given rank 1 of 2" in mismatch


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


# -------------------------------------------------------------------------------------------- training
def _data(n: int = 384):
    """Generated MNIST-1D-shaped data: a class-dependent bump plus noise (learnable, nothing downloaded)."""
    from aql.data import IndexedTensorDataset

    generator = torch.Generator().manual_seed(2024)
    y = torch.randint(0, 10, (n + 96,), generator=generator)
    x = torch.randn(n + 96, 40, generator=generator) * 0.5
    x[torch.arange(n + 96), 2 + 3 * y] += 3.0
    return IndexedTensorDataset(x[:n].contiguous(), y[:n].contiguous()), IndexedTensorDataset(x[n:].contiguous(), y[n:].contiguous())


def _config(output_dir, aql_v2=(), **training):
    from aql.config import config_from_dict

    return config_from_dict({
        "seed": 3, "device": "cpu",
        "model": {"type": "mnist1d_cnn", "channels": [8, 8]},
        "data": {"name": "mnist1d"},
        "training": {"batch_size": 32, "learning_rate": 3e-3, "warmup_steps": 2, "max_steps": 0, "gradient_accumulation": 4,
                     "epochs": 4, "eval_batch_size": 512, **training},
        "aql_v2": {"selection_strategy": "stale", "query_budget": 0.5, "exploration": 0.25, "target_overhead": 1.0, **dict(aql_v2)},
        "logging": {"log_every": 1, "eval_every": 0, "save_every": 0, "wandb_project": None, "output_dir": str(output_dir),
                    "progress_bar": False},
    })


def _train(config, *, callbacks=(), resume=False, n=384):
    """Trains a fresh model under `config`; returns (trainer, the global plan of every epoch, error or None)."""
    from aql.models import build_model
    from aql.trainer import AQLv2Trainer, seed_everything

    train, val = _data(n)
    seed_everything(0)
    model = build_model(config.model)
    seed_everything(config.seed)
    trainer = AQLv2Trainer(model, config, train_data=train, val_data=val, callbacks=callbacks)
    plans = {}
    original = trainer.strategy.epoch_plan

    def recording(epoch):
        plan = original(epoch)
        plans[epoch] = plan.indices.clone()
        return plan

    trainer.strategy.epoch_plan = recording
    error = None
    try:
        trainer.fit(resume=resume)
    except KeyboardInterrupt as caught:
        error = str(caught)
    return trainer, plans, error


def _outcome(trainer, plans, error=None):
    return {"params": {k: v.clone() for k, v in trainer.model.state_dict().items()}, "plans": plans, "error": error,
            "history": [{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in trainer.history],
            "steps": trainer.step}


def _interrupt_at(step):
    def callback(trainer):
        if trainer.step == step:
            raise KeyboardInterrupt(f"stopped at {step}")
    return callback


RANKED = {"selection_strategy": "ranked", "strategy_options": {"exploration": 0.25, "ageing": 0.8}}
ONLINE = {"selection_strategy": "online", "strategy_options": {"pick": "top", "balanced": True}}


def _two_rank_runs(rank: int, world: int, folder: str):
    from aql.config import ConfigError

    out = {}
    out["first"] = _outcome(*_train(_config(f"{folder}/first")))
    out["again"] = _outcome(*_train(_config(f"{folder}/again")))  # determinism
    out["stopped"] = _outcome(*_train(_config(f"{folder}/resumed"), callbacks=[_interrupt_at(5)]))
    out["resumed"] = _outcome(*_train(_config(f"{folder}/resumed"), resume=True))
    # uneven: 385 samples, a 193-sample plan padded by one sample per epoch; accumulation 1
    out["random"] = _outcome(*_train(_config(f"{folder}/random", aql_v2={"selection_strategy": "random"}, epochs=2)))
    uneven, _, _ = _train(_config(f"{folder}/uneven", gradient_accumulation=1, epochs=2), n=385)
    out["uneven_steps"] = uneven.step
    out["uneven_samples"] = [m["samples_backpropagated"] for m in uneven.history]
    # ranked (stale scores, no quotas): each rank writes what it trains, the top-k goes across ranks
    out["ranked_run"] = _outcome(*_train(_config(f"{folder}/ranked_run", aql_v2=RANKED, epochs=3)))
    # online: the one-process selection over each global candidate batch (tests/aql/test_distributed_candidates.py)
    out["online_run"] = _outcome(*_train(_config(f"{folder}/online_run", aql_v2=ONLINE, epochs=2)))
    out["online_again"] = _outcome(*_train(_config(f"{folder}/online_again", aql_v2=ONLINE, epochs=2)))
    try:
        _train(_config(f"{folder}/odd", batch_size=33))
    except ConfigError as error:
        out["odd_batch"] = str(error)
    from aql.models import build_model
    from aql.trainer import AQLv2Trainer

    config = _config(f"{folder}/wrapped")
    try:
        AQLv2Trainer(torch.nn.parallel.DistributedDataParallel(build_model(config.model)), config, train_data=_data()[0])
    except TypeError as error:
        out["wrapped"] = str(error)
    return out


def test_two_rank_training_is_deterministic_resumes_and_matches_one_rank(tmp_path):
    results = run_ranks(tmp_path, _two_rank_runs, str(tmp_path))
    zero, one = results
    first = zero["first"]
    assert first["steps"] == 4 * 2  # ceil(192 / 32) = 6 micro-batches, accumulation 4: 2 steps per epoch
    assert sorted(first["plans"]) == [0, 1, 2, 3]
    for name in ("first", "again", "resumed"):  # DDP: the same parameters and plans on both ranks
        for key, value in zero[name]["params"].items():
            assert torch.equal(value, one[name]["params"][key]), (name, key)
        for epoch, plan in zero[name]["plans"].items():
            assert torch.equal(plan, one[name]["plans"][epoch]), (name, epoch)
    for name in ("again", "resumed"):  # deterministic, and the interrupted run resumed reaches the same state
        for key, value in first["params"].items():
            assert torch.equal(value, zero[name]["params"][key]), (name, key)
        for epoch, plan in zero[name]["plans"].items():
            assert torch.equal(plan, first["plans"][epoch]), (name, epoch)
    assert zero["stopped"]["error"] == "stopped at 5" and zero["stopped"]["steps"] == 5
    # one process, the same global batch: the same selections, the same parameters up to rounding
    trainer, plans, _ = _train(_config(tmp_path / "single"))
    for epoch, plan in plans.items():
        assert torch.equal(plan, first["plans"][epoch]), epoch
    assert len(set(plans[1].tolist()) - set(plans[0].tolist())) > 48  # the store moved on: the test can tell
    for key, value in trainer.model.state_dict().items():
        torch.testing.assert_close(first["params"][key], value, rtol=1e-4, atol=1e-5)
    for single, double in zip(trainer.history, first["history"]):
        assert single["samples_backpropagated"] == double["samples_backpropagated"] == 192
        assert single["train_loss"] == pytest.approx(double["train_loss"], rel=1e-4)
    # random (no scores, no estimator): the same plans, and the parameters of one process
    single_random, random_plans, _ = _train(_config(tmp_path / "single_random", aql_v2={"selection_strategy": "random"}, epochs=2))
    assert all(torch.equal(random_plans[e], zero["random"]["plans"][e]) for e in (0, 1))
    for key, value in single_random.model.state_dict().items():
        torch.testing.assert_close(zero["random"]["params"][key], value, rtol=1e-4, atol=1e-5)
        assert torch.equal(zero["random"]["params"][key], one["random"]["params"][key])
    # only rank 0 wrote records: one per step
    records = [line for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines() if '"event": "train"' in line]
    assert len(records) == 8
    # uneven: a 193-sample plan (half of 385), 32 per step: ceil(193 / 32) = 7 steps per epoch on both
    # ranks, 194 samples back-propagated (one padded)
    assert zero["uneven_steps"] == one["uneven_steps"] == 2 * 7
    assert zero["uneven_samples"] == [194, 194]
    # online under DDP: the same parameters on both ranks, deterministic, the budget held exactly
    # (6 global candidate batches of 64 per epoch, 32 of each kept: 192 of 384 samples)
    online, again = zero["online_run"], zero["online_again"]
    assert online["steps"] == one["online_run"]["steps"] == again["steps"] == 2 * 2  # 6 global micro-batches of 32, accumulation 4
    assert [m["samples_backpropagated"] for m in online["history"]] == [192, 192]
    for key, value in online["params"].items():
        assert torch.equal(value, one["online_run"]["params"][key]) and torch.equal(value, again["params"][key]), key
    # ranked across 2 ranks plans every epoch as one process does, and trains to the same parameters
    single_ranked, ranked_plans, _ = _train(_config(tmp_path / "single_ranked", aql_v2=RANKED, epochs=3))
    assert sorted(ranked_plans) == [0, 1, 2]
    for epoch, plan in ranked_plans.items():
        assert torch.equal(plan, zero["ranked_run"]["plans"][epoch]) and torch.equal(plan, one["ranked_run"]["plans"][epoch]), epoch
    assert len(set(ranked_plans[2].tolist()) - set(ranked_plans[1].tolist())) > 0  # the scores moved the selection
    for key, value in single_ranked.model.state_dict().items():
        torch.testing.assert_close(zero["ranked_run"]["params"][key], value, rtol=1e-4, atol=1e-5)
    assert "training.batch_size: 33" in zero["odd_batch"]
    assert "already wrapped in DistributedDataParallel" in zero["wrapped"]
    # a 2-rank checkpoint refuses a 1-process resume
    with pytest.raises(ValueError, match="written by 2 rank"):
        _train(_config(tmp_path / "first"), resume=True)


def test_fsdp_is_refused(tmp_path):
    from aql.models import build_model
    from aql.trainer import AQLv2Trainer

    class FSDPModule(torch.nn.Module):  # stands for a module sharded by torch.distributed.fsdp.fully_shard
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    config = _config(tmp_path)
    with pytest.raises(ValueError, match="FSDP is not supported"):
        AQLv2Trainer(FSDPModule(build_model(config.model)), config, train_data=_data()[0])
