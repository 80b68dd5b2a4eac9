"""Flux transformers (``FluxPipeline``) as EDM denoisers over ordinary latents.

Flux is flow matching (:mod:`diffsampler.models.flow`: ``x_t = (1 - t) x0 + t n``, velocity
prediction, ``sigma = t / (1 - t)``) with three differences, all handled inside
:class:`FluxDenoiser`, so it takes and returns latents of shape ``(batch, C, h, w)`` like every
other latent model:

* **Packed latents.**  The transformer sees each 2 x 2 patch of the latent as one token:
  ``(batch, h/2 * w/2, 4 C)``.  :func:`pack` / :func:`unpack` are that rearrangement and its
  inverse, in FluxPipeline's layout (``pipe(latents=...)`` takes packed latents).
* **Position ids**, rebuilt from the shapes on every call: ``img_ids`` = (0, row, column) of each
  patch, ``txt_ids`` = zeros, one row per text token.
* **Time and guidance inputs.**  The timestep is ``t`` itself (the transformer multiplies by 1000);
  guidance-distilled models (transformer config ``guidance_embeds``, e.g. FLUX.1-dev) take the
  guidance strength as an input, cond ``guidance`` (FluxPipeline's ``guidance_scale``; 3.5 there),
  instead of classifier-free guidance.

``cond``: ``encoder_hidden_states`` (T5 tokens), ``pooled_projections`` (pooled CLIP) and, for
guidance-distilled models, ``guidance`` (a number or a ``(batch,)`` tensor).
"""
from __future__ import annotations

from typing import Optional

import torch

from .flow import FlowDenoiser


def is_flux_transformer(model) -> bool:
    """Whether a diffusers transformer takes Flux's inputs (rotary position ids over three axes)."""
    config = getattr(model, "config", None) or {}
    return "axes_dims_rope" in config and "guidance_embeds" in config


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(batch, C, h, w) -> (batch, h/2 * w/2, 4 C): one token per 2 x 2 patch (h, w even)."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack`: (batch, h/2 * w/2, 4 C) -> (batch, C, h, w) for latents of size h x w."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"packed latents of shape {tuple(tokens.shape)} do not unpack to {height}x{width}")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(rows: int, cols: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(rows * cols, 3): (0, row, column) of each packed token, row-major."""
    r = torch.arange(rows, device=device, dtype=dtype)[:, None].expand(rows, cols)
    c = torch.arange(cols, device=device, dtype=dtype)[None, :].expand(rows, cols)
    return torch.stack([torch.zeros_like(r), r, c], dim=-1).reshape(rows * cols, 3)


class FluxDenoiser(FlowDenoiser):
    """A ``FluxTransformer2DModel`` as ``D(x, sigma, **cond) -> x0`` (see the module docstring).

    ``flow_options`` are :class:`~diffsampler.models.flow.FlowDenoiser`'s (``num_train_timesteps``,
    ``shift``, ...; :func:`~diffsampler.models.flow.flow_config` reads them from the scheduler)."""

    def __init__(self, transformer, **flow_options):
        if not is_flux_transformer(transformer):
            raise ValueError(f"{type(transformer).__name__} is not a Flux transformer (its config has no "
                             "axes_dims_rope / guidance_embeds)")
        super().__init__(transformer, timestep_scale=1.0, **flow_options)
        self.guidance_embeds = bool(transformer.config.get("guidance_embeds"))
        self.shape = None       # latents of any even size; LatentDiffusion checks the size it was built for

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, guidance=None, encoder_hidden_states=None,
                 pooled_projections=None, **cond) -> torch.Tensor:
        if encoder_hidden_states is None or pooled_projections is None:
            raise ValueError("a Flux transformer needs cond encoder_hidden_states (T5) and pooled_projections (CLIP); "
                             "LatentDiffusion.encode_prompt makes them")
        b, _, h, w = x_t.shape
        dtype, device = self.dtype, x_t.device
        embedded: Optional[torch.Tensor] = None
        if self.guidance_embeds:
            if guidance is None:
                raise ValueError("this Flux model is guidance-distilled (guidance_embeds): give cond guidance= "
                                 "(FluxPipeline's guidance_scale, 3.5 by default there)")
            embedded = torch.as_tensor(guidance, dtype=torch.float32, device=device).reshape(-1).expand(b)
        elif guidance is not None:
            raise ValueError("this Flux model has no guidance embedding (guidance_embeds is false): drop cond guidance")
        out = self.model(hidden_states=pack(x_t).to(dtype), timestep=t.to(device=device, dtype=dtype),
                         guidance=embedded, pooled_projections=pooled_projections,
                         encoder_hidden_states=encoder_hidden_states,
                         txt_ids=torch.zeros(encoder_hidden_states.shape[1], 3, device=device, dtype=dtype),
                         img_ids=image_ids(h // 2, w // 2, device, dtype), return_dict=False, **cond)
        return unpack(out[0] if isinstance(out, (tuple, list)) else out, h, w)

    def __repr__(self) -> str:
        return (f"FluxDenoiser({type(self.model).__name__}, guidance_embeds={self.guidance_embeds}, "
                f"T={self.num_train_timesteps}, sigma=[{self.sigma_min:.4g}, {self.sigma_max:.4g}])")
