"""Statistics and metrics of features: FID, KID and precision/recall on torch-fidelity, and
reference statistics files.

Statistics, the Frechet distance, KID and precision/recall are torch-fidelity's own functions, so
our numbers are torch-fidelity's numbers.  (Features come from :mod:`.pipeline`.)

A reference file (``.npz``) holds ``mu`` and ``sigma`` (the format of the reference statistics
the EDM ecosystem distributes) plus ``extractor``, ``num_images`` and optionally a subset of
``features`` (for KID and precision/recall against the reference).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric, KEY_METRIC_FID
from torch_fidelity.metric_kid import kid_features_to_metric, KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD
from torch_fidelity.metric_prc import prc_features_to_metric, KEY_METRIC_PRECISION, KEY_METRIC_RECALL

from ..fileio import write_atomic
from . import INCEPTION


def statistics(features: torch.Tensor) -> Dict[str, np.ndarray]:
    """Mean ``mu`` and (unbiased) covariance ``sigma`` of (N, F) features."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"statistics need (N >= 2, F) features, got shape {tuple(features.shape)}")
    return fid_features_to_statistics(features.cpu())


def frechet_distance(stats_1: Dict[str, np.ndarray], stats_2: Dict[str, np.ndarray]) -> float:
    if stats_1["mu"].shape != stats_2["mu"].shape:
        raise ValueError(f"statistics of different dimensionality: {stats_1['mu'].shape[0]} vs {stats_2['mu'].shape[0]} "
                         "features (were they made with different extractors?)")
    cast = lambda s: {"mu": s["mu"].astype(np.float64), "sigma": s["sigma"].astype(np.float64)}
    return fid_statistics_to_metric(cast(stats_1), cast(stats_2), verbose=False)[KEY_METRIC_FID]


def kid(features_1: torch.Tensor, features_2: torch.Tensor, subsets: int = 100, subset_size: int = 1000) -> Dict[str, float]:
    size = min(subset_size, len(features_1), len(features_2))
    out = kid_features_to_metric(features_1.cpu(), features_2.cpu(), kid_subsets=subsets, kid_subset_size=size,
                                 verbose=False)
    return {"kid_mean": out[KEY_METRIC_KID_MEAN], "kid_std": out[KEY_METRIC_KID_STD], "kid_subset_size": size}


def precision_recall(features_1: torch.Tensor, features_2: torch.Tensor) -> Dict[str, float]:
    out = prc_features_to_metric(features_1.cpu(), features_2.cpu(), verbose=False)
    return {"precision": out[KEY_METRIC_PRECISION], "recall": out[KEY_METRIC_RECALL]}


def save_reference(path, features: torch.Tensor, extractor: str, keep_features: int = 0, source: str = "") -> Path:
    """Write mu/sigma (+ metadata, + up to ``keep_features`` features) atomically."""
    stats = statistics(features)
    buffer = io.BytesIO()
    extra = {}
    if keep_features:
        extra["features"] = features[:keep_features].numpy()
    np.savez(buffer, mu=stats["mu"], sigma=stats["sigma"], extractor=np.array(extractor),
             num_images=np.array(len(features)), source=np.array(source), **extra)
    write_atomic(Path(path), buffer.getvalue())
    return Path(path)


def load_reference(path) -> Dict[str, object]:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"reference statistics file not found: {path}")
    try:
        data = np.load(path)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read reference statistics {path}: {err}") from None
    if "mu" not in data.files or "sigma" not in data.files:
        raise ValueError(f"{path} is not a reference statistics file (needs arrays 'mu' and 'sigma')")
    ref = {"mu": data["mu"], "sigma": data["sigma"],
           "extractor": str(data["extractor"]) if "extractor" in data.files else INCEPTION}
    if "features" in data.files:
        ref["features"] = torch.from_numpy(data["features"])
    return ref
