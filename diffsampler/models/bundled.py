"""Models shipped with the repository under ``checkpoints/<name>/``.

Each folder holds ``config.json`` (written by :mod:`diffsampler.tools.train_unet`) and
``model.safetensors`` (float16 EMA weights).  :func:`load_bundled` rebuilds the network from the
config and returns a ready-to-sample :class:`~diffsampler.models.edm.EDMDenoiser` in float32.
A distilled student of such a model (:mod:`diffsampler.distill`) is the same folder with a
``"distilled"`` block in its config (native plans per NFE, how it was made): it loads as a
:class:`~diffsampler.models.student.StudentDenoiser` that samples with its own grid and NFE rule.

The checkpoints folder is the repository's top-level ``checkpoints/`` (found relative to this
file); set ``DIFFSAMPLER_CHECKPOINTS`` to use another folder.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional, Union

import torch

from .edm import EDMDenoiser
from .unet import UNet, UNetConfig

CHECKPOINTS_ENV = "DIFFSAMPLER_CHECKPOINTS"
DEFAULT_MODEL = "fashion-mnist"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "diffsampler-edm-unet"


class BundledModelError(RuntimeError):
    """A bundled model is unknown, missing files or unreadable."""


def checkpoints_dir() -> Path:
    """``$DIFFSAMPLER_CHECKPOINTS`` if set, else the repository's ``checkpoints/`` folder."""
    env = os.environ.get(CHECKPOINTS_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "checkpoints"


def available_models(root: Optional[Path] = None) -> List[str]:
    """Names of the folders under the checkpoints directory that hold a diffusion model config."""
    root = Path(root) if root is not None else checkpoints_dir()
    if not root.is_dir():
        return []
    names = []
    for d in sorted(root.iterdir()):
        cfg = d / CONFIG_FILE
        if not cfg.is_file():
            continue
        try:
            kind = json.loads(cfg.read_text()).get("architecture")
        except (OSError, ValueError):
            kind = "unet"  # unreadable: still list it, loading will explain
        if kind == "unet":
            names.append(d.name)
    return names


def load_bundled(
    name: str = DEFAULT_MODEL,
    device: Union[str, torch.device] = "cpu",
    root: Optional[Union[str, Path]] = None,
    verify: bool = True,
):
    """Load ``checkpoints/<name>/`` as an :class:`EDMDenoiser` (float32, eval mode, no grads), or
    as a :class:`~diffsampler.models.student.StudentDenoiser` around one for a distilled student.

    ``verify`` checks the weights' SHA-256 against the one recorded in ``config.json``.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    root = Path(root) if root is not None else checkpoints_dir()
    folder = root / name
    if not folder.is_dir():
        avail = available_models(root)
        raise BundledModelError(
            f"unknown bundled model {name!r} (looked in {root}); available: "
            f"{', '.join(avail) if avail else 'none'}"
        )
    cfg_path, w_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise BundledModelError(f"bundled model {name!r} is missing {p.name} in {folder}")
    try:
        config = json.loads(cfg_path.read_text())
        unet_cfg = UNetConfig.from_dict(config["unet"])
    except (ValueError, KeyError, TypeError) as e:
        raise BundledModelError(f"corrupt {cfg_path}: {e}") from e

    blob = w_path.read_bytes()
    if verify and config.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != config["weights_sha256"]:
        raise BundledModelError(f"corrupt {w_path}: SHA-256 does not match the one in {CONFIG_FILE}")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise BundledModelError(f"corrupt {w_path}: {e}") from e

    net = UNet(unet_cfg)
    state = {k: v.to(torch.float32) for k, v in tensors.items()}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise BundledModelError(f"{w_path} does not match the architecture in {cfg_path}: {e}") from e
    net.requires_grad_(False).eval().to(device)

    shape = tuple(config.get("shape") or (unet_cfg.in_channels, unet_cfg.image_size, unet_cfg.image_size))
    den = EDMDenoiser(
        net,
        precond=config.get("precond", "edm"),
        sigma_data=config.get("sigma_data", 0.5),
        sigma_min=config.get("sigma_min", 0.002),
        sigma_max=config.get("sigma_max", 80.0),
        shape=shape,
        num_classes=int(config.get("num_classes", unet_cfg.num_classes)),
    )
    den.class_names = list(config.get("class_names") or [])
    if config.get("distilled") is not None:
        from .student import student_from_config
        try:
            den = student_from_config(den, config["distilled"])
        except (ValueError, KeyError, TypeError) as e:
            raise BundledModelError(f"corrupt {cfg_path}: its distilled block does not describe a student ({e})") from e
    den.name = name
    den.config_dict = config
    return den


def bundled_config(denoiser) -> Optional[dict]:
    """``config.json`` of ``denoiser`` in this folder format (an :class:`EDMDenoiser` around a
    :class:`UNet`, e.g. a fine-tuned copy of a bundled model), or None for any other model.  What
    the model was loaded with (its dataset, class names, training record) is kept."""
    if not isinstance(denoiser, EDMDenoiser) or not isinstance(denoiser.net, UNet):
        return None
    config = {k: v for k, v in dict(getattr(denoiser, "config_dict", None) or {}).items()
              if k not in ("weights_sha256", "weights_dtype", "distilled")}
    config.update({"format": FORMAT, "version": 1, "architecture": "unet", "unet": denoiser.net.config.to_dict(),
                   **denoiser.config(), "parameters": sum(p.numel() for p in denoiser.net.parameters())})
    config.setdefault("class_names", list(denoiser.class_names))
    return config


def write_bundled(net: torch.nn.Module, folder: Union[str, Path], config: dict, weights_dtype: str = "float16") -> dict:
    """Write ``model.safetensors`` (``net``'s weights in ``weights_dtype``) and ``config.json``
    (``config`` with the dtype and the weights' SHA-256) atomically; returns the written config."""
    from safetensors.torch import save

    from ..fileio import write_atomic
    dtypes = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}
    if weights_dtype not in dtypes:
        raise ValueError(f"weights dtype must be one of {', '.join(dtypes)}, got {weights_dtype!r}")
    folder = Path(folder)
    tensors = {k: v.detach().to("cpu", dtypes[weights_dtype]).contiguous() for k, v in net.state_dict().items()}
    blob = save(tensors, metadata={"format": FORMAT})
    write_atomic(folder / WEIGHTS_FILE, blob)
    config = {**config, "weights_dtype": weights_dtype, "weights_sha256": hashlib.sha256(blob).hexdigest()}
    write_atomic(folder / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return config
