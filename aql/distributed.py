"""torch.distributed helpers: exact top-k selection across ranks, the even split of an epoch plan, and the
few collectives the trainer needs. Every function works, and costs nothing, in one process (no process
group initialised, or a group of one).

Exact selection across ranks (`global_topk_mask`). Each rank holds a shard of the scores; the selection
is the one `aql_kernels.topk_mask` would make on the concatenation of the shards in rank order: the k
largest in the selectors' order (`aql_kernels.order_keys`: NaN below -inf, -0.0 equal to +0.0), ties
at the threshold to the lowest (rank, index). No score leaves its rank:

1. the exact k-th largest key, most significant digit first (`aql_kernels.threshold_from_histograms`):
   per digit, each rank's `aql_kernels.digit_histogram` of the keys under the prefix found so far,
   summed by an all-reduce; the first round also carries each rank's k and shard size (2 R + 1 int64),
   so every rank checks that all passed the same k and that k is at most the total, and raises alike;
   the default digits (11, 11, 10) make three rounds of 16, 16 and 8 KiB;
2. one all-reduce of R int64 (each rank's count of keys equal to the threshold), whose exclusive prefix
   tells each rank how many of its ties the first k take;
3. locally, `aql_kernels.topk_mask(shard, greater + ties taken)`: the keys above the threshold and
   the first ties of the shard, which is the rank's part of the global selection.

Bytes all-reduced per selection (payload per rank; a ring all-reduce sends about twice that):
8 + 24 R + 8 * sum(2**b for b in digit_bits) bytes in 1 + len(digit_bits) all-reduces: 40968 + 24 R
bytes in 4 all-reduces with the default digits (the first round only when k is 0 or the total; twice
as much when `index` orders ties and the tie group at the threshold spans ranks and is partly taken).
Fewer, larger rounds win where an all-reduce costs a round trip whatever its size (see the benchmark,
which also times the 8-bit digits: 8 KiB in 5 all-reduces). The first digit's histogram reads the
shard; the later ones read only the scores under the first digit's prefix (one interval of floats:
`under_prefix`, two comparisons and a compaction), so the local work is about 3 reads of the shard
and the final `topk_mask`; the host reads each histogram (the walk picks the next prefix on the host).

Epoch plans. A rank trains positions r, r + R, r + 2R, ... of the plan that every rank computes
(`shard_indices`): the union over ranks of batch i of size b is positions [i R b, (i + 1) R b) of the
plan, i.e. the batch of a one-process run with batch R b. The plan is padded by wrapping around (or
cut with `drop_last`) so that every rank gets the same number of samples, hence the same number of
batches.

Per-sample tables sharded by rank (`SampleOwnership`, `RoutedWrites`). Rank r keeps only the rows of
the samples it owns, i with i mod R == r (~N / R rows per table); a rank trains shuffled positions,
so it queues the writes of what it trains (no op per step) and `RoutedWrites.exchange` sends them to
their owners when the table is next read (each epoch's selection): all_gathers of equal, padded blocks
of at most `CHUNK_ROWS` rows per rank (gloo and NCCL both have all_gather), the latest write of each
sample winning as in one process (a later generation, i.e. epoch plan, wins; within one plan the
later position, which only the wrap-around padding makes differ between ranks). The selection is then
`global_topk_mask` over each rank's owned rows (`SampleOwnership.topk_owned`) and the selected
indices are shared (`share_indices`: k int64 in all) so that every rank builds the same epoch plan.
Per epoch and rank that is about 24-32 bytes per row it trained for another rank (received R times
over by all_gather: R * max_r rows per round), the selection's ~41 KB of histograms, and the k
selected int64.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

import aql_kernels
from aql_kernels.select import threshold_from_histograms

from ._checks import check_bool, check_int, check_tensor

__all__ = ["is_initialized", "world_size", "rank", "is_main", "init_from_env", "barrier", "all_reduce_sum", "all_reduce_max",
           "broadcast_object", "gather_objects", "global_topk_mask", "global_topk_indices", "selection_bytes",
           "shard_indices", "SampleOwnership", "RoutedWrites", "share_indices", "float_column", "union_of_disjoint_masks",
           "under_prefix", "DIGIT_BITS", "CHUNK_ROWS"]

#: the digits of the global threshold walk: 3 all-reduces of 2048, 2048 and 1024 int64 (16, 16, 8 KiB)
DIGIT_BITS = (11, 11, 10)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INDEX_LIMIT = 0x7F800000  # the largest index `_index_keys` maps (to +0.0)


# ------------------------------------------------------------------------------------------ process group
def is_initialized() -> bool:
    """Whether a default torch.distributed process group exists."""
    return dist.is_available() and dist.is_initialized()


def world_size(group=None) -> int:
    """Ranks in `group` (the default group when None); 1 without a process group."""
    return dist.get_world_size(group) if is_initialized() else 1


def rank(group=None) -> int:
    """This process's rank in `group`; 0 without a process group."""
    return dist.get_rank(group) if is_initialized() else 0


