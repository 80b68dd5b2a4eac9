"""What the commands do once their arguments are parsed: devices, processes, models,
conditioning, plans, run records and errors.  (Imported inside command bodies: it loads torch.)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, List, Optional, Tuple

import click
import torch

from .. import __version__
from ..distributed import join_process_group
from ..generate import one_hot_labels, seed_labels
from ..models import specs
from ..models.base import Denoiser
from ..models.bundled import BundledModelError
from ..models.identity import model_fingerprint, weights_hash
from ..plan import Plan, make_plan
from .options import parse_options, parse_sigmas

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


@contextmanager
def user_errors():
    """Errors caused by what the user asked become one clear line (exit 2), never a traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError, NotImplementedError, BundledModelError) as err:
        raise click.UsageError(str(err)) from None


def check_device(device: str) -> str:
    """Refuse, with a message, a device string torch cannot parse or a device this machine lacks."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device: use cpu, cuda, cuda:N or mps") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {device}: this machine has no CUDA GPU that torch can use "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered 0..{torch.cuda.device_count() - 1}")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}: Apple MPS is not available on this machine; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"--device {device}: diffsampler runs on cpu, cuda or mps devices")
    return device


def init_distributed(device: str) -> str:
    """Check ``device``, then under torchrun join the process group; return this rank's device."""
    return join_process_group(check_device(device))


def load_on_device(spec: str, device: str, dtype: str = "float32", trust_pickle: bool = False,
                   height: Optional[int] = None, width: Optional[int] = None) -> Denoiser:
    """The model a spec names, on ``device``, before anything is built from it (prompt embeddings
    are computed where the pipeline runs; guidance wraps the moved model); ``height`` / ``width``
    resize a latent pipeline's images (--height / --width)."""
    denoiser = specs.load_model(spec, dtype=DTYPES[dtype], trust_pickle=trust_pickle)
    if height is not None or width is not None:
        try:
            denoiser = denoiser.resized(height, width)
        except ValueError as err:
            raise ValueError(f"--height/--width on model {spec!r}: {err}") from None
    if not isinstance(denoiser, Denoiser) or denoiser.shape is None:
        raise ValueError(f"model {spec!r} does not declare its sample shape")
    return denoiser.to(device) if device != "cpu" else denoiser


def _repeat_rows(cond, n):
    """Conditioning computed once (batch 1) repeated for a batch of n."""
    if isinstance(cond, dict):
        return {k: _repeat_rows(v, n) for k, v in cond.items()}
    if isinstance(cond, torch.Tensor) and cond.ndim and cond.shape[0] == 1:
        return cond.expand(n, *cond.shape[1:])
    return cond


class Conditioning:
    """How one run conditions its model: ``cond(seeds)`` gives a batch's model inputs and
    ``labels(seeds)`` its class labels (None for models without classes); ``record`` describes it."""

    def __init__(self, inputs: Optional[Callable[[List[int]], Dict[str, Any]]], labels, record: Dict[str, Any]):
        self.inputs, self._labels, self.record = inputs, labels, record

    def __call__(self, seeds: List[int]):
        return self.inputs(seeds) if self.inputs is not None else None

    def labels(self, seeds: List[int]) -> Optional[List[int]]:
        return self._labels(seeds).tolist() if self._labels is not None else None


