"""Irreducible losses for RHO-LOSS (Mindermann et al. 2022, "Prioritized training on points that are
learnable, worth learning, and not yet learnt"): a model trained on a holdout split, its loss on
every training sample computed once and stored. A training sample's reducible loss is then its
current training loss minus that stored value (`score: reducible` in `online` and `ranked`): high for
what the model could still learn, low for what even a model trained on other data gets wrong (noise,
ambiguity) or what is already learnt.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from aql._checks import check_int, check_interval

__all__ = ["irreducible_losses"]


def _arrays(dataset, where: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    from aql.training.batches import gather

    if dataset is None or not hasattr(dataset, "__len__") or len(dataset) == 0:
        raise ValueError(f"aql.{where}: {name} must be a non-empty dataset of (x, y) samples, got {dataset!r}")
    return gather(dataset, torch.arange(len(dataset)))


def irreducible_losses(train_data, holdout_data, *, model_factory: Callable[[], nn.Module], seed: int = 0, epochs: int = 10,
                       learning_rate: float = 1e-2, batch_size: int = 128, weight_decay: float = 0.01,
                       device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [len(train_data)]: the per-sample cross-entropy of `train_data` under a model from
    `model_factory()` trained on `holdout_data` only (AdamW, cosine learning rate to zero over
    `epochs`, seeded by `seed`). Costs `epochs * len(holdout_data)` back-propagated samples and one
    forward over the training set, once per run."""
    where = "strategies.irreducible_losses"
    if not callable(model_factory):
        raise TypeError(f"aql.{where}: model_factory must be a callable returning an nn.Module, got {type(model_factory).__name__}")
    check_int(where, "epochs", epochs, low=1)
    check_int(where, "batch_size", batch_size, low=1)
    check_int(where, "seed", seed, low=0)
    check_interval(where, "learning_rate", learning_rate, 0.0, math.inf, low_open=True, high_open=True)
    x, y = _arrays(holdout_data, where, "holdout_data")
    train_x, train_y = _arrays(train_data, where, "train_data")
    device = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 104729)
        model = model_factory().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    steps = epochs * math.ceil(x.shape[0] / batch_size)
    from aql.training.schedule import WarmupCosine

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(0, steps))
    generator = torch.Generator().manual_seed(seed + 104729)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(x.shape[0], generator=generator)
        for start in range(0, x.shape[0], batch_size):
            batch = order[start:start + batch_size]
            loss = F.cross_entropy(model(x[batch].to(device)), y[batch].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, train_x.shape[0], 4096):
            logits = model(train_x[start:start + 4096].to(device)).float()
            out.append(F.cross_entropy(logits, train_y[start:start + 4096].to(device), reduction="none"))
    return torch.cat(out).float()
