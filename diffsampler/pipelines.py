"""Run diffsampler's solvers on a loaded diffusers pipeline.

    import diffsampler.pipelines as dp
    out = dp.run(pipe, "a photo of a cat", solver="ipndm", nfe=8, guidance=7.5, seed=0)
    out.images[0].save("cat.png")          # PIL images; out.nfe == 8

Design: the pipeline is only a box of parts.  :func:`denoiser_for_pipeline` turns it into a
denoiser (:class:`~diffsampler.models.latent.LatentDiffusion` for text-to-image latent pipelines
such as Stable Diffusion 1/2, SDXL, SD3 and Flux, :class:`~diffsampler.models.diffusers_pixel.DiffusersDenoiser`
for pixel-space UNet pipelines such as DDPMPipeline / DDIMPipeline, unconditional or
class-conditional); conditioning comes from the pipeline's own prompt encoder; guidance is the
:class:`~diffsampler.models.guidance.ClassifierFreeGuidance` wrapper; the ODE is solved by
:func:`diffsampler.sample`, and the VAE decodes.  The pipeline's scheduler is never stepped: its
training schedule (``alphas_cumprod``, or a flow scheduler's T and shift) only defines the model.

What :func:`run` does, in order:

1. **Conditioning.**  ``prompt`` (str or list) for text models, encoded by the pipeline;
   ``negative_prompt`` is the unconditional prompt for guidance (default ``""``, as diffusers);
   ``prompt_options`` go to the pipeline's ``encode_prompt`` (``clip_skip``, ``max_sequence_length``;
   SDXL's size conditioning ``original_size``, ``crops_coords_top_left``, ``target_size``, which
   default to the image size as in the pipeline).  Guidance-distilled Flux models take their
   embedded guidance as ``distilled_guidance`` (FluxPipeline's ``guidance_scale``, default 3.5).
   ``class_labels`` (ints) for class-conditional UNets, one-hot encoded (an all-zero row is the
   unconditional input).  Each prompt / label gives ``num_images_per_prompt`` samples.
   A prompt for a model without text conditioning, labels for an unconditional model, or a label
   out of range raise ``ValueError``.
2. **Guidance.**  ``guidance`` is the CFG scale ``w``; default 7.5 for text prompts (1 for Flux,
   which is distilled: ``guidance != 1`` there is FluxPipeline's ``true_cfg_scale`` with the negative
   prompt), 1 (none)
   otherwise.  ``w = 1`` runs the conditional model alone.
3. **Grid.**  ``nfe`` (default 5) + ``schedule`` (default: the solver's own, on the model's sigma
   range) or an explicit VE ``sigmas`` grid, exactly as in :func:`diffsampler.sample`.
4. **Starting point: where the pipeline starts.**  The initial latents are standard normal *in
   the model's own space* at the first sigma, as in diffusers (``latents=`` takes the same tensor
   a pipeline's ``latents=`` would; ``generator=`` draws them as the pipeline would; ``seed=``
   draws each sample from its own seed, ``seed + i``, or a list).  In the VE parametrization that
   is ``x = latents / c(sigma_max)`` with ``c = 1/sqrt(1 + sigma^2)`` for VP models and
   ``c = 1/(1 + sigma)`` for flow models, i.e. ``sample()``'s ``noise = latents / (c sigma_max)``.
   So with the same grid, solver ``euler`` reproduces the pipeline's DDIM (or flow Euler) loop.
5. **Output.**  ``output_type="pil"`` (list of PIL images), ``"pt"`` (tensor in [-1, 1], shape
   (batch, 3, H, W)) or ``"latent"`` (the final latents, undecoded).  The final state decoded is
   the VE one (``x0 + sigma_min * n``), not the VP-scaled ``alpha * x`` a DDIM pipeline ends with.
   A pipeline's safety checker, if it has one, runs on decoded images as in diffusers.

**NFE** (``out.nfe``) counts guided denoiser evaluations, as everywhere in diffsampler; with
guidance ``w != 1`` each is one batched network forward of 2 x batch samples (conditional and
unconditional together), with ``w = 1`` one forward of batch samples.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from .models.base import Denoiser
from .models.diffusers_pixel import DiffusersDenoiser, dtype_keyword
from .models.flux import unpack
from .models.guidance import ClassifierFreeGuidance, one_hot
from .models.latent import LatentDiffusion, _has
from .plan import make_plan
from .sampling import sample
from .seeds import seed_noise

DEFAULT_NFE = 5
DEFAULT_TEXT_GUIDANCE = 7.5
OUTPUT_TYPES = ("pil", "pt", "latent")


@dataclass
class RunOutput:
    """What :func:`run` returns (``images`` as diffusers' pipeline outputs have them)."""

    images: Union[List[Any], torch.Tensor]   # PIL list, tensor in [-1, 1], or latents (output_type)
    latents: torch.Tensor                    # the final VE state (latents, or pixels for pixel models)
    nfe: int                                 # guided denoiser evaluations (= network forwards)
    sigmas: torch.Tensor                     # the grid used (float64, descending)
    nsfw_content_detected: Optional[List[bool]] = None


def load_pipeline(path: Union[str, Path], torch_dtype: Optional[torch.dtype] = None, device=None):
    """A saved diffusers pipeline from a local folder (``model_index.json``); never downloads."""
    path = Path(path)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved diffusers pipeline (no model_index.json); for a folder with only "
                                "unet/ and scheduler/ use DiffusersDenoiser.from_pretrained")
    from diffusers import DiffusionPipeline
    kwargs: Dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs[dtype_keyword()] = torch_dtype
    pipe = DiffusionPipeline.from_pretrained(path, **kwargs)
    if device is not None:
        pipe.to(device)
    return pipe


