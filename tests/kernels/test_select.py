"""Exact top-k selection: every implementation against an independent numpy lexsort (float64 values,
NaN last, ties by index) on fresh random and adversarial scores; the histogram primitive against
numpy; the distributed threshold walk; input errors; torch.library and torch.compile; the CUDA build."""

from __future__ import annotations

import ctypes
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import aql_kernels
from aql_kernels import _native
from aql_kernels import select as sel
from tests.conftest import HAS_CUDA, implementation_device, requires_cuda

DISTRIBUTIONS = [
    "uniform",
    "normal",
    "four_values",
    "all_equal",
    "infinities",
    "nans",
    "signed_zeros",
    "subnormal",
    "sorted",
    "reverse_sorted",
    "sample_decoys",
]
SIZES = [1, 2, 1000, 32768, 32769, 2**20 + 3]  # 32768: the last size of the CPU small path
KERNELS = ["native", "cuda"]


def make_scores(distribution: str, n: int, device: str = "cpu") -> torch.Tensor:
    """float32 [n] scores of one kind, from the (seeded) torch generator."""
    if distribution == "uniform":
        x = torch.rand(n)
    elif distribution == "normal":
        x = torch.randn(n) * 3.0
    elif distribution == "four_values":
        x = torch.tensor([-1.5, 0.25, 2.0, 7.0])[torch.randint(0, 4, (n,))]
    elif distribution == "all_equal":
        x = torch.full((n,), 0.3125)
    elif distribution == "infinities":
        x = torch.randn(n)
        pick = torch.rand(n)
        x[pick < 0.2] = float("inf")
        x[pick > 0.8] = float("-inf")
    elif distribution == "nans":
        x = torch.randn(n)
        pick = torch.rand(n)
        x[pick < 0.3] = float("nan")
        x[(pick >= 0.3) & (pick < 0.35)] = float("-inf")
        x[(pick >= 0.35) & (pick < 0.4)] = float("inf")
        # NaNs with other payloads and the sign bit set rank the same as the canonical one.
        bits = x.view(torch.int32)
        bits[pick < 0.1] = -4194304  # 0xffc00000: negative quiet NaN
        bits[(pick >= 0.1) & (pick < 0.15)] = 0x7F800001  # signalling payload
    elif distribution == "signed_zeros":
        x = torch.zeros(n)
        pick = torch.rand(n)
        x[pick < 0.5] = -0.0
        x[pick > 0.9] = torch.randn(int((pick > 0.9).sum()))
    elif distribution == "subnormal":
        # Subnormals of both signs around the zeros, plus the smallest normals.
        x = torch.randint(-(2**23) + 1, 2**23, (n,), dtype=torch.int32)
        x = torch.where(x >= 0, x, (x & 0x7FFFFF) | -(2**31)).view(torch.float32).clone()
        pick = torch.rand(n)
        x[pick < 0.05] = 1.1754944e-38
        x[(pick >= 0.05) & (pick < 0.1)] = -0.0
    elif distribution == "sorted":
        x = torch.sort(torch.randn(n)).values
    elif distribution == "reverse_sorted":
        x = torch.sort(torch.randn(n), descending=True).values
    elif distribution == "sample_decoys":
        # Large values exactly where the selectors' evenly spaced sample looks (score floor(j n / s),
        # s = min(n, 65536)) and nowhere else: for n > s the sample guesses the wrong top digits for
        # k = n // 5, and the exact pass that follows a miss must give the same selection.
        x = torch.randn(n)
        x[sample_positions(n)] = 1000.0 + torch.rand(min(n, SAMPLE_SIZE))
    else:
        raise AssertionError(distribution)
    return x.to(device)


SAMPLE_SIZE = 65536  # the scores that the kernels sample to guess the top digits of the k-th largest


