"""Models seen through one contract: ``D(x, sigma, **cond) -> x0`` (see :mod:`.base`)."""
from .base import Denoiser, sigma_range
from .gmm import GaussianMixture
from .thresholding import DynamicThresholding

__all__ = ["Denoiser", "sigma_range", "GaussianMixture", "DynamicThresholding"]
