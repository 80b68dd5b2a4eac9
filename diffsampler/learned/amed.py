"""AMED (Zhou et al., "Fast ODE-based Sampling for Diffusion Models in Around 5 Steps", CVPR 2024)
as a learned sampler: a tiny predictor of each step's intermediate time.

The step rule is :class:`diffsampler.solvers.amed.AMED` (AMED-Solver, or AMED-Plugin on ``euler``,
``ipndm``, ``dpmpp`` or ``dpm2``); here its fixed ``r`` is replaced, per sample and per step, by a
prediction from the model's bottleneck feature of the evaluation at ``sigma_i`` (see
:mod:`diffsampler.models.features`; the sampler's :attr:`reads`) and the two times:

    inputs  = [sign(f) log(1 + |f|),  log(sigma_i) / 4,  log(sigma_next) / 4]
    o       = MLP(inputs)             (two SiLU hidden layers, zero-initialised output layer)
    r       = sigmoid(o_0),  s_dir = 1 + c_dir tanh(o_1),  s_time = 1 + c_time tanh(o_2)

Neutral parameters (the zero output layer) give r = 0.5 and unit scales: exactly the untrained
``amed`` solver (= ``dpm2`` for AMED-Solver).  Odd NFE: the paper's AFS (default), or
``plain_first`` (step 0 without an intermediate point; better where the data mean is far from 0).
Trained step by step against a DPM-Solver-2 teacher with at least 8 steps (``targets="steps"``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import torch
from torch import nn

from ..models.features import find_feature_module
from ..plan import make_plan
from ..schedules import Schedule, resolve
from ..solvers import get_solver
from ..solvers.amed import AMED, PLUGIN_BASES
from .base import LearnedSampler
from .registry import LEGACY_FORMATS, register_learned

STUDENTS = ("amed",) + PLUGIN_BASES


def _log_sigma(sigma, batch: int, device) -> torch.Tensor:
    """log(sigma) / 4 as a (batch,) float32 input, from a float or a per-sample tensor."""
    value = (torch.as_tensor(sigma, dtype=torch.float64).detach().log() / 4).to(device=device, dtype=torch.float32)
    value = value.reshape(-1)
    return value.expand(batch) if value.numel() == 1 else value.reshape(batch)


@dataclass
class PredictedAMED(AMED):
    """The AMED step rule with the intermediate time (and scales) from a trained predictor."""

    predictor: Optional[Any] = None

    def intermediate(self, evaluate, x, denoised, sigma, sigma_next):
        r, scale_dir, scale_time = self.predictor(evaluate.features(x, denoised), sigma, sigma_next)
        view = (-1,) + (1,) * (x.ndim - 1)
        return tuple(v.to(x.dtype).reshape(view) for v in (r, scale_dir, scale_time))


@register_learned("amed")
class AMEDSampler(LearnedSampler):
    summary = "AMED: a learned intermediate time per step (AMED-Solver, or AMED-Plugin on euler/ipndm/dpmpp/dpm2)"
    targets = "steps"
    default_teacher = "dpm2"
    min_teacher_steps = 8
    default_val_images = 64              # what its benchmark tables were measured with
    default_solver = "amed"

    def __init__(self, feature_dim: int, feature_source: str, hidden: int = 64, scale_dir: float = 0.0,
                 scale_time: float = 0.0, settings: Optional[dict] = None):
        super().__init__(settings or {})
        for name, c in (("scale_dir", scale_dir), ("scale_time", scale_time)):
            if not 0 <= c < 1:
                raise ValueError(f"{name} must lie in [0, 1) (scales are bounded in [1 - c, 1 + c]), got {c}")
        self.feature_dim, self.feature_source, self.hidden = int(feature_dim), feature_source, int(hidden)
        self.scale_dir, self.scale_time = float(scale_dir), float(scale_time)
        self.net = nn.Sequential(nn.Linear(self.feature_dim + 2, hidden), nn.SiLU(),
                                 nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    @property
    def reads(self) -> str:
        return self.feature_source

    def forward(self, features: torch.Tensor, sigma, sigma_next) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(r, s_dir, s_time), each of shape (batch,)."""
        batch, device = features.shape[0], self.net[0].weight.device
        features = features.to(device=device, dtype=torch.float32)
        inputs = torch.cat([features.sign() * features.abs().log1p(),
                            _log_sigma(sigma, batch, device)[:, None],
                            _log_sigma(sigma_next, batch, device)[:, None]], dim=1)
        out = self.net(inputs)
        r = torch.sigmoid(out[:, 0])
        return r, 1 + self.scale_dir * torch.tanh(out[:, 1]), 1 + self.scale_time * torch.tanh(out[:, 2])

    def step_rule(self) -> PredictedAMED:
        base = self.settings.get("solver", "amed")
        return PredictedAMED(base=None if base == "amed" else base, predictor=self,
                             plain_first=bool(self.settings.get("plain_first", False)))

    def solver(self) -> PredictedAMED:          # the name of the first version
        return self.step_rule()

    @property
    def sigmas(self) -> Tuple[float, ...]:
        return self.grid()

    def describe(self) -> str:
        return f"features from {self.feature_source!r} ({self.feature_dim})"

    def config(self):
        return {"feature_dim": self.feature_dim, "feature_source": self.feature_source, "hidden": self.hidden,
                "scale_dir": self.scale_dir, "scale_time": self.scale_time}

    def sampling_request(self, denoiser, sample_shape, solver=None, nfe=None, schedule=None, sigmas=None, afs=None):
        """(solver, sigmas, afs), as the first version returned them; a conflicting request is refused."""
        plan = self.plan(denoiser, sample_shape, solver=solver, nfe=nfe, schedule=schedule, sigmas=sigmas, afs=afs)
        return plan.solver, plan.sigmas, plan.afs

    @classmethod
    def create(cls, model, shape: Sequence[int], *, nfe: Optional[int], solver="amed", afs: Optional[bool] = None,
               plain_first: bool = False, schedule=None, schedule_options: Optional[dict] = None,
               sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, feature_module: Optional[str] = None,
               hidden: int = 64, scale_dir: float = 0.0, scale_time: float = 0.0, cond=None, first_seed: int = 0,
               dtype=torch.float32, device="cpu", **settings) -> "AMEDSampler":
        """Neutral predictor for AMED-Solver (``solver="amed"``) or AMED-Plugin on ``solver`` at
        ``nfe``.  ``afs`` defaults to "whenever the NFE needs it" (odd NFE), as in the paper, unless
        ``plain_first``; ``schedule`` may be a name or a schedule file made for solver ``amed``."""
        if solver not in STUDENTS:
            raise ValueError(f"AMED trains for solver 'amed' (AMED-Solver) or a plugin base; got {solver!r}, "
                             f"valid: {', '.join(STUDENTS)}")
        rule = get_solver("amed", base=None if solver == "amed" else solver, plain_first=plain_first)
        fixed = resolve(schedule, schedule_options)[0] if schedule is not None else None
        if afs is None and fixed is None:          # AFS whenever the NFE needs it (never with plain_first)
            afs = not plain_first and nfe is not None and nfe not in rule.valid_nfes(False, up_to=nfe + 1)
        plan = make_plan(rule, nfe if fixed is None else None, fixed if fixed is not None else schedule,
                         schedule_options=None if fixed is not None else schedule_options, sigma_min=sigma_min,
                         sigma_max=sigma_max, afs=afs, model=model, shape=shape)
        how = " --option plain_first=true" if plain_first else " --afs" if plan.afs else ""
        if nfe is not None and plan.nfe != nfe:
            raise ValueError(f"the schedule has {plan.steps} steps, which cost {plan.nfe} evaluations with AMED "
                             f"({rule.nfe_rule()}{', AFS' if plan.afs else ''}), not nfe={nfe}: make the schedule "
                             f"for solver 'amed' (diffsampler schedule gits --solver amed --nfe {nfe}{how})")
        source, _ = find_feature_module(model, feature_module)
        feature_dim = _probe_feature_dim(model, shape, source, plan.sigmas[1], cond, first_seed, dtype, device)
        schedule_info = fixed.info if isinstance(fixed, Schedule) else str(schedule) if schedule is not None \
            else rule.default_schedule
        settings = {**settings, "solver": solver, "nfe": plan.nfe, "afs": plan.afs, "plain_first": bool(plain_first),
                    "sigmas": list(plan.sigmas), "schedule": schedule_info, "shape": list(shape)}
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(first_seed)
            return cls(feature_dim, source, hidden, scale_dir, scale_time, settings).to(device)


@torch.no_grad()
def _probe_feature_dim(model, shape, source, sigma, cond, first_seed, dtype, device) -> int:
    """The number of features the model gives at ``source`` (one evaluation on one batch)."""
    from ..models.features import FeatureTap
    from ..seeds import seed_noise
    seeds = list(range(first_seed, first_seed + 2))
    noise = seed_noise(seeds, tuple(shape), dtype=dtype, device=device)
    batch_cond = cond(seeds) if cond is not None else None
    with FeatureTap(model, source, None) as tap:
        out = model(noise * sigma, torch.full((2,), sigma, dtype=dtype, device=device), **(batch_cond or {}))
        return tap.take(noise, out).shape[1]


def _first_format(blob) -> AMEDSampler:
    """AMED predictor files of the first version (format ``diffsampler-amed/1``)."""
    sampler = AMEDSampler(settings=blob["settings"], **blob["config"])
    sampler.load_state_dict(blob["state_dict"])
    return sampler


LEGACY_FORMATS["diffsampler-amed/1"] = _first_format
