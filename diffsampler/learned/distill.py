"""One distillation routine for every learned sampler (data-free: only noise and the model).

    sampler = distill(sampler, denoiser, shape, iters=40, batch=32)

1. **Teacher.** The teacher solver (the sampler's default, e.g. DPM-Solver++; ``teacher=``) solves
   the ODE for fresh training seeds on the student's grid refined with ``M`` points per student
   step (uniform in log sigma; by default enough for the method's minimum number of teacher
   steps), without gradients.  It keeps its state at the end of every student step (methods on a
   fixed grid, ``targets="steps"``) or only its final sample (methods that move the grid,
   ``targets="endpoint"``).  Training seeds start at ``first_seed`` (1,000,000 by default, far
   from the seeds images are usually drawn with); each iteration takes the next ``batch`` of them,
   cycling through ``train_images`` (default ``iters * batch``: every batch fresh), and the teacher
   result of a batch is computed once.
2. **Student.** The sampler's plan runs through the one sampling loop
   (:func:`diffsampler.loop.integrate`) with gradients on.  The loss is the batch mean of the
   distance (``loss="l2"``: per-sample Euclidean norm; ``"l1"``: mean absolute difference) between
   the student and the teacher at every target; with step targets the state is detached between
   steps (each step's loss reaches the parameters through that step only) unless ``through=True``.
   Adam updates the sampler's parameters once per batch; the model's own parameters are frozen
   during training and restored afterwards.
3. **Validation.** Held-out seeds (``val_images`` from ``val_seed``, disjoint from the training
   seeds; by default the method's ``default_val_images``: 256, AMED 64) measure the per-seed
   endpoint RMSE to the teacher before training (the neutral parameters, i.e. the base solver)
   and every ``val_every`` iterations (default: ten times).  An iterate replaces the neutral
   parameters only if its paired improvement over them is significant (mean per-seed difference
   below minus two standard errors), and the best such iterate is returned: a noisy gain on a
   few validation seeds does not replace the base solver.  With ``confirm_images`` (the method's
   ``default_confirm_images``) the chosen iterate must then pass the same test on fresh seeds
   (from ``confirm_seed``, 2,500,000: disjoint from training, validation and every benchmark's
   seeds), or the neutral parameters are kept: the best of ten checks on one set of seeds is
   biased towards a lucky draw of those seeds, a second set is not.  Off by default: on the
   selection seeds of ``evaluation/learned_training_defaults.py`` 256 confirmation seeds threw
   away 11 real gains and avoided no loss.  The learning rate decays along a cosine to a tenth
   of ``lr``.
4. **Scale-out.** Under torchrun (a process group of several ranks) every batch's seeds are split
   across ranks, each rank runs its share of teacher and student, and DistributedDataParallel
   averages the gradients; validation sums over ranks.  Rank 0 shows a progress bar with the loss.
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .. import __version__
from ..distributed import all_reduce_mean, all_reduce_sum, rank_and_world
from ..models.base import Denoiser, work_dtype
from ..plan import make_plan
from ..loop import evaluator_for, integrate, run_plan
from ..seeds import seed_noise
from .base import LearnedSampler

TRAIN_SEEDS = 1_000_000
VAL_SEEDS = 2_000_000
CONFIRM_SEEDS = 2_500_000
LOSSES = ("l2", "l1")


def refine(sigmas: Sequence[float], extra: int) -> List[float]:
    """The teacher grid: ``extra`` points inserted uniformly in log sigma inside every interval."""
    fine = []
    for a, b in zip(sigmas[:-1], sigmas[1:]):
        fine += [math.exp(math.log(a) + (math.log(b) - math.log(a)) * k / (extra + 1)) for k in range(extra + 1)]
    return fine + [float(sigmas[-1])]


def teacher_points(student_steps: int, min_teacher_steps: int = 8) -> int:
    """Default M: the fewest extra points per student step (at least 1) that give the teacher at
    least ``min_teacher_steps`` steps.  (With M = 1 a 2-step AMED student had a 4-step teacher,
    less accurate than the students it should teach: measured on the bundled model.)"""
    return max(1, math.ceil(min_teacher_steps / student_steps) - 1)


def distance(x: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    diff = (x - target.to(x.dtype)).flatten(1)
    return diff.norm(dim=1).mean() if loss == "l2" else diff.abs().mean()


def rmse(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample RMSE, summed over the batch (callers divide by the count)."""
    return (x - target.to(x.dtype)).flatten(1).pow(2).mean(1).sqrt().sum()


