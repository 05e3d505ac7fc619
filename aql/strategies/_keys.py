"""Selection keys shared by the score-driven strategies: every rule here turns per-sample scores into
float32 keys whose exact top-k (`aql_kernels.topk_indices` / `topk_mask`: NaN lowest, ties to the
lowest index) is the selection. Keys stay on the scores' device; nothing here synchronises with it.

- `score_values`: which per-sample statistic ranks the samples (`SCORE_NAMES`).
- `balanced_keys`: per-class quotas inside the top-k (stratified by label), exact total k.
- `sampling_keys`: a draw without replacement with probabilities proportional to a score
  (Efraimidis & Spirakis 2006: the top-k of log(u) / w), and `inclusion_weights` for it.
- `band_keys`: a curriculum window on the quantiles of the current scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["SCORE_NAMES", "score_values", "rank_fraction", "balanced_keys", "sampling_keys", "inclusion_weights",
           "band_keys", "quota"]

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
