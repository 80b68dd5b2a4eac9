"""Shared by the benchmarks that score the bundled Fashion-MNIST model: the model, per-seed class
labels, and FID of a sampler configuration against the committed reference statistics."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from diffsampler import sample
from diffsampler.generate import one_hot_labels, seed_labels
from diffsampler.images import to_uint8
from diffsampler.metrics import CLASSIFIER
from diffsampler.metrics import fid
from diffsampler.metrics.sources import ImageArray
from diffsampler.seeds import seed_noise

REFERENCE = Path(__file__).resolve().parents[1] / "checkpoints" / "fashion-mnist-classifier" / "reference-train.npz"


def bundled_model():
    from diffsampler.models.bundled import load_bundled
    return load_bundled("fashion-mnist")


def labels_cond(model):
    return lambda seeds: {"class_labels": one_hot_labels(seed_labels(seeds, model.num_classes), model.num_classes)}


def score(model, images: int, batch: int = 250, **sample_kwargs):
    """FID (bundled classifier features, vs the training split) of seeds 0..images-1, with timings."""
    cond, seeds, pixels = labels_cond(model), list(range(images)), []
    t0 = time.perf_counter()
    for k in range(0, images, batch):
        chunk = seeds[k:k + batch]
        out = sample(model, seed_noise(chunk, model.shape), cond=cond(chunk), **sample_kwargs)
        pixels.append(to_uint8(out.samples))
    t1 = time.perf_counter()
    features = fid.extract_features(ImageArray(np.concatenate(pixels), "samples"), CLASSIFIER)
    t2 = time.perf_counter()
    value = fid.frechet_distance(fid.statistics(features), fid.load_reference(REFERENCE))
    return {"fid": value, "nfe": out.nfe, "sample_images_per_s": images / (t1 - t0),
            "feature_images_per_s": images / (t2 - t1)}
