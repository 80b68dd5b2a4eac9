"""AMED-Solver and AMED-Plugin (Zhou et al., CVPR 2024): the first version's names, kept for
existing code.  AMED now lives in the learned-sampler layer (:mod:`diffsampler.learned.amed`):

    predictor = diffsampler.amed.train(denoiser, shape, solver="amed", nfe=5)
    # = diffsampler.learn("amed", denoiser, shape, nfe=5, solver="amed")
    predictor.save("amed.pt")
    sample(denoiser, noise, amed=diffsampler.amed.load("amed.pt"))      # = learned=
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

from ..learned import learn, load_learned
from ..learned.amed import STUDENTS, AMEDSampler as Predictor
from ..learned.distill import TRAIN_SEEDS, refine, teacher_points
from ..models.identity import model_fingerprint

__all__ = ["Predictor", "load", "train", "refine", "teacher_points", "model_fingerprint", "STUDENTS"]


def train(denoiser, shape: Optional[Sequence[int]] = None, solver: str = "amed", nfe: Optional[int] = 5, *,
          afs: Optional[bool] = None, plain_first: bool = False, schedule=None, schedule_options: Optional[dict] = None,
          sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, teacher: str = "dpm2",
          M: Optional[int] = None, teacher_options: Optional[dict] = None, scale_dir: float = 0.0,
          scale_time: float = 0.0, hidden: int = 64, batch: int = 32, iters: int = 40, lr: float = 1e-2,
          first_seed: int = TRAIN_SEEDS, cond: Optional[Callable[[List[int]], dict]] = None,
          feature_module: Optional[str] = None, dtype=torch.float32, device="cpu", model_name: Optional[str] = None,
          progress: bool = False, log=None, through: bool = False, **distill_options) -> Predictor:
    """``learn("amed", ...)`` with the first version's arguments (``solver``: "amed" for
    AMED-Solver, or a plugin base: euler, ipndm, dpmpp, dpm2)."""
    return learn("amed", denoiser, shape, nfe, solver, afs=afs, plain_first=plain_first, schedule=schedule,
                 schedule_options=schedule_options, sigma_min=sigma_min, sigma_max=sigma_max, teacher=teacher, M=M,
                 teacher_options=teacher_options, scale_dir=scale_dir, scale_time=scale_time, hidden=hidden,
                 batch=batch, iters=iters, lr=lr, first_seed=first_seed, cond=cond, feature_module=feature_module,
                 dtype=dtype, device=device, model_name=model_name, progress=progress, log=log, through=through,
                 **distill_options)


def load(path: Union[str, Path], device="cpu") -> Predictor:
    """An AMED predictor file (either version)."""
    try:
        sampler = load_learned(path, device=device)
    except ValueError as err:
        raise ValueError(f"{path} is not an AMED predictor file ({err})") from None
    if not isinstance(sampler, Predictor):
        raise ValueError(f"{path} is not an AMED predictor file: it holds a {sampler.method!r} learned sampler")
    return sampler
