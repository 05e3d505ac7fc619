"""Exact top-k selection: the mask, the ascending indices or the threshold of the k largest scores.

Order: the first k of a stable descending sort of the float32 scores in which NaN ranks below -inf,
-0.0 equals +0.0 and ties go to the lowest index. Equivalently, each score becomes an
order-preserving uint32 key (``order_keys``: NaN -> 0, below -inf at 0x007fffff; both zeros ->
0x80000000; the C++ and CUDA kernels use the same key, ``float_key`` in ``csrc/select_common.h``) and
the selection is the k largest composites (key, -index). ``key_to_float`` is its inverse.

Kernels (C ABI in ``csrc/c_api.h``): radix select over the keys, most significant digit first (Alabi
et al., "Fast k-selection algorithms for GPUs", ACM JEA 2012), with the first digit guessed from a
sample as SampleSelect guesses its splitters (Ribizel and Anzt, "Parallel selection on GPUs", 2020):
the 12-bit top digits of 65536 evenly spaced scores give a key range that holds the k-th largest
with overwhelming probability (sample ranks k s / n -+ 6 standard deviations; narrowed to 22-bit
prefixes by a second look at the samples when it spans at most 4 digits); one pass over the
scores then writes the mask for every key above the range (the C++ library: above the sample's own
estimate of the k-th key, inside the range), compacts the scores inside it (candidates) and counts
those above, which checks the guess exactly. A miss (possible only for data arranged against the
sample) costs an exact 12-bit histogram pass and the mask pass again. Then 12 + 10 + 10 more key
bits, less those the range fixes, over the candidates only, then, when only some of the elements
equal to the k-th key are taken, digits of their indices (the C++ library, whose candidates are in
index order, scans them once instead), and finally the candidates' mask bytes are set. Traffic for the mask: one read of the scores and one
write of the mask, plus the candidates (about 2% of the scores for uniform [0, 1) scores at k = 0.2 n,
fewer for spread-out ones, all of them when all are equal). Indices come from the mask with a count /
exclusive scan / write pass (two more reads of the 1-byte mask). The CUDA library runs this on the
caller's stream with a torch-allocated workspace and no host synchronisation (each histogram
kernel's last block picks the next digit on the device); the C++ CPU library runs the same phases
with OpenMP. See ``csrc/cuda/select.cu`` and ``csrc/cpu/select.cpp``.

``digit_histogram`` is the histogram primitive of that radix select; ``threshold_from_histograms``
walks its digits to the exact k-th key of data spread over several processes, given a histogram
callable that all-reduces (sums) the per-process histograms.
"""

from __future__ import annotations

import ctypes
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from . import _dispatch, _native
from ._dispatch import choose
from ._validation import FLOAT_DTYPES, check_int, check_tensor

__all__ = [
    "topk_mask",
    "topk_indices",
    "topk_threshold",
    "digit_histogram",
    "threshold_from_histograms",
    "GlobalThreshold",
    "topk_mask_reference",
    "topk_indices_reference",
    "topk_threshold_reference",
    "digit_histogram_reference",
    "order_keys",
    "key_to_float",
    "float_keys",
    "IMPLEMENTATIONS",
]

_NATIVE_SYMBOL = "aql_topk_select"
_CUDA_SYMBOL = "aql_cuda_topk_select"
# The digit schedule of the kernels; threshold_from_histograms uses it by default.
DIGIT_SCHEDULE = (12, 10, 10)


