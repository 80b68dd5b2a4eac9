"""Shared by the benchmarks that score the bundled Fashion-MNIST model: the model, per-seed class
labels, and FID of a sampler configuration against the committed reference statistics."""
from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import torch

from diffsampler import sample
from diffsampler.fileio import write_atomic
from diffsampler.generate import one_hot_labels, seed_labels
from diffsampler.images import to_uint8
from diffsampler.metrics import CLASSIFIER
from diffsampler.metrics import fid
from diffsampler.metrics.sources import ImageArray
from diffsampler.seeds import seed_noise

CACHE = Path(__file__).resolve().parent / ".cache"
REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints" / "fashion-mnist-classifier" / "reference-train.npz"


def bundled_model():
    from diffsampler.models.bundled import load_bundled
    return load_bundled("fashion-mnist")


def labels_cond(model):
    return lambda seeds: {"class_labels": one_hot_labels(seed_labels(seeds, model.num_classes), model.num_classes)}


def features(model, images: int, first_seed: int = 0, batch: int = 250, **sample_kwargs):
    """Bundled-classifier features of seeds first_seed..first_seed+images-1 (with their labels),
    and the sampling time in seconds."""
    cond, pixels = labels_cond(model), []
    t0 = time.perf_counter()
    for k in range(first_seed, first_seed + images, batch):
        chunk = list(range(k, min(first_seed + images, k + batch)))
        out = sample(model, seed_noise(chunk, model.shape), cond=cond(chunk), **sample_kwargs)
        pixels.append(to_uint8(out.samples))
    seconds = time.perf_counter() - t0
    return fid.extract_features(ImageArray(np.concatenate(pixels), "samples"), CLASSIFIER), seconds, out.nfe


def fid_of(feats) -> float:
    """FID of features against the committed reference statistics."""
    return fid.frechet_distance(fid.statistics(feats), fid.load_reference(REFERENCE))


def paired_fid_difference(feats, base, draws: int = 200, seed: int = 0) -> dict:
    """FID(feats) - FID(base) for images of the same seeds: mean and std over ``draws`` paired
    bootstrap resamples (the same resampled indices for both), and the fraction where feats is lower."""
    gen = np.random.default_rng(seed)
    picks = [gen.integers(0, len(base), len(base)) for _ in range(draws)]
    diffs = np.array([fid_of(feats[i]) - fid_of(base[i]) for i in picks])
    return {"mean": float(diffs.mean()), "std": float(diffs.std()), "p_lower": float((diffs < 0).mean())}


def score(model, images: int, batch: int = 250, **sample_kwargs):
    """FID (bundled classifier features, vs the training split) of seeds 0..images-1, with timings."""
    t0 = time.perf_counter()
    feats, sample_seconds, nfe = features(model, images, 0, batch, **sample_kwargs)
    extract_seconds = time.perf_counter() - t0 - sample_seconds
    return {"fid": fid_of(feats), "nfe": nfe, "sample_images_per_s": images / sample_seconds,
            "feature_images_per_s": images / extract_seconds}


def converged(model, seeds: int, solver: str = "heun", nfe: int = 160, chunk: int = 100):
    """Samples of seeds 0..seeds-1 (with their labels) by ``solver`` at a large ``nfe`` on the
    default schedule, in float64, cached under evaluation/.cache: the reference that RMSE-to-converged
    rows compare with."""
    path = CACHE / f"converged_fashion-mnist_{solver}_nfe{nfe}_seeds0-{seeds - 1}.pt"
    if not path.exists():
        cond, parts = labels_cond(model), []
        for k in range(0, seeds, chunk):
            batch = list(range(k, min(seeds, k + chunk)))
            parts.append(sample(model, seed_noise(batch, model.shape), solver=solver, nfe=nfe,
                                cond=cond(batch)).samples.to(torch.float64))
        CACHE.mkdir(exist_ok=True)
        write_atomic(path, _tensor_bytes(torch.cat(parts)))
    return torch.load(path)


def _tensor_bytes(tensor) -> bytes:
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()
