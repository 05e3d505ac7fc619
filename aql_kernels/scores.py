"""Fused softmax statistics: per-row uncertainty scores and the cross-entropy loss from one read.

For each row x of ``logits[N, V]`` and p = softmax(x) (computed in float32):

    lse     = log sum_j exp x_j
    entropy = -sum_j p_j log p_j
    maxprob = max_j p_j
    margin  = p(1st) - p(2nd)             (1.0 when V == 1; 0.0 when the maximum is tied)
    argmax  = index of the largest logit  (lowest index on ties)
    loss    = lse - x[target]             (0 where target == ignore_index)
    el2n    = ||p - onehot(target)||_2    (0 where target == ignore_index)

The public functions also take sequences, ``logits[B, T, V]`` with ``targets[B, T]``: the kernels
read them as B * T rows (in place when evenly spaced), shift=True pairs position t with target t + 1,
and the statistics come back per sequence (``per_sample``). The loss also takes F.cross_entropy's
label_smoothing and class weight (in torch around the kernels).

Layout of this file: the Triton kernels (forward, backward) and their launchers, the C++ CPU
launchers (``csrc/cpu/scores.cpp`` through ctypes), the pure-torch reference (the spec), the
``torch.library`` ops (the forward and the two backwards, with fake implementations), the loss's
weighting, smoothing and reductions with its one autograd function, the sequence layer, and the
public functions. Every launcher takes and returns the
statistics as a ``SoftmaxScores``. In plain eager mode the public functions call the chosen launcher
directly; under torch.compile, tracing, dispatch modes and tensor subclasses they call the registered
ops (``_dispatch.eager``). The autograd function is the same on both routes.

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
import functools
from typing import NamedTuple, Optional

import torch

from . import _dispatch, _native
from ._validation import FLOAT_DTYPES, check_float, check_int, check_tensor

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
_SCORE_FIELDS = ("lse", "entropy", "maxprob", "margin", "loss", "el2n")  # the float fields of SoftmaxScores
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _validate(logits, targets, ignore_index, op="softmax_scores", targets_required=False):
    check_tensor(op, "logits", logits, ndim=2, dtypes=FLOAT_DTYPES)
    if logits.shape[1] == 0:
        raise ValueError(f"aql_kernels.{op}: logits must have V >= 1 columns, got shape {tuple(logits.shape)}")
    # the kernels take it as int64: a wider Python int would wrap silently
    check_int(op, "ignore_index", ignore_index, low=_INT64_MIN, high=_INT64_MAX)
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


def _empty_outputs(logits: torch.Tensor, with_targets: bool, *, shared: bool = True) -> SoftmaxScores:
    """Uninitialised outputs for the launchers (loss and el2n None without targets).

    shared: the float fields are the rows of one [F, N] buffer, in _SCORE_FIELDS order (two
    allocations instead of seven: ~4 us less per call on the 2-CPU machine, and the per-sample
    reduction of sequences reads the buffer as it is). Apart: in the registered op, whose outputs
    must not alias each other, and under the loss's autograd, which saves lse."""
    n, device = logits.shape[0], logits.device
    count = 6 if with_targets else 4
    if shared:
        floats = torch.empty((count, n), device=device, dtype=torch.float32).unbind(0)
    else:
        floats = [torch.empty(n, device=device, dtype=torch.float32) for _ in range(count)]
    argmax = torch.empty(n, device=device, dtype=torch.int64)
    if with_targets:
        lse, entropy, maxprob, margin, loss, el2n = floats
        return SoftmaxScores(lse, entropy, maxprob, margin, argmax, loss, el2n)
    return SoftmaxScores(*floats, argmax)


def _shared_buffer(scores: SoftmaxScores, names) -> torch.Tensor | None:
    """The [F, N] buffer whose rows are the fields `names` (in order), when _empty_outputs shared one."""
    base = scores.lse._base
    if base is None or base.dim() != 2 or base.shape[0] != len(names):
        return None
    start, step = base.data_ptr(), base.stride(0) * 4
    for i, name in enumerate(names):
        field = getattr(scores, name)
        if field._base is not base or field.data_ptr() != start + i * step:
            return None
    return base


# ---------------------------------------------------------------------------------------------------
# Triton (CUDA tensors; CPU tensors under TRITON_INTERPRET=1)
# ---------------------------------------------------------------------------------------------------

# The forward splits each row into chunks of CHUNK_BLOCKS * BLOCK columns: a 2-D grid (rows x
# chunks) of programs reduces every chunk to partial statistics, and a second small kernel combines
# the partials of each row (when a row is one chunk the first kernel finishes it directly). With one
# program per row, each program waits for one block at a time, so N = 4096 rows keep too few loads
# in flight per SM for HBM (the H200 reached 621 GB/s on 4096 x 32000 bf16); the split grid gives every SM dozens of programs, and each
# program keeps its next two blocks in flight while it reduces the current one.
# Eight elements per thread (one or two 16-byte loads): the loop carries six [BLOCK] float32 states
# and three blocks; triton 3.6 compiles it for sm_90 to 114 (bfloat16) / 116 (float32) registers
# with no local memory; a loop step is 230 / 237 SASS instructions per thread (8 elements), 39 of
# them in the rarely taken rescale branch (the one-program-per-row kernel it replaces: 308, all run).
_ELEMENTS_PER_THREAD = 8
_NUM_WARPS = 8
_BLOCK = _ELEMENTS_PER_THREAD * 32 * _NUM_WARPS  # 2048 columns per loop step
_CHUNK_BLOCKS_MAX = 8  # at most 8 steps per program: the serial chain of a program stays short
_PROGRAMS_PER_SM = 16  # split rows until the grid has at least this many programs per SM
_CHUNKS_MAX = 1024  # partials per row that one combine program holds in registers (V beyond 2M: longer chunks)
# When a row is split, each (row, chunk) program leaves its partial statistics in two buffers of
# planes of N * n_chunks words: float32 planes (the chunk's shift, its three sums, its top two logits)
# and int32 planes (its argmax and first NaN). _store_partials and _load_partials are their only users.
_FLOAT_PLANES = ("shift", "sum_exp", "sum_x_exp", "sum_sq", "max", "second")
_INDEX_PLANES = ("argmax", "first_nan")

