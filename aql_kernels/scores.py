"""Fused softmax statistics: per-row uncertainty scores and the cross-entropy loss from one read.

For each row x of ``logits[N, V]`` and p = softmax(x) (computed in float32):

    lse     = log sum_j exp x_j
    entropy = -sum_j p_j log p_j
    maxprob = max_j p_j
    margin  = p(1st) - p(2nd)             (1.0 when V == 1; 0.0 when the maximum is tied)
    argmax  = index of the largest logit  (lowest index on ties)
    loss    = lse - x[target]             (0 where target == ignore_index)
    el2n    = ||p - onehot(target)||_2    (0 where target == ignore_index)

Layout of this file: the Triton kernels (forward, backward) and their launchers, the C++ CPU
launchers (``csrc/cpu/scores.cpp`` through ctypes), the pure-torch reference (the spec), the
``torch.library`` ops with their fake implementations and autograd, and the public functions.

Special values, the same in every implementation:
- a row containing NaN gets NaN lse / entropy / maxprob / margin (and NaN loss / el2n unless its
  target is ignore_index); its argmax is the index of its first NaN, as ``torch.argmax`` returns;
- a row whose maximum is +inf gets lse = +inf and NaN entropy / maxprob / margin / el2n;
- a row of only -inf gets lse = -inf and NaN probability statistics (softmax is undefined there);
- a target outside [0, V) that is not ignore_index raises ValueError for CPU tensors (the C library
  returns AQL_ERR_TARGET_OUT_OF_RANGE; the reference checks too). For CUDA tensors checking would
  need a host synchronisation, so the row's loss and el2n are NaN instead (and its gradient is
  g * softmax, without the one-hot term); the other statistics are unaffected.
"""

from __future__ import annotations

import contextlib
from typing import NamedTuple, Optional

import torch

from . import _dispatch, _native
from ._validation import FLOAT_DTYPES, check_int, check_tensor

try:
    import triton
    import triton.language as tl
except Exception:  # triton is optional: the Triton implementation then reports itself unavailable
    triton = None
    tl = None

__all__ = [
    "SoftmaxScores",
    "softmax_scores",
    "softmax_scores_reference",
    "cross_entropy_with_scores",
    "IMPLEMENTATIONS",
]


class SoftmaxScores(NamedTuple):
    lse: torch.Tensor
    entropy: torch.Tensor
    maxprob: torch.Tensor
    margin: torch.Tensor
    argmax: torch.Tensor
    loss: torch.Tensor | None = None
    el2n: torch.Tensor | None = None


_REDUCTIONS = ("mean", "sum", "none")


def _validate(logits, targets, ignore_index, op="softmax_scores", targets_required=False):
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[0] == 0 or logits.shape[1] == 0:
        raise ValueError(f"aql_kernels.{op}: logits must have N >= 1 rows and V >= 1 columns, got shape {tuple(logits.shape)}")
    check_int(op, "ignore_index", ignore_index)
    if targets is None:
        if targets_required:
            raise TypeError(f"aql_kernels.{op}: targets must be a torch.Tensor of class indices, got None")
        return
    check_tensor(op, "targets", targets, ndim=1, dtypes=(torch.int64, torch.int32), device=logits.device)
    if targets.shape[0] != logits.shape[0]:
        raise ValueError(f"aql_kernels.{op}: targets must have length N={logits.shape[0]}, got {targets.shape[0]}")


