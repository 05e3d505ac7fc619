"""Fused softmax statistics (placeholder: reference only, the kernels land in their own change)."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ._validation import FLOAT_DTYPES, check_int, check_tensor

__all__ = ["SoftmaxScores", "softmax_scores", "softmax_scores_reference", "cross_entropy_with_scores", "IMPLEMENTATIONS"]


class SoftmaxScores(NamedTuple):
    lse: torch.Tensor
    entropy: torch.Tensor
    maxprob: torch.Tensor
    margin: torch.Tensor
    argmax: torch.Tensor
    loss: torch.Tensor | None = None
    el2n: torch.Tensor | None = None


def _validate(logits, targets, ignore_index, op="softmax_scores"):
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"aql_kernels.{op}: logits must have N >= 1 rows and V >= 1 columns, got shape {tuple(logits.shape)}")
    check_int(op, "ignore_index", ignore_index)
    if targets is not None:
        check_tensor(op, "targets", targets, ndim=1, dtypes=(torch.int64, torch.int32), device=logits.device)
        if targets.shape[0] != logits.shape[0]:
            raise ValueError(f"aql_kernels.{op}: targets must have length N={logits.shape[0]}, got {targets.shape[0]}")


def softmax_scores_reference(logits: torch.Tensor, targets: torch.Tensor | None = None, *, ignore_index: int = -100,
                             accumulate_dtype: torch.dtype = torch.float32) -> SoftmaxScores:
    """The spec, in plain torch (accumulate_dtype=float64 for the tests' reference)."""
    _validate(logits, targets, ignore_index, "softmax_scores_reference")
    x = logits.to(accumulate_dtype)
    lse = torch.logsumexp(x, dim=1)
    logp = x - lse[:, None]
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=1)
    if x.shape[1] >= 2:
        top2 = p.topk(2, dim=1).values
        maxprob, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
    else:
        maxprob = p[:, 0]
        margin = torch.ones_like(maxprob)
    argmax = torch.argmax(x, dim=1)
    loss = el2n = None
    if targets is not None:
        targets = targets.long()
        valid = targets != ignore_index
        safe = torch.where(valid, targets, torch.zeros_like(targets))
        picked = x.gather(1, safe[:, None]).squeeze(1)
        p_target = p.gather(1, safe[:, None]).squeeze(1)
        loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
        el2n = torch.where(valid, ((p * p).sum(dim=1) - 2 * p_target + 1).clamp_min(0).sqrt(), torch.zeros_like(lse))
    out = [lse, entropy, maxprob, margin]
    out = [t.float() if accumulate_dtype != torch.float64 else t for t in out]
    if loss is not None and accumulate_dtype != torch.float64:
        loss, el2n = loss.float(), el2n.float()
    return SoftmaxScores(*out, argmax, loss, el2n)


def softmax_scores(logits: torch.Tensor, targets: torch.Tensor | None = None, *, ignore_index: int = -100) -> SoftmaxScores:
    _validate(logits, targets, ignore_index)
    return softmax_scores_reference(logits, targets, ignore_index=ignore_index)


def cross_entropy_with_scores(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"):
    _validate(logits, targets, ignore_index, "cross_entropy_with_scores")
    if targets is None:
        raise ValueError("aql_kernels.cross_entropy_with_scores: targets are required")
    scores = softmax_scores_reference(logits.detach(), targets, ignore_index=ignore_index)
    loss = torch.nn.functional.cross_entropy(logits.float(), targets.long(), ignore_index=ignore_index, reduction=reduction)
    return loss, scores


IMPLEMENTATIONS = {"reference": softmax_scores_reference}
