"""Single-pass uncertainty from a diagonal Laplace approximation (the design document's Solution 1)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import aql_kernels

from aql._checks import check_int, check_interval

from .base import UncertaintyEstimator

__all__ = ["LaplacianUncertainty", "Uncertainty"]


class Uncertainty(NamedTuple):
    """What one forward pass of `LaplacianUncertainty.estimate` yields, all float32 [N] but `scores`."""

    entropy: torch.Tensor  # predictive entropy of softmax(logits): aleatoric + epistemic, from the point estimate
    epistemic: torch.Tensor  # trace of the last-layer Laplace predictive covariance of the logits
    scores: aql_kernels.SoftmaxScores  # every softmax statistic of the same pass (lse, maxprob, margin, ...)


def _last_linear(model: nn.Module) -> nn.Linear | None:
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            head = module
    return head


class LaplacianUncertainty(UncertaintyEstimator):
    """Diagonal Fisher of the model's parameters, kept as an EMA of squared gradients, and a one-pass
    uncertainty score from it.

    Fisher. `fisher[i]` (float32, the shape of `params[i]`, every trainable parameter of the model) is
    the EMA ``F <- ema_decay * F + (1 - ema_decay) * (scale * g)^2`` of `aql_kernels.fisher_ema_`, one
    launch per update. The gradient `g` of a *mean* loss over B rows is a batch mean; if the per-row
    gradients are roughly independent with mean near zero (near a minimum), E[g^2] ~ E[g_row^2] / B, so
    `scale = sqrt(B)` makes F estimate the per-row empirical Fisher (for a *sum* loss, scale =
    1 / sqrt(B)). Far from a minimum the mean gradient also carries signal and F overestimates. The
    posterior over the data set is then ``precision = n_eff * F_hat + prior_precision`` with
    ``n_eff = dataset_size`` (when given; else the number of rows seen by the updates so far) and
    ``F_hat = F / (1 - ema_decay ** updates)`` (bias correction of an EMA started at zero, as in Adam).

    Updates. `update_fisher(data, targets)` runs its own forward and `torch.autograd.grad` of the
    cross-entropy (the design document's standalone use; the model's `.grad` is left alone).
    `update_from_grads()` reads the `.grad` the training backward already produced: no extra forward or
    backward. Its batch size defaults to the rows that passed through the head with autograd enabled
    since the last update and since the gradients were last set to None (micro-batches of gradient
    accumulation included); after `zero_grad(set_to_none=False)` pass `batch_size=` explicitly.

    Scores. `estimate_uncertainty(data)` is one forward pass under `torch.no_grad()` returning the
    predictive entropy of `aql_kernels.softmax_scores`. `estimate(data)` also returns an epistemic score:
    the trace of the last-layer diagonal-Laplace predictive covariance of the logits (the linearised
    predictive of a last-layer Laplace approximation; Daxberger et al. 2021, "Laplace Redux -- Effortless
    Bayesian Deep Learning", NeurIPS). For a linear head ``f = W h + b`` with diagonal posterior
    covariance ``1 / precision``,
    ``Var f_k = sum_j h_j^2 / precision(W_kj) + 1 / precision(b_k)``, so the trace over classes is
    ``sum_j h_j^2 s_j + s_b`` with ``s_j = sum_k 1 / (n_eff F_hat_kj + prior_precision)`` and
    ``s_b = sum_k 1 / (n_eff F_hat_bk + prior_precision)``. `s` is recomputed once per Fisher update and
    cached, so the score costs O(d) per sample on top of the forward. `h` is the head's input, captured
    by a forward hook.

    head: the module whose Fisher drives the epistemic score, an `nn.Linear` inside `model`; default
    the last `nn.Linear` in `model.modules()` order (for the usual classifier, the output layer). The
    model must return logits [N, classes] (leading dimensions are flattened into rows).
    """

    name = "LaplacianUncertainty"

    def __init__(self, model: nn.Module, head: nn.Module | None = None, ema_decay: float = 0.95,
                 prior_precision: float = 1.0, *, dataset_size: int | None = None):
        self.model = self._check_model("__init__", "model", model)
        if head is None:
            head = _last_linear(model)
            if head is None:
                raise self._fail("__init__", f"model has no nn.Linear to use as the head; pass head= (got a {type(model).__name__})")
        if not isinstance(head, nn.Linear):
            raise self._fail("__init__", f"head must be an nn.Linear, got {type(head).__name__}", TypeError)
        if not any(module is head for module in model.modules()):
            raise self._fail("__init__", "head must be a submodule of model")
        self.ema_decay = check_interval(self._where("__init__"), "ema_decay", ema_decay, 0.0, 1.0, low_open=False, high_open=True)
        self.prior_precision = check_interval(self._where("__init__"), "prior_precision", prior_precision, 0.0, math.inf, low_open=True, high_open=True)
        if dataset_size is not None:
            dataset_size = check_int(self._where("__init__"), "dataset_size", dataset_size, low=1)
        self.dataset_size = dataset_size
        self.head = head

        self.params = [p for p in model.parameters() if p.requires_grad]
        if not any(p is head.weight for p in self.params):
            raise self._fail("__init__", "head.weight must be a trainable parameter of model (requires_grad=True)")
        self._weight_index = next(i for i, p in enumerate(self.params) if p is head.weight)
        self._bias_index = None
        if head.bias is not None and head.bias.requires_grad:
            self._bias_index = next(i for i, p in enumerate(self.params) if p is head.bias)
        self.fisher = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        # (device, dtype) of the first parameter at the last successful Fisher update (None before it)
        self._checked_layout: tuple[torch.device, torch.dtype] | None = None
        self.updates = 0
        self.samples_seen = 0

        self._rows_since_update = 0
        self._counting = True
        self._capture = False
        self._features: torch.Tensor | None = None
        self._variance_sums: tuple[torch.Tensor, torch.Tensor] | None = None
        self._hook = head.register_forward_hook(self._head_hook)

    # ---- hook ---------------------------------------------------------------------------------------
    def _head_hook(self, module, inputs, output) -> None:
        features = inputs[0]
        if self._capture:
            self._features = features.detach()
        elif self._counting and torch.is_grad_enabled():
            if self.head.weight.grad is None:
                # zero_grad(set_to_none=True) ran since the rows were counted: their gradients are gone
                self._rows_since_update = 0
            self._rows_since_update += features.numel() // max(features.shape[-1], 1)

    def close(self) -> None:
        """Removes the forward hook from the head."""
        self._hook.remove()

    # ---- Fisher updates -----------------------------------------------------------------------------
    def _follow_model_device(self) -> None:
        """Moves the Fisher tensors to their parameters' devices. The model moves as a whole
        (`model.to`), so while the first parameter keeps the (device, dtype) of the last successful
        update nothing can have moved: O(1) per step instead of a walk over every parameter."""
        first = self.params[0]
        if (first.device, first.dtype) == self._checked_layout:
            return
        for i, p in enumerate(self.params):
            if self.fisher[i].device != p.device:
                self.fisher[i] = self.fisher[i].to(p.device)
                self._variance_sums = None

    def _accumulate(self, grads: list, rows: int, reduction: str, loss_scale: float) -> None:
        self._follow_model_device()
        scale = (math.sqrt(rows) if reduction == "mean" else 1.0 / math.sqrt(rows)) / loss_scale
        # float decay and scale and plain lists: fisher_ema_'s eager fast path (its checks are C-level maps)
        aql_kernels.fisher_ema_(self.fisher, grads, self.ema_decay, scale=scale)
        self._checked_layout = (self.params[0].device, self.params[0].dtype)
        self.updates += 1
        self.samples_seen += rows
        self._variance_sums = None

    def update_fisher(self, data: torch.Tensor, targets: torch.Tensor) -> None:
        """One Fisher update from its own forward and backward of the mean cross-entropy on (data, targets).

        Uses `torch.autograd.grad`, so the parameters' `.grad` are untouched.
        """
        data = self._check_data("update_fisher", data)
        if not isinstance(targets, torch.Tensor):
            raise self._fail("update_fisher", f"targets must be a torch.Tensor, got {type(targets).__name__}", TypeError)
        if targets.dtype not in (torch.int64, torch.int32):
            raise self._fail("update_fisher", f"targets must be int64 or int32 class indices, got {targets.dtype}", TypeError)
        self._counting = False
        try:
            with torch.enable_grad():
                logits = self._logits("update_fisher", self.model(data))
                flat_targets = targets.reshape(-1)
                if flat_targets.shape[0] != logits.shape[0]:
                    raise self._fail("update_fisher", f"targets must have one class per logits row ({logits.shape[0]}), got shape {tuple(targets.shape)}")
                loss = F.cross_entropy(logits.float(), flat_targets.long())
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
        finally:
            self._counting = True
        self._accumulate(list(grads), logits.shape[0], "mean", 1.0)

    def update_from_grads(self, batch_size: int | None = None, *, reduction: str = "mean", loss_scale: float = 1.0,
                          check: bool = True) -> None:
        """One Fisher update from the `.grad` of the parameters (after the training backward).

        batch_size: rows the loss was averaged (or summed) over; default: the rows that went through the
        head with autograd on since the last update. reduction: "mean" or "sum" (how the loss was
        reduced over rows). loss_scale: the factor the loss was multiplied by before backward (AMP).

        check=False is the per-step fast path of a training loop: no argument checks and no scan for a
        missing .grad (`aql_kernels.fisher_ema_` still checks the tensors). The caller guarantees a
        positive int `batch_size` (required), a valid `reduction` and `loss_scale`, and a backward since
        the last zero_grad.
        """
        if check:
            where = self._where("update_from_grads")
            if reduction not in ("mean", "sum"):
                raise self._fail("update_from_grads", f"reduction must be 'mean' or 'sum', got {reduction!r}")
            loss_scale = check_interval(where, "loss_scale", loss_scale, 0.0, math.inf, low_open=True, high_open=True)
            if batch_size is None:
                batch_size = self._rows_since_update
                if batch_size == 0:
                    raise self._fail("update_from_grads", "no rows went through the head with autograd on since the last "
                                     "update; pass batch_size=")
            else:
                batch_size = check_int(where, "batch_size", batch_size, low=1)
            grads = [p.grad for p in self.params]
            if all(g is None for g in grads):
                raise self._fail("update_from_grads", "no parameter has a .grad; call it after loss.backward() and before zero_grad()")
        elif batch_size is None:
            raise self._fail("update_from_grads", "check=False needs batch_size (the rows the loss was averaged over), got None")
        else:
            grads = [p.grad for p in self.params]
        self._accumulate(grads, batch_size, reduction, loss_scale)
        self._rows_since_update = 0

    # ---- scores -------------------------------------------------------------------------------------
    def n_eff(self) -> int:
        """Number of data points the posterior conditions on (dataset_size, else the rows seen)."""
        return self.dataset_size if self.dataset_size is not None else max(self.samples_seen, 1)

    def posterior_variance_sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(s [in_features], s_b 0-dim): the per-feature and bias sums over classes of the diagonal
        posterior variances of the head; cached until the next Fisher update."""
        if self._variance_sums is None:
            self._follow_model_device()
            correction = 1.0 - self.ema_decay ** self.updates if self.updates else 1.0
            weight = self.n_eff() / correction if self.updates else 0.0
            fisher_w = self.fisher[self._weight_index]
            s = torch.reciprocal(fisher_w * weight + self.prior_precision).sum(dim=0)
            if self._bias_index is not None:
                s_b = torch.reciprocal(self.fisher[self._bias_index] * weight + self.prior_precision).sum()
            else:
                s_b = torch.zeros((), dtype=torch.float32, device=fisher_w.device)
            self._variance_sums = (s, s_b)
        return self._variance_sums

    def estimate_uncertainty(self, data: torch.Tensor) -> torch.Tensor:
        """Predictive entropy, float32 [N]: one forward pass and one read of the logits."""
        data = self._check_data("estimate_uncertainty", data)
        with torch.no_grad():
            logits = self._logits("estimate_uncertainty", self.model(data))
            return aql_kernels.softmax_scores(logits if logits.dtype in _SCORE_DTYPES else logits.float()).entropy

    def estimate(self, data: torch.Tensor) -> Uncertainty:
        """Predictive entropy, the last-layer Laplace epistemic score and all softmax statistics of one
        forward pass."""
        data = self._check_data("estimate", data)
        s, s_b = self.posterior_variance_sums()
        self._capture = True
        try:
            with torch.no_grad():
                logits = self._logits("estimate", self.model(data))
                features = self._features
        finally:
            self._capture = False
            self._features = None
        if features is None:
            raise self._fail("estimate", "the head was not called during the forward pass")
        with torch.no_grad():
            scores = aql_kernels.softmax_scores(logits if logits.dtype in _SCORE_DTYPES else logits.float())
            features = features.reshape(-1, features.shape[-1]).float()
            if features.shape[0] != logits.shape[0]:
                raise self._fail("estimate", f"the head saw {features.shape[0]} rows but the model returned {logits.shape[0]} logits rows")
            epistemic = torch.mv(features * features, s) + s_b
        return Uncertainty(scores.entropy, epistemic, scores)

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"fisher": list(self.fisher), "updates": self.updates, "samples_seen": self.samples_seen,
                "rows_since_update": self._rows_since_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        missing = {"fisher", "updates", "samples_seen"} - set(state)
        if missing:
            raise self._fail("load_state_dict", f"state lacks {sorted(missing)}")
        fisher = state["fisher"]
        if not isinstance(fisher, (list, tuple)) or len(fisher) != len(self.fisher):
            got = len(fisher) if isinstance(fisher, (list, tuple)) else type(fisher).__name__
            raise self._fail("load_state_dict", f"fisher must be a list of {len(self.fisher)} tensors, got {got}")
        for i, (mine, theirs) in enumerate(zip(self.fisher, fisher)):
            if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape:
                shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
                raise self._fail("load_state_dict", f"fisher[{i}] must have shape {tuple(mine.shape)}, got {shape}")
        for mine, theirs in zip(self.fisher, fisher):
            mine.copy_(theirs)
        self.updates = int(state["updates"])
        self.samples_seen = int(state["samples_seen"])
        self._rows_since_update = int(state.get("rows_since_update", 0))
        self._variance_sums = None


_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