def _unit_columns(logits: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The logits with unit column stride (copied only when needed) and their row stride."""
    n, v = logits.shape
    if (v > 1 and logits.stride(1) != 1) or (n > 1 and logits.stride(0) < v):  # e.g. expanded rows
        logits = logits.contiguous()
    return logits, (logits.stride(0) if n > 1 else v)


def _empty_outputs(logits: torch.Tensor, with_targets: bool):
    n = logits.shape[0]
    kw = dict(device=logits.device, dtype=torch.float32)
    stats = [torch.empty(n, **kw) for _ in range(4)]
    argmax = torch.empty(n, device=logits.device, dtype=torch.int64)
    loss = torch.empty(n if with_targets else 0, **kw)
    el2n = torch.empty(n if with_targets else 0, **kw)
    return (*stats, argmax, loss, el2n)


# ---------------------------------------------------------------------------------------------------
# Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------

# Columns per loop step: fixed, so registers do not grow with V (no spill cliff at large V).
# Compiled for sm_90 by triton 3.6 (cuobjdump -res-usage, bfloat16 input, with targets):
# BLOCK=2048 with 8 warps uses 110 registers and no local memory (two programs per SM);
# BLOCK=4096 needs 16 warps for 115 registers (one program per SM) or 224 with 8 warps.
_BLOCK_MAX = 2048

if triton is not None:

    @triton.jit
    def _softmax_scores_kernel(
        logits_ptr, row_stride, n_cols, targets_ptr, ignore_index,
        lse_ptr, entropy_ptr, maxprob_ptr, margin_ptr, argmax_ptr, loss_ptr, el2n_ptr,
        HAS_TARGETS: tl.constexpr, BLOCK: tl.constexpr,
    ):
        """One program per row; a loop over V in BLOCK-wide steps reads every logit exactly once.

        Online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax",
        arXiv:1805.02867): with the running shift k = running maximum, each lane keeps
            s += e, tq += (x - k) e, and s' += e, q' += e^2 outside the target column,
        with e = exp(x - k); when the maximum grows to k' the sums are rescaled by a = exp(k - k')
        (tq becomes a (tq + (k - k') s)). Each lane also keeps its top two logits (as a multiset),
        the index of its first maximum and of its first NaN. At the end, with s the lane sum,
            lse = k + log s, entropy = log s - tq / s, maxprob = exp(x_max - k) / s,
            margin = maxprob - exp(x_2nd - k) / s, loss = (k - x[t]) + log s,
            el2n = sqrt(q' + s'^2) / s   (= ||p - onehot(t)||, without cancellation).
        Memory traffic: N * V reads of the logits (one pass), N targets, seven [N] writes.
        Accumulation is float32 whatever the input dtype.
        """
        row = tl.program_id(0).to(tl.int64)
        row_ptr = logits_ptr + row * row_stride
        offsets = tl.arange(0, BLOCK)
        if HAS_TARGETS:
            target = tl.load(targets_ptr + row).to(tl.int64)
        else:
            target = -1
        first = tl.full([BLOCK], float("-inf"), tl.float32)
        second = tl.full([BLOCK], float("-inf"), tl.float32)
        first_index = tl.zeros([BLOCK], tl.int32)
        nan_index = tl.full([BLOCK], 2147483647, tl.int32)
        sum_exp = tl.zeros([BLOCK], tl.float32)
        sum_exp_excl = tl.zeros([BLOCK], tl.float32)
        sum_x_exp = tl.zeros([BLOCK], tl.float32)
        sum_sq_excl = tl.zeros([BLOCK], tl.float32)
        shift = tl.max(sum_exp, axis=0)  # a float32 scalar 0.0 that the loop can carry
        # A while loop rather than range(0, n_cols, BLOCK): the interpreter cannot turn a runtime
        # n_cols into a Python int under numpy >= 2.4, and compiled code is the same scf loop.
        start = 0
        while start < n_cols:
            cols = start + offsets
            in_row = cols < n_cols
            x = tl.load(row_ptr + cols, mask=in_row, other=float("-inf")).to(tl.float32)
            nan_index = tl.minimum(nan_index, tl.where(x != x, cols, 2147483647))
            # lanes see increasing columns, so a strict '>' keeps the lowest index of a tie
            first_index = tl.where(x > first, cols, first_index)
            second = tl.maximum(second, tl.minimum(first, x))
            first = tl.maximum(first, x)
            running_max = tl.max(first, axis=0)
            new_shift = tl.where(tl.abs(running_max) < float("inf"), running_max, 0.0)
            # In [-200, 0]: delta > 0 only when the first finite maximum replaces the initial
            # shift 0 (sums still 0) or the maximum becomes +inf (row overwritten at the end);
            # -200 keeps delta * s finite across the float range (exp(-200) is 0 in float32).
            delta = tl.minimum(tl.maximum(shift - new_shift, -200.0), 0.0)
            scale = tl.exp(delta)
            sum_x_exp = scale * (sum_x_exp + delta * sum_exp)
            sum_exp = scale * sum_exp
            sum_exp_excl = scale * sum_exp_excl
            sum_sq_excl = (scale * scale) * sum_sq_excl
            shift = new_shift
            d = tl.maximum(x - shift, -104.0)  # exp(-104) is 0 in float32; keeps -inf out of d * e
            e = tl.where(in_row, tl.exp(d), 0.0)
            sum_exp += e
            sum_x_exp += d * e
            not_target = cols.to(tl.int64) != target
            sum_exp_excl += tl.where(not_target, e, 0.0)
            sum_sq_excl += tl.where(not_target, e * e, 0.0)
            start += BLOCK

        row_max = tl.max(first, axis=0)
        argmax = tl.min(tl.where(first == row_max, first_index, 2147483647), axis=0)
        # the second largest of the row: every lane's first, except the argmax lane's second
        row_second = tl.max(tl.where(first_index == argmax, second, first), axis=0)
        first_nan = tl.min(nan_index, axis=0)
        has_nan = first_nan < 2147483647
        plus_inf = row_max == float("inf")
        s = tl.sum(sum_exp, axis=0)
        log_s = tl.log(s)
        lse = shift + log_s
        entropy = log_s - tl.sum(sum_x_exp, axis=0) / s
        # relative to the shift (== row_max when finite), not to lse: exact near the float range
        maxprob = tl.exp(row_max - shift) / s
        margin = maxprob - tl.exp(row_second - shift) / s
        bad = has_nan | plus_inf
        lse = tl.where(has_nan, float("nan"), tl.where(plus_inf, float("inf"), lse))
        entropy = tl.where(bad, float("nan"), entropy)
        maxprob = tl.where(bad, float("nan"), maxprob)
        margin = tl.where(bad, float("nan"), margin)
        tl.store(lse_ptr + row, lse)
        tl.store(entropy_ptr + row, entropy)
        tl.store(maxprob_ptr + row, maxprob)
        tl.store(margin_ptr + row, margin)
        tl.store(argmax_ptr + row, tl.where(has_nan, first_nan, argmax).to(tl.int64))
        if HAS_TARGETS:
            valid = target != ignore_index
            in_range = (target >= 0) & (target < n_cols)
            x_target = tl.load(row_ptr + target, mask=valid & in_range, other=0.0).to(tl.float32)
            s_excl = tl.sum(sum_exp_excl, axis=0)
            el2n = tl.sqrt(tl.sum(sum_sq_excl, axis=0) + s_excl * s_excl) / s
            el2n = tl.where(bad | (~in_range), float("nan"), el2n)
            loss = tl.where(in_range, (shift - x_target) + log_s, float("nan"))
            loss = tl.where(has_nan, float("nan"), tl.where(plus_inf, lse - x_target, loss))
            tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
            tl.store(el2n_ptr + row, tl.where(valid, el2n, 0.0))

    @triton.jit
    def _softmax_scores_backward_kernel(
        logits_ptr, row_stride, n_cols, targets_ptr, ignore_index, lse_ptr, grad_loss_ptr,
        grad_ptr, grad_row_stride, BLOCK: tl.constexpr,
    ):
        """grad[i, j] = g_i * (exp(x_ij - lse_i) - [j == t_i]), zero rows where t_i == ignore_index.

        Recomputes softmax from the forward's saved lse instead of storing probabilities.
        Memory traffic: one read and one write of N * V elements (plus N targets, lse, g). Each
        element is read and then written by the same program, so grad_ptr may be logits_ptr
        (in-place backward).
        """
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        target = tl.load(targets_ptr + row).to(tl.int64)
        valid = target != ignore_index
        g = tl.where(valid, tl.load(grad_loss_ptr + row), 0.0)
        lse = tl.where(valid, tl.load(lse_ptr + row), 0.0)
        x = tl.load(logits_ptr + row * row_stride + cols, mask=in_row, other=0.0).to(tl.float32)
        p = tl.exp(x - lse)
        grad = g * (p - tl.where(cols == target, 1.0, 0.0))
        grad = tl.where(valid, grad, 0.0)
        tl.store(grad_ptr + row * grad_row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _require_triton() -> None:
    status = _dispatch.triton_status()
    if not status.available:
        raise RuntimeError(f"aql_kernels.softmax_scores: the Triton implementation is unavailable: {status.detail}")


def _triton_config(v: int) -> tuple[int, int]:
    block = min(_BLOCK_MAX, max(16, triton.next_power_of_2(v)))
    num_warps = 4 if block <= 1024 else 8
    return block, num_warps


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _triton_forward(logits, targets, ignore_index, out=None):
    _require_triton()
    logits, row_stride = _unit_columns(logits)
    n, v = logits.shape
    if v > 2**31 - 1 - _BLOCK_MAX:  # column indices are int32 inside the kernel
        raise ValueError(f"aql_kernels.softmax_scores: the Triton kernel needs V < 2**31 - {_BLOCK_MAX + 1}, got {v}")
    out = _empty_outputs(logits, targets is not None) if out is None else out
    lse, entropy, maxprob, margin, argmax, loss, el2n = out
    has_targets = targets is not None
    targets_arg = targets.contiguous() if has_targets else argmax  # unused placeholder pointer
    block, num_warps = _triton_config(v)
    with _device_guard(logits):
        _softmax_scores_kernel[(n,)](
            logits, row_stride, v, targets_arg, ignore_index,
            lse, entropy, maxprob, margin, argmax,
            loss if has_targets else lse, el2n if has_targets else lse,
            HAS_TARGETS=has_targets, BLOCK=block, num_warps=num_warps,
        )
    return out


def _triton_backward(logits, targets, lse, grad_rows, ignore_index, out):
    _require_triton()
    n, v = logits.shape
    logits_u, row_stride = _unit_columns(logits)
    grad_row_stride = out.stride(0) if n > 1 else v
    block = min(2048, max(16, triton.next_power_of_2(v)))
    with _device_guard(logits):
        _softmax_scores_backward_kernel[(n, triton.cdiv(v, block))](
            logits_u, row_stride, v, targets.contiguous(), ignore_index, lse.contiguous(),
            grad_rows.float().contiguous(), out, grad_row_stride, BLOCK=block, num_warps=4 if block <= 1024 else 8,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# C++ CPU library (csrc/cpu/scores.cpp)
# ---------------------------------------------------------------------------------------------------

def _native_call(op: str, name: str, *args) -> None:
    try:
        _native.CPU.call(name, *args)
    except _native.NativeError as error:
        if error.status == 2:  # AQL_ERR_TARGET_OUT_OF_RANGE
            raise ValueError(f"aql_kernels.{op}: {error.message}") from None
        raise


def _native_forward(logits, targets, ignore_index, out=None):
    logits, row_stride = _unit_columns(logits)
    n, v = logits.shape
    out = _empty_outputs(logits, targets is not None) if out is None else out
    lse, entropy, maxprob, margin, argmax, loss, el2n = out
    targets64 = targets.to(torch.int64).contiguous() if targets is not None else None
    p = _native.pointer
    _native_call(
        "softmax_scores", "aql_softmax_scores",
        p(logits), _native.dtype_code(logits.dtype), n, v, row_stride, p(targets64), ignore_index,
        p(lse), p(entropy), p(maxprob), p(margin), p(argmax),
        p(loss if targets64 is not None else None), p(el2n if targets64 is not None else None),
    )
    return out


def _native_backward(logits, targets, lse, grad_rows, ignore_index, out):
    n, v = logits.shape
    logits_u, row_stride = _unit_columns(logits)
    grad_row_stride = out.stride(0) if n > 1 else v
    targets64 = targets.to(torch.int64).contiguous()
    lse = lse.contiguous()
    grad_rows = grad_rows.float().contiguous()
    p = _native.pointer
    _native_call(
        "cross_entropy_with_scores", "aql_softmax_scores_backward",
        p(logits_u), _native.dtype_code(logits_u.dtype), n, v, row_stride, p(targets64), ignore_index,
        p(lse), p(grad_rows), p(out), _native.dtype_code(out.dtype), grad_row_stride,
    )
    return out


# ---------------------------------------------------------------------------------------------------
# Reference (the spec)
# ---------------------------------------------------------------------------------------------------

def _check_targets_in_range(op: str, targets: torch.Tensor, v: int, ignore_index: int) -> None:
    # Host synchronisation: the reference is the spec, not a kernel; only done for CPU tensors.
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= v))
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"aql_kernels.{op}: target {int(targets[i])} of row {i} is outside [0, {v}) "
                         f"and is not ignore_index={ignore_index}")


def softmax_scores_reference(logits: torch.Tensor, targets: torch.Tensor | None = None, *, ignore_index: int = -100,
                             accumulate_dtype: torch.dtype = torch.float32) -> SoftmaxScores:
    """The spec, in plain torch (``accumulate_dtype=torch.float64`` for the tests' reference).

    Materialises log-softmax and probabilities ([N, V] each); statistics are returned in
    accumulate_dtype when that is float64, else float32. Special values as in the module docstring.
    """
    _validate(logits, targets, ignore_index, "softmax_scores_reference")
    v = logits.shape[1]
    x = logits.to(accumulate_dtype)
    # log-softmax of the logits shifted by their (finite) row maximum: x - lse would round away
    # log-sum for logits near the float range
    row_max = x.amax(dim=1)
    shift = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    shifted = x - shift[:, None]
    shifted_lse = torch.logsumexp(shifted, dim=1)
    lse = shift + shifted_lse
    logp = shifted - shifted_lse[:, None]
    p = logp.exp()
    entropy = -(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum(dim=1)
    if v >= 2:
        top2 = p.topk(2, dim=1).values
        maxprob, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
    else:
        maxprob = p[:, 0]
        margin = maxprob - 0.0  # 1.0, NaN where the row is NaN or -inf
    argmax = torch.argmax(x, dim=1)  # first NaN where a row has one
    row_nan = torch.isnan(x).any(dim=1)
    plus_inf = (x == float("inf")).any(dim=1) & ~row_nan
    nan = torch.full_like(lse, float("nan"))
    lse = torch.where(row_nan, nan, torch.where(plus_inf, torch.full_like(lse, float("inf")), lse))
    entropy = torch.where(row_nan | plus_inf, nan, entropy)
    maxprob = torch.where(row_nan | plus_inf, nan, maxprob)
    margin = torch.where(row_nan | plus_inf, nan, margin)
    loss = el2n = None
    if targets is not None:
        targets = targets.long()
        if logits.device.type == "cpu":
            _check_targets_in_range("softmax_scores_reference", targets, v, ignore_index)
        valid = targets != ignore_index
        in_range = (targets >= 0) & (targets < v)
        safe = torch.where(in_range, targets, torch.zeros_like(targets))
        picked = logp.gather(1, safe[:, None]).squeeze(1)
        loss = torch.where(in_range, -picked, nan)
        loss = torch.where(plus_inf, lse - x.gather(1, safe[:, None]).squeeze(1), loss)
        # ||p - onehot(t)||^2 = sum_{j != t} p_j^2 + (1 - p_t)^2 with 1 - p_t = sum_{j != t} p_j:
        # the same value as sum p^2 - 2 p_t + 1 without its cancellation when p_t is near 1.
        others = p.scatter(1, safe[:, None], 0.0)
        el2n = ((others * others).sum(dim=1) + others.sum(dim=1) ** 2).sqrt()
        el2n = torch.where(in_range & ~row_nan & ~plus_inf, el2n, nan)
        zeros = torch.zeros_like(lse)
        loss = torch.where(valid, loss, zeros)
        el2n = torch.where(valid, el2n, zeros)
    out_dtype = torch.float64 if accumulate_dtype == torch.float64 else torch.float32
    cast = lambda t: None if t is None else t.to(out_dtype)  # noqa: E731
    return SoftmaxScores(cast(lse), cast(entropy), cast(maxprob), cast(margin), argmax, cast(loss), cast(el2n))


def _reference_forward(logits, targets, ignore_index, out=None):
    scores = softmax_scores_reference(logits, targets, ignore_index=ignore_index)
    empty = torch.empty(0, device=logits.device, dtype=torch.float32)
    loss = scores.loss if scores.loss is not None else empty
    el2n = scores.el2n if scores.el2n is not None else empty.clone()
    result = (scores.lse, scores.entropy, scores.maxprob, scores.margin, scores.argmax, loss, el2n)
    if out is None:
        return result
    for destination, value in zip(out, result):
        destination.copy_(value)
    return out


def _reference_backward(logits, targets, lse, grad_rows, ignore_index, out):
    x = logits.float()
    targets = targets.long()
    if logits.device.type == "cpu":
        _check_targets_in_range("cross_entropy_with_scores", targets, logits.shape[1], ignore_index)
    valid = targets != ignore_index
    p = torch.exp(x - lse[:, None])
    cols = torch.arange(x.shape[1], device=x.device)
    onehot = (cols[None, :] == targets[:, None]).to(p.dtype)
    g = torch.where(valid, grad_rows.float(), torch.zeros_like(lse))
    grad = torch.where(valid[:, None], g[:, None] * (p - onehot), torch.zeros_like(p))
    out.copy_(grad)
    return out


# Forward launchers: (logits, targets | None, ignore_index, out=None) -> the 7 outputs of
# aql::softmax_scores, written into `out` when given (the tests poison it first).
_FORWARD = {"reference": _reference_forward, "native": _native_forward, "triton": _triton_forward}
# Backward launchers: (logits, targets, lse, grad_rows, ignore_index, out) -> out, where out may be
# the logits themselves (in-place backward).
_BACKWARD = {"reference": _reference_backward, "native": _native_backward, "triton": _triton_backward}


def _choose(device: torch.device) -> str:
    return _dispatch.choose("softmax_scores", device, native_symbol="aql_softmax_scores")


# ---------------------------------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------------------------------

_Outputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@torch.library.custom_op("aql::softmax_scores", mutates_args=())
def _softmax_scores_op(logits: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int) -> _Outputs:
    """(lse, entropy, maxprob, margin, argmax, loss, el2n); loss and el2n are empty without targets."""
    return _FORWARD[_choose(logits.device)](logits, targets, ignore_index)


def _fake_outputs(logits, targets):
    n = logits.shape[0]
    m = n if targets is not None else 0
    f32 = dict(device=logits.device, dtype=torch.float32)
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.int64), torch.empty(m, **f32), torch.empty(m, **f32))


@_softmax_scores_op.register_fake
def _(logits, targets, ignore_index):
    return _fake_outputs(logits, targets)


@torch.library.custom_op("aql::cross_entropy_with_scores", mutates_args=())
def _cross_entropy_op(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int, inplace_backward: bool) -> _Outputs:
    """The forward of softmax_scores with targets, differentiable through its per-row loss (index 5)."""
    return _FORWARD[_choose(logits.device)](logits, targets, ignore_index)


@_cross_entropy_op.register_fake
def _(logits, targets, ignore_index, inplace_backward):
    return _fake_outputs(logits, targets)


@torch.library.custom_op("aql::softmax_scores_backward", mutates_args=())
def _backward_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                 ignore_index: int) -> torch.Tensor:
    """d(sum_i grad_rows[i] * loss[i]) / d logits, in the logits' dtype and layout."""
    out = torch.empty_like(logits, memory_format=torch.contiguous_format)
    return _BACKWARD[_choose(logits.device)](logits, targets, lse, grad_rows, ignore_index, out)


@_backward_op.register_fake
def _(logits, targets, lse, grad_rows, ignore_index):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("aql::softmax_scores_backward_", mutates_args=("logits",))
def _backward_inplace_op(logits: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, grad_rows: torch.Tensor,
                         ignore_index: int) -> None:
    """As aql::softmax_scores_backward, written over the logits (which must have unit column stride)."""
    _BACKWARD[_choose(logits.device)](logits, targets, lse, grad_rows, ignore_index, logits)


@_backward_inplace_op.register_fake
def _(logits, targets, lse, grad_rows, ignore_index):
    return None


def _setup_context(ctx, inputs, output):
    logits, targets, ignore_index, inplace_backward = inputs
    ctx.save_for_backward(logits, targets, output[0])
    ctx.ignore_index = ignore_index
    ctx.inplace_backward = inplace_backward
    ctx.mark_non_differentiable(*output[:5], output[6])


def _cross_entropy_backward(ctx, *grads):
    logits, targets, lse = ctx.saved_tensors
    grad_rows = grads[5]
    if grad_rows is None:
        return None, None, None, None
    if ctx.inplace_backward:
        torch.ops.aql.softmax_scores_backward_(logits, targets, lse, grad_rows, ctx.ignore_index)
        return logits, None, None, None
    return torch.ops.aql.softmax_scores_backward(logits, targets, lse, grad_rows, ctx.ignore_index), None, None, None


_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------

def _wrap(outputs, with_targets: bool) -> SoftmaxScores:
    lse, entropy, maxprob, margin, argmax, loss, el2n = outputs
    if not with_targets:
        loss = el2n = None
    return SoftmaxScores(lse, entropy, maxprob, margin, argmax, loss, el2n)


def softmax_scores(logits: torch.Tensor, targets: torch.Tensor | None = None, *, ignore_index: int = -100) -> SoftmaxScores:
    """Fused softmax statistics of each row of ``logits[N, V]`` (float32 / bfloat16 / float16, any
    row stride), computed from one read of the logits. Returns float32 ``[N]`` tensors (argmax
    int64); ``loss`` and ``el2n`` only when targets (int64 / int32 ``[N]``) are given. Dispatches
    by device: CUDA -> Triton, CPU -> the C++ library, else (or when missing) the reference."""
    _validate(logits, targets, ignore_index)
    return _wrap(torch.ops.aql.softmax_scores(logits, targets, ignore_index), targets is not None)


def cross_entropy_with_scores(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                              reduction: str = "mean", inplace_backward: bool = False):
    """``F.cross_entropy(logits, targets)`` on 2-D logits plus the softmax statistics of the same pass.

    Returns ``(loss, SoftmaxScores)``; the loss is float32 whatever the logits' dtype, and is
    differentiable w.r.t. the logits; the scores are detached. reduction: "mean" (over rows whose
    target is not ignore_index, like F.cross_entropy: NaN when there are none), "sum" or "none".
    Forward: one read of the logits. Backward: one read of the logits and one write of the gradient,
    recomputing softmax from the saved lse.

    inplace_backward=True writes the gradient into the logits' own buffer during backward (no
    second [N, V] allocation; the usual case is the output of a language-model head, which nothing
    else reads after the loss). The logits' values are destroyed by backward and the gradient
    passed upstream *is* that buffer, so use it only when the logits are not needed afterwards;
    autograd's version counter raises if another saved use of them is unpacked later.
    """
    op = "cross_entropy_with_scores"
    _validate(logits, targets, ignore_index, op, targets_required=True)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"aql_kernels.{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"aql_kernels.{op}: inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward and logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"aql_kernels.{op}: inplace_backward needs logits with unit column stride, got strides {logits.stride()}")
    outputs = torch.ops.aql.cross_entropy_with_scores(logits, targets, ignore_index, inplace_backward)
    rows = outputs[5]
    if reduction == "none":
        loss = rows
    elif reduction == "sum":
        loss = rows.sum()
    else:
        loss = rows.sum() / (targets != ignore_index).sum()
    scores = _wrap(tuple(t.detach() for t in outputs), True)
    return loss, scores


def _implementation(name: str):
    forward = _FORWARD[name]

    def run(logits: torch.Tensor, targets: torch.Tensor | None = None, *, ignore_index: int = -100) -> SoftmaxScores:
        _validate(logits, targets, ignore_index)
        return _wrap(forward(logits, targets, ignore_index), targets is not None)

    run.__name__ = f"_softmax_scores_{name}"
    run.__qualname__ = run.__name__
    run.__doc__ = f"softmax_scores forced onto the {name} implementation (same signature and validation)."
    return run


_softmax_scores_native = _implementation("native")
_softmax_scores_triton = _implementation("triton")

IMPLEMENTATIONS = {
    "reference": softmax_scores_reference,
    "native": _softmax_scores_native,
    "triton": _softmax_scores_triton,
}
