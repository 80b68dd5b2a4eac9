"""``DiffSamplerScheduler``: diffsampler's solvers inside any diffusers pipeline.

    from diffsampler.integrations.diffusers import DiffSamplerScheduler
    pipe.scheduler = DiffSamplerScheduler.from_config(pipe.scheduler.config, solver="unipc")
    image = pipe("a cat", num_inference_steps=8).images[0]       # 8 model evaluations

**The model.**  The replaced scheduler's config says what the network predicts and on which
training schedule: ``prediction_type`` epsilon / sample / v_prediction with the DDPM-style betas
(``num_train_timesteps``, ``beta_schedule``, ...), or flow matching for the ``FlowMatch*``
schedulers (``shift``, dynamic shifting).  Each model output is turned into the denoised estimate
of diffsampler's contract (``x0`` in the VE parametrization ``x = x0 + sigma n``) with the same
formulas as :class:`~diffsampler.models.diffusers_pixel.DiffusersDenoiser` and
:class:`~diffsampler.models.flow.FlowDenoiser`, and timesteps are the model's own: the
log-sigma interpolated training timestep (VP), or ``t * num_train_timesteps`` (flow).

**The grid.**  In order of precedence:

1. ``sigmas=`` (VE sigmas; a trailing 0 asks for the final step to 0) or ``schedule=`` a schedule
   file / :class:`~diffsampler.schedules.Schedule` (GITS files made on the same model) given to
   ``from_config``: that grid, whatever the pipeline asks (a warning says when the pipeline asks
   for another number of evaluations);
2. ``sigmas`` the pipeline passes to ``set_timesteps`` (Flux always does; ``pipe(sigmas=...)``
   elsewhere), read as the replaced scheduler reads them: flow sigmas are flow times ``t``, shifted
   as ``FlowMatchEulerDiscreteScheduler`` shifts them (static ``shift`` or the pipeline's ``mu``),
   others are VE sigmas as ``EulerDiscreteScheduler`` takes them.  Like those schedulers the grid
   then ends with a step to 0 (denoise-to-zero); a flow time ``t = 1`` (sigma = infinity) starts
   at the model's largest finite sigma instead (``t = 1 - 1/T`` unshifted, as ``pipelines.run``);
3. otherwise ``num_inference_steps`` is the **NFE** (diffsampler's convention, not the number of
   steps): the pipeline calls its network exactly that many times (one batched call per
   evaluation with classifier-free guidance), on ``schedule=`` (a name, default the solver's own)
   over the model's sigma range, exactly the grid ``diffsampler.pipelines.run(pipe, ...,
   nfe=num_inference_steps)`` uses.

``denoise_to_zero=`` overrides the step-to-0 rule.  ``scheduler.timesteps`` lists one timestep
per model evaluation, in order: a solver with two evaluations per step repeats or interleaves
timesteps the way diffusers' Heun scheduler does, so ``len(timesteps)`` is the NFE and
``order = 1``.

**Stepping.**  Solvers call the model themselves; a pipeline calls the model and then ``step``.
``set_timesteps`` records, by a dry run of the solver on the grid, the sigma of every evaluation
(the same for every sample: true of every registered solver).  ``step`` turns the model output
into the denoised estimate, replays the current solver step with the estimates received so far,
and returns, as ``prev_sample``, the input of the next evaluation the solver asks for, in the
pipeline's latent space (``c(sigma) x_ve`` with ``c = 1/sqrt(1 + sigma^2)`` (VP) or ``1/(1 +
sigma)`` (flow): standard-normal latents start it, ``init_noise_sigma = 1`` and
``scale_model_input`` is the identity).  The solver state lives in the scheduler in float64 (the
``sample`` a pipeline passes back is used on the first step only).  After the last evaluation
``prev_sample`` is the solution the way ``pipelines.run`` decodes it: ``x0 + sigma_min n``, or
``x0`` with the step to 0.  With the same solver and grid, the pipeline's images equal
``pipelines.run``'s.

**What this interface cannot do** and refuses with a ``ValueError``: AMED predictors (their
intermediate times are chosen per sample from the model's features while sampling, but a
pipeline's timesteps are fixed for the whole batch before its loop: use ``pipelines.run`` or
``diffsampler sample --amed``); the analytical first step (a pipeline evaluates its model on the
initial latents before the first ``step``); custom ``timesteps=``; starting part-way (img2img /
inpainting ``strength``: ``set_begin_index`` other than 0, ``add_noise``, ``scale_noise``).
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput

from .. import sample
from ..defaults import DEFAULT_SOLVER
from ..models.base import work_dtype
from ..models.diffusers_pixel import SigmaTable, sigmas_from_alphas_cumprod
from ..models.flow import FlowDenoiser, sigma_to_t, t_to_sigma
from ..schedules import Schedule, check_sigmas
from ..schedules import resolve as resolve_schedule
from ..solvers import get_solver, solver_names

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow")
USE_RUN = ("sample with diffsampler.pipelines.run(pipe, ...) or `diffsampler sample --model diffusers:DIR ...`, "
           "which run diffsampler's own loop")


class DiffSamplerScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler running a diffsampler solver (see the module docstring).

    Build it from the config of the scheduler it replaces, ``DiffSamplerScheduler.from_config(
    pipe.scheduler.config, solver="unipc", ...)``; keyword arguments that are not config fields
    are solver options (``max_order=2``).

    Args:
        solver: a solver name or alias (``diffsampler list``); default: the one a schedule file
            records (with its options), else ipndm.
        solver_options: the solver's options (also accepted as plain keyword arguments).
        schedule: a schedule name (grid from ``num_inference_steps`` = NFE), a schedule file or
            :class:`~diffsampler.schedules.Schedule` (a fixed grid); default the solver's own.
        schedule_options: parameters of a named schedule (``dict(rho=5)``).
        sigmas: an explicit descending VE grid (a trailing 0: the last step goes to 0).
        denoise_to_zero: end with ``D(x, sigma_min)``; default: where the grid ends in 0.
        afs: must stay off (see the module docstring); ``None`` takes a schedule file's setting
            and refuses a file tuned with AFS.
        prediction_type: ``epsilon``, ``sample``, ``v_prediction`` or ``flow``; default from the
            replaced config (``flow`` for ``FlowMatch*`` schedulers).
        num_train_timesteps ... rescale_betas_zero_snr: the DDPM training schedule (VP models).
        shift ... invert_sigmas: the flow-matching training schedule and the way a
            ``FlowMatchEulerDiscreteScheduler`` reads pipeline sigmas (flow models).
    """

    _compatibles: List[str] = []
    order = 1

    @register_to_config
    def __init__(self, solver: Optional[str] = None, solver_options: Optional[Dict[str, Any]] = None,
                 schedule: Union[None, str, Dict[str, Any]] = None, schedule_options: Optional[Dict[str, Any]] = None,
                 sigmas: Optional[List[float]] = None, denoise_to_zero: Optional[bool] = None,
                 afs: Optional[bool] = None, amed: Optional[str] = None, prediction_type: str = "epsilon",
                 num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas: Optional[List[float]] = None,
                 rescale_betas_zero_snr: bool = False, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 base_shift: float = 0.5, max_shift: float = 1.15, base_image_seq_len: int = 256,
                 max_image_seq_len: int = 4096, time_shift_type: str = "exponential",
                 shift_terminal: Optional[float] = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, invert_sigmas: bool = False):
        options = dict(solver_options or {})
        _refuse_amed(solver, options, amed)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
        if invert_sigmas:
            raise ValueError("invert_sigmas=True (flow time running from 0 to 1) is not supported")
        self.is_flow = prediction_type == "flow"
        if self.is_flow:
            model = FlowDenoiser(_no_network, num_train_timesteps=num_train_timesteps,
                                 shift=1.0 if use_dynamic_shifting else shift)
            self.sigma_min, self.sigma_max = model.sigma_min, model.sigma_max
            self.table = None
        else:
            ddpm = DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start, beta_end=beta_end,
                                 beta_schedule=beta_schedule, trained_betas=trained_betas,
                                 rescale_betas_zero_snr=rescale_betas_zero_snr)
            self.alphas_cumprod = ddpm.alphas_cumprod           # the model's table (pipelines.run reads it)
            self.table = SigmaTable(sigmas_from_alphas_cumprod(self.alphas_cumprod))
            self.sigma_min, self.sigma_max = float(self.table.sigmas[0]), float(self.table.sigmas[-1])

        # the user's fixed grid, if any (stored in the config as plain JSON)
        self.fixed: Optional[Schedule] = None
        self.fixed_to_zero = False
        if sigmas is not None and schedule is not None:
            raise ValueError("give sigmas= or schedule=, not both")
        if sigmas is not None:
            values = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
            self.fixed_to_zero = len(values) > 1 and values[-1] == 0.0
            self.fixed = Schedule(check_sigmas(values[:-1] if self.fixed_to_zero else values), {})
            self.register_to_config(sigmas=values)
        elif schedule is not None:
            if isinstance(schedule, Schedule):
                schedule = schedule.to_dict()
            if isinstance(schedule, dict):
                info = {k: v for k, v in schedule.items() if k not in ("format", "sigmas")}
                self.fixed = Schedule(torch.tensor(schedule["sigmas"], dtype=torch.float64), info)
                if schedule_options:
                    raise ValueError("schedule_options do not apply to a fixed schedule")
            else:
                self.fixed, _ = resolve_schedule(str(schedule), schedule_options)   # checks names and files
            self.register_to_config(schedule=schedule if isinstance(schedule, (str, dict)) else str(schedule))
        if self.fixed is not None and not sigmas:
            self._check_fixed_range()
        if solver is None:          # a schedule file's own solver, else diffsampler's default
            recorded = self.fixed.info if self.fixed is not None else {}
            solver = recorded.get("solver") if isinstance(recorded.get("solver"), str) else DEFAULT_SOLVER
            if recorded.get("solver") == solver:
                options = {**dict(recorded.get("solver_options") or {}), **options}
            self.register_to_config(solver=solver, solver_options=options or None)
        if not isinstance(solver, str):
            raise ValueError(f"solver must be a solver name ({', '.join(solver_names())}), got {type(solver).__name__}; "
                             "give its options as keyword arguments")
        self.solver = get_solver(solver, **options)
        if afs is None and self.fixed is not None:
            afs = bool(self.fixed.info.get("afs", False))
        if afs:
            raise ValueError("the analytical first step (AFS) replaces the first model evaluation, but a diffusers "
                             "pipeline evaluates its model on the initial latents before the scheduler's first step: "
                             f"pass afs=False (one more evaluation), or {USE_RUN}")
        self.init_noise_sigma = 1.0
        self.grid: Optional[torch.Tensor] = None        # the VE grid of the current plan (float64)
        self.timesteps: Optional[torch.Tensor] = None
        self.sigmas: Optional[torch.Tensor] = None
        self.num_inference_steps: Optional[int] = None
        self._plan: Optional[_Plan] = None
        self._run: Optional[_Run] = None

    # --- construction -------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """From the replaced scheduler's config; keyword arguments that are not config fields are
        solver options."""
        config = dict(config or {})
        if "prediction_type" not in kwargs and _is_flow_config(config):
            kwargs["prediction_type"] = "flow"
        fields = set(cls._get_init_keys(cls)) - {"self"}
        carried = config.get("solver_options") if "solver" not in kwargs else None     # a new solver starts afresh
        options = dict(kwargs.pop("solver_options", None) or carried or {})
        options.update({k: kwargs.pop(k) for k in list(kwargs) if k not in fields})
        if isinstance(kwargs.get("schedule"), Schedule):
            kwargs["schedule"] = kwargs["schedule"].to_dict()
        if isinstance(kwargs.get("sigmas"), torch.Tensor):
            kwargs["sigmas"] = [float(s) for s in kwargs["sigmas"].reshape(-1)]
        if isinstance(kwargs.get("schedule"), Path):
            kwargs["schedule"] = str(kwargs["schedule"])
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, solver_options=options or None,
                                   **kwargs)

    def _check_fixed_range(self) -> None:
        lo, hi = float(self.fixed.sigmas[-1]), float(self.fixed.sigmas[0])
        if hi > self.sigma_max * (1 + 1e-6) or lo < self.sigma_min * (1 - 1e-6):
            raise ValueError(f"this schedule spans sigma {lo:g}..{hi:g}, outside the model's range "
                             f"{self.sigma_min:g}..{self.sigma_max:g}: it was made for another model")

    # --- the sigma <-> model time map -----------------------------------------------------------------
    def scale(self, sigma: float) -> float:
        """c(sigma): the pipeline's latents are ``c * x_ve``."""
        return 1 / (1 + sigma) if self.is_flow else 1 / math.sqrt(1 + sigma * sigma)

    def model_timesteps(self, sigmas: Sequence[float]) -> torch.Tensor:
        """The network's timestep for each VE sigma (float64)."""
        s = torch.tensor(list(sigmas), dtype=torch.float64)
        if self.is_flow:
            return sigma_to_t(s) * self.config.num_train_timesteps
        return self.table.sigma_to_t(s)

    # --- set_timesteps --------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      sigmas: Optional[Sequence[float]] = None, mu: Optional[float] = None,
                      timesteps: Optional[Sequence[float]] = None) -> None:
        """Plan the evaluations (see the module docstring for what decides the grid)."""
        if timesteps is not None:
            raise ValueError("DiffSamplerScheduler takes no custom timesteps: give sigmas (to the pipeline or to "
                             "from_config), a schedule file, or num_inference_steps (the NFE)")
        if self.fixed is not None:
            grid, to_zero, nfe = self.fixed.sigmas, self.fixed_to_zero, None
        elif sigmas is not None:
            grid, to_zero, nfe = self._pipeline_grid(sigmas, mu), True, None
        else:
            if num_inference_steps is None:
                raise ValueError("set_timesteps needs num_inference_steps (the NFE) or sigmas")
            grid, to_zero, nfe = None, False, int(num_inference_steps)
        if self.config.denoise_to_zero is not None:
            to_zero = bool(self.config.denoise_to_zero)
        plan = _Plan.make(self, grid, nfe, to_zero)
        asked = len(sigmas) if sigmas is not None else num_inference_steps
        if self.fixed is not None and asked is not None and int(asked) != plan.nfe:
            warnings.warn(f"DiffSamplerScheduler: the grid given to from_config makes {plan.nfe} model evaluations "
                          f"({self.solver.name}, {len(plan.grid) - 1} steps); the pipeline's request for {asked} is "
                          f"ignored (pass num_inference_steps={plan.nfe})", stacklevel=2)
        self._plan, self._run = plan, None
        t = self.model_timesteps(plan.evals)
        self.timesteps = t.to(device=device, dtype=torch.float32)
        ends = [0.0 if plan.to_zero else plan.grid[-1]]
        shown = torch.tensor(plan.evals + ends, dtype=torch.float64)
        self.sigmas = (sigma_to_t(shown) if self.is_flow else shown).to(device=device, dtype=torch.float32)
        self.num_inference_steps = plan.nfe
        self.grid = torch.tensor(plan.grid, dtype=torch.float64)

    def _pipeline_grid(self, sigmas, mu) -> torch.Tensor:
        """VE grid from the sigmas a pipeline passes, read as the replaced scheduler reads them."""
        values = [float(s) for s in torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)]
        if values and values[-1] == 0.0:
            values = values[:-1]
        if not self.is_flow:
            return check_sigmas(values)
        config = self.config
        flow = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=config.num_train_timesteps, shift=config.shift,
            use_dynamic_shifting=config.use_dynamic_shifting, base_shift=config.base_shift,
            max_shift=config.max_shift, base_image_seq_len=config.base_image_seq_len,
            max_image_seq_len=config.max_image_seq_len, shift_terminal=config.shift_terminal,
            use_karras_sigmas=config.use_karras_sigmas, use_exponential_sigmas=config.use_exponential_sigmas,
            use_beta_sigmas=config.use_beta_sigmas, time_shift_type=config.time_shift_type)
        flow.set_timesteps(sigmas=values, mu=mu)
        t = flow.sigmas[:-1].double()
        t_max = float(sigma_to_t(torch.tensor(self.sigma_max, dtype=torch.float64)))
        t = torch.where(t >= t_max, torch.full_like(t, t_max), t)
        return check_sigmas(t_to_sigma(t))

    # --- step -----------------------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True, **kwargs) -> Union[SchedulerOutput, Tuple[torch.Tensor]]:
        """Take the model output of the current evaluation; return the input of the next one (or,
        after the last, the solution) as ``prev_sample`` in the pipeline's latent space."""
        plan = self._plan
        if plan is None:
            raise ValueError("call set_timesteps before step")
        if self._run is None:
            self._run = _Run(self, plan, sample)
        run = self._run
        k = run.index
        if k >= plan.nfe:
            raise ValueError(f"all {plan.nfe} planned model evaluations have been stepped; call set_timesteps again")
        expected = float(self.timesteps[k])
        got = float(torch.as_tensor(timestep).reshape(-1)[0])
        if not math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-4):
            raise ValueError(f"step got timestep {got:g} but evaluation {k + 1} of {plan.nfe} is at timestep {expected:g}: "
                             "DiffSamplerScheduler needs the pipeline to visit scheduler.timesteps in order, each once")
        out = run.take(model_output)
        prev = out.to(device=sample.device, dtype=sample.dtype)
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev)

    # --- diffusers scheduler API ------------------------------------------------------------------------
    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The identity: ``prev_sample`` is already the network's input."""
        return sample

    @property
    def step_index(self) -> Optional[int]:
        return None if self._run is None else self._run.index

    @property
    def begin_index(self) -> int:
        return 0

    def set_begin_index(self, begin_index: int = 0) -> None:
        if int(begin_index) != 0:
            raise ValueError("DiffSamplerScheduler starts at its first timestep only (no img2img / inpainting "
                             "strength): use the pipeline's own scheduler for partial denoising")

    def add_noise(self, *args, **kwargs):
        raise NotImplementedError("DiffSamplerScheduler does not noise images part-way (img2img / inpainting): "
                                  "use the pipeline's own scheduler for those")

    scale_noise = add_noise

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)


