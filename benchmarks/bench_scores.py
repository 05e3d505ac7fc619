"""Fused softmax scores against their peers.

CPU, N=4096, V=32000 float32 (goal: native >= 15x faster than the eager composite):
  aql_native            softmax_scores (the C++ library) with targets: all seven statistics
  torch_eager_composite F.log_softmax, then the statistics in eager torch
  aql_reference         softmax_scores_reference (the pure-torch spec)
  memory_floor_sum      logits.sum(dim=1): one plain read of the logits, the floor of any one-pass op
CPU host overhead, N=512, V=10 (the per-call cost of the Python layer and the C call on a tiny input):
  aql_softmax_scores / torch_cross_entropy_fwd, aql_cross_entropy_fwd_bwd / torch_cross_entropy_fwd_bwd
CPU forward+backward, N=4096, V=32000 float32: aql_cross_entropy_fwd_bwd against torch_cross_entropy_fwd_bwd
GPU (Triton; skipped without CUDA), forward and forward+backward, float32 and bfloat16:
  aql_triton against the eager composite, torch.compile of the composite, F.cross_entropy and
  Liger-Kernel's cross-entropy when `liger_kernel` is installed (Liger writes its gradient during
  the forward, so it only appears in the fwd+bwd groups). The forward groups also hold
  device_copy_cuda, a device-to-device copy of the logits whose GB/s counts its read and its write:
  the goal of the statistics-only pass is >= 90% of that figure.
`bytes` in extra_info is the traffic of a one-pass kernel over the logits (forward: one read;
forward+backward: two reads and one write), and `GB/s` divides it by the median, so the column says
how close each case gets to that floor whatever it really moves.

    python -m pytest benchmarks/bench_scores.py --benchmark-only --benchmark-columns=median,iqr,rounds
    python -m pytest benchmarks/bench_scores.py --benchmark-only -k cuda      # GPU cases only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aql_kernels import _dispatch, _native
from aql_kernels.scores import cross_entropy_with_scores, softmax_scores, softmax_scores_reference
from benchmarks.conftest import requires_cuda

IGNORE = -100


def eager_composite(logits: torch.Tensor, targets: torch.Tensor):
    """What a user writes without the fused op: log_softmax, then each statistic."""
    logp = F.log_softmax(logits.float(), dim=1)
    p = logp.exp()
    lse = torch.logsumexp(logits.float(), dim=1)
    entropy = -(p * logp).sum(dim=1)
    top2 = p.topk(2, dim=1).values
    maxprob, margin = top2[:, 0], top2[:, 0] - top2[:, 1]
    argmax = logits.argmax(dim=1)
    loss = F.nll_loss(logp, targets, ignore_index=IGNORE, reduction="none")
    p_target = p.gather(1, targets.clamp_min(0)[:, None]).squeeze(1)
    el2n = ((p * p).sum(dim=1) - 2 * p_target + 1).clamp_min(0).sqrt()
    return lse, entropy, maxprob, margin, argmax, loss, el2n


def _inputs(n, v, dtype, device):
    torch.manual_seed(0)
    logits = (torch.randn(n, v, device=device) * 3).to(dtype)
    targets = torch.randint(0, v, (n,), device=device)
    return logits, targets


def _record_bandwidth(bench, moved_bytes: int) -> None:
    benchmark = bench.benchmark
    benchmark.extra_info["bytes"] = moved_bytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None:
        benchmark.extra_info["GB/s"] = round(moved_bytes / stats.stats.median / 1e9, 2)


# ---- CPU ------------------------------------------------------------------------------------------

CPU_N, CPU_V = 4096, 32000


@pytest.mark.parametrize("case", ["aql_native", "torch_eager_composite", "aql_reference", "memory_floor_sum"])
def test_scores_cpu(bench, case):
    if case == "aql_native" and not _native.CPU.has("aql_softmax_scores"):
        pytest.skip(f"the CPU library lacks aql_softmax_scores: {_native.CPU.reason or 'rebuild it'}")
    logits, targets = _inputs(CPU_N, CPU_V, torch.float32, "cpu")
    fn = {
        "aql_native": lambda: softmax_scores(logits, targets),
        "torch_eager_composite": lambda: eager_composite(logits, targets),
        "aql_reference": lambda: softmax_scores_reference(logits, targets),
        "memory_floor_sum": lambda: logits.sum(dim=1),
    }[case]
    bench.benchmark.group = f"scores cpu fwd N={CPU_N} V={CPU_V} float32"
    bench.benchmark.extra_info.update({"n": CPU_N, "v": CPU_V, "omp_threads": _threads()})
    bench(fn, rounds=3 if case in ("torch_eager_composite", "aql_reference") else 10)
    _record_bandwidth(bench, CPU_N * CPU_V * 4)


@pytest.mark.parametrize("case", ["aql_softmax_scores", "torch_cross_entropy_fwd", "aql_cross_entropy_fwd_bwd",
                                  "torch_cross_entropy_fwd_bwd"])
def test_scores_cpu_host_overhead(bench, case):
    if case.startswith("aql") and not _native.CPU.has("aql_softmax_scores"):
        pytest.skip(f"the CPU library lacks aql_softmax_scores: {_native.CPU.reason or 'rebuild it'}")
    n, v = 512, 10
    logits, targets = _inputs(n, v, torch.float32, "cpu")
    bench.benchmark.group = f"scores cpu host overhead N={n} V={v}"
    bench.benchmark.extra_info.update({"n": n, "v": v, "omp_threads": _threads()})
    if case == "aql_softmax_scores":
        bench(lambda: softmax_scores(logits, targets), rounds=200)
    elif case == "torch_cross_entropy_fwd":
        bench(lambda: F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none"), rounds=200)
    else:
        bench(_fwd_bwd_step(case, logits), rounds=200)


def _fwd_bwd_step(case: str, logits: torch.Tensor):
    logits = logits.clone().requires_grad_(True)
    targets = torch.randint(0, logits.shape[1], (logits.shape[0],))
    if case.startswith("aql"):
        def loss_fn(x, t):
            return cross_entropy_with_scores(x, t, ignore_index=IGNORE)[0]
    else:
        def loss_fn(x, t):
            return F.cross_entropy(x, t, ignore_index=IGNORE)
    return lambda: torch.autograd.grad(loss_fn(logits, targets), logits)


@pytest.mark.parametrize("case", ["aql_cross_entropy_fwd_bwd", "torch_cross_entropy_fwd_bwd"])
def test_scores_cpu_fwd_bwd(bench, case):
    if case.startswith("aql") and not _native.CPU.has("aql_softmax_scores_backward"):
        pytest.skip(f"the CPU library lacks aql_softmax_scores_backward: {_native.CPU.reason or 'rebuild it'}")
    logits, _ = _inputs(CPU_N, CPU_V, torch.float32, "cpu")
    bench.benchmark.group = f"scores cpu fwd+bwd N={CPU_N} V={CPU_V} float32"
    bench.benchmark.extra_info.update({"n": CPU_N, "v": CPU_V, "omp_threads": _threads()})
    bench(_fwd_bwd_step(case, logits), rounds=3)
    _record_bandwidth(bench, 3 * CPU_N * CPU_V * 4)


def _threads():
    return _native.CPU.num_threads() if _native.CPU.has("aql_num_threads") else None


# ---- CUDA -----------------------------------------------------------------------------------------

GPU_SHAPES = {"4096x32000": (4096, 32000), "8192x128256": (8192, 128256)}
GPU_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _liger_loss():
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except Exception as error:  # not installed, or built for another torch
        pytest.skip(f"liger_kernel unavailable: {error}")
    return LigerCrossEntropyLoss(ignore_index=IGNORE)


def _require_triton():
    status = _dispatch.triton_status()
    if not status.available:
        pytest.skip(status.detail)


@requires_cuda
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("case", ["aql_triton_cuda", "torch_eager_composite_cuda", "torch_compile_composite_cuda", "torch_cross_entropy_cuda",
                                  "device_copy_cuda"])
def test_scores_fwd_cuda(bench, case, shape, dtype):
    n, v = GPU_SHAPES[shape]
    logits, targets = _inputs(n, v, GPU_DTYPES[dtype], "cuda")
    copy = torch.empty_like(logits) if case == "device_copy_cuda" else None
    if case == "device_copy_cuda":
        fn = lambda: copy.copy_(logits)  # noqa: E731
    elif case == "aql_triton_cuda":
        _require_triton()
        fn = lambda: softmax_scores(logits, targets)  # noqa: E731
    elif case == "torch_eager_composite_cuda":
        fn = lambda: eager_composite(logits, targets)  # noqa: E731
    elif case == "torch_compile_composite_cuda":
        compiled = torch.compile(eager_composite)
        fn = lambda: compiled(logits, targets)  # noqa: E731
    else:
        fn = lambda: F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")  # noqa: E731
    bench.benchmark.group = f"scores cuda fwd {shape} {dtype}"
    bench.benchmark.extra_info.update({"n": n, "v": v, "dtype": dtype})
    bench(fn, device="cuda", rounds=20)
    _record_bandwidth(bench, (2 if case == "device_copy_cuda" else 1) * n * v * logits.element_size())


@requires_cuda
@pytest.mark.parametrize("dtype", list(GPU_DTYPES))
@pytest.mark.parametrize("shape", list(GPU_SHAPES))
@pytest.mark.parametrize("case", ["aql_triton_cuda", "aql_triton_inplace_cuda", "torch_cross_entropy_cuda",
                                  "torch_compile_cross_entropy_cuda", "liger_cross_entropy_cuda"])
def test_scores_fwd_bwd_cuda(bench, case, shape, dtype):
    n, v = GPU_SHAPES[shape]
    logits, targets = _inputs(n, v, GPU_DTYPES[dtype], "cuda")
    logits.requires_grad_(True)
    if case.startswith("aql"):
        _require_triton()
        inplace = case == "aql_triton_inplace_cuda"

        def loss_fn(x, t):
            return cross_entropy_with_scores(x, t, ignore_index=IGNORE, inplace_backward=inplace)[0]
    elif case == "liger_cross_entropy_cuda":
        loss_fn = _liger_loss()
    elif case == "torch_compile_cross_entropy_cuda":
        loss_fn = torch.compile(lambda x, t: F.cross_entropy(x, t, ignore_index=IGNORE))
    else:
        def loss_fn(x, t):
            return F.cross_entropy(x, t, ignore_index=IGNORE)

    def step():
        # torch.autograd.grad: no accumulation into logits.grad between rounds. The in-place cases
        # (aql inplace, Liger) overwrite the logits with the gradient; later rounds then run on
        # those values, which costs the same.
        return torch.autograd.grad(loss_fn(logits, targets), logits)

    bench.benchmark.group = f"scores cuda fwd+bwd {shape} {dtype}"
    bench.benchmark.extra_info.update({"n": n, "v": v, "dtype": dtype})
    bench(step, device="cuda", rounds=20)
    _record_bandwidth(bench, 3 * n * v * logits.element_size())