class StudentPass(nn.Module):
    """The student's run on a batch as a module (so DistributedDataParallel can average its
    gradients): ``forward(noise, cond, targets) -> (loss to back-propagate, mean loss per target)``."""

    def __init__(self, sampler: LearnedSampler, denoiser, shape, loss: str, truncate: bool):
        super().__init__()
        self.sampler = sampler
        object.__setattr__(self, "_model", (denoiser, tuple(shape)))     # not a submodule: never synced
        self.loss, self.truncate = loss, truncate

    def forward(self, noise, cond, targets):
        denoiser, shape = self._model
        plan = self.sampler.plan(denoiser, shape, differentiable=True)
        losses = []

        def on_step(info):
            if self.sampler.targets == "steps":
                losses.append(distance(info.x_next, targets[info.index], self.loss))

        with evaluator_for(plan, denoiser, noise, cond) as evaluate:
            x = noise.to(evaluate.work_dtype) * plan.sigmas[0]
            x = integrate(plan, evaluate, x, callback=on_step, truncate=self.truncate)
        if self.sampler.targets == "endpoint":
            losses.append(distance(x, targets[-1], self.loss))
        total = sum(losses)
        return total, total.detach() / len(losses)


def distill(sampler: LearnedSampler, denoiser, shape: Optional[Sequence[int]] = None, *,
            cond: Optional[Callable[[List[int]], Dict[str, Any]]] = None, teacher: Optional[str] = None,
            teacher_options: Optional[dict] = None, M: Optional[int] = None, batch: int = 32, iters: int = 40,
            train_images: Optional[int] = None, lr: float = 1e-2, first_seed: int = TRAIN_SEEDS,
            val_images: Optional[int] = None, val_seed: int = VAL_SEEDS, val_every: Optional[int] = None,
            confirm_images: Optional[int] = None, confirm_seed: int = CONFIRM_SEEDS, loss: str = "l2",
            through: bool = False, dtype=torch.float32, device="cpu", progress: bool = False,
            log: Optional[Callable[[int, float], None]] = None) -> LearnedSampler:
    """Train ``sampler`` against a teacher on ``denoiser`` (see the module docstring); returns it
    with the best validated parameters, its ``settings`` updated with how it was trained."""
    shape = tuple(shape if shape is not None else denoiser.shape)
    val_images = sampler.default_val_images if val_images is None else val_images
    confirm_images = sampler.default_confirm_images if confirm_images is None else confirm_images
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}: use one of {', '.join(LOSSES)}")
    if iters < 1 or batch < 1 or val_images < 0 or confirm_images < 0 or (M is not None and M < 0):
        raise ValueError(f"need iters >= 1, batch >= 1, val_images >= 0, confirm_images >= 0 and M >= 0; got "
                         f"iters={iters}, batch={batch}, val_images={val_images}, confirm_images={confirm_images}, M={M}")
    train_images = iters * batch if train_images is None else int(train_images)
    if train_images < batch:
        raise ValueError(f"train_images ({train_images}) must be at least one batch ({batch})")
    rank, world = rank_and_world()
    if world > batch:
        raise ValueError(f"{world} processes need a batch of at least {world} seeds, got {batch}")
    grid = sampler.grid()
    M = teacher_points(len(grid) - 1, sampler.min_teacher_steps) if M is None else M
    teacher = teacher or sampler.default_teacher
    teacher_plan = make_plan(teacher, sigmas=refine(grid, M), model=denoiser, **(teacher_options or {}))
    every = M + 1

    def teacher_run(seeds):
        noise = seed_noise(seeds, shape, dtype=dtype, device=device)
        batch_cond = cond(seeds) if cond is not None else None
        states = []
        record = (lambda info: states.append(info.x_next) if (info.index + 1) % every == 0 else None) \
            if sampler.targets == "steps" else None
        with torch.inference_mode():
            final = run_plan(teacher_plan, denoiser, noise, cond=batch_cond, callback=record).samples
        targets = [s.clone() for s in states] if states else [final.to(work_dtype(torch.device(device))).clone()]
        return noise, batch_cond, targets

    batches = [list(range(first_seed + k, first_seed + min(k + batch, train_images)))
               for k in range(0, train_images - batch + 1, batch)]
    cache: Dict[int, Tuple] = {}
    def held_out(first: int, count: int):
        """The teacher's targets on this rank's share of seeds first..first+count-1, in batches."""
        seeds = list(range(first, first + count))[rank::world]
        return [teacher_run(seeds[k:k + batch]) for k in range(0, len(seeds), batch)]

    val_set = held_out(val_seed, val_images)
    val_every = val_every or max(1, iters // 10)

    pass_module = StudentPass(sampler, denoiser, shape, loss, truncate=sampler.targets == "steps" and not through)
    frozen = [(p, p.requires_grad) for p in _model_parameters(denoiser)]
    for p, _ in frozen:
        p.requires_grad_(False)
    runner = pass_module
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(pass_module, find_unused_parameters=True)
    optimizer = torch.optim.Adam([p for p in sampler.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(it, iters) / iters)))
    losses, history = [], []
    best, neutral, neutral_state = (float("inf"), -1, None), None, None
    t0 = time.perf_counter()
    iterator = range(iters)
    if progress and rank == 0:
        from ..progress import bar
        iterator = bar(total=iters, desc=f"{sampler.method} NFE {sampler.nfe}", unit="batch")
    try:
        for it in range(iters + 1):
            if it % val_every == 0 or it == iters:
                errors = _validate(sampler, denoiser, shape, val_set)
                neutral = errors if neutral is None else neutral
                value, significant = _compare(errors, neutral)
                history.append([it, value])
                if (it == 0 or significant) and value < best[0]:
                    best = (value, it, copy.deepcopy(sampler.state_dict()))
                    if it == 0:
                        neutral_state = best[2]          # the base solver exactly, for the confirmation
            if it == iters:
                break
            k = it % len(batches)
            if k not in cache:
                cache[k] = teacher_run(batches[k][rank::world])
            noise, batch_cond, targets = cache[k]
            total, mean = runner(noise, batch_cond, targets)
            if total.requires_grad:
                total.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            schedule.step()
            value = float(all_reduce_mean(mean))
            losses.append(value)
            if progress and rank == 0:
                iterator.update(1)
                iterator.set_postfix(loss=f"{value:.4f}", val=f"{best[0]:.4f}")
            if log is not None:
                log(it, value)
    finally:
        for p, flag in frozen:
            p.requires_grad_(flag)
        if progress and rank == 0:
            iterator.close()
    confirmation = None
    if best[1] > 0 and confirm_images:          # the same verdict on every rank: the values are all-reduced
        confirm_set = held_out(confirm_seed, confirm_images)
        sampler.load_state_dict(neutral_state)
        base_errors = _validate(sampler, denoiser, shape, confirm_set)
        sampler.load_state_dict(best[2])
        value, significant = _compare(_validate(sampler, denoiser, shape, confirm_set), base_errors)
        neutral_value = _compare(base_errors, base_errors)[0]          # (its mean over every rank's seeds)
        confirmation = {"learned": value, "neutral": neutral_value, "kept": significant}
        if not significant:
            best = (history[0][1], 0, neutral_state)
    if best[2] is not None:
        sampler.load_state_dict(best[2])
    tail = losses[-max(1, len(losses) // 5):]
    sampler.settings.update({
        "teacher": teacher, "teacher_options": dict(teacher_options or {}), "M": M, "loss": loss,
        "through": bool(through), "batch": batch, "iters": iters, "lr": lr, "first_seed": first_seed,
        "train_images": train_images, "val_seed": val_seed, "val_images": val_images, "processes": world,
        "train_seconds": time.perf_counter() - t0, "final_loss": sum(tail) / len(tail), "losses": losses,
        "validation": history, "best_iteration": best[1], "confirm_images": confirm_images,
        "confirm_seed": confirm_seed, "confirmation": confirmation, "diffsampler_version": __version__})
    return sampler.eval()


def _model_parameters(denoiser) -> List[nn.Parameter]:
    net = denoiser if isinstance(denoiser, nn.Module) else denoiser.network if isinstance(denoiser, Denoiser) else None
    return list(net.parameters()) if net is not None else []


@torch.no_grad()
def _validate(sampler: LearnedSampler, denoiser, shape, val_set) -> torch.Tensor:
    """Per-seed endpoint RMSE of the sampler against the teacher on this rank's validation seeds."""
    plan = sampler.plan(denoiser, shape)
    errors = [torch.zeros(0, dtype=torch.float64)]
    for noise, batch_cond, targets in val_set:
        if noise.shape[0]:
            out = run_plan(plan, denoiser, noise, cond=batch_cond).samples.to(torch.float64)
            errors.append((out - targets[-1].to(torch.float64)).flatten(1).pow(2).mean(1).sqrt().cpu())
    return torch.cat(errors)


def _compare(errors: torch.Tensor, neutral: torch.Tensor):
    """(mean error over all ranks' seeds, whether its paired gain over the neutral parameters is
    significant: mean difference < -2 standard errors)."""
    diff = errors - neutral
    stats = all_reduce_sum(torch.stack([errors.sum(), diff.sum(), diff.pow(2).sum(),
                                         torch.tensor(float(len(errors)), dtype=torch.float64)]))
    total, d_sum, d_sq, n = (float(v) for v in stats)
    if n == 0:
        return float("nan"), False
    mean_diff = d_sum / n
    se = math.sqrt(max(d_sq / n - mean_diff ** 2, 0.0) / max(n - 1, 1))
    return total / n, mean_diff < -2 * se


