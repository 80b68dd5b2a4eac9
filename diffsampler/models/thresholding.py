"""Dynamic thresholding (Saharia et al. 2022, Imagen) as an explicit, opt-in denoiser wrapper.

Per sample, s = max(1, quantile(|D(x, sigma)|, ratio)) and the estimate becomes
clamp(D, -s, s) / s * max_value.  It assumes data in [-max_value, max_value]; on data outside that
range it biases every step, which is why no solver applies it on its own.
"""
from __future__ import annotations

import torch

from .base import Denoiser, sigma_range


class DynamicThresholding(Denoiser):
    def __init__(self, denoiser, ratio: float = 0.995, max_value: float = 1.0):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
        self.inner, self.ratio, self.max_value = denoiser, ratio, max_value
        self.sigma_min, self.sigma_max = sigma_range(denoiser)
        self.shape = getattr(denoiser, "shape", None) if isinstance(denoiser, Denoiser) else None

    def denoise(self, x, sigma, **cond):
        denoised = self.inner(x, sigma, **cond)
        flat = denoised.reshape(denoised.shape[0], -1)
        s = torch.quantile(flat.abs().float(), self.ratio, dim=1).to(denoised.dtype)
        s = torch.clamp(s / self.max_value, min=1.0).reshape(-1, *([1] * (denoised.ndim - 1)))
        return torch.clamp(denoised, -s * self.max_value, s * self.max_value) / s