class _Plan:
    """The evaluations of one sampling run: the VE grid, whether it ends with the step to 0, and
    the sigma of every model evaluation in order (from a dry run of the solver)."""

    def __init__(self, grid: Tuple[float, ...], to_zero: bool, evals: List[float]):
        self.grid, self.to_zero, self.evals = grid, to_zero, evals
        self.nfe = len(evals)

    @classmethod
    def make(cls, scheduler: DiffSamplerScheduler, grid, nfe: Optional[int], to_zero: bool) -> "_Plan":
        seen: List[float] = []

        def record(x, sigma):
            if not bool((sigma == sigma[0]).all()):
                raise ValueError("this solver evaluates at per-sample times, which a diffusers scheduler cannot "
                                 f"express: {USE_RUN}")
            seen.append(float(sigma[0]))
            return torch.zeros_like(x)

        request: Dict[str, Any] = dict(sigmas=grid) if grid is not None else dict(
            nfe=nfe, schedule=scheduler.config.schedule, schedule_options=scheduler.config.schedule_options,
            sigma_min=scheduler.sigma_min, sigma_max=scheduler.sigma_max)
        result = sample(record, torch.zeros(1, 1, dtype=torch.float64), scheduler.solver, afs=False,
                        denoise_to_zero=to_zero, **request)
        plan = cls(tuple(float(s) for s in result.sigmas), to_zero, seen)
        if not seen or seen[0] != plan.grid[0]:
            raise ValueError(f"solver {scheduler.solver.name!r} does not start with a model evaluation at the first "
                             f"sigma, which a pipeline's loop needs: {USE_RUN}")
        return plan


