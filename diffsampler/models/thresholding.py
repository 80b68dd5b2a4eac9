"""Dynamic thresholding (Saharia et al. 2022, Imagen) as an explicit, opt-in denoiser wrapper.

With m = max_value, per sample s = max(1, quantile(|D(x, sigma)|, ratio) / m) and the estimate
becomes clamp(D, -s m, s m) / s: estimates already inside [-m, m] are unchanged, others are
clamped and shrunk back into the range.  It assumes data in [-m, m]; on data outside that range it
biases every step, which is why no solver applies it on its own.  (diffusers' ``sample_max_value``
is a different knob: an upper limit on s.)
"""
from __future__ import annotations

import torch

from .base import DenoiserWrapper


class DynamicThresholding(DenoiserWrapper):
    def __init__(self, denoiser, ratio: float = 0.995, max_value: float = 1.0):
        if not 0 < ratio <= 1:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
        super().__init__(denoiser)
        self.ratio, self.max_value = ratio, max_value

    def denoise(self, x, sigma, **cond):
        denoised = self.inner(x, sigma, **cond)
        flat = denoised.reshape(denoised.shape[0], -1)
        exact = flat.abs() if flat.dtype in (torch.float32, torch.float64) else flat.abs().float()
        s = torch.quantile(exact, self.ratio, dim=1).to(denoised.dtype)
        s = torch.clamp(s / self.max_value, min=1.0).reshape(-1, *([1] * (denoised.ndim - 1)))
        return torch.clamp(denoised, -s * self.max_value, s * self.max_value) / s
