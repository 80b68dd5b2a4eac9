"""FID vs NFE on the bundled Fashion-MNIST model for every solver with its usual schedule.

FID uses the bundled classifier's features (``fashion-mnist-classifier``) against the committed
statistics of the 60,000 training images; it is not comparable with Inception FIDs.  Seeds
0..N-1 with a random class per seed (the CLI's rule), the same images for every configuration,
plus the Heun NFE-34 reference point.  Also records throughput (images/s) of sampling and of
feature extraction on this machine.

    python -m evaluation.fid_benchmark --images 500        # the recorded run
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
from pathlib import Path

import torch

import diffsampler
from diffsampler import SOLVERS

from diffsampler.models.identity import weights_hash
from evaluation.common import HERE, bundled_model, score

NFES = tuple(range(3, 11))
# Registry entries that are a learned sampler's untrained form: the row says what was sampled.
ROW_LABELS = {"amed": "amed, no predictor (fixed r = 0.5; trained AMED is in amed.md)"}


def plot(rows, heun, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for solver in SOLVERS:
        points = sorted((r["nfe"], r["fid"]) for r in rows if r["solver"] == solver)
        if points:
            ax.plot(*zip(*points), marker="o", label=solver)
    ax.axhline(heun, color="k", linestyle=":", label="heun NFE 34")
    ax.set_xlabel("NFE")
    ax.set_ylabel("FID (bundled classifier features)")
    ax.set_yscale("log")
    ax.legend(ncol=3, fontsize=8)
    ax.set_title("Bundled Fashion-MNIST model: FID vs NFE (default schedules)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(report):
    rows, lines = report["rows"], []
    lines += ["# FID vs NFE, bundled Fashion-MNIST model", "",
              f"{report['images']} images per configuration (seeds 0..{report['images'] - 1}, a random class per seed), "
              f"bundled classifier features vs the training split; recorded {report['date']} on {report['machine']}.",
              f"Model weights {report['bundled_weights']}. "
              f"Heun NFE 34 (reference point): **{report['heun_nfe34']['fid']:.3f}**. "
              f"Same-size real-vs-real baseline is in checkpoints/fashion-mnist/CARD.md.", "",
              "| solver | schedule | " + " | ".join(f"NFE {n}" for n in NFES) + " |", "|---|---|" + "---|" * len(NFES)]
    best = {n: min((r["fid"] for r in rows if r["nfe"] == n), default=None) for n in NFES}
    for solver, cls in SOLVERS.items():
        cells = []
        for n in NFES:
            r = next((r for r in rows if r["solver"] == solver and r["nfe"] == n), None)
            cells.append("-" if r is None else (f"**{r['fid']:.2f}**" if r["fid"] == best[n] else f"{r['fid']:.2f}"))
        lines.append(f"| {ROW_LABELS.get(solver, solver)} | {cls.default_schedule} | " + " | ".join(cells) + " |")
    t = report["throughput"]
    lines += ["", f"Throughput on this machine ({t['threads']} thread(s)): sampling {t['sample_images_per_s_nfe10']:.1f} "
              f"images/s at NFE 10 (ipndm), feature extraction {t['feature_images_per_s']:.0f} images/s.", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(HERE / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = bundled_model()
    heun = score(model, args.images, solver="heun", nfe=34)
    print(f"heun NFE 34: FID {heun['fid']:.3f}", flush=True)
    rows = []
    for solver, cls in SOLVERS.items():
        for nfe in NFES:
            if nfe not in cls().valid_nfes():
                continue
            r = score(model, args.images, solver=solver, nfe=nfe)
            rows.append({"solver": solver, "nfe": nfe, "schedule": "default", "afs": False, **r})
            print(f"{solver} NFE {nfe}: FID {r['fid']:.3f}", flush=True)
    ipndm10 = next(r for r in rows if r["solver"] == "ipndm" and r["nfe"] == 10)
    report = {"date": _dt.date.today().isoformat(), "machine": f"{platform.machine()}, torch {torch.__version__}",
              "diffsampler_version": diffsampler.__version__, "images": args.images, "extractor": "fashion-mnist-classifier",
              "model": "fashion-mnist", "bundled_weights": weights_hash(model), "heun_nfe34": heun, "rows": rows,
              "throughput": {"threads": args.threads, "sample_images_per_s_nfe10": ipndm10["sample_images_per_s"],
                             "feature_images_per_s": ipndm10["feature_images_per_s"]}}
    (out / "fid.json").write_text(json.dumps(report, indent=1))
    (out / "fid.md").write_text(markdown(report))
    plot(rows, heun["fid"], out / "fid_vs_nfe.png")
    print(f"wrote {out / 'fid.json'}, fid.md, fid_vs_nfe.png")


if __name__ == "__main__":
    main()
