import pytest
import torch


@pytest.fixture(autouse=True)
def float64_default():
    """Tests run in float64 and from a fixed seed unless they ask otherwise."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(previous)
