"""Selection keys shared by the score-driven strategies: every rule here turns per-sample scores into
float32 keys whose exact top-k (`aql_kernels.topk_indices` / `topk_mask`: NaN lowest, ties to the
lowest index) is the selection. Keys stay on the scores' device; nothing here synchronises with it.

- `score_values`: which per-sample statistic ranks the samples (`SCORE_NAMES`).
- `balanced_keys`: per-class quotas inside the top-k (stratified by label), exact total k;
  `balanced_quotas` (the quotas from the class counts alone) and `balanced_topk_owned` (the same
  selection across ranks, from each rank's owned rows).
- `sampling_keys`: a draw without replacement with probabilities proportional to a score
  (Efraimidis & Spirakis 2006: the top-k of log(u) / w), and `inclusion_weights` for it.
- `band_keys`: a curriculum window on the quantiles of the current scores.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["SCORE_NAMES", "score_values", "rank_fraction", "balanced_keys", "balanced_quotas", "balanced_topk_owned",
           "sampling_keys", "inclusion_weights", "band_keys", "quota"]

# loss: cross-entropy; el2n: ||softmax - onehot||_2, the gradient norm w.r.t. the logits, an upper
# bound (up to a constant) of the per-sample gradient norm of the last layer (Katharopoulos & Fleuret
# 2018); entropy / margin: label-free uncertainty (margin ranks small margins first); reducible: the
# loss minus a stored irreducible loss (RHO-LOSS, Mindermann et al. 2022).
SCORE_NAMES = ("loss", "el2n", "entropy", "margin", "reducible")


def score_values(scores, name: str, irreducible: torch.Tensor | None = None, indices: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [B] values of statistic `name` from an `aql_kernels.SoftmaxScores` (higher = more
    informative). `reducible` needs the irreducible-loss table and the rows' dataset indices."""
    if name == "margin":
        return 1.0 - scores.margin
    if name == "reducible":
        return scores.loss - irreducible.index_select(0, indices.to(irreducible.device)).to(scores.loss.device)
    return getattr(scores, name)


def rank_fraction(values: torch.Tensor) -> torch.Tensor:
    """float32 [B]: (ascending rank + 0.5) / B of each value (ties by index; NaN ranks lowest)."""
    clean = torch.nan_to_num(values.float(), nan=-math.inf)
    order = torch.sort(clean, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel(), device=order.device)
    return (ranks.float() + 0.5) / max(1, order.numel())


def balanced_keys(keys: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Keys whose top-k takes from each class in proportion to its share of the rows, best `keys`
    first within a class: key' = -(rank of the row within its class + 1/2) / (rows of its class).

    The top-k of key' holds k exactly, and gives class c about k * n_c / n rows (a stratified
    selection), so that a high-loss subset never collapses onto a few labels. Ties between classes
    at the same fractional rank go to the lowest index."""
    clean = torch.nan_to_num(keys.float(), nan=-math.inf)
    order = torch.sort(clean, descending=True, stable=True).indices
    sorted_labels = labels.to(clean.device).long()[order]
    running = F.one_hot(sorted_labels, num_classes).cumsum(0)  # [B, C]: rows of each class so far, best first
    rank = running.gather(1, sorted_labels.unsqueeze(1)).squeeze(1) - 1
    out = torch.empty_like(clean)
    out[order] = -(rank.float() + 0.5) / running[-1][sorted_labels].float()
    return out


def _fractional_rank_keys(rank: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`balanced_keys`' key of the row at `rank` in a class of `rows` rows, with its float32 roundings."""
    return -(rank.astype(np.float32) + np.float32(0.5)) / np.maximum(rows, 1).astype(np.float32)


def _ranks_at_least(rows: np.ndarray, threshold: np.float32) -> np.ndarray:
    """Per class, how many of its keys are >= `threshold` (the keys fall with the rank: a bisection)."""
    low, high = np.zeros_like(rows), rows.copy()  # the count lies in [low, high]
    while (low < high).any():
        middle = (low + high) // 2
        above = _fractional_rank_keys(middle, rows) >= threshold
        open_ = low < high
        low = np.where(open_ & above, middle + 1, low)
        high = np.where(open_ & ~above, middle, high)
    return low


