"""Training an AMED predictor by distillation from a teacher solver.

For every batch of fresh seeds the teacher solves the ODE on the student grid refined with ``M``
extra points per student step (inserted uniformly in log sigma), without gradients.  The student
(AMED-Solver or AMED-Plugin with the predictor) then runs on the student grid; after each step
the loss is the batch mean of ``||x_student - x_teacher||_2`` at that step's end, back-propagated
through the step (through the model's evaluation at the learned sigma_mid) into the predictor
only; the next step starts from the detached student state.  Adam updates the predictor once per
batch.  The denoiser's parameters are frozen during training and restored afterwards.
"""
from __future__ import annotations

import math
import time
from typing import Callable, List, Optional, Sequence

import torch

from .. import __version__
from .. import schedules as schedules_module
from ..models.base import sigma_range, work_dtype
from ..models.features import FeatureTap, find_feature_module
from ..sampling import Evaluator, fixed_schedule_request, resolve_grid, sample, take_step
from ..seeds import seed_noise
from ..solvers import get_solver
from ..solvers.amed import PLUGIN_BASES
from .predictor import Predictor, guidance_scale, model_fingerprint

STUDENTS = ("amed",) + PLUGIN_BASES
TRAIN_SEEDS = 1_000_000      # first training seed: far from the seeds samples are usually drawn with


def refine(sigmas: Sequence[float], extra: int) -> List[float]:
    """The teacher grid: ``extra`` points inserted uniformly in log sigma inside every interval."""
    fine = []
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        fine += [math.exp(math.log(a) + (math.log(b) - math.log(a)) * k / (extra + 1)) for k in range(extra + 1)]
    return fine + [float(sigmas[-1])]


def teacher_points(student_steps: int, min_teacher_steps: int = 8) -> int:
    """Default M: the fewest extra points per student step (at least 1) that give the teacher at
    least ``min_teacher_steps`` steps.  A fixed M = 1 leaves a 2-step student with a 4-step
    teacher, less accurate than the students it should teach (measured on the bundled model)."""
    return max(1, math.ceil(min_teacher_steps / student_steps) - 1)


