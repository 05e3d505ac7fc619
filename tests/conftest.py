"""Shared test fixtures: fresh but reproducible randomness, and where each implementation can run."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

# Fresh random inputs each run; AQL_TEST_SEED=<n> replays a run (the seed is printed in the header).
SEED = int(os.environ.get("AQL_TEST_SEED", random.SystemRandom().randrange(2**31)))

HAS_CUDA = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (none here)")


def pytest_report_header(config):
    return f"aql: AQL_TEST_SEED={SEED} TRITON_INTERPRET={int(TRITON_INTERPRET)} cuda={HAS_CUDA}"


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "codegen: checks the code that one compiler version generates (e.g. PTX instruction counts for "
        "the Triton version a kernel was tuned with); skipped unless selected with -m codegen")


def pytest_collection_modifyitems(config, items):
    # A codegen test describes one toolchain version, not the behaviour of the code: it runs only when
    # the -m expression names the marker (`pytest -m codegen`).
    if "codegen" in (config.getoption("markexpr", "") or ""):
        return
    skip = pytest.mark.skip(reason="generated-code check for one compiler version: run with -m codegen")
    for item in items:
        if "codegen" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything(request):
    seed = (SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    torch.manual_seed(seed)
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    yield


def triton_device() -> str:
    """Device on which the Triton implementations run here, or skip saying why."""
    if HAS_CUDA:
        return "cuda"
    if TRITON_INTERPRET:
        return "cpu"
    pytest.skip("Triton needs a CUDA device or TRITON_INTERPRET=1 (make test sets it)")


def implementation_device(name: str) -> str:
    """Device for an IMPLEMENTATIONS key: triton -> triton_device(), cuda -> cuda, else cpu."""
    if name == "triton":
        return triton_device()
    if name == "cuda":
        if not HAS_CUDA:
            pytest.skip("the CUDA implementation needs a CUDA device (none here)")
        return "cuda"
    return "cpu"
