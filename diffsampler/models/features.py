"""Per-sample features of a denoiser's evaluation, read while sampling (for AMED's predictor).

The feature of one evaluation ``D(x, sigma)`` is the spatial average of the network's bottleneck
activation, taken with a forward hook on a named module:

* the bundled U-Net's middle block ``mid``;
* a diffusers U-Net's ``mid_block``;
* an EDM network's lowest-resolution block (the last entry of ``model.enc``);
* or any module named explicitly (``module="down.2"``, a name from ``net.named_modules()``).

Models without a network or a hook point (the analytic Gaussian mixture, plain callables) use
the documented fallback ``"denoised"``: the per-channel mean and root-mean-square of the
denoised estimate itself (2 x channels numbers).  When the model is not called at all (the
analytical first step) a hooked feature is a zero vector (the fallback reads the analytic
estimate).  With classifier-free guidance one model
call carries k = 2 stacked halves; their pooled features are concatenated per sample.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .base import Denoiser

FALLBACK = "denoised"


def _network(denoiser) -> Optional[torch.nn.Module]:
    """The network a (possibly wrapped) denoiser declares, or None."""
    return denoiser.network if isinstance(denoiser, Denoiser) else None


def find_feature_module(denoiser, module: Optional[str] = None) -> Tuple[str, Optional[torch.nn.Module]]:
    """``(name, module)`` of the hook point; ``(FALLBACK, None)`` where the model has none."""
    net = _network(denoiser)
    if module == FALLBACK:
        return FALLBACK, None
    modules = dict(net.named_modules()) if net is not None else {}
    if module is not None:
        if module not in modules:
            some = ", ".join(name for name in list(modules)[1:12] if name) or "none (no network)"
            raise ValueError(f"the model has no module named {module!r}; some of its modules: {some}; "
                             f"or use {FALLBACK!r} (statistics of the denoised estimate)")
        return module, modules[module]
    for name in ("mid", "mid_block"):
        if name in modules:
            return name, modules[name]
    enc = modules.get("model.enc")
    if isinstance(enc, torch.nn.ModuleDict) and len(enc):
        last = list(enc.keys())[-1]
        return f"model.enc.{last}", enc[last]
    return FALLBACK, None


def _pool(activation: torch.Tensor, batch: int) -> torch.Tensor:
    pooled = activation.detach().float().flatten(2).mean(-1) if activation.ndim > 2 else activation.detach().float()
    if pooled.shape[0] != batch:
        if pooled.shape[0] % batch:
            raise ValueError(f"the hooked module saw batch {pooled.shape[0]}, not a multiple of {batch}")
        k = pooled.shape[0] // batch
        pooled = pooled.reshape(k, batch, -1).permute(1, 0, 2).reshape(batch, -1)
    return pooled


def denoised_statistics(denoised: torch.Tensor) -> torch.Tensor:
    """The fallback feature: per-channel mean and RMS of the denoised estimate, (batch, 2 C)."""
    flat = denoised.detach().float().reshape(denoised.shape[0], denoised.shape[1] if denoised.ndim > 2 else 1, -1)
    return torch.cat([flat.mean(-1), flat.pow(2).mean(-1).sqrt()], dim=1)


class FeatureTap:
    """A context manager that hooks the feature module; :meth:`take` returns the feature of the
    latest model call since :meth:`clear` (zeros if the model was not called)."""

    def __init__(self, denoiser, source: str, dim: Optional[int]):
        self.source, self.dim = source, dim
        _, self.module = find_feature_module(denoiser, source)
        self.activation: Optional[torch.Tensor] = None
        self._handle = None

    def __enter__(self) -> "FeatureTap":
        if self.module is not None:
            self._handle = self.module.register_forward_hook(self._record)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _record(self, module, inputs, output) -> None:
        self.activation = output[0] if isinstance(output, (tuple, list)) else output

    def clear(self) -> None:
        self.activation = None

    def take(self, x: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
        batch = x.shape[0]
        if self.source == FALLBACK:
            features = denoised_statistics(denoised)
        else:
            features = _pool(self.activation, batch) if self.activation is not None else None
        if features is None:
            if self.dim is None:
                raise RuntimeError(f"no model call to read {self.source!r} from, and the feature size is not known: "
                                   "give the FeatureTap the dim the predictor reads")
            return torch.zeros(batch, self.dim, device=x.device)
        if self.dim is not None and features.shape[1] != self.dim:
            raise ValueError(f"this AMED predictor reads {self.dim} features from {self.source!r} but the model gives "
                             f"{features.shape[1]}: it was trained for another model (or with/without guidance)")
        return features
