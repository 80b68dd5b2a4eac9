"""Image sets for metrics: a folder of images, an ``.npz`` of uint8 images, or a bundled dataset.

Each is a ``torch.utils.data.Dataset`` of uint8 CHW tensors (the input torch-fidelity's feature
extractors take), checked up front: empty sets, mixed image sizes and unreadable files are clear
errors before any feature is computed.

    DIR                    every .png/.jpg/.jpeg/.bmp/.webp below DIR, sorted (``grid.png`` excluded)
    FILE.npz               key ``samples`` (ours, N x H x W x C), or ``arr_0`` / ``images``
    fashion-mnist:train    bundled datasets (also fashion-mnist:test, digits)
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
DATASETS = {"fashion-mnist:train": ("fashion-mnist", "train"), "fashion-mnist:test": ("fashion-mnist", "test"),
            "digits": ("digits", "all")}


class ImageFolder(Dataset):
    def __init__(self, root: Path):
        self.files: List[Path] = sorted(p for p in root.rglob("*")
                                        if p.suffix.lower() in IMAGE_SUFFIXES and p.name != "grid.png"
                                        and not p.name.startswith("."))
        if not self.files:
            raise ValueError(f"no images in {root} (looked for {', '.join(sorted(IMAGE_SUFFIXES))} files)")
        sizes = {}
        for path in self.files:
            try:
                with Image.open(path) as im:
                    sizes.setdefault((im.size, len(im.getbands())), path)
            except (UnidentifiedImageError, OSError) as err:
                raise ValueError(f"cannot read image {path}: {err}") from None
        if len(sizes) > 1:
            (a, pa), (b, pb) = list(sizes.items())[:2]
            raise ValueError(f"images of mixed sizes in {root}: {pa.name} is {a[0][0]}x{a[0][1]} with {a[1]} channels, "
                             f"{pb.name} is {b[0][0]}x{b[0][1]} with {b[1]} channels; all images must match")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        array = np.array(Image.open(self.files[index]))
        array = array[..., None] if array.ndim == 2 else array
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class ImageArray(Dataset):
    """uint8 images (N, H, W, C) held in memory."""

    def __init__(self, images: np.ndarray, origin: str):
        if images.ndim == 3:
            images = images[..., None]
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(f"{origin}: expected uint8 images N x H x W x C, got {images.dtype} {images.shape}")
        if len(images) == 0:
            raise ValueError(f"{origin} holds no images")
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return torch.from_numpy(self.images[index]).permute(2, 0, 1).contiguous()


def open_images(spec: Union[str, Path]) -> Dataset:
    """The image set a ``--images`` / ``--data`` argument names."""
    spec = str(spec)
    if spec in DATASETS:
        from ..datasets import load_dataset
        name, split = DATASETS[spec]
        images, _ = load_dataset(name, split=split)
        pixels = (images * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return ImageArray(pixels, spec)
    path = Path(spec)
    if path.is_dir():
        return ImageFolder(path)
    if path.suffix == ".npz" and path.is_file():
        try:
            data = np.load(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read {path}: {err}") from None
        for key in ("samples", "arr_0", "images"):
            if key in data.files:
                return ImageArray(data[key], str(path))
        raise ValueError(f"{path} has no image array (expected a key 'samples', 'arr_0' or 'images'; found {data.files})")
    if not path.exists():
        raise ValueError(f"{spec}: no such folder or file, and not a bundled dataset ({', '.join(DATASETS)})")
    raise ValueError(f"{spec}: expected a folder of images, an .npz file or a bundled dataset ({', '.join(DATASETS)})")