class _NeedsModel(Exception):
    """Raised by the replay evaluator when the solver asks for an evaluation not made yet."""

    def __init__(self, x: torch.Tensor, sigma: float):
        super().__init__()
        self.x, self.sigma = x, sigma


class _Replay:
    """``evaluate(x, sigma)`` for a solver step: the model outputs received so far, in order, then
    :class:`_NeedsModel` for the next one."""

    def __init__(self, outputs: List[torch.Tensor]):
        self.outputs, self.used = outputs, 0

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        if self.used < len(self.outputs):
            self.used += 1
            return self.outputs[self.used - 1]
        raise _NeedsModel(x, float(sigma))


class _Run:
    """One pass of the pipeline's loop: the solver state between ``step`` calls."""

    def __init__(self, scheduler: DiffSamplerScheduler, plan: _Plan, first_sample: torch.Tensor):
        self.scheduler, self.plan = scheduler, plan
        self.solver = scheduler.solver
        fixed = scheduler.fixed
        made_for = fixed.info.get("shape") if fixed is not None else None
        if made_for is not None and math.prod(made_for) != math.prod(first_sample.shape[1:]):
            raise ValueError(f"this schedule was made for samples of shape {tuple(made_for)}, not "
                             f"{tuple(first_sample.shape[1:])}: make one for this model and image size")
        self.work = work_dtype(first_sample.device)
        sigma0 = plan.grid[0]
        self.x = first_sample.to(self.work) / scheduler.scale(sigma0)        # VE state at grid[i]
        self.i, self.state = 0, self.solver.init_state()
        self.outputs: List[torch.Tensor] = []                                # received within step i
        self.pending: Tuple[torch.Tensor, float] = (self.x, sigma0)          # what the model is evaluating
        self.index = 0                                                       # evaluations received

    def take(self, model_output: torch.Tensor) -> torch.Tensor:
        x, sigma = self.pending
        self.outputs.append(denoised_from_output(self.scheduler, model_output, x, sigma))
        self.index += 1
        need = self._advance()
        if need is None:
            return self.x
        self.pending = need
        x_next, sigma_next = need
        expected = self.plan.evals[self.index]
        if not math.isclose(sigma_next, expected, rel_tol=1e-12):
            raise RuntimeError(f"solver {self.solver.name} asked for sigma {sigma_next!r} at evaluation {self.index + 1}, "
                               f"but the dry run planned {expected!r}")
        return x_next * self.scheduler.scale(sigma_next)

    def _advance(self) -> Optional[Tuple[torch.Tensor, float]]:
        """Run the solver as far as the outputs go: the next (x, sigma) to evaluate, or None when done."""
        grid, steps = self.plan.grid, len(self.plan.grid) - 1
        while self.i < steps:
            replay = _Replay(self.outputs)
            try:
                x_next, _, self.state = self.solver.step(replay, self.x, self.i, grid, self.state)
            except _NeedsModel as need:
                return need.x, need.sigma
            self.x, self.i, self.outputs = x_next, self.i + 1, []
        if self.plan.to_zero:
            if not self.outputs:
                return self.x, grid[-1]
            self.x, self.outputs = self.outputs[0], []
        return None


