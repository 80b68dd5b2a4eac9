"""Measure the quality of a bundled Fashion-MNIST model with the bundled classifier.

    python -m evaluation.bundled_model_quality                         # fashion-mnist, ~3 min
    python -m evaluation.bundled_model_quality --model fashion-mnist-v1 --out /tmp/v1.json

Generates ``--per-class`` class-conditional samples per class (1000 in all by default; each
sample its own seed, seeds 0..N-1, or from ``--first-seed``) with DPM-Solver++ at NFE 20 (``--solver``, ``--nfe``), without
guidance and with each ``--guidance`` weight, and reports

* ``class_accuracy``: the fraction the classifier assigns to the requested class (and per class);
* ``frechet_distance_vs_test``: Frechet distance in the classifier's 128-d feature space between
  the samples and a fixed random subset of the real test split of the same size;
* the same distance between real *training* subsets of the same size and that test subset
  (mean and std over 5 subsets): what a perfect model reaches at this sample size; ``ratio``
  is the model's distance over that mean;
* the classifier's accuracy on the real test subset (the ceiling for ``class_accuracy``);
* sampling throughput (images per second at that NFE).

With ``--draws K`` the samples are drawn K times from disjoint seed ranges and the JSON also holds
every draw and the mean over draws (``mean_over_draws``): with 1000 images one draw's FD moves by
about +-0.05 and its accuracy by about a point, as much as a recipe change.

Results go to ``evaluation/results/bundled_model_quality.json`` (or ``--out``); a 10x10 sample
grid (one row per class) to ``--grid``.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffsampler import sample
from diffsampler.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist
from diffsampler.fileio import write_atomic
from diffsampler.generate import one_hot_labels
from diffsampler.images import grid, png_bytes, to_uint8
from diffsampler.metrics import fid
from diffsampler.metrics.classifier import compute_features, load_classifier
from diffsampler.models.guidance import ClassifierFreeGuidance
from diffsampler.seeds import seed_noise
from evaluation.common import RESULTS, load_model, machine


# What each draw records and what is averaged over draws.
SUMMARY = ("class_accuracy", "frechet_distance_vs_test", "ratio_to_real")


def frechet(features_a, stats_b) -> float:
    return fid.frechet_distance(fid.statistics(features_a), stats_b)


def generate(model, labels: torch.Tensor, solver: str, nfe: int, batch: int, first_seed: int = 0):
    """Samples of seeds first_seed..first_seed+N-1 with the given class labels; (samples, seconds)."""
    out, t0 = [], time.perf_counter()
    for k in range(0, len(labels), batch):
        rows = list(range(k, min(len(labels), k + batch)))
        result = sample(model, seed_noise([first_seed + r for r in rows], model.shape), solver=solver, nfe=nfe,
                        cond={"class_labels": one_hot_labels(labels[rows], model.num_classes)})
        assert result.nfe == nfe, (result.nfe, nfe)
        out.append(result.samples.clamp(-1, 1))
    return torch.cat(out), time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--solver", default="dpmpp")
    p.add_argument("--nfe", type=int, default=20)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first..first+N-1 (another draw of samples)")
    p.add_argument("--draws", type=int, default=1,
                   help="repeat on this many disjoint seed ranges (first..first+N-1, then the next N, ...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guidance", type=float, nargs="*", default=[2.0], help="CFG weights to evaluate too")
    p.add_argument("--grid", default="/tmp/fashion_mnist_samples.png")
    p.add_argument("--out", default=str(RESULTS / "bundled_model_quality.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()
    model, clf = load_model(a.model), load_classifier()
    n_cls = model.num_classes
    n = a.per_class * n_cls

    xte, yte = load_fashion_mnist("test")
    xtr, _ = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(1234)
    te_idx = torch.randperm(xte.shape[0], generator=g)[:n]
    f_te, logit_te = compute_features(clf, xte[te_idx])
    stats_te = fid.statistics(f_te)
    fd_real = [frechet(compute_features(clf, xtr[torch.randperm(xtr.shape[0], generator=g)[:n]])[0], stats_te)
               for _ in range(5)]
    real_mean = float(np.mean(fd_real))
    results = {
        "model": a.model,
        "model_config": {k: model.config_dict.get(k) for k in ("steps", "batch", "training_seconds", "parameters")},
        "num_samples": n, "solver": a.solver, "nfe": a.nfe, "seeds": f"{a.first_seed}-{a.first_seed + n - 1}",
        "reference": {
            "classifier_accuracy_on_real_test_subset": round(float((logit_te.argmax(1) == yte[te_idx]).float().mean()), 4),
            "frechet_distance_train_vs_test_mean": round(real_mean, 4),
            "frechet_distance_train_vs_test_std": round(float(np.std(fd_real)), 4),
            "frechet_distance_train_vs_test_all": [round(v, 4) for v in fd_real],
            "subset_size": n,
        },
        "runs": {},
    }
    labels = torch.arange(n_cls).repeat_interleave(a.per_class)
    denoisers = [("unguided", model)] + [(f"guidance_{w:g}", ClassifierFreeGuidance(model, w)) for w in a.guidance]
    results["draws"] = []
    for draw in range(a.draws):
        first = a.first_seed + draw * n
        runs = {}
        for name, denoiser in denoisers:
            samples, seconds = generate(denoiser, labels, a.solver, a.nfe, a.batch, first)
            feats, logits = compute_features(clf, samples)
            fd, pred = frechet(feats, stats_te), logits.argmax(1)
            runs[name] = {
                "class_accuracy": round(float((pred == labels).float().mean()), 4),
                "frechet_distance_vs_test": round(fd, 4), "ratio_to_real": round(fd / real_mean, 2),
                "images_per_s": round(n / seconds, 1), "sampling_seconds": round(seconds, 1),
                "per_class_accuracy": {FASHION_MNIST_CLASSES[c]: round(float((pred[labels == c] == c).float().mean()), 3)
                                       for c in range(n_cls)},
                "predicted_class_histogram": torch.bincount(pred, minlength=n_cls).tolist()}
            print(f"seeds {first}-{first + n - 1} {name}: "
                  f"{json.dumps({k: v for k, v in runs[name].items() if k != 'per_class_accuracy'})}", flush=True)
            if draw == 0 and name == "unguided" and a.grid:
                pick = torch.cat([torch.nonzero(labels == c)[:10, 0] for c in range(n_cls)])
                write_atomic(Path(a.grid), png_bytes(grid(to_uint8(samples[pick]))))
        if draw == 0:
            results["runs"] = runs          # the first draw in full (the seeds in "seeds")
        results["draws"].append({"seeds": f"{first}-{first + n - 1}",
                                 "runs": {name: {k: r[k] for k in SUMMARY} for name, r in runs.items()}})
    results["mean_over_draws"] = {
        name: {key: round(float(np.mean([d["runs"][name][key] for d in results["draws"]])), 4)
               for key in SUMMARY}
        for name, _ in denoisers}
    results["machine"] = machine()
    results["evaluation_seconds"] = round(time.time() - t0, 1)
    write_atomic(Path(a.out), json.dumps(results, indent=2).encode() + b"\n")
    print(json.dumps(results["reference"], indent=2))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
