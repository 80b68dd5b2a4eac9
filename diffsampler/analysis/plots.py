"""Figures of trajectory geometry (matplotlib, no pyplot state: every function returns a Figure).

Each function takes the :class:`~diffsampler.analysis.report.Geometry` computed by
:func:`~diffsampler.analysis.report.compute_geometry` (or recorded
:class:`~diffsampler.analysis.recording.Trajectories` for the image strips) and returns a
``matplotlib.figure.Figure``; ``fig.savefig(path)`` writes it with the Agg backend, and a notebook
displays it.  Sigma axes are logarithmic and run from high noise (left) to low noise (right), the
direction of sampling.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

SAMPLING, DENOISING = "tab:blue", "tab:orange"


def _np(t) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t, dtype=np.float64)


def _band(ax, sigmas, values, color, label, center="mean", log_values=False):
    """Plot the batch mean (or median) of (points, batch) values vs sigma with a +-1 std (or IQR) band.

    ``log_values``: for a logarithmic value axis, values <= 0 (e.g. the deviation at the endpoints,
    0 by definition) are left out and the band's lower edge is kept positive."""
    v = _np(values)
    s = _np(sigmas)[: v.shape[0]]
    if log_values:
        v = np.where(v > 0, v, np.nan)
    with np.errstate(invalid="ignore"), _quiet():
        if center == "median":
            mid = np.nanmedian(v, axis=1)
            lo, hi = np.nanpercentile(v, 25, axis=1), np.nanpercentile(v, 75, axis=1)
        else:
            mid, sd = np.nanmean(v, axis=1), np.nanstd(v, axis=1)
            lo, hi = mid - sd, mid + sd
            if log_values:
                lo = np.where(lo > 0, lo, mid * 0.5)
    ax.plot(s, mid, color=color, label=label, lw=1.6)
    ax.fill_between(s, lo, hi, color=color, alpha=0.2, lw=0)


class _quiet:
    """Silence numpy's all-NaN-slice warnings inside a block."""

    def __enter__(self):
        import warnings
        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _sigma_axis(ax, label=True):
    ax.set_xscale("log")
    ax.invert_xaxis()
    if label:
        ax.set_xlabel("sigma (sampling runs left to right)")
    ax.grid(True, which="major", alpha=0.3)


def _title(fig, geom, what):
    fig.suptitle(f"{what} - {geom.label}" if geom.label else what, fontsize=11)