if triton is not None:
    # Plane offsets inside the kernels (Triton reads module globals only as constexpr).
    _PLANE_SHIFT = tl.constexpr(_FLOAT_PLANES.index("shift"))
    _PLANE_SUM_EXP = tl.constexpr(_FLOAT_PLANES.index("sum_exp"))
    _PLANE_SUM_X_EXP = tl.constexpr(_FLOAT_PLANES.index("sum_x_exp"))
    _PLANE_SUM_SQ = tl.constexpr(_FLOAT_PLANES.index("sum_sq"))
    _PLANE_MAX = tl.constexpr(_FLOAT_PLANES.index("max"))
    _PLANE_SECOND = tl.constexpr(_FLOAT_PLANES.index("second"))
    _PLANE_ARGMAX = tl.constexpr(_INDEX_PLANES.index("argmax"))
    _PLANE_FIRST_NAN = tl.constexpr(_INDEX_PLANES.index("first_nan"))

    @triton.jit
    def _store_partials(partial_ptr, partial_index_ptr, plane, at, shift, sum_exp, sum_x_exp, sum_sq, chunk_max,
                        chunk_second, chunk_argmax, first_nan):
        """Writes the partials of one (row, chunk) at word `at` of every plane (plane = N * n_chunks words)."""
        tl.store(partial_ptr + _PLANE_SHIFT * plane + at, shift)
        tl.store(partial_ptr + _PLANE_SUM_EXP * plane + at, sum_exp)
        tl.store(partial_ptr + _PLANE_SUM_X_EXP * plane + at, sum_x_exp)
        tl.store(partial_ptr + _PLANE_SUM_SQ * plane + at, sum_sq)
        tl.store(partial_ptr + _PLANE_MAX * plane + at, chunk_max)
        tl.store(partial_ptr + _PLANE_SECOND * plane + at, chunk_second)
        tl.store(partial_index_ptr + _PLANE_ARGMAX * plane + at, chunk_argmax)
        tl.store(partial_index_ptr + _PLANE_FIRST_NAN * plane + at, first_nan)

    @triton.jit
    def _load_partials(partial_ptr, partial_index_ptr, plane, at, present):
        """The partials of the chunks `at` (masked by `present`; absent chunks read as neutral values)."""
        shift = tl.load(partial_ptr + _PLANE_SHIFT * plane + at, mask=present, other=0.0)
        sum_exp = tl.load(partial_ptr + _PLANE_SUM_EXP * plane + at, mask=present, other=0.0)
        sum_x_exp = tl.load(partial_ptr + _PLANE_SUM_X_EXP * plane + at, mask=present, other=0.0)
        sum_sq = tl.load(partial_ptr + _PLANE_SUM_SQ * plane + at, mask=present, other=0.0)
        chunk_max = tl.load(partial_ptr + _PLANE_MAX * plane + at, mask=present, other=float("-inf"))
        chunk_second = tl.load(partial_ptr + _PLANE_SECOND * plane + at, mask=present, other=float("-inf"))
        chunk_argmax = tl.load(partial_index_ptr + _PLANE_ARGMAX * plane + at, mask=present, other=2147483647)
        first_nan = tl.load(partial_index_ptr + _PLANE_FIRST_NAN * plane + at, mask=present, other=2147483647)
        return shift, sum_exp, sum_x_exp, sum_sq, chunk_max, chunk_second, chunk_argmax, first_nan

    @triton.jit
    def _finish_row(
        row, row_ptr, n_cols, target, ignore_index,
        shift, sum_exp, sum_x_exp, sum_sq, row_max, argmax, row_second, first_nan,
        lse_ptr, entropy_ptr, maxprob_ptr, margin_ptr, argmax_ptr, loss_ptr, el2n_ptr,
        HAS_TARGETS: tl.constexpr,
    ):
        """Writes the seven statistics of one row from its combined sums (see the forward kernel).

        sum_exp, sum_x_exp (log2 units) and sum_sq leave out the target column; its term is added
        here from one scalar load, so el2n needs no cancelling subtraction.
        """
        LOG2E: tl.constexpr = 1.4426950408889634
        LN2: tl.constexpr = 0.6931471805599453
        if HAS_TARGETS:
            valid = target != ignore_index
            in_range = (target >= 0) & (target < n_cols)
            x_target = tl.load(row_ptr + target, mask=in_range, other=0.0).to(tl.float32)
            d_target = tl.maximum((x_target - shift) * LOG2E, -200.0)
            e_target = tl.where(in_range, tl.exp2(d_target), 0.0)
            s = sum_exp + e_target
            t = sum_x_exp + tl.where(in_range, d_target * e_target, 0.0)
        else:
            s = sum_exp
            t = sum_x_exp
        has_nan = first_nan < 2147483647
        plus_inf = row_max == float("inf")
        log_s = tl.log(s)
        lse = shift + log_s
        entropy = log_s - (t * LN2) / s
        # relative to the shift (== row_max when finite), not to lse: exact near the float range
        maxprob = tl.exp2((row_max - shift) * LOG2E) / s
        margin = maxprob - tl.exp2((row_second - shift) * LOG2E) / s
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
            el2n = tl.sqrt(sum_sq + sum_exp * sum_exp) / s
            el2n = tl.where(bad | (~in_range), float("nan"), el2n)
            x_loss = tl.where(in_range, x_target, 0.0)
            loss = tl.where(in_range, (shift - x_target) + log_s, float("nan"))
            loss = tl.where(has_nan, float("nan"), tl.where(plus_inf, lse - x_loss, loss))
            tl.store(loss_ptr + row, tl.where(valid, loss, 0.0))
            tl.store(el2n_ptr + row, tl.where(valid, el2n, 0.0))

    @triton.jit
    def _softmax_scores_kernel(
        logits_ptr, row_stride, n_cols, targets_ptr, ignore_index,
        partial_ptr, partial_index_ptr, partial_plane, n_chunks,
        lse_ptr, entropy_ptr, maxprob_ptr, margin_ptr, argmax_ptr, loss_ptr, el2n_ptr,
        HAS_TARGETS: tl.constexpr, SPLIT: tl.constexpr, BLOCK: tl.constexpr, CHUNK_BLOCKS: tl.constexpr,
    ):
        """Program (row, chunk) reduces columns [chunk * CHUNK_BLOCKS * BLOCK, ...) of its row.

        Online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax",
        arXiv:1805.02867) in base 2: with the shift k = the running maximum of the chunk and
        d = (x - k) log2(e), e = 2^d, each lane keeps s += e, t += d e, q += e^2 over the columns
        other than the target (whose term is added back by _finish_row from one scalar load), and
        its top two logits (as a multiset) with the index of its first maximum. The sums are
        rescaled (t becomes a (t + delta s), a = 2^delta) only in the rare steps where the maximum
        grows. Then, with s, t, q summed over the row:
            lse = k + log s, entropy = log s - t ln(2) / s, maxprob = exp(x_max - k) / s,
            margin = maxprob - exp(x_2nd - k) / s, loss = (k - x[t]) + log s,
            el2n = sqrt(q' + s'^2) / s   (primes: without the target column; = ||p - onehot(t)||).
        NaN is tracked by the NaN-propagating lane maximum; only a chunk that holds a NaN is
        scanned again for the index of its first NaN.
        Memory traffic: N * V reads of the logits (one pass; two blocks ahead, evict-first),
        N targets, seven [N] writes, plus 8 words per (row, chunk) of partials when SPLIT.
        Accumulation is float32 whatever the input dtype.
        """
        LOG2E: tl.constexpr = 1.4426950408889634
        row = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        row_ptr = logits_ptr + row * row_stride
        offsets = tl.arange(0, BLOCK)
        chunk_start = chunk * (CHUNK_BLOCKS * BLOCK)
        chunk_end = tl.minimum(chunk_start + CHUNK_BLOCKS * BLOCK, n_cols)
        if HAS_TARGETS:
            target = tl.load(targets_ptr + row).to(tl.int64)
            # the column left out of the sums: the target when it is a column of the row
            in_range = (target >= 0) & (target < n_cols)
            excluded = tl.where(in_range, target, -1).to(tl.int32)
        else:
            target = -1
            excluded = -1
        first = tl.full([BLOCK], float("-inf"), tl.float32)
        second = tl.full([BLOCK], float("-inf"), tl.float32)
        # the block in which each lane met its maximum: a scalar per step, so that no index vector
        # (int32, laid out unlike the 16-bit logits) crosses shared memory inside the loop
        first_block = tl.zeros([BLOCK], tl.int32) + chunk_start
        sum_exp = tl.zeros([BLOCK], tl.float32)
        sum_x_exp = tl.zeros([BLOCK], tl.float32)
        sum_sq = tl.zeros([BLOCK], tl.float32)
        shift = tl.max(sum_exp, axis=0)  # a float32 scalar 0.0 that the loop can carry
        # two blocks in flight ahead of the one being reduced (masked off past the chunk)
        x = tl.load(row_ptr + chunk_start + offsets, mask=offsets < chunk_end - chunk_start, other=float("-inf"),
                    eviction_policy="evict_first")
        x_next = tl.load(row_ptr + chunk_start + BLOCK + offsets, mask=offsets < chunk_end - chunk_start - BLOCK,
                         other=float("-inf"), eviction_policy="evict_first")
        block_start = chunk_start
        # A while loop rather than range(start, end, BLOCK): the interpreter cannot turn runtime
        # bounds into Python ints under numpy >= 2.4, and compiled code is the same scf loop.
        while block_start < chunk_end:
            next_start = block_start + BLOCK
            after_next = next_start + BLOCK
            x_after_next = tl.load(row_ptr + after_next + offsets, mask=offsets < chunk_end - after_next,
                                   other=float("-inf"), eviction_policy="evict_first")
            xf = x.to(tl.float32)
            # lanes see increasing columns, so a strict '>' keeps the lowest index of a tie (and a
            # lane of only -inf keeps its first column)
            first_block = tl.where(xf > first, block_start, first_block)
            second = tl.maximum(second, tl.minimum(first, xf))
            first = tl.maximum(first, xf, propagate_nan=tl.PropagateNan.ALL)
            running_max = tl.max(first, axis=0)
            new_shift = tl.where(tl.abs(running_max) < float("inf"), running_max, 0.0)
            if new_shift != shift:
                # In [-200, 0] (log2 units): delta > 0 only when the first finite maximum replaces
                # the initial shift 0 (sums still 0) or the maximum becomes +inf (row overwritten
                # at the end); the clamp keeps delta * s finite across the float range.
                delta = tl.minimum(tl.maximum((shift - new_shift) * LOG2E, -200.0), 0.0)
                scale = tl.exp2(delta)
                sum_x_exp = scale * (sum_x_exp + delta * sum_exp)
                sum_exp = scale * sum_exp
                sum_sq = (scale * scale) * sum_sq
                shift = new_shift
            d = tl.maximum((xf - shift) * LOG2E, -200.0)  # 2^-200 is 0 in float32: keeps -inf out of d * e
            e = tl.exp2(d)
            e = tl.where(offsets == excluded - block_start, 0.0, e)  # the target's term is added at the end
            sum_exp += e
            sum_x_exp += d * e
            sum_sq += e * e
            x = x_next
            x_next = x_after_next
            block_start = next_start

        first_index = first_block + offsets
        chunk_max = tl.max(first, axis=0)
        chunk_argmax = tl.min(tl.where(first == chunk_max, first_index, 2147483647), axis=0)
        # the second largest of the chunk: every lane's first, except the argmax lane's second
        chunk_second = tl.max(tl.where(first_index == chunk_argmax, second, first), axis=0)
        first_nan = tl.min(tl.full([BLOCK], 2147483647, tl.int32), axis=0)
        if tl.max((first != first).to(tl.int32), axis=0) > 0:  # rare: find the chunk's first NaN
            scan_start = chunk_start
            while scan_start < chunk_end:
                scan = scan_start + offsets
                y = tl.load(row_ptr + scan, mask=scan < chunk_end, other=0.0).to(tl.float32)
                first_nan = tl.minimum(first_nan, tl.min(tl.where(y != y, scan, 2147483647), axis=0))
                scan_start += BLOCK
        s = tl.sum(sum_exp, axis=0)
        t = tl.sum(sum_x_exp, axis=0)
        q = tl.sum(sum_sq, axis=0)
        if SPLIT:
            _store_partials(partial_ptr, partial_index_ptr, partial_plane, row * n_chunks + chunk, shift, s, t, q,
                            chunk_max, chunk_second, chunk_argmax, first_nan)
        else:
            _finish_row(row, row_ptr, n_cols, target, ignore_index, shift, s, t, q, chunk_max, chunk_argmax,
                        chunk_second, first_nan, lse_ptr, entropy_ptr, maxprob_ptr, margin_ptr, argmax_ptr,
                        loss_ptr, el2n_ptr, HAS_TARGETS)

    @triton.jit
    def _softmax_scores_combine_kernel(
        logits_ptr, row_stride, n_cols, targets_ptr, ignore_index,
        partial_ptr, partial_index_ptr, partial_plane, n_chunks,
        lse_ptr, entropy_ptr, maxprob_ptr, margin_ptr, argmax_ptr, loss_ptr, el2n_ptr,
        HAS_TARGETS: tl.constexpr, CHUNKS: tl.constexpr,
    ):
        """One program per row: merges the row's chunk partials (each relative to its own shift k_c)
        into the row's sums relative to k = the row maximum, with a_c = 2^delta_c,
        delta_c = (k_c - k) log2(e):  s = sum a_c s_c,  t = sum a_c (t_c + delta_c s_c),
        q = sum a_c^2 q_c; the argmax is the lowest chunk argmax among the chunks that reach the
        row maximum. Memory traffic: 8 words per (row, chunk), one logit per row (the target's).
        """
        LOG2E: tl.constexpr = 1.4426950408889634
        row = tl.program_id(0).to(tl.int64)
        chunks = tl.arange(0, CHUNKS)
        present = chunks < n_chunks
        at = row * n_chunks + chunks
        shift_c, s_c, t_c, q_c, max_c, second_c, argmax_c, nan_c = _load_partials(partial_ptr, partial_index_ptr,
                                                                                 partial_plane, at, present)
        row_max = tl.max(max_c, axis=0)
        shift = tl.where(tl.abs(row_max) < float("inf"), row_max, 0.0)
        delta = tl.minimum(tl.maximum((shift_c - shift) * LOG2E, -200.0), 0.0)
        scale = tl.exp2(delta)
        s = tl.sum(scale * s_c, axis=0)
        t = tl.sum(scale * (t_c + delta * s_c), axis=0)
        q = tl.sum((scale * scale) * q_c, axis=0)
        argmax = tl.min(tl.where(max_c == row_max, argmax_c, 2147483647), axis=0)
        row_second = tl.max(tl.where(argmax_c == argmax, second_c, max_c), axis=0)
        first_nan = tl.min(nan_c, axis=0)
        if HAS_TARGETS:
            target = tl.load(targets_ptr + row).to(tl.int64)
        else:
            target = -1
        _finish_row(row, logits_ptr + row * row_stride, n_cols, target, ignore_index, shift, s, t, q, row_max,
                    argmax, row_second, first_nan, lse_ptr, entropy_ptr, maxprob_ptr, margin_ptr, argmax_ptr,
                    loss_ptr, el2n_ptr, HAS_TARGETS)

    @triton.jit
    def _softmax_scores_backward_kernel(
        logits_ptr, row_stride, n_cols, targets_ptr, ignore_index, lse_ptr, grad_loss_ptr,
        grad_ptr, grad_row_stride, BLOCK: tl.constexpr,
    ):
        """grad[i, j] = g_i * (exp(x_ij - lse_i) - [j == t_i]), zero rows where t_i == ignore_index.

        Recomputes softmax from the forward's saved lse instead of storing probabilities.
        Memory traffic: one read and one write of N * V elements (plus N targets, lse, g), a pure
        stream: a 2-D grid (rows x column blocks), int32 column offsets, exp2 with the lse scaled
        once per program, evict-first loads and 16-byte vector accesses. Each element is read and
        then written by the same program, so grad_ptr may be logits_ptr (in-place backward).
        """
        LOG2E: tl.constexpr = 1.4426950408889634
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        in_row = cols < n_cols
        x = tl.load(logits_ptr + row * row_stride + cols, mask=in_row, other=0.0, eviction_policy="evict_first")
        target = tl.load(targets_ptr + row).to(tl.int64)
        valid = target != ignore_index
        g = tl.where(valid, tl.load(grad_loss_ptr + row), 0.0)
        lse2 = tl.where(valid, tl.load(lse_ptr + row), 0.0) * LOG2E
        p = tl.exp2(x.to(tl.float32) * LOG2E - lse2)
        # the target's column: a scalar offset inside this block (out of [0, BLOCK) when elsewhere)
        local = target - tl.program_id(1).to(tl.int64) * BLOCK
        hit = tl.where((local >= 0) & (local < BLOCK), local, -1).to(tl.int32)
        grad = g * (p - tl.where(tl.arange(0, BLOCK) == hit, 1.0, 0.0))
        tl.store(grad_ptr + row * grad_row_stride + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)


