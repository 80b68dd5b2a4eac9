"""The one model contract: a denoiser in the EDM ("VE", Karras) parametrization.

    x = x0 + sigma * n,        D(x, sigma, **cond) -> estimate of x0,
    dx/dsigma = (x - D(x, sigma)) / sigma.

Any callable with that signature can be sampled.  Subclassing :class:`Denoiser` adds what a
sampler wants to know without being told: the sigma range the model was trained on and the
shape of one sample.  Model wrappers (EDM networks, diffusers pipelines, flow matching, the
analytic Gaussian mixture) all subclass it; solvers never look past ``__call__``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

EDM_SIGMA_MIN = 0.002
EDM_SIGMA_MAX = 80.0


class Denoiser:
    """Base class for denoisers ``D(x, sigma, **cond) -> x0``.

    ``x`` has shape ``(batch, *shape)``; ``sigma`` is a tensor of shape ``(batch,)`` (one noise
    level per sample) in the model's dtype and device.  Subclasses implement :meth:`denoise`.
    """

    sigma_min: float = EDM_SIGMA_MIN
    sigma_max: float = EDM_SIGMA_MAX
    shape: Optional[Tuple[int, ...]] = None
    num_classes: int = 0          # > 0: class-conditional through cond ``class_labels`` (one-hot rows)
    class_names: Tuple[str, ...] = ()

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        return self.denoise(x, sigma, **cond)

    # --- what the model declares, so that no caller inspects its type ----------------------------
    @property
    def conditioning(self) -> str:
        """The conditioning it takes: ``"class"`` (cond ``class_labels``, one-hot rows; see
        ``num_classes``), ``"text"`` (prompts through ``encode_prompt``) or ``"none"``."""
        return "class" if self.num_classes else "none"

    @property
    def network(self) -> Optional[torch.nn.Module]:
        """The torch module that computes it (features are read from it), or None (analytic models)."""
        return None

    def identity_tensors(self) -> List[torch.Tensor]:
        """The tensors that make this model what it is (weights; a mixture's means and stds)."""
        net = self.network
        return [p.detach() for p in net.parameters()] if net is not None else []

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        """Samples -> images in [-1, 1] (latent models decode through their VAE; others are images)."""
        return samples

    def discrete_schedule(self) -> Optional[dict]:
        """``schedule_options`` of the ``discrete`` schedule (the model's own integer training
        timesteps: ``sigma_fn``, ``sigma_inv``), or None for a continuous-time model."""
        return None

    def image_size(self) -> Optional[Tuple[int, int]]:
        """``(height, width)`` of the images of a latent model, whose sample shape follows from
        it (:meth:`resized` changes it); None for a model whose samples are its images."""
        return None

    def resized(self, height: Optional[int] = None, width: Optional[int] = None) -> "Denoiser":
        """The same model making images of ``height`` x ``width`` (None: its own; latent
        pipelines); a model with one fixed sample shape refuses."""
        shape = tuple(self.shape) if self.shape is not None else "(unknown)"
        raise ValueError(f"this model makes samples of one fixed shape {shape}; only latent pipelines "
                         "(Stable Diffusion, SDXL, SD3, Flux) make images of another size")

    def native_plans(self) -> Dict[int, dict]:
        """For a model distilled for one sampler (SFD students): NFE -> ``dict(solver=...,
        solver_options={...}, sigmas=[...], afs=..., denoise_to_zero=..., model_inputs={...})``,
        the request it was trained for at each NFE (``model_inputs`` reach every model call, e.g.
        a step-count input).  A request that names no solver, schedule or grid gets one of these;
        another NFE is refused.  Empty for ordinary models."""
        return {}

    def to(self, *args, **kwargs):
        """Move the model in place (returns it)."""
        net = self.network
        if net is not None:
            net.to(*args, **kwargs)
        return self


class DenoiserWrapper(Denoiser):
    """A denoiser around another (guidance, thresholding, ...): forwards the sigma range, shape,
    classes, conditioning, network, identity, decoding and ``.to()`` to ``inner``."""

    def __init__(self, inner):
        self.inner = inner
        self.sigma_min, self.sigma_max = sigma_range(inner)
        self.shape = inner.shape if isinstance(inner, Denoiser) else None
        self.num_classes = inner.num_classes if isinstance(inner, Denoiser) else 0
        self.class_names = inner.class_names if isinstance(inner, Denoiser) else ()

    @property
    def conditioning(self) -> str:
        return self.inner.conditioning if isinstance(self.inner, Denoiser) else "none"

    @property
    def network(self) -> Optional[torch.nn.Module]:
        return self.inner.network if isinstance(self.inner, Denoiser) else None

    def identity_tensors(self) -> List[torch.Tensor]:
        return self.inner.identity_tensors() if isinstance(self.inner, Denoiser) else []

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(samples) if isinstance(self.inner, Denoiser) else samples

    def discrete_schedule(self) -> Optional[dict]:
        return self.inner.discrete_schedule() if isinstance(self.inner, Denoiser) else None

    def native_plans(self) -> Dict[int, dict]:
        return self.inner.native_plans() if isinstance(self.inner, Denoiser) else {}

    def image_size(self) -> Optional[Tuple[int, int]]:
        return self.inner.image_size() if isinstance(self.inner, Denoiser) else None

    def encode_prompt(self, *args, **kwargs):
        return self.inner.encode_prompt(*args, **kwargs)

    def to(self, *args, **kwargs):
        """Moves the wrapped model (a plain callable stays where it is)."""
        if isinstance(self.inner, Denoiser):
            self.inner.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.inner.device

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype


class NetworkDenoiser(Denoiser):
    """A denoiser around one ``torch.nn.Module`` (``self.net``), handled like a module."""

    net: torch.nn.Module

    @property
    def network(self) -> torch.nn.Module:
        return self.net

    def eval(self):
        self.net.eval()
        return self

    def train(self, mode: bool = True):
        self.net.train(mode)
        return self

    def parameters(self):
        return self.net.parameters()

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.net.parameters()).dtype


def sigma_range(denoiser) -> Tuple[float, float]:
    """The (sigma_min, sigma_max) a denoiser declares; EDM's (0.002, 80) for a plain callable."""
    if isinstance(denoiser, Denoiser):
        return float(denoiser.sigma_min), float(denoiser.sigma_max)
    return EDM_SIGMA_MIN, EDM_SIGMA_MAX


def check_sample_shape(denoiser, input_shape) -> None:
    """Refuse an input whose per-sample shape differs from the one the denoiser declares."""
    if isinstance(denoiser, Denoiser) and denoiser.shape is not None:
        if tuple(input_shape[1:]) != tuple(denoiser.shape):
            raise ValueError(f"input has sample shape {tuple(input_shape[1:])} but the model expects "
                             f"{tuple(denoiser.shape)} (input must be (batch, *{tuple(denoiser.shape)}))")


def work_dtype(device: torch.device) -> torch.dtype:
    """float64 for solver and wrapper arithmetic wherever the device has it (not on Apple MPS)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


def per_sample_sigma(sigma, batch: int, device, dtype) -> torch.Tensor:
    """``sigma`` (a number, a 1-element or a (batch,) tensor) as a (batch,) tensor, checked."""
    sigma = torch.as_tensor(sigma, device=device).to(dtype).reshape(-1)
    if sigma.numel() == 1:
        sigma = sigma.expand(batch)
    if sigma.shape[0] != batch:
        raise ValueError(f"sigma must have shape ({batch},), got {tuple(sigma.shape)}")
    return sigma
