"""The learned-sampler registry: ``@register_learned("ld3")`` on a LearnedSampler class makes it a
``learn()`` method, a ``diffsampler learn`` choice and a loadable file format."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Type, Union

from .base import FORMAT, LearnedSampler, read_file

LEARNED: Dict[str, Type[LearnedSampler]] = {}
# Earlier file formats: format string -> function(blob) -> LearnedSampler.
LEGACY_FORMATS: Dict[str, Callable[[dict], LearnedSampler]] = {}


def register_learned(name: str):
    def decorate(cls: Type[LearnedSampler]) -> Type[LearnedSampler]:
        if name in LEARNED:
            raise ValueError(f"learned sampler {name!r} is already registered")
        cls.method = name
        LEARNED[name] = cls
        return cls
    return decorate


def learned_class(method: str) -> Type[LearnedSampler]:
    if method not in LEARNED:
        raise ValueError(f"unknown learned sampler {method!r}: valid methods are {', '.join(LEARNED)}")
    return LEARNED[method]


def load_learned(path: Union[str, Path], device="cpu") -> LearnedSampler:
    """A learned sampler written by :meth:`LearnedSampler.save` (any method; also AMED predictor
    files of the first format), on ``device``, in eval mode."""
    blob = read_file(path)
    if blob["format"] in LEGACY_FORMATS:
        sampler = LEGACY_FORMATS[blob["format"]](blob)
    elif blob["format"] == FORMAT:
        cls = learned_class(blob.get("method"))
        sampler = cls(settings=blob["settings"], **blob["config"])
        sampler.load_state_dict(blob["state_dict"])
    else:
        raise ValueError(f"{path} is not a learned-sampler file (format {blob['format']!r}; expected {FORMAT!r})")
    return sampler.to(device).eval()