def balanced_quotas(class_rows, k: int) -> tuple[list[int], list[int]]:
    """The class quotas of the top-k of `balanced_keys` from the class sizes alone: (above, tied), per
    class c the top above[c] rows of c by key are taken, and of the next tied[c] rows of each class
    (whose balanced key equals the k-th largest) the k - sum(above) with the lowest dataset index.
    class_rows: rows per class (ints >= 0); 0 <= k <= sum(class_rows). Host arithmetic on the class
    counts (float32 as `balanced_keys` rounds): ~32 bisection steps of ~log2(N) vector steps each."""
    rows = np.asarray(list(class_rows), dtype=np.int64)
    if rows.ndim != 1 or (rows < 0).any() or not 0 <= k <= int(rows.sum()):
        raise ValueError(f"aql.strategies._keys.balanced_quotas: need class_rows >= 0 and k in [0, {int(rows.sum())}], "
                         f"got class_rows={rows.tolist()}, k={k}")
    if k == 0:
        return [0] * rows.size, [0] * rows.size
    # the k-th largest key: all keys lie in [-1, 0), where the float32 bits grow as the value falls;
    # the smallest bits whose value has >= k keys at or above it
    low, high = 0x80000000, 0xBF800000  # -0.0: no key at or above it; -1.0: every key
    while high - low > 1:
        middle = (low + high) // 2
        value = np.array([middle], dtype=np.uint32).view(np.float32)[0]
        if int(_ranks_at_least(rows, value).sum()) >= k:
            high = middle
        else:
            low = middle
    threshold = np.array([high], dtype=np.uint32).view(np.float32)[0]
    at_least = _ranks_at_least(rows, threshold)
    above = _ranks_at_least(rows, np.nextafter(threshold, np.float32(0.0)))  # strictly above the threshold
    return above.tolist(), (at_least - above).tolist()


def balanced_topk_owned(ownership, keys: torch.Tensor, labels: torch.Tensor, num_classes: int, k: int) -> torch.Tensor:
    """int64 [k] ascending, the same on every rank: `aql_kernels.topk_indices(balanced_keys(all keys,
    all labels), k)` computed from each rank's owned rows (`aql.distributed.SampleOwnership`: `keys`
    and `labels` [num_owned] of this rank). A collective: an all-reduce of the [num_classes] class
    counts, then `balanced_quotas` on every rank alike, one `global_topk_mask` per class with a quota
    (two where the class holds rows tied at the k-th balanced key) and one over the tied rows by index."""
    from aql.distributed import all_reduce_sum, global_topk_mask

    clean = torch.nan_to_num(keys.float(), nan=-math.inf)  # as balanced_keys: NaN ties with -inf
    labels = labels.to(clean.device).long()
    counts = all_reduce_sum(torch.bincount(labels, minlength=num_classes)[:num_classes].clone(), ownership.group)
    above, tied = balanced_quotas(counts.tolist(), k)
    index = ownership.owned_indices(clean.device)
    chosen = torch.zeros(clean.shape[0], dtype=torch.bool, device=clean.device)
    ties = torch.zeros_like(chosen)
    for c in range(num_classes):
        if above[c] == 0 and tied[c] == 0:
            continue
        inside = labels == c
        top = global_topk_mask(clean, above[c], group=ownership.group, valid=inside, index=index)
        chosen |= top
        if tied[c]:
            ties |= global_topk_mask(clean, above[c] + tied[c], group=ownership.group, valid=inside, index=index) & ~top
    need = k - sum(above)
    if need == sum(tied):
        chosen |= ties
    elif need:  # the lowest dataset indices among the tied rows: equal keys, ties by index
        chosen |= global_topk_mask(torch.zeros_like(clean), need, group=ownership.group, valid=ties, index=index)
    return ownership.share_owned(chosen)


def sampling_keys(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Keys whose top-k is a draw of k rows without replacement, each step proportional to `weights`
    (>= 0; a zero weight is drawn last): log(u) / w with u ~ U(0, 1]."""
    u = torch.rand(weights.shape, generator=generator, device=generator.device).to(weights.device)
    return torch.log1p(-u) / weights.float().clamp_min(1e-30)  # log1p(-u): u in [0, 1) -> log of (0, 1]


def inclusion_weights(weights: torch.Tensor, k: int, max_weight: float) -> torch.Tensor:
    """Bounded importance weights for a size-k draw proportional to `weights`: 1 / pi with
    pi = min(1, k w / sum w) (the inclusion probability to first order), clipped to
    [1, max_weight * min], then divided by their mean, so that they average 1 and the largest is at
    most `max_weight` times the smallest (unbounded weights let a handful of samples swamp the
    gradient)."""
    w = weights.float().clamp_min(0)
    pi = (k * w / w.sum().clamp_min(1e-30)).clamp(1e-12, 1.0)
    inverse = 1.0 / pi
    inverse = torch.minimum(inverse, inverse.min() * max_weight)
    return inverse / inverse.mean()


def band_keys(values: torch.Tensor, keys: torch.Tensor, upper: float) -> torch.Tensor:
    """`keys` where the row's value lies in the easiest `upper` fraction (by ascending rank of
    `values`), -inf elsewhere: a curriculum band on the quantiles of the current values, so the band
    always holds round(upper * B) rows and can never run dry."""
    inside = rank_fraction(values) <= upper
    return torch.where(inside, keys.float(), torch.full_like(keys, -math.inf, dtype=torch.float32))


def quota(seen: int, kept: int, budget: float) -> int:
    """How many of the next rows to keep so that, after them, floor(budget * seen + 1/2) rows are kept
    in all (`seen` includes the next rows): the budget held exactly over a stream."""
    return max(0, int(math.floor(budget * seen + 0.5 + 1e-9)) - kept)
