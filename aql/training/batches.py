"""Batches for the trainer: one epoch's plan as (x, y, index, weight) batches, the buffer that regroups
kept candidates into training batches, and the sample view of token data for the fused loss."""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["split_batch", "gather", "EpochLoader", "PendingSamples", "SharedPendingSamples", "sample_view", "estimator_scorer",
           "config_scorer"]


def split_batch(batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(x, y), (x, y, index) or (x, y, index, weight) -> all four (None where absent)."""
    if not isinstance(batch, (tuple, list)) or not 2 <= len(batch) <= 4:
        raise TypeError(f"aql.trainer: batches must be (x, y), (x, y, index) or (x, y, index, weight) tuples, got {type(batch).__name__}"
                        f"{'' if not isinstance(batch, (tuple, list)) else ' of length ' + str(len(batch))}")
    x, y, *rest = batch
    index = rest[0] if rest else None
    weight = rest[1] if len(rest) > 1 else None
    if index is not None and not isinstance(index, torch.Tensor):
        index = torch.as_tensor(index, dtype=torch.long)
    return x, y, index, weight


def gather(dataset, index: torch.Tensor):
    """(x, y) of the samples `index` (CPU int64) of `dataset`: one `dataset.gather(index)` when it has
    one (`aql.data.IndexedTensorDataset`), else the items stacked."""
    if hasattr(dataset, "gather"):
        return dataset.gather(index)
    items = [dataset[i] for i in index.tolist()]
    return torch.stack([torch.as_tensor(item[0]) for item in items]), torch.stack([torch.as_tensor(item[1]) for item in items])


class EpochLoader:
    """One epoch of `strategy.batches(plan, batch_size, skip=skip)` over `dataset`, as
    (x, y, index, weight) batches: x, y gathered with the plan's CPU indices, index (and the plan's
    weights, None when it has none) copied to `device` with `non_blocking=True` (the strategy's
    `host_plan` pins them on CUDA, so the copy does not wait for the stream).

    With `world` > 1 (candidate batches shared by the ranks, see `aql.strategies._ranks`): `plan` and
    `batch_size` are the global ones, and each batch is the whole candidate batch's index and weights
    with x, y of this rank's rows only, `index[rank::world]` (none when the batch has fewer than
    `rank + 1` candidates)."""

    def __init__(self, dataset, strategy, plan, batch_size: int, *, skip: int = 0, device: torch.device | None = None,
                 rank: int = 0, world: int = 1):
        self.dataset, self.strategy, self.plan, self.batch_size, self.skip = dataset, strategy, plan, batch_size, skip
        self.device = torch.device("cpu") if device is None else device
        if isinstance(world, bool) or not isinstance(world, int) or world < 1:
            raise ValueError(f"aql.training.EpochLoader: world must be an int >= 1, got {world!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world:
            raise ValueError(f"aql.training.EpochLoader: rank must be an int in [0, {world - 1}], got {rank!r}")
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(0, self.strategy.num_batches(self.plan, self.batch_size) - self.skip)

    def __iter__(self):
        device = self.device
        for index, weight in self.strategy.batches(self.plan, self.batch_size, skip=self.skip):
            if self.world == 1:
                x, y = gather(self.dataset, index)
            else:
                mine = index[self.rank::self.world]
                x, y = gather(self.dataset, mine if mine.numel() else index[:1])
                x, y = x[:mine.numel()], y[:mine.numel()]
            yield x, y, index.to(device, non_blocking=True), None if weight is None else weight.to(device, non_blocking=True)


class PendingSamples:
    """Kept candidates not yet trained on, handed out as training batches of a fixed size (in the
    order they were kept). `pieces` (x, y, index, weight; index and weight may be None) is the
    whole state, saved in the trainer's checkpoint."""

    def __init__(self, pieces=()):
        self.pieces: list[tuple] = list(pieces)

    def __len__(self) -> int:
        return sum(piece[0].shape[0] for piece in self.pieces)

    def append(self, x, y, index, weight) -> None:
        self.pieces.append((x, y, index, weight))

    def take(self, size: int) -> tuple:
        """The first `size` samples (fewer when fewer wait) as (x, y, index, weight)."""
        xs, ys, idx, ws = zip(*self.pieces)
        x, y = torch.cat(xs), torch.cat(ys)
        index = None if any(i is None for i in idx) else torch.cat(idx)
        weight = None if any(w is None for w in ws) else torch.cat(ws)
        take = min(size, x.shape[0])
        head = (x[:take], y[:take], None if index is None else index[:take], None if weight is None else weight[:take])
        self.pieces = [] if take == x.shape[0] else [(x[take:], y[take:], None if index is None else index[take:],
                                                      None if weight is None else weight[take:])]
        return head


