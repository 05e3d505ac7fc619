"""Exact top-k selection against its peers, k = 0.2 N.

CPU (native C++ library, the boolean mask included in the time) against numpy.partition,
numpy.argpartition, torch.topk(sorted=False) and torch.kthvalue at N = 1e4 to 1e7 (1e4 to 1e6 with
AQL_BENCH_QUICK; the plot of `make bench` draws time against N per peer); goal: at least 3x faster
than numpy.partition at N = 1e7, and (issue 14) >= 50% of `x.sum()`'s read bandwidth, which
`fraction_of_read` reports (measured in the same run, benchmarks/conftest.py). GPU (CUDA library) against torch.topk(sorted=False),
torch.kthvalue and torch.sort at N = 1e6, 1e7 and 1e8; goal: at least 5x faster than torch.topk at
N = 1e8. `bytes` in extra_info is the floor of the traffic (one read of the float32 scores plus the
one-byte mask write), so GB/s says how close a case gets to one pass. The kernels guess the top digits
of the k-th largest score from an evenly spaced sample and check the guess in their one pass over the
scores; the `decoys` cases put the largest scores exactly where the sample looks, so that the guess
misses and the exact histogram pass and a second mask pass follow: the price of a miss.

`test_score_store_update_cpu` times the per-step write of a training loop's scores into
`aql.selection.ScoreStore` (64 rows, checked) against the bare `index_copy_` it ends in.

    python -m pytest benchmarks/bench_select.py --benchmark-only --benchmark-columns=median,iqr,rounds
    python -m pytest benchmarks/bench_select.py --benchmark-only -k cuda      # GPU cases only
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import aql_kernels
from aql.selection import ScoreStore
from aql_kernels import _native
from benchmarks.conftest import QUICK, record_traffic, requires_cuda, torch_threads

FRACTION = 0.2
CPU_SIZES = {"1e4": 10**4, "1e5": 10**5, "1e6": 10**6, **({} if QUICK else {"1e7": 10**7})}
GPU_SIZES = {"1e6": 10**6, "1e7": 10**7, "1e8": 10**8}


def _k(n: int) -> int:
    return int(FRACTION * n)


def _with_decoys(scores: torch.Tensor) -> torch.Tensor:
    """The scores with values above all others at the kernels' sample positions (floor(j n / s))."""
    n = scores.shape[0]
    s = min(n, 65536)
    j = torch.arange(s, dtype=torch.int64, device=scores.device)
    decoys = scores.clone()
    decoys[j * (n // s) + (j * (n % s)) // s] = 2.0
    return decoys


def _cpu_cases(scores: torch.Tensor, k: int):
    n = scores.shape[0]
    array = scores.numpy()
    decoys = _with_decoys(scores)
    return {
        "aql_topk_mask": lambda: aql_kernels.topk_mask(scores, k),
        "aql_topk_mask_decoys": lambda: aql_kernels.topk_mask(decoys, k),
        "aql_topk_indices": lambda: aql_kernels.topk_indices(scores, k),
        "numpy_partition": lambda: np.partition(array, n - k),
        "numpy_argpartition": lambda: np.argpartition(array, n - k),
        "torch_topk_unsorted": lambda: torch.topk(scores, k, sorted=False),
        "torch_kthvalue": lambda: torch.kthvalue(scores, n - k + 1),
    }


@pytest.mark.parametrize(
    "case", ["aql_topk_mask", "aql_topk_mask_decoys", "aql_topk_indices", "numpy_partition", "numpy_argpartition", "torch_topk_unsorted", "torch_kthvalue"]
)
@pytest.mark.parametrize("size", list(CPU_SIZES))
def test_select_cpu(bench, case, size):
    if case.startswith("aql") and not _native.CPU.has("aql_topk_select"):
        pytest.skip(f"the CPU library is not built: {_native.CPU.reason}")
    n = CPU_SIZES[size]
    torch.manual_seed(0)
    scores = torch.rand(n)
    k = _k(n)
    bench.benchmark.group = f"select cpu N={size} k=0.2N"
    bench.benchmark.extra_info.update({"n": n, "k": k, "peer": case, "sweep": "select_by_n"})
    slow = case.startswith("torch")
    bench(_cpu_cases(scores, k)[case], rounds=(5 if slow else 15) if n >= 10**7 else (40 if n >= 10**6 else 200))
    record_traffic(bench, 5 * n)


def _cuda_cases(scores: torch.Tensor, k: int):
    n = scores.shape[0]
    decoys = _with_decoys(scores)
    return {
        "aql_cuda_topk_mask": lambda: aql_kernels.topk_mask(scores, k),
        "aql_cuda_topk_mask_decoys": lambda: aql_kernels.topk_mask(decoys, k),
        "aql_cuda_topk_indices": lambda: aql_kernels.topk_indices(scores, k),
        "torch_cuda_topk_unsorted": lambda: torch.topk(scores, k, sorted=False),
        "torch_cuda_kthvalue": lambda: torch.kthvalue(scores, n - k + 1),
        "torch_cuda_sort": lambda: torch.sort(scores),
    }


@requires_cuda
@pytest.mark.parametrize("size", list(GPU_SIZES))
@pytest.mark.parametrize(
    "case", ["aql_cuda_topk_mask", "aql_cuda_topk_mask_decoys", "aql_cuda_topk_indices", "torch_cuda_topk_unsorted", "torch_cuda_kthvalue", "torch_cuda_sort"]
)
def test_select_cuda(bench, case, size):
    if case.startswith("aql") and not _native.CUDA.has("aql_cuda_topk_select"):
        pytest.skip(f"the CUDA library is not built: {_native.CUDA.reason}")
    n = GPU_SIZES[size]
    generator = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.rand(n, device="cuda", generator=generator)
    k = _k(n)
    fn = _cuda_cases(scores, k)[case]
    fn()  # first call: library load, allocator warm-up
    torch.cuda.synchronize()
    bench.benchmark.group = f"select cuda N={size} k=0.2N"
    bench.benchmark.extra_info.update({"n": n, "k": k, "peer": case, "sweep": "select_by_n"})
    bench(fn, device="cuda", rounds=20)
    record_traffic(bench, 5 * n, device="cuda")


@pytest.mark.parametrize("case", ["torch_index_copy_", "aql_score_store_update"])
def test_score_store_update_cpu(bench, case):
    n, batch = 50_000, 64
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(n, generator=generator)[:batch]
    scores = torch.rand(batch, generator=generator)
    bench.benchmark.group = f"score store write cpu {batch} rows of N={n} (host cost)"
    bench.benchmark.extra_info.update({"n": n, "rows": batch, "peer": case})
    table, store = torch.zeros(n), ScoreStore(n)
    fn = (lambda: table.index_copy_(0, indices, scores)) if case == "torch_index_copy_" else (lambda: store.update(indices, scores))
    with torch_threads(1):
        bench(fn, rounds=300 if QUICK else 2000)
