"""Shared benchmark fixtures: machine description in every result, and GPU-aware timing."""

from __future__ import annotations

import os
import platform

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none here)")


def machine_info() -> dict:
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception:  # triton is optional on CPU
        info["triton"] = None
    if HAS_CUDA:
        info["gpu"] = torch.cuda.get_device_name()
    return info


@pytest.fixture
def bench(benchmark):
    """pytest-benchmark's fixture with the machine recorded in extra_info.

    `bench(fn, *args, device=...)` times fn; on CUDA the call synchronises inside the timed region so
    that the kernel time, not the launch time, is measured.
    """
    benchmark.extra_info.update(machine_info())

    def run(fn, *args, device: str = "cpu", rounds: int | None = None, **kwargs):
        if device == "cuda":
            def timed():
                out = fn(*args, **kwargs)
                torch.cuda.synchronize()
                return out
        else:
            timed = lambda: fn(*args, **kwargs)  # noqa: E731
        if rounds is not None:
            return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1, iterations=1)
        return benchmark(timed)

    run.benchmark = benchmark
    return run
