"""Data plumbing for existing training code: a dataset wrapper that returns each sample's index with it,
and a sampler that feeds a `torch.utils.data.DataLoader` the samples a selection strategy picked.

    dataset = WithIndices(my_dataset)                      # items become (x, y, index)
    sampler = SelectionSampler(strategy, num_replicas=world_size, rank=rank)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=4)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)                           # the strategy's plan for this epoch
        for x, y, index in loader:
            ...                                            # strategy.after_step(index, scores)
        strategy.end_epoch({})

The sampler draws nothing itself: the order is the strategy's `epoch_plan(epoch)`, already a fresh
shuffle fixed by (seed, epoch), so every rank and every restart sees the same plan. With several
replicas, rank r takes positions r, r + R, r + 2R, ... of the plan, padded by wrapping around (or cut,
with `drop_last`) so that every rank has the same number of samples, as `DistributedSampler` does
(`aql.distributed.shard_indices`). A strategy attached to the process group
(`strategy.attach_process_group()`) also records which rank trains which sample, so that its
per-sample tables, written by each rank for what it trains, select exactly across ranks.
DataLoader workers need nothing special: the sampler runs in the main process.
For the strategies that score candidates (`online`, `meta`) the plan holds the candidates, and the
selection happens in the training step (`strategy.select`), not in the sampler.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, Sampler

from ._checks import check_int
from .distributed import shard_indices

__all__ = ["WithIndices", "SelectionSampler"]


class WithIndices(Dataset):
    """`dataset[i]` as `(*dataset[i], i)`: the index travels with the sample through any DataLoader, so
    per-sample scores can be written back to it. Items that are not tuples become `(item, i)`."""

    def __init__(self, dataset):
        if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
            raise TypeError(f"aql.sampling.WithIndices: dataset must be a map-style dataset (with __getitem__ and __len__), "
                            f"got {type(dataset).__name__}")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        return (*item, index) if isinstance(item, tuple) else (item, index)


class SelectionSampler(Sampler[int]):
    """The indices of `strategy.epoch_plan(epoch)` (see the module docstring); `set_epoch(epoch)`
    before each epoch, as with `DistributedSampler`."""

    def __init__(self, strategy, *, num_replicas: int = 1, rank: int = 0, drop_last: bool = False):
        where = "sampling.SelectionSampler"
        if not hasattr(strategy, "epoch_plan"):
            raise TypeError(f"aql.{where}: strategy must be an aql.strategies.SelectionStrategy, got {type(strategy).__name__}")
        self.num_replicas = check_int(where, "num_replicas", num_replicas, low=1)
        self.rank = check_int(where, "rank", rank, low=0)
        if self.rank >= self.num_replicas:
            raise ValueError(f"aql.{where}: rank must be in [0, {self.num_replicas - 1}], got {rank}")
        if not isinstance(drop_last, bool):
            raise TypeError(f"aql.{where}: drop_last must be a bool, got {type(drop_last).__name__} {drop_last!r}")
        self.strategy, self.drop_last = strategy, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = check_int("sampling.SelectionSampler.set_epoch", "epoch", epoch, low=0)

    def _shard(self) -> torch.Tensor:
        plan = self.strategy.epoch_plan(self.epoch)
        sharding = getattr(self.strategy, "sharding", None)
        if sharding is not None:  # a strategy attached to a process group records who trains what
            if (sharding.world, sharding.rank) != (self.num_replicas, self.rank):
                raise ValueError(f"aql.sampling.SelectionSampler: the strategy is attached to rank {sharding.rank} of "
                                 f"{sharding.world}, the sampler was given rank {self.rank} of {self.num_replicas}")
            return self.strategy.shard_plan(plan, drop_last=self.drop_last).indices
        return shard_indices(plan.indices, self.rank, self.num_replicas, drop_last=self.drop_last)

    def __iter__(self) -> Iterator[int]:
        return iter(self._shard().tolist())

    def __len__(self) -> int:
        return self._shard().numel()
