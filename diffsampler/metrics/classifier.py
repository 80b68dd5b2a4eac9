"""A small CNN classifier for 28x28 Fashion-MNIST, used to measure sample quality.

Two numbers come out of it: the **class accuracy** of class-conditional samples (the fraction
classified as the class they were generated for), and its penultimate-layer **features** (a 128-d
vector after global average pooling), which the metrics pipeline uses as the
``fashion-mnist-classifier`` extractor (FID in that feature space).

Train with ``diffsampler train classifier`` (:mod:`diffsampler.tools.train_classifier`, about 10
minutes on one CPU thread); load with :func:`load_classifier`.  Images are float
tensors in [-1, 1] of shape (N, 1, 28, 28).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch
from torch import nn

CLASSIFIER_NAME = "fashion-mnist-classifier"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


@dataclass
class ClassifierConfig:
    in_channels: int = 1
    num_classes: int = 10
    widths: Tuple[int, int, int] = (32, 64, 128)
    dropout: float = 0.3

    def __post_init__(self):
        self.widths = tuple(int(w) for w in self.widths)


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class FashionClassifier(nn.Module):
    """conv-conv-pool (28->14), conv-conv-pool (14->7), conv, global average pool, linear."""

    def __init__(self, config: Optional[ClassifierConfig] = None):
        super().__init__()
        self.config = cfg = config or ClassifierConfig()
        w1, w2, w3 = cfg.widths
        self.body = nn.Sequential(
            _conv_bn(cfg.in_channels, w1), _conv_bn(w1, w1), nn.MaxPool2d(2),
            _conv_bn(w1, w2), _conv_bn(w2, w2), nn.MaxPool2d(2),
            _conv_bn(w2, w3),
        )
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(w3, cfg.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.config.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer features (batch, feature_dim): globally average-pooled last conv."""
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


@torch.no_grad()
def compute_features(model: FashionClassifier, images: torch.Tensor, batch: int = 500) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D), logits (N, classes)) of images in [-1, 1], shape (N, 1, 28, 28)."""
    model.eval()
    feats, logits = [], []
    dev = next(model.parameters()).device
    for i in range(0, images.shape[0], batch):
        xb = images[i:i + batch].to(dev, torch.float32).contiguous(memory_format=torch.channels_last)
        f = model.features(xb)
        feats.append(f.cpu())
        logits.append(model.head(f).cpu())
    return torch.cat(feats), torch.cat(logits)


@torch.no_grad()
def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = compute_features(model, images)
    return float((logits.argmax(1) == labels.cpu()).float().mean())


def _default_dir() -> Path:
    from ..models.bundled import checkpoints_dir

    return checkpoints_dir() / CLASSIFIER_NAME


def load_classifier(path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu") -> FashionClassifier:
    """Load the trained classifier (default ``checkpoints/fashion-mnist-classifier``), eval mode."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else _default_dir()
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(
            f"no trained classifier in {folder} (need {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
            f"`diffsampler train classifier --out {folder}`"
        )
    meta = json.loads(cfg_path.read_text())
    model = FashionClassifier(ClassifierConfig(**meta["classifier"]))
    state = load_file(str(w_path))
    # BatchNorm's num_batches_tracked (int) is not stored; it is unused in eval mode.
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise RuntimeError(f"{w_path} does not match the classifier architecture: missing {missing}, unexpected {unexpected}")
    model.requires_grad_(False)
    return model.eval().to(device).to(memory_format=torch.channels_last)
