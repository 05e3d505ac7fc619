"""fisher_ema_ against its torch peer, torch._foreach_mul_ + torch._foreach_addcmul_, one group per
parameter list.

- small: the 8 tensors (11k parameters) of the MNIST-1D CNN of aql/models.py, where the per-call host
  cost decides (issue: 24 us against foreach's 24 us on the 2-core CPU);
- large: a GPT-2-small-shaped list. Goals (DESIGN.md): >= 1.25x the peer on CPU, >= 1.5x on GPU. The
  CPU list is GPT-2 small cut to ~50M parameters (6 blocks, an 8192-token embedding) to fit a CI
  machine; the GPU list is the full 124M. GB/s counts the one-pass traffic (read f and g, write f)
  and `fraction_of_read` holds it against `x.sum()`'s read bandwidth in the same run.
`test_fisher_ema_host_overhead` times the Python part of a GPU call alone (any machine, no GPU).

    python -m pytest benchmarks/bench_fisher.py --benchmark-only --benchmark-columns=median,iqr,rounds
"""

from __future__ import annotations

import pytest
import torch

import aql_kernels
from aql.models import MNIST1DCNN
from aql_kernels import fisher as fisher_module
from benchmarks.conftest import QUICK, record_traffic, requires_cuda, torch_threads

_peer_medians: dict[tuple, float] = {}


def gpt2_parameter_shapes(n_layers: int, vocab_size: int, n_positions: int = 1024, d_model: int = 768) -> list[tuple[int, ...]]:
    """Shapes of GPT-2's parameters in the order of `GPT2LMHeadModel.parameters()` (tied head)."""
    shapes = [(vocab_size, d_model), (n_positions, d_model)]
    for _ in range(n_layers):
        shapes += [(d_model,), (d_model,),  # ln_1
                   (d_model, 3 * d_model), (3 * d_model,),  # attn.c_attn
                   (d_model, d_model), (d_model,),  # attn.c_proj
                   (d_model,), (d_model,),  # ln_2
                   (d_model, 4 * d_model), (4 * d_model,),  # mlp.c_fc
                   (4 * d_model, d_model), (d_model,)]  # mlp.c_proj
    return shapes + [(d_model,), (d_model,)]  # ln_f


def _parameter_list(device: str, grad_dtype: torch.dtype):
    shapes = gpt2_parameter_shapes(12, 50257) if device == "cuda" else gpt2_parameter_shapes(6, 8192)
    fisher = [torch.rand(shape, device=device) for shape in shapes]
    grads = [torch.randn(shape, device=device).to(grad_dtype) for shape in shapes]
    return fisher, grads


def _peer(fisher, grads, decay):
    torch._foreach_mul_(fisher, decay)
    torch._foreach_addcmul_(fisher, grads, grads, value=1.0 - decay)


def _record(bench, fisher, grads, key, implementation, *, traffic: bool = True):
    numel = sum(f.numel() for f in fisher)
    moved = sum(f.numel() * (8 + g.element_size()) for f, g in zip(fisher, grads))  # read f and g, write f
    median = bench.benchmark.stats.stats.median
    bench.benchmark.extra_info.update(parameters=numel, tensors=len(fisher), implementation=implementation, peer=implementation)
    if traffic:
        record_traffic(bench, moved, device=fisher[0].device.type)
    if implementation == "torch foreach":
        _peer_medians[key] = median
    elif key in _peer_medians:
        bench.benchmark.extra_info["speedup_vs_foreach"] = round(_peer_medians[key] / median, 3)


@pytest.mark.parametrize("case", ["torch foreach", "aql fisher_ema_"])
def test_fisher_ema_cpu_small_cnn(bench, case):
    bench.benchmark.group = "fisher_ema cpu float32 grads, MNIST-1D CNN 8 tensors (host cost)"
    shapes = [p.shape for p in MNIST1DCNN(channels=(32, 32, 32)).parameters()]
    torch.manual_seed(0)
    fisher = [torch.rand(shape) for shape in shapes]
    grads = [torch.randn(shape) for shape in shapes]
    if case != "torch foreach" and not fisher_module._native.CPU.has("aql_fisher_ema"):
        pytest.skip("the CPU library is not built (make native)")
    with torch_threads(1):
        bench(_peer if case == "torch foreach" else aql_kernels.fisher_ema_, fisher, grads, 0.95, rounds=300 if QUICK else 1000)
    _record(bench, fisher, grads, ("cpu small", torch.float32), case, traffic=False)


