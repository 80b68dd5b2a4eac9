"""Train the bundled Fashion-MNIST classifier (the ``fashion-mnist-classifier`` FID extractor).

    diffsampler train classifier --out checkpoints/fashion-mnist-classifier --epochs 3

Adam with a one-cycle-style schedule (linear warm-up for 5% of the steps, cosine decay), random
translations of up to ``shift`` pixels; writes ``model.safetensors`` and ``config.json`` (with
the test accuracy) atomically.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from ..fileio import write_atomic
from ..metrics.classifier import (CONFIG_FILE, WEIGHTS_FILE, ClassifierConfig, FashionClassifier, _default_dir,
                                  accuracy)


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
            write_atomic(out / name, payload)
        log(f"saved {out / WEIGHTS_FILE} (test accuracy {acc:.4f}, {seconds / 60:.1f} min)")
    result["model"] = model
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="diffsampler train classifier", description="Train the Fashion-MNIST classifier.")
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
