"""Per-sample tables sharded by rank (`aql.distributed.SampleOwnership`, `RoutedWrites`) on 2 gloo processes:
`stale` (its `ScoreStore`) and `ranked` (with and without per-class quotas, with exploration) keep ~N / R
rows per rank, route every write to the owner of its row, and plan every epoch exactly as one process
that made the same writes in the same order; a mid-epoch checkpoint resumes bit for bit; and a 2-rank
`AQLv2Trainer` run of `ranked` with quotas equals a 1-rank run.

Adversarial writes: ties, NaN (never seen, re-scored), -0.0, +inf, and a sample that two ranks train in
one epoch (an odd plan padded by wrapping around: the later position's value must win). One spawn
runs every case."""

from __future__ import annotations

import io
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import aql_kernels
from aql import distributed
from aql.strategies import _keys
from aql.strategies.ranked import RankedSelection
from aql.strategies.stale import StaleStrategy

from .test_distributed import _config, _outcome, _train, run_ranks

WORLD = 2
N, CLASSES, EPOCHS, BATCH = 203, 4, 6, 8

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------- the tables
def _labels() -> torch.Tensor:
    return torch.randint(0, CLASSES, (N,), generator=torch.Generator().manual_seed(11))


def _make(name: str):
    if name == "stale":
        return StaleStrategy(N, query_budget=0.3, exploration=0.3, seed=5)
    options = dict(query_budget=0.3, seed=5, exploration=0.2, ageing=0.8)
    if name == "balanced":
        return RankedSelection(N, balanced=True, labels=_labels(), num_classes=CLASSES, **options)
    return RankedSelection(N, balanced=False, **options)


def _padded(plan: torch.Tensor, world: int) -> torch.Tensor:
    """The plan as `shard_indices` pads it for `world` ranks, in position order."""
    size = math.ceil(plan.numel() / world) * world
    return plan.repeat(math.ceil(size / plan.numel()))[:size]


def _round_trip(strategy, name: str):
    """A fresh strategy (attached like the old one) loaded from the old one's state through a
    weights-only save, as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(strategy.state_dict(), buffer)
    buffer.seek(0)
    fresh = _make(name)
    if strategy.sharding is not None:
        fresh.attach_process_group()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def _tables(strategy) -> dict[str, torch.Tensor]:
    if isinstance(strategy, StaleStrategy):
        return {"scores": strategy.store.scores.clone(), "seen": strategy.store.seen.clone()}  # a collective when sharded
    return {"scores": strategy.scores.clone(), "written": strategy.written.clone()}


def _held_tensors(strategy) -> dict[str, int]:
    """Elements of every tensor the strategy (and its store) keeps as an attribute."""
    out = {}
    for owner, values in (("", vars(strategy)), ("store.", vars(getattr(strategy, "store", None) or SimpleNamespace()))):
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                out[owner + key] = value.numel()
    return out


def _simulate(name: str, values: torch.Tensor, world: int, rank: int, resume_at: tuple[int, int] | None = None):
    """EPOCHS epochs of `name`: rank `rank` of `world` trains its shard of each plan (one process: the
    plan padded as for WORLD ranks, in position order), writing values[epoch, global position]; a
    round trip through the state at (epoch, batch) `resume_at`. Returns the plans, the end-of-epoch
    metrics, this rank's tables and the elements it holds (after epoch 0 and at the end)."""
    strategy = _make(name)
    if world > 1:
        strategy.attach_process_group()
    plans, metrics, held = [], [], []
    for epoch in range(EPOCHS):
        plan = strategy.epoch_plan(epoch)
        plans.append(plan.indices.clone())
        shard = strategy.shard_plan(plan).indices if world > 1 else _padded(plan.indices, WORLD)
        for batch, start in enumerate(range(0, shard.numel(), BATCH)):
            if (epoch, batch) == resume_at:
                strategy = _round_trip(strategy, name)
                shard = strategy.shard_plan(strategy.epoch_plan(epoch)).indices if world > 1 else shard
            index = shard[start:start + BATCH]
            positions = torch.arange(start, start + index.numel()) * world + rank
            written = values[epoch, positions].clone()
            strategy.after_step(index, SimpleNamespace(loss=written, lse=written.clone()))
        metrics.append(strategy.end_epoch({}))
        held.append(_held_tensors(strategy))
    return plans, metrics, _tables(strategy), held


