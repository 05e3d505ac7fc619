"""Exact top-k selection (placeholder: reference only, the kernels land in their own change)."""

from __future__ import annotations

import torch

__all__ = ["topk_mask", "topk_indices", "topk_threshold", "topk_mask_reference", "IMPLEMENTATIONS"]


def _order(scores: torch.Tensor) -> torch.Tensor:
    keys = scores.float().clone()
    keys = torch.where(keys == 0, torch.zeros_like(keys), keys)  # -0.0 == +0.0
    keys = torch.where(torch.isnan(keys), torch.full_like(keys, float("-inf")), keys)
    nan_last = torch.isnan(scores.float()).to(torch.int8)
    # stable descending sort with NaN below -inf: sort by (is_nan asc, value desc, index asc)
    order = torch.sort(-keys, stable=True).indices
    order = order[torch.sort(nan_last[order], stable=True).indices]
    return order


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.sort(_order(scores)[:k]).values


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    mask[_order(scores)[:k]] = True
    return mask


def topk_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    if k == 0:
        return torch.tensor(float("inf"), device=scores.device)
    return scores.float()[_order(scores)[k - 1]]


topk_mask_reference = topk_mask
IMPLEMENTATIONS = {"reference": topk_mask_reference}


def digit_histogram(scores: torch.Tensor, prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
    raise NotImplementedError("aql_kernels.digit_histogram: not built yet")
