"""The learned-sampler protocol: a few trained numbers that change how a base solver walks its grid.

A learned sampler is a ``torch.nn.Module`` whose parameters, at their *neutral* values, reproduce
its base solver exactly (the tests check it).  What one method file provides:

* **to a plan** (:meth:`LearnedSampler.plan`): the step rule (:meth:`step_rule`, a Solver that
  uses the parameters), the grid (:meth:`grid`: the base grid, or a learned one, differentiable in
  training) and the AFS setting; and what it reads from the model besides its output
  (:attr:`reads`: a feature module, see :mod:`diffsampler.models.features`, or None; and
  :attr:`feature_dim`, how many numbers it reads, so an evaluation that makes no model call, the
  analytical first step, can stand in the zero feature of that size).
* **to distillation** (:mod:`.distill`): :attr:`targets` (``"steps"``: the teacher's states at the
  end of every student step, on a fixed grid; ``"endpoint"``: its final sample, for methods that
  move the grid) and the teacher it is compared with by default.
* **construction** (:meth:`create`): from a request (model, shape, NFE, base solver, schedule,
  options), with parameters at their neutral values.

Files (:meth:`save`, :func:`load_learned`) hold the method, its constructor config, the weights and
``settings``: everything sampling needs, and the model (fingerprint), shape, NFE, guidance and
conditioning it was made for; :meth:`plan` refuses, with a message, any other model or request.
"""
from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, ClassVar, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..fileio import write_atomic
from ..models.identity import guidance_scale, model_fingerprint
from ..plan import Plan, solver_record
from ..solvers import Solver

FORMAT = "diffsampler-learned/1"


