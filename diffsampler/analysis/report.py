"""Everything at once: the geometry of recorded trajectories, ``numbers.json`` and the figures.

:func:`compute_geometry` runs every measure on both trajectories of a
:class:`~diffsampler.analysis.recording.Trajectories`; :func:`geometry_numbers` turns the result
into plain JSON-ready numbers; :func:`write_report` writes the figures and ``numbers.json`` (what
``diffsampler analyze`` produces).

Conventions: the sampling trajectory is ``x_0 .. x_T`` at ``sigmas[0..T]``; the denoising
trajectory is ``D(x_0) .. D(x_{T-1})`` followed by the final sample (so both have T+1 points at
the same sigmas and share their end point).  Deviations are measured from each trajectory's own
chord (first point -> last point).  Per-sigma summaries are over the seeds.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from ..fileio import write_atomic
from .curvature import trajectory_curvature
from .frames import FrameCoordinates, frame_coordinates, frame_spread
from .optimal import denoiser_gap
from .measures import chord_length, distance_to_final, line_deviation, norms, step_cosine, summarize
from .pca import pca_variance
from .recording import Trajectories

@dataclass
class TrajectoryGeometry:
    """Measures of one kind of trajectory (sampling or denoising); (points, batch) unless noted."""

    deviation: torch.Tensor
    relative_deviation: torch.Tensor
    distance_to_final: torch.Tensor
    rms_norm: torch.Tensor
    chord: torch.Tensor              # (batch,)
    pca_variance: torch.Tensor       # (batch, 3) cumulative top-1/2/3 fractions
    curvature: torch.Tensor
    torsion: torch.Tensor
    frame: FrameCoordinates


@dataclass
class Geometry:
    sigmas: torch.Tensor             # (points,)
    sampling: TrajectoryGeometry
    denoising: TrajectoryGeometry
    step_cosine: torch.Tensor        # (points - 1, batch), sampling trajectory
    window: int
    label: str = ""
    gap: Optional[torch.Tensor] = None            # (points - 1, batch) model vs reference, RMS
    gap_reference: str = ""

    @property
    def batch(self) -> int:
        return self.sampling.deviation.shape[1]


def _measure(traj: torch.Tensor, final: torch.Tensor, window: int) -> TrajectoryGeometry:
    if traj.shape[0] >= 4:
        kappa, tau = trajectory_curvature(traj, window=window)
    else:
        kappa = tau = torch.full(traj.shape[:2], float("nan"), dtype=torch.float64, device=traj.device)
    return TrajectoryGeometry(
        deviation=line_deviation(traj), relative_deviation=line_deviation(traj, relative=True),
        distance_to_final=distance_to_final(traj, final), rms_norm=norms(traj, rms=True),
        chord=chord_length(traj), pca_variance=pca_variance(traj, 3),
        curvature=kappa, torsion=tau, frame=frame_coordinates(traj))


def compute_geometry(traj: Trajectories, *, window: int = 7, label: str = "") -> Geometry:
    """All measures of the sampling and denoising trajectories of ``traj`` (see the module doc)."""
    if traj.steps < 2:
        raise ValueError(f"trajectory geometry needs at least 2 steps (3 points), got {traj.steps}")
    final = traj.samples
    return Geometry(
        sigmas=traj.sigmas, sampling=_measure(traj.sampling, final, window),
        denoising=_measure(traj.denoising_aligned, final, window),
        step_cosine=step_cosine(traj.sampling, final), window=window, label=label)


def add_reference_gap(geom: Geometry, traj: Trajectories, denoiser, reference, name: str, *,
                      cond: Optional[Dict[str, Any]] = None, batch_size: int = 256,
                      dtype: Optional[torch.dtype] = None) -> Geometry:
    """Evaluate ``denoiser`` (with ``cond``) and ``reference`` (unconditional) at the states x_0..x_{T-1}
    of the sampling trajectories and store their RMS distance in ``geom.gap``."""
    geom.gap = denoiser_gap(traj.sampling[:-1], traj.sigmas[:-1], denoiser, reference, cond=cond,
                            batch_size=batch_size, dtype=dtype)
    geom.gap_reference = name
    return geom


# -- numbers ---------------------------------------------------------------------------------

def _clean(x):
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _list(t: torch.Tensor) -> List[float]:
    return [float(v) for v in t.detach().to(torch.float64).cpu()]


def _profile(values: torch.Tensor, keys=("mean", "std")) -> Dict[str, List[float]]:
    s = summarize(values)
    return {k: _list(s[k]) for k in keys}


def _scalar(values: torch.Tensor) -> Dict[str, float]:
    s = summarize(values.reshape(1, -1))
    return {k: float(s[k][0]) for k in ("mean", "std", "min", "max")}


def _trajectory_numbers(g: TrajectoryGeometry, sigmas: torch.Tensor) -> Dict[str, Any]:
    mean_rel = summarize(g.relative_deviation)["mean"]
    i = int(torch.nan_to_num(mean_rel, nan=-1.0).argmax())
    per_traj_max, per_traj_arg = torch.nan_to_num(g.relative_deviation, nan=-1.0).max(dim=0)
    pca = {f"top{k + 1}": _scalar(g.pca_variance[:, k]) for k in range(3)}
    return {
        "pca_variance": pca,
        "max_relative_deviation": {
            "of_mean_profile": float(mean_rel[i]), "at_sigma": float(sigmas[i]),
            "per_trajectory": _scalar(per_traj_max),
            "per_trajectory_at_sigma_median": float(sigmas[per_traj_arg].median()),
        },
        "chord_length": _scalar(g.chord),
        "frame": {"spread_mean": float(frame_spread(g.frame.coords).mean()),
                  "residual_max": float(torch.nan_to_num(g.frame.residual).max())},
        "profiles": {
            "relative_deviation": _profile(g.relative_deviation),
            "deviation": _profile(g.deviation),
            "distance_to_final": _profile(g.distance_to_final),
            "rms_norm": _profile(g.rms_norm),
            "curvature": _profile(g.curvature, ("median", "mean")),
            "torsion_abs": _profile(g.torsion.abs(), ("median", "mean")),
            "bulge_coordinate": _profile(g.frame.coords[..., 1]),
        },
    }


def geometry_numbers(geom: Geometry) -> Dict[str, Any]:
    """Plain numbers (JSON-ready; NaN -> None) summarizing a :class:`Geometry`."""
    out = {
        "sigmas": _list(geom.sigmas),
        "seeds_measured": geom.batch,
        "curvature_window": geom.window,
        "sampling": _trajectory_numbers(geom.sampling, geom.sigmas),
        "denoising": _trajectory_numbers(geom.denoising, geom.sigmas),
        "step_cosine": _profile(geom.step_cosine),
    }
    if geom.gap is not None:
        out["reference_gap"] = {"reference": geom.gap_reference, "sigmas": _list(geom.sigmas[:-1]),
                                **_profile(geom.gap)}
    return _clean(out)


def summary_line(numbers: Dict[str, Any]) -> str:
    s, d = numbers["sampling"], numbers["denoising"]
    p, dev = s["pca_variance"], s["max_relative_deviation"]
    return (f"sampling trajectories: top-1/2/3 PCA variance {p['top1']['mean']:.6f} / {p['top2']['mean']:.6f} / "
            f"{p['top3']['mean']:.6f} (outside the top 2: {1 - p['top2']['mean']:.1e}), "
            f"max deviation {100 * dev['of_mean_profile']:.2f}% of the chord at sigma {dev['at_sigma']:.3g}; "
            f"denoising: top-2 {d['pca_variance']['top2']['mean']:.4f}, max deviation "
            f"{100 * d['max_relative_deviation']['of_mean_profile']:.1f}% at sigma "
            f"{d['max_relative_deviation']['at_sigma']:.3g}")


# -- files -----------------------------------------------------------------------------------

def _save(fig, path: Path) -> None:
    import io
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)                  # Agg whatever the session's backend: no display needed
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    write_atomic(path, buffer.getvalue())


def write_report(traj: Trajectories, geom: Geometry, out_dir, *, info: Optional[Dict[str, Any]] = None,
                 show: int = 8, strips: int = 4, seed_names: Optional[List[str]] = None, log=None) -> Dict[str, Any]:
    """Write the figures and ``numbers.json`` into ``out_dir``; return the numbers.

    ``info`` (model, solver, seeds, ...) is stored at the top of ``numbers.json``; ``show``
    trajectories go into the 3-D figure and ``strips`` seeds into the image strips (only for
    image-shaped samples).
    """
    from . import plots

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda msg: None)
    start = time.perf_counter()
    figures = {
        "deviation.png": plots.plot_deviation(geom),
        "distance.png": plots.plot_distances(geom),
        "pca_variance.png": plots.plot_pca_variance(geom),
        "projection_3d.png": plots.plot_projection_3d(geom, count=show),
        "curvature_torsion.png": plots.plot_curvature(geom),
    }
    strip_fig = plots.plot_strips(traj, indices=list(range(min(strips, traj.batch))), labels=seed_names,
                                  label=geom.label) if strips > 0 else None
    if strip_fig is not None:
        figures["strips.png"] = strip_fig
    gap_fig = plots.plot_gap(geom)
    if gap_fig is not None:
        figures["denoiser_gap.png"] = gap_fig
    for name, fig in figures.items():
        _save(fig, out_dir / name)
        log(f"  wrote {out_dir / name}")
    numbers = {**(info or {}), **geometry_numbers(geom), "figures": sorted(figures),
               "figure_seconds": round(time.perf_counter() - start, 3)}
    numbers = _clean(numbers)
    write_atomic(out_dir / "numbers.json", (json.dumps(numbers, indent=1) + "\n").encode())
    log(f"  wrote {out_dir / 'numbers.json'}")
    return numbers