def plot_deviation(geom) -> Figure:
    """Deviation from the start-end chord vs sigma: relative to the chord length for the sampling
    and the denoising trajectory (linear scale), and both in data units (log scale)."""
    fig = Figure(figsize=(15, 4.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _band(ax1, geom.sigmas, geom.sampling.relative_deviation, SAMPLING, "sampling x_i")
    ax1.set_title("sampling trajectory")
    _band(ax2, geom.sigmas, geom.denoising.relative_deviation, DENOISING, "denoising D(x_i)")
    ax2.set_title("denoising trajectory")
    for ax in (ax1, ax2):
        ax.set_ylabel("deviation / chord length")
        ax.set_ylim(bottom=0)
        _sigma_axis(ax)
        ax.legend()
    inner = slice(1, -1)                       # the endpoints lie on the chord by definition
    _band(ax3, geom.sigmas[inner], geom.sampling.deviation[inner], SAMPLING, "sampling x_i", log_values=True)
    _band(ax3, geom.sigmas[inner], geom.denoising.deviation[inner], DENOISING, "denoising D(x_i)", log_values=True)
    ax3.set_ylabel("deviation (L2, data units)")
    ax3.set_yscale("log")
    _sigma_axis(ax3)
    ax3.legend()
    ax3.set_title("absolute (mean +- std over seeds)")
    _title(fig, geom, "Distance from the straight line start -> end")
    return fig


def plot_distances(geom) -> Figure:
    """Distance to the final sample, cosine of the step with the direction to it, and RMS norms."""
    fig = Figure(figsize=(14, 4.2), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(1, 3)
    _band(ax1, geom.sigmas, geom.sampling.distance_to_final, SAMPLING, "|x_i - x_final|", log_values=True)
    _band(ax1, geom.sigmas, geom.denoising.distance_to_final, DENOISING, "|D(x_i) - x_final|", log_values=True)
    ax1.set_yscale("log")
    ax1.set_ylabel("L2 distance to the final sample")
    ax1.set_title("the denoising trajectory converges first")
    _sigma_axis(ax1)
    ax1.legend()
    _band(ax2, geom.sigmas, geom.step_cosine, SAMPLING, "cos(x_{i+1} - x_i, x_final - x_i)")
    ax2.set_ylabel("cosine")
    ax2.set_title("step direction vs direction to the final sample")
    _sigma_axis(ax2)
    ax2.legend()
    _band(ax3, geom.sigmas, geom.sampling.rms_norm, SAMPLING, "RMS of x_i", log_values=True)
    _band(ax3, geom.sigmas, geom.denoising.rms_norm, DENOISING, "RMS of D(x_i)", log_values=True)
    s = _np(geom.sigmas)
    ax3.plot(s, s, color="gray", ls=":", lw=1, label="sigma")
    ax3.set_yscale("log")
    ax3.set_ylabel("|x| / sqrt(dim)")
    ax3.set_title("magnitudes")
    _sigma_axis(ax3)
    ax3.legend()
    _title(fig, geom, "Distances, directions and norms")
    return fig


def plot_pca_variance(geom) -> Figure:
    """Bars: fraction of each trajectory's variance in its top 1, 2, 3 principal components (left)
    and the fraction left outside them (right, log scale: fractions near 1 are told apart there)."""
    fig = Figure(figsize=(12, 4.2), layout="constrained")
    ax, ax2 = fig.subplots(1, 2)
    ks = np.arange(1, 4)
    width = 0.38
    lows = []
    for shift, traj, color, label in ((-width / 2, geom.sampling, SAMPLING, "sampling"),
                                      (width / 2, geom.denoising, DENOISING, "denoising")):
        v = _np(traj.pca_variance)
        with _quiet():
            mean, sd = np.nanmean(v, axis=0), np.nanstd(v, axis=0)
            rest = np.nanmean(np.clip(1 - v, 1e-17, None), axis=0)
        bars = ax.bar(ks + shift, mean, width, yerr=sd, color=color, label=label, capsize=3)
        for bar, m in zip(bars, mean):
            ax.text(bar.get_x() + bar.get_width() / 2, m, f"{m:.5f}" if m > 0.999 else f"{m:.4f}",
                    ha="center", va="bottom", fontsize=8)
        ax2.bar(ks + shift, rest, width, color=color, label=label)
        lows.append(np.nanmin(mean - sd))
    low = float(np.clip(min(lows) - 0.05 * (1 - min(lows)) - 0.01, 0, 0.99))
    ax.set_ylim(low, 1.0 + 0.08 * (1 - low))
    ax.set_xticks(ks, [f"top {k}" for k in ks])
    ax.set_ylabel("fraction of the trajectory's variance (cumulative)")
    ax.set_title("mean +- std over seeds")
    ax.legend(loc="lower right")
    ax2.set_yscale("log")
    ax2.set_xticks(ks, [f"outside top {k}" for k in ks])
    ax2.set_ylabel("1 - fraction (mean over seeds)")
    ax2.set_title("variance left outside the top components")
    ax2.legend()
    _title(fig, geom, "PCA of each trajectory")
    return fig


def plot_projection_3d(geom, count: int = 8) -> Figure:
    """The calibrated picture: trajectories in their own (chord, bulge, third) frames, in units of
    the chord, in 3-D (left) and in the chord-bulge plane (right)."""
    fig = Figure(figsize=(12.5, 5), layout="constrained")
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax2 = fig.add_subplot(1, 2, 2)
    n = min(count, geom.batch)
    for name, traj, color, ls in (("sampling", geom.sampling, SAMPLING, "-"), ("denoising", geom.denoising, DENOISING, "--")):
        c = _np(traj.frame.coords)
        for b in range(n):
            lab = name if b == 0 else None
            ax3.plot(c[:, b, 0], c[:, b, 1], c[:, b, 2], color=color, ls=ls, lw=1, alpha=0.8, label=lab)
            ax2.plot(c[:, b, 0], c[:, b, 1], color=color, ls=ls, lw=1, alpha=0.8, label=lab)
        ax2.plot(c[0, :n, 0], c[0, :n, 1], "o", color=color, ms=3)
    ax3.set_xlabel("along chord")
    ax3.set_ylabel("bulge (in-plane)")
    ax3.set_zlabel("third")
    ax3.set_title(f"{n} trajectories, each in its own frame")
    ax3.legend(loc="upper left", fontsize=8)
    ax2.axhline(0, color="gray", lw=0.8)
    ax2.set_xlabel("coordinate along the chord (start 0, end 1)")
    ax2.set_ylabel("perpendicular, in the top-2 PCA plane")
    ax2.set_title("chord-bulge plane (units of chord length)")
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8)
    _title(fig, geom, "Trajectories rotated into a common frame")
    return fig


def plot_curvature(geom) -> Figure:
    """Curvature and |torsion| of the 3-D PCA projection (units of 1 / chord), median and IQR."""
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for traj, color, name in ((geom.sampling, SAMPLING, "sampling"), (geom.denoising, DENOISING, "denoising")):
        _band(ax1, geom.sigmas, traj.curvature, color, name, center="median")
        _band(ax2, geom.sigmas, traj.torsion.abs(), color, name, center="median")
    for ax, what in ((ax1, "curvature kappa"), (ax2, "|torsion| tau")):
        ax.set_yscale("log")
        ax.set_ylabel(f"{what} (1 / chord)")
        _sigma_axis(ax)
        ax.legend()
    ax1.set_title("median and interquartile range over seeds")
    ax2.set_title(f"local cubic fits over {geom.window} points in arc length")
    _title(fig, geom, "Curvature and torsion of the 3-D PCA projection")
    return fig


def plot_gap(geom) -> Optional[Figure]:
    """Distance between the model's denoiser and a reference (e.g. the optimal one) along the trajectory."""
    if geom.gap is None:
        return None
    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.subplots()
    _band(ax, geom.sigmas, geom.gap, "tab:green", f"model vs {geom.gap_reference}", log_values=True)
    ax.set_yscale("log")
    ax.set_ylabel("RMS distance between the x0 estimates")
    _sigma_axis(ax)
    ax.legend()
    _title(fig, geom, "Model denoiser vs reference along the sampling trajectory")
    return fig


def _to_image(x: np.ndarray) -> Optional[np.ndarray]:
    """(C, H, W) in [-1, 1] -> (H, W) or (H, W, 3) in [0, 1]; None if not an image."""
    if x.ndim == 3 and x.shape[0] in (1, 3):
        img = np.clip((x + 1) / 2, 0, 1)
        return img[0] if x.shape[0] == 1 else img.transpose(1, 2, 0)
    if x.ndim == 2:
        return np.clip((x + 1) / 2, 0, 1)
    return None


def is_image_shape(shape: Sequence[int]) -> bool:
    return (len(shape) == 3 and shape[0] in (1, 3)) or len(shape) == 2


def plot_strips(traj, indices: Sequence[int] = (0, 1, 2, 3), labels: Optional[Sequence[str]] = None,
                columns: int = 10, label: str = "") -> Optional[Figure]:
    """Image strips: for each chosen seed, the states x_i (shown as x_i / sqrt(1 + sigma_i^2), the
    unit-variance scaling, clipped to [-1, 1]) and the estimates D(x_i) at up to ``columns`` steps
    spread over the grid, then the final sample.  One mosaic image; None for sample shapes that are
    not images (``labels``: one name per entry of ``indices``)."""
    if not is_image_shape(traj.shape):
        return None
    indices = [i for i in indices if i < traj.batch]
    if not indices:
        return None
    steps = traj.steps
    cols = np.unique(np.linspace(0, steps - 1, min(columns, steps)).round().astype(int))
    sig = _np(traj.sigmas)
    tiles, names = [], []
    for k, b in enumerate(indices):
        xs = [_np(traj.sampling[i, b]) / np.sqrt(1 + sig[i] ** 2) for i in cols] + [_np(traj.samples[b])]
        ds = [_np(traj.denoising[i, b]) for i in cols] + [_np(traj.samples[b])]
        tiles += [[_to_image(x) for x in xs], [_to_image(x) for x in ds]]
        name = labels[k] if labels is not None and k < len(labels) else f"#{b}"
        names += [f"{name}  x_i", f"{name}  D(x_i)"]
    h, w = tiles[0][0].shape[:2]
    rgb = tiles[0][0].ndim == 3
    pad = max(1, h // 8)
    rows, ncol = len(tiles), len(cols) + 1
    mosaic = np.ones(((h + pad) * rows - pad, (w + pad) * ncol - pad) + ((3,) if rgb else ()))
    for r, row in enumerate(tiles):
        for c, img in enumerate(row):
            mosaic[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = img
    scale = 0.9 / max(h, w)
    fig = Figure(figsize=(ncol * (w + pad) * scale + 2.2, rows * (h + pad) * scale + 0.9), layout="constrained")
    ax = fig.subplots()
    ax.imshow(mosaic, cmap=None if rgb else "gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([c * (w + pad) + w / 2 for c in range(ncol)],
                  [f"{sig[i]:.3g}" for i in cols] + ["final"], fontsize=8)
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(rows)], names, fontsize=8)
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.set_xlabel("sigma")
    ax.set_title(f"x_i and D(x_i) along the trajectory{' - ' + label if label else ''}", fontsize=10)
    return fig
