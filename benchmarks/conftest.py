"""Shared benchmark fixtures: machine description in every result, GPU-aware timing, and the
machine's measured read bandwidth that memory-bound cases are compared with.

`AQL_BENCH_QUICK=1` (set by `make bench-quick` / `python -m benchmarks.run --quick`) asks each suite
for its short form: fewer sizes and rounds, no torch.compile peers.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import statistics
import time

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none here)")
QUICK = os.environ.get("AQL_BENCH_QUICK", "") not in ("", "0")
# Elements of the tensor whose x.sum() gives the read bandwidth: 256 MiB of float32, far beyond the
# caches of the CPU and of any GPU's L2.
_BANDWIDTH_ELEMENTS = 1 << 26


@functools.lru_cache(maxsize=None)
def _bandwidth_tensor(device: str) -> torch.Tensor:
    return torch.ones(_BANDWIDTH_ELEMENTS, device=device)


def read_bandwidth(device: str = "cpu", threads: int | None = None) -> float:
    """GB/s of `x.sum()` over 256 MiB of float32 on `device` (with `threads` torch threads on CPU,
    default: the current count): the median of 5 timed calls after one warm-up. The read floor that a
    one-pass kernel is held against; `record_traffic` measures it right after each case, so that on
    a shared machine the two see the same load."""
    previous = torch.get_num_threads()
    if device == "cpu" and threads is not None:
        torch.set_num_threads(threads)
    try:
        x = _bandwidth_tensor(device)
        times = []
        for i in range(6):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            x.sum()
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
        return x.numel() * x.element_size() / statistics.median(times) / 1e9
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def torch_threads(count: int):
    """torch's intra-op threads set to `count` inside the block. The host-cost cases (tiny inputs) run
    at 1, as issue 14 measured them: with 2 threads on the shared 2-core machine, OpenMP barrier stalls
    whenever another process held a core gave medians of ~20 ms for ~50 us calls (torch's and ours)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def record_traffic(bench, moved_bytes: int, *, device: str = "cpu") -> None:
    """extra_info: `bytes` (the traffic floor of the case), `GB/s` (bytes over the median), the
    machine's `read_GB/s` (`read_bandwidth` measured now, same device and thread count) and
    `fraction_of_read`."""
    benchmark = bench.benchmark
    benchmark.extra_info["bytes"] = moved_bytes
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # --benchmark-disable: nothing was timed
        return
    gbps = moved_bytes / stats.stats.median / 1e9
    read = read_bandwidth(device, None if device != "cpu" else torch.get_num_threads())
    benchmark.extra_info.update({"GB/s": round(gbps, 2), "read_GB/s": round(read, 2), "fraction_of_read": round(gbps / read, 3)})


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
