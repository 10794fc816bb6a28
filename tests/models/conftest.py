"""Model tests: the networks here are tiny, so one intra-op thread is as fast, and far faster
on a busy machine."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
