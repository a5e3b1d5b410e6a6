import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    """Small float64 problems: one thread. On a shared, oversubscribed CPU, OpenMP barriers make
    tiny ops 100-1000x slower with 2 threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