def denoiser_for_pipeline(pipe, height: Optional[int] = None, width: Optional[int] = None) -> Denoiser:
    """The denoiser of a pipeline: LatentDiffusion if it has a VAE, else a pixel-space
    DiffusersDenoiser (optionally at another image size)."""
    if _has(pipe, "vae"):
        return LatentDiffusion.from_pipeline(pipe, height=height, width=width)
    if not _has(pipe, "unet"):
        raise ValueError(f"{type(pipe).__name__} has neither a vae nor a unet: not a pipeline diffsampler can run "
                         "(pixel-space pipelines need unet + scheduler; latent ones unet/transformer + vae + text encoder)")
    den = DiffusersDenoiser.from_pipeline(pipe)
    if height is not None or width is not None:
        c, h, w = den.shape
        den.shape = (c, int(height or h), int(width or w))
    return den


def run(pipe, prompt: Union[None, str, Sequence[str]] = None, solver=None, nfe: Optional[int] = None, schedule=None, *,
        guidance: Optional[float] = None, negative_prompt: Union[None, str, Sequence[str]] = None,
        num_images_per_prompt: int = 1, seed: Union[None, int, Sequence[int]] = None,
        generator: Optional[torch.Generator] = None, latents: Optional[torch.Tensor] = None,
        height: Optional[int] = None, width: Optional[int] = None, class_labels: Optional[Sequence[int]] = None,
        sigmas: Optional[Sequence[float]] = None, schedule_options: Optional[dict] = None, afs: Optional[bool] = None,
        denoise_to_zero: bool = False, output_type: str = "pil", callback: Optional[Callable] = None,
        progress: bool = False, prompt_options: Optional[dict] = None, distilled_guidance: Optional[float] = None,
        learned=None, **solver_options) -> RunOutput:
    """Sample a diffusers pipeline with a diffsampler solver (see the module docstring).

    ``nfe`` defaults to 5 unless the grid is fixed (``sigmas=`` or a schedule file / Schedule);
    ``learned=`` (a learned-sampler file or object) brings its own solver and grid."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
    if int(num_images_per_prompt) < 1:
        raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
    n_per = int(num_images_per_prompt)
    model = denoiser_for_pipeline(pipe, height, width)
    text = isinstance(model, LatentDiffusion)
    num_classes = getattr(model, "num_classes", 0) if isinstance(model, DiffusersDenoiser) else 0

    # 1. conditioning
    cond: Dict[str, Any] = {}
    uncond: Optional[Dict[str, Any]] = None
    if text:
        if class_labels is not None:
            raise ValueError(f"{type(pipe).__name__} is text-conditioned: give a prompt, not class_labels")
        if prompt is None:
            raise ValueError(f"{type(pipe).__name__} is text-conditioned: give a prompt (\"\" for the empty prompt)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        batch = len(prompts) * n_per
        default = 1.0 if model.is_flux else DEFAULT_TEXT_GUIDANCE
        scale = default if guidance is None else float(guidance)
        cond, uncond = model.encode_prompt(prompt, negative_prompt, n_per, need_uncond=scale != 1.0,
                                           distilled_guidance=distilled_guidance, **(prompt_options or {}))
        if model.is_flux and latents is not None and latents.ndim == 3:
            latents = unpack(latents, *model.shape[1:])         # FluxPipeline's packed latents=
    else:
        if prompt is not None or negative_prompt is not None:
            raise ValueError(f"{type(pipe).__name__} has no text encoder: this model takes no prompt")
        if distilled_guidance is not None:
            raise ValueError("distilled_guidance is the guidance input of guidance-distilled Flux models; this model "
                             "has none")
        scale = 1.0 if guidance is None else float(guidance)
        if class_labels is not None:
            if num_classes == 0:
                raise ValueError(f"{type(pipe).__name__}'s model is not class-conditional: do not pass class_labels")
            labels = torch.as_tensor(list(class_labels) if not isinstance(class_labels, torch.Tensor) else class_labels)
            if labels.is_floating_point() or labels.ndim != 1:
                raise ValueError("class_labels must be a list of class indices")
            rows = one_hot(labels, num_classes).repeat_interleave(n_per, dim=0)
            batch = rows.shape[0]
            cond = {"class_labels": rows.to(device=model.device)}
        else:
            if num_classes and model.null_class_label is None:
                raise ValueError(f"this model is class-conditional ({num_classes} classes): pass class_labels")
            if scale != 1.0:
                raise ValueError("guidance needs a conditional model input (a prompt or class_labels)")
            batch = n_per

    den: Denoiser = model if scale == 1.0 else ClassifierFreeGuidance(model, scale, uncond=uncond)

    # 2. grid
    if isinstance(learned, (str, Path)):
        from .learned import load_learned
        learned = load_learned(learned, device=model.device)
    plan = make_plan(None if learned is not None else solver, nfe, schedule, sigmas=sigmas,
                     schedule_options=schedule_options, afs=afs, denoise_to_zero=denoise_to_zero, model=den,
                     default_nfe=None if learned is not None else DEFAULT_NFE, learned=learned, **solver_options)
    grid = plan.sigma_tensor()

    # 3. starting point, in the pipeline's convention (standard normal in the model's space)
    device, dtype = model.device, model.dtype
    shape = (batch, *model.shape)
    latents = _initial_latents(shape, latents, seed, generator, device, dtype)
    s0 = float(grid[0])
    # the solver state keeps at least float32 (the wrappers cast to a half-precision network's dtype)
    state_dtype = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    noise = latents.to(torch.float64 if device.type != "mps" else torch.float32)
    noise = (noise / (model.model_input_scale(s0).item() * s0)).to(state_dtype)

    # 4. solve
    with torch.no_grad():
        result = sample(den, noise, plan=plan, cond=cond, callback=callback, progress=progress)
        final = result.samples
        nsfw = None
        if output_type == "latent":
            images: Union[List[Any], torch.Tensor] = final
        else:
            pixels = model.decode(final) if text else final.clamp(-1, 1)
            if _has(pipe, "safety_checker"):
                pixels, nsfw = pipe.run_safety_checker(pixels, device, dtype)
            images = pixels if output_type == "pt" else to_pil(pixels)
    return RunOutput(images=images, latents=final, nfe=result.nfe, sigmas=result.sigmas, nsfw_content_detected=nsfw)


def _initial_latents(shape, latents, seed, generator, device, dtype) -> torch.Tensor:
    given = [name for name, v in (("latents", latents), ("seed", seed), ("generator", generator)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"give at most one of latents=, seed=, generator= (got {', '.join(given)})")
    if latents is not None:
        if tuple(latents.shape) != tuple(shape):
            raise ValueError(f"latents have shape {tuple(latents.shape)} but this run needs {tuple(shape)} "
                             "(batch, *model sample shape)")
        return latents.to(device=device, dtype=dtype)
    if seed is not None:
        seeds = [int(seed) + i for i in range(shape[0])] if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {shape[0]} samples")
        return seed_noise(seeds, tuple(shape[1:]), dtype=dtype, device=device)
    from diffusers.utils.torch_utils import randn_tensor
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def to_pil(images: torch.Tensor) -> List[Any]:
    """(batch, C, H, W) in [-1, 1] -> PIL images (RGB or L)."""
    from PIL import Image
    from .images import to_uint8
    pixels = to_uint8(images)
    return [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]