def sample_positions(n: int) -> torch.Tensor:
    """Positions of the kernels' sample: floor(j n / s) for j < s = min(n, SAMPLE_SIZE)."""
    s = min(n, SAMPLE_SIZE)
    j = torch.arange(s, dtype=torch.int64)
    return j * (n // s) + (j * (n % s)) // s


def numpy_order(scores: torch.Tensor) -> np.ndarray:
    """Independent reference: lexsort by (is NaN, -value in float64, index); -0.0 == +0.0 there."""
    values = scores.detach().cpu().to(torch.float64).numpy()
    nan = np.isnan(values)
    negated = -np.where(nan, 0.0, values)
    return np.lexsort((np.arange(values.size), negated, nan))


def expected_threshold_bits(scores: torch.Tensor, order: np.ndarray, k: int) -> int:
    """int32 bits of the k-th largest float32 score: zeros as +0.0, NaN as the canonical quiet NaN."""
    if k == 0:
        return 0x7F800000
    value = float(scores[int(order[k - 1])].detach().to(torch.float32).cpu())
    if np.isnan(value):
        value = float("nan")
    elif value == 0.0:
        value = 0.0
    return int(torch.tensor(value, dtype=torch.float32).view(torch.int32))


def ks_for(n: int) -> list[int]:
    return sorted({0, min(1, n), n // 5, max(n - 1, 0), n})


def check_selection(scores, k, order, mask, indices, threshold) -> None:
    expected = np.sort(order[:k])
    if mask is not None:
        assert mask.dtype == torch.bool and mask.shape == scores.shape
        got = np.flatnonzero(mask.cpu().numpy())
        assert np.array_equal(got, expected), f"mask differs at k={k}: {np.setxor1d(got, expected)[:10]}"
    if indices is not None:
        assert indices.dtype == torch.int64 and indices.shape == (k,)
        assert np.array_equal(indices.cpu().numpy(), expected), f"indices differ at k={k}"
    if threshold is not None:
        assert threshold.dtype == torch.float32 and threshold.shape == ()
        got_bits = int(threshold.cpu().view(torch.int32))
        assert got_bits == expected_threshold_bits(scores, order, k), f"threshold {threshold} at k={k}"


def run_implementation(name: str, scores: torch.Tensor, k: int):
    mask = sel.IMPLEMENTATIONS[name](scores, k)
    indices = sel._run(scores, k, "indices", name)
    threshold = sel._run(scores, k, "threshold", name)
    return mask, indices, threshold


def require_native() -> None:
    if not _native.CPU.has("aql_topk_select"):
        pytest.skip(f"the CPU library is not built here: {_native.CPU.reason}")


def require_implementation(name: str) -> str:
    device = implementation_device(name)
    if name == "native":
        require_native()
    if name == "cuda" and not _native.CUDA.has("aql_cuda_topk_select"):
        pytest.skip(f"the CUDA library is not built: {_native.CUDA.reason}")
    return device


# ---------------------------------------------------------------------------------------------------
# the reference is the spec: check it against numpy first
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000])
def test_reference_matches_numpy_lexsort(distribution, n):
    scores = make_scores(distribution, n)
    order = numpy_order(scores)
    for k in ks_for(n) + [n // 2]:
        check_selection(
            scores,
            k,
            order,
            sel.topk_mask_reference(scores, k),
            sel.topk_indices_reference(scores, k),
            sel.topk_threshold_reference(scores, k),
        )


def test_order_keys_are_order_preserving():
    values = torch.tensor(
        [float("-inf"), -3.4e38, -1.0, -1.1754944e-38, -1e-45, 0.0, 1e-45, 1.1754944e-38, 1.0, 3.4e38, float("inf")]
    )
    keys = aql_kernels.order_keys(values)
    assert keys.dtype == torch.int64 and bool((keys[1:] > keys[:-1]).all())
    assert int(sel.order_keys(torch.tensor([-0.0]))) == int(sel.order_keys(torch.tensor([0.0]))) == 0x80000000
    assert int(sel.order_keys(torch.tensor([float("nan")]))) == 0
    assert int(keys[0]) > 0  # -inf above NaN
    roundtrip = aql_kernels.key_to_float(keys)
    assert torch.equal(roundtrip.view(torch.int32), values.view(torch.int32))
    # every float32 bit pattern of a random sample: the key order is the float order (NaN lowest)
    bits = torch.randint(-(2**31), 2**31, (100000,), dtype=torch.int64).to(torch.int32)
    floats = bits.view(torch.float32)
    keys = sel.order_keys(floats)
    assert bool(((keys >= 0) & (keys < 2**32)).all())
    order = torch.argsort(keys, stable=True)
    ranked = floats[order].double().nan_to_num(nan=-math.inf)
    assert bool((ranked[1:] >= ranked[:-1]).all())
    # and the inverse returns the value (zeros as +0.0, NaNs as the canonical NaN)
    back = sel.key_to_float(keys)
    same = (back == floats) | (floats.isnan() & back.isnan())
    assert bool(same.all())
    assert int(sel.key_to_float(torch.tensor([0])).view(torch.int32)) == 0x7FC00000


_KEY_VALUES = [float("nan"), -float("nan"), float("-inf"), -3.4028235e38, -1.0, -1.1754944e-38, -1e-45, -0.0, 0.0,
               1e-45, 1.1754944e-38, 0.1, 1.0, 3.4028235e38, float("inf")]


def test_order_keys_and_key_to_float_match_the_native_library():
    """The key of order_keys is the C++ kernels' float_key, and key_to_float their key_to_float: the
    digits of each value's key as native digit_histogram counts them, and native topk_threshold of a
    single value (the inverse applied to its key)."""
    require_native()
    values = torch.tensor(_KEY_VALUES + torch.randn(48).mul(1e3).tolist() + [2.0**-140, -(2.0**-140)])
    # NaN with payload and sign bits: float_key sends every NaN to 0
    values = torch.cat([values, torch.tensor([0x7FC00001, 0xFFFFFFFF - 2**32, 0x7F800001], dtype=torch.int32).view(torch.float32)])
    keys = sel.order_keys(values)
    for value, key in zip(values, keys.tolist()):
        one = value.reshape(1)
        top = sel._digit_histogram_native(one, 0, 0, 16)
        high = int(top.nonzero()[0, 0])
        low = int(sel._digit_histogram_native(one, high, 16, 16).nonzero()[0, 0])
        assert (high << 16) | low == key, (float(value), hex(key), hex((high << 16) | low))
        native_threshold = sel._run(one, 1, "threshold", "native")
        assert int(native_threshold.view(torch.int32)) == int(sel.key_to_float(torch.tensor([key])).view(torch.int32)), float(value)
    # all at once: the top 16 bits of a million random bit patterns
    floats = torch.randint(-(2**31), 2**31, (1 << 20,), dtype=torch.int64).to(torch.int32).view(torch.float32)
    expected = torch.bincount(sel.order_keys(floats) >> 16, minlength=1 << 16)
    assert torch.equal(sel._digit_histogram_native(floats, 0, 0, 16), expected)


# ---------------------------------------------------------------------------------------------------
# kernels against numpy on every kind of data
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
@pytest.mark.parametrize("n", SIZES)
def test_exact_against_numpy(name, distribution, n):
    device = require_implementation(name)
    scores = make_scores(distribution, n, device)
    order = numpy_order(scores)
    for k in ks_for(n):
        check_selection(scores, k, order, *run_implementation(name, scores, k))


@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("distribution", ["normal", "four_values", "nans", "signed_zeros"])
def test_half_precision_scores(name, dtype, distribution):
    device = require_implementation(name)
    n = 4099
    scores = make_scores(distribution, n, device).to(dtype)
    order = numpy_order(scores)  # half -> float64 is exact, as is half -> float32
    for k in ks_for(n):
        check_selection(scores, k, order, *run_implementation(name, scores, k))


# all_equal: every score is a candidate, so the parallel candidate passes and the index cutoff run.
@pytest.mark.parametrize("distribution", ["normal", "all_equal"])
def test_ten_million_native(distribution):
    require_native()
    n = 10**7
    scores = make_scores(distribution, n)
    # Reference order from a stable sort of the keys (the reference itself is checked against numpy).
    order = sel._order_reference(scores).numpy()
    for k in ks_for(n):
        check_selection(scores, k, order, *run_implementation("native", scores, k))


@pytest.mark.parametrize("name", KERNELS)
def test_public_functions_dispatch_and_strided_input(name):
    device = require_implementation(name)
    base = make_scores("four_values", 3 * 2001 + 1, device)
    scores = base[1::3]  # non-contiguous, and misaligned for vector loads
    order = numpy_order(scores)
    for k in ks_for(scores.shape[0]):
        check_selection(
            scores,
            k,
            order,
            aql_kernels.topk_mask(scores, k),
            aql_kernels.topk_indices(scores, k),
            aql_kernels.topk_threshold(scores, k),
        )
        assert aql_kernels.topk_mask(scores, k).device == scores.device


def test_native_writes_every_output_byte():
    """Poisoned outputs through the C ABI: every mask byte is written 0 or 1, indices and threshold
    are overwritten, and outputs left NULL are not touched."""
    require_native()
    n = 5003
    scores = make_scores("four_values", n)
    order = numpy_order(scores)
    for k in (0, 1, n // 5, n):
        mask = torch.full((n,), 0xA5, dtype=torch.uint8)
        indices = torch.full((k,), -7, dtype=torch.int64)
        threshold = torch.tensor(float("nan"))
        _native.CPU.call(
            "aql_topk_select", _native.pointer(scores), n, k, _native.pointer(mask), _native.pointer(indices), _native.pointer(threshold)
        )
        assert bool(((mask == 0) | (mask == 1)).all())
        check_selection(scores, k, order, mask.bool(), indices, threshold)
    with pytest.raises(_native.NativeError, match="k must be in"):
        _native.CPU.call("aql_topk_select", _native.pointer(scores), n, n + 1, None, None, None)


# ---------------------------------------------------------------------------------------------------
# the CPU mask pass: bounds on special values, every instruction-set variant, several threads
# ---------------------------------------------------------------------------------------------------
# Values whose keys sit at the edges that the AVX-512 mask pass treats specially: NaN (key 0, with
# payloads and the sign bit), -inf, the negative subnormals next to -0.0 (keys 0x7ffffffe,
# 0x7ffffffd: a candidate range can end at 0x7fffffff, which is no score's key), both zeros (one
# key), the positive subnormals, +inf.
_EDGE_VALUES = torch.tensor(
    [0x7FC00000, 0xFFC00000 - 2**32, 0x7F800001, 0xFF800000 - 2**32, 0x80000002 - 2**32, 0x80000001 - 2**32, 0x80000000 - 2**32,
     0x00000000, 0x00000001, 0x00000002, 0x00800000, 0x3F800000, 0x7F7FFFFF, 0x7F800000],
    dtype=torch.int64,
).to(torch.int32).view(torch.float32)


def edge_scores(n: int, generator: torch.Generator) -> torch.Tensor:
    """n scores drawn from _EDGE_VALUES (many ties) and a few normal values."""
    x = _EDGE_VALUES[torch.randint(0, _EDGE_VALUES.numel(), (n,), generator=generator)]
    spread = torch.rand(n, generator=generator) < 0.2
    x[spread] = torch.randn(int(spread.sum()), generator=generator)
    return x


def tie_ks(scores: torch.Tensor, order: np.ndarray) -> list[int]:
    """k = 0, n, and around each group of ties: the k that takes none of it, one, two, all but one,
    all of it."""
    keys = sel.order_keys(scores).numpy()[order]
    bounds = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
    n = scores.shape[0]
    ks = {0, n}
    for start, stop in zip(bounds[:-1], bounds[1:]):
        if stop - start > 1:
            ks.update({int(start), int(start) + 1, int(start) + 2, int(stop) - 1, int(stop)})
    return sorted(k for k in ks if 0 <= k <= n)


_CPU_VARIANTS = [isa for isa in _native.CpuIsa if isa != _native.CpuIsa.NATIVE]


@pytest.fixture(params=_CPU_VARIANTS, ids=lambda isa: isa.name.lower())
def select_variant(request):
    """The CPU library's selector in one instruction-set variant (skipped where it cannot run)."""
    require_native()
    if not _native.CPU.has("aql_cpu_set_isa"):
        pytest.skip("the CPU library is built without runtime dispatch")
    previous = _native.CPU.cpu_isa()
    if _native.CPU.function("aql_cpu_set_isa")(int(request.param)) != 0:
        pytest.skip(f"variant {request.param.name} does not run here: {_native.CPU.last_error()}")
    yield request.param
    assert _native.CPU.function("aql_cpu_set_isa")(int(previous)) == 0


# 1021: every score is sampled, the candidate range is one 22-bit prefix; 300007: a sampled range of
# prefixes; neither is a multiple of the 16-lane vectors.
@pytest.mark.parametrize("n", [1021, 300007])
def test_native_ties_at_special_values_every_variant(select_variant, n):
    generator = torch.Generator().manual_seed(n)
    scores = edge_scores(n, generator)
    order = numpy_order(scores)
    for k in tie_ks(scores, order):
        check_selection(scores, k, order, *run_implementation("native", scores, k))


@pytest.mark.parametrize("distribution", ["uniform", "normal", "sorted"])
def test_native_many_ks_every_variant(select_variant, distribution):
    """The mask pass writes key > a provisional bound and fixes the candidates on the wrong side of
    the exact threshold afterwards: k from far below to far above the sample's estimate puts the exact
    threshold on both sides of it."""
    torch.manual_seed(7)
    n = 200003
    scores = make_scores(distribution, n)
    order = numpy_order(scores)
    for k in (1, 17, n // 5 - 1000, n // 5 - 3, n // 5, n // 5 + 5, n // 5 + 777, n // 2, n - 17, n - 1):
        check_selection(scores, k, order, sel._run(scores, k, "mask", "native"), None, sel._run(scores, k, "threshold", "native"))


_TWO_THREADS_SCRIPT = """
import torch
from tests.kernels.test_select import make_scores, edge_scores, numpy_order, check_selection, run_implementation
torch.manual_seed(3)
n = 2**20 + 37
cases = [make_scores(d, n) for d in ("uniform", "all_equal", "nans", "sample_decoys")] + [edge_scores(n, torch.Generator().manual_seed(1))]
for scores in cases:
    order = numpy_order(scores)
    for k in (0, 1, n // 5, n // 2 + 1, n - 1, n):
        check_selection(scores, k, order, *run_implementation("native", scores, k))
print("ok")
"""


@pytest.mark.slow
def test_native_two_threads_chunks():
    """Two OpenMP threads (a fresh process: the thread count is fixed when OpenMP starts): several
    chunks per thread, each writing its candidates into its own slot range."""
    require_native()
    env = dict(os.environ, OMP_NUM_THREADS="2")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", _TWO_THREADS_SCRIPT], cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------
# histogram primitive and the distributed threshold
# ---------------------------------------------------------------------------------------------------
def numpy_digit_histogram(scores: torch.Tensor, prefix: int, prefix_bits: int, digit_bits: int) -> np.ndarray:
    values = scores.detach().cpu().to(torch.float32).numpy()
    bits = values.view(np.uint32).astype(np.uint64)
    bits = np.where(values == 0, np.uint64(0), bits)  # -0.0 -> +0.0
    negative = bits >= 2**31
    keys = np.where(negative, bits ^ np.uint64(0xFFFFFFFF), bits | np.uint64(0x80000000))
    keys = np.where(np.isnan(values), np.uint64(0), keys)
    if prefix_bits:
        keys = keys[(keys >> np.uint64(32 - prefix_bits)) == prefix]
    digits = ((keys << np.uint64(prefix_bits)) & np.uint64(0xFFFFFFFF)) >> np.uint64(32 - digit_bits)
    return np.bincount(digits.astype(np.int64), minlength=1 << digit_bits)


@pytest.mark.parametrize("name", ["reference", "native", "cuda"])
@pytest.mark.parametrize("distribution", ["normal", "nans", "signed_zeros", "subnormal", "four_values"])
def test_digit_histogram_against_numpy(name, distribution):
    device = require_implementation(name) if name != "reference" else "cpu"
    scores = make_scores(distribution, 30011, device)
    runner = sel._HISTOGRAM_RUNNERS[name]
    keys = sel.order_keys(scores).cpu()
    # Prefixes that occur in the data (so that counts are not all zero) and some that do not.
    some_key = int(keys[torch.randint(0, keys.numel(), ())])
    cases = [(0, 0, 12), (0, 0, 1), (0, 0, 16), (some_key >> 20, 12, 10), (some_key >> 10, 22, 10), (some_key >> 1, 31, 1),
             (some_key >> 16, 16, 16), (12345, 20, 12)]
    for prefix, prefix_bits, digit_bits in cases:
        got = runner(scores, prefix, prefix_bits, digit_bits)
        assert got.dtype == torch.int64 and got.shape == (1 << digit_bits,)
        expected = numpy_digit_histogram(scores, prefix, prefix_bits, digit_bits)
        assert np.array_equal(got.cpu().numpy(), expected), (prefix, prefix_bits, digit_bits)


@pytest.mark.parametrize("distribution", ["normal", "four_values", "all_equal", "nans", "signed_zeros"])
def test_threshold_from_four_ranks(distribution):
    n = 40000
    scores = make_scores(distribution, n)
    cuts = sorted(torch.randint(0, n + 1, (3,)).tolist())
    ranks = [scores[a:b] for a, b in zip([0] + cuts, cuts + [n])]  # uneven, possibly empty parts

    def all_reduced(prefix, prefix_bits, digit_bits):
        return sum(aql_kernels.digit_histogram(part, prefix, prefix_bits, digit_bits) for part in ranks)

    keys = sel.order_keys(scores)
    for k in ks_for(n) + [int(torch.randint(1, n, ()))]:
        found = sel.threshold_from_histograms(all_reduced, k)
        expected = aql_kernels.topk_threshold(torch.cat(ranks), k)
        assert int(found.threshold.view(torch.int32)) == int(expected.view(torch.int32)), k
        if k > 0:
            assert found.greater == int((keys > found.key).sum())
            assert found.greater + found.equal_taken == k
            assert 1 <= found.equal_taken <= int((keys == found.key).sum())
    # Another digit schedule reaches the same key.
    k = n // 3
    assert sel.threshold_from_histograms(all_reduced, k, digit_bits=(8, 8, 8, 8)).key == sel.threshold_from_histograms(all_reduced, k).key


def test_threshold_from_histograms_errors():
    scores = torch.randn(10)

    def histogram(prefix, prefix_bits, digit_bits):
        return aql_kernels.digit_histogram(scores, prefix, prefix_bits, digit_bits)

    with pytest.raises(ValueError, match="threshold_from_histograms: k must be at most the number of scores \\(10\\), got 11"):
        sel.threshold_from_histograms(histogram, 11)
    with pytest.raises(ValueError, match="digit_bits must sum to 32"):
        sel.threshold_from_histograms(histogram, 3, digit_bits=(12, 10))
    with pytest.raises(TypeError, match="histogram must be callable"):
        sel.threshold_from_histograms(None, 3)
    with pytest.raises(TypeError, match="k must be an int"):
        sel.threshold_from_histograms(histogram, 2.0)


# ---------------------------------------------------------------------------------------------------
# input errors
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("function", [aql_kernels.topk_mask, aql_kernels.topk_indices, aql_kernels.topk_threshold, *sel.IMPLEMENTATIONS.values()])
def test_bad_inputs(function):
    scores = torch.randn(10)
    name = r"aql_kernels\.topk_\w+"
    with pytest.raises(ValueError, match=name + r": k must be in \[0, 10\], got 11"):
        function(scores, 11)
    with pytest.raises(ValueError, match=name + r": k must be in \[0, 10\], got -1"):
        function(scores, -1)
    with pytest.raises(TypeError, match=name + r": k must be an int, got float 2.0"):
        function(scores, 2.0)
    with pytest.raises(TypeError, match=name + r": k must be an int, got bool True"):
        function(scores, True)
    with pytest.raises(TypeError, match=name + r": scores must have dtype in \(float32, bfloat16, float16\), got torch.int64"):
        function(torch.arange(10), 2)
    with pytest.raises(TypeError, match=name + r": scores must have dtype .* got torch.float64"):
        function(scores.double(), 2)
    with pytest.raises(ValueError, match=name + r": scores must be 1-D, got shape \(2, 5\)"):
        function(scores.view(2, 5), 2)
    with pytest.raises(TypeError, match=name + r": scores must be a torch.Tensor, got list"):
        function([1.0, 2.0], 1)


def test_digit_histogram_bad_inputs():
    scores = torch.randn(10)
    with pytest.raises(ValueError, match=r"digit_histogram: digit_bits must be in \[1, 16\], got 17"):
        aql_kernels.digit_histogram(scores, 0, 0, 17)
    with pytest.raises(ValueError, match=r"digit_histogram: prefix_bits must be in \[0, 20\], got 21"):
        aql_kernels.digit_histogram(scores, 0, 21, 12)
    with pytest.raises(ValueError, match=r"digit_histogram: prefix must be in \[0, 15\], got 16"):
        aql_kernels.digit_histogram(scores, 16, 4, 12)
    with pytest.raises(TypeError, match=r"digit_histogram: prefix_bits must be an int, got float"):
        aql_kernels.digit_histogram(scores, 0, 1.0, 12)
    with pytest.raises(TypeError, match=r"digit_histogram: scores must have dtype"):
        aql_kernels.digit_histogram(torch.arange(4), 0, 0, 12)
    with pytest.raises(ValueError, match=r"digit_histogram: scores must be 1-D"):
        aql_kernels.digit_histogram(scores.view(2, 5), 0, 0, 12)


def test_implementation_keys():
    assert set(sel.IMPLEMENTATIONS) == {"reference", "native", "cuda"}


def test_cuda_implementation_rejects_host_tensors():
    # Checked before the library is touched, so this holds with or without a GPU and a CUDA build.
    with pytest.raises(ValueError, match=r"topk_mask: the cuda implementation needs scores on a cuda device, got cpu"):
        sel.IMPLEMENTATIONS["cuda"](torch.randn(10), 3)
    with pytest.raises(ValueError, match=r"digit_histogram: the cuda implementation needs scores on a cuda device"):
        sel._HISTOGRAM_RUNNERS["cuda"](torch.randn(10), 0, 0, 8)


# ---------------------------------------------------------------------------------------------------
# torch.library and torch.compile
# ---------------------------------------------------------------------------------------------------
def _devices():
    return ["cpu", "cuda"] if HAS_CUDA else ["cpu"]


@pytest.mark.parametrize("device", _devices())
def test_opcheck(device):
    scores = make_scores("four_values", 257, device)
    for k in (0, 5, 257):
        torch.library.opcheck(torch.ops.aql.topk_mask.default, (scores, k))
        torch.library.opcheck(torch.ops.aql.topk_indices.default, (scores, k))
        torch.library.opcheck(torch.ops.aql.topk_threshold.default, (scores, k))
    torch.library.opcheck(torch.ops.aql.topk_mask.default, (scores.half(), 7))
    torch.library.opcheck(torch.ops.aql.digit_histogram.default, (scores, 0, 0, 12))
    torch.library.opcheck(torch.ops.aql.digit_histogram.default, (scores, 5, 3, 4))


def test_torch_compile_fullgraph():
    def select_and_use(scores, weights):
        mask = aql_kernels.topk_mask(scores, 40)
        indices = aql_kernels.topk_indices(scores, 40)
        threshold = aql_kernels.topk_threshold(scores, 40)
        return (weights * mask).sum(), weights[indices] * 2, threshold + 1, aql_kernels.digit_histogram(scores, 0, 0, 8)

    compiled = torch.compile(select_and_use, fullgraph=True)
    scores, weights = make_scores("four_values", 200), torch.randn(200)
    got = compiled(scores, weights)
    expected = select_and_use(scores, weights)
    torch.testing.assert_close(got[0], expected[0])  # a float sum: the compiled order may differ
    for a, b in zip(got[1:], expected[1:]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert int(aql_kernels.topk_mask(scores, 40).sum()) == 40


# ---------------------------------------------------------------------------------------------------
# the CUDA library: built and exporting the selector wherever nvcc exists
# ---------------------------------------------------------------------------------------------------
_CUDA_SYMBOLS = ["aql_cuda_topk_workspace_size", "aql_cuda_topk_select", "aql_cuda_digit_histogram"]


def _has_nvcc() -> bool:
    return shutil.which("nvcc") is not None or Path("/usr/local/cuda/bin/nvcc").exists()


@pytest.mark.skipif(not _has_nvcc(), reason="nvcc is not installed here, so libaql_cuda.so is not built")
def test_cuda_library_is_built_and_exports_the_selector():
    directories = [Path(os.environ["AQL_NATIVE_LIB_DIR"])] if os.environ.get("AQL_NATIVE_LIB_DIR") else []
    directories.append(Path(sel.__file__).resolve().parent)
    found = [d / "libaql_cuda.so" for d in directories if (d / "libaql_cuda.so").exists()]
    assert found, f"libaql_cuda.so not found in {[str(d) for d in directories]} although nvcc exists"
    path = found[0]
    nm = shutil.which("nm")
    if nm is not None:
        table = subprocess.run([nm, "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True).stdout
        exported = {line.split()[-1] for line in table.splitlines() if line.strip()}
    else:  # no binutils: ask the dynamic loader
        library = ctypes.CDLL(str(path))
        exported = {name for name in _CUDA_SYMBOLS if hasattr(library, name)}
    missing = [name for name in _CUDA_SYMBOLS if name not in exported]
    assert not missing, f"{path} does not export {missing}"


# ---------------------------------------------------------------------------------------------------
# GPU only: the CUDA kernels on large and awkward inputs
# ---------------------------------------------------------------------------------------------------
@requires_cuda
@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_cuda_ten_million(distribution):
    require_implementation("cuda")
    n = 10**7 + 7
    scores = make_scores(distribution, n, "cuda")
    order = sel._order_reference(scores).cpu().numpy()
    for k in ks_for(n):
        check_selection(scores, k, order, *run_implementation("cuda", scores, k))


@requires_cuda
def test_cuda_hundred_million():
    require_implementation("cuda")
    n = 10**8
    free, _ = torch.cuda.mem_get_info()
    if free < 64 * n:  # scores, the reference's int64 keys, sort values and indices, the workspace
        pytest.skip(f"needs ~{64 * n / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")
    for distribution in ("uniform", "four_values"):
        scores = make_scores(distribution, n, "cuda")
        k = n // 5
        order = sel._order_reference(scores)[:k]
        expected = torch.sort(order).values
        torch.testing.assert_close(aql_kernels.topk_indices(scores, k), expected, rtol=0, atol=0)
        mask = aql_kernels.topk_mask(scores, k)
        assert int(mask.sum()) == k and bool(mask[expected].all())
        del order, expected, mask


@requires_cuda
@pytest.mark.parametrize("distribution, n", [("four_values", 100002), ("sample_decoys", 400002)])
def test_cuda_on_a_side_stream_and_misaligned(distribution, n):
    require_implementation("cuda")
    # sample_decoys: decoys are 16% of 400002 scores, so the guess for k = n // 5 misses.
    base = torch.empty(n + 1, device="cuda")
    base[1:] = make_scores(distribution, n, "cuda")
    scores = base[1:]  # 4-byte but not 16-byte aligned: the scalar kernels
    order = numpy_order(scores)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        results = [run_implementation("cuda", scores, k) for k in ks_for(scores.shape[0])]
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    for k, result in zip(ks_for(scores.shape[0]), results):
        check_selection(scores, k, order, *result)
