"""Squared-gradient Fisher EMA (placeholder: reference only, the kernels land in their own change)."""

from __future__ import annotations

import torch

__all__ = ["fisher_ema_", "fisher_ema_reference", "IMPLEMENTATIONS"]


def fisher_ema_reference(fisher: list[torch.Tensor], grads: list[torch.Tensor | None], decay: float, *, scale: float = 1.0) -> None:
    pairs = [(f, g) for f, g in zip(fisher, grads) if g is not None]
    if not pairs:
        return
    states = [f for f, _ in pairs]
    scaled = [g.float() * scale for _, g in pairs]
    torch._foreach_mul_(states, decay)
    torch._foreach_addcmul_(states, scaled, scaled, value=1.0 - decay)


def fisher_ema_(fisher: list[torch.Tensor], grads: list[torch.Tensor | None], decay: float, *, scale: float = 1.0) -> None:
    fisher_ema_reference(fisher, grads, decay, scale=scale)


IMPLEMENTATIONS = {"reference": fisher_ema_reference}