def _detach(state):
    if isinstance(state, torch.Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return type(state)(_detach(s) for s in state)
    return state


def _student_grid(student, denoiser, shape, nfe, afs, schedule, schedule_options, sigma_min, sigma_max):
    schedule, afs = fixed_schedule_request(schedule, schedule_options, denoiser, shape, afs)
    fixed = schedule if isinstance(schedule, schedules_module.Schedule) else None
    if afs is None and fixed is None:      # AFS whenever the NFE needs it (never with plain_first)
        afs = not student.plain_first and nfe is not None and nfe not in student.valid_nfes(False, up_to=nfe + 1)
    lo, hi = sigma_range(denoiser)
    grid = resolve_grid(student, nfe if fixed is None else None, schedule, schedule_options, None,
                        lo if sigma_min is None else sigma_min, hi if sigma_max is None else sigma_max, afs, False)
    implied = student.num_evals(len(grid) - 1, afs)
    how = " --option plain_first=true" if student.plain_first else " --afs" if afs else ""
    if nfe is not None and implied != nfe:
        raise ValueError(f"the schedule has {len(grid) - 1} steps, which cost {implied} evaluations with AMED "
                         f"({student.nfe_rule()}{', AFS' if afs else ''}), not nfe={nfe}: make the schedule for "
                         f"solver 'amed' (diffsampler schedule gits --solver amed --nfe {nfe}{how})")
    return tuple(float(s) for s in grid), bool(afs), (schedule.info if fixed is not None else str(schedule))


def train(denoiser, shape: Optional[Sequence[int]] = None, solver: str = "amed", nfe: Optional[int] = 5, *,
          afs: Optional[bool] = None, plain_first: bool = False, schedule=None, schedule_options: Optional[dict] = None,
          sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, teacher: str = "dpm2",
          M: Optional[int] = None, teacher_options: Optional[dict] = None, scale_dir: float = 0.0, scale_time: float = 0.0,
          hidden: int = 64, batch: int = 32, iters: int = 40, lr: float = 1e-2, first_seed: int = TRAIN_SEEDS,
          cond: Optional[Callable[[List[int]], dict]] = None, feature_module: Optional[str] = None,
          dtype=torch.float32, device="cpu", model_name: Optional[str] = None, progress: bool = False,
          log: Optional[Callable[[int, float], None]] = None, through: bool = False) -> Predictor:
    """Train an AMED predictor for ``solver`` ("amed" = AMED-Solver, or a plugin base:
    euler, ipndm, dpmpp, dpm2) at ``nfe`` on ``denoiser``; returns the :class:`Predictor`.

    ``afs`` defaults to "whenever the NFE needs it" (odd NFE), as in the paper (NFE 5 = 3 steps
    with AFS); ``plain_first=True`` reaches an odd NFE instead with a first step that has no
    intermediate point (see :mod:`diffsampler.solvers.amed`).  ``M`` (teacher points per student step) defaults to :func:`teacher_points`.  ``schedule`` may be a name or a schedule file (e.g. GITS made with ``--solver amed``).
    ``cond`` maps a list of seeds to that batch's conditioning (e.g. random class labels).
    ``through=True`` back-propagates the summed step losses through the whole student trajectory
    instead of step by step (the paper's way, the default); it costs ~20% more and on the bundled
    model at NFE 6 it was better for the iPNDM plugin, not for DPM-Solver++ (evaluation/README.md).
    Training seeds are ``first_seed, first_seed + 1, ...``, ``batch`` per iteration (by default
    from 1,000,000 on, so they never coincide with the seeds samples are usually drawn with).
    """
    if solver not in STUDENTS:
        raise ValueError(f"AMED trains for solver 'amed' (AMED-Solver) or a plugin base; got {solver!r}, "
                         f"valid: {', '.join(STUDENTS)}")
    if M is not None and M < 0 or iters < 1 or batch < 1:
        raise ValueError(f"need M >= 0, iters >= 1 and batch >= 1; got M={M}, iters={iters}, batch={batch}")
    shape = tuple(shape if shape is not None else denoiser.shape)
    plain = get_solver("amed", base=None if solver == "amed" else solver, plain_first=plain_first)
    grid, afs, schedule_info = _student_grid(plain, denoiser, shape, nfe, afs, schedule, schedule_options,
                                             sigma_min, sigma_max)
    if M is None:
        M = teacher_points(len(grid) - 1)
    teacher_grid = refine(grid, M)
    teacher_solver = get_solver(teacher, **(teacher_options or {}))
    work = work_dtype(torch.device(device))
    source, _ = find_feature_module(denoiser, feature_module)

    def batch_of(it):
        seeds = list(range(first_seed + it * batch, first_seed + (it + 1) * batch))
        return seed_noise(seeds, shape, dtype=dtype, device=device), (cond(seeds) if cond is not None else None)

    noise, batch_cond = batch_of(0)
    with torch.no_grad(), FeatureTap(denoiser, source, None) as tap:
        sigma_probe = torch.full((batch,), grid[1], dtype=dtype, device=device)
        probe_out = denoiser(noise * grid[1], sigma_probe, **(batch_cond or {}))
        feature_dim = tap.take(noise, probe_out).shape[1]
    settings = {"solver": solver, "nfe": plain.num_evals(len(grid) - 1, afs), "afs": afs,
                "plain_first": bool(plain_first), "sigmas": list(grid),
                "schedule": schedule_info, "teacher": teacher, "teacher_options": dict(teacher_options or {}), "M": M,
                "model": model_name, "model_fingerprint": model_fingerprint(denoiser), "shape": list(shape),
                "guidance": guidance_scale(denoiser),
                "batch": batch, "iters": iters, "lr": lr, "first_seed": first_seed,
                "diffsampler_version": __version__}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(first_seed)
        predictor = Predictor(feature_dim, source, hidden, scale_dir, scale_time, settings).to(device)
    student = predictor.solver()
    optimizer = torch.optim.Adam(predictor.parameters(), lr=lr)
    frozen = [(p, p.requires_grad) for p in (denoiser.parameters() if hasattr(denoiser, "parameters") else [])]
    losses, t0 = [], time.perf_counter()
    iterator = range(iters)
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(iterator, desc=f"AMED {solver} NFE {settings['nfe']}", unit="batch")
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for it in iterator:
            if it:
                noise, batch_cond = batch_of(it)
            targets = _teacher_states(denoiser, noise, teacher_grid, teacher_solver, batch_cond, M + 1)
            loss = _student_pass(student, denoiser, noise, grid, afs, batch_cond, targets, work, through)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss)
            if progress:
                iterator.set_postfix(loss=f"{loss:.4f}")
            if log is not None:
                log(it, loss)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
    tail = losses[-max(1, len(losses) // 5):]
    predictor.settings.update({"train_seconds": time.perf_counter() - t0, "final_loss": sum(tail) / len(tail),
                               "losses": losses})
    return predictor.eval()


@torch.no_grad()
def _teacher_states(denoiser, noise, teacher_grid, teacher_solver, cond, every: int) -> List[torch.Tensor]:
    """The teacher's state at the end of every student step (every ``every`` teacher steps)."""
    states = []

    def record(info):
        if (info.index + 1) % every == 0:
            states.append(info.x_next)

    sample(denoiser, noise, solver=teacher_solver, sigmas=teacher_grid, cond=cond, callback=record)
    return states


def _student_pass(student, denoiser, noise, grid, afs, cond, targets, work, through: bool = False) -> float:
    """One student trajectory; the per-step losses are back-propagated into the predictor, step by
    step from detached states, or (``through``) summed and back-propagated through the whole
    trajectory.  Returns the mean loss."""
    steps = len(grid) - 1
    evaluate = Evaluator(denoiser, dict(cond or {}), noise.dtype, work, noise.shape[0], noise.device,
                         max_calls=student.num_evals(steps, afs))
    x, state, losses = noise.to(work) * grid[0], student.init_state(), []
    with student.attach(denoiser):
        for i in range(steps):
            x_next, _, state = take_step(student, evaluate, x, i, grid, state, afs)
            loss = (x_next - targets[i].to(work)).flatten(1).norm(dim=1).mean()
            if not through and loss.requires_grad:
                loss.backward()
            losses.append(loss if through else loss.detach())
            x, state = (x_next, state) if through else (x_next.detach(), _detach(state))
    total = sum(losses)
    if through and total.requires_grad:
        total.backward()
    return float(total.detach()) / steps