def denoised_from_output(scheduler: DiffSamplerScheduler, output: torch.Tensor, x: torch.Tensor,
                         sigma: float) -> torch.Tensor:
    """The network's output at VE state ``x`` and ``sigma`` -> the denoised estimate x0 (VE)."""
    out = output.to(x.dtype)
    if out.ndim == x.ndim and out.shape[1] == 2 * x.shape[1] and out.shape[2:] == x.shape[2:]:
        out = out[:, : x.shape[1]]               # learned variance: keep the mean prediction
    if out.shape != x.shape:
        raise ValueError(f"the model output has shape {tuple(out.shape)}, the latents {tuple(x.shape)}")
    kind = scheduler.config.prediction_type
    if kind == "flow":
        t = sigma / (1 + sigma)
        return x / (1 + sigma) - t * out
    if kind == "epsilon":
        return x - sigma * out
    if kind == "sample":
        return out
    alpha = 1 / math.sqrt(1 + sigma * sigma)
    return alpha * alpha * x - sigma * alpha * out


def _is_flow_config(config: Dict[str, Any]) -> bool:
    """A flow-matching scheduler's config (FlowMatch*: a shift, no betas), not ours or a DDPM-style one."""
    name = config.get("_class_name")
    if isinstance(name, str) and name.startswith("FlowMatch"):
        return True
    return "shift" in config and "beta_start" not in config and "prediction_type" not in config


def _refuse_amed(solver, options, amed) -> None:
    learned = amed is not None or options.get("predictor") is not None or \
        (isinstance(solver, (str, Path)) and str(solver).endswith(".pt"))
    if learned:
        raise ValueError("learned samplers (AMED's per-sample intermediate times, EPD's parallel points, the trained "
                         "steps of LD3/S4S/PAS) run inside diffsampler's own loop, but a diffusers pipeline fixes "
                         f"its timesteps and steps for the whole batch before its loop: {USE_RUN} with learned=... "
                         "(e.g. `diffsampler sample --model diffusers:DIR --learned FILE`)")


def _no_network(*args, **kwargs):
    raise RuntimeError("the scheduler's model description is never called")
