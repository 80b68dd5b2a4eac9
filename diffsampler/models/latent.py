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
* an SDXL ``unet`` (``addition_embed_type="text_time"``) with two CLIP text encoders:
  StableDiffusionXLPipeline.  ``cond`` is ``{"encoder_hidden_states": ..., "added_cond_kwargs":
  {"text_embeds": pooled_prompt_embeds, "time_ids": ...}}``; the size conditioning ``time_ids`` is
  ``original_size + crops_coords_top_left + target_size`` (defaults: the image size, (0, 0), the
  image size, as the pipeline's), for the unconditional half too.  ``encode_prompt`` takes
  ``original_size=``, ``crops_coords_top_left=``, ``target_size=``.
* a Flux ``transformer`` (packed latents, position ids, guidance embedding; see
  :mod:`diffsampler.models.flux`) with CLIP + T5 encoders: FluxPipeline.  The latents are the
  unpacked ``(C, h, w)`` (FluxPipeline draws its noise in that shape, then packs it); ``cond`` is
  ``{"encoder_hidden_states": T5 tokens, "pooled_projections": pooled CLIP}`` plus, for
  guidance-distilled models, ``"guidance"``: ``encode_prompt(distilled_guidance=...)``, default
  3.5 as FluxPipeline's ``guidance_scale``.  Classifier-free guidance with a negative prompt on top
  (FluxPipeline's ``true_cfg_scale``) is the usual :class:`ClassifierFreeGuidance` wrapper.
* other UNets with ``addition_embed_type`` raise ``NotImplementedError``.

Latent shape: ``(latent channels, height / f, width / f)`` with ``f = 2 ** (len(vae
block_out_channels) - 1)``, the VAE's downsampling factor; the default image size is the model's
``sample_size * f`` (Flux: FluxPipeline's default 128 * f), as in the pipelines.  Decoding:
``vae.decode(latents / scaling_factor + shift_factor)`` (shift_factor where the VAE config has one,
as SD3 and Flux; ``latents * latents_std / scaling_factor + latents_mean`` where it has those),
clamped to [-1, 1].
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch

from .base import Denoiser, sigma_range
from .diffusers_pixel import DiffusersDenoiser
from .flow import FlowDenoiser, flow_config
from .flux import FluxDenoiser, is_flux_transformer

FLUX_DEFAULT_GUIDANCE = 3.5       # FluxPipeline's guidance_scale (the embedded guidance of distilled models)
FLUX_DEFAULT_SAMPLE_SIZE = 128    # FluxPipeline's default_sample_size (latent pixels)
SIZE_OPTIONS = ("original_size", "crops_coords_top_left", "target_size")

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
        self.is_flux = isinstance(inner, FluxDenoiser)
        self.is_sdxl = _has(pipe, "unet") and pipe.unet.config.get("addition_embed_type") == "text_time"
        stats = self.vae.config.get("latents_mean"), self.vae.config.get("latents_std")
        self.latents_mean, self.latents_std = stats if None not in stats else (None, None)
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
            if config.get("addition_embed_type") not in (None, "text_time"):
                raise NotImplementedError(f"UNets with addition_embed_type={config['addition_embed_type']!r} are not "
                                          "supported (SDXL's 'text_time' is)")
            inner: Denoiser = DiffusersDenoiser.from_pipeline(pipe)
            channels, size = config["in_channels"], config["sample_size"]
        elif is_flux_transformer(pipe.transformer):
            inner = FluxDenoiser(pipe.transformer, **flow_config(pipe.scheduler))
            channels = pipe.transformer.config["in_channels"] // 4          # 2 x 2 patches packed into tokens
            size = getattr(pipe, "default_sample_size", None) or FLUX_DEFAULT_SAMPLE_SIZE
        else:
            inner = FlowDenoiser(pipe.transformer, **flow_config(pipe.scheduler))
            channels, size = pipe.transformer.config["in_channels"], pipe.transformer.config["sample_size"]
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        f = vae_scale_factor(pipe.vae)
        if int(pipe.vae.config.latent_channels) != int(channels):
            raise ValueError(f"the vae has {pipe.vae.config.latent_channels} latent channels but the denoising network "
                             f"takes {channels}")
        return cls(pipe, inner, height or size[0] * f, width or size[1] * f)

    def image_size(self) -> Tuple[int, int]:
        return (self.height, self.width)

    def resized(self, height: Optional[int] = None, width: Optional[int] = None) -> "LatentDiffusion":
        return self.at_size(height or self.height, width or self.width)

    def at_size(self, height: int, width: int) -> "LatentDiffusion":
        """The same model for another image size (shares all modules)."""
        return type(self)(self.pipe, self.inner, height, width)

    def latent_shape(self, height: int, width: int) -> Tuple[int, int, int]:
        """(channels, height / f, width / f); the size must be a multiple of f (and of the
        transformer's patch size times f for patch-based models)."""
        f = self.vae_scale_factor
        multiple = f
        if self.is_flux:
            multiple *= 2                   # latents are packed in 2 x 2 patches
        elif self.is_flow:
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

    @property
    def conditioning(self) -> str:
        return "text"

    @property
    def network(self) -> Optional[torch.nn.Module]:
        return self.inner.network

    def identity_tensors(self) -> List[torch.Tensor]:
        return self.inner.identity_tensors()

    def discrete_schedule(self) -> Optional[dict]:
        return self.inner.discrete_schedule()

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
                      need_uncond: bool = True, distilled_guidance: Optional[float] = None,
                      **options) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """``(cond, uncond)`` conditioning dicts for ``sample(cond=...)`` and
        ``ClassifierFreeGuidance(uncond=...)``, from the pipeline's own ``encode_prompt``.

        ``prompt`` is a string or a list (one sample per prompt and per ``num_images_per_prompt``,
        in the pipelines' order); ``negative_prompt`` defaults to the empty prompt, as in diffusers.
        ``uncond`` is None when ``need_uncond=False`` (no guidance).  ``options`` go to the
        pipeline's ``encode_prompt`` as they are (e.g. ``clip_skip=2``, SD3's and Flux's
        ``max_sequence_length=``), except SDXL's size conditioning (``original_size=``,
        ``crops_coords_top_left=``, ``target_size=``).  ``distilled_guidance`` is the guidance
        input of guidance-distilled Flux models (default 3.5), refused elsewhere."""
        if prompt is None:
            raise ValueError("this model is text-conditioned: give a prompt (\"\" for the empty prompt)")
        if not isinstance(prompt, str) and not (isinstance(prompt, (list, tuple)) and all(isinstance(p, str) for p in prompt)):
            raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        encode = getattr(self.pipe, "encode_prompt", None)
        if encode is None:
            raise ValueError(f"{type(self.pipe).__name__} has no encode_prompt method")
        guided = self.is_flux and self.inner.guidance_embeds
        if distilled_guidance is not None and not guided:
            raise ValueError("distilled_guidance is the guidance input of guidance-distilled Flux models; this model "
                             "has none (use classifier-free guidance)")
        size = {k: options.pop(k) for k in SIZE_OPTIONS if k in options}
        if size and not self.is_sdxl:
            raise ValueError(f"{', '.join(size)}: size conditioning is SDXL's; this model has none")
        if self.is_flux:
            extra = {"guidance": float(FLUX_DEFAULT_GUIDANCE if distilled_guidance is None else distilled_guidance)} \
                if guided else {}
            return self._encode_flux(encode, prompt, negative_prompt, int(num_images_per_prompt), need_uncond, extra,
                                     options)
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
        elif len(out) == 4 and self.is_sdxl:
            embeds, negative, pooled, negative_pooled = out
            time_ids = self.time_ids(pooled, **size).repeat(embeds.shape[0], 1)
            cond = {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
            uncond = {"encoder_hidden_states": negative,
                      "added_cond_kwargs": {"text_embeds": negative_pooled, "time_ids": time_ids}} if need_uncond else None
        else:
            raise NotImplementedError(f"{type(self.pipe).__name__}.encode_prompt returns {len(out)} values; "
                                      "only SD-style (2), SDXL- and SD3-style (4) and Flux prompt encoders are supported")
        return cond, uncond

    def time_ids(self, pooled: torch.Tensor, original_size=None, crops_coords_top_left=(0, 0),
                 target_size=None) -> torch.Tensor:
        """SDXL's size conditioning, one row ``original_size + crops_coords_top_left + target_size``."""
        size = (self.height, self.width)
        row = [*(original_size or size), *crops_coords_top_left, *(target_size or size)]
        config = self.pipe.unet.config
        pooled_dim = int(self.pipe.text_encoder_2.config.projection_dim) if _has(self.pipe, "text_encoder_2") \
            else int(pooled.shape[-1])
        expected = config.get("projection_class_embeddings_input_dim")
        if len(row) != 6 or expected != config.get("addition_time_embed_dim") * len(row) + pooled_dim:
            raise ValueError(f"this UNet expects {expected} size + pooled-text features, not the 6 size numbers x "
                             f"{config.get('addition_time_embed_dim')} + {pooled_dim} of SDXL text-to-image "
                             "(refiner-style aesthetic-score conditioning is not supported)")
        return torch.tensor([row], dtype=pooled.dtype, device=pooled.device)

    def _encode_flux(self, encode, prompt, negative_prompt, n: int, need_uncond: bool, extra: Dict[str, Any],
                     options: Dict[str, Any]) -> Tuple[Dict[str, Any], Optional[Dict[str, Any]]]:
        """FluxPipeline.encode_prompt (no negative prompt of its own): once for the prompt, once for the
        negative prompt (default ``""``) when the unconditional half is needed."""
        def one(text):
            with torch.no_grad():
                embeds, pooled, _ = encode(prompt=text, prompt_2=None, device=self.device, num_images_per_prompt=n,
                                           **options)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled, **extra}

        cond = one(prompt)
        if not need_uncond:
            return cond, None
        batch = 1 if isinstance(prompt, str) else len(prompt)
        negative = "" if negative_prompt is None else negative_prompt
        if isinstance(negative, str):
            negative = [negative] * batch
        if len(negative) != batch:
            raise ValueError(f"{len(negative)} negative prompts for {batch} prompts")
        return cond, one(list(negative))

    # -- images --------------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (batch, *shape) -> images (batch, 3, height, width) in [-1, 1] through the VAE."""
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"latents must have shape (batch, {self.latent_channels}, h, w), got {got}")
        z = latents.to(self.vae.dtype)
        if self.latents_mean is not None:
            view = (1, -1, 1, 1)
            mean = torch.tensor(self.latents_mean, dtype=z.dtype, device=z.device).view(view)
            std = torch.tensor(self.latents_std, dtype=z.dtype, device=z.device).view(view)
            z = z * std / self.scaling_factor + mean
        else:
            z = z / self.scaling_factor
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
