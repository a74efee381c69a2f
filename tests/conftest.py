import pytest
import torch

from difflab import DiscretePath, gaussian_bed, mixture_bed_2d

# The suite's tensors are small: one intra-op thread is faster than two (the exact test beds run about 4×
# faster at B = 2000 on the 2-core reference machine) and keeps the run predictable when cores are shared.
torch.set_num_threads(1)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)


@pytest.fixture(scope="session")
def linear_path():
    return DiscretePath.from_schedule("linear", T=1000)


@pytest.fixture(scope="session")
def bed16():
    """The 16-D ill-conditioned Gaussian bed (eigenvalues over two decades)."""
    return gaussian_bed(16, condition=100.0, seed=0)


@pytest.fixture(scope="session")
def mix2d():
    return mixture_bed_2d(num_classes=4)
