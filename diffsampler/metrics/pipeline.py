"""The metrics pipeline: images -> features -> statistics -> metric, with the metrics in one registry.

    pipeline.score("out/", "ref.npz", ["fid", "kid"])   # {"fid": ..., "kid_mean": ..., "num_images": ...}

* **images**: a folder, an ``.npz`` or a bundled dataset (:mod:`.sources`), or a Dataset;
* **features**: a torch-fidelity feature extractor (:mod:`.extractors`); under torchrun the
  images are split across ranks and the features gathered in order, so the result does not
  depend on the number of processes;
* **statistics and metrics**: :mod:`.fid` (torch-fidelity's own functions);
* :data:`METRICS` maps a metric name to ``fn(features, reference) -> dict``; ``fid calc`` reads it.

Fewer images than twice the feature dimension give a covariance dominated by its estimation
bias (FID of 4 images of anything is large and meaningless), so :func:`score` adds a
``warning`` to its result then.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Union

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..distributed import rank_and_world
from . import INCEPTION, extractors, fid
from .sources import open_images

BUNDLED_REFERENCE = Path(__file__).resolve().parents[2] / "checkpoints" / "fashion-mnist-classifier" / "reference-train.npz"
save_reference, load_reference = fid.save_reference, fid.load_reference


@torch.no_grad()
def features(images: Union[str, Path, Dataset], extractor: str, batch: int = 250, device: str = "cpu",
             inception_weights: Optional[str] = None, classifier_path: Optional[str] = None,
             progress: bool = False) -> torch.Tensor:
    """(N, F) float32 features of an image set (uint8 CHW items), in its order."""
    images = images if isinstance(images, Dataset) else open_images(images)
    module, layer = extractors.create(extractor, device, inception_weights, classifier_path)
    rank, world = rank_and_world()
    indices = list(range(rank, len(images), world))
    loader = DataLoader(Subset(images, indices), batch_size=batch, shuffle=False, num_workers=0)
    if progress and rank == 0:
        from ..progress import bar
        loader = bar(loader, desc=f"features ({extractor})", unit="batch")
    parts = []
    for x in loader:
        if extractor == INCEPTION and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        parts.append(module.convert_features_tuple_to_dict(module(x.to(device)))[layer].cpu())
    mine = torch.cat(parts) if parts else torch.zeros(0)
    if world == 1:
        return mine
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, mine)
    out = torch.empty(len(images), gathered[0].shape[1], dtype=gathered[0].dtype)
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


def _fid(feats: torch.Tensor, reference: dict) -> dict:
    return {"fid": fid.frechet_distance(fid.statistics(feats), reference)}


def _needs_features(reference: dict, metric: str) -> torch.Tensor:
    if "features" not in reference:
        raise ValueError(f"{metric} needs reference features: make the reference with --keep-features")
    return reference["features"]


METRICS: Dict[str, Callable[[torch.Tensor, dict], dict]] = {
    "fid": _fid,
    "kid": lambda feats, ref: fid.kid(feats, _needs_features(ref, "KID")),
    "prc": lambda feats, ref: fid.precision_recall(feats, _needs_features(ref, "precision/recall")),
}


def score(images, reference, metrics: Sequence[str] = ("fid",), **feature_options) -> dict:
    """The metrics of an image set against a reference (a file or :func:`load_reference`'s dict),
    with the reference's extractor; adds ``warning`` when the set is too small for a stable FID."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {', '.join(unknown)}: use {', '.join(METRICS)}")
    ref = load_reference(reference) if isinstance(reference, (str, Path)) else reference
    feats = features(images, ref["extractor"], **feature_options)
    if feats.shape[0] < 2:
        raise ValueError(f"need at least 2 images to score, got {feats.shape[0]}")
    if feats.shape[1] != ref["mu"].shape[0]:
        raise ValueError(f"the reference has {ref['mu'].shape[0]} features per image but extractor "
                         f"{ref['extractor']} gives {feats.shape[1]}: the reference was made differently")
    result = {"extractor": ref["extractor"], "num_images": int(feats.shape[0])}
    for metric in metrics:
        result.update(METRICS[metric](feats, ref))
    if feats.shape[0] < 2 * feats.shape[1]:
        result["warning"] = (f"only {feats.shape[0]} images for {feats.shape[1]} features: the covariance estimate "
                             f"is dominated by its bias and FID is not stable; use at least {2 * feats.shape[1]} "
                             "(10000+ for comparisons across papers)")
    return result
