"""GITS: time schedules fitted to a model by dynamic programming over its own trajectories.

Chen et al., "On the Trajectory Regularity of ODE-based Diffusion Sampling" (ICML 2024).  Sampling
trajectories of one model share a regular shape, so a schedule fitted on a few hundred warm-up
trajectories transfers to all samples:

1. Teacher: a solver (default iPNDM) on a fine grid of the base schedule (default 61 points of
   polynomial rho=7) records the state x_i and the direction d_i = (x_i - D(x_i, sigma_i)) / sigma_i
   at every grid point, for ``warmup`` seeds.
2. Cost matrix: C[i, j] (i < j) is the batch mean of the distance between one Euler step from
   teacher point i to sigma_j, ``x_i + (sigma_j - sigma_i) d_i``, and the teacher point x_j.
   Metrics: ``l2`` and ``l1`` norms, and ``dev`` (the paper's recommended one): the step's
   deviation from the straight line through the trajectory's start and end, minus the teacher's
   own deviation at j (signed, as in the paper's code).  ``dev`` sees only error *across* that
   chord: a jump that lands on the chord at the wrong place costs nothing.  Where trajectories are
   nearly straight (measured on a synthetic isotropic mixture; flow-matching models aim for it)
   every long jump then looks free and the DP ends on one jump from sigma ~6 to sigma_min; use
   ``l2`` there (evaluation/results/gits.md has both).  ``solver`` prices a jump by the student's
   own update instead of an Euler step (:func:`solver_jump_costs`): the multistep student keeps its
   history from the teacher's trajectory, so a long jump by a high-order solver is not charged
   Euler's error.
   (:func:`warm_up` does steps 1-2 once per model; every solver and NFE reuses it; :func:`warm_ups`
   builds the matrices of several metrics from one teacher run.)
3. Dynamic programming: K steps from point 0 to the last point minimizing
   ``C[p0, p1] + coeff * C[p1, p2] + coeff^2 * C[p2, p3] + ...`` (the paper's coefficient on the
   remaining-path cost), solved with back-pointers.
4. AFS: with an analytical first step the first interval is free, so one more point is inserted
   between the first two, chosen by the student's endpoint distance to the teacher's.

The pure parts (:func:`cost_matrix`, :func:`dp_schedule`, :func:`dp_schedules`) work on tensors;
:func:`optimize_schedule` runs the whole search for any denoiser and returns a
:class:`~diffsampler.schedules.Schedule` that ``sample(schedule=...)`` accepts and ``.save()`` writes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import __version__
from . import schedules as schedules_module
from .distributed import all_reduce_sum, rank_and_world
from .models.base import sigma_range
from .models.identity import model_fingerprint
from .sampling import sample
from .seeds import seed_noise
from .solvers import get_solver

METRICS = ("l2", "l1", "dev", "solver")


@dataclass
class Teacher:
    """Teacher trajectories: ``states`` (T+1, B, ...) at every grid point, ``directions`` (T, B, ...)."""

    sigmas: torch.Tensor
    states: torch.Tensor
    directions: torch.Tensor


def teacher_trajectories(denoiser, noise: torch.Tensor, sigmas, solver="ipndm", cond=None, on_step=None,
                         **solver_options) -> Teacher:
    """Run the teacher on the fine grid ``sigmas`` and record states and directions (float64);
    ``on_step()`` is called after every teacher step (progress)."""
    states, directions = [], []

    def record(step):
        states.append(step.x.to(torch.float64))
        directions.append(((step.x - step.denoised) / step.sigma).to(torch.float64))
        if on_step is not None:
            on_step()

    with torch.inference_mode():        # a few % faster than sample()'s no_grad on CPU (measured)
        result = sample(denoiser, noise, solver=solver, sigmas=sigmas, cond=cond, callback=record, **solver_options)
    states.append(result.samples.to(torch.float64) if result.samples.dtype != torch.float64 else result.samples)
    return Teacher(schedules_module.check_sigmas(sigmas), torch.stack(states), torch.stack(directions))


def _l2_jump_costs(x: torch.Tensor, d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(T, B, T+1) per-sample ``||x_i + h_ij d_i - x_j||`` from inner products, without forming the jumps.

    ``|x_i - x_j|^2 + 2 h <d_i, x_i - x_j> + h^2 |d_i|^2`` with the Gram matrices of each sample's
    states and directions (float64; one matrix product instead of T^2/2 (B, D) differences)."""
    xt = x.transpose(0, 1)                                    # (B, T+1, D)
    dt = d.transpose(0, 1)                                    # (B, T, D)
    xx = torch.bmm(xt, xt.transpose(1, 2))                    # <x_i, x_j>
    dx = torch.bmm(dt, xt.transpose(1, 2))                    # <d_i, x_j>
    sq = xx.diagonal(dim1=1, dim2=2)                          # |x_i|^2
    dd = (dt * dt).sum(-1)                                    # |d_i|^2
    dxi = dx.diagonal(dim1=1, dim2=2)                         # <d_i, x_i>
    hh = h[None]                                              # (1, T, T+1)
    value = (sq[:, :-1, None] + sq[:, None, :] - 2 * xx[:, :-1, :]
             + 2 * hh * (dxi[:, :, None] - dx) + hh ** 2 * dd[:, :, None])
    return value.clamp_min(0).sqrt().permute(1, 0, 2)         # (T, B, T+1)


