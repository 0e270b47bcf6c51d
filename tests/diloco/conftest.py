import pytest
import torch

TINY = {"n_layer": 1, "n_embd": 32, "n_head": 2, "block_size": 32}


@pytest.fixture(autouse=True)
def _two_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_config():
    return dict(TINY)
