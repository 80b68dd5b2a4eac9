"""Write pickles in EDM's network-snapshot format (see :mod:`.edm_pickle` for the format).

Tests and tools build snapshots here without EDM's repository:

    net = tiny_edm_network(img_resolution=8, img_channels=2, label_dim=4)
    save_edm_snapshot("network-snapshot-000000.pkl", {"ema": net, "loss_fn": None, ...})

Instances of classes marked with ``persistent_class`` (the decorator the stand-in
``torch_utils.persistence`` provides) are written as calls of
``torch_utils.persistence._reconstruct_persistent_obj(meta)`` with ``meta`` holding
``type``, ``version``, ``module_src``, ``class_name`` and ``state`` -- what EDM's own loader
expects -- so the files load with EDM's code as well as with :func:`.edm_pickle.load_edm_snapshot`.
Everything else is pickled normally (torch tensors by torch's reducers), protocol 4 like EDM's.
Networks read back by :func:`.edm_pickle.load_edm_pickle` can be written again the same way.
"""
from __future__ import annotations

import inspect
import io
import pickle
import sys
import types
from pathlib import Path
from typing import Union

import torch

from diffsampler.models.edm_pickle import (FORMAT_VERSION, SOURCE_MODULE_PREFIX, _PERSISTENT, _reconstruct_persistent_obj,
                         edm_shims)

PROTOCOL = 4

# A tiny EDM-style network: preconditioning as in Karras et al. 2022, Table 1 ("EDM" column),
# around a two-convolution "U-Net" with noise and label embeddings.  It follows the interface of
# EDM's preconditioning classes: attributes img_resolution, img_channels, label_dim, sigma_min,
# sigma_max, sigma_data, a `model` submodule, and forward(x, sigma, class_labels=None, ...).
TINY_EDM_SOURCE = '''\
"""Tiny EDM-style preconditioned network (a diffsampler test fixture)."""
import torch
from torch_utils import persistence


@persistence.persistent_class
class TinyNet(torch.nn.Module):
    """F(x_in, c_noise, class_labels): conv -> + embeddings -> SiLU -> conv."""

    def __init__(self, channels, hidden, label_dim):
        super().__init__()
        self.conv_in = torch.nn.Conv2d(channels, hidden, 3, padding=1)
        self.noise_embed = torch.nn.Linear(1, hidden)
        self.label_embed = torch.nn.Linear(label_dim, hidden, bias=False) if label_dim else None
        self.conv_out = torch.nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x, noise_labels, class_labels=None):
        emb = torch.sin(self.noise_embed(noise_labels.reshape(-1, 1)))
        if self.label_embed is not None:
            emb = emb + self.label_embed(class_labels)
        h = torch.nn.functional.silu(self.conv_in(x) + emb[:, :, None, None])
        return self.conv_out(h)


@persistence.persistent_class
class EDMPrecond(torch.nn.Module):
    """D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) with EDM's coefficients."""

    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_min=0.0, sigma_max=float("inf"),
                 sigma_data=0.5, hidden=16):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data
        self.model = TinyNet(img_channels, hidden, label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros(x.shape[0], self.label_dim, device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        sd2 = self.sigma_data ** 2
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + sd2).sqrt()
        c_in = 1 / (sigma ** 2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        f = self.model(c_in * x, c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        return c_skip * x + c_out * f.to(torch.float32)

    def round_sigma(self, sigma):
        return torch.as_tensor(sigma)


@persistence.persistent_class
class EDMLoss:
    """Stand-in for the training loss object snapshots also hold (a plain persistent object)."""

    def __init__(self, P_mean=-1.2, P_std=1.2, sigma_data=0.5):
        self.P_mean, self.P_std, self.sigma_data = P_mean, P_std, sigma_data
'''


def module_from_source(source: str) -> types.ModuleType:
    """Execute ``source`` (which may import ``torch_utils`` / ``dnnlib``) into a new module.

    Classes it decorates with ``persistence.persistent_class`` are remembered with ``source``,
    so their instances can be written by :func:`save_edm_snapshot`.
    """
    with edm_shims() as session:
        return session.module_for(source, "module_from_source")


def tiny_edm_network(img_resolution: int = 8, img_channels: int = 1, label_dim: int = 0, hidden: int = 16,
                     seed: int = 0) -> torch.nn.Module:
    """A freshly initialized tiny ``EDMPrecond`` (class from :data:`TINY_EDM_SOURCE`), eval mode, no grad.

    Like EDM's objects, it and its submodule keep their constructor arguments as ``_init_args`` /
    ``_init_kwargs`` (part of the pickled state; loaders do not need them)."""
    cls = module_from_source(TINY_EDM_SOURCE).EDMPrecond
    kwargs = dict(label_dim=label_dim, hidden=hidden)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = cls(img_resolution, img_channels, **kwargs)
    # EDM's objects also carry their constructor arguments in their state; so do these.
    net._init_args, net._init_kwargs = (img_resolution, img_channels), kwargs
    net.model._init_args, net.model._init_kwargs = (img_channels, hidden, label_dim), {}
    return net.eval().requires_grad_(False)


def tiny_edm_loss():
    """The plain persistent object of :data:`TINY_EDM_SOURCE` (stands for a snapshot's ``loss_fn``)."""
    return module_from_source(TINY_EDM_SOURCE).EDMLoss()


class _SnapshotPickler(pickle.Pickler):
    """Writes instances of persistent classes as ``_reconstruct_persistent_obj(meta)`` calls."""

    def reducer_override(self, obj):
        cls = type(obj)
        try:
            known = cls in _PERSISTENT
        except TypeError:
            return NotImplemented
        if not known:
            if cls.__module__.startswith(SOURCE_MODULE_PREFIX):
                raise pickle.PicklingError(f"{cls.__name__} is defined in a pickled source but not decorated with "
                                           "persistence.persistent_class; it could not be loaded back")
            return NotImplemented
        source = _PERSISTENT[cls]
        if source is None:
            source = inspect.getsource(sys.modules[cls.__module__])
        getstate = getattr(obj, "__getstate__", None)
        state = getstate() if callable(getstate) else dict(obj.__dict__)
        meta = {"type": "class", "version": FORMAT_VERSION, "module_src": source, "class_name": cls.__name__,
                "state": state}
        return _reconstruct_persistent_obj, (meta,), None


def dumps_edm_snapshot(data) -> bytes:
    """The pickle bytes of ``data`` in EDM's snapshot format."""
    buffer = io.BytesIO()
    with edm_shims():
        _SnapshotPickler(buffer, protocol=PROTOCOL).dump(data)
    return buffer.getvalue()


def save_edm_snapshot(path: Union[str, Path], data) -> Path:
    """Write ``data`` (normally ``{'ema': net, 'loss_fn': ..., 'augment_pipe': ..., 'dataset_kwargs': ...}``)."""
    path = Path(path)
    path.write_bytes(dumps_edm_snapshot(data))
    return path