def is_main(group=None) -> bool:
    """Whether this process is rank 0 (the one that logs and writes files); True without a group."""
    return rank(group) == 0


def init_from_env(device: torch.device) -> bool:
    """Initialises the default process group from torchrun's environment (WORLD_SIZE > 1, RANK,
    MASTER_ADDR, MASTER_PORT) when none exists: NCCL for a CUDA device, gloo otherwise. Returns whether
    a group of more than one rank is now active. Without torchrun's variables it does nothing."""
    if is_initialized():
        return world_size() > 1
    size = os.environ.get("WORLD_SIZE", "1")
    if not size.isdigit():
        raise ValueError(f"aql.distributed.init_from_env: WORLD_SIZE must be a positive integer, got {size!r}")
    if int(size) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError(f"aql.distributed.init_from_env: WORLD_SIZE is {size} but this torch build has no torch.distributed")
    dist.init_process_group(backend="nccl" if torch.device(device).type == "cuda" else "gloo")
    return True


def barrier(group=None) -> None:
    if world_size(group) > 1:
        dist.barrier(group=group)


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (returned); unchanged in one process. No host
    synchronisation beyond the backend's own (NCCL runs on the current stream)."""
    check_tensor("distributed.all_reduce_sum", "tensor", tensor)
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_max(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """`tensor` maximised over the ranks, in place (returned); unchanged in one process."""
    check_tensor("distributed.all_reduce_max", "tensor", tensor)
    if world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=group)
    return tensor


def broadcast_object(value: Any = None, src: int = 0, group=None) -> Any:
    """`value` of rank `src` on every rank (pickled); `value` itself in one process."""
    if world_size(group) == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def gather_objects(value: Any, dst: int = 0, group=None) -> list | None:
    """The list of every rank's `value` on rank `dst` (None on the others); [value] in one process."""
    if world_size(group) == 1:
        return [value]
    out = [None] * world_size(group) if rank(group) == dst else None
    dist.gather_object(value, out, dst=dst, group=group)
    return out


# ------------------------------------------------------------------------------------- exact selection
def selection_bytes(world: int, digit_bits: Sequence[int] = DIGIT_BITS) -> int:
    """Bytes each rank contributes to the all-reduces of one `global_topk_mask` (0 < k < total)."""
    return 8 + 24 * world + 8 * sum(1 << int(b) for b in digit_bits)


def _check_digits(where: str, digit_bits) -> tuple[int, ...]:
    schedule = tuple(digit_bits)
    for bits in schedule:
        check_int(where, "digit_bits entry", bits, low=1)
        if bits > 16:
            raise ValueError(f"aql.{where}: digit_bits entries must be in [1, 16], got {bits}")
    if sum(schedule) != 32:
        raise ValueError(f"aql.{where}: digit_bits must sum to 32, got {schedule} (sum {sum(schedule)})")
    return schedule