class LearnedSampler(nn.Module):
    """Base class of the learned samplers; subclasses register with :func:`~.registry.register_learned`."""

    method: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    targets: ClassVar[str] = "steps"
    default_teacher: ClassVar[str] = "dpmpp"
    # The teacher must be far more accurate than the student: with 24 steps its own endpoint error was
    # up to 37% of an NFE 3-6 base's on the analytic mixtures, 48 steps cut it 5x or more, and gave 4% lower
    # learned error over 64 cells (evaluation/learned_training_defaults.py, on selection seeds).
    min_teacher_steps: ClassVar[int] = 48
    default_solver: ClassVar[str] = "ipndm"
    default_iters: ClassVar[int] = 40
    default_lr: ClassVar[float] = 1e-2
    default_train_images: ClassVar[Optional[int]] = None      # None: every batch fresh
    # Validation seeds: rare seeds that land in another mixture mode dominate the mean error, and 64
    # seeds missed them (a PAS run 1.6x worse than its base on other seeds); 256 halved such losses.
    default_val_images: ClassVar[int] = 256
    # Fresh seeds on which the chosen iterate must again beat the base (0: no second test; see .distill).
    default_confirm_images: ClassVar[int] = 0
    accepts: ClassVar[Optional[Tuple[str, ...]]] = None         # base solvers it can start from (None: any)
    reads: Optional[str] = None
    feature_dim: Optional[int] = None

    def __init__(self, settings: Dict[str, Any]):
        super().__init__()
        self.settings: Dict[str, Any] = dict(settings)

    # --- what a plan gets --------------------------------------------------------------------------
    def step_rule(self) -> Solver:
        raise NotImplementedError

    def grid(self, differentiable: bool = False) -> Tuple[Any, ...]:
        """The grid it samples on: the base grid (floats) unless the method learns it."""
        return tuple(float(s) for s in self.settings["sigmas"])

    @property
    def afs(self) -> bool:
        return bool(self.settings.get("afs", False))

    @property
    def nfe(self) -> int:
        return int(self.settings["nfe"])

    def describe(self) -> str:
        """A few words on what was learned (printed by ``diffsampler learn``)."""
        return f"{sum(p.numel() for p in self.parameters())} parameters"

    def record(self) -> Dict[str, Any]:
        """What a plan (and so a run's settings.json) records of this sampler."""
        keep = ("solver", "solver_options", "nfe", "afs", "model", "model_fingerprint", "shape", "guidance",
                "train_seconds", "final_loss", "best_iteration", "base_choice")
        return {"method": self.method, **{k: self.settings.get(k) for k in keep if k in self.settings},
                "parameters_hash": self.parameters_hash()}

    def parameters_hash(self) -> str:
        """SHA-256 (16 hex digits) of the trained numbers: two files sample alike only if equal."""
        digest = hashlib.sha256()
        for name, value in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()[:16]

    def plan(self, model, shape: Optional[Sequence[int]] = None, *, solver=None, nfe: Optional[int] = None,
             schedule=None, sigmas=None, afs: Optional[bool] = None, differentiable: bool = False) -> Plan:
        """The plan this sampler runs on ``model``; a request that conflicts with it is refused."""
        self.check_model(model, shape)
        trained_solver = self.settings.get("solver")
        if solver is not None and solver not in (self.method, trained_solver):
            raise ValueError(f"this {self.method} sampler was trained for solver {trained_solver!r}, not {solver!r}")
        if nfe is not None and nfe != self.nfe:
            raise ValueError(f"this {self.method} sampler was trained for NFE {self.nfe}, not {nfe}: train one for "
                             f"that NFE (diffsampler learn {self.method} --nfe {nfe} ...)")
        if schedule is not None or sigmas is not None:
            raise ValueError(f"a {self.method} sampler brings its own grid (the one it was trained with); leave "
                             "schedule/sigmas out, or train on the schedule you want (--schedule FILE)")
        if afs is not None and bool(afs) != self.afs:
            raise ValueError(f"this {self.method} sampler was trained {'with' if self.afs else 'without'} AFS; "
                             f"sample {'with' if self.afs else 'without'} it")
        rule, grid = self.step_rule(), self.grid(differentiable)
        expected = rule.num_evals(len(grid) - 1, self.afs, False)
        record = {"solver": solver_record_of(rule), "schedule": {"learned": self.method},
                  "sigmas": [float(s.detach()) if isinstance(s, torch.Tensor) else float(s) for s in grid], "afs": self.afs, "denoise_to_zero": False, "nfe": expected,
                  "steps": len(grid) - 1, "learned": self.record()}
        return Plan(rule, grid, self.afs, False, expected, record, learned=self)

    def check_model(self, model, shape: Optional[Sequence[int]]) -> None:
        """Refuse a model, shape or guidance scale other than the ones it was trained for."""
        what, how = f"this {self.method} sampler", f"train one for this model (diffsampler learn {self.method} ...)"
        made_for = self.settings.get("shape")
        if made_for is not None and shape is not None and tuple(made_for) != tuple(shape):
            raise ValueError(f"{what} was trained for samples of shape {tuple(made_for)}, not {tuple(shape)}: {how}")
        trained_scale, scale = float(self.settings.get("guidance", 1.0)), guidance_scale(model)
        if trained_scale != scale:
            raise ValueError(f"{what} was trained with guidance {trained_scale:g}, not {scale:g}: sample with "
                             f"--guidance {trained_scale:g} (its trajectories depend on it)")
        fingerprint = self.settings.get("model_fingerprint")
        if fingerprint is not None and fingerprint != model_fingerprint(model):
            raise ValueError(f"{what} was trained for another model ({self.settings.get('model') or 'unnamed'}, "
                             f"fingerprint {fingerprint}); the given model's fingerprint is "
                             f"{model_fingerprint(model)}: {how}")

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def create(cls, model, shape: Sequence[int], *, nfe: Optional[int], solver, **options) -> "LearnedSampler":
        """A sampler with neutral parameters for this request (each method defines it)."""
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """Constructor arguments besides ``settings`` (what :func:`load_learned` rebuilds it from)."""
        return {}

    # --- files -------------------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        """Write method, config, settings and weights (atomic; loads with weights_only, no pickle code)."""
        buffer = io.BytesIO()
        state = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        torch.save({"format": FORMAT, "method": self.method, "config": self.config(), "settings": self.settings,
                    "state_dict": state}, buffer)
        write_atomic(path, buffer.getvalue())
        return Path(path)


def solver_record_of(rule: Solver) -> Dict[str, Any]:
    """A solver's record with its trained options (modules, tensors) left out."""
    record = solver_record(rule)
    return {k: v for k, v in record.items() if not isinstance(v, (nn.Module, torch.Tensor))}


def read_file(path: Union[str, Path]) -> Dict[str, Any]:
    """The contents of a learned-sampler file (or of an AMED predictor file of the first format)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no learned-sampler file at {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (a torch.save file or not: say which file)
        raise ValueError(f"{path} is not a learned-sampler file (torch.load failed: {err})") from None
    if not isinstance(blob, dict) or "format" not in blob:
        raise ValueError(f"{path} is not a learned-sampler file (expected format {FORMAT!r})")
    return blob