def _dev_jump_costs(x: torch.Tensor, d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(T, B, T+1) per-sample ``dev(x_i + h_ij d_i) - dev(x_j)``, dev = distance from the chord x_0 -> x_T.

    With p_i, q_i the parts of ``x_i - x_0`` and ``d_i`` perpendicular to the chord, the jump's
    deviation is ``|p_i + h q_i| = sqrt(|p_i|^2 + 2 h <p_i, q_i> + h^2 |q_i|^2)``: a few scalars per
    teacher point and sample."""
    start, end = x[0], x[-1]
    unit = (end - start) / (end - start).norm(dim=-1, keepdim=True).clamp_min(1e-300)
    rel = x - start
    perp = rel - (rel * unit).sum(-1, keepdim=True) * unit    # p_i, (T+1, B, D)
    dperp = d - (d * unit).sum(-1, keepdim=True) * unit       # q_i, (T, B, D)
    pp = (perp * perp).sum(-1)                                # (T+1, B)
    pq = (perp[:-1] * dperp).sum(-1)                          # (T, B)
    qq = (dperp * dperp).sum(-1)                              # (T, B)
    teacher_dev = pp.sqrt()
    hh = h[:, None, :]                                        # (T, 1, T+1)
    jumped = (pp[:-1, :, None] + 2 * hh * pq[:, :, None] + hh ** 2 * qq[:, :, None]).clamp_min(0).sqrt()
    return jumped - teacher_dev.t()[None]                     # (T, B, T+1)


class _Replay:
    """An evaluator that answers the teacher's recorded estimate at each teacher point."""

    def __init__(self, denoised: Dict[float, torch.Tensor]):
        self.denoised = denoised

    def __call__(self, x, sigma):
        return self.denoised[float(sigma)]


def solver_jump_costs(student, states: torch.Tensor, directions: torch.Tensor, sigmas,
                      reduction: str = "mean") -> torch.Tensor:
    """(T+1, T+1) cost of the student's own update from teacher point i to sigma_j: the L2 distance
    between ``student.step`` from x_i and the teacher's x_j, per sample, reduced over the batch.

    The student's history at point i (its multistep state) is what it would hold after walking the
    teacher's own grid up to i with the teacher's model outputs: exact for single-step solvers,
    an approximation for multistep ones (whose real history lies on the coarse path).  The step
    is taken as one step of a longer grid, except a jump to the last point, which is priced as the
    final step (solvers that lower their order there do so).  Only one-evaluation
    solvers can be priced this way (their one evaluation is the teacher's at x_i)."""
    if student.evals_per_step != 1:
        raise ValueError(f"metric 'solver' prices one-evaluation solvers; {student.name} makes "
                         f"{student.evals_per_step} evaluations per step: use l2 or dev")
    n = states.shape[0]
    grid = [float(s) for s in sigmas]
    x = states.to(torch.float64)
    denoised = {grid[m]: x[m] - grid[m] * directions[m].to(torch.float64) for m in range(n - 1)}
    denoised[grid[-1]] = x[-1]               # at sigma_min the estimate is the sample itself
    replay = _Replay(denoised)
    cost = torch.full((n, n), float("inf"), dtype=torch.float64)
    state = student.init_state()
    for i in range(n - 1):
        for j in range(i + 1, n):
            tail = () if j == n - 1 else tuple(s * 1e-3 for s in grid[-3:])    # the last jump is the last step
            path = tuple(grid[:i + 1]) + (grid[j],) + tail
            jumped, _, _ = student.step(replay, x[i], i, path, state)
            per_sample = (jumped - x[j]).flatten(1).norm(dim=1)
            cost[i, j] = per_sample.sum() if reduction == "sum" else per_sample.mean()
        _, _, state = student.step(replay, x[i], i, tuple(grid), state)      # walk the teacher grid
    return cost


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {', '.join(METRICS)}")


def cost_matrix(states: torch.Tensor, directions: torch.Tensor, sigmas, metric: str = "l2",
                reduction: str = "mean", max_elements: int = 2 ** 25, student=None) -> torch.Tensor:
    """The (T+1, T+1) float64 cost matrix of one-step Euler jumps between teacher points.

    ``C[i, j]`` for i < j is the ``reduction`` over the batch of the metric of
    ``x_i + (sigma_j - sigma_i) d_i`` against ``x_j``; entries with j <= i are +inf.
    ``dev`` is signed, as in the paper's code: the jump's distance from the chord x_0 -> x_T minus
    the teacher's own at j (negative when the jump lands nearer the chord than the teacher).
    ``l2`` and ``dev`` come from per-sample inner products (float64); ``l1`` forms the jumps,
    chunked so at most ``max_elements`` values exist at once.  ``reduction="sum"`` lets callers
    accumulate over batches and processes.
    """
    _check_metric(metric)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if metric == "solver":
        if student is None:
            raise ValueError("metric 'solver' needs the student solver (student=...)")
        return solver_jump_costs(student, states, directions, sigmas, reduction)
    n, batch = states.shape[0], states.shape[1]
    if directions.shape[0] != n - 1 or len(sigmas) != n:
        raise ValueError(f"need T+1 states, T directions and T+1 sigmas, got {n}, {directions.shape[0]}, {len(sigmas)}")
    x = states.reshape(n, batch, -1).to(torch.float64)
    d = directions.reshape(n - 1, batch, -1).to(torch.float64)
    sig = torch.as_tensor(sigmas, dtype=torch.float64, device=x.device)
    cost = torch.full((n, n), float("inf"), dtype=torch.float64, device=x.device)
    upper = torch.ones(n - 1, n, dtype=torch.bool, device=x.device).triu(1)
    if metric in ("l2", "dev"):
        h = sig[None, :] - sig[:-1, None]                     # h[i, j] = sigma_j - sigma_i
        per_sample = (_l2_jump_costs if metric == "l2" else _dev_jump_costs)(x, d, h)
        reduced = per_sample.sum(1) if reduction == "sum" else per_sample.mean(1)
        cost[:-1][upper] = reduced[upper]
        return cost
    chunk = max(1, max_elements // max(1, x[0].numel()))
    for i in range(n - 1):
        for lo in range(i + 1, n, chunk):
            hi = min(n, lo + chunk)
            step = (sig[lo:hi] - sig[i])[:, None, None]
            jumped = x[i][None] + step * d[i][None]          # (hi-lo, B, D)
            per_sample = (jumped - x[lo:hi]).abs().sum(-1)
            cost[i, lo:hi] = per_sample.sum(1) if reduction == "sum" else per_sample.mean(1)
    return cost


def _dp_tables(cost: np.ndarray, max_steps: int, coeff: float) -> Tuple[np.ndarray, np.ndarray]:
    """V[k, j]: least discounted cost from point j to the end in k steps; P[k, j]: the next point."""
    n = cost.shape[0]
    last = n - 1
    values = np.full((max_steps + 1, n), np.inf)
    pointers = np.full((max_steps + 1, n), -1, dtype=np.int64)
    values[1, :last] = cost[:last, last]
    pointers[1, :last] = last
    later = np.triu(np.ones((n, n), dtype=bool), k=1)[:, :last]       # i > j, i < last
    for k in range(2, max_steps + 1):
        total = np.where(later, cost[:, :last] + coeff * values[k - 1, :last][None, :], np.inf)
        pointers[k] = total.argmin(axis=1)
        values[k] = total[np.arange(n), pointers[k]]
    return values, pointers


def _backtrack(pointers: np.ndarray, num_steps: int) -> List[int]:
    path = [0]
    for k in range(num_steps, 0, -1):
        path.append(int(pointers[k, path[-1]]))
    return path


def _check_steps(num_steps: int, n: int) -> None:
    if not 1 <= num_steps <= n - 1:
        raise ValueError(f"cannot choose {num_steps} steps from a teacher grid of {n} points: "
                         f"num_steps must lie in [1, {n - 1}] (use more teacher steps)")


def student_steps(nfe: int, solver="ipndm", afs: bool = False, grid_points: int = 61,
                  solver_options: Optional[dict] = None):
    """(student solver, steps the DP chooses) for ``nfe``: the student's steps at that NFE, one fewer
    with AFS (its free first point is searched after the DP).  Refuses, with the values that work,
    an NFE the solver cannot use and a teacher grid with too few points."""
    student = get_solver(solver, **(solver_options or {}))
    steps = student.steps_for_nfe(nfe, afs) - int(afs)
    _check_steps(steps, grid_points)
    return student, steps


def dp_schedule(cost, num_steps: int, coeff: float = 1.15) -> List[int]:
    """Indices (0 = first point, last = T) of the K-step path minimizing the discounted cost."""
    cost = np.asarray(torch.as_tensor(cost, dtype=torch.float64).cpu())
    _check_steps(num_steps, cost.shape[0])
    _, pointers = _dp_tables(cost, num_steps, coeff)
    return _backtrack(pointers, num_steps)


def dp_schedules(cost, num_steps: Iterable[int], coeffs: Iterable[float]) -> Dict[Tuple[float, int], List[int]]:
    """Sweep: one DP table per coefficient serves every step count. Keys are (coeff, num_steps)."""
    cost = np.asarray(torch.as_tensor(cost, dtype=torch.float64).cpu())
    num_steps = sorted(set(num_steps))
    for k in num_steps:
        _check_steps(k, cost.shape[0])
    out = {}
    for coeff in coeffs:
        _, pointers = _dp_tables(cost, num_steps[-1], coeff)
        for k in num_steps:
            out[(coeff, k)] = _backtrack(pointers, k)
    return out


def path_cost(cost, path: Sequence[int], coeff: float) -> float:
    """The objective the DP minimizes, evaluated on one path."""
    cost = torch.as_tensor(cost, dtype=torch.float64)
    return float(sum(coeff ** m * cost[a, b] for m, (a, b) in enumerate(zip(path, path[1:]))))


def _split_for_rank(seeds: List[int]) -> List[int]:
    rank, world = rank_and_world()
    return seeds[rank::world]


@dataclass
class WarmUp:
    """The solver-independent part of a GITS search: the teacher grid and the mean cost matrix.

    One warm-up serves every student solver and NFE (:meth:`schedule` is a DP away), as long as
    AFS is not used (the AFS point is searched against the kept teacher endpoints)."""

    grid: torch.Tensor
    cost: torch.Tensor
    settings: Dict[str, object]
    timings: Dict[str, float]
    kept: List[Tuple[torch.Tensor, Optional[dict], torch.Tensor]]     # (noise, cond, teacher endpoint)
    denoiser: object = None

    def schedule(self, nfe: int, solver="ipndm", afs: bool = False, coeff: float = 1.15,
                 solver_options: Optional[dict] = None) -> schedules_module.Schedule:
        student, dp_steps = student_steps(nfe, solver, afs, len(self.grid), solver_options)
        if self.settings.get("metric") == "solver" and (student.label != self.settings["priced_student"] or
                                                        dict(solver_options or {}) != self.settings["priced_options"]):
            raise ValueError(f"this warm-up priced jumps by {self.settings['priced_student']}'s own update: make the "
                             f"schedule for that solver, or warm up again for {student.label}")
        timings = dict(self.timings)
        t0 = time.perf_counter()
        path = dp_schedule(self.cost, dp_steps, coeff)
        timings["dp_s"] = time.perf_counter() - t0
        if afs:
            if not self.kept:
                raise ValueError("this warm-up kept no teacher endpoints: run warm_up(..., keep_endpoints=True) for AFS")
            t0 = time.perf_counter()
            path = _choose_afs_point(self.denoiser, student, self.grid, path, self.kept)
            timings["afs_s"] = time.perf_counter() - t0
        info = {"made_by": "gits", "nfe": nfe, "solver": student.name, "solver_options": dict(solver_options or {}),
                "afs": afs, **self.settings,
                "coeff": coeff, "indices": path, "timings": timings, "diffsampler_version": __version__}
        return schedules_module.Schedule(self.grid[path], info)


def warm_ups(denoiser, shape: Sequence[int], *, metrics: Sequence[str] = ("dev",), teacher="ipndm",
             teacher_steps: int = 60, base_schedule="polynomial", base_options: Optional[dict] = None,
             sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, warmup: int = 256,
             first_seed: int = 0, batch: int = 64, cond: Optional[Callable[[List[int]], dict]] = None,
             dtype=torch.float32, device="cpu", model_name: Optional[str] = None, progress: bool = False,
             teacher_options: Optional[dict] = None, keep_endpoints: bool = False, student=None,
             student_options: Optional[dict] = None) -> Dict[str, WarmUp]:
    """Teacher trajectories for ``warmup`` seeds and their mean cost matrix (steps 1-2 of GITS), one
    :class:`WarmUp` per metric from a single teacher run.

    ``dev``, the default of :func:`warm_up`, is the one the paper's code recommends (on the bundled
    Fashion-MNIST model it gives better low-NFE iPNDM schedules than ``l2``; see
    evaluation/results/gits.md).  ``cond`` maps a list of warm-up seeds to the conditioning of that
    batch (e.g. random labels).  The warm-up seeds are ``first_seed .. first_seed + warmup - 1``;
    under torchrun they are split across ranks and the cost matrices are summed over all of them.
    """
    metrics = list(dict.fromkeys(metrics))
    for metric in metrics:
        _check_metric(metric)                           # before the teacher runs
    priced = None
    if "solver" in metrics:
        if student is None:
            raise ValueError("metric 'solver' prices the student's own update: give the student solver")
        priced = get_solver(student, **(student_options or {}))
        if priced.evals_per_step != 1:
            raise ValueError(f"metric 'solver' prices one-evaluation solvers; {priced.name} makes "
                             f"{priced.evals_per_step} evaluations per step: use l2 or dev")
    default_min, default_max = sigma_range(denoiser)
    sigma_min = default_min if sigma_min is None else sigma_min
    sigma_max = default_max if sigma_max is None else sigma_max
    fixed, base_fn = schedules_module.resolve(base_schedule, base_options)
    grid = fixed.sigmas if fixed is not None else base_fn(teacher_steps, sigma_min, sigma_max)
    grid = schedules_module.check_sigmas(grid)
    shape = tuple(shape)
    seeds = _split_for_rank(list(range(first_seed, first_seed + warmup)))
    timings = {"teacher_s": 0.0, "cost_matrix_s": 0.0, "dp_s": 0.0, "afs_s": 0.0}
    cost_sums = {metric: torch.zeros(len(grid), len(grid), dtype=torch.float64) for metric in metrics}
    batches = [seeds[k:k + batch] for k in range(0, len(seeds), batch)]
    kept = []
    ticks = None
    if progress:                   # one tick per teacher step of every batch, so the ETA is live
        from .progress import bar
        ticks = bar(total=len(batches) * (len(grid) - 1), desc="GITS warm-up", unit="step")
    for chunk in batches:
        noise = seed_noise(chunk, shape, dtype=dtype, device=device)
        batch_cond = cond(chunk) if cond is not None else None
        t0 = time.perf_counter()
        traj = teacher_trajectories(denoiser, noise, grid, solver=teacher, cond=batch_cond,
                                    on_step=ticks.update if ticks is not None else None, **(teacher_options or {}))
        t1 = time.perf_counter()
        for metric in metrics:
            cost_sums[metric] += cost_matrix(traj.states, traj.directions, grid, metric=metric, reduction="sum",
                                             student=priced).cpu()
        timings["teacher_s"] += t1 - t0
        timings["cost_matrix_s"] += time.perf_counter() - t1
        if keep_endpoints:
            kept.append((noise, batch_cond, traj.states[-1]))
    if ticks is not None:
        ticks.close()
    count = all_reduce_sum(torch.tensor([float(len(seeds))], dtype=torch.float64))
    settings = {"model": model_name, "model_fingerprint": model_fingerprint(denoiser), "shape": list(shape), "sigma_min": float(grid[-1]), "sigma_max": float(grid[0]),
                "teacher": teacher, "teacher_steps": len(grid) - 1,
                "base_schedule": base_schedule if isinstance(base_schedule, str) else "custom",
                "base_options": dict(base_options or {}), "warmup": int(count.item()), "first_seed": first_seed,
                "processes": rank_and_world()[1]}
    out = {}
    for metric in metrics:
        cost = all_reduce_sum(cost_sums[metric]) / count
        cost.masked_fill_(torch.ones_like(cost, dtype=torch.bool).tril(), float("inf"))
        extra = {"priced_student": priced.label, "priced_options": dict(student_options or {})} \
            if metric == "solver" else {}
        out[metric] = WarmUp(grid, cost, {**settings, "metric": metric, **extra}, dict(timings), kept, denoiser)
    return out


def warm_up(denoiser, shape: Sequence[int], *, metric: str = "dev", **options) -> WarmUp:
    """:func:`warm_ups` for one metric (default ``dev``); ``options`` are those of :func:`warm_ups`."""
    return warm_ups(denoiser, shape, metrics=(metric,), **options)[metric]


def optimize_schedule(denoiser, shape: Sequence[int], nfe: int = 5, solver="ipndm", *, coeff: float = 1.15,
                      afs: bool = False, solver_options: Optional[dict] = None, **warm_up_options
                      ) -> schedules_module.Schedule:
    """Fit a GITS schedule for ``solver`` at ``nfe`` on ``denoiser``; returns a Schedule.

    ``warm_up_options`` are those of :func:`warm_up` (metric, teacher, teacher_steps,
    base_schedule, warmup, cond, ...).  To tune several solvers or NFEs on one model, call
    :func:`warm_up` once and :meth:`WarmUp.schedule` for each."""
    student_steps(nfe, solver, afs, warm_up_options.get("teacher_steps", 60) + 1, solver_options)  # before the warm-up
    warm = warm_up(denoiser, shape, keep_endpoints=afs, **warm_up_options)
    return warm.schedule(nfe, solver, afs=afs, coeff=coeff, solver_options=solver_options)


def _choose_afs_point(denoiser, student, grid, path, kept) -> List[int]:
    """Insert the free first point k in (path[0], path[1]) that brings the student closest to the teacher."""
    best, best_path = float("inf"), None
    for k in range(path[0] + 1, path[1]):
        candidate = [path[0], k] + path[1:]
        total, count = 0.0, 0
        for noise, cond, target in kept:
            out = sample(denoiser, noise, solver=student, sigmas=grid[candidate], afs=True, cond=cond).samples
            total += float((out.to(torch.float64) - target).flatten(1).norm(dim=1).sum())
            count += noise.shape[0]
        distance = float(all_reduce_sum(torch.tensor([total], dtype=torch.float64))) / \
            float(all_reduce_sum(torch.tensor([float(count)], dtype=torch.float64)))
        if distance < best:
            best, best_path = distance, candidate
    if best_path is None:
        raise ValueError("no room for the AFS point: the first two chosen points are adjacent on the teacher grid; "
                         "use more teacher steps")
    return best_path
