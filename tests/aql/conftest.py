"""Fixtures shared by the aql tests."""

import pytest
import torch


@pytest.fixture
def one_thread():
    """One torch thread for the test: the models here are tiny, one thread is as fast, and it does not
    stall in OpenMP barriers when other processes share the cores (2 threads ran a training step 10-25x
    slower than 1 on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
