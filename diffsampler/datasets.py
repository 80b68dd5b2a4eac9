"""Small image datasets as float tensors in [-1, 1].

Every loader returns ``(images, labels)``: ``images`` is a float32 tensor of shape
``(N, 1, H, W)`` scaled to [-1, 1], ``labels`` an int64 tensor of shape ``(N,)``.

* :func:`load_fashion_mnist` reads the IDX files installed by the Debian package
  ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``; override the folder with
  ``DIFFSAMPLER_FASHION_MNIST`` or the ``root`` argument).  The files may be gzipped or not.
* :func:`load_digits` wraps scikit-learn's bundled 8x8 digits (values 0..16): tiny, always
  available, used by the tests to train for a few steps in seconds.
"""
from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_ENV = "DIFFSAMPLER_FASHION_MNIST"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

# IDX type codes -> numpy dtypes (big-endian where it matters).
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they should be."""


def read_idx(path: os.PathLike) -> np.ndarray:
    """Read one IDX file (the MNIST container format), gzipped or plain, into a numpy array.

    Layout: two zero bytes, one type byte, one byte with the number of dimensions, then one
    big-endian uint32 per dimension, then the data in C order.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type 0x{type_code:02x}")
    header_end = 4 + 4 * ndim
    dims = struct.unpack(">" + "I" * ndim, raw[4:header_end])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    count = int(np.prod(dims)) if dims else 1
    if len(raw) - header_end < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated IDX file (expected {count} items of shape {dims})")
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header_end)
    return data.reshape(dims)


def _find_idx(root: Path, stem: str) -> Optional[Path]:
    for name in (stem, stem + ".gz"):
        p = root / name
        if p.is_file():
            return p
    return None


def fashion_mnist_root(root: Optional[os.PathLike] = None) -> Path:
    """The folder holding the Fashion-MNIST IDX files (argument > env var > Debian path)."""
    if root is not None:
        return Path(root)
    env = os.environ.get(FASHION_MNIST_ENV)
    return Path(env) if env else FASHION_MNIST_DIR


def load_fashion_mnist(
    split: str = "train", root: Optional[os.PathLike] = None, limit: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST as ``(images (N,1,28,28) in [-1,1], labels (N,) int64)``.

    ``split`` is ``"train"`` (60000 images) or ``"test"`` (10000); ``limit`` keeps the first
    ``limit`` examples.
    """
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'test'")
    folder = fashion_mnist_root(root)
    prefix = _SPLIT_PREFIX[split]
    img_path = _find_idx(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = _find_idx(folder, f"{prefix}-labels-idx1-ubyte")
    if img_path is None or lab_path is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split} files ({prefix}-images-idx3-ubyte[.gz], "
            f"{prefix}-labels-idx1-ubyte[.gz]) not found in {folder}. Install the Debian package "
            f"'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist) or point "
            f"{FASHION_MNIST_ENV} at a folder holding them."
        )
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST files in {folder} have inconsistent shapes {images.shape} / {labels.shape}"
        )
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 127.5 - 1.0
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> Tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits as _sk_load_digits

    d = _sk_load_digits()
    return d.images, d.target


def load_digits(split: str = "all", test_fraction: float = 0.2) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(images (N,1,8,8) in [-1,1], labels (N,) int64)``.

    ``split`` is ``"all"`` (1797 images), ``"train"`` or ``"test"`` (a fixed, unshuffled split
    with the last ``test_fraction`` of the data as test).
    """
    images, target = _sklearn_digits()
    x = torch.from_numpy(images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    y = torch.from_numpy(target.astype(np.int64))
    n_test = int(round(len(y) * test_fraction))
    if split == "all":
        return x, y
    if split == "train":
        return x[: len(y) - n_test], y[: len(y) - n_test]
    if split == "test":
        return x[len(y) - n_test:], y[len(y) - n_test:]
    raise ValueError(f"unknown split {split!r}; expected 'all', 'train' or 'test'")


DATASETS = {
    "fashion-mnist": {"loader": load_fashion_mnist, "shape": (1, 28, 28), "num_classes": 10},
    "digits": {"loader": load_digits, "shape": (1, 8, 8), "num_classes": 10},
}


def load_dataset(name: str, split: str = "train", **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
    """Load a dataset by name (``"fashion-mnist"`` or ``"digits"``)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    return DATASETS[name]["loader"](split=split, **kwargs)