def _require_triton() -> None:
    status = _dispatch.triton_status()
    if not status.available:
        raise RuntimeError(f"aql_kernels.softmax_scores: the Triton implementation is unavailable: {status.detail}")


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # CPU tensors under TRITON_INTERPRET=1: fewest programs (the interpreter runs them serially)


def _forward_grid(n: int, v: int, sm_count: int, block: int, chunk_blocks: int | None) -> tuple[int, int]:
    """(chunk_blocks, n_chunks): the fewest chunks per row that give the grid
    _PROGRAMS_PER_SM programs per SM, with at most _CHUNK_BLOCKS_MAX blocks per chunk."""
    blocks = triton.cdiv(v, block)
    if chunk_blocks is None:
        wanted = min(blocks, max(triton.cdiv(_PROGRAMS_PER_SM * sm_count, n), triton.cdiv(blocks, _CHUNK_BLOCKS_MAX)))
        chunk_blocks = min(triton.next_power_of_2(triton.cdiv(blocks, wanted)), triton.next_power_of_2(blocks))
        chunk_blocks = max(chunk_blocks, triton.next_power_of_2(triton.cdiv(blocks, _CHUNKS_MAX)))
    return chunk_blocks, triton.cdiv(blocks, chunk_blocks)


def _device_guard(tensor: torch.Tensor):
    # Triton launches on the current CUDA device; make it the tensor's.
    if tensor.device.type == "cuda" and tensor.device.index != torch.cuda.current_device():
        return torch.cuda.device(tensor.device)
    return contextlib.nullcontext()


