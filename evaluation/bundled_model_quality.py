"""Measure the quality of the bundled Fashion-MNIST model with the bundled classifier.

    python evaluation/bundled_model_quality.py            # ~5 minutes on one CPU thread

Generates ``--per-class`` class-conditional samples per class (1000 by default) with a
high-accuracy deterministic sampler (EDM Heun, 17 steps = 34 model evaluations on the
polynomial rho=7 grid from sigma 80 to 0.002, via ``diffsampler.sample``), clamps them to
[-1, 1] and reports

* ``class_accuracy``: fraction the classifier assigns to the requested class (and per class);
* ``frechet_distance``: Frechet distance in the classifier's 128-d feature space between the
  samples and a fixed random subset of the real test split of the same size;
* the same distance between real *training* subsets of the same size and that test subset
  (mean and std over 5 subsets): the floor a perfect model would reach at this sample size;
* the classifier's accuracy on the real test subset (the ceiling for ``class_accuracy``).

The same is done for unconditional samples (all-zero label rows) and for classifier-free
guidance ``D = D_uncond + w (D_cond - D_uncond)`` with ``--guidance`` weights.  Results go to
``evaluation/results/bundled_model_quality.json``; a 10x10 sample grid (one row per class) is
written to ``--grid`` (default under /tmp, not the repository).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffsampler.datasets import FASHION_MNIST_CLASSES, load_fashion_mnist  # noqa: E402
from diffsampler.metrics.classifier import (  # noqa: E402
    compute_features, feature_stats, frechet_distance, load_classifier,
)
from diffsampler.models.base import Denoiser  # noqa: E402
from diffsampler.models.bundled import load_bundled  # noqa: E402


class _Guided(Denoiser):
    """Classifier-free guidance: D_u + w (D_c - D_u), with D_u the all-zero-label prediction."""

    def __init__(self, den, weight: float):
        self.den, self.weight = den, float(weight)
        self.sigma_min, self.sigma_max, self.shape = den.sigma_min, den.sigma_max, den.shape

    def denoise(self, x, sigma, class_labels=None):
        both = self.den(torch.cat([x, x]), torch.cat([sigma, sigma]),
                        class_labels=torch.cat([class_labels, torch.zeros_like(class_labels)]))
        cond, uncond = both.chunk(2)
        return uncond + self.weight * (cond - uncond)


def _karras_sigmas(n_points: int, smin: float, smax: float, rho: float = 7.0) -> torch.Tensor:
    i = torch.arange(n_points, dtype=torch.float64) / (n_points - 1)
    return (smax ** (1 / rho) + i * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho


@torch.no_grad()
def _heun_fallback(den, noise, nfe, labels):
    """Heun on the polynomial grid, nfe // 2 steps ending at sigma_min (used only if
    ``diffsampler.sample`` is unavailable)."""
    sig = _karras_sigmas(nfe // 2 + 1, den.sigma_min, den.sigma_max)
    x = noise.double() * sig[0]
    for s, s_next in zip(sig[:-1].tolist(), sig[1:].tolist()):
        st = torch.full((x.shape[0],), s)
        d = (x - den(x.float(), st, class_labels=labels).double()) / s
        x_e = x + (s_next - s) * d
        d2 = (x_e - den(x_e.float(), torch.full_like(st, s_next), class_labels=labels).double()) / s_next
        x = x + (s_next - s) * 0.5 * (d + d2)
    return x.float()


def generate(den, labels: torch.Tensor, nfe: int, seed: int, batch: int) -> tuple:
    """Samples for integer ``labels`` (-1 = unconditional); returns (samples, sampler used)."""
    try:
        from diffsampler import sample
    except Exception:  # noqa: BLE001 -- the core package may be mid-edit
        sample = None
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((labels.shape[0],) + tuple(den.shape), generator=gen)
    out, used = [], None
    for i in range(0, labels.shape[0], batch):
        lab = labels[i:i + batch]
        onehot = F.one_hot(lab.clamp_min(0), den_classes(den)).float() * (lab >= 0).float()[:, None]
        nz = noise[i:i + batch]
        if sample is not None:
            with torch.no_grad():
                res = sample(den, nz, solver="heun", nfe=nfe, schedule="polynomial",
                             schedule_options={"rho": 7.0}, cond={"class_labels": onehot})
            assert res.nfe == nfe, (res.nfe, nfe)
            out.append(res.samples)
            used = f"diffsampler.sample(solver='heun', nfe={nfe}, schedule='polynomial', rho=7)"
        else:
            out.append(_heun_fallback(den, nz, nfe, onehot))
            used = f"built-in Heun fallback ({nfe // 2} steps, {nfe} NFE, polynomial rho=7)"
    return torch.cat(out), used


def den_classes(den) -> int:
    return getattr(den, "num_classes", None) or getattr(getattr(den, "den", None), "num_classes", 10)


def save_grid(samples: torch.Tensor, path: Path, nrow: int = 10, scale: int = 2) -> None:
    from PIL import Image

    imgs = ((samples.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    n = imgs.shape[0]
    h, w = imgs.shape[1:]
    rows = (n + nrow - 1) // nrow
    canvas = np.full((rows * (h + 2), nrow * (w + 2)), 255, np.uint8)
    for k in range(n):
        r, c = divmod(k, nrow)
        canvas[r * (h + 2) + 1:r * (h + 2) + 1 + h, c * (w + 2) + 1:c * (w + 2) + 1 + w] = imgs[k]
    Image.fromarray(canvas).resize((canvas.shape[1] * scale, canvas.shape[0] * scale), Image.NEAREST).save(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="fashion-mnist")
    p.add_argument("--per-class", type=int, default=100)
    p.add_argument("--nfe", type=int, default=34)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=250)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--guidance", type=float, nargs="*", default=[2.0], help="CFG weights to evaluate too")
    p.add_argument("--no-unconditional", action="store_true")
    p.add_argument("--grid", default="/tmp/fashion_mnist_samples.png")
    p.add_argument("--out", default=str(REPO / "evaluation" / "results" / "bundled_model_quality.json"))
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    t0 = time.time()

    den = load_bundled(a.model)
    clf = load_classifier()
    n_cls = den.num_classes
    n = a.per_class * n_cls

    # real-data references (same sample size as the generated set)
    xte, yte = load_fashion_mnist("test")
    xtr, _ = load_fashion_mnist("train")
    g = torch.Generator().manual_seed(1234)
    te_idx = torch.randperm(xte.shape[0], generator=g)[:n]
    f_te, logit_te = compute_features(clf, xte[te_idx])
    stats_te = feature_stats(f_te)
    real_acc = float((logit_te.argmax(1) == yte[te_idx]).float().mean())
    fd_real = []
    for _ in range(5):
        tr_idx = torch.randperm(xtr.shape[0], generator=g)[:n]
        f_tr, _ = compute_features(clf, xtr[tr_idx])
        fd_real.append(frechet_distance(*feature_stats(f_tr), *stats_te))

    results = {
        "model": a.model,
        "model_config": {k: den.config_dict.get(k) for k in ("steps", "batch", "training_seconds", "parameters")},
        "classifier_test_accuracy": json.loads((REPO / "checkpoints" / "fashion-mnist-classifier" / "config.json")
                                               .read_text()).get("test_accuracy"),
        "num_samples": n,
        "seed": a.seed,
        "nfe": a.nfe,
        "reference": {
            "classifier_accuracy_on_real_test_subset": round(real_acc, 4),
            "frechet_distance_train_vs_test_mean": round(float(np.mean(fd_real)), 4),
            "frechet_distance_train_vs_test_std": round(float(np.std(fd_real)), 4),
            "frechet_distance_train_vs_test_all": [round(v, 4) for v in fd_real],
            "subset_size": n,
        },
        "runs": {},
    }

    labels = torch.arange(n_cls).repeat_interleave(a.per_class)
    settings = [("conditional", den, labels)]
    if not a.no_unconditional:
        settings.append(("unconditional", den, torch.full_like(labels, -1)))
    for w in a.guidance:
        settings.append((f"cfg_w{w:g}", _Guided(den, w), labels))

    for name, model, lab in settings:
        t1 = time.time()
        samples, used = generate(model, lab, a.nfe, a.seed, a.batch)
        seconds = time.time() - t1
        samples = samples.clamp(-1, 1)
        feats, logits = compute_features(clf, samples)
        fd = frechet_distance(*feature_stats(feats), *stats_te)
        pred = logits.argmax(1)
        run = {
            "sampler": used,
            "frechet_distance_vs_test": round(fd, 4),
            "sampling_seconds": round(seconds, 1),
            "predicted_class_histogram": torch.bincount(pred, minlength=n_cls).tolist(),
        }
        if (lab >= 0).all():
            run["class_accuracy"] = round(float((pred == lab).float().mean()), 4)
            run["per_class_accuracy"] = {
                FASHION_MNIST_CLASSES[c]: round(float((pred[lab == c] == c).float().mean()), 3) for c in range(n_cls)
            }
        results["runs"][name] = run
        print(f"{name}: {json.dumps({k: v for k, v in run.items() if k != 'per_class_accuracy'})}", flush=True)
        if name == "conditional" and a.grid:
            pick = torch.cat([torch.nonzero(lab == c)[:10, 0] for c in range(n_cls)])
            save_grid(samples[pick], Path(a.grid))
            print(f"sample grid: {a.grid}")

    results["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {a.threads} thread(s)"
    results["evaluation_seconds"] = round(time.time() - t0, 1)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["reference"], indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
