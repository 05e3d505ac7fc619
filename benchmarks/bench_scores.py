"""Fused softmax scores and the fused loss against their peers, one group per shape.

CPU forward (`softmax_scores` with targets: all seven statistics), at the small shapes where the
per-call host cost decides (64x10, 512x10, 256x1000) and at 4096x32000 float32:
  aql_softmax_scores       the C++ library
  torch_cross_entropy      F.cross_entropy(reduction="none"): the loss alone, the cheapest torch call
  torch_eager_composite    F.log_softmax, then the seven statistics in eager torch (`eager_composite`)
  torch_compile_composite  torch.compile of the same (4096x32000 only; left out with AQL_BENCH_QUICK)
  memory_floor_sum         logits.sum(dim=1): one plain read of the logits, the floor of a one-pass op
CPU forward+backward of the mean loss, same shapes: aql_cross_entropy_with_scores against
  torch_cross_entropy and (4096x32000 only) torch_compile_cross_entropy.
CPU throughput against V (N=1024, V from 10 to 50257): aql_softmax_scores, torch_cross_entropy and
  the sum floor, the plot of `make bench`.
GPU (Triton; skipped without CUDA), forward and forward+backward, float32 and bfloat16:
  aql_triton against the eager composite, torch.compile of the composite, F.cross_entropy and
  Liger-Kernel's cross-entropy when `liger_kernel` is installed (Liger writes its gradient during
  the forward, so it only appears in the fwd+bwd groups). The forward groups also hold
  device_copy_cuda, a device-to-device copy of the logits whose GB/s counts its read and its write.
`bytes` in extra_info is the traffic of a one-pass kernel over the logits (forward: one read;
forward+backward: two reads and one write), `GB/s` divides it by the median, and `fraction_of_read`
holds that against `x.sum()`'s read bandwidth measured in the same run (benchmarks/conftest.py), so
the columns say how close each case gets to that floor whatever it really moves. Small shapes record
no traffic: there the time is host work, not memory; they run at 1 torch thread (`torch_threads`).

    python -m pytest benchmarks/bench_scores.py --benchmark-only --benchmark-columns=median,iqr,rounds
    python -m pytest benchmarks/bench_scores.py --benchmark-only -k cuda      # GPU cases only
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from aql_kernels import _dispatch, _native
from aql_kernels.scores import cross_entropy_with_scores, softmax_scores
from benchmarks.conftest import QUICK, record_traffic, requires_cuda, torch_threads

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


# ---- CPU ------------------------------------------------------------------------------------------

CPU_SHAPES = {"64x10": (64, 10), "512x10": (512, 10), "256x1000": (256, 1000), "4096x32000": (4096, 32000)}
LARGE = "4096x32000"
SWEEP_N = 1024
SWEEP_V = [10, 1000, 32000] if QUICK else [10, 1000, 8192, 32000, 50257]
_compiled: dict = {}


def _threads():
    return _native.CPU.num_threads() if _native.CPU.has("aql_num_threads") else None


def _require_native(symbol: str) -> None:
    if not _native.CPU.has(symbol):
        pytest.skip(f"the CPU library lacks {symbol}: {_native.CPU.reason or 'rebuild it'}")


def _compile(key, fn):
    """torch.compile once per process (a peer that is only timed in the full run)."""
    if QUICK:
        pytest.skip("torch.compile peers are left out of the quick run")
    if key not in _compiled:
        _compiled[key] = torch.compile(fn)
    return _compiled[key]


def _forward_case(case: str, logits: torch.Tensor, targets: torch.Tensor):
    if case == "aql_softmax_scores":
        _require_native("aql_softmax_scores")
        return lambda: softmax_scores(logits, targets)
    if case == "torch_cross_entropy":
        return lambda: F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction="none")
    if case == "torch_eager_composite":
        return lambda: eager_composite(logits, targets)
    if case == "torch_compile_composite":
        compiled = _compile("composite", eager_composite)
        compiled(logits, targets)  # compile outside the timed rounds
        return lambda: compiled(logits, targets)
    return lambda: logits.sum(dim=1)


def _rounds(n: int, v: int, slow: bool) -> int:
    if n * v <= 1 << 20:
        return 100 if QUICK else 300
    return 2 if slow else (3 if QUICK else 7)


@pytest.mark.parametrize("case", ["aql_softmax_scores", "torch_cross_entropy", "torch_eager_composite", "torch_compile_composite",
                                  "memory_floor_sum"])
@pytest.mark.parametrize("shape", list(CPU_SHAPES))
def test_scores_fwd_cpu(bench, case, shape):
    n, v = CPU_SHAPES[shape]
    if case == "torch_compile_composite" and shape != LARGE:
        pytest.skip("torch.compile is timed at 4096x32000 only (one compilation)")
    logits, targets = _inputs(n, v, torch.float32, "cpu")
    fn = _forward_case(case, logits, targets)
    bench.benchmark.group = f"scores cpu fwd {shape} float32"
    bench.benchmark.extra_info.update({"n": n, "v": v, "omp_threads": _threads(), "peer": case})
    with torch_threads(torch.get_num_threads() if shape == LARGE else 1):
        bench(fn, rounds=_rounds(n, v, case == "torch_eager_composite"))
    if shape == LARGE:
        record_traffic(bench, n * v * 4)


def _fwd_bwd_step(case: str, logits: torch.Tensor, targets: torch.Tensor):
    logits = logits.clone().requires_grad_(True)
    if case == "aql_cross_entropy_with_scores":
        _require_native("aql_softmax_scores_backward")

        def loss_fn(x, t):
            return cross_entropy_with_scores(x, t, ignore_index=IGNORE)[0]
    elif case == "torch_compile_cross_entropy":
        loss_fn = _compile("cross_entropy", lambda x, t: F.cross_entropy(x, t, ignore_index=IGNORE))
        torch.autograd.grad(loss_fn(logits, targets), logits)  # compile outside the timed rounds
    else:
        def loss_fn(x, t):
            return F.cross_entropy(x, t, ignore_index=IGNORE)
    return lambda: torch.autograd.grad(loss_fn(logits, targets), logits)


@pytest.mark.parametrize("case", ["aql_cross_entropy_with_scores", "torch_cross_entropy", "torch_compile_cross_entropy"])
@pytest.mark.parametrize("shape", list(CPU_SHAPES))
def test_scores_fwd_bwd_cpu(bench, case, shape):
    n, v = CPU_SHAPES[shape]
    if case == "torch_compile_cross_entropy" and shape != LARGE:
        pytest.skip("torch.compile is timed at 4096x32000 only (one compilation)")
    logits, targets = _inputs(n, v, torch.float32, "cpu")
    fn = _fwd_bwd_step(case, logits, targets)
    bench.benchmark.group = f"scores cpu fwd+bwd {shape} float32"
    bench.benchmark.extra_info.update({"n": n, "v": v, "omp_threads": _threads(), "peer": case})
    with torch_threads(torch.get_num_threads() if shape == LARGE else 1):
        bench(fn, rounds=_rounds(n, v, False))
    if shape == LARGE:
        record_traffic(bench, 3 * n * v * 4)


@pytest.mark.parametrize("case", ["aql_softmax_scores", "torch_cross_entropy", "memory_floor_sum"])
@pytest.mark.parametrize("v", SWEEP_V)
def test_scores_throughput_by_vocab_cpu(bench, case, v):
    logits, targets = _inputs(SWEEP_N, v, torch.float32, "cpu")
    fn = _forward_case(case, logits, targets)
    bench.benchmark.group = f"scores cpu fwd throughput N={SWEEP_N} V={v}"
    bench.benchmark.extra_info.update({"n": SWEEP_N, "v": v, "omp_threads": _threads(), "peer": case, "sweep": "scores_by_vocab"})
    bench(fn, rounds=_rounds(SWEEP_N, v, False) if v > 1000 else (50 if QUICK else 100))
    record_traffic(bench, SWEEP_N * v * 4)


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
    record_traffic(bench, (2 if case == "device_copy_cuda" else 1) * n * v * logits.element_size(), device="cuda")


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
    record_traffic(bench, 3 * n * v * logits.element_size(), device="cuda")
