"""Single-pass uncertainty from a last-layer Laplace approximation (the design document's Solution 1).

Everything the posterior needs is gathered from the training step itself: the gradients of the head
(diagonal Fisher) and, through a forward hook on the head, the head's inputs and outputs of the
training forward (Kronecker factors, class-conditional feature statistics). No extra forward or
backward ever runs for it.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import aql_kernels

from aql._checks import check_int, check_interval

from .base import UncertaintyEstimator

__all__ = ["LaplacianUncertainty", "Uncertainty", "METHODS"]

#: the epistemic scores `LaplacianUncertainty(method=...)` offers (the first is the default)
METHODS = ("mahalanobis", "kfac", "diagonal", "prior")


class Uncertainty(NamedTuple):
    """What one forward pass of `LaplacianUncertainty.estimate` yields, all float32 [N] but `scores`."""

    entropy: torch.Tensor  # predictive entropy of softmax(logits): aleatoric + epistemic, from the point estimate
    epistemic: torch.Tensor  # the epistemic score of the estimator's `method` (higher: further from the training data)
    scores: aql_kernels.SoftmaxScores  # every softmax statistic of the same pass (lse, maxprob, margin, ...)


def _last_linear(model: nn.Module) -> nn.Linear | None:
    head = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            head = module
    return head


class LaplacianUncertainty(UncertaintyEstimator):
    """Last-layer posterior statistics kept during training and a one-pass epistemic score from them.

    Statistics (all from the training step, no extra forward or backward):

    - Fisher: `fisher[i]` (float32, the shape of `params[i]`) is the EMA
      ``F <- ema_decay * F + (1 - ema_decay) * (scale * g)^2`` of `aql_kernels.fisher_ema_`, one launch
      per update, over the head's weight and bias (`params="head"`, the default: what the scores read)
      or every trainable parameter (`params="all"`). The gradient of a *mean* loss over B rows is a
      batch mean; near a minimum E[g^2] ~ E[g_row^2] / B, so ``scale = sqrt(B)`` makes F estimate the
      per-row empirical Fisher (for a *sum* loss ``scale = 1 / sqrt(B)``).
    - For each watched layer l (the head, and the `layers` of the density score), from the layer's input
      h of the training forward with a bias column ``h~ = [h, 1]``: ``A_l = E[h~ h~^T]`` and
      ``E[p h~^T]`` ([K, d+1]; p = softmax of the head's output of the same rows, its last column is
      E[p]); and for the head ``G = E[diag(p) - p p^T]``. EMAs with `feature_decay` (default 0.99: a
      (d+1) x (d+1) second moment wants more rows than the last ~20 batches). Where an `nn.Dropout` is
      registered just before a layer (in `model.modules()` order) and is in training mode, the diagonal
      of the batch's E[h h^T] is multiplied by 1 - p, so that the statistics are those of the
      evaluation forward (inverted dropout keeps E[h] and the off-diagonal, and inflates the diagonal by
      1 / (1 - p): measured on the experiment's MLP, without this the density score fell from 0.85 to
      0.70 AUROC).

    The hooks keep references (not copies) to the layers' inputs and the head's output of every
    forward with autograd on since the last update; `update_from_grads` / `update_fisher` fold them into
    the EMAs (one [B, d+1]^T [B, d+1] product per update and layer the method reads) and drop them. A step whose
    statistics are not finite leaves the EMAs unchanged (a `torch.where`, no host synchronisation), so a
    skipped non-finite step does not poison them. EMAs are bias-corrected by ``1 - decay ** updates``.

    Epistemic scores (`method`): one forward plus small matmuls against factors cached when the
    statistics change (refreshed lazily, on the first score after an update: one symmetric
    eigendecomposition per factor, in float64):

    - "mahalanobis" (default; Lee et al. 2018, "A Simple Unified Framework for Detecting
      Out-of-Distribution Samples"; Mukhoti et al. 2023, DDU): per layer of `layers`, the smallest
      Mahalanobis distance of the layer's input to a class mean under the shared within-class
      covariance, ``min_c (h - mu_c)^T (S + eps I)^{-1} (h - mu_c)``, with ``mu_c = E[p_c h] / E[p_c]``,
      ``S = E[h h^T] - sum_c E[p_c] mu_c mu_c^T`` and eps = `shrinkage` times the mean eigenvalue of S;
      divided by the layer's width and summed over layers. The class weights are the model's own
      probabilities of the training forward (the targets never reach the head); for a fitted model
      they are the labels. `layers`: "first" (default: the input of the first `nn.Linear` in
      `model.modules()` order -- for an MLP the raw input, for a CNN the flattened features), "head",
      "all" (every `nn.Linear`) or a list of `nn.Linear` modules. This is a feature-density score, not a
      posterior; on `python -m aql experiment uncertainty` it is the one that separates OOD inputs
      (EXPERIMENT1.md).
    - "kfac": the trace of the linearised predictive covariance of the logits under the K-FAC
      last-layer Laplace posterior (Ritter et al. 2018) ``precision = n_eff * G (x) A_head +
      prior_precision * I``. With ``A = U_A diag(a) U_A^T`` and G's eigenvalues g,
      ``tr Cov f = sum_j (u_Aj . h~)^2 c_j``, ``c_j = sum_i 1 / (n_eff g_i a_j + prior_precision)``.
    - "diagonal": the trace of the linearised predictive covariance under the diagonal-Fisher posterior
      ``precision = n_eff * F_hat + prior_precision`` (Daxberger et al. 2021, "Laplace Redux"):
      ``sum_j h_j^2 s_j + s_b``, ``s_j = sum_k 1 / (n_eff F_hat_kj + prior_precision)``.
    - "prior": the prior alone (identity curvature): ``K (|h|^2 + 1) / prior_precision``, the squared
      feature norm; the baseline any curvature must beat.

    `rank` (default 64) bounds the cost of "mahalanobis" and "kfac": per factor, the `rank`
    eigen-directions of largest variance are kept exactly and the others are weighted by their mean
    weight (exact when rank >= the width). A batch then costs one [N, d] x [d, rank + K] product per
    layer on top of the forward. `rank=None` keeps every direction.

    class_conditional (None: True when the head has at most 1024 outputs): per-class means for the
    density, or one Gaussian (False). A vocabulary-sized head would make the [K, d+1] class sums and the
    [rows, K]^T [rows, d+1] product per step as costly as the head itself.

    prior_precision: a positive float, or "auto" (default): fitted by maximising the Laplace marginal
    likelihood of the head (MacKay's fixed point ``tau = gamma / |theta|^2``, ``gamma`` the effective
    number of parameters of the "kfac" or "diagonal" curvature, theta the head's current weights).

    `estimate_uncertainty(data)` returns `score`: "epistemic" (the default: the `method`'s score) or
    "entropy" (the predictive entropy of `aql_kernels.softmax_scores`, in nats). `estimate(data)` returns
    both and every softmax statistic of the same pass.

    n_eff, the number of data points the posterior conditions on: `dataset_size` when given, else the
    rows seen by the updates so far. `update_from_grads()` batch size defaults to the rows that passed
    through the head with autograd enabled since the last update and since the gradients were last set
    to None (micro-batches of gradient accumulation included); after `zero_grad(set_to_none=False)`
    pass `batch_size=` explicitly.

    head: an `nn.Linear` inside `model`; default the last `nn.Linear` in `model.modules()` order. The
    model returns logits [..., classes] (leading dimensions are flattened into rows) or an object with
    a `.logits` tensor (Hugging Face outputs).
    """

    name = "LaplacianUncertainty"

    def __init__(self, model: nn.Module, head: nn.Module | None = None, ema_decay: float = 0.95,
                 prior_precision: float | str = "auto", *, dataset_size: int | None = None, method: str = "mahalanobis",
                 params: str = "head", layers: str | list = "first", score: str = "epistemic", rank: int | None = 64,
                 shrinkage: float = 1e-3, feature_decay: float = 0.99, class_conditional: bool | None = None):
        where = self._where("__init__")
        self.model = self._check_model("__init__", "model", model)
        if head is None:
            head = _last_linear(model)
            if head is None:
                raise self._fail("__init__", f"model has no nn.Linear to use as the head; pass head= (got a {type(model).__name__})")
        if not isinstance(head, nn.Linear):
            raise self._fail("__init__", f"head must be an nn.Linear, got {type(head).__name__}", TypeError)
        if not any(module is head for module in model.modules()):
            raise self._fail("__init__", "head must be a submodule of model")
        self.ema_decay = check_interval(where, "ema_decay", ema_decay, 0.0, 1.0, low_open=False, high_open=True)
        self.feature_decay = check_interval(where, "feature_decay", feature_decay, 0.0, 1.0, low_open=False, high_open=True)
        if isinstance(prior_precision, str):
            if prior_precision != "auto":
                raise self._fail("__init__", f"prior_precision must be a positive float or 'auto', got {prior_precision!r}")
        else:
            prior_precision = check_interval(where, "prior_precision", prior_precision, 0.0, math.inf, low_open=True, high_open=True)
        self.prior_precision = prior_precision
        if dataset_size is not None:
            dataset_size = check_int(where, "dataset_size", dataset_size, low=1)
        self.dataset_size = dataset_size
        if method not in METHODS:
            raise self._fail("__init__", f"method must be one of {METHODS}, got {method!r}")
        if params not in ("head", "all"):
            raise self._fail("__init__", f"params must be 'head' or 'all', got {params!r}")
        if score not in ("epistemic", "entropy"):
            raise self._fail("__init__", f"score must be 'epistemic' or 'entropy', got {score!r}")
        if rank is not None:
            rank = check_int(where, "rank", rank, low=1)
        self.method, self.params_scope, self.score, self.rank = method, params, score, rank
        self.shrinkage = check_interval(where, "shrinkage", shrinkage, 0.0, math.inf, low_open=True, high_open=True)
        self.head = head

        trainable = [p for p in model.parameters() if p.requires_grad]
        if not any(p is head.weight for p in trainable):
            raise self._fail("__init__", "head.weight must be a trainable parameter of model (requires_grad=True)")
        if params == "head":
            self.params = [p for p in (head.weight, head.bias) if p is not None and p.requires_grad]
        else:
            self.params = trainable
        self._weight_index = next(i for i, p in enumerate(self.params) if p is head.weight)
        self._bias_index = None
        if head.bias is not None and head.bias.requires_grad:
            self._bias_index = next(i for i, p in enumerate(self.params) if p is head.bias)
        self.fisher = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in self.params]
        k, device = head.out_features, head.weight.device
        self.layers, self._density = self._check_layers(model, head, layers)
        # the nn.Dropout registered just before each layer (its input's dropout, undone in the statistics)
        modules = list(model.modules())
        self._input_dropout = []
        for layer in self.layers:
            index = next(i for i, m in enumerate(modules) if m is layer)
            before = modules[index - 1] if index > 0 else None
            self._input_dropout.append(before if isinstance(before, nn.Dropout) else None)
        # statistics (float32), per layer l of `layers` (the head last): A_l = E[h~ h~^T] [d+1, d+1] and
        # E[p h~] [K, d+1]; and the head's G = E[diag p - p p^T] [K, K]
        # Only what the method reads is kept (the others are empty tensors): the density's layers for
        # "mahalanobis", the head's A and G for "kfac", nothing for "diagonal" and "prior". A K x K
        # G for a 50k-token vocabulary would be 10 GB; the product per step is the training overhead.
        head_index = len(self.layers) - 1
        self._kept = [(method == "mahalanobis" and i in self._density) or (method == "kfac" and i == head_index)
                      for i in range(len(self.layers))]
        self._keeps_any = any(self._kept)
        self.feature_moments = [torch.zeros((m.in_features + 1, m.in_features + 1) if kept else (0,), device=device)
                                for m, kept in zip(self.layers, self._kept)]
        if class_conditional is None:
            class_conditional = k <= 1024
        elif not isinstance(class_conditional, bool):
            raise self._fail("__init__", f"class_conditional must be a bool or None, got {type(class_conditional).__name__}", TypeError)
        self.class_conditional = class_conditional
        groups = k if class_conditional else 1
        self.class_sums = [torch.zeros((groups, m.in_features + 1) if kept and method == "mahalanobis" else (0,), device=device)
                           for m, kept in zip(self.layers, self._kept)]
        self.output_curvature = torch.zeros((k, k) if method == "kfac" else (0,), device=device)
        self._joint: list[torch.Tensor | None] = [None] * len(self.layers)
        self._bind_joint()
        # (device, dtype) of the first parameter at the last successful Fisher update (None before it)
        self._checked_layout: tuple[torch.device, torch.dtype] | None = None
        self.updates = 0
        self.samples_seen = 0

        self._rows_since_update = 0
        self._counting = True
        self._capture = False
        self._features: list[torch.Tensor | None] = [None] * len(self.layers)
        # per layer: the inputs of the forwards since the last update; the head's outputs
        self._pending: list[list[torch.Tensor]] = [[] for _ in self.layers]
        self._pending_outputs: list[torch.Tensor] = []
        self._own_forward: tuple[list, list] | None = None  # update_fisher's forward
        self._cache: dict[str, Any] | None = None
        self._hooks = [layer.register_forward_hook(self._layer_hook(i)) for i, layer in enumerate(self.layers)]

    @staticmethod
    def _check_layers(model, head, layers) -> tuple[list, list[int]]:
        """(the watched layers, the head last; the indices among them of the density's layers)."""
        where = "aql.uncertainty.LaplacianUncertainty.__init__"
        if layers == "head":
            return [head], [0]
        if layers == "first":
            first = next(m for m in model.modules() if isinstance(m, nn.Linear))
            return ([head], [0]) if first is head else ([first, head], [0])
        if layers == "all":
            watched = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head] + [head]
            return watched, list(range(len(watched)))
        if (not isinstance(layers, (list, tuple)) or not layers or not all(isinstance(m, nn.Linear) for m in layers)
                or len({id(m) for m in layers}) != len(layers)):
            raise ValueError(f"{where}: layers must be 'first', 'all', 'head' or a non-empty list of distinct nn.Linear modules of "
                             f"model, got {layers!r}")
        inside = {id(m) for m in model.modules()}
        if not all(id(m) in inside for m in layers):
            raise ValueError(f"{where}: layers must be submodules of model")
        watched = [m for m in model.modules() if isinstance(m, nn.Linear) and m is not head and any(m is layer for layer in layers)]
        watched.append(head)
        return watched, [i for i, m in enumerate(watched) if any(m is layer for layer in layers)]

    # ---- hook ---------------------------------------------------------------------------------------
    def _layer_hook(self, index: int):
        is_head = index == len(self.layers) - 1
        kept, keeps_any = self._kept[index], self._keeps_any
        # captured by the scoring forward only where the score reads it: a held reference keeps the
        # activation alive past the forward (measured: +2 ms on a 4 ms forward of 2000 rows)
        read = index in (self._density if self.method == "mahalanobis" else [len(self.layers) - 1])

        def hook(module, inputs, output) -> None:
            features = inputs[0]
            if self._capture:
                if read:
                    self._features[index] = features.detach()
            elif self._own_forward is not None:
                if kept:
                    self._own_forward[0][index].append(features.detach())
                if is_head and keeps_any:
                    self._own_forward[1].append(output.detach())
            elif self._counting and torch.is_grad_enabled():
                if self.head.weight.grad is None:
                    # zero_grad(set_to_none=True) ran since the rows were counted: their gradients are gone
                    self._pending[index].clear()
                    if is_head:
                        self._rows_since_update = 0
                        self._pending_outputs.clear()
                if kept:
                    self._pending[index].append(features.detach())
                if is_head:
                    self._rows_since_update += features.numel() // max(features.shape[-1], 1)
                    if keeps_any:
                        self._pending_outputs.append(output.detach())

        return hook

    def close(self) -> None:
        """Removes the forward hook from the head."""
        for hook in self._hooks:
            hook.remove()

    # ---- updates ------------------------------------------------------------------------------------
    def _follow_model_device(self) -> None:
        """Moves the statistics to their parameters' devices. The model moves as a whole (`model.to`),
        so while the first parameter keeps the (device, dtype) of the last successful update nothing can
        have moved: O(1) per step instead of a walk over every parameter."""
        first = self.params[0]
        if (first.device, first.dtype) == self._checked_layout:
            return
        for i, p in enumerate(self.params):
            if self.fisher[i].device != p.device:
                self.fisher[i] = self.fisher[i].to(p.device)
                self._cache = None
        device = self.head.weight.device
        if self.output_curvature.device != device:
            self.feature_moments = [m.to(device) for m in self.feature_moments]
            self.class_sums = [s.to(device) for s in self.class_sums]
            self._bind_joint()
            self.output_curvature = self.output_curvature.to(device)
            self._cache = None

    def _bind_joint(self) -> None:
        """For "mahalanobis": each density layer's A [d+1, d+1] and E[p h~] [G, d+1] become the two row
        blocks of one [d+1+G, d+1] buffer (`_joint`), so that a step folds both with one addmm,
        [h~ | p]^T h~, and guards both with one finiteness check (on the MNIST-1D CNN at batch 128, one
        thread: 92 against 112 us a step, measured side by side). `feature_moments` / `class_sums` stay views of it."""
        if self.method != "mahalanobis":
            return
        for i, kept in enumerate(self._kept):
            if kept:
                moment, sums = self.feature_moments[i], self.class_sums[i]
                joint = torch.cat([moment, sums])
                self._joint[i] = joint
                self.feature_moments[i], self.class_sums[i] = joint[:moment.shape[0]], joint[moment.shape[0]:]

    def _fold_features(self, inputs: list[list[torch.Tensor]], outputs: list[torch.Tensor]) -> None:
        """EMA update of every layer's A and E[p h~] and of the head's G from the forwards of the step
        (unchanged if no rows went through the head or a statistic of the step is not finite)."""
        if not outputs:
            return
        # Few ops, each fused with the EMA (addmm with beta = decay): on the experiment's MLP (batch 128,
        # one thread) the fold costs a fifth of a training step when written as separate moment, EMA and
        # guard ops; the step itself is only ~1 ms.
        decay = self.feature_decay
        with torch.no_grad():
            logits = outputs[0] if len(outputs) == 1 else torch.cat([o.reshape(-1, o.shape[-1]) for o in outputs])
            logits = logits.reshape(-1, logits.shape[-1]).float()
            rows = logits.shape[0]
            # class weights of the density: the model's probabilities, or one group (class_conditional=False)
            if self.class_conditional or self.method == "kfac":
                # torch.softmax costs ~2x these three ops on small CPU inputs (23 against 13 us at [128, 10])
                p = (logits - logits.amax(1, keepdim=True)).exp_()
                p = p.div_(p.sum(1, keepdim=True))
            else:
                p = logits.new_ones(rows, 1)
            weight = (1.0 - decay) / rows
            states, candidates = [], []
            if self.method == "kfac":
                # decay G + (1 - decay) (diag(mean p) - p^T p / rows)
                curvature = torch.addmm(self.output_curvature, p.T, p, beta=decay, alpha=-weight)
                curvature.diagonal().add_(p.sum(0), alpha=weight)
                states.append(self.output_curvature)
                candidates.append(curvature)
            for i, (layer, dropout, pending) in enumerate(zip(self.layers, self._input_dropout, inputs)):
                if not self._kept[i]:
                    continue
                d = layer.in_features
                h = pending[0] if len(pending) == 1 else torch.cat([f.reshape(-1, d) for f in pending]) if pending else p.new_zeros(0, d)
                h = h.reshape(-1, d)
                if h.shape[0] != rows:
                    raise self._fail("update_from_grads", f"a layer saw {h.shape[0]} rows but the head {rows} since the last "
                                     "update; every layer of `layers` must see each row once (pass layers='head')")
                h = h.float()
                h1 = F.pad(h, (0, 1), value=1.0)
                if self.method == "mahalanobis":  # [A; E[p h~]] in one product (see _bind_joint)
                    state = self._joint[i]
                    candidate = torch.addmm(state, torch.cat([h1, p], 1).T, h1, beta=decay, alpha=weight)
                else:
                    state = self.feature_moments[i]
                    candidate = torch.addmm(state, h1.T, h1, beta=decay, alpha=weight)
                if dropout is not None and dropout.training and dropout.p > 0:
                    # inverted dropout keeps E[h] and the off-diagonal of E[h h^T] but scales its diagonal
                    # by 1 / (1 - p): undone, so that the statistics are those of the evaluation forward
                    candidate.diagonal()[:d].sub_(h.square().sum(0), alpha=weight * dropout.p)
                states.append(state)
                candidates.append(candidate)
            # a non-finite input or output poisons every sum it enters: one check over all of them
            if not candidates:
                return
            total = candidates[0].sum() if len(candidates) == 1 else torch.stack([c.sum() for c in candidates]).sum()
            finite = torch.isfinite(total)
            for state, candidate in zip(states, candidates):
                torch.where(finite, candidate, state, out=state)

    def _accumulate(self, grads: list, rows: int, reduction: str, loss_scale: float, inputs, outputs) -> None:
        self._follow_model_device()
        scale = (math.sqrt(rows) if reduction == "mean" else 1.0 / math.sqrt(rows)) / loss_scale
        # float decay and scale and plain lists: fisher_ema_'s eager fast path (its checks are C-level maps)
        aql_kernels.fisher_ema_(self.fisher, grads, self.ema_decay, scale=scale)
        self._fold_features(inputs, outputs)
        self._checked_layout = (self.params[0].device, self.params[0].dtype)
        self.updates += 1
        self.samples_seen += rows
        self._cache = None

    def update_fisher(self, data: torch.Tensor, targets: torch.Tensor) -> None:
        """One update from its own forward and backward of the mean cross-entropy on (data, targets)
        (the standalone use). Uses `torch.autograd.grad`, so the parameters' `.grad` are untouched."""
        data = self._check_data("update_fisher", data)
        if not isinstance(targets, torch.Tensor):
            raise self._fail("update_fisher", f"targets must be a torch.Tensor, got {type(targets).__name__}", TypeError)
        if targets.dtype not in (torch.int64, torch.int32):
            raise self._fail("update_fisher", f"targets must be int64 or int32 class indices, got {targets.dtype}", TypeError)
        self._own_forward = ([[] for _ in self.layers], [])
        try:
            with torch.enable_grad():
                output = self.model(data)
                logits = self._logits("update_fisher", output)
                flat_targets = targets.reshape(-1)
                if flat_targets.shape[0] != logits.shape[0]:
                    raise self._fail("update_fisher", f"targets must have one class per logits row ({logits.shape[0]}), got shape {tuple(targets.shape)}")
                loss = F.cross_entropy(logits.float(), flat_targets.long())
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            own = self._own_forward
        finally:
            self._own_forward = None
        self._accumulate(list(grads), logits.shape[0], "mean", 1.0, *own)

    def update_from_grads(self, batch_size: int | None = None, *, reduction: str = "mean", loss_scale: float = 1.0,
                          check: bool = True) -> None:
        """One update from the `.grad` of the parameters (after the training backward) and the head's
        inputs and outputs of the forwards since the last update.

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
        inputs, outputs = self._pending, self._pending_outputs
        self._pending, self._pending_outputs = [[] for _ in self.layers], []
        self._accumulate(grads, batch_size, reduction, loss_scale, inputs, outputs)
        self._rows_since_update = 0

    # ---- posterior ----------------------------------------------------------------------------------
    def n_eff(self) -> int:
        """Number of data points the posterior conditions on (dataset_size, else the rows seen)."""
        return self.dataset_size if self.dataset_size is not None else max(self.samples_seen, 1)

    def _correction(self, decay: float) -> float:
        return 1.0 - decay ** self.updates if self.updates else 1.0

    def _head_norm_squared(self) -> torch.Tensor:
        with torch.no_grad():
            total = self.head.weight.detach().float().square().sum()
            if self.head.bias is not None:
                total = total + self.head.bias.detach().float().square().sum()
        return total

    def _fit_prior(self, curvature: torch.Tensor) -> torch.Tensor:
        """MacKay's fixed point for the prior precision: tau = gamma / |theta|^2, gamma = sum of
        c / (c + tau) over the eigenvalues c of the data term of the precision (50 iterations, on the
        device, no host synchronisation)."""
        norm = self._head_norm_squared().clamp_min(1e-12)
        tau = torch.ones((), dtype=torch.float32, device=curvature.device)
        curvature = curvature.clamp_min(0.0)
        for _ in range(50):
            gamma = (curvature / (curvature + tau)).sum()
            tau = (gamma / norm).clamp_min(1e-8)
        return tau

    def prior(self, curvature: torch.Tensor | None = None) -> torch.Tensor:
        """The prior precision in use (0-dim float32): the fixed value, or the fitted one."""
        if not isinstance(self.prior_precision, str):
            return torch.tensor(self.prior_precision, dtype=torch.float32, device=self.head.weight.device)
        if curvature is None:
            return self.posterior_cache()["prior"]
        return self._fit_prior(curvature)

    def _eigen(self, matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigenvalues descending, eigenvectors as columns) of a symmetric matrix, in float64."""
        values, vectors = torch.linalg.eigh(matrix.double())
        return values.flip(0).clamp_min(0.0), vectors.flip(1)

    def _split(self, values: torch.Tensor) -> int:
        return values.shape[0] if self.rank is None else min(self.rank, values.shape[0])

    def posterior_cache(self) -> dict[str, Any]:
        """The factors the scores read, computed once per change of the statistics (lazily)."""
        if self._cache is not None:
            return self._cache
        self._follow_model_device()
        correction = self._correction(self.feature_decay)
        n = float(self.n_eff()) if self.updates else 0.0
        device = self.head.weight.device
        cache: dict[str, Any] = {}
        with torch.no_grad():
            if self.method == "diagonal":
                fisher = [f / self._correction(self.ema_decay) * n for f in self.fisher]
                curvature = [fisher[self._weight_index]] + ([fisher[self._bias_index]] if self._bias_index is not None else [])
                tau = self.prior(torch.cat([c.flatten() for c in curvature]))
                cache["s"] = torch.reciprocal(curvature[0] + tau).sum(dim=0)
                cache["s_b"] = (torch.reciprocal(curvature[1] + tau).sum() if self._bias_index is not None
                                else torch.zeros((), device=device))
            elif self.method == "kfac":
                moment = self.feature_moments[-1] / correction
                a, u_a = self._eigen(moment)
                g, _ = self._eigen(self.output_curvature / correction)
                data_term = n * g[:, None] * a[None, :]  # [K, d+1]: eigenvalues of n G (x) A
                tau = self.prior(data_term.flatten().float()).double()
                c = torch.reciprocal(data_term + tau).sum(dim=0)  # [d+1]
                r = self._split(a)
                tail = c[r:].mean() if r < c.shape[0] else torch.zeros((), dtype=torch.float64, device=device)
                cache["directions"] = u_a[:, :r].float()  # [d+1, r]
                cache["weights"] = (c[:r] - tail).float()
                cache["tail"] = tail.float()
            elif self.method == "mahalanobis":
                cache["layers"] = [self._mahalanobis_factors(self.feature_moments[i], self.class_sums[i], correction)
                                   for i in self._density]
                tau = torch.zeros((), device=device)
            else:  # prior
                # no data term: the marginal likelihood drives tau to 0, so "auto" means 1 (the ranking
                # of the score does not depend on tau)
                tau = (torch.ones((), device=device) if isinstance(self.prior_precision, str)
                       else self.prior(torch.zeros(1, device=device)))
            cache["prior"] = tau.float() if isinstance(tau, torch.Tensor) else tau
        self._cache = cache
        return cache

    def _mahalanobis_factors(self, moment: torch.Tensor, sums: torch.Tensor, correction: float) -> dict[str, torch.Tensor]:
        """One layer's cached factors of ``min_c (h - mu_c)^T W (h - mu_c)``, W = (S + eps I)^{-1}: the top
        `rank` eigen-directions of S exactly (weights w_j), the others with their mean weight t:
        ``sum_j (w_j - t) (z_j - zeta_cj)^2 + t |h - mu_c|^2``, z = U_r^T h, zeta_c = U_r^T mu_c, expanded
        so that a batch costs one product ``h @ [U_r | Q]`` with ``Q = (U_r diag(w - t) U_r^T + t I) mu^T``
        ([d, r + K]: z and the cross terms h^T W mu_c at once; fusing the second product into the first
        took the score from 0.35 to ~0.2 ms per 2000 rows of the experiment's 40-wide input)."""
        d = moment.shape[0] - 1
        second = (moment[:d, :d] / correction).double()
        sums = (sums / correction).double()  # [K, d+1]: E[p_c h], E[p_c]
        mass = sums[:, d]
        means = sums[:, :d] / mass.clamp_min(1e-12)[:, None]  # [K, d]
        covariance = second - (means.T * mass) @ means
        lam, u = self._eigen((covariance + covariance.T) / 2)
        w = torch.reciprocal(lam + self.shrinkage * lam.mean().clamp_min(1e-12))
        r = self._split(lam)
        tail = w[r:].mean() if r < d else torch.zeros((), dtype=torch.float64, device=moment.device)
        signed = w[:r] - tail  # [r], negative where a kept direction weighs less than the tail
        projected = means @ u[:, :r]  # [K, r]
        cross = u[:, :r] @ (projected * signed).T + tail * means.T  # [d, K]: h . cross_c = h^T W mu_c
        # every direction kept (no rest, all weights positive): whiten, so that sum_j w_j z_j^2 is a norm
        directions = u[:, :r] if r < d else u * signed.sqrt()
        return {"projection": torch.cat([directions, cross], 1).float(),  # [d, r + K]: h -> (z, h^T W mu_c)
                "signed": signed.float(), "tail": tail.float(), "rank": r, "has_tail": r < d,
                "centre_norms": (projected.square() @ signed + tail * means.square().sum(1)).float(),
                "scale": 1.0 / d}

    # ---- scores -------------------------------------------------------------------------------------
    def _epistemic(self, features: list[torch.Tensor]) -> torch.Tensor:
        """The `method`'s score from the layers' inputs ([N, d_l] each, the head's last): small matmuls
        against the cached factors."""
        cache = self.posterior_cache()
        if self.method == "mahalanobis":
            total = None
            for factors, x in zip(cache["layers"], (features[i] for i in self._density)):
                x = x.float()
                projected = x @ factors["projection"]  # one read of the layer's input: [N, r + K]
                z, cross = projected[:, :factors["rank"]], projected[:, factors["rank"]:]
                if factors["has_tail"]:
                    own = torch.addmv(factors["tail"] * torch.linalg.vector_norm(x, dim=1).square(), z * z, factors["signed"])
                else:  # every direction kept and z whitened: no isotropic rest, no [N, r] temporary
                    own = torch.linalg.vector_norm(z, dim=1).square_()
                distance = (cross.mul(-2.0).add_(factors["centre_norms"]).amin(dim=1) + own).clamp_min_(0.0)
                total = distance.mul_(factors["scale"]) if total is None else total.add_(distance, alpha=factors["scale"])
            return total
        h = features[-1].float()
        if self.method == "diagonal":
            return torch.addmv(cache["s_b"].expand(h.shape[0]), h * h, cache["s"])
        norms = (h * h).sum(1)
        if self.method == "prior":
            return (norms + 1.0) * (self.head.out_features / cache["prior"])
        directions = cache["directions"]
        d = self.head.in_features
        z = torch.addmm(directions[d], h, directions[:d])  # h~ U_r with h~ = [h, 1]
        return torch.addmv(cache["tail"] * (norms + 1.0), z * z, cache["weights"])

    def _forward(self, method: str, data):
        """One forward under no_grad capturing the layers' inputs: (logits [rows, V], [features [rows, d_l]])."""
        self._capture = True
        try:
            with torch.no_grad():
                output = self.model(data)
                features = list(self._features)
        finally:
            self._capture = False
            self._features = [None] * len(self.layers)
        logits = self._logits(method, output)
        read = self._density if self.method == "mahalanobis" else [len(self.layers) - 1]  # what the score reads
        if any(features[i] is None for i in read):
            raise self._fail(method, "a layer of `layers` (or the head) was not called during the forward pass")
        features = [f.reshape(-1, f.shape[-1]) if i in read else None for i, f in enumerate(features)]
        if any(features[i].shape[0] != logits.shape[0] for i in read):
            raise self._fail(method, f"the layers saw {[features[i].shape[0] for i in read]} rows but the model returned "
                             f"{logits.shape[0]} logits rows")
        return logits, features

    def estimate_uncertainty(self, data: torch.Tensor, *, per_sample: str = "mean") -> torch.Tensor:
        """float32 [N]: the epistemic score of `method` (score="epistemic") or the predictive entropy
        (score="entropy"), token rows reduced by `per_sample`; one forward pass."""
        data = self._check_data("estimate_uncertainty", data)
        per_sample = self._check_per_sample("estimate_uncertainty", per_sample)
        if self.score == "entropy":
            with torch.no_grad():
                logits = self._logits("estimate_uncertainty", self.model(data))
                values = aql_kernels.softmax_scores(logits if logits.dtype in _SCORE_DTYPES else logits.float()).entropy
        else:
            _, features = self._forward("estimate_uncertainty", data)
            with torch.no_grad():
                values = self._epistemic(features)
        return self._per_sample("estimate_uncertainty", values, data.shape[0], per_sample)

    def estimate(self, data: torch.Tensor) -> Uncertainty:
        """Predictive entropy, the epistemic score and all softmax statistics of one forward pass."""
        data = self._check_data("estimate", data)
        logits, features = self._forward("estimate", data)
        with torch.no_grad():
            scores = aql_kernels.softmax_scores(logits if logits.dtype in _SCORE_DTYPES else logits.float())
            epistemic = self._epistemic(features)
        return Uncertainty(scores.entropy, epistemic, scores)

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"fisher": list(self.fisher), "updates": self.updates, "samples_seen": self.samples_seen,
                "rows_since_update": self._rows_since_update, "feature_moments": list(self.feature_moments),
                "output_curvature": self.output_curvature, "class_sums": list(self.class_sums)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        missing = {"fisher", "updates", "samples_seen"} - set(state)
        if missing:
            raise self._fail("load_state_dict", f"state lacks {sorted(missing)}")
        fisher = state["fisher"]
        if not isinstance(fisher, (list, tuple)) or len(fisher) != len(self.fisher):
            got = len(fisher) if isinstance(fisher, (list, tuple)) else type(fisher).__name__
            raise self._fail("load_state_dict", f"fisher must be a list of {len(self.fisher)} tensors, got {got}")
        pairs = [(f"fisher[{i}]", mine, theirs) for i, (mine, theirs) in enumerate(zip(self.fisher, fisher))]
        if "output_curvature" in state:  # absent from checkpoints written before these statistics existed
            pairs.append(("output_curvature", self.output_curvature, state["output_curvature"]))
        for key in ("feature_moments", "class_sums"):
            theirs = state.get(key, [])
            if key in state and (not isinstance(theirs, (list, tuple)) or len(theirs) != len(self.layers)):
                raise self._fail("load_state_dict", f"{key} must be a list of {len(self.layers)} tensors (one per layer)")
            pairs += [(f"{key}[{i}]", mine, t) for i, (mine, t) in enumerate(zip(getattr(self, key), theirs))]
        for key, mine, theirs in pairs:
            if not isinstance(theirs, torch.Tensor) or theirs.shape != mine.shape:
                shape = tuple(theirs.shape) if isinstance(theirs, torch.Tensor) else type(theirs).__name__
                raise self._fail("load_state_dict", f"{key} must have shape {tuple(mine.shape)}, got {shape}")
        for _, mine, theirs in pairs:
            mine.copy_(theirs)
        self.updates = int(state["updates"])
        self.samples_seen = int(state["samples_seen"])
        self._rows_since_update = int(state.get("rows_since_update", 0))
        self._cache = None


_SCORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
