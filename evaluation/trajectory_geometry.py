"""Trajectory geometry of real sampling runs, next to what the trajectory-regularity papers report.

For each model the script records sampling and denoising trajectories (Heun, NFE 100 by default: 50
steps of the EDM polynomial grid, sigma 80 -> 0.002; noise from the seeds as ``diffsampler sample``
draws it) and measures, per trajectory, the fraction of variance in its top 1/2/3 principal
components and the deviation from its start-end chord (relative to the chord length), summarized
over seeds.  Models (``--models``, comma-separated):

    gmm:digits            the optimal denoiser (empirical KDE) of sklearn's 1797 8x8 digits
    gauss:digits          the full-rank Gaussian approximation of the same digits (closed-form denoiser)
    gmm:fashion-mnist     the optimal denoiser of the 60000 Fashion-MNIST training images
    bundled:fashion-mnist the bundled class-conditional EDM network (class = seed mod 10)

Writes ``results/trajectory_geometry.json`` (all numbers, profiles included), ``.md`` (the table)
and ``.png`` (deviation profiles and PCA fractions side by side).

    python -m evaluation.trajectory_geometry                       # full run (about 10 min on 2 CPU cores)
    python -m evaluation.trajectory_geometry --seeds 8 --nfe 20 --models gmm:digits --out /tmp/tg   # quick check
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import diffsampler
from diffsampler.analysis import GaussianDenoiser, record_trajectories
from diffsampler.analysis.report import compute_geometry, geometry_numbers
from diffsampler.seeds import seed_noise
from evaluation.common import load_model

HERE = Path(__file__).resolve().parent
DEFAULT_MODELS = "gmm:digits,gauss:digits,gmm:fashion-mnist,bundled:fashion-mnist"
# seeds per model for the full run (the Fashion-MNIST KDE costs 60000 x 784 per evaluation)
SEEDS = {"gmm:digits": 256, "gauss:digits": 256, "gmm:fashion-mnist": 32, "bundled:fashion-mnist": 64}
PAPERS = ("papers: each trajectory is nearly a straight line with a small 'boomerang'-shaped deviation "
          "and lies almost in a 2-D (very low-dimensional) subspace; the denoising trajectory converges "
          "to the final sample faster than the sampling trajectory")


def load(spec: str):
    """(denoiser, cond function or None, description)."""
    if spec == "gauss:digits":
        from diffsampler.datasets import load_digits
        images, _ = load_digits()
        return GaussianDenoiser.fit(images), None, "full-rank Gaussian fit of the 1797 digits"
    if spec.startswith("bundled:"):
        net = load_model(spec)
        if net.num_classes:
            def cond(seeds):
                labels = torch.tensor([s % net.num_classes for s in seeds])
                return {"class_labels": torch.nn.functional.one_hot(labels, net.num_classes).float()}
            return net, cond, f"bundled EDM network ({net.config_dict.get('steps', '?')} training steps), class = seed mod {net.num_classes}"
        return net, None, "bundled EDM network"
    model = load_model(spec)
    return model, None, f"optimal denoiser (empirical KDE) of {model.means.shape[0]} training images"


def measure(spec: str, seeds: int, nfe: int, batch: int):
    model, cond_fn, description = load(spec)
    seed_list = list(range(seeds))
    noise = seed_noise(seed_list, model.shape, dtype=torch.float32 if spec.startswith("bundled:") else torch.float64)
    start = time.perf_counter()
    traj = record_trajectories(model, noise, solver="heun", nfe=nfe, batch_size=batch, store_device="cpu",
                               cond=cond_fn(seed_list) if cond_fn else None)
    seconds = time.perf_counter() - start
    geom = compute_geometry(traj, label=spec)
    numbers = geometry_numbers(geom)
    numbers.update(model=spec, description=description, seeds=seeds, nfe=traj.nfe, steps=traj.steps,
                   record_seconds=round(seconds, 2))
    return numbers


def table(results):
    lines = ["| model | seeds | top-1 | top-2 | top-3 | 1 - top-2 | max deviation / chord (at sigma) | "
             "denoising: top-2 | denoising: max deviation / chord (at sigma) |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]
    for r in results:
        s, d = r["sampling"], r["denoising"]
        p = s["pca_variance"]
        dev, ddev = s["max_relative_deviation"], d["max_relative_deviation"]
        lines.append(
            f"| `{r['model']}` | {r['seeds']} | {p['top1']['mean']:.6f} | {p['top2']['mean']:.6f} | "
            f"{p['top3']['mean']:.6f} | {1 - p['top2']['mean']:.1e} (max {1 - p['top2']['min']:.1e}) | "
            f"{dev['of_mean_profile']:.4f} (sigma {dev['at_sigma']:.3g}) | {d['pca_variance']['top2']['mean']:.4f} | "
            f"{ddev['of_mean_profile']:.3f} (sigma {ddev['at_sigma']:.3g}) |")
    return "\n".join(lines)


def figure(results, path: Path):
    from matplotlib.figure import Figure
    fig = Figure(figsize=(13, 4.2), layout="constrained")
    ax1, ax2 = fig.subplots(1, 2)
    for r in results:
        sig = np.asarray(r["sigmas"])
        prof = np.asarray(r["sampling"]["profiles"]["relative_deviation"]["mean"], dtype=float)
        ax1.plot(sig, prof, label=r["model"])
    ax1.set_xscale("log")
    ax1.invert_xaxis()
    ax1.set_xlabel("sigma")
    ax1.set_ylabel("mean deviation / chord length")
    ax1.set_title("sampling trajectory: deviation from the chord")
    ax1.legend()
    width = 0.8 / max(1, len(results))
    for k, r in enumerate(results):
        rest = [max(1 - r["sampling"]["pca_variance"][f"top{j}"]["mean"], 1e-17) for j in (1, 2, 3)]
        ax2.bar(np.arange(3) + (k - (len(results) - 1) / 2) * width, rest, width, label=r["model"])
    ax2.set_yscale("log")
    ax2.set_xticks(range(3), ["outside top 1", "outside top 2", "outside top 3"])
    ax2.set_ylabel("1 - variance fraction (mean over seeds)")
    ax2.set_title("sampling trajectory: variance outside the top PCA components")
    ax2.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--seeds", type=int, default=None, help="Seeds per model (default: per-model, see SEEDS).")
    parser.add_argument("--nfe", type=int, default=100, help="Heun NFE (even; default 100 = 50 steps).")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = []
    for spec in [m.strip() for m in args.models.split(",") if m.strip()]:
        seeds = args.seeds or SEEDS.get(spec, 64)
        try:
            r = measure(spec, seeds, args.nfe, args.batch)
        except Exception as err:                     # a missing checkpoint or dataset skips that model
            print(f"{spec}: skipped ({type(err).__name__}: {err})", file=sys.stderr)
            continue
        results.append(r)
        p, dev = r["sampling"]["pca_variance"], r["sampling"]["max_relative_deviation"]
        print(f"{spec}: {seeds} seeds in {r['record_seconds']:.1f} s; top-1/2/3 {p['top1']['mean']:.6f} / "
              f"{p['top2']['mean']:.6f} / {p['top3']['mean']:.6f}; max deviation {dev['of_mean_profile']:.4f} of the "
              f"chord at sigma {dev['at_sigma']:.3g}", flush=True)
    if not results:
        sys.exit("no model could be measured")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} thread(s)",
            "diffsampler_version": diffsampler.__version__, "solver": "heun", "nfe": args.nfe,
            "schedule": "polynomial rho=7, sigma 80 -> 0.002", "papers": PAPERS}
    (args.out / "trajectory_geometry.json").write_text(json.dumps({**meta, "results": results}, indent=1) + "\n")
    md = (f"# Trajectory geometry\n\nGenerated by `python -m evaluation.trajectory_geometry` on {meta['generated']} "
          f"({meta['machine']}); Heun NFE {args.nfe} ({args.nfe // 2} steps, {meta['schedule']}).\n\n"
          "Per trajectory: PCA of its points (centered) -> cumulative variance fraction of the top 1/2/3 "
          "components; deviation = distance of each point from the start-end chord divided by the chord length. "
          "Cells: mean over seeds (max deviation: the peak of the mean profile and the sigma where it peaks). "
          "The denoising trajectory is D(x_i, sigma_i) followed by the final sample.\n\n"
          + table(results) + f"\n\n{PAPERS[0].upper() + PAPERS[1:]}.\n")
    (args.out / "trajectory_geometry.md").write_text(md)
    figure(results, args.out / "trajectory_geometry.png")
    print(f"wrote {args.out / 'trajectory_geometry.json'}, .md and .png")


if __name__ == "__main__":
    main()
