"""Learned samplers: a few numbers trained against a teacher that change how a base solver walks
its grid (protocol: :mod:`.base`; training: :mod:`.distill`; one file per method).

    learned = learn("amed", denoiser, shape, nfe=5, solver="ipndm")
    learned.save("amed-ipndm5.pt"); learned = load_learned("amed-ipndm5.pt")
    result = sample(denoiser, noise, learned=learned)              # result.nfe == 5

Methods: ``amed`` (learned intermediate times), ``ld3`` (a learned grid), ``s4s`` (a learned grid
and per-step solver coefficients), ``pas`` (a learned direction correction in the trajectory's own
basis), ``epd`` (learned parallel directions).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..models.identity import guidance_scale, model_fingerprint
from . import amed, epd, ld3, pas, s4s  # noqa: F401  (registration)
from .base import LearnedSampler
from .distill import CONFIRM_SEEDS, TRAIN_SEEDS, VAL_SEEDS, distill
from .select import choose_base
from .registry import LEARNED, learned_class, load_learned, register_learned

__all__ = ["learn", "load_learned", "distill", "LearnedSampler", "LEARNED", "register_learned"]


def learn(method: str, denoiser, shape: Optional[Sequence[int]] = None, nfe: Optional[int] = None, solver=None, *,
          cond=None, model_name: Optional[str] = None, teacher: Optional[str] = None,
          teacher_options: Optional[dict] = None, M: Optional[int] = None, batch: int = 32, iters: Optional[int] = None,
          train_images: Optional[int] = None, lr: Optional[float] = None, first_seed: int = TRAIN_SEEDS,
          val_images: Optional[int] = None, val_seed: int = VAL_SEEDS, val_every: Optional[int] = None,
          confirm_images: Optional[int] = None, confirm_seed: int = CONFIRM_SEEDS, loss: str = "l2",
          through: bool = False, dtype=torch.float32, device="cpu", progress: bool = False, log=None,
          auto_images: int = 32, **options) -> LearnedSampler:
    """Train learned sampler ``method`` at ``nfe`` on ``denoiser`` (any Denoiser or plain callable
    with ``shape``); ``solver`` is its base solver (``"auto"``, the default of ld3, s4s, pas and
    epd: the most accurate base on ``auto_images`` validation seeds, :mod:`.select`); ``options``
    are the method's own (see its ``create``: schedule, AFS, solver options, ...), the rest are
    :func:`~.distill.distill`'s.  ``cond`` maps a list of seeds to that batch's conditioning (e.g.
    random class labels)."""
    cls = learned_class(method)
    shape = tuple(shape if shape is not None else denoiser.shape)
    solver = solver if solver is not None else cls.default_solver
    choice = None
    if solver == "auto":                 # the base chosen by measurement on validation seeds (.select)
        if set(options) & {"schedule", "schedule_options", "afs"}:
            raise ValueError("solver='auto' chooses the schedule and AFS too: give a solver to set them")
        request, tried = choose_base(cls, denoiser, shape, nfe, cond=cond, dtype=dtype, device=device,
                                     seeds=range(val_seed, val_seed + auto_images))
        options = {**request, **options}
        solver = options.pop("solver")
        choice = {"rule": "auto", "chosen": request, "validation_rmse": tried[0][0], "tried": len(tried),
                  "untrained_best_rmse_on": f"seeds {val_seed}-{val_seed + auto_images - 1}"}
    sampler = cls.create(denoiser, shape, nfe=nfe, solver=solver, cond=cond, first_seed=first_seed, dtype=dtype,
                         device=device, **options)
    if choice is not None:
        sampler.settings["base_choice"] = choice
    sampler.settings.update({"method": method, "model": model_name, "model_fingerprint": model_fingerprint(denoiser),
                             "shape": list(shape), "guidance": guidance_scale(denoiser)})
    return distill(sampler, denoiser, shape, cond=cond, teacher=teacher, teacher_options=teacher_options, M=M,
                   batch=batch, iters=iters if iters is not None else cls.default_iters,
                   train_images=train_images if train_images is not None else cls.default_train_images,
                   lr=lr if lr is not None else cls.default_lr, first_seed=first_seed, val_images=val_images,
                   val_seed=val_seed, val_every=val_every, confirm_images=confirm_images, confirm_seed=confirm_seed,
                   loss=loss, through=through, dtype=dtype, device=device,
                   progress=progress, log=log)
