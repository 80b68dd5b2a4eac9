"""``solver="auto"``: the base a learned sampler starts from, chosen by measurement.

Which untrained configuration is best depends on the model (measured: iPNDM_v with the legacy
weights on a time-quadratic grid with AFS on one mixture, UniPC on a logSNR grid on another, no
AFS on the bundled Fashion-MNIST model, whose data mean is far from AFS's zero guess).  A learned
sampler trained on a poor base loses to the best untrained configuration however well it
trains, so ``auto`` sweeps the bases the method accepts (every one-evaluation solver and the
variants users meet elsewhere x {polynomial, logSNR, time-quadratic} x {AFS off, on}) on the
validation seeds, against an accurate teacher's endpoints, at the method's own NFE rule, and
takes the most accurate.  The teacher is DPM-Solver++ on 40 polynomial steps; the seeds are the
validation seeds (never the training seeds, never the seeds results are reported on).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..loop import run_plan
from ..plan import make_plan
from ..seeds import seed_noise

SCHEDULES = (("polynomial", {"rho": 7.0}), ("logsnr", {}), ("time_uniform", {"rho": 2.0}))
# The solvers whose option variants users meet elsewhere, each variant spelled out, so a changed
# default neither drops one nor tries one twice (the benchmarks sweep the same variants).
OPTION_VARIANTS = {"ipndm_v": ({"legacy": True}, {"legacy": False}),
                   "dpmpp": ({"legacy_third_order": True}, {"legacy_third_order": False})}
BASE_SOLVERS = ("ipndm", "ipndm_v", "deis", "dpmpp", "unipc", "euler")
BASES = tuple((name, dict(options)) for name in BASE_SOLVERS for options in OPTION_VARIANTS.get(name, ({},)))


def candidates(accepts: Optional[Sequence[str]]) -> List[Dict[str, Any]]:
    """The base requests ``auto`` tries (``learn`` keyword arguments)."""
    out = []
    for solver, options in BASES:
        if accepts is not None and solver not in accepts:
            continue
        for schedule, schedule_options in SCHEDULES:
            for afs in (False, True):
                out.append(dict(solver=solver, schedule=schedule, schedule_options=dict(schedule_options) or None,
                                afs=afs, **options))
    return out


@torch.no_grad()
def choose_base(cls, denoiser, shape: Sequence[int], nfe: int, *, cond=None, seeds: Sequence[int], dtype=torch.float32,
                device="cpu", log=None) -> Tuple[Dict[str, Any], List[Tuple[float, Dict[str, Any]]]]:
    """(the most accurate base request, every (RMSE, request) tried) for learned sampler ``cls``."""
    noise = seed_noise(list(seeds), tuple(shape), dtype=dtype, device=device)
    batch_cond = cond(list(seeds)) if cond is not None else None
    teacher = make_plan("dpmpp", steps=40, schedule="polynomial", model=denoiser, shape=shape)
    target = run_plan(teacher, denoiser, noise, cond=batch_cond).samples.to(torch.float64)
    tried = []
    for request in candidates(cls.accepts):
        try:
            neutral = cls.create(denoiser, shape, nfe=nfe, cond=cond, dtype=dtype, device=device, **request)
        except ValueError:                        # this NFE is not reachable with this base and AFS setting
            continue
        out = run_plan(neutral.plan(denoiser, shape), denoiser, noise, cond=batch_cond).samples.to(torch.float64)
        value = float((out - target).flatten(1).pow(2).mean(1).sqrt().mean())
        if value == value:
            tried.append((value, request))
    if not tried:
        raise ValueError(f"no base solver reaches nfe={nfe} for {cls.method}")
    tried.sort(key=lambda t: t[0])
    if log is not None:
        log(f"auto base: {tried[0][1]} (validation RMSE {tried[0][0]:.4g}, {len(tried)} tried)")
    return tried[0][1], tried