def _values(generator: torch.Generator) -> torch.Tensor:
    """[EPOCHS, padded plan length] writes: normal scores, ties, NaN, -0.0, +0.0, +inf; position 0 and
    the padded last position (the same sample, on two ranks) get different values."""
    size = _padded(torch.zeros(_make("stale").samples_per_epoch), WORLD).numel()
    values = torch.randn(EPOCHS, size, generator=generator)
    special = torch.tensor([math.nan, -0.0, 0.0, 1.0, 1.0, math.inf, 0.5])
    pick = torch.rand(EPOCHS, size, generator=generator) < 0.4
    values[pick] = special[torch.randint(0, special.numel(), (int(pick.sum()),), generator=generator)]
    values[:, 0], values[:, -1] = 3.0, 4.0
    return values


def _table_cases(rank: int, world: int, values: torch.Tensor):
    out = {}
    for name in ("stale", "ranked", "balanced"):
        out[name] = _simulate(name, values, world, rank)
        out[name + "_resumed"] = _simulate(name, values, world, rank, resume_at=(2, 3))
    ownership = distributed.SampleOwnership(N)
    # a 3-sample plan over 2 ranks: position 3 (rank 1) trains plan[0] again, trained at 0 on rank 0
    ownership.claim(torch.tensor([7, 4, 9]))
    out["losers"] = ownership.losers.clone()
    ownership.claim(torch.tensor([7, 4, 9]), drop_last=True)
    out["losers_drop_last"] = ownership.losers.clone()
    # a selection shared in blocks of 3: the same ascending indices on every rank
    out["shared"] = distributed.share_indices(torch.arange(rank, 40, 3 * world), chunk_rows=3)
    # share_owned: a sparse selection goes as indices, a dense one as bit masks; 1001 samples (ragged rows)
    wide = distributed.SampleOwnership(1001)
    owned = wide.owned_indices()
    for name, chosen in (("sparse", owned % 97 == 5), ("dense", (owned * 7919) % 10 < 3), ("none", owned < 0),
                         ("all", owned >= 0)):
        out["share_owned_" + name] = wide.share_owned(chosen)
    return out


# ----------------------------------------------------------------------------------------- training
RANKED_BALANCED = {"selection_strategy": "ranked", "strategy_options": {"balanced": True, "exploration": 0.25, "ageing": 0.8}}


def _interrupt_at(step):
    def callback(trainer):
        if trainer.step == step:
            raise KeyboardInterrupt(f"stopped at {step}")
    return callback


def _training_cases(rank: int, world: int, folder: str):
    out = {"first": _outcome(*_train(_config(f"{folder}/first", aql_v2=RANKED_BALANCED, epochs=3)))}
    out["stopped"] = _outcome(*_train(_config(f"{folder}/resumed", aql_v2=RANKED_BALANCED, epochs=3), callbacks=[_interrupt_at(3)]))
    out["resumed"] = _outcome(*_train(_config(f"{folder}/resumed", aql_v2=RANKED_BALANCED, epochs=3), resume=True))
    return out


def _worker(rank: int, world: int, values: torch.Tensor, folder: str):
    return _table_cases(rank, world, values), _training_cases(rank, world, folder)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    seed = int.from_bytes(os.urandom(4), "little")
    values = _values(torch.Generator().manual_seed(seed))
    folder = tmp_path_factory.mktemp("tables")
    return values, run_ranks(folder, _worker, values, str(folder)), seed, folder


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


