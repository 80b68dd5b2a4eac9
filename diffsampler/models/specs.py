"""Model specs: the strings ``--model`` accepts, turned into denoisers.

    fashion-mnist               the bundled EDM U-Net trained on Fashion-MNIST (class-conditional; default)
    NAME, bundled:NAME          any model bundled under checkpoints/NAME (fashion-mnist-sfd: an SFD-v student)
    DIR                         a folder in the bundled format (config.json + model.safetensors), e.g. a
                                student written by ``diffsampler distill --out DIR``
    digits                      the optimal denoiser of scikit-learn's 8x8 digits
    diffusers:DIR               a saved diffusers pipeline (pixel UNet, Stable Diffusion, SD3, ...)
    edm:PATH.pkl                an NVlabs EDM network snapshot; unpickling runs code from the file, so it
                                needs trust_pickle=True (--trust-pickle)
    gmm:digits[:STD[:N]]        the same, as a kernel density estimate with bandwidth STD (default 0),
                                of the first N images if given
    gmm:fashion-mnist[:STD[:N]] the same for Fashion-MNIST's training split (needs the dataset)
    gmm:synthetic:K:CxHxW[:SEED]  K random isotropic Gaussians in C x H x W (stds 0.1-0.4)

Model families add their names and prefixes here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict

import torch

from ..defaults import DEFAULT_MODEL  # noqa: F401  (re-exported: the spec --model defaults to)
from .gmm import GaussianMixture


def _dataset_kde(name: str, arg: str) -> GaussianMixture:
    """``STD[:N]``: the kernel width (default 0) and, optionally, only the first N images."""
    from ..datasets import load_dataset
    parts = arg.split(":") if arg else []
    try:
        std = float(parts[0]) if parts and parts[0] else 0.0
        count = int(parts[1]) if len(parts) > 1 else None
    except ValueError:
        raise ValueError(f"gmm:{name} takes [:STD[:N]] (a kernel width and an image count), got gmm:{name}:{arg}") \
            from None
    if len(parts) > 2 or std < 0 or (count is not None and count < 1):
        raise ValueError(f"gmm:{name} takes [:STD[:N]] with STD >= 0 and N >= 1, got gmm:{name}:{arg}")
    images, _ = load_dataset(name, split="all" if name == "digits" else "train")
    return GaussianMixture.from_data(images[:count] if count is not None else images, std=std)


def _synthetic(arg: str) -> GaussianMixture:
    usage = "gmm:synthetic needs K:CxHxW[:SEED] with K >= 1 components and positive sizes, e.g. gmm:synthetic:10:3x32x32"
    parts = arg.split(":")
    try:
        k, shape = int(parts[0]), tuple(int(s) for s in parts[1].lower().split("x"))
        seed = int(parts[2]) if len(parts) == 3 else 0
    except (ValueError, IndexError):
        raise ValueError(f"{usage}; got gmm:synthetic:{arg}") from None
    if len(parts) not in (2, 3) or k < 1 or not shape or min(shape) < 1:
        raise ValueError(f"{usage}; got gmm:synthetic:{arg}")
    gen = torch.Generator().manual_seed(seed)
    means = 0.5 * torch.randn(k, *shape, dtype=torch.float64, generator=gen)
    stds = 0.1 + 0.3 * torch.rand(k, dtype=torch.float64, generator=gen)
    return GaussianMixture(means, stds=stds)


def _gmm(arg: str) -> GaussianMixture:
    kind, _, rest = arg.partition(":")
    if kind == "synthetic":
        return _synthetic(rest)
    if kind in ("digits", "fashion-mnist"):
        return _dataset_kde(kind, rest)
    raise ValueError(f"unknown Gaussian-mixture spec gmm:{arg}: use gmm:digits[:STD], gmm:fashion-mnist[:STD] "
                     "or gmm:synthetic:K:CxHxW[:SEED]")


def _bundled(name: str):
    def load():
        from .bundled import load_bundled
        return load_bundled(name)
    return load


def _diffusers(arg: str, dtype=None):
    from ..pipelines import denoiser_for_pipeline, load_pipeline
    return denoiser_for_pipeline(load_pipeline(arg, torch_dtype=dtype))


def _edm(arg: str, trust_pickle: bool = False):
    from .edm_pickle import load_edm_snapshot
    return load_edm_snapshot(arg, trust=trust_pickle)


NAMED: Dict[str, Callable[[], object]] = {
    "fashion-mnist": _bundled("fashion-mnist"),
    "digits": lambda: _dataset_kde("digits", ""),
}
PREFIXES: Dict[str, Callable[[str], object]] = {
    "gmm": _gmm,
    "diffusers": _diffusers,
    "edm": _edm,
}


def load_model(spec: str = DEFAULT_MODEL, dtype=None, trust_pickle: bool = False):
    """The denoiser a model spec names (see the module docstring for the forms).

    ``dtype`` is the dtype to load network weights in where the format has a choice (diffusers
    pipelines); analytic models compute in float64 whatever it is.  ``trust_pickle`` allows
    formats whose loading runs code from the file (EDM snapshots)."""
    if spec in NAMED:
        return NAMED[spec]()
    from . import bundled
    prefix, sep, arg = spec.partition(":")
    if spec in bundled.available_models() or (sep and prefix == "bundled"):
        return bundled.load_bundled(arg if sep else spec)
    if sep and prefix == "diffusers":
        return _diffusers(arg, dtype)
    if sep and prefix == "edm":
        return _edm(arg, trust_pickle)
    if sep and prefix in PREFIXES:
        return PREFIXES[prefix](arg)
    if Path(spec).is_dir():
        return load_folder(spec, dtype=dtype, trust_pickle=trust_pickle)
    names = list(dict.fromkeys([*NAMED, *bundled.available_models()]))
    raise ValueError(f"unknown model {spec!r}: use one of {', '.join(names)}, "
                     f"{', '.join(p + ':...' for p in [*PREFIXES, 'bundled'])}, or a model folder")


def load_folder(folder, dtype=None, trust_pickle: bool = False):
    """A model folder: the bundled format (a U-Net, or a student of one), or a student of another
    model (``"architecture": "student"``: its base model spec plus the fine-tuned weights)."""
    import json

    from . import bundled
    folder = Path(folder)
    config_path = folder / bundled.CONFIG_FILE
    if not config_path.is_file():
        raise ValueError(f"{folder} is not a model folder: it has no {bundled.CONFIG_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise bundled.BundledModelError(f"corrupt {config_path}: {err}") from None
    if config.get("architecture") == "student":
        return _student_folder(folder, config, dtype, trust_pickle)
    return bundled.load_bundled(folder.name, root=folder.parent)


def _student_folder(folder: Path, config: dict, dtype, trust_pickle: bool):
    """A student of a model that is not in the bundled format (a diffusers UNet, an EDM snapshot)."""
    import hashlib

    from safetensors.torch import load as st_load

    from .bundled import WEIGHTS_FILE, BundledModelError
    from .student import student_from_config
    blob = (folder / WEIGHTS_FILE).read_bytes()
    if config.get("weights_sha256") and hashlib.sha256(blob).hexdigest() != config["weights_sha256"]:
        raise BundledModelError(f"corrupt {folder / WEIGHTS_FILE}: SHA-256 does not match the one in config.json")
    tensors = st_load(blob)
    inner = load_model(config["base_model"], dtype=dtype, trust_pickle=trust_pickle)
    net = inner.network
    param = next(net.parameters())
    state = {k[len("network."):]: v.to(param.dtype) for k, v in tensors.items() if k.startswith("network.")}
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BundledModelError(f"{folder} does not hold weights of {config['base_model']}: {err}") from None
    embedding = {k[len("step_embedding."):]: v for k, v in tensors.items() if k.startswith("step_embedding.")}
    net.requires_grad_(False).eval()
    student = student_from_config(inner, config["distilled"], embedding or None)
    student.name, student.config_dict = folder.name, config
    return student
