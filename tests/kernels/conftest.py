"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest

from aql_kernels._native import CPU


@pytest.fixture
def cpu_variant(request):
    """Runs the CPU library's kernels in variant `request.param` (a `CpuIsa`, by indirect
    parametrization) for one test, then restores the previous choice."""
    if not CPU.has("aql_cpu_set_isa"):
        pytest.skip("the CPU library is not built here, or without runtime dispatch")
    previous = CPU.cpu_isa()
    set_isa = CPU.function("aql_cpu_set_isa")
    if set_isa(int(request.param)) != 0:
        pytest.skip(f"variant {request.param.name} does not run here: {CPU.last_error()}")
    assert CPU.cpu_isa() == request.param
    yield request.param
    assert set_isa(int(previous)) == 0
