"""WithIndices and SelectionSampler: a strategy's plan through a DataLoader, with workers and ranks."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from aql.sampling import SelectionSampler, WithIndices
from aql.strategies import STRATEGIES
from aql.strategies.ranked import RankedSelection


def _data(n=103):
    x = torch.arange(n, dtype=torch.float32).unsqueeze(1) * 10
    return TensorDataset(x, torch.arange(n) % 7)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_yields_the_plan_with_indices(workers):
    data = _data()
    strategy = STRATEGIES["random"](len(data), query_budget=0.3, seed=4)
    sampler = SelectionSampler(strategy)
    loader = DataLoader(WithIndices(data), batch_size=8, sampler=sampler, num_workers=workers)
    for epoch in (0, 1):
        sampler.set_epoch(epoch)
        seen = [batch for batch in loader]
        index = torch.cat([b[2] for b in seen])
        assert torch.equal(index, strategy.epoch_plan(epoch).indices)  # the strategy's order, nothing drawn by the sampler
        assert torch.equal(torch.cat([b[0] for b in seen]).squeeze(1), index.float() * 10)  # each sample with its own index
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert first != list(sampler)  # a fresh order per epoch


@pytest.mark.parametrize("replicas, drop_last", [(2, False), (3, False), (3, True), (4, False)])
def test_ranks_split_the_plan_evenly_without_gaps(replicas, drop_last):
    strategy = RankedSelection(103, query_budget=0.5, seed=1)
    plan = strategy.epoch_plan(0).indices.tolist()  # 52 samples
    shards = [list(SelectionSampler(strategy, num_replicas=replicas, rank=r, drop_last=drop_last)) for r in range(replicas)]
    assert len({len(s) for s in shards}) == 1  # equal counts: no rank waits for another
    union = [i for s in shards for i in s]
    if drop_last:
        assert len(union) == len(plan) // replicas * replicas and len(set(union)) == len(union)
    else:
        assert set(union) == set(plan)  # nothing dropped; the padding repeats the plan's first samples
        assert len(union) - len(set(union)) == -len(plan) % replicas


def test_bad_arguments():
    strategy = RankedSelection(10, query_budget=0.5)
    with pytest.raises(ValueError, match="rank must be in \\[0, 1\\], got 2"):
        SelectionSampler(strategy, num_replicas=2, rank=2)
    with pytest.raises(TypeError, match="strategy must be an aql.strategies.SelectionStrategy"):
        SelectionSampler([1, 2, 3])
    with pytest.raises(TypeError, match="map-style dataset"):
        WithIndices(5)
    assert WithIndices([7, 8])[1] == (8, 1)