def global_topk_mask(scores: torch.Tensor, k: int, *, group=None, valid: torch.Tensor | None = None,
                     index: torch.Tensor | None = None, digit_bits: Sequence[int] = DIGIT_BITS) -> torch.Tensor:
    """bool [n]: this rank's part of the exact top-k of the scores of all ranks (see the module docstring).

    The union over ranks of the True entries is `aql_kernels.topk_mask(torch.cat(shards), k)` with the
    shards concatenated in rank order: the k largest in `aql_kernels.order_keys`' order (NaN below
    -inf, -0.0 equal to +0.0), ties at the k-th key to the lowest (rank, index). Every rank of `group`
    must call it with the same k (checked: a ValueError on every rank otherwise), 0 <= k <= the total
    size. `valid` (bool [n], optional): only these entries take part, as if the others were not in the
    shard (e.g. samples whose latest score lives on another rank); they come back False.
    `index` (int64 [n], optional): global positions of the entries, distinct over all ranks, in
    [0, 2**31 - 2**23]: ties at the k-th key then go to the lowest index instead of the lowest (rank,
    position), i.e. the selection is `topk_mask` of the entries laid out at their indices (e.g. dataset
    indices of samples spread over ranks in any pattern). When the tie group at the threshold spans
    ranks and is only partly taken, that costs a second selection of the same size over the ties' indices.

    scores: 1-D float32 / float16 / bfloat16 on any device (CUDA with NCCL, CPU with gloo); shards may
    differ in size (empty included). Communicates `selection_bytes(R, digit_bits)` bytes per rank, never
    the scores. In one process this is `aql_kernels.topk_mask` (on the valid entries).
    """
    where = "distributed.global_topk_mask"
    check_tensor(where, "scores", scores, ndim=1, dtypes=_FLOAT_DTYPES)
    check_int(where, "k", k, low=0)
    schedule = _check_digits(where, digit_bits)
    values = scores
    if valid is not None:
        check_tensor(where, "valid", valid, ndim=1, dtypes=(torch.bool,))
        if valid.shape != scores.shape:
            raise ValueError(f"aql.{where}: valid must have the shape of scores {tuple(scores.shape)}, got {tuple(valid.shape)}")
        positions = torch.nonzero(valid.to(scores.device)).squeeze(1)
        values = scores.index_select(0, positions)
    if index is not None:
        check_tensor(where, "index", index, ndim=1, dtypes=(torch.int64, torch.int32))
        if index.shape != scores.shape:
            raise ValueError(f"aql.{where}: index must have the shape of scores {tuple(scores.shape)}, got {tuple(index.shape)}")
        index = index.to(scores.device, torch.int64)
        if valid is not None:
            index = index.index_select(0, positions)
    local = _local_topk_mask(values.contiguous(), k, group, schedule, where, index)
    if valid is None:
        return local
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    return mask.index_copy_(0, positions, local)


def global_topk_indices(scores: torch.Tensor, k: int, *, group=None, valid: torch.Tensor | None = None,
                        index: torch.Tensor | None = None, digit_bits: Sequence[int] = DIGIT_BITS) -> torch.Tensor:
    """int64: the positions (into this rank's `scores`, ascending) where `global_topk_mask` is True."""
    mask = global_topk_mask(scores, k, group=group, valid=valid, index=index, digit_bits=digit_bits)
    return torch.nonzero(mask).squeeze(1)


def under_prefix(scores: torch.Tensor, prefix: int, prefix_bits: int) -> torch.Tensor:
    """The scores whose key (`aql_kernels.order_keys`) has its top `prefix_bits` equal to `prefix`, in
    their order, as float32: the keys under a prefix are one interval of floats (plus NaN when the
    interval starts at key 0), so two comparisons find them without computing a key.
    scores: 1-D float32 / float16 / bfloat16; 1 <= prefix_bits <= 31; 0 <= prefix < 2**prefix_bits."""
    where = "distributed.under_prefix"
    check_tensor(where, "scores", scores, ndim=1, dtypes=_FLOAT_DTYPES)
    check_int(where, "prefix_bits", prefix_bits, low=1)
    check_int(where, "prefix", prefix, low=0)
    if prefix_bits > 31 or prefix >= 1 << prefix_bits:
        raise ValueError(f"aql.{where}: need prefix_bits in [1, 31] and prefix in [0, 2**prefix_bits), "
                         f"got prefix_bits={prefix_bits}, prefix={prefix}")
    values = scores.to(torch.float32)
    low = prefix << (32 - prefix_bits)
    high = low | ((1 << (32 - prefix_bits)) - 1)
    nan = low == 0
    # clamp to keys that floats have: 0x007fffff is -inf, 0xff800000 +inf, and 0x7fffffff would be
    # -0.0, whose key is +0.0's (0x80000000): below it the interval ends at the smallest negative
    low, high = max(low, 0x007FFFFF), min(high, 0xFF800000)
    if high == 0x7FFFFFFF:
        high = 0x7FFFFFFE
    if low <= high:
        low_value, high_value = aql_kernels.key_to_float(torch.tensor([low, high])).tolist()
        inside = (values >= low_value) & (values <= high_value)
        if nan:
            inside |= torch.isnan(values)
    else:
        inside = torch.isnan(values) if nan else torch.zeros_like(values, dtype=torch.bool)
    return values[inside]


def _index_keys(index: torch.Tensor) -> torch.Tensor:
    """float32 whose selection order is ascending `index`: key 0xFF800000 - index (+inf for index 0,
    then the non-negative floats downwards), so the top-e of these are the e lowest indices."""
    return aql_kernels.key_to_float(0xFF800000 - index)


