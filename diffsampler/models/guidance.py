"""Classifier-free guidance (Ho & Salimans 2022) as a denoiser wrapper.

    D_w(x, sigma) = D(x, sigma | uncond) + w * (D(x, sigma | cond) - D(x, sigma | uncond))

Guidance on the x0 estimate equals guidance on eps or v (each is affine in the others with the
same coefficients for both halves), so this matches what diffusers pipelines do with
``guidance_scale``.

**One guided evaluation = one model call.**  The conditional and the unconditional inputs are
concatenated along the batch, ``[uncond; cond]`` (the order diffusers pipelines use), and the
wrapped denoiser is called once with twice the batch.  NFE, as ``sample()`` measures it, counts
guided denoiser evaluations; each is one batched network forward of 2 x batch samples.  With
``scale=1`` the unconditional half is skipped (one forward of batch samples, the conditional
model); with ``scale=0`` only the unconditional half runs.

The unconditional input (``uncond=``):

* ``None`` (default): class labels become all-zero one-hot rows (the EDM convention: an all-zero
  label row is unconditional).  Labels must then be float one-hot rows ``(batch, num_classes)``,
  or integer indices with ``num_classes=`` given.
* a dict: these conditioning entries replace the ones passed to the call for the unconditional
  half, e.g. ``uncond={"encoder_hidden_states": negative_prompt_embeds}``; entries it does not
  name are the same in both halves.
* a function ``cond -> uncond cond``.

Conditioning values are batched like ``x``: tensors with leading dimension ``batch`` (or 1,
broadcast) are concatenated, nested dicts (e.g. SDXL's ``added_cond_kwargs``) recursively, and
anything else must be equal in both halves.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .base import DenoiserWrapper

Uncond = Union[None, Mapping[str, Any], Callable[[Dict[str, Any]], Dict[str, Any]]]


class ClassifierFreeGuidance(DenoiserWrapper):
    def __init__(self, denoiser, scale: float, uncond: Uncond = None, num_classes: Optional[int] = None):
        scale = float(scale)
        if not scale == scale:   # NaN
            raise ValueError("guidance scale must be a number")
        if uncond is not None and not (isinstance(uncond, Mapping) or callable(uncond)):
            raise TypeError(f"uncond must be None, a dict of conditioning or a function, got {type(uncond).__name__}")
        super().__init__(denoiser)
        self.scale, self.uncond = scale, uncond
        if num_classes is not None:
            self.num_classes = int(num_classes)

    def unconditional(self, cond: Dict[str, Any]) -> Dict[str, Any]:
        """The conditioning of the unconditional half for a call's ``cond``."""
        if callable(self.uncond) and not isinstance(self.uncond, Mapping):
            return dict(self.uncond(dict(cond)))
        if isinstance(self.uncond, Mapping):
            return {**cond, **self.uncond}
        if cond.get("class_labels") is None:
            raise ValueError("classifier-free guidance needs an unconditional input: pass uncond= (e.g. "
                             "{'encoder_hidden_states': negative_prompt_embeds}) or class_labels to zero out")
        labels = torch.as_tensor(cond["class_labels"])
        if not labels.is_floating_point():
            raise ValueError("integer class_labels cannot be zeroed for the unconditional half: pass one-hot "
                             "rows (batch, num_classes) or give ClassifierFreeGuidance(num_classes=...)")
        return {**cond, "class_labels": torch.zeros_like(labels)}

    def _one_hot_labels(self, cond: Dict[str, Any], dtype: torch.dtype) -> Dict[str, Any]:
        """Integer labels -> one-hot rows (in the sample dtype) when num_classes is known."""
        labels = cond.get("class_labels")
        if self.uncond is None and labels is not None and self.num_classes:
            labels = torch.as_tensor(labels)
            if not labels.is_floating_point():
                return {**cond, "class_labels": one_hot(labels, self.num_classes).to(device=labels.device, dtype=dtype)}
        return cond

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        if self.scale == 1.0:
            return self.inner(x, sigma, **cond)
        cond = self._one_hot_labels(cond, x.dtype)
        uncond = self.unconditional(cond)
        if self.scale == 0.0:
            return self.inner(x, sigma, **uncond)
        batch = x.shape[0]
        both = _concat(uncond, cond, batch, "")
        out = self.inner(torch.cat([x, x]), torch.cat([sigma, sigma]), **both)
        d_uncond, d_cond = out[:batch], out[batch:]
        return d_uncond + self.scale * (d_cond - d_uncond)

    def __repr__(self) -> str:
        return f"ClassifierFreeGuidance({self.inner!r}, scale={self.scale})"


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer class indices -> float one-hot rows, with a clear error for indices out of range."""
    labels = torch.as_tensor(labels).reshape(-1).long()
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"class label {int(labels[bad][0])} is out of range: the model has {num_classes} classes "
                         f"(0 .. {num_classes - 1})")
    return torch.nn.functional.one_hot(labels, num_classes).float()


def _batched(value: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if value.ndim == 0 or value.shape[0] not in (1, batch):
        raise ValueError(f"conditioning {name!r} has shape {tuple(value.shape)}: its leading dimension must be "
                         f"the batch ({batch}) or 1")
    return value.expand(batch, *value.shape[1:])


def _concat(uncond: Mapping[str, Any], cond: Mapping[str, Any], batch: int, prefix: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key in {**uncond, **cond}:
        name = prefix + key
        u, c = uncond.get(key), cond.get(key)
        if isinstance(u, torch.Tensor) and isinstance(c, torch.Tensor):
            out[key] = torch.cat([_batched(u, batch, name), _batched(c, batch, name).to(u.dtype)])
        elif isinstance(u, Mapping) and isinstance(c, Mapping):
            out[key] = _concat(u, c, batch, name + ".")
        elif u is c or (not isinstance(u, torch.Tensor) and not isinstance(c, torch.Tensor) and u == c):
            out[key] = c
        else:
            raise ValueError(f"conditioning {name!r} differs between the conditional and unconditional halves "
                             f"({type(c).__name__} vs {type(u).__name__}) and cannot be batched")
    return out