@pytest.mark.parametrize("name", ["stale", "ranked", "balanced"])
def test_sharded_tables_plan_what_one_process_plans(two_ranks, name):
    values, results, seed, _ = two_ranks
    reference_plans, reference_metrics, reference_tables, _ = _simulate(name, values, 1, 0)
    assert len(set(reference_plans[-1].tolist()) - set(reference_plans[-2].tolist())) > 0  # the writes move the plans
    for suffix in ("", "_resumed"):
        per_rank = [results[r][0][name + suffix] for r in range(WORLD)]
        for r, (plans, metrics, tables, _) in enumerate(per_rank):
            for epoch, (got, expected) in enumerate(zip(plans, reference_plans)):
                assert torch.equal(got, expected), f"seed {seed}: {name}{suffix}, rank {r}, epoch {epoch}"
            assert metrics == reference_metrics, f"seed {seed}: {name}{suffix}"
            for key, table in tables.items():  # this rank's rows, bit for bit (NaN and -0.0 included)
                expected = reference_tables[key][r::WORLD]
                assert torch.equal(_bits(table), _bits(expected)), f"seed {seed}: {name}{suffix}, rank {r}, {key}"


@pytest.mark.parametrize("name", ["stale", "ranked", "balanced"])
def test_each_rank_holds_its_rows_only(two_ranks, name):
    _, results, _, _ = two_ranks
    for r in range(WORLD):
        owned = len(range(r, N, WORLD))
        for held in results[r][0][name][3]:
            assert max(held.values()) < N, held  # no whole-table tensor left
            tables = ("store._written", "store._scores", "store._seen") if name == "stale" else ("scores", "written")
            tables += ("labels",) if name == "balanced" else ()
            assert all(held[key] == owned for key in tables), held
    _, _, _, one_process = _simulate(name, two_ranks[0], 1, 0)
    assert max(one_process[0].values()) == N  # one process keeps the whole table (the check can tell)


