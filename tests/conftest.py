import pytest
import torch

from diffsampler import GaussianMixture

# The tests run many tiny tensor ops: one thread avoids thread-pool overhead on small CI machines.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)


def single_gaussian(dim=16, std=0.5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(1, dim, dtype=torch.float64, generator=gen)
    return GaussianMixture(mean, stds=std)


def mixture(components=6, dim=12, seed=1):
    gen = torch.Generator().manual_seed(seed)
    means = 0.8 * torch.randn(components, dim, dtype=torch.float64, generator=gen)
    stds = 0.1 + 0.3 * torch.rand(components, dtype=torch.float64, generator=gen)
    weights = torch.rand(components, dtype=torch.float64, generator=gen) + 0.2
    return GaussianMixture(means, stds=stds, weights=weights)
