"""Trajectory geometry of ODE-based diffusion sampling.

Pure functions over trajectories shaped ``(points, batch, *sample_shape)`` (any sample shape, CPU
or GPU, float64 inside, chunked over the batch), after Chen et al., "A Geometric Perspective on
Diffusion Models" (2023), "On the Trajectory Regularity of ODE-based Diffusion Sampling" (ICML
2024) and "Geometric Regularity in Deterministic Sampling of Diffusion-based Generative Models"
(J. Stat. Mech. 2025).

    from diffsampler.analysis import record_trajectories, line_deviation, pca_variance
    traj = record_trajectories(denoiser, noise, solver="heun", nfe=60)
    dev = line_deviation(traj.sampling, relative=True)      # (points, batch)
    top3 = pca_variance(traj.sampling, 3)                   # (batch, 3): top-1, top-2, top-3 fractions

Modules, one job each: :mod:`.recording` (trajectories via the ``sample()`` callback),
:mod:`.measures` (deviation from the chord, distances, cosines, norms, batch summaries),
:mod:`.pca` (variance fractions, projections), :mod:`.curvature` (curvature and torsion of the
3-D projection), :mod:`.frames` (common frame, the calibrated "boomerang"), :mod:`.optimal`
(mean shift, distance between denoisers), :mod:`.gaussian` (Gaussian approximations of a
dataset as denoisers), :mod:`.report` (everything at once, figures and ``numbers.json`` for
``diffsampler analyze``), :mod:`.plots` (the figures).
"""
from .curvature import arc_length, curvature_torsion, curve_derivatives, trajectory_curvature
from .frames import FrameCoordinates, frame_coordinates, frame_spread
from .gaussian import GaussianDenoiser
from .measures import chord_length, distance_to_final, line_deviation, norms, step_cosine, step_sizes, summarize
from .optimal import denoiser_gap, kernel_weights, mean_shift_step, mean_shift_vector
from .pca import pca_project, pca_variance
from .recording import Trajectories, record_trajectories

__all__ = [
    "Trajectories", "record_trajectories",
    "chord_length", "line_deviation", "distance_to_final", "step_cosine", "norms", "step_sizes", "summarize",
    "pca_variance", "pca_project",
    "arc_length", "curve_derivatives", "curvature_torsion", "trajectory_curvature",
    "FrameCoordinates", "frame_coordinates", "frame_spread",
    "kernel_weights", "mean_shift_vector", "mean_shift_step", "denoiser_gap",
    "GaussianDenoiser",
]