def _local_topk_mask(values: torch.Tensor, k: int, group, schedule: tuple[int, ...], where: str,
                     index: torch.Tensor | None = None) -> torch.Tensor:
    world = world_size(group)
    bad_index = index is not None and index.numel() > 0 and (int(index.min()) < 0 or int(index.max()) > _INDEX_LIMIT)
    if world == 1:
        if bad_index:
            raise ValueError(f"aql.{where}: index must be in [0, {_INDEX_LIMIT}], got [{int(index.min())}, {int(index.max())}]")
        if k > values.shape[0]:
            raise ValueError(f"aql.{where}: k must be in [0, {values.shape[0]}], got {k}")
        if index is None:
            return aql_kernels.topk_mask(values, k)
        # by key descending, ties by index ascending: a stable sort by index, then by key
        by_index = torch.sort(index, stable=True).indices
        keys = aql_kernels.order_keys(values).index_select(0, by_index)
        chosen = by_index.index_select(0, torch.sort(keys, descending=True, stable=True).indices[:k])
        return torch.zeros(values.shape[0], dtype=torch.bool, device=values.device).index_fill_(0, chosen, True)
    device = values.device
    me = rank(group)
    # round 1, one all-reduce (sum): the first digit's histogram, each rank's k and size in its own slot,
    # and the count of bad arguments, so that every rank checks the same k, k <= total and raises alike
    first = aql_kernels.digit_histogram(values, 0, 0, schedule[0])
    head = torch.zeros(2 * world + 1, dtype=torch.int64, device=device)
    head[me], head[world + me], head[2 * world] = k, values.shape[0], int(bad_index)
    summed = all_reduce_sum(torch.cat([first, head]), group)
    info = summed[first.shape[0]:].tolist()
    ks, sizes = info[:world], info[world:2 * world]
    if min(ks) != max(ks):
        raise ValueError(f"aql.{where}: every rank must pass the same k, got k from {min(ks)} to {max(ks)}")
    if info[2 * world]:
        raise ValueError(f"aql.{where}: index must be in [0, {_INDEX_LIMIT}] on every rank; a rank passed one outside")
    total = sum(sizes)
    if k > total:
        raise ValueError(f"aql.{where}: k must be in [0, {total}] (the scores of all {world} ranks), got {k}")
    if k == 0 or k == total:
        return torch.full((values.shape[0],), k > 0, dtype=torch.bool, device=device)
    local_histograms: list[torch.Tensor] = []
    first_round = [summed[:first.shape[0]]]

    candidates: list[torch.Tensor] = []

    def histogram(prefix: int, prefix_bits: int, bits: int) -> torch.Tensor:
        if first_round:  # the walk's first call: (0, 0, schedule[0]), all-reduced above
            local_histograms.append(first)
            return first_round.pop()
        if not candidates:  # later digits read only the scores under the first digit's prefix
            candidates.append(under_prefix(values, prefix, prefix_bits))
        counts = aql_kernels.digit_histogram(candidates[0], prefix, prefix_bits, bits)
        local_histograms.append(counts)
        return all_reduce_sum(counts.clone(), group)

    found = threshold_from_histograms(histogram, k, digit_bits=schedule)
    # this rank's keys above the threshold and equal to it, from its own histograms: per digit, the
    # buckets above the threshold's digit (under the prefix so far), and the threshold's bucket at the end
    greater, shift = 0, 32
    for counts, bits in zip(local_histograms, schedule):
        shift -= bits
        digit = (found.key >> shift) & ((1 << bits) - 1)
        greater += int(counts[digit + 1:].sum())
    equal = int(local_histograms[-1][found.key & ((1 << schedule[-1]) - 1)])
    equals = torch.zeros(world, dtype=torch.int64, device=device)
    equals[me] = equal
    counts = all_reduce_sum(equals, group).tolist()
    if index is None or found.equal_taken == sum(counts):
        taken = min(max(found.equal_taken - sum(counts[:me]), 0), equal)
        return aql_kernels.topk_mask(values, greater + taken)
    # the ties are partly taken and must go by index: the lowest equal_taken indices among them
    ties = aql_kernels.order_keys(values) == found.key
    chosen = global_topk_mask(_index_keys(index), found.equal_taken, group=group, valid=ties, digit_bits=schedule)
    return aql_kernels.topk_mask(values, greater) | chosen


# ------------------------------------------------------------------------------------------ epoch plans
def shard_indices(plan: torch.Tensor, rank: int, world: int, *, drop_last: bool = False) -> torch.Tensor:
    """Positions rank, rank + world, ... of `plan` (1-D), padded by wrapping around to a multiple of
    `world` (or cut to one with `drop_last`): every rank gets ceil(M / world) (floor with drop_last)
    entries of an M-entry plan, at most world - 1 of them repeats in all."""
    where = "distributed.shard_indices"
    check_tensor(where, "plan", plan, ndim=1)
    check_int(where, "world", world, low=1)
    check_int(where, "rank", rank, low=0)
    check_bool(where, "drop_last", drop_last)
    if rank >= world:
        raise ValueError(f"aql.{where}: rank must be in [0, {world - 1}], got {rank}")
    total = plan.numel()
    per_rank = total // world if drop_last else math.ceil(total / world)
    size = per_rank * world
    if size > total and total:  # pad by wrapping around (fewer than `world` entries, the plan repeated if shorter)
        plan = plan.repeat(math.ceil(size / total))[:size]
    return plan[rank:size:world]


