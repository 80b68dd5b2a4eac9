"""A small CNN classifier for 28x28 Fashion-MNIST, used to measure sample quality.

Two numbers come out of it:

* **class accuracy** of class-conditional samples: the fraction classified as the class they
  were generated for;
* **Frechet distance** between Gaussian fits of the penultimate-layer features (a 128-d vector
  after global average pooling) of two image sets -- the FID recipe with this small
  classifier in place of Inception:

      FD = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)).

Train with ``python -m diffsampler.metrics.classifier --out checkpoints/fashion-mnist-classifier``
(about 10 minutes on one CPU thread); load with :func:`load_classifier`.  Images are float
tensors in [-1, 1] of shape (N, 1, 28, 28).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
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


# --------------------------------------------------------------------------------------------
# statistics and the Frechet distance
# --------------------------------------------------------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Frechet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``|mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))``, computed by
    torch-fidelity (:func:`diffsampler.metrics.fid.frechet_distance`)."""
    from .fid import frechet_distance as fid_distance
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    return fid_distance({"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2})


def feature_stats(features: Union[torch.Tensor, np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
    """Mean vector and (unbiased) covariance matrix of an (N, D) feature array."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an (N >= 2, D) feature array, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


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


def frechet_distance_between(model: FashionClassifier, images_a: torch.Tensor, images_b: torch.Tensor) -> float:
    """Frechet distance between two image sets in ``model``'s feature space."""
    fa, _ = compute_features(model, images_a)
    fb, _ = compute_features(model, images_b)
    return frechet_distance(*feature_stats(fa), *feature_stats(fb))


@torch.no_grad()
def accuracy(model: FashionClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    _, logits = compute_features(model, images)
    return float((logits.argmax(1) == labels.cpu()).float().mean())


# --------------------------------------------------------------------------------------------
# training, saving, loading
# --------------------------------------------------------------------------------------------
def _default_dir() -> Path:
    from ..models.bundled import checkpoints_dir

    return checkpoints_dir() / CLASSIFIER_NAME


def train_classifier(
    out: Union[str, Path, None] = None,
    epochs: int = 3,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    threads: int = 1,
    shift: int = 2,
    data: Optional[Dict[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
    log=print,
) -> Dict:
    """Train on the Fashion-MNIST training split and save weights + config (with test accuracy).

    Adam with a one-cycle-style schedule (linear warm-up for 5% of the steps, cosine decay),
    random translations of up to ``shift`` pixels.  ``data`` = {"train": (x, y), "test": (x, y)}
    overrides the real dataset (used by tests).
    """
    from safetensors.torch import save

    from ..datasets import load_fashion_mnist

    torch.set_num_threads(max(1, threads))
    torch.manual_seed(seed)
    t0 = time.time()
    if data is None:
        data = {"train": load_fashion_mnist("train"), "test": load_fashion_mnist("test")}
    xtr, ytr = data["train"]
    xte, yte = data["test"]
    cfg = ClassifierConfig(in_channels=xtr.shape[1], num_classes=int(ytr.max()) + 1)
    model = FashionClassifier(cfg).to(memory_format=torch.channels_last)  # ~2.5x faster on CPU
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = xtr.shape[0] // batch
    total = epochs * steps_per_epoch
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / total)))
    )
    step = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(xtr.shape[0], generator=gen)
        run_loss = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch:(i + 1) * batch]
            xb, yb = xtr[idx], ytr[idx]
            if shift:
                pad = F.pad(xb, (shift,) * 4, value=-1.0)
                dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
                xb = pad[:, :, dy:dy + xb.shape[2], dx:dx + xb.shape[3]]
            loss = F.cross_entropy(model(xb.contiguous(memory_format=torch.channels_last)), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += float(loss.detach())
            if (i + 1) % 100 == 0:
                log(f"epoch {epoch + 1}/{epochs} step {i + 1}/{steps_per_epoch} loss {run_loss / 100:.4f} "
                    f"({time.time() - t0:.0f} s)")
                run_loss = 0.0
        acc = accuracy(model, xte, yte)
        log(f"epoch {epoch + 1}: test accuracy {acc:.4f}")
    seconds = time.time() - t0
    model.eval()
    result = {
        "format": "diffsampler-fashion-classifier",
        "architecture": "fashion-classifier",
        "classifier": {**asdict(cfg), "widths": list(cfg.widths)},
        "feature_dim": model.feature_dim,
        "test_accuracy": round(acc, 4),
        "epochs": epochs, "batch": batch, "lr": lr, "seed": seed, "shift_augmentation": shift,
        "train_examples": int(xtr.shape[0]), "test_examples": int(xte.shape[0]),
        "training_seconds": round(seconds, 1),
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()
                   if v.is_floating_point()}
        blob = save(tensors, metadata={"format": result["format"]})
        result["weights_sha256"] = hashlib.sha256(blob).hexdigest()
        for name, payload in ((WEIGHTS_FILE, blob), (CONFIG_FILE, (json.dumps(result, indent=2) + "\n").encode())):
            tmp = out / (name + f".tmp{os.getpid()}")
            tmp.write_bytes(payload)
            os.replace(tmp, out / name)
        log(f"saved {out / WEIGHTS_FILE} (test accuracy {acc:.4f}, {seconds / 60:.1f} min)")
    result["model"] = model
    return result


def load_classifier(path: Union[str, Path, None] = None, device: Union[str, torch.device] = "cpu") -> FashionClassifier:
    """Load the trained classifier (default ``checkpoints/fashion-mnist-classifier``), eval mode."""
    from safetensors.torch import load_file

    folder = Path(path) if path is not None else _default_dir()
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise FileNotFoundError(
            f"no trained classifier in {folder} (need {CONFIG_FILE} and {WEIGHTS_FILE}); train one with "
            f"`python -m diffsampler.metrics.classifier --out {folder}`"
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffsampler.metrics.classifier", description="Train the Fashion-MNIST classifier.")
    p.add_argument("--out", default=None, help="output folder (default checkpoints/fashion-mnist-classifier)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    out = a.out or _default_dir()
    train_classifier(out=out, epochs=a.epochs, batch=a.batch, lr=a.lr, seed=a.seed, threads=a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
