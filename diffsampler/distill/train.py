"""The distillation loop of SFD / SFD-v (Zhou, Chen et al., "Simple and Fast Distillation of Diffusion
Models", NeurIPS 2024): fine-tune a copy of the network so that Euler on a short grid lands where a
teacher solver lands.  Data-free: every iteration draws fresh noise and runs the teacher online.

    student = distill(model, nfe=2)            # SFD: one NFE
    student = distill(model, nfe=[2, 3, 4, 5]) # SFD-v: one student for several NFEs (step-count input)

One iteration (``batch`` fresh training seeds; SFD-v draws the iteration's NFE uniformly from the list):

1. **Teacher.**  The teacher solver (DPM-Solver++, order 3, lower order at the end) solves the ODE
   from the seeds' noise on the student's grid refined with ``M`` extra points inside every
   student interval -- for the polynomial grid, the polynomial grid with ``(M + 1)`` times the
   steps, as in the paper -- without gradients, with the original model.  Its state at every
   student time is that step's target.
2. **Student.**  Euler on the student's grid (polynomial, rho = 7) through the one sampling loop
   (:func:`diffsampler.loop.integrate`) with gradients; the first step is the analytical first step
   (AFS: its direction is closed form, so nothing there is learned and no model is called, and an
   NFE-``k`` student takes ``k + 1`` steps).  Each later step starts from the student's own previous
   output (detached), its loss is the L1 distance to the teacher's state at that time (mean absolute
   difference per pixel, averaged over the batch), and Adam updates the network right after it: one
   update per student step, as in the paper.
3. **Schedule.**  The learning rate is divided by 10 after ``lr_drop_at`` (half) of the iterations.
4. **Validation.**  Held-out seeds (``VAL_SEEDS`` on) measure the endpoint RMSE to the teacher at
   every NFE before training and every ``val_every`` iterations; the iterate with the lowest mean
   is the one returned (and the history is recorded).
5. **Resume.**  With ``state_path``, an atomic checkpoint (student, optimizer, iteration, losses,
   validation, best iterate, RNG state) is written every ``save_every`` iterations and when a
   ``minutes`` budget runs out; a rerun with the same settings continues from it and ends
   bit-identical to an uninterrupted run (each iteration's seeds and NFE come from its index).
6. **Scale-out.**  Under torchrun every batch's seeds are split across ranks; DistributedDataParallel
   (gloo on CPU, nccl on GPU) averages the gradients so that each update is the one-process update
   of the whole batch; rank 0 writes the checkpoints and shows the progress bar (loss, ETA).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from .. import __version__
from ..distributed import all_reduce_sum, barrier, rank_and_world
from ..fileio import save_torch_atomic
from ..generate import one_hot_labels, seed_labels
from ..learned.distill import TRAIN_SEEDS, VAL_SEEDS, refine, rmse
from ..loop import evaluator_for, integrate, run_plan
from ..models.base import Denoiser
from ..models.identity import model_fingerprint
from ..models.student import StudentDenoiser, make_student
from ..plan import make_plan, solver_record
from ..schedules import SCHEDULE_ALIASES
from ..seeds import parse_ranges, seed_noise

STATE_FORMAT = "diffsampler-distill-state/1"
NFE_STREAM = 0x5FD_0000          # seeds of the per-iteration NFE draws of SFD-v
DEFAULT_TEACHER = "dpmpp"
# Pinned (not the solver's defaults, which may change): the teacher the committed student was made with.
DEFAULT_TEACHER_OPTIONS = {"max_order": 3, "lower_order_final": True, "solver_type": "midpoint",
                           "legacy_third_order": False}
DEFAULT_M = 3
DEFAULT_LR = 2e-4          # 600 iterations of 32 on the bundled model: 2e-4 -> 2e-5 beat the paper's 5e-5 -> 5e-6
DEFAULT_ITERS = 600
DEFAULT_BATCH = 32


def parse_nfes(nfe: Union[int, str, Sequence[int]]) -> List[int]:
    """``2`` -> [2]; ``"2-5"`` / ``"2,3,5"`` / ``[2, 3]`` -> sorted NFE lists (each >= 1)."""
    if isinstance(nfe, bool):
        raise ValueError(f"nfe must be an integer, a list or a range like 2-5, got {nfe!r}")
    if isinstance(nfe, int):
        values = [nfe]
    elif isinstance(nfe, str):
        values = parse_ranges(nfe, "NFE list", "NFE", "2 or 2-5")
    else:
        values = [int(v) for v in nfe]
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise ValueError(f"NFEs must be distinct positive integers, got {nfe!r}")
    return sorted(values)


def teacher_grid(student_sigmas: Sequence[float], M: int, schedule: str, schedule_options: dict) -> List[float]:
    """The student's grid with ``M`` points inside every interval: uniform in ``sigma^(1/rho)`` on a
    polynomial grid (which gives the polynomial grid of ``(M + 1)`` times the steps, the paper's
    teacher grid), uniform in log sigma otherwise (:func:`diffsampler.learned.distill.refine`)."""
    if SCHEDULE_ALIASES.get(schedule, schedule) != "polynomial":
        return refine(student_sigmas, M)
    rho = float(schedule_options.get("rho", 7.0))
    fine = []
    for a, b in zip(student_sigmas[:-1], student_sigmas[1:]):
        lo, hi = float(a) ** (1 / rho), float(b) ** (1 / rho)
        fine += [float(a)] + [(lo + (hi - lo) * k / (M + 1)) ** rho for k in range(1, M + 1)]
    return fine + [float(student_sigmas[-1])]


def random_class_cond(num_classes: int) -> Callable[[List[int]], Dict[str, Any]]:
    """A random class per seed, drawn as ``diffsampler sample`` draws it."""
    return lambda seeds: {"class_labels": one_hot_labels(seed_labels(seeds, num_classes), num_classes)}


class _Runner(nn.Module):
    """The student as a module (so DistributedDataParallel sees its parameters and each model call
    is one DDP forward): ``forward(x, sigma, **cond) = student(x, sigma, **cond)``."""

    def __init__(self, student: StudentDenoiser):
        super().__init__()
        self.parts = nn.ModuleList(student.modules())
        object.__setattr__(self, "_student", student)

    def forward(self, x, sigma, **cond):
        return self._student(x, sigma, **cond)


def distill(denoiser: Denoiser, shape: Optional[Sequence[int]] = None, *, nfe: Union[int, str, Sequence[int]] = 2,
            cond: Union[str, None, Callable[[List[int]], Dict[str, Any]]] = "random",
            cond_record: Any = None, batch: int = DEFAULT_BATCH, iters: int = DEFAULT_ITERS, lr: float = DEFAULT_LR,
            lr_drop_at: float = 0.5, lr_drop: float = 0.1, M: int = DEFAULT_M, teacher: str = DEFAULT_TEACHER,
            teacher_options: Optional[dict] = None, schedule: str = "polynomial",
            schedule_options: Optional[dict] = None, afs: bool = True, sigma_min: Optional[float] = None,
            sigma_max: Optional[float] = None, first_seed: int = TRAIN_SEEDS, val_images: int = 64,
            val_seed: int = VAL_SEEDS, val_every: Optional[int] = None, step_module: Optional[str] = None,
            state_path=None, save_every: int = 50, minutes: Optional[float] = None, dtype=torch.float32,
            device="cpu", progress: bool = False, log: Optional[Callable[[int, float], None]] = None,
            model_name: Optional[str] = None) -> StudentDenoiser:
    """Distil ``denoiser`` into a student for ``nfe`` (see the module docstring); returns the
    student (a :class:`~diffsampler.models.student.StudentDenoiser`) with the best validated weights.

    ``cond``: ``"random"`` (a random class per seed on a class-conditional model, nothing otherwise),
    None, or a function of a list of seeds giving that batch's model inputs (``cond_record``
    describes it in the student's record).  ``state_path``: where the resumable checkpoint lives
    (None: no checkpoints).  ``minutes``: a wall-clock budget for this call; when it runs out the
    state is saved and the unfinished student is returned with ``info["finished"] = False``."""
    t0 = time.perf_counter()                      # the recorded time includes the teacher's validation runs
    shape = tuple(shape if shape is not None else denoiser.shape)
    nfes = parse_nfes(nfe)
    teacher_options = dict(DEFAULT_TEACHER_OPTIONS if teacher_options is None and teacher == DEFAULT_TEACHER
                           else teacher_options or {})
    schedule_options = dict({"rho": 7.0} if schedule_options is None and schedule in ("polynomial", "karras")
                            else schedule_options or {})
    if iters < 1 or batch < 1 or M < 0 or val_images < 0 or lr <= 0 or not 0 <= lr_drop_at <= 1:
        raise ValueError(f"need iters >= 1, batch >= 1, M >= 0, val_images >= 0, lr > 0 and 0 <= lr_drop_at <= 1; "
                         f"got iters={iters}, batch={batch}, M={M}, val_images={val_images}, lr={lr}, "
                         f"lr_drop_at={lr_drop_at}")
    rank, world = rank_and_world()
    if world > batch:
        raise ValueError(f"{world} processes need a batch of at least {world} seeds, got {batch}")
    if cond == "random":
        cond_record = cond_record or ("random class per seed" if denoiser.num_classes else None)
        cond = random_class_cond(denoiser.num_classes) if denoiser.num_classes else None
    val_every = val_every or max(1, iters // 10)

    # --- the plans: the student's native ones, the teacher's on the refined grids ----------------
    plans, teacher_plans = {}, {}
    for k in nfes:
        plan = make_plan("euler", k, schedule, schedule_options=schedule_options, sigma_min=sigma_min,
                         sigma_max=sigma_max, afs=afs, model=denoiser, shape=shape)
        plans[k] = {"solver": "euler", "sigmas": list(plan.sigmas), "afs": bool(afs)}
        teacher_plans[k] = make_plan(teacher, sigmas=teacher_grid(plan.sigmas, M, schedule, schedule_options),
                                     afs=False, model=denoiser, **teacher_options)
    student = make_student(denoiser, plans, step_module=step_module)
    student.eval().requires_grad_(True)             # dropout off: the teacher's trajectories are deterministic
    params = list(student.parameters())
    student_plans = {k: make_plan(model=student, nfe=k) for k in nfes}

    settings = {
        "method": "sfd-v" if len(nfes) > 1 else "sfd", "nfes": nfes, "model": model_name,
        "teacher_fingerprint": model_fingerprint(denoiser), "shape": list(shape), "conditioning": cond_record,
        "student_solver": "euler", "schedule": SCHEDULE_ALIASES.get(schedule, schedule),
        "schedule_options": schedule_options, "afs": bool(afs), "sigmas": {k: plans[k]["sigmas"] for k in nfes},
        "teacher": solver_record(teacher_plans[nfes[0]].solver), "M": M,
        "teacher_steps": {k: teacher_plans[k].steps for k in nfes}, "loss": "l1", "optimizer": "adam",
        "lr": lr, "lr_drop_at": lr_drop_at, "lr_drop": lr_drop, "batch": batch, "iters": iters,
        "first_seed": first_seed, "val_seed": val_seed, "val_images": val_images, "val_every": val_every,
        "step_input": student.step_input, "step_module": step_module, "dtype": str(dtype).replace("torch.", ""),
    }
    state = _load_state(state_path, settings)

    def teacher_run(k, noise, batch_cond, every=True):
        """The teacher's states at the student's times (every=True) or its endpoint."""
        stride, states = M + 1, []

        def record(info):
            if (info.index + 1) % stride == 0:
                states.append(info.x_next.clone())
        with torch.no_grad():
            final = run_plan(teacher_plans[k], denoiser, noise, cond=batch_cond, callback=record if every else None)
        return states if every else final.samples

    def batch_of(seeds):
        noise = seed_noise(seeds, shape, dtype=dtype, device=device)
        return noise, (cond(seeds) if cond is not None and seeds else None)

    val_seeds = list(range(val_seed, val_seed + val_images))[rank::world]
    val_sets = {}
    for k in nfes:
        val_sets[k] = []
        for j in range(0, len(val_seeds), batch):
            noise, batch_cond = batch_of(val_seeds[j:j + batch])
            val_sets[k].append((noise, batch_cond, teacher_run(k, noise, batch_cond, every=False)))

    def validate():
        per_nfe = {}
        with torch.no_grad():
            for k in nfes:
                total = torch.zeros((), dtype=torch.float64)
                for noise, batch_cond, target in val_sets[k]:
                    out = run_plan(student_plans[k], student, noise, cond=batch_cond).samples
                    total += rmse(out.to(torch.float64), target.to(torch.float64)).cpu()
                per_nfe[k] = float(all_reduce_sum(total)) / max(1, val_images)
        return sum(per_nfe.values()) / len(per_nfe), per_nfe

    runner = _Runner(student)
    if world > 1:
        runner = nn.parallel.DistributedDataParallel(runner, broadcast_buffers=False)
    optimizer = torch.optim.Adam(params, lr=lr)
    start, losses, history, best, seconds_before = 0, [], [], (math.inf, -1, None), 0.0
    if state is not None:
        student.load_state(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        start, losses, history, seconds_before = state["iteration"], state["losses"], state["history"], state["seconds"]
        best = tuple(state["best"])

    def keep_if_best(it):
        nonlocal best
        if not val_images:                        # nothing to validate on: the last iterate is the result
            return
        value, per_nfe = validate()
        history.append([it, value, {str(k): v for k, v in per_nfe.items()}])
        if value < best[0]:
            best = (value, it, copy.deepcopy(student.state()))

    def save_state(it, seconds):
        if state_path is not None and rank == 0:
            save_torch_atomic({"format": STATE_FORMAT, "settings": settings, "iteration": it,
                               "student": student.state(), "optimizer": optimizer.state_dict(), "losses": losses,
                               "history": history, "best": list(best), "seconds": seconds,
                               "torch_rng": torch.get_rng_state(), "processes": world,
                               "diffsampler_version": __version__}, state_path)
        barrier()

    if start == 0 and not history:
        keep_if_best(0)
    bar = None
    if progress and rank == 0:
        from ..progress import bar as progress_bar
        span = ",".join(map(str, nfes)) if len(nfes) < 3 else f"{nfes[0]}-{nfes[-1]}"
        label = f"{'SFD-v' if len(nfes) > 1 else 'SFD'} NFE {span}"
        bar = progress_bar(total=iters, initial=start, desc=label, unit="it")
    budget = minutes * 60 if minutes else math.inf
    it = start
    finished = True
    try:
        while it < iters:
            if time.perf_counter() - t0 >= budget:
                finished = False
                break
            k = nfes[0] if len(nfes) == 1 else nfes[int(torch.randint(len(nfes), (1,),
                                                       generator=torch.Generator().manual_seed(NFE_STREAM + it)))]
            for group in optimizer.param_groups:
                group["lr"] = lr * (lr_drop if it >= lr_drop_at * iters else 1.0)
            seeds = list(range(first_seed + it * batch, first_seed + (it + 1) * batch))[rank::world]
            noise, batch_cond = batch_of(seeds)
            targets = teacher_run(k, noise, batch_cond)
            value = _train_iteration(student_plans[k], runner, optimizer, params, noise, batch_cond, targets,
                                     scale=world / batch)
            losses.append(value)
            it += 1
            if it % val_every == 0 or it == iters:
                keep_if_best(it)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(nfe=k, loss=f"{value:.4f}", **({"val": f"{history[-1][1]:.4f}"} if history else {}))
            if save_every and it % save_every == 0 and it < iters:
                save_state(it, seconds_before + time.perf_counter() - t0)
            if log is not None:
                log(it, value)
    finally:
        if bar is not None:
            bar.close()
    seconds = seconds_before + time.perf_counter() - t0
    if not finished:
        save_state(it, seconds)
    elif best[2] is not None:
        student.load_state(best[2])
    student.requires_grad_(False).eval()
    tail = losses[-max(1, len(losses) // 10):] if losses else [float("nan")]
    student.info = {**settings, "native_plans": {str(k): v for k, v in student.native_plans().items()},
                    "finished": finished, "iterations_done": it, "train_seconds": seconds, "processes": world,
                    "threads": torch.get_num_threads(), "device": str(device), "losses": losses,
                    "final_loss": sum(tail) / len(tail), "validation": history, "best_iteration": best[1],
                    "best_validation": best[0] if best[1] >= 0 else None,
                    "diffsampler_version": __version__}
    return student


def _train_iteration(plan, runner, optimizer, params, noise, batch_cond, targets, scale: float) -> float:
    """One batch through the student's plan: after every model step, its L1 loss, backward, and an
    Adam update.  Returns the batch's mean loss per pixel over the trained steps (all ranks)."""
    total = torch.zeros((), dtype=torch.float64)
    trained = 0

    def on_step(info):
        nonlocal total, trained
        if plan.afs and info.index == 0:          # the analytical first step: no model call, nothing to learn
            return
        per_sample = (info.x_next - targets[info.index].to(info.x_next.dtype)).abs().flatten(1).mean(1)
        loss = per_sample.sum() * scale
        if not bool(torch.isfinite(loss)):
            raise FloatingPointError(f"the distillation loss is not finite at step {info.index}; lower the "
                                     "learning rate")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = total + per_sample.detach().sum().to(torch.float64).cpu()
        trained += 1

    with torch.enable_grad(), evaluator_for(plan, runner, noise, batch_cond) as evaluate:
        x = noise.to(evaluate.work_dtype) * plan.sigmas[0]
        integrate(plan, evaluate, x, callback=on_step, truncate=True)
    count = torch.tensor(float(noise.shape[0] * max(1, trained)), dtype=torch.float64)
    return float(all_reduce_sum(total) / all_reduce_sum(count))


def _load_state(path, settings) -> Optional[dict]:
    """The checkpoint at ``path`` if there is one; refused when it was made with other settings."""
    if path is None:
        return None
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("format") != STATE_FORMAT:
        raise ValueError(f"{path} is not a distillation checkpoint")
    made = state["settings"]
    differ = sorted(k for k in set(made) | set(settings) if _plain(made.get(k)) != _plain(settings.get(k)))
    if differ:
        raise ValueError(f"{path} was made with other settings ({', '.join(differ)} differ): resume with the same "
                         "command, or delete it to start over")
    return state


def _plain(value):
    """Settings compared as JSON would store them (dict keys as strings, tuples as lists)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
