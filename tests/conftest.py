"""Shared test set-up."""
import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: under `pytest -n 2` on 2 cores, two threads per worker spin against each other
    and small ops run ~10x slower. Restored after each module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