class SharedPendingSamples:
    """The global queue of kept candidates as one rank holds it under torch.distributed: the kept rows of
    every rank in one-process order (`owners`: bool masks, True where this rank holds the row), this
    rank's own rows in `local`. Every rank keeps the same `owners` (they come from the selection all
    ranks make), so `take(size)` hands every rank its part of the same global training batch.
    `owners` and `local.pieces` are the whole state, saved in the trainer's checkpoint."""

    def __init__(self, local: PendingSamples | None = None, owners=()):
        self.local = PendingSamples() if local is None else local
        self.owners: list[torch.Tensor] = list(owners)

    def __len__(self) -> int:
        return sum(mask.shape[0] for mask in self.owners)

    def append(self, mine: torch.Tensor, x, y, index, weight) -> None:
        """Kept rows in one-process order (`mine`: bool on the CPU, one entry per kept row of any rank)
        and this rank's rows among them (x, y, index, weight; as many as `mine` has True)."""
        if not isinstance(mine, torch.Tensor) or mine.dtype != torch.bool or mine.dim() != 1 or mine.device.type != "cpu":
            raise TypeError("aql.training.SharedPendingSamples.append: mine must be a 1-D bool CPU tensor, got "
                            f"{mine.dtype if isinstance(mine, torch.Tensor) else type(mine).__name__}")
        held = int(mine.sum())
        if held != x.shape[0]:
            raise ValueError(f"aql.training.SharedPendingSamples.append: mine marks {held} rows as this rank's, got {x.shape[0]} rows of x")
        self.owners.append(mine)
        if x.shape[0]:
            self.local.append(x, y, index, weight)

    def take(self, size: int) -> tuple[tuple, int]:
        """(this rank's rows among the first `size` of the global queue as (x, y, index, weight), or None
        when it holds none of them; how many rows the global batch has)."""
        mask = torch.cat(self.owners)
        take = min(size, mask.shape[0])
        self.owners = [] if take == mask.shape[0] else [mask[take:]]
        mine = int(mask[:take].sum())
        return (self.local.take(mine) if mine else None), take


def sample_view(logits: torch.Tensor, targets: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rows as the fused loss's samples: token data (``[batch * T, V]`` logits, ``[batch * T]``
    targets) as ``[batch, T, V]`` / ``[batch, T]`` views, so that `aql_kernels.cross_entropy_with_scores` and
    `softmax_scores` return per-sample scores (the mean over each sample's tokens whose target is not
    ignored; NaN for a sample without any, argmax None) while reduction="none" keeps one loss per row;
    one row per sample is returned unchanged (the scores are then the rows' own)."""
    if logits.shape[0] == batch:
        return logits, targets
    return logits.view(batch, -1, logits.shape[-1]), targets.view(batch, -1)


def config_scorer(config, context) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The candidate scorer `aql_v2.scorer` asks for: `estimator_scorer` of the context's estimator and
    training data for `estimator`, None (the loop's own no-grad forward) for `model`."""
    if config.aql_v2.scorer != "estimator":
        return None
    return estimator_scorer(context.estimator, context.train_data, context.device)


def estimator_scorer(estimator, dataset, device) -> Callable[[torch.Tensor], torch.Tensor]:
    """`aql_v2.scorer: estimator`: a candidate scorer for the strategies that take one: indices ->
    float32 [B] `estimator.estimate_uncertainty` of those samples of `dataset` (per sample: the
    estimators reduce a sequence's token rows themselves, `per_sample="mean"`). Gathers the candidates' inputs again (an extra copy per candidate
    batch; the model scorer reads the loop's own forward instead)."""
    if estimator is None or dataset is None or not hasattr(estimator, "estimate_uncertainty"):
        raise ValueError("aql_v2.scorer: 'estimator' needs an uncertainty estimator and the training data, "
                         f"got estimator {type(estimator).__name__} and data {type(dataset).__name__}")

    def score(indices: torch.Tensor) -> torch.Tensor:
        x, _ = gather(dataset, indices.cpu())
        with torch.no_grad():
            values = estimator.estimate_uncertainty(x.to(device))
        return values.float()

    return score
