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
batches. `SampleOwnership` records which rank trained each sample last, so that per-sample tables
written from the training forward (each rank writes only what it trained: the tables are sharded by
rank) enter a global selection once, from the rank that holds the sample's latest value.
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
           "shard_indices", "SampleOwnership", "union_of_disjoint_masks", "under_prefix", "DIGIT_BITS"]

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
    """Which rank holds the latest per-sample value of each of `num_samples` samples, and exact top-k
    selections over the holders' values.

    A loop that trains `shard_indices(plan, r, R)` on rank r writes each sample's score on the rank
    that trained it; `claim(plan)` records that (position p of the plan -> rank p mod R; a sample
    padded in twice stays with its first position's rank). Before any claim, rank r holds the samples
    i with i mod R == r (so a never-seen sample's initial value counts once). `topk_indices(keys, k)`
    is then the exact top-k of the table a one-process run would hold (ties to the lowest dataset index,
    as `aql_kernels.topk_indices` breaks them): every rank passes its full
    [num_samples] keys, only the held entries take part (`global_topk_mask(..., valid=held)`), and the
    selected set, ascending, comes back on every rank: the ranks' masks are disjoint, so one
    all-reduce (sum) of the masks packed 8 per byte is their union (ceil(num_samples / 8) bytes).

    `held` (bool [num_samples]) is the whole state (`state_dict`).
    """

    def __init__(self, num_samples: int, *, group=None, device: torch.device | str = "cpu"):
        where = "distributed.SampleOwnership"
        self.num_samples = check_int(where, "num_samples", num_samples, low=1)
        self.group = group
        self.rank, self.world = rank(group), world_size(group)
        self.device = torch.device(device)
        self.held = torch.arange(num_samples, device=self.device) % self.world == self.rank

    def claim(self, plan: torch.Tensor, *, drop_last: bool = False) -> None:
        """Records that rank p mod R trains position p of `plan` (distinct dataset indices, 1-D int64),
        as `shard_indices` splits it; with `drop_last` the cut positions stay with their holders."""
        where = "distributed.SampleOwnership.claim"
        check_tensor(where, "plan", plan, ndim=1, dtypes=(torch.int64, torch.int32))
        total = plan.numel()
        size = (total // self.world) * self.world if drop_last else total
        positions = torch.arange(size, device=self.device)
        self.held.index_copy_(0, plan[:size].to(self.device, torch.int64), positions % self.world == self.rank)

    def topk_indices(self, keys: torch.Tensor, k: int, *, digit_bits: Sequence[int] = DIGIT_BITS) -> torch.Tensor:
        """int64 [k] ascending: the exact top-k of the held keys of all ranks (the same on every rank)."""
        where = "distributed.SampleOwnership.topk_indices"
        check_tensor(where, "keys", keys, ndim=1, dtypes=_FLOAT_DTYPES)
        if keys.shape[0] != self.num_samples:
            raise ValueError(f"aql.{where}: keys must have num_samples={self.num_samples} entries, got {keys.shape[0]}")
        held = self.held.to(keys.device)
        index = torch.arange(self.num_samples, device=keys.device)
        mine = global_topk_mask(keys, k, group=self.group, valid=held, index=index, digit_bits=digit_bits)
        return torch.nonzero(union_of_disjoint_masks(mine, self.group)).squeeze(1)

    def state_dict(self) -> dict[str, Any]:
        return {"world": self.world, "rank": self.rank, "held": self.held.cpu().clone()}

    def load_state_dict(self, state) -> None:
        where = "distributed.SampleOwnership.load_state_dict"
        if not isinstance(state, dict) or "held" not in state:
            raise ValueError(f"aql.{where}: state must be a dict with 'held', got {type(state).__name__}")
        if (state.get("world"), state.get("rank")) != (self.world, self.rank):
            raise ValueError(f"aql.{where}: the state was written by rank {state.get('rank')} of {state.get('world')}, "
                             f"this is rank {self.rank} of {self.world}")
        check_tensor(where, "state['held']", state["held"], ndim=1, dtypes=(torch.bool,))
        if state["held"].shape[0] != self.num_samples:
            raise ValueError(f"aql.{where}: state['held'] must have {self.num_samples} entries, got {state['held'].shape[0]}")
        self.held.copy_(state["held"])


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