# ---------------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------------
def _validate(op: str, scores, k) -> None:
    check_tensor(op, "scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    check_int(op, "k", k, low=0, high=scores.shape[0])


def _validate_histogram(op: str, scores, prefix, prefix_bits, digit_bits) -> None:
    check_tensor(op, "scores", scores, ndim=1, dtypes=FLOAT_DTYPES)
    check_int(op, "digit_bits", digit_bits, low=1, high=16)
    check_int(op, "prefix_bits", prefix_bits, low=0, high=32 - digit_bits)
    check_int(op, "prefix", prefix, low=0, high=(1 << prefix_bits) - 1)


def _as_float32(scores: torch.Tensor) -> torch.Tensor:
    """float32 contiguous view (no copy for float32 contiguous input; float16 / bfloat16 convert exactly)."""
    return scores.to(torch.float32).contiguous()


# ---------------------------------------------------------------------------------------------------
# the order-preserving key (the one rule every selector follows) and the reference (the spec)
# ---------------------------------------------------------------------------------------------------
def order_keys(scores: torch.Tensor) -> torch.Tensor:
    """The order-preserving uint32 key of each score, as int64 in [0, 2**32).

    key(a) < key(b) exactly when a ranks below b in the selectors' order: larger float -> larger key;
    -0.0 and +0.0 -> the same key 0x80000000; every NaN -> 0, below -inf (0x007fffff), so NaN ranks
    lowest. scores: any float dtype (converted to float32 exactly, as the selectors see them); same
    shape and device. The C++ and CUDA kernels use this key (``float_key`` in csrc/select_common.h),
    so keys from here agree with ``digit_histogram`` and ``topk_threshold``. Subtract 2**31 for a
    signed key whose order is the same (int32 range)."""
    bits = _as_float32(scores).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    magnitude = bits & 0x7FFFFFFF
    canonical = torch.where(magnitude == 0, torch.zeros_like(bits), bits)
    keys = torch.where(canonical >= 0x80000000, canonical ^ 0xFFFFFFFF, canonical | 0x80000000)
    return torch.where(magnitude > 0x7F800000, torch.zeros_like(keys), keys)


def key_to_float(keys: torch.Tensor) -> torch.Tensor:
    """float32 scores of int64 keys in [0, 2**32): the inverse of ``order_keys`` on its image (key 0
    gives the canonical quiet NaN, 0x80000000 gives +0.0); what ``topk_threshold`` returns for the
    k-th largest key (``key_to_float`` in csrc/select_common.h)."""
    bits = torch.where(keys >= 0x80000000, keys ^ 0x80000000, keys ^ 0xFFFFFFFF)
    bits = torch.where(keys == 0, torch.full_like(bits, 0x7FC00000), bits)
    bits = torch.where(bits >= 0x80000000, bits - (1 << 32), bits)  # as signed int32
    return bits.to(torch.int32).view(torch.float32)


float_keys = order_keys  # the earlier name of order_keys


def _order_reference(scores: torch.Tensor) -> torch.Tensor:
    # A stable sort keeps equal keys in index order, so the first k are the ones the contract names.
    return torch.sort(order_keys(scores), descending=True, stable=True).indices


def topk_mask_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [N]: True at the first k of the stable descending order (pure torch, sort-based)."""
    _validate("topk_mask_reference", scores, k)
    mask = torch.zeros(scores.shape[0], dtype=torch.bool, device=scores.device)
    mask[_order_reference(scores)[:k]] = True
    return mask


def topk_indices_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [k]: the indices of topk_mask_reference, ascending."""
    _validate("topk_indices_reference", scores, k)
    return torch.sort(_order_reference(scores)[:k]).values


def topk_threshold_reference(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0-dim float32: the k-th largest score (+inf for k == 0; zeros as +0.0, NaN canonical)."""
    _validate("topk_threshold_reference", scores, k)
    if k == 0:  # k is an argument, not data: this branch does not look at the scores
        return torch.full((), float("inf"), dtype=torch.float32, device=scores.device)
    keys = torch.sort(order_keys(scores), descending=True).values
    return key_to_float(keys[k - 1 : k]).reshape(())


def digit_histogram_reference(scores: torch.Tensor, prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
    """int64 [2**digit_bits]: counts of the next digit_bits of the keys whose top prefix_bits equal prefix."""
    _validate_histogram("digit_histogram_reference", scores, prefix, prefix_bits, digit_bits)
    keys = order_keys(scores)
    buckets = 1 << digit_bits
    digits = ((keys << prefix_bits) & 0xFFFFFFFF) >> (32 - digit_bits)
    if prefix_bits > 0:  # keys outside the prefix go to an extra bucket (no data-dependent shapes)
        digits = torch.where((keys >> (32 - prefix_bits)) == prefix, digits, torch.full_like(digits, buckets))
    counts = torch.zeros(buckets + 1, dtype=torch.int64, device=scores.device)
    return counts.scatter_add_(0, digits, torch.ones_like(digits))[:buckets].clone()


# ---------------------------------------------------------------------------------------------------
# native (C++ CPU library) and CUDA library launchers
# ---------------------------------------------------------------------------------------------------
def _outputs(scores: torch.Tensor, k: int, want: str):
    n = scores.shape[0]
    mask = torch.empty(n, dtype=torch.bool, device=scores.device) if want == "mask" else None
    indices = torch.empty(k, dtype=torch.int64, device=scores.device) if want == "indices" else None
    threshold = torch.empty((), dtype=torch.float32, device=scores.device) if want == "threshold" else None
    return mask, indices, threshold


def _require_device(op: str, scores: torch.Tensor, device_type: str, implementation: str) -> None:
    # Raw pointers go to the library: a tensor on the wrong device would be read as garbage.
    if scores.device.type != device_type:
        raise ValueError(f"aql_kernels.{op}: the {implementation} implementation needs scores on a {device_type} device, got {scores.device}")


def _select_native(scores: torch.Tensor, k: int, want: str):
    _require_device("topk_" + want, scores, "cpu", "native")
    values = _as_float32(scores)
    mask, indices, threshold = _outputs(values, k, want)
    _native.CPU.call(
        _NATIVE_SYMBOL,
        _native.pointer(values),
        values.shape[0],
        k,
        _native.pointer(mask),
        _native.pointer(indices),
        _native.pointer(threshold),
    )
    return mask, indices, threshold


def _workspace_bytes(n: int, k: int) -> int:
    size = ctypes.c_size_t(0)
    _native.CUDA.call("aql_cuda_topk_workspace_size", n, k, ctypes.byref(size))
    return size.value


def _select_cuda(scores: torch.Tensor, k: int, want: str):
    _require_device("topk_" + want, scores, "cuda", "cuda")
    values = _as_float32(scores)
    mask, indices, threshold = _outputs(values, k, want)
    n = values.shape[0]
    with torch.cuda.device(values.device):
        nbytes = _workspace_bytes(n, k) if k > 0 else 0  # k == 0 needs no workspace
        workspace = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=values.device)
        stream = torch.cuda.current_stream(values.device).cuda_stream
        _native.CUDA.call(
            _CUDA_SYMBOL,
            _native.pointer(values),
            n,
            k,
            _native.pointer(mask),
            _native.pointer(indices),
            _native.pointer(threshold),
            _native.pointer(workspace),
            nbytes,
            ctypes.c_void_p(stream),
        )
    return mask, indices, threshold


def _select_reference(scores: torch.Tensor, k: int, want: str):
    if want == "mask":
        return topk_mask_reference(scores, k), None, None
    if want == "indices":
        return None, topk_indices_reference(scores, k), None
    return None, None, topk_threshold_reference(scores, k)


_RUNNERS = {"reference": _select_reference, "native": _select_native, "cuda": _select_cuda}


def _run(scores: torch.Tensor, k: int, want: str, implementation: Optional[str] = None):
    if implementation is None:
        implementation = choose("topk_mask", scores.device, native_symbol=_NATIVE_SYMBOL, gpu="cuda", cuda_symbol=_CUDA_SYMBOL)
    mask, indices, threshold = _RUNNERS[implementation](scores, k, want)
    return {"mask": mask, "indices": indices, "threshold": threshold}[want]


def _histogram(scores: torch.Tensor, prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
    implementation = choose(
        "digit_histogram", scores.device, native_symbol="aql_digit_histogram", gpu="cuda", cuda_symbol="aql_cuda_digit_histogram"
    )
    return _HISTOGRAM_RUNNERS[implementation](scores, prefix, prefix_bits, digit_bits)


def _digit_histogram_native(scores, prefix, prefix_bits, digit_bits) -> torch.Tensor:
    _require_device("digit_histogram", scores, "cpu", "native")
    values = _as_float32(scores)
    out = torch.empty(1 << digit_bits, dtype=torch.int64)
    _native.CPU.call("aql_digit_histogram", _native.pointer(values), values.shape[0], prefix, prefix_bits, digit_bits, _native.pointer(out))
    return out


def _digit_histogram_cuda(scores, prefix, prefix_bits, digit_bits) -> torch.Tensor:
    _require_device("digit_histogram", scores, "cuda", "cuda")
    values = _as_float32(scores)
    out = torch.empty(1 << digit_bits, dtype=torch.int64, device=values.device)
    with torch.cuda.device(values.device):
        stream = torch.cuda.current_stream(values.device).cuda_stream
        _native.CUDA.call(
            "aql_cuda_digit_histogram",
            _native.pointer(values),
            values.shape[0],
            prefix,
            prefix_bits,
            digit_bits,
            _native.pointer(out),
            ctypes.c_void_p(stream),
        )
    return out


_HISTOGRAM_RUNNERS = {
    "reference": lambda scores, prefix, prefix_bits, digit_bits: digit_histogram_reference(scores, prefix, prefix_bits, digit_bits),
    "native": _digit_histogram_native,
    "cuda": _digit_histogram_cuda,
}


# ---------------------------------------------------------------------------------------------------
# torch.library ops and the public functions
# ---------------------------------------------------------------------------------------------------
@torch.library.custom_op("aql::topk_mask", mutates_args=())
def _topk_mask_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _run(scores, k, "mask")


@_topk_mask_op.register_fake
def _topk_mask_fake(scores, k):
    return scores.new_empty(scores.shape[0], dtype=torch.bool)


@torch.library.custom_op("aql::topk_indices", mutates_args=())
def _topk_indices_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _run(scores, k, "indices")


@_topk_indices_op.register_fake
def _topk_indices_fake(scores, k):
    return scores.new_empty(k, dtype=torch.int64)  # size k: known without looking at the data


@torch.library.custom_op("aql::topk_threshold", mutates_args=())
def _topk_threshold_op(scores: torch.Tensor, k: int) -> torch.Tensor:
    return _run(scores, k, "threshold")


@_topk_threshold_op.register_fake
def _topk_threshold_fake(scores, k):
    return scores.new_empty((), dtype=torch.float32)


@torch.library.custom_op("aql::digit_histogram", mutates_args=())
def _digit_histogram_op(scores: torch.Tensor, prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
    return _histogram(scores, prefix, prefix_bits, digit_bits)


@_digit_histogram_op.register_fake
def _digit_histogram_fake(scores, prefix, prefix_bits, digit_bits):
    return scores.new_empty(1 << digit_bits, dtype=torch.int64)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """bool [N]: True at the k largest scores (stable: ties go to the lowest index; NaN ranks below
    -inf; -0.0 equals +0.0). scores: 1-D float32 / bfloat16 / float16; 0 <= k <= N. Exact, and
    deterministic on every device; no host synchronisation."""
    _validate("topk_mask", scores, k)
    if _dispatch.eager(scores):  # (the registered op's dispatch is host time only: see _dispatch.eager)
        return _run(scores, k, "mask")
    return torch.ops.aql.topk_mask(scores, k)


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """int64 [k]: the indices where topk_mask is True, ascending."""
    _validate("topk_indices", scores, k)
    if _dispatch.eager(scores):
        return _run(scores, k, "indices")
    return torch.ops.aql.topk_indices(scores, k)


def topk_threshold(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0-dim float32: the k-th largest score, +inf for k == 0 (zeros come back as +0.0, NaN as the
    canonical quiet NaN). The selection is everything above it plus the lowest-indexed equal ones."""
    _validate("topk_threshold", scores, k)
    if _dispatch.eager(scores):
        return _run(scores, k, "threshold")
    return torch.ops.aql.topk_threshold(scores, k)


def digit_histogram(scores: torch.Tensor, prefix: int, prefix_bits: int, digit_bits: int) -> torch.Tensor:
    """int64 [2**digit_bits]: out[d] counts the scores whose key (see ``order_keys``) has its top
    prefix_bits equal to prefix and its next digit_bits equal to d. 1 <= digit_bits <= 16,
    0 <= prefix_bits <= 32 - digit_bits, 0 <= prefix < 2**prefix_bits.

    The building block of a distributed exact threshold: all-reduce (sum) the histograms of every
    process and walk the digits with ``threshold_from_histograms``."""
    _validate_histogram("digit_histogram", scores, prefix, prefix_bits, digit_bits)
    if _dispatch.eager(scores):
        return _histogram(scores, prefix, prefix_bits, digit_bits)
    return torch.ops.aql.digit_histogram(scores, prefix, prefix_bits, digit_bits)


def _topk_mask_native(scores: torch.Tensor, k: int) -> torch.Tensor:
    _validate("topk_mask", scores, k)
    return _run(scores, k, "mask", "native")


def _topk_mask_cuda(scores: torch.Tensor, k: int) -> torch.Tensor:
    _validate("topk_mask", scores, k)
    return _run(scores, k, "mask", "cuda")


IMPLEMENTATIONS = {"reference": topk_mask_reference, "native": _topk_mask_native, "cuda": _topk_mask_cuda}


# ---------------------------------------------------------------------------------------------------
# exact global threshold from (all-reduced) histograms
# ---------------------------------------------------------------------------------------------------
class GlobalThreshold(NamedTuple):
    threshold: torch.Tensor  # 0-dim float32 (CPU): the k-th largest score over all processes
    key: Optional[int]  # its uint32 key (None for k == 0)
    greater: int  # how many scores have a larger key
    equal_taken: int  # how many of the scores equal to it the first k take (k = greater + equal_taken)


def threshold_from_histograms(
    histogram: Callable[[int, int, int], torch.Tensor], k: int, *, digit_bits: Sequence[int] = DIGIT_SCHEDULE
) -> GlobalThreshold:
    """The exact k-th largest key of data that only `histogram` sees.

    histogram(prefix, prefix_bits, digit_bits) must return the global ``digit_histogram`` (e.g. each
    process calls ``digit_histogram`` on its scores and all-reduces the sum). Walks the digits of
    ``digit_bits`` (summing to 32) from the top: one histogram call per digit. This is coordination
    code, not an op: it reads each histogram on the host to choose the next prefix.

    Each process then selects its scores with key > key, plus, of those equal to it, a share of
    `equal_taken` agreed on in index order (e.g. by an exclusive scan of per-process equal counts).
    """
    op = "threshold_from_histograms"
    if not callable(histogram):
        raise TypeError(f"aql_kernels.{op}: histogram must be callable, got {type(histogram).__name__}")
    check_int(op, "k", k, low=0)
    schedule = tuple(digit_bits)
    for bits in schedule:
        check_int(op, "digit_bits entry", bits, low=1, high=16)
    if sum(schedule) != 32:
        raise ValueError(f"aql_kernels.{op}: digit_bits must sum to 32, got {schedule} (sum {sum(schedule)})")
    if k == 0:
        return GlobalThreshold(torch.tensor(float("inf")), None, 0, 0)
    prefix, prefix_bits, remaining, greater = 0, 0, k, 0
    for bits in schedule:
        counts = histogram(prefix, prefix_bits, bits)
        if not isinstance(counts, torch.Tensor) or counts.shape != (1 << bits,):
            got = tuple(counts.shape) if isinstance(counts, torch.Tensor) else type(counts).__name__
            raise ValueError(f"aql_kernels.{op}: histogram must return a tensor of shape ({1 << bits},), got {got}")
        counts = counts.to("cpu", torch.int64)
        above = torch.flip(torch.cumsum(torch.flip(counts, (0,)), 0), (0,))  # above[d] = sum(counts[d:])
        total = int(above[0])
        if remaining > total:
            raise ValueError(f"aql_kernels.{op}: k must be at most the number of scores ({greater + total}), got {k}")
        digit = int(torch.nonzero(above >= remaining).max())  # the highest bucket that reaches remaining
        strictly_above = int(above[digit + 1]) if digit + 1 < (1 << bits) else 0
        remaining -= strictly_above
        greater += strictly_above
        prefix = (prefix << bits) | digit
        prefix_bits += bits
    threshold = key_to_float(torch.tensor([prefix], dtype=torch.int64)).reshape(())
    return GlobalThreshold(threshold, prefix, greater, remaining)
