"""Feature extractors for FID and friends, all run through torch-fidelity.

``inception-v3-compat``  torch-fidelity's Inception-v3 (the standard FID network, 2048 features).
    Weights: ``--inception-weights PATH``, else ``$DIFFSAMPLER_INCEPTION_WEIGHTS``, else torch's hub
    cache (where torch-fidelity itself keeps them), else torch-fidelity downloads them.  Offline
    and not found: a clear error says where to put the file.
``fashion-mnist-classifier``  the bundled Fashion-MNIST classifier's 128 penultimate features: a
    real, offline extractor for the bundled model's dataset, registered with torch-fidelity
    (another classifier folder: ``$DIFFSAMPLER_CLASSIFIER``).

Numbers from different extractors are never comparable; reference files record their extractor.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torch_fidelity
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
from torch_fidelity.utils import create_feature_extractor

from . import CLASSIFIER, FEATURE_LAYERS, INCEPTION

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


class ClassifierExtractor(FeatureExtractorBase):
    """The bundled classifier as a torch-fidelity feature extractor (uint8 NCHW in, (N, 128) out)."""

    def __init__(self, name, features_list, classifier_path=None, **kwargs):
        super().__init__(name, features_list)
        from .classifier import load_classifier
        self.net = load_classifier(classifier_path)

    @staticmethod
    def get_provided_features_list():
        return ("features",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "features"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 28, 28, dtype=torch.uint8)

    def forward(self, x):
        x = x.float()
        if x.shape[1] == 3:
            x = x.mean(dim=1, keepdim=True)
        if x.shape[-2:] != (28, 28):
            x = F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
        device = next(self.net.parameters()).device
        return (self.net.features((x / 127.5 - 1).to(device)).float(),)


if CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CLASSIFIER, ClassifierExtractor)


def inception_weights(explicit: Optional[str] = None) -> Optional[str]:
    """The local Inception weights file to use, or None to let torch-fidelity download them."""
    for candidate in (explicit, os.environ.get("DIFFSAMPLER_INCEPTION_WEIGHTS")):
        if candidate:
            if not Path(candidate).is_file():
                raise FileNotFoundError(f"Inception weights file not found: {candidate}")
            return str(candidate)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    return str(cached) if cached.is_file() else None


def create(name: str, device: str = "cpu", inception_weights_path: Optional[str] = None,
           classifier_path: Optional[str] = None):
    """A torch-fidelity feature extractor module (eval mode, on ``device``) and its feature layer."""
    if name not in FEATURE_LAYERS:
        raise ValueError(f"unknown feature extractor {name!r}: use one of {', '.join(FEATURE_LAYERS)}")
    layer = FEATURE_LAYERS[name]
    kwargs = {"verbose": False}
    if name == INCEPTION:
        path = inception_weights(inception_weights_path)
        kwargs["feature_extractor_weights_path"] = path
        try:
            extractor = create_feature_extractor(name, [layer], cuda=False, **kwargs)
        except OSError as err:      # URLError is an OSError: offline and no local file
            cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
            raise FileNotFoundError(
                f"the Inception-v3 weights are not available offline ({err.__class__.__name__}: {err}). Download "
                f"{INCEPTION_FILE} (torch-fidelity's release) once and put it at {cached}, or pass "
                "--inception-weights PATH, or set DIFFSAMPLER_INCEPTION_WEIGHTS") from None
    else:
        kwargs["classifier_path"] = classifier_path or os.environ.get("DIFFSAMPLER_CLASSIFIER")
        extractor = create_feature_extractor(name, [layer], cuda=False, **kwargs)
    return extractor.to(device), layer