class SampleOwnership:
    """Which rank owns each per-sample table row, and the selection and write routing across the owners.

    Ownership is fixed: rank i mod R owns sample i and keeps it at local row i // R (`owned_indices()`,
    `num_owned` = len(range(rank, N, R)), within one of N / R), so per-sample tables hold only their
    owned rows and no table records who owns what. Why this rule: it is balanced to one row, computed
    without a table or any communication, and stable across epochs; no fixed rule could make a rank own
    what it trains (the plans are shuffled), so under any rule about (R - 1) / R of a rank's writes go
    to another rank, at the next read of the table (`RoutedWrites`).

    Last writer wins, as in one process: `claim(plan)` (each epoch, `SelectionStrategy.shard_plan`)
    counts a generation (writes of later generations win) and notes the samples this rank trains that
    the plan, padded by wrapping around, trains again at a later position on another rank (`losers`;
    the padding repeats at most R - 1 positions per epoch): this rank's writes of those are dropped, so
    the later position's value wins.

    Selections (`topk_owned(keys, k)`): each rank passes the keys of its owned rows, the exact top-k of
    all ranks is taken by `global_topk_mask` (ties to the lowest dataset index, as
    `aql_kernels.topk_indices` breaks them on the whole table), and the selection is shared
    (`share_owned`: the k indices or a bit mask of the owned rows, whichever is smaller), ascending and
    the same on every rank.

    The state (`state_dict`) is the generation and the current losers: a few int64.
    """

    def __init__(self, num_samples: int, *, group=None, device: torch.device | str = "cpu"):
        where = "distributed.SampleOwnership"
        self.num_samples = check_int(where, "num_samples", num_samples, low=1)
        self.group = group
        self.rank, self.world = rank(group), world_size(group)
        self.device = torch.device(device)
        self.num_owned = len(range(self.rank, self.num_samples, self.world))
        self.generation = 0
        self.losers = torch.empty(0, dtype=torch.int64)

    def owned_indices(self, device: torch.device | str | None = None) -> torch.Tensor:
        """int64 [num_owned]: the dataset indices of this rank's rows (rank, rank + R, ...), ascending."""
        return torch.arange(self.rank, self.num_samples, self.world, device=self.device if device is None else device)

    def owns(self, indices: torch.Tensor) -> torch.Tensor:
        """bool: whether this rank owns each of the dataset `indices`."""
        return indices % self.world == self.rank

    def local_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """int64: the local row of each owned dataset index (index // R)."""
        return torch.div(indices, self.world, rounding_mode="floor")

    def claim(self, plan: torch.Tensor, *, drop_last: bool = False) -> None:
        """Starts a generation for the epoch whose plan is `plan` (1-D int64 dataset indices), trained
        as `shard_indices` splits it: position p (of the plan padded by wrapping, or cut with
        `drop_last`) on rank p mod R. `losers` becomes the samples this rank trains whose last position
        is on another rank (a sort of the plan; empty unless the padding repeats a sample)."""
        where = "distributed.SampleOwnership.claim"
        check_tensor(where, "plan", plan, ndim=1, dtypes=(torch.int64, torch.int32))
        check_bool(where, "drop_last", drop_last)
        self.generation += 1
        total = plan.numel()
        size = (total // self.world if drop_last else math.ceil(total / self.world)) * self.world
        if self.world == 1 or size == 0:
            self.losers = torch.empty(0, dtype=torch.int64)
            return
        padded = plan.to("cpu", torch.int64)
        padded = padded.repeat(math.ceil(size / total))[:size] if size > total else padded[:size]
        values, positions = torch.sort(padded, stable=True)
        run_start = torch.ones(size, dtype=torch.bool)
        run_start[1:] = values[1:] != values[:-1]
        run = torch.cumsum(run_start, 0) - 1
        last = torch.ones(size, dtype=torch.bool)
        last[:-1] = run_start[1:]
        winner = (positions[last] % self.world)[run]  # the rank of each sample's last position
        mine = positions % self.world == self.rank
        self.losers = torch.unique(values[mine & (winner != self.rank)])

    def topk_owned(self, keys: torch.Tensor, k: int, *, valid: torch.Tensor | None = None,
                   digit_bits: Sequence[int] = DIGIT_BITS) -> torch.Tensor:
        """int64 [k] ascending, the same on every rank: the exact top-k of the keys of all ranks, `keys`
        (float [num_owned]) being this rank's, one per owned row (`valid`: only these take part); ties
        to the lowest dataset index. Every rank calls it with the same k (a collective)."""
        where = "distributed.SampleOwnership.topk_owned"
        check_tensor(where, "keys", keys, ndim=1, dtypes=_FLOAT_DTYPES)
        if keys.shape[0] != self.num_owned:
            raise ValueError(f"aql.{where}: keys must have one entry per owned row ({self.num_owned}), got {keys.shape[0]}")
        owned = self.owned_indices(keys.device)
        mine = global_topk_mask(keys, k, group=self.group, valid=valid, index=owned, digit_bits=digit_bits)
        return self.share_owned(mine)

    def share_owned(self, chosen: torch.Tensor) -> torch.Tensor:
        """int64 ascending, the same on every rank: the dataset indices of the owned rows that `chosen`
        (bool [num_owned], this rank's) marks on any rank. Sent the cheaper way for the total count c
        (one all-reduce of it decides, alike on every rank): the indices (`share_indices`, 8 c bytes
        received per rank), or each rank's bit mask of its owned rows (ceil(N / R) / 8 bytes per rank,
        N / 8 received): the mask wins when c > N / 64, e.g. a 20% selection (0.2 N x 8 bytes = 1.6 N)."""
        where = "distributed.SampleOwnership.share_owned"
        check_tensor(where, "chosen", chosen, ndim=1, dtypes=(torch.bool,))
        if chosen.shape[0] != self.num_owned:
            raise ValueError(f"aql.{where}: chosen must have one entry per owned row ({self.num_owned}), got {chosen.shape[0]}")
        owned = self.owned_indices(chosen.device)
        if self.world == 1:
            return owned[chosen]
        count = int(all_reduce_sum(chosen.sum().reshape(1).to(torch.int64), self.group)[0])
        rows = -(-self.num_samples // self.world)  # the most rows a rank owns
        if 8 * count <= self.world * -(-rows // 8):
            return share_indices(owned[chosen], self.group)
        bits = _pack_bits(torch.cat([chosen, chosen.new_zeros(rows - chosen.shape[0])]))
        gathered = [torch.empty_like(bits) for _ in range(self.world)]
        dist.all_gather(gathered, bits, group=self.group)
        mask = torch.zeros(rows * self.world, dtype=torch.bool, device=chosen.device)
        for source, got in enumerate(gathered):  # rank r's owned row j is sample r + j R
            mask[source::self.world] = _unpack_bits(got, rows)
        return torch.nonzero(mask[:self.num_samples]).flatten()

    def topk_indices(self, keys: torch.Tensor, k: int, *, digit_bits: Sequence[int] = DIGIT_BITS) -> torch.Tensor:
        """`topk_owned` of the owned entries of `keys` (float [num_samples], one per sample; the entries
        of samples other ranks own are ignored)."""
        where = "distributed.SampleOwnership.topk_indices"
        check_tensor(where, "keys", keys, ndim=1, dtypes=_FLOAT_DTYPES)
        if keys.shape[0] != self.num_samples:
            raise ValueError(f"aql.{where}: keys must have num_samples={self.num_samples} entries, got {keys.shape[0]}")
        return self.topk_owned(keys[self.rank::self.world].contiguous(), k, digit_bits=digit_bits)

    def state_dict(self) -> dict[str, Any]:
        return {"world": self.world, "rank": self.rank, "generation": self.generation, "losers": self.losers.clone()}

    def load_state_dict(self, state) -> None:
        where = "distributed.SampleOwnership.load_state_dict"
        if not isinstance(state, dict) or "generation" not in state or "losers" not in state:
            raise ValueError(f"aql.{where}: state must be a dict with 'generation' and 'losers' (a checkpoint of this "
                             f"version), got {sorted(state) if isinstance(state, dict) else type(state).__name__}")
        if (state.get("world"), state.get("rank")) != (self.world, self.rank):
            raise ValueError(f"aql.{where}: the state was written by rank {state.get('rank')} of {state.get('world')}, "
                             f"this is rank {self.rank} of {self.world}")
        check_tensor(where, "state['losers']", state["losers"], ndim=1, dtypes=(torch.int64,))
        self.generation = check_int(where, "state['generation']", state["generation"], low=0)
        self.losers = state["losers"].to("cpu").clone()


_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


def _pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """uint8 [ceil(n / 8)]: bit j of byte i is mask[8 i + j] (bool [n])."""
    padded = torch.cat([mask.to(torch.uint8), mask.new_zeros(-mask.shape[0] % 8, dtype=torch.uint8)]).view(-1, 8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded * weights).sum(1, dtype=torch.uint8)


def _unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """bool [n]: the first n bits of `_pack_bits`' bytes."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=bits.device)
    return (bits.unsqueeze(1) & weights).ne(0).view(-1)[:n]


def share_indices(indices: torch.Tensor, group=None, *, chunk_rows: int | None = None) -> torch.Tensor:
    """int64, ascending, the same on every rank: the union of the ranks' `indices` (1-D int64, no index
    on two ranks), by all_gathers of equal-sized blocks of at most `chunk_rows` (default `CHUNK_ROWS`)
    int64 per rank: each rank receives R * max_r(len) int64 (k in all for a k-selection shared evenly),
    plus one all-reduce of one int64. `indices` sorted in one process."""
    check_tensor("distributed.share_indices", "indices", indices, ndim=1, dtypes=(torch.int64,))
    if world_size(group) == 1:
        return torch.sort(indices).values
    parts = _gather_blocks(indices.unsqueeze(1), group, chunk_rows)
    return torch.sort(torch.cat([part[:, 0] for part in parts])).values


#: rows per rank per all_gather round of `share_indices` and `RoutedWrites.exchange`: a round sends at
#: most CHUNK_ROWS * 8 * columns bytes per rank (2 MiB for the 4 int64 columns of a ranked write)
CHUNK_ROWS = 1 << 16


def _gather_blocks(rows: torch.Tensor, group, chunk_rows: int | None, keep=None) -> list[torch.Tensor]:
    """Every rank's int64 [n_r, W] `rows` (first column >= 0), as a list indexed by source rank of the
    rows each sends, filtered by `keep(rows) -> bool` for the other ranks' rows; in rounds of at most
    `chunk_rows` rows per rank (padded with -1 to the largest n_r of the round): all_gather only, which
    gloo and NCCL both have."""
    chunk = CHUNK_ROWS if chunk_rows is None else check_int("distributed", "chunk_rows", chunk_rows, low=1)
    world, me = world_size(group), rank(group)
    longest = int(all_reduce_max(torch.tensor([rows.shape[0]], dtype=torch.int64, device=rows.device), group)[0])
    received: list[list[torch.Tensor]] = [[rows[:0]] for _ in range(world)]
    received[me].append(rows)
    for start in range(0, longest, chunk):
        block = torch.full((min(chunk, longest - start), rows.shape[1]), -1, dtype=torch.int64, device=rows.device)
        part = rows[start:start + chunk]
        block[:part.shape[0]] = part
        gathered = [torch.empty_like(block) for _ in range(world)]
        dist.all_gather(gathered, block, group=group)
        for source, got in enumerate(gathered):
            if source != me:
                got = got[got[:, 0] >= 0]
                received[source].append(got[keep(got)] if keep is not None else got)
    return [torch.cat(parts) for parts in received]


class RoutedWrites:
    """The writes of this rank to a per-sample table sharded by a `SampleOwnership`, on their way to the
    owners of the rows.

    `append(indices, *payload)` is the per-step call: it keeps the tensors by reference with the
    ownership's current generation and losers (no op, no check, no host synchronisation). `exchange()`
    (a collective: every rank calls it when it next reads its table) drops this rank's losers' writes,
    keeps each sample's last local write, sends each row to its owner (`_gather_blocks`: all_gathers
    of at most `CHUNK_ROWS` rows per rank per round) and returns the rows this rank owns, one per
    sample, the latest by (generation, then source rank): `(local_rows, payload)` with payload int64
    [m, columns]. A payload entry is a float32 tensor (its bits: decode with `float_column`), an int64
    tensor, or a Python int (the same for every row of the call). Between exchanges the buffer holds
    the tensors of this rank's writes (at most the rows it trains in an epoch when the table is read
    each epoch).

    `state_dict()` is the pending rows after the local reductions (int64 [n, 2 + columns]: index,
    generation, payload): a checkpoint carries them without a collective.
    """

    def __init__(self, ownership: SampleOwnership, columns: int):
        self.ownership = ownership
        self.columns = check_int("distributed.RoutedWrites", "columns", columns, low=1)
        self._chunks: list[tuple] = []
        self._rows: torch.Tensor | None = None  # rows carried over from a checkpoint, older than the chunks

    def append(self, indices: torch.Tensor, *payload) -> None:
        """Queues the writes `payload[j][i]` to sample `indices[i]` (see the class docstring)."""
        self._chunks.append((indices, payload, self.ownership.generation, self.ownership.losers))

    @property
    def pending(self) -> int:
        """Rows appended since the last exchange (before the local reductions); no synchronisation."""
        return sum(chunk[0].shape[0] for chunk in self._chunks) + (0 if self._rows is None else self._rows.shape[0])

    def rows(self) -> torch.Tensor:
        """int64 [n, 2 + columns]: the pending writes (index, generation, payload), the losers' dropped,
        one per sample (the last written), ascending index."""
        parts = [] if self._rows is None else [self._rows]
        for indices, payload, generation, losers in self._chunks:
            indices = indices.to(torch.int64)
            columns = [indices, torch.full_like(indices, generation)]
            for value in payload:
                if isinstance(value, torch.Tensor):
                    value = value.detach()
                    columns.append(value.view(torch.int32).to(torch.int64) if value.dtype == torch.float32 else value.to(torch.int64))
                else:
                    columns.append(torch.full_like(indices, int(value)))
            rows = torch.stack(columns, dim=1)
            if losers.numel():
                rows = rows[~torch.isin(indices, losers.to(indices.device))]
            parts.append(rows)
        if not parts:
            return torch.empty((0, 2 + self.columns), dtype=torch.int64, device=self.ownership.device)
        return _latest(torch.cat(parts))

    def exchange(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(local_rows int64 [m], payload int64 [m, columns]): the latest write of each owned sample that
        any rank wrote since the last exchange (see the class docstring); empties the buffer."""
        rows = self.rows()
        self._chunks, self._rows = [], None
        owner = self.ownership
        if owner.world == 1:
            return rows[:, 0], rows[:, 2:]
        mine = owner.owns(rows[:, 0])
        parts = _gather_blocks(rows[~mine], owner.group, None, keep=lambda got: owner.owns(got[:, 0]))
        parts[owner.rank] = rows[mine]
        sources = torch.cat([torch.full((part.shape[0], 1), source, dtype=torch.int64, device=rows.device)
                             for source, part in enumerate(parts)])
        merged = _latest(torch.cat([torch.cat(parts), sources], dim=1), tiebreak=-1)
        return owner.local_rows(merged[:, 0]), merged[:, 2:2 + self.columns]

    def state_dict(self) -> dict[str, Any]:
        return {"columns": self.columns, "rows": self.rows().cpu()}

    def load_state_dict(self, state) -> None:
        where = "distributed.RoutedWrites.load_state_dict"
        if not isinstance(state, dict) or state.get("columns") != self.columns or "rows" not in state:
            raise ValueError(f"aql.{where}: state must be a dict with columns={self.columns} and 'rows', got "
                             f"{ {k: v for k, v in state.items() if k != 'rows'} if isinstance(state, dict) else type(state).__name__}")
        check_tensor(where, "state['rows']", state["rows"], ndim=2, dtypes=(torch.int64,))
        if state["rows"].shape[1] != 2 + self.columns:
            raise ValueError(f"aql.{where}: state['rows'] must have {2 + self.columns} columns, got {state['rows'].shape[1]}")
        self._chunks = []
        self._rows = state["rows"].to(self.ownership.device).clone()