def test_share_owned_gives_every_rank_the_union_by_either_route(two_ranks):
    _, results, _, _ = two_ranks
    every = torch.arange(1001)
    expected = {"sparse": every[every % 97 == 5], "dense": every[(every * 7919) % 10 < 3], "none": every[:0], "all": every}
    assert 8 * expected["sparse"].numel() <= WORLD * -(-501 // 8) < 8 * expected["dense"].numel()  # the two routes run
    for name, want in expected.items():
        for r in range(WORLD):
            got = results[r][0]["share_owned_" + name]
            assert got.dtype == torch.int64 and torch.equal(got, want), (name, r)


def test_the_later_position_wins_and_the_selection_is_shared(two_ranks):
    values, results, _, _ = two_ranks
    assert results[0][0]["losers"].tolist() == [7] and results[1][0]["losers"].tolist() == []
    assert results[0][0]["losers_drop_last"].tolist() == results[1][0]["losers_drop_last"].tolist() == []
    expected = torch.cat([torch.arange(0, 40, 6), torch.arange(1, 40, 6)]).sort().values
    assert all(torch.equal(results[r][0]["shared"], expected) for r in range(WORLD))
    # the sample at position 0 (rank 0) and at the padded last position (rank 1): its row holds the last value
    for name in ("ranked", "balanced"):
        plans, _, tables, _ = results[0][0][name]
        sample = int(plans[-1][0])
        rows = results[sample % WORLD][0][name][2]["scores"]
        assert _bits(rows[sample // WORLD]) == _bits(values[-1, -1]), name


def test_two_rank_quotas_train_like_one_rank(two_ranks, tmp_path):
    _, results, _, folder = two_ranks
    zero, one = results[0][1], results[1][1]
    single, plans, _ = _train(_config(tmp_path / "single", aql_v2=RANKED_BALANCED, epochs=3))
    assert sorted(plans) == [0, 1, 2]
    assert sorted(zero["resumed"]["plans"]) == [1, 2]  # stopped inside epoch 1
    for epoch, plan in plans.items():
        for run in ("first", "resumed"):
            if epoch in zero[run]["plans"]:
                assert torch.equal(plan, zero[run]["plans"][epoch]) and torch.equal(plan, one[run]["plans"][epoch]), (run, epoch)
    assert len(set(plans[2].tolist()) - set(plans[1].tolist())) > 0
    assert zero["stopped"]["error"] == "stopped at 3"
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(zero["first"]["params"][key], value, rtol=1e-4, atol=1e-5)
        assert torch.equal(zero["first"]["params"][key], zero["resumed"]["params"][key]), key  # resumed bit for bit
        assert torch.equal(zero["first"]["params"][key], one["first"]["params"][key]), key


# ------------------------------------------------------------------------------------- one process
def _quota_reference(rows: list[int], k: int) -> tuple[list[int], list[int]]:
    """(above, tied) from the balanced keys of every row, float32 as balanced_keys computes them."""
    keys = [(-(np.float32(j) + np.float32(0.5)) / np.float32(n), c) for c, n in enumerate(rows) for j in range(n)]
    threshold = sorted((key for key, _ in keys), reverse=True)[k - 1] if k else np.float32(np.inf)
    above = [sum(1 for key, c in keys if c == cls and key > threshold) for cls in range(len(rows))]
    tied = [sum(1 for key, c in keys if c == cls and key == threshold) for cls in range(len(rows))] if k else [0] * len(rows)
    return above, tied


def test_balanced_quotas_match_the_keys():
    seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    for _ in range(40):
        rows = torch.randint(0, 30, (int(torch.randint(1, 6, (1,), generator=generator)),), generator=generator).tolist()
        if sum(rows) == 0:
            continue
        rows[0] = rows[-1]  # equal class sizes: fractional ranks tie across classes
        k = int(torch.randint(0, sum(rows) + 1, (1,), generator=generator))
        assert _keys.balanced_quotas(rows, k) == _quota_reference(rows, k), (seed, rows, k)
    with pytest.raises(ValueError, match="k in"):
        _keys.balanced_quotas([3, 4], 8)


def test_balanced_topk_owned_in_one_process_is_the_balanced_top_k():
    seed = int.from_bytes(os.urandom(4), "little")
    generator = torch.Generator().manual_seed(seed)
    for trial in range(60):
        n, classes = int(torch.randint(1, 200, (1,), generator=generator)), int(torch.randint(1, 6, (1,), generator=generator))
        labels = torch.arange(n) % classes if trial % 2 else torch.randint(0, classes, (n,), generator=generator)
        keys = torch.randint(0, 3, (n,), generator=generator).float()
        keys[torch.rand(n, generator=generator) < 0.2] = math.nan
        keys[torch.rand(n, generator=generator) < 0.2] = -0.0
        keys[torch.rand(n, generator=generator) < 0.1] = -math.inf
        k = int(torch.randint(0, n + 1, (1,), generator=generator))
        expected = aql_kernels.topk_indices(_keys.balanced_keys(keys, labels, classes), k)
        got = _keys.balanced_topk_owned(distributed.SampleOwnership(n), keys, labels, classes, k)
        assert torch.equal(got, expected), (seed, trial)


def test_routed_writes_in_one_process_keep_the_last_write():
    ownership = distributed.SampleOwnership(10)
    writes = distributed.RoutedWrites(ownership, 2)
    writes.append(torch.tensor([3, 1, 3]), torch.tensor([1.0, -0.0, math.nan]), 4)
    ownership.claim(torch.tensor([5, 1]))
    writes.append(torch.tensor([1, 8]), torch.tensor([2.0, 5.0]), torch.tensor([6, 7]))
    assert writes.pending == 5
    state = writes.state_dict()
    rows, payload = writes.exchange()
    assert rows.tolist() == [1, 3, 8] and payload[:, 1].tolist() == [6, 4, 7]
    assert _bits(distributed.float_column(payload[:, 0])).tolist() == _bits(torch.tensor([2.0, math.nan, 5.0])).tolist()
    assert writes.pending == 0 and writes.exchange()[0].numel() == 0
    writes.load_state_dict(state)
    assert torch.equal(writes.exchange()[1], payload)
    with pytest.raises(ValueError, match="columns=2"):
        writes.load_state_dict({"columns": 3, "rows": state["rows"]})
    with pytest.raises(ValueError, match="one entry per owned row"):
        ownership.topk_owned(torch.zeros(9), 2)
