"""Candidate selection across ranks, exactly as one process would make it over the global candidate batch.

Under torch.distributed a `scores_candidates` strategy's i-th candidate batch is the one-process i-th
candidate batch (`strategy.batches(plan, global_batch)`, the same on every rank); rank r scores only
its rows, the batch's positions r, r + R, ... (`local_rows`). Their per-sample statistics (the
`SoftmaxScores` fields, and a `candidate_scorer`'s values computed on the rank's own rows) travel in
ONE `all_gather_single` (`all_gather_into_tensor` before torch 2.13) of a small packed float32 tensor, ceil(C / R) x F per rank (F <= 8 columns:
2 KB per rank for C = 64), and are put back in one-process order. Every rank then calls
`strategy.select` on the whole candidate batch: the ranks hold identical strategy state (same seed,
same inputs, same calls), so they make the identical decision, and each trains the kept positions
that are its own (`owned_positions`).

Why an all-gather of the statistics rather than the histogram all-reduces of `aql.distributed`: the
candidate rules are stateful functions of the whole candidate batch (streaming's running threshold
histogram, curriculum's bands and exhaustion rules, meta's policy and its REINFORCE step, online's
sampling keys, quotas and curriculum band); re-deriving each from all-reduced summaries would need a
protocol per rule, while the statistics of a candidate batch are smaller than one 2048-bin histogram
round of `aql.distributed.global_topk_mask` (16 KB) and arrive in one collective.

The argmax column is exact below 2**24 classes (float32); every other field is float32 already.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.distributed as dist

from aql_kernels import SoftmaxScores

__all__ = ["local_rows", "gather_candidate_scores", "owned_positions", "gathered_scorer"]



# torch >= 2.13 names it all_gather_single (all_gather_into_tensor warns there); older torch has only the latter
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def local_rows(total: int, rank: int, world: int) -> slice:
    """The positions of a `total`-candidate batch that rank `rank` of `world` scores: rank, rank + world, ..."""
    return slice(rank, total, world)


def gather_candidate_scores(scores: SoftmaxScores, values: torch.Tensor | None, total: int, *, rank: int, world: int,
                            group=None) -> tuple[SoftmaxScores, torch.Tensor | None]:
    """(the candidate batch's `SoftmaxScores`, its scorer values or None) in one-process order, from each
    rank's statistics of its rows (`local_rows(total, rank, world)`): one all-gather of a packed
    [ceil(total / world), F] float32 tensor per rank. Fields that are None stay None (the same on every
    rank: the model and data are)."""
    fields = [name for name in SoftmaxScores._fields if getattr(scores, name) is not None]
    columns = [getattr(scores, name).float() for name in fields]
    if values is not None:
        columns.append(values.float().to(columns[0].device))
    rows = len(range(rank, total, world))
    if any(column.shape != (rows,) for column in columns):
        raise ValueError(f"aql.strategies.gather_candidate_scores: rank {rank} of {world} holds {rows} of {total} candidates, "
                         f"got statistics of shapes {[tuple(c.shape) for c in columns]}")
    width = -(-total // world)
    packed = torch.zeros(width, len(columns), dtype=torch.float32, device=columns[0].device)
    packed[:rows] = torch.stack(columns, 1)
    everyone = packed.new_empty(world * width, len(columns))
    _all_gather_single(everyone, packed, group=group)
    # rank r's k-th row is position r + k * world: [world, width] transposed is the one-process order,
    # the padding rows last
    ordered = everyone.view(world, width, -1).transpose(0, 1).reshape(world * width, -1)[:total]
    # one contiguous row per statistic: a reduction over a strided column may round differently from the
    # one process's contiguous tensor (nanmean's order), and the selection must be bit-identical
    statistics = ordered.T.contiguous().unbind(0)
    gathered = dict(zip(fields, statistics))
    if "argmax" in gathered:
        gathered["argmax"] = gathered["argmax"].long()
    out = SoftmaxScores(**{name: gathered.get(name) for name in SoftmaxScores._fields})
    return out, (statistics[-1] if values is not None else None)


def owned_positions(positions: torch.Tensor, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mine: bool [K] on the CPU, local: int64 positions into this rank's rows): which of the kept
    candidate-batch `positions` rank `rank` holds (p % world == rank) and where among its rows (p // world).
    The CPU mask is one host synchronisation per candidate batch."""
    mine = positions.remainder(world) == rank
    local = positions[mine].div(world, rounding_mode="floor")
    return mine.cpu(), local


@contextmanager
def gathered_scorer(strategy, indices: torch.Tensor, values: torch.Tensor | None):
    """While inside, `strategy.candidate_scorer(indices)` returns the gathered `values` (each rank scored
    its own rows) instead of scoring other ranks' samples again; a no-op when `values` is None."""
    if values is None:
        yield
        return
    original = strategy.candidate_scorer

    def lookup(asked: torch.Tensor) -> torch.Tensor:
        if asked is not indices and not torch.equal(asked.cpu(), indices.cpu()):
            raise ValueError(f"aql.strategies.{type(strategy).__name__}: under torch.distributed the candidate scorer "
                             "answers for the candidate batch being selected only")
        return values

    strategy.candidate_scorer = lookup
    try:
        yield
    finally:
        strategy.candidate_scorer = original