def float_column(column: torch.Tensor) -> torch.Tensor:
    """float32: a `RoutedWrites` payload column that carried float32 values (their bits, exactly)."""
    return column.to(torch.int32).view(torch.float32)


def _latest(rows: torch.Tensor, tiebreak: int | None = None) -> torch.Tensor:
    """One row per distinct rows[:, 0], ascending: the last in order of (generation = column 1, then
    column `tiebreak` when given, then position in `rows`)."""
    order = torch.arange(rows.shape[0], device=rows.device)
    for column in ([tiebreak] if tiebreak is not None else []) + [1, 0]:  # least significant key first
        order = order.index_select(0, torch.sort(rows.index_select(0, order)[:, column], stable=True).indices)
    rows = rows.index_select(0, order)
    last = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device)
    last[:-1] = rows[1:, 0] != rows[:-1, 0]
    return rows[last]


def union_of_disjoint_masks(mask: torch.Tensor, group=None) -> torch.Tensor:
    """The union over ranks of bool masks that no two ranks set at the same entry: the masks packed 8
    entries per byte and summed by one all-reduce (disjoint bits add without carries)."""
    if world_size(group) == 1:
        return mask
    n = mask.shape[0]
    padded = torch.zeros(math.ceil(n / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=mask.device)
    packed = (padded.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)
    all_reduce_sum(packed, group)
    return (packed.unsqueeze(1) & weights).ne(0).view(-1)[:n]