@pytest.mark.parametrize("case", ["torch foreach", "aql fisher_ema_"])
def test_fisher_ema_cpu_float32(bench, case):
    bench.benchmark.group = "fisher_ema cpu float32 grads, GPT-2 shapes ~50M (goal >= 1.25x foreach)"
    fisher, grads = _parameter_list("cpu", torch.float32)
    if case == "torch foreach":
        bench(_peer, fisher, grads, 0.95, rounds=10)
    else:
        if not fisher_module._native.CPU.has("aql_fisher_ema"):
            pytest.skip("the CPU library is not built (make native)")
        bench(aql_kernels.fisher_ema_, fisher, grads, 0.95, rounds=10)
    _record(bench, fisher, grads, ("cpu", torch.float32), case)


def test_fisher_ema_cpu_bfloat16(bench):
    bench.benchmark.group = "fisher_ema cpu bfloat16 grads, GPT-2 shapes ~50M"
    if not fisher_module._native.CPU.has("aql_fisher_ema"):
        pytest.skip("the CPU library is not built (make native)")
    fisher, grads = _parameter_list("cpu", torch.bfloat16)
    bench(aql_kernels.fisher_ema_, fisher, grads, 0.95, rounds=10)
    _record(bench, fisher, grads, ("cpu", torch.bfloat16), "aql fisher_ema_")


@requires_cuda
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["torch foreach", "aql fisher_ema_"])
def test_fisher_ema_cuda(bench, case, grad_dtype):
    bench.benchmark.group = f"fisher_ema cuda {grad_dtype} grads, GPT-2 small 124M (goal >= 1.5x foreach)"
    fisher, grads = _parameter_list("cuda", grad_dtype)
    if case == "torch foreach":
        if grad_dtype != torch.float32:
            pytest.skip("torch._foreach_addcmul_ needs the gradients in the state's dtype")
        bench(_peer, fisher, grads, 0.95, device="cuda")
    else:
        aql_kernels.fisher_ema_(fisher, grads, 0.95)  # compile the kernel and upload the tables
        bench(aql_kernels.fisher_ema_, fisher, grads, 0.95, device="cuda")
    _record(bench, fisher, grads, ("cuda", grad_dtype), case)


class _NoLaunch:
    """Stands in for the Triton kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@pytest.mark.skipif(fisher_module.triton is None, reason="triton does not import here")
@pytest.mark.parametrize("case", ["public fisher_ema_", "torch.ops.aql.fisher_ema_"])
def test_fisher_ema_host_overhead(bench, case, monkeypatch):
    """The Python part of a GPU call on GPT-2 small's 148 tensors (checks, address table lookup, grid),
    timed on CPU tensors with the kernel launch left out: on a GPU this host time adds to the kernel's
    whenever the caller waits for the result. The launch itself (triton's launcher) is not included."""
    bench.benchmark.group = "fisher_ema host overhead per call, 148 tensors (Python only, no launch)"
    shapes = gpt2_parameter_shapes(12, 50257)
    fisher = [torch.empty(shape) for shape in shapes]  # never touched: no memory is committed
    grads = [torch.empty(shape) for shape in shapes]
    monkeypatch.setattr(fisher_module, "_fisher_ema_kernel", _NoLaunch(), raising=False)
    for key in ("native", "reference"):  # CPU tensors take the GPU path
        monkeypatch.setitem(fisher_module._RUNNERS, key, fisher_module._RUNNERS["triton"])
    if case == "public fisher_ema_":
        bench(aql_kernels.fisher_ema_, fisher, grads, 0.95, rounds=200)
    else:
        bench(torch.ops.aql.fisher_ema_.default, fisher, grads, 0.95, 1.0, rounds=200)
    bench.benchmark.extra_info.update(tensors=len(shapes), implementation=case)
