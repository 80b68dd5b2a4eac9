"""Which model is this?  Digests that files made for one model record, and check elsewhere.

* :func:`model_fingerprint`: a short digest of the model's identity tensors (weights; a Gaussian
  mixture's means and stds) and sigma range, ``"count:sum:sum_of_squares:sigma_min:sigma_max"``.
  Cheap (one pass, no bytes hashed), stable across devices to float rounding, and the form that
  learned-sampler, AMED and schedule files record.
* :func:`weights_hash`: SHA-256 of the identity tensors' bytes (provenance in run folders: two
  runs share images only when their weights hash equal).
* :func:`guidance_scale`: the classifier-free guidance scale a denoiser applies (1 without).

Models declare their identity tensors (:meth:`Denoiser.identity_tensors`); wrappers forward them.
A plain callable has none (None).
"""
from __future__ import annotations

import hashlib
from typing import List, Optional

import torch

from .base import Denoiser, sigma_range


def _tensors(denoiser) -> List[torch.Tensor]:
    return denoiser.identity_tensors() if isinstance(denoiser, Denoiser) else []


def model_fingerprint(denoiser) -> Optional[str]:
    tensors = _tensors(denoiser)
    if not tensors:
        return None
    count = sum(t.numel() for t in tensors)
    total = sum(float(t.double().sum()) for t in tensors)
    squares = sum(float(t.double().pow(2).sum()) for t in tensors)
    lo, hi = sigma_range(denoiser)
    return f"{count}:{total:.6e}:{squares:.6e}:{lo}:{hi}"


def weights_hash(denoiser) -> Optional[str]:
    tensors = _tensors(denoiser)
    if not tensors:
        return None
    digest = hashlib.sha256()
    for t in tensors:
        digest.update(str((tuple(t.shape), str(t.dtype))).encode())
        digest.update(t.detach().contiguous().cpu().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def guidance_scale(denoiser) -> float:
    from .guidance import ClassifierFreeGuidance
    return float(denoiser.scale) if isinstance(denoiser, ClassifierFreeGuidance) else 1.0
