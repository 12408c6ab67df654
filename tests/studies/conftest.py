"""Study tests run single-threaded: their ops are tiny and the CPU is shared."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: threads only add contention
    yield
    torch.set_num_threads(threads)