def conditioning(denoiser: Denoiser, class_label: Optional[int] = None, prompt: Optional[str] = None,
                 negative_prompt: Optional[str] = None, guidance: float = 1.0) -> Tuple[Denoiser, Conditioning]:
    """(denoiser, conditioning) for the conditioning the model declares (``denoiser.conditioning``).

    Text models take --prompt / --negative-prompt; class-conditional models take --class (default:
    a random class per seed, drawn from the seed); --guidance wraps the model in classifier-free
    guidance (one batched cond/uncond model call per evaluation)."""
    from ..models.guidance import ClassifierFreeGuidance
    kind = denoiser.conditioning
    record = {"kind": kind, "class": class_label, "prompt": prompt, "negative_prompt": negative_prompt,
              "guidance": float(guidance)}
    if guidance < 0:
        raise ValueError(f"--guidance must be >= 0 (1 = no guidance, 0 = unconditional), got {guidance:g}")
    if prompt is not None and kind != "text":
        raise ValueError("--prompt was given but this model is not text-conditioned")
    if negative_prompt is not None and kind != "text":
        raise ValueError("--negative-prompt was given but this model is not text-conditioned")
    if class_label is not None and kind != "class":
        raise ValueError("--class was given but this model " + ("is text-conditioned: give --prompt" if kind == "text"
                                                               else "is unconditional (it takes no class labels)"))
    if kind == "text":
        if prompt is None:
            raise ValueError("this model is text-conditioned: give --prompt")
        cond_once, uncond_once = denoiser.encode_prompt(prompt, negative_prompt, need_uncond=guidance != 1)
        inputs = lambda seeds: _repeat_rows(cond_once, len(seeds))
        if guidance != 1:
            denoiser = ClassifierFreeGuidance(denoiser, guidance, uncond=lambda c: _repeat_rows(
                uncond_once, next(iter(c.values())).shape[0]))
        return denoiser, Conditioning(inputs, None, record)
    if kind == "class":
        num_classes = denoiser.num_classes
        if class_label is not None and not 0 <= class_label < num_classes:
            raise ValueError(f"class index out of range: the model has classes 0..{num_classes - 1}, got {class_label}")
        record["labels"] = "random per seed" if class_label is None else f"all {class_label}"

        def labels(seeds):
            return torch.full((len(seeds),), class_label) if class_label is not None else seed_labels(seeds, num_classes)

        def inputs(seeds):
            return {"class_labels": one_hot_labels(labels(seeds), num_classes)}
        if guidance != 1:
            denoiser = ClassifierFreeGuidance(denoiser, guidance)
        return denoiser, Conditioning(inputs, labels, record)
    if guidance != 1:
        raise ValueError("--guidance needs a conditional model (class labels or a prompt)")
    return denoiser, Conditioning(None, None, record)


def plan_from_options(model: Denoiser, *, solver=None, nfe=None, steps=None, schedule=None, schedule_option=(),
                      sigmas=None, sigma_min=None, sigma_max=None, max_order=None, solver_option=(), afs=None,
                      denoise_to_zero=False, learned_path=None, amed_path=None, default_nfe: Optional[int] = None,
                      device="cpu") -> Plan:
    """The plan of a command's request options (the one function every command builds plans with)."""
    options = parse_options(solver_option, "--option")
    if max_order is not None:
        options["max_order"] = max_order
    if learned_path is not None and amed_path is not None:
        raise ValueError("give --learned or --amed (the same thing), not both")
    learned = learned_path if learned_path is not None else amed_path
    if learned is not None:
        from ..learned import load_learned
        learned = load_learned(learned, device=device)
    plan = make_plan(solver, nfe, schedule, sigmas=parse_sigmas(sigmas),
                     schedule_options=parse_options(schedule_option, "--schedule-option") or None,
                     sigma_min=sigma_min, sigma_max=sigma_max, afs=afs, denoise_to_zero=denoise_to_zero, steps=steps,
                     learned=learned, model=model, default_nfe=None if learned is not None else default_nfe,
                     **options)
    for note in plan.warnings:
        click.echo(f"warning: {note}", err=True)
    return plan


def run_settings(spec: str, denoiser: Denoiser, plan: Plan, cond: Conditioning, dtype: str, device: str,
                 seeds_text: str) -> Dict[str, Any]:
    """A run folder's settings.json: the plan's record, the model's identity and the conditioning
    (together: what determines the images), then the seeds and the version."""
    size = denoiser.image_size()
    size = {"image_size": list(size)} if size is not None else {}
    return {"model": spec, **size, "weights_hash": weights_hash(denoiser), "model_fingerprint": model_fingerprint(denoiser),
            **plan.record, "conditioning": cond.record, "dtype": dtype, "device_type": torch.device(device).type,
            "seeds": seeds_text, "diffsampler_version": __version__}


# The settings that determine a run's images: a rerun may reuse images only if these are equal.
IMAGE_SETTINGS = ("model", "image_size", "weights_hash", "solver", "sigmas", "afs", "denoise_to_zero", "learned", "conditioning",
                  "dtype", "device_type")