def _triton_forward(logits, targets, ignore_index, out=None, *, block=None, chunk_blocks=None):
    """block / chunk_blocks override the launch shape (the tests force several chunks per row)."""
    _require_triton()
    logits, row_stride = _unit_columns(logits)
    n, v = logits.shape
    if n == 0:
        return _empty_outputs(logits, targets is not None) if out is None else out
    if block is None:  # short rows: one block per row, no wider than the row
        block = min(_BLOCK, max(16, triton.next_power_of_2(v)))
    num_warps = max(1, min(_NUM_WARPS, block // (32 * _ELEMENTS_PER_THREAD)))
    if v > 2**31 - 1 - 2 * block:  # column indices (up to two blocks past the row) are int32 in the kernel
        raise ValueError(f"aql_kernels.softmax_scores: the Triton kernel needs V < 2**31 - {2 * block + 1}, got {v}")
    chunk_blocks, n_chunks = _forward_grid(n, v, _sm_count(logits.device), block, chunk_blocks)
    has_targets = targets is not None
    out = _empty_outputs(logits, has_targets) if out is None else out
    targets_arg = targets if has_targets else out.argmax  # unused placeholder pointer without targets
    if has_targets and targets.stride(0) != 1:
        targets_arg = targets.contiguous()
    split = n_chunks > 1
    if split:
        # 6 float32 and 2 int32 words per (row, chunk): < 0.5% of the logits' bytes at 4096 x 32000
        partial = torch.empty((len(_FLOAT_PLANES), n * n_chunks), device=logits.device, dtype=torch.float32)
        partial_index = torch.empty((len(_INDEX_PLANES), n * n_chunks), device=logits.device, dtype=torch.int32)
    else:
        partial, partial_index = out.lse, out.argmax  # unused
    # the kernels' output pointers, in their parameter order (loss / el2n: placeholders without targets)
    outputs = (out.lse, out.entropy, out.maxprob, out.margin, out.argmax,
               out.loss if has_targets else out.lse, out.el2n if has_targets else out.lse)
    with _device_guard(logits):
        _softmax_scores_kernel[(n, n_chunks)](
            logits, row_stride, v, targets_arg, ignore_index, partial, partial_index, n * n_chunks, n_chunks,
            *outputs, HAS_TARGETS=has_targets, SPLIT=split, BLOCK=block, CHUNK_BLOCKS=chunk_blocks,
            num_warps=num_warps,
        )
        if split:
            _softmax_scores_combine_kernel[(n,)](
                logits, row_stride, v, targets_arg, ignore_index, partial, partial_index, n * n_chunks, n_chunks,
                *outputs, HAS_TARGETS=has_targets, CHUNKS=max(16, triton.next_power_of_2(n_chunks)),
                num_warps=1 if n_chunks <= 256 else 4,
            )
    return out


def _triton_backward(logits, targets, lse, grad_rows, ignore_index, out):
    _require_triton()
    n, v = logits.shape
    if n == 0:
        return out
    logits_u, row_stride = _unit_columns(logits)
    grad_row_stride = out.stride(0) if n > 1 else v
    # 16 elements per thread: two 16-byte accesses per thread and direction in float32, one in 16-bit
    block = min(4096, max(16, triton.next_power_of_2(v)))
    num_warps = max(1, min(8, block // 512))
    with _device_guard(logits):
        _softmax_scores_backward_kernel[(n, triton.cdiv(v, block))](
            logits_u, row_stride, v, targets if targets.stride(0) == 1 else targets.contiguous(), ignore_index,
            lse if lse.stride(0) == 1 else lse.contiguous(),
            grad_rows if grad_rows.dtype == torch.float32 and grad_rows.stride(0) == 1 else grad_rows.float().contiguous(),
            out, grad_row_stride, BLOCK=block, num_warps=num_warps,
        )
    return out


# ---------------------------------------------------------------------------------------------------
# C++ CPU library (csrc/cpu/scores.cpp)
# ---------------------------------------------------------------------------------------------------

_NATIVE_FUNCTIONS: dict = {}
_DTYPE_CODES: dict = {}


def _native_call(op: str, name: str, *args) -> None:
    # The ctypes function and dtype codes are looked up once: per call the C call is then the only
    # cost besides argument conversion (pointers are passed as plain ints to c_void_p arguments).
    function = _NATIVE_FUNCTIONS.get(name)
    if function is None:
        function = _NATIVE_FUNCTIONS[name] = _native.CPU.function(name)
    status = function(*args)
    if status != 0:
        _native.raise_for_status(name, status, _native.CPU.last_error(), op)


def _dtype_code(dtype: torch.dtype) -> int:
    code = _DTYPE_CODES.get(dtype)
    if code is None:
        code = _DTYPE_CODES[dtype] = _native.dtype_code(dtype)
    return code


def _native_forward(logits, targets, ignore_index, out=None):
    logits, row_stride = _unit_columns(logits)
    n, v = logits.shape
    out = _empty_outputs(logits, targets is not None) if out is None else out
    if n == 0:  # (an empty tensor's data pointer may be NULL, which the C library refuses)
        return out
    if targets is None:
        targets_ptr = loss_ptr = el2n_ptr = None
    else:
        if targets.dtype != torch.int64 or targets.stride(0) != 1:
            targets = targets.to(torch.int64).contiguous()
        targets_ptr, loss_ptr, el2n_ptr = targets.data_ptr(), out.loss.data_ptr(), out.el2n.data_ptr()
    _native_call(
        "softmax_scores", "aql_softmax_scores",
        logits.data_ptr(), _dtype_code(logits.dtype), n, v, row_stride, targets_ptr, ignore_index,
        out.lse.data_ptr(), out.entropy.data_ptr(), out.maxprob.data_ptr(), out.margin.data_ptr(),
        out.argmax.data_ptr(), loss_ptr, el2n_ptr,
    )
    return out


def _native_backward(logits, targets, lse, grad_rows, ignore_index, out):
    n, v = logits.shape
    if n == 0:
        return out
    logits_u, row_stride = _unit_columns(logits)
    grad_row_stride = out.stride(0) if n > 1 else v
    if targets.dtype != torch.int64 or targets.stride(0) != 1:
        targets = targets.to(torch.int64).contiguous()
    if lse.stride(0) != 1:
        lse = lse.contiguous()
    if grad_rows.dtype != torch.float32 or grad_rows.stride(0) != 1:
        grad_rows = grad_rows.float().contiguous()
    _native_call(
        "cross_entropy_with_scores", "aql_softmax_scores_backward",
        logits_u.data_ptr(), _dtype_code(logits_u.dtype), n, v, row_stride, targets.data_ptr(), ignore_index,
        lse.data_ptr(), grad_rows.data_ptr(), out.data_ptr(), _dtype_code(out.dtype), grad_row_stride,
    )
    return out


# The C++ eager route (aql_kernels._C, csrc/torch/extension.cpp): for 2-D CPU logits in eager mode it
# does the whole call in one C++ function (checks, outputs, kernel, loss reduction) and records a C++
# autograd node whose backward calls the backward kernel, so no Python runs in backward: fwd+bwd of
# [64, 10] 126 -> 43 us against F.cross_entropy's 45 us, softmax_scores 24 -> 6.6 us (one thread, the
# 2-core EPYC CI machine; `python -m benchmarks.host_cost`). Sequences take it too, as the [B * T, V]
# rows that _prepare makes (then _per_sample in torch). It returns None for what it does not cover
# (the public functions then go on as before: their checks raise the errors), and gives the Python
# route's results bit for bit. _extension_module: None until first looked up, then the module or
# False where unavailable.
_extension_module = None


def _extension():
    """aql_kernels._C with the CPU library's kernels handed over, or None (``backends()["cpu_extension"]``
    says why)."""
    global _extension_module
    if _extension_module is None:
        _extension_module = _native.EXTENSION.module() or False
    return _extension_module or None


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
    with torch.no_grad():  # a launcher: the loss's gradient is _CrossEntropy's, never a recorded graph
        scores = softmax_scores_reference(logits, targets, ignore_index=ignore_index)
        if out is None:
            return scores
        for destination, value in zip(out, scores):
            if destination is not None:
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


# Forward launchers: (logits, targets | None, ignore_index, out: SoftmaxScores | None = None) ->
# SoftmaxScores (loss and el2n None without targets), written into `out` when given (the tests poison it).
_FORWARD = {"reference": _reference_forward, "native": _native_forward, "triton": _triton_forward}
# Backward launchers: (logits, targets, lse, grad_rows, ignore_index, out) -> out, where out may be
# the logits themselves (in-place backward).
_BACKWARD = {"reference": _reference_backward, "native": _native_backward, "triton": _triton_backward}


_CHOSEN: dict = {}


def _choose(device: torch.device) -> str:
    # The answer depends only on the device type (what is built and installed does not change while
    # the process runs), so it is computed, and any fallback warned about, once per device type.
    name = _CHOSEN.get(device.type)
    if name is None:
        name = _CHOSEN[device.type] = _dispatch.choose("softmax_scores", device, native_symbol="aql_softmax_scores")
    return name


# ---------------------------------------------------------------------------------------------------
# torch.library ops
# ---------------------------------------------------------------------------------------------------
# An op returns a fixed list of tensors: the SoftmaxScores fields in their order, loss and el2n empty
# (distinct [0] tensors) without targets. _op_outputs and _from_op convert at the op boundary.

_OpOutputs = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _op_outputs(scores: SoftmaxScores, logits: torch.Tensor) -> _OpOutputs:
    def empty():
        return torch.empty(0, device=logits.device, dtype=torch.float32)

    return tuple(scores._replace(loss=empty() if scores.loss is None else scores.loss,
                                 el2n=empty() if scores.el2n is None else scores.el2n))


def _from_op(outputs: _OpOutputs, with_targets: bool) -> SoftmaxScores:
    scores = SoftmaxScores._make(outputs)
    return scores if with_targets else scores._replace(loss=None, el2n=None)


@torch.library.custom_op("aql::softmax_scores", mutates_args=())
def _softmax_scores_op(logits: torch.Tensor, targets: Optional[torch.Tensor], ignore_index: int) -> _OpOutputs:
    """The SoftmaxScores fields in order; loss and el2n are empty without targets."""
    out = _empty_outputs(logits, targets is not None, shared=False)
    return _op_outputs(_FORWARD[_choose(logits.device)](logits, targets, ignore_index, out), logits)


@_softmax_scores_op.register_fake
def _(logits, targets, ignore_index):
    n = logits.shape[0]
    m = n if targets is not None else 0
    return (logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.float32), logits.new_empty(n, dtype=torch.float32),
            logits.new_empty(n, dtype=torch.int64), logits.new_empty(m, dtype=torch.float32),
            logits.new_empty(m, dtype=torch.float32))


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
    """As aql::softmax_scores_backward, written over the logits (unit column stride, rows apart)."""
    _BACKWARD[_choose(logits.device)](logits, targets, lse, grad_rows, ignore_index, logits)


@_backward_inplace_op.register_fake
def _(logits, targets, lse, grad_rows, ignore_index):
    return None


# ---------------------------------------------------------------------------------------------------
# The two routes (eager: the chosen launcher; otherwise the registered ops) and the loss's autograd
# ---------------------------------------------------------------------------------------------------

def _forward(logits: torch.Tensor, targets: torch.Tensor | None, ignore_index: int, eager: bool, *,
             shared: bool = True) -> SoftmaxScores:
    """shared=False: the fields in separate buffers (see _empty_outputs)."""
    if eager:
        out = None if shared else _empty_outputs(logits, targets is not None, shared=False)
        return _FORWARD[_choose(logits.device)](logits, targets, ignore_index, out)
    return _from_op(torch.ops.aql.softmax_scores(logits, targets, ignore_index), targets is not None)


def _backward(logits, targets, lse, grad_rows, ignore_index: int, inplace: bool, eager: bool) -> torch.Tensor:
    """The gradient of sum_i grad_rows[i] * loss[i] w.r.t. the logits (written over them when `inplace`)."""
    if not eager:
        if inplace:
            torch.ops.aql.softmax_scores_backward_(logits, targets, lse, grad_rows, ignore_index)
            return logits
        return torch.ops.aql.softmax_scores_backward(logits, targets, lse, grad_rows, ignore_index)
    launcher = _BACKWARD[_choose(logits.device)]
    if inplace:
        launcher(logits, targets, lse, grad_rows, ignore_index, logits)
        # the kernels write through raw pointers: mark the buffer as changed, as the in-place op of the
        # other route does, so that a later use of a saved copy raises
        torch.autograd.graph.increment_version(logits)
        return logits
    return launcher(logits, targets, lse, grad_rows, ignore_index, torch.empty_like(logits, memory_format=torch.contiguous_format))


# ---------------------------------------------------------------------------------------------------
# The loss as F.cross_entropy defines it (class weights, label smoothing), its reductions and gradient
# ---------------------------------------------------------------------------------------------------
# With w the class weights (all 1 without), W = sum_c w_c, eps the label smoothing, V classes and row i
# of target y_i != ignore_index, F.cross_entropy's per-row loss is
#     L_i = (1 - eps) w[y_i] nll_i + (eps / V) sum_c w_c (lse_i - x_ic),     nll_i = lse_i - x_i,y_i
# and 0 for an ignored row; "sum" adds the L_i, "mean" divides that sum by the number of valid rows,
# or with weights by sum_i w[y_i] over them (NaN when there are none). The gradient of row i is
#     dL_i / dx_ij = a_i (p_ij - [j == y_i]) + (eps W / V) [j == y_i] - (eps / V) w_j,
#     a_i = (1 - eps) w[y_i] + eps W / V:
# the backward kernel writes g_i a_i (p - onehot(y)); with smoothing two corrections follow in torch
# (a scatter onto the target column and a rank-one update of the gradient), and the forward needs
# sum_c w_c x_ic, one more read of the logits in torch (a row sum, or a matrix-vector product).

def _safe_targets(targets: torch.Tensor, valid: torch.Tensor, v: int) -> torch.Tensor:
    """int64 targets usable as indices: ignored rows (and, on CUDA, out-of-range targets) read class 0 / V-1."""
    return torch.where(valid, targets.long(), 0).clamp_(0, v - 1)


def _loss_rows(logits, targets, nll, lse, ignore_index: int, reduction: str, weight, label_smoothing: float):
    """(L, denominator): the per-row loss L_i of F.cross_entropy from the kernel's nll_i (the same
    tensor when unweighted and unsmoothed) and the divisor of reduction="mean" (None otherwise)."""
    if weight is None and label_smoothing == 0.0:
        return nll, (targets != ignore_index).sum() if reduction == "mean" else None
    v = logits.shape[1]
    valid = targets != ignore_index
    rows = nll
    if weight is not None:
        target_weight = torch.where(valid, weight[_safe_targets(targets, valid, v)], 0.0)
        rows = nll * target_weight
        denominator = target_weight.sum() if reduction == "mean" else None
    else:
        denominator = valid.sum() if reduction == "mean" else None
    if label_smoothing != 0.0:
        if weight is None:  # sum_c (lse - x_c)
            smooth = v * lse - logits.sum(dim=1, dtype=torch.float32)
        else:  # sum_c w_c (lse - x_c)
            smooth = weight.sum() * lse - torch.mv(logits.float(), weight)
        rows = (1.0 - label_smoothing) * rows + (label_smoothing / v) * torch.where(valid, smooth, 0.0)
    return rows, denominator


def _reduce(rows: torch.Tensor, reduction: str, denominator) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / denominator


def _rows_gradient(grad_loss: torch.Tensor, reduction: str, n: int, denominator) -> torch.Tensor:
    """d loss / d L_i as a float32 [N] vector (the derivative of _reduce)."""
    if reduction == "none":
        return grad_loss
    if reduction == "mean":
        grad_loss = grad_loss / denominator
    if grad_loss.dtype != torch.float32:
        grad_loss = grad_loss.float()
    # divide the scalar, then copy it out: dividing the expanded vector costs 4x more (11 against
    # 2.5 us on the 2-CPU machine)
    return grad_loss.expand(n).contiguous()


def _loss_gradient(logits, targets, lse, grad_rows, ignore_index: int, weight, label_smoothing: float, inplace: bool,
                   eager: bool) -> torch.Tensor:
    """d(sum_i grad_rows[i] * L_i) / d logits (see above; written over the logits when `inplace`)."""
    if weight is None and label_smoothing == 0.0:
        return _backward(logits, targets, lse, grad_rows, ignore_index, inplace, eager)
    v = logits.shape[1]
    valid = targets != ignore_index
    safe = _safe_targets(targets, valid, v)
    total_weight = float(v) if weight is None else weight.sum()
    scale = (1.0 - label_smoothing) * (1.0 if weight is None else weight[safe]) + label_smoothing * total_weight / v
    grad = _backward(logits, targets, lse, grad_rows.float() * scale, ignore_index, inplace, eager)
    if label_smoothing != 0.0:
        c = torch.where(valid, grad_rows.float() * (label_smoothing / v), 0.0)
        grad.scatter_add_(1, safe[:, None], (c * total_weight).to(grad.dtype)[:, None])
        if weight is None:
            grad.sub_(c.to(grad.dtype)[:, None])
        else:
            grad.addr_(c.to(grad.dtype), weight.to(grad.dtype), alpha=-1)
    return grad


class _CrossEntropy(torch.autograd.Function):
    """The autograd of cross_entropy_with_scores, on both routes: the forward (statistics and the
    reduced loss) and the backward kernel in one node (an op's autograd plus sum / div would be three).

    settings = (ignore_index, reduction, inplace_backward, eager, label_smoothing). In eager mode
    (`scores_out` a list) the loss is the only output and the SoftmaxScores leave through
    `scores_out`: every output of a Function costs autograd bookkeeping (~10 us for eight
    non-differentiable outputs on the 2-CPU machine). Otherwise (`scores_out` None: torch.compile and
    the tracers, which must see every tensor leave) the outputs are (loss, *SoftmaxScores fields
    without loss, nll, denominator), nll None when it *is* the loss (reduction="none", unweighted,
    unsmoothed). Only the loss is differentiable."""

    # forward(ctx, ...) rather than forward + setup_context: with setup_context, Function.apply binds
    # the arguments with inspect.signature on every call, ~40 us of the ~260 us of a fwd+bwd of
    # [512, 10] logits on the 2-core CI-class CPU. (torch.func transforms refuse either form here: the
    # registered ops have no functorch rules.) The settings travel as one argument: Function.apply
    # walks its arguments in Python.
    @staticmethod
    def forward(ctx, logits, targets, weight, settings, scores_out):
        ignore_index, reduction, _, eager, label_smoothing = settings
        # apart: views of one buffer share its version counter, so an in-place change of any field
        # (scores.entropy.nan_to_num_()) would make the saved lse look modified to backward
        scores = _forward(logits, targets, ignore_index, eager, shared=False)
        rows, denominator = _loss_rows(logits, targets, scores.loss, scores.lse, ignore_index, reduction, weight,
                                       label_smoothing)
        loss = _reduce(rows, reduction, denominator)
        ctx.save_for_backward(logits, targets, scores.lse, denominator, weight)
        ctx.settings = settings
        if scores_out is not None:
            scores_out.append(scores)
            return loss
        nll = None if loss is scores.loss else scores.loss
        outputs = (loss, scores.lse, scores.entropy, scores.maxprob, scores.margin, scores.argmax, scores.el2n, nll,
                   denominator)
        ctx.mark_non_differentiable(*(t for t in outputs[1:] if t is not None))
        return outputs

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        logits, targets, lse, denominator, weight = ctx.saved_tensors
        ignore_index, reduction, inplace_backward, eager, label_smoothing = ctx.settings
        grad_rows = _rows_gradient(grad_loss, reduction, logits.shape[0], denominator)
        grad = _loss_gradient(logits, targets, lse, grad_rows, ignore_index, weight, label_smoothing, inplace_backward, eager)
        return grad, None, None, None, None


# ---------------------------------------------------------------------------------------------------
# Sequences: [B, T, V] logits as the [B * T, V] rows the kernels read
# ---------------------------------------------------------------------------------------------------
# A contiguous [B, T, V] tensor (any tensor whose batch stride is T times its position stride) is a
# [B * T, V] matrix of evenly spaced rows: a view, no copy. shift=True does not slice the logits
# (logits[:, :-1] is not evenly spaced): all B * T rows are read, against targets shifted left by one
# whose last column is ignore_index. That last position of each sequence costs 1/T of the forward and
# is dropped from the outputs; in exchange the backward writes the whole [B, T, V] gradient (zero at
# the last positions) directly, where a slice's backward would zero-fill a second [B, T, V] buffer.
# Logits that are not evenly spaced (e.g. a slice x[:, :-1] or x[:, 1:] of a larger tensor, or a
# transposed [T, B, V]) are copied once by reshape; pass the whole tensor with shift=True instead.

_PER_SAMPLE = ("mean", "sum", "none")


class _Sequences(NamedTuple):
    """How the B * T rows handed to the kernels map back to the caller's [B, T] positions."""
    batch: int
    length: int  # T: rows per sequence
    scored: int  # positions per sequence in the outputs: T - 1 with shift, else T
    targets: torch.Tensor | None  # [B, T] targets of the rows (shifted), None without targets
    per_sample: str  # "mean", "sum" or "none"


def _prepare(op: str, logits, targets, ignore_index, shift, per_sample, targets_required: bool):
    """Validates the public arguments: (rows [N, V], row targets [N] | None, _Sequences | None for 2-D)."""
    if not isinstance(shift, bool):
        raise TypeError(f"aql_kernels.{op}: shift must be a bool, got {type(shift).__name__}")
    if per_sample is not None and per_sample not in _PER_SAMPLE:
        raise ValueError(f"aql_kernels.{op}: per_sample must be None or one of {_PER_SAMPLE}, got {per_sample!r}")
    if isinstance(logits, torch.Tensor) and logits.dim() == 3:
        return _prepare_sequences(op, logits, targets, ignore_index, shift, per_sample, targets_required)
    if isinstance(logits, torch.Tensor) and logits.dim() != 2:
        raise ValueError(f"aql_kernels.{op}: logits must be 2-D [N, V] or 3-D [B, T, V], got shape {tuple(logits.shape)}")
    if shift:
        raise ValueError(f"aql_kernels.{op}: shift=True needs 3-D logits [B, T, V] with targets [B, T], got logits of "
                         f"shape {tuple(logits.shape)}")
    if per_sample not in (None, "none"):
        raise ValueError(f"aql_kernels.{op}: per_sample={per_sample!r} needs 3-D logits [B, T, V]; with 2-D logits "
                         "every row is a sample (pass None or 'none')")
    _validate(logits, targets, ignore_index, op, targets_required)
    return logits, targets, None


def _prepare_sequences(op: str, logits, targets, ignore_index, shift: bool, per_sample, targets_required: bool):
    check_tensor(op, "logits", logits, ndim=3, dtypes=FLOAT_DTYPES)
    b, t, v = logits.shape
    if v == 0:
        raise ValueError(f"aql_kernels.{op}: logits must have V >= 1 classes, got shape {tuple(logits.shape)}")
    check_int(op, "ignore_index", ignore_index, low=_INT64_MIN, high=_INT64_MAX)
    if targets is None:
        if targets_required:
            raise TypeError(f"aql_kernels.{op}: targets must be a torch.Tensor of class indices, got None")
    else:
        check_tensor(op, "targets", targets, ndim=2, dtypes=(torch.int64, torch.int32), device=logits.device)
        if targets.shape != logits.shape[:2]:
            raise ValueError(f"aql_kernels.{op}: targets must have shape [B, T] = {tuple(logits.shape[:2])} (the "
                             f"logits' first two dimensions), got {tuple(targets.shape)}")
    shift = shift and t > 0
    if b <= 1 or t <= 1 or logits.stride(0) == t * logits.stride(1):
        rows = logits.view(b * t, v)
    else:
        rows = logits.reshape(b * t, v)  # not evenly spaced: one copy (see above)
    if targets is not None and shift:
        targets = torch.cat((targets[:, 1:].long(), targets.new_full((b, 1), ignore_index, dtype=torch.int64)), dim=1)
    row_targets = None if targets is None else targets.reshape(b * t)
    layout = _Sequences(b, t, t - 1 if shift else t, targets, "mean" if per_sample is None else per_sample)
    return rows, row_targets, layout


def _positions(values: torch.Tensor, layout: _Sequences) -> torch.Tensor:
    """[B * T] row values -> the [B, T'] positions the caller sees (a view)."""
    return values.view(layout.batch, layout.length)[:, :layout.scored]


def _per_sample(scores: SoftmaxScores, layout: _Sequences, ignore_index: int) -> SoftmaxScores:
    """The row statistics in the caller's layout: [B, T'] ("none") or reduced over each sequence's
    valid positions ("mean": NaN for a sequence without any; "sum": 0), argmax then None."""
    if layout.per_sample == "none":
        return SoftmaxScores(*(None if x is None else _positions(x, layout).contiguous() for x in scores))
    names = [name for name in _SCORE_FIELDS if getattr(scores, name) is not None]
    buffer = _shared_buffer(scores, names)
    if buffer is not None:  # the fields are already the rows of one [F, B * T] tensor
        stacked = buffer.view(len(names), layout.batch, layout.length)[:, :, :layout.scored]
    else:
        stacked = torch.stack([_positions(getattr(scores, name), layout) for name in names])  # [F, B, T']
    if layout.targets is None:
        total, count = stacked.sum(dim=2), layout.scored
    else:
        valid = layout.targets[:, :layout.scored] != ignore_index
        total, count = torch.where(valid, stacked, 0.0).sum(dim=2), valid.sum(dim=1)
    reduced = total / count if layout.per_sample == "mean" else total
    return SoftmaxScores(**dict(zip(names, reduced.unbind(0))), argmax=None)


# ---------------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------------

def softmax_scores(logits: torch.Tensor, targets: torch.Tensor | None = None, *, ignore_index: int = -100,
                   shift: bool = False, per_sample: str | None = None) -> SoftmaxScores:
    """Fused softmax statistics of each row of ``logits[N, V]`` (float32 / bfloat16 / float16, any
    row stride), computed from one read of the logits. Returns float32 ``[N]`` tensors (argmax
    int64); ``loss`` and ``el2n`` only when targets (int64 / int32 ``[N]``) are given. Dispatches
    by device: CUDA -> Triton, CPU -> the C++ library, else (or when missing) the reference.

    Sequences: ``logits[B, T, V]`` with ``targets[B, T]`` (or None). ``shift=True`` scores position
    t against ``targets[:, t + 1]`` (causal language modelling: ``targets[:, 1:]`` against
    ``logits[:, :-1]``) without copying the logits. ``per_sample`` reduces every float field over
    each sequence's valid positions (target != ignore_index; all positions without targets):
    "mean" (the default for 3-D; NaN for a sequence without valid positions) or "sum" (0 there) give
    ``[B]`` fields and argmax None; "none" keeps ``[B, T]`` (``[B, T - 1]`` with shift). 2-D logits
    take per_sample None or "none" (each row is a sample).

    The float fields are rows of one buffer (one allocation for six tensors): they share its
    version counter, so change them out of place if autograd has saved one of them.
    """
    extension = _extension_module if _extension_module is not None else _extension()
    if (extension and shift is False and per_sample is None and type(ignore_index) is int
            and _INT64_MIN <= ignore_index <= _INT64_MAX and _dispatch.eager(logits, targets)):
        fields = extension.softmax_scores(logits, targets, ignore_index)
        if fields is not None:
            return SoftmaxScores._make(fields)
    rows, row_targets, layout = _prepare("softmax_scores", logits, targets, ignore_index, shift, per_sample, False)
    scores = _forward(rows, row_targets, ignore_index, _dispatch.eager(rows, row_targets))
    return scores if layout is None else _per_sample(scores, layout, ignore_index)


def _check_inplace_backward(op: str, logits: torch.Tensor, caller_logits: torch.Tensor) -> None:
    """logits: the [N, V] rows the backward writes; caller_logits: the tensor the caller passed."""
    n, v = logits.shape
    if v > 1 and logits.stride(1) != 1:
        raise ValueError(f"aql_kernels.{op}: inplace_backward needs logits with unit column stride, got strides {caller_logits.stride()}")
    if n > 1 and logits.stride(0) < v:
        # rows that share memory (an expanded or overlapping view): a gradient written over them
        # would mix rows
        raise ValueError(f"aql_kernels.{op}: inplace_backward needs logits whose rows do not overlap (row stride >= "
                         f"V={v}), got strides {caller_logits.stride()}; pass inplace_backward=False or .contiguous() logits")
    if caller_logits.is_leaf and caller_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"aql_kernels.{op}: inplace_backward cannot write the gradient over a leaf tensor that requires "
                         "grad (its .grad would be its own buffer, as torch refuses for in-place ops on leaves); pass "
                         "inplace_backward=False or the output of an operation (e.g. the model head's)")


def _check_weight(op: str, weight, logits: torch.Tensor) -> torch.Tensor | None:
    """The class weights as a float32 [V] tensor (a constant: no gradient flows to them, as in F.cross_entropy)."""
    if weight is None:
        return None
    check_tensor(op, "weight", weight, ndim=1, dtypes=(torch.float32, torch.float64, torch.bfloat16, torch.float16),
                 device=logits.device)
    if weight.shape[0] != logits.shape[-1]:
        raise ValueError(f"aql_kernels.{op}: weight must have one entry per class (V={logits.shape[-1]}), got {weight.shape[0]}")
    return weight.detach().float()


def cross_entropy_with_scores(logits: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100,
                              reduction: str = "mean", label_smoothing: float = 0.0, weight: torch.Tensor | None = None,
                              shift: bool = False, per_sample: str | None = None, inplace_backward: bool = False):
    """``F.cross_entropy(logits, targets)`` plus the softmax statistics of the same pass.

    Returns ``(loss, SoftmaxScores)``; the loss is float32 whatever the logits' dtype, and is
    differentiable w.r.t. the logits; the scores are detached, and ``scores.loss`` is the unweighted,
    unsmoothed per-row NLL. reduction: "mean" (over rows whose target is not ignore_index, like
    F.cross_entropy: NaN when there are none), "sum" or "none". ``label_smoothing`` and class
    ``weight`` (a float [V] tensor) are F.cross_entropy's: "mean" with weights divides by the sum of
    the weights of the valid targets. Forward: one read of the logits (label smoothing adds a second,
    in torch). Backward: one read of the logits and one write of the gradient, recomputing softmax
    from the saved lse (label smoothing adds a rank-one update of the gradient).

    Sequences: ``logits[B, T, V]`` with ``targets[B, T]``, ``shift`` and ``per_sample`` as in
    `softmax_scores` (the scores are per sequence); the loss is that of
    ``F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ...)`` over the scored positions
    (reduction="none": a flat ``[B * T]``, ``[B * (T - 1)]`` with shift). Evenly spaced logits (e.g.
    contiguous) are read in place; others are copied once.

    inplace_backward=True writes the gradient into the logits' own buffer during backward (no
    second [N, V] allocation; the usual case is the output of a language-model head, which nothing
    else reads after the loss). The logits' values are destroyed by backward and the gradient
    passed upstream *is* that buffer, so use it only when the logits are not needed afterwards;
    autograd's version counter raises if another saved use of them is unpacked later. It needs
    logits with unit column stride whose rows do not overlap, and that are not a leaf requiring
    grad (ValueError otherwise).
    """
    extension = _extension_module if _extension_module is not None else _extension()
    if (extension and weight is None and shift is False and per_sample is None and inplace_backward is False
            and targets is not None and type(reduction) is str and type(label_smoothing) in (float, int) and label_smoothing == 0
            and type(ignore_index) is int and _INT64_MIN <= ignore_index <= _INT64_MAX and _dispatch.eager(logits, targets)):
        result = extension.cross_entropy(logits, targets, ignore_index, reduction)
        if result is not None:
            return result[0], SoftmaxScores._make(result[1:])
    op = "cross_entropy_with_scores"
    rows, row_targets, layout = _prepare(op, logits, targets, ignore_index, shift, per_sample, True)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"aql_kernels.{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    label_smoothing = check_float(op, "label_smoothing", label_smoothing, low=0.0, high=1.0)
    weight = _check_weight(op, weight, rows)
    if not isinstance(inplace_backward, bool):
        raise TypeError(f"aql_kernels.{op}: inplace_backward must be a bool, got {type(inplace_backward).__name__}")
    if inplace_backward:
        _check_inplace_backward(op, rows, logits)
    eager = _dispatch.eager(rows, row_targets, weight)
    # sequences (and what the first shortcut left) as rows: the C++ route when it covers them
    result = (extension.cross_entropy(rows, row_targets, ignore_index, reduction)
              if extension and eager and weight is None and label_smoothing == 0.0 and not inplace_backward else None)
    if result is not None:
        loss, scores = result[0], SoftmaxScores._make(result[1:])
    elif torch.is_grad_enabled() and logits.requires_grad:
        settings = (ignore_index, reduction, inplace_backward, eager, label_smoothing)
        if eager:
            scores_out = []
            loss = _CrossEntropy.apply(rows, row_targets, weight, settings, scores_out)
            scores = scores_out[0]
            if reduction == "none" and weight is None and label_smoothing == 0.0:  # the loss *is* scores.loss
                scores = scores._replace(loss=loss.detach())
        else:
            loss, lse, entropy, maxprob, margin, argmax, el2n, nll, _ = _CrossEntropy.apply(
                rows, row_targets, weight, settings, None)
            scores = SoftmaxScores(lse, entropy, maxprob, margin, argmax, loss.detach() if nll is None else nll, el2n)
    else:
        scores = _forward(rows, row_targets, ignore_index, eager)
        per_row, denominator = _loss_rows(rows, row_targets, scores.loss, scores.lse, ignore_index, reduction, weight,
                                          label_smoothing)
        loss = _reduce(per_row, reduction, denominator)
    if layout is None:
        return loss, scores
    if reduction == "none" and layout.scored != layout.length:
        loss = _positions(loss, layout).reshape(-1)
    return loss, _per_sample(scores, layout, ignore_index)


def _implementation(name: str):
    forward = _FORWARD[name]

    def run(logits: torch.Tensor, targets: torch.Tensor | None = None, *, ignore_index: int = -100) -> SoftmaxScores:
        _validate(logits, targets, ignore_index)
        return forward(logits, targets, ignore_index)

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
