"""Latent diffusion (Stable Diffusion and relatives) from a loaded diffusers pipeline.

:class:`LatentDiffusion` is a :class:`~diffsampler.models.base.Denoiser` over the pipeline's
latents plus what a text-to-image run needs around it::

    ld = LatentDiffusion.from_pipeline(pipe, height=512, width=512)
    cond, uncond = ld.encode_prompt("a cat", negative_prompt="")      # the pipeline's own encoder
    den = ClassifierFreeGuidance(ld, 7.5, uncond=uncond)
    result = sample(den, torch.randn(4, *ld.shape), solver="ipndm", nfe=8, cond=cond)
    images = ld.decode(result.samples)                                  # (4, 3, 512, 512) in [-1, 1]

Supported pipelines:

* a ``unet`` (``UNet2DConditionModel``, eps or v prediction) with a DDPM-style scheduler, a
  ``vae`` and a CLIP text encoder: StableDiffusionPipeline (SD 1.x / 2.x) and pipelines built
  like it.  The latent denoiser is a
  :class:`~diffsampler.models.diffusers_pixel.DiffusersDenoiser`; ``cond`` is
  ``{"encoder_hidden_states": prompt_embeds}``.
* a flow-matching ``transformer`` with ``FlowMatchEulerDiscreteScheduler``, a ``vae`` and text
  encoders: StableDiffusion3Pipeline.  The latent denoiser is a
  :class:`~diffsampler.models.flow.FlowDenoiser`; ``cond`` is
  ``{"encoder_hidden_states": ..., "pooled_projections": ...}``.
* not (yet): SDXL-style UNets with extra time/size conditioning (``addition_embed_type``),
  Flux-style packed latents.  They raise ``NotImplementedError``.

Latent shape: ``(in_channels, height / f, width / f)`` with ``f = 2 ** (len(vae
block_out_channels) - 1)``, the VAE's downsampling factor; the default image size is the model's
``sample_size * f``, as in the pipelines.  Decoding: ``vae.decode(latents / scaling_factor +
shift_factor)`` (shift_factor where the VAE config has one, as SD3), clamped to [-1, 1].
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .base import Denoiser, sigma_range
from .diffusers_pixel import DiffusersDenoiser
from .flow import FlowDenoiser, flow_config

Prompt = Union[str, Sequence[str]]


def _has(pipe, name: str) -> bool:
    return getattr(pipe, name, None) is not None


def _text_encoders(pipe) -> List[str]:
    return [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if _has(pipe, name)]


class LatentDiffusion(Denoiser):
    """A latent denoiser with its pipeline's prompt encoder and VAE (see the module docstring)."""

    def __init__(self, pipe, inner: Denoiser, height: int, width: int):
        self.pipe, self.inner = pipe, inner
        self.vae = pipe.vae
        self.vae_scale_factor = vae_scale_factor(self.vae)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.scaling_factor = float(self.vae.config.get("scaling_factor", 1.0))
        shift = self.vae.config.get("shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else None
        self.is_flow = isinstance(inner, FlowDenoiser)
        self.sigma_min, self.sigma_max = sigma_range(inner)
        self.height, self.width = int(height), int(width)
        self.shape = self.latent_shape(self.height, self.width)
        inner.shape = None      # the size is checked here; the inner denoiser is shared by at_size()

    # -- construction --------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe, height: Optional[int] = None, width: Optional[int] = None) -> "LatentDiffusion":
        missing = [name for name in ("vae", "scheduler") if not _has(pipe, name)]
        if not (_has(pipe, "unet") or _has(pipe, "transformer")):
            missing.insert(0, "unet (or transformer)")
        if not _text_encoders(pipe):
            missing.append("text_encoder")
        if missing:
            raise ValueError(f"{type(pipe).__name__} lacks {', '.join(missing)}: LatentDiffusion needs a text-to-image "
                             "latent pipeline (denoising network + vae + text encoder + scheduler), e.g. "
                             "StableDiffusionPipeline; pixel-space pipelines go with DiffusersDenoiser.from_pipeline")
        if _has(pipe, "unet"):
            config = pipe.unet.config
            if config.get("addition_embed_type") is not None:
                raise NotImplementedError(f"UNets with addition_embed_type={config['addition_embed_type']!r} (SDXL-style "
                                          "size/time conditioning) are not supported yet")
            inner: Denoiser = DiffusersDenoiser.from_pipeline(pipe)
            channels, size = config["in_channels"], config["sample_size"]
        else:
            inner = FlowDenoiser(pipe.transformer, **flow_config(pipe.scheduler))
            channels, size = pipe.transformer.config["in_channels"], pipe.transformer.config["sample_size"]
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        f = vae_scale_factor(pipe.vae)
        if int(pipe.vae.config.latent_channels) != int(channels):
            raise ValueError(f"the vae has {pipe.vae.config.latent_channels} latent channels but the denoising network "
                             f"takes {channels}")
        return cls(pipe, inner, height or size[0] * f, width or size[1] * f)

    def at_size(self, height: int, width: int) -> "LatentDiffusion":
        """The same model for another image size (shares all modules)."""
        return type(self)(self.pipe, self.inner, height, width)

    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        """(channels, height / f, width / f); the size must be a multiple of f (and of the
        transformer's patch size times f for patch-based models)."""
        f = self.vae_scale_factor
        multiple = f
        if self.is_flow:
            multiple *= int(self.pipe.transformer.config.get("patch_size", 1) or 1)
        if height <= 0 or width <= 0 or height % multiple or width % multiple:
            raise ValueError(f"image size {height}x{width} is not a positive multiple of {multiple} (the VAE downsamples "
                             f"by {f})")
        return (self.latent_channels, height // f, width // f)

    # -- the denoiser --------------------------------------------------------------------------------
    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"latents have shape {tuple(x.shape[1:])} per sample but this model expects {self.shape} "
                             f"for {self.height}x{self.width} images (use at_size(height, width) for another size)")
        return self.inner(x, sigma, **cond)

    def model_input_scale(self, sigma) -> torch.Tensor:
        return self.inner.model_input_scale(sigma)

    def to(self, *args, **kwargs) -> "LatentDiffusion":
        """Move the whole pipeline in place (denoising network, VAE, text encoders; the inner denoiser
        shares its network), so prompts encoded afterwards are on the same device."""
        self.pipe.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return self.pipe.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.dtype

    # -- prompts -------------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, negative_prompt: Optional[Prompt] = None, num_images_per_prompt: int = 1,
                      need_uncond: bool = True, **options) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """``(cond, uncond)`` conditioning dicts for ``sample(cond=...)`` and
        ``ClassifierFreeGuidance(uncond=...)``, from the pipeline's own ``encode_prompt``.

        ``prompt`` is a string or a list (one sample per prompt and per ``num_images_per_prompt``,
        in the pipelines' order); ``negative_prompt`` defaults to the empty prompt, as in diffusers.
        ``uncond`` is None when ``need_uncond=False`` (no guidance).  ``options`` go to the
        pipeline's ``encode_prompt`` as they are (e.g. ``clip_skip=2``, SD3's ``max_sequence_length=``)."""
        if prompt is None:
            raise ValueError("this model is text-conditioned: give a prompt (\"\" for the empty prompt)")
        if not isinstance(prompt, str) and not (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        encode = getattr(self.pipe, "encode_prompt", None)
        if encode is None:
            raise ValueError(f"{type(self.pipe).__name__} has no encode_prompt method")
        params = inspect.signature(encode).parameters
        kwargs: Dict[str, Any] = dict(prompt=prompt, device=self.device, num_images_per_prompt=int(num_images_per_prompt),
                                      do_classifier_free_guidance=bool(need_uncond), negative_prompt=negative_prompt)
        for extra in ("prompt_2", "prompt_3"):
            if extra in params:
                kwargs[extra] = None
        kwargs.update(options)
        with torch.no_grad():
            out = encode(**kwargs)
        if len(out) == 2:
            embeds, negative = out
            cond = {"encoder_hidden_states": embeds}
            uncond = {"encoder_hidden_states": negative} if need_uncond else None
        elif len(out) == 4 and self.is_flow:
            embeds, negative, pooled, negative_pooled = out
            cond = {"encoder_hidden_states": embeds, "pooled_projections": pooled}
            uncond = {"encoder_hidden_states": negative, "pooled_projections": negative_pooled} if need_uncond else None
        else:
            raise NotImplementedError(f"{type(self.pipe).__name__}.encode_prompt returns {len(out)} values; "
                                      "only SD-style (2) and SD3-style (4) prompt encoders are supported")
        return cond, uncond

    # -- images --------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (batch, *shape) -> images (batch, 3, height, width) in [-1, 1] through the VAE."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape (batch, {self.latent_channels}, h, w), got {got}")
        z = latents.to(self.vae.dtype) / self.scaling_factor
        if self.shift_factor is not None:
            z = z + self.shift_factor
        with torch.no_grad():
            images = self.vae.decode(z, return_dict=False)[0]
        return images.clamp(-1, 1)

    def __repr__(self) -> str:
        return f"LatentDiffusion({type(self.pipe).__name__}, {self.height}x{self.width}, latents {self.shape}, {self.inner!r})"


def vae_scale_factor(vae) -> int:
    """The VAE's spatial downsampling factor, 2 ** (number of encoder blocks - 1), as the pipelines compute it."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
