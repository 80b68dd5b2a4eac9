"""SFD / SFD-v: distil a model itself into a few-step sampler (Zhou, Chen et al., NeurIPS 2024).

    from diffsampler import distill, load_model, sample
    model = load_model("fashion-mnist")
    student = distill(model, nfe="2-5")          # SFD-v: one student for NFE 2..5 (nfe=2: SFD)
    distill.save(student, "my-student")          # config.json + model.safetensors + CARD.md
    student = distill.load("my-student")         # or load_model("my-student"), --model my-student
    sample(student, noise, nfe=2, cond=labels)   # its own grid; NFE 6 is refused with the list

``diffsampler.distill`` is this package, and the package is callable: ``distill(...)`` is
:func:`diffsampler.distill.train.distill` (also ``distill.distill``), so ``from diffsampler import
distill`` gives both the function call and ``distill.save`` / ``distill.load``.  The training
loop is :mod:`.train`, files are :mod:`.files`, the student denoiser is
:class:`diffsampler.models.student.StudentDenoiser` (in models/, so the bundled-model loader can
rebuild it).  The command line is ``diffsampler distill``.
"""
import sys
import types

from ..models.student import StudentDenoiser
from .files import load, save
from .train import distill, parse_nfes

__all__ = ["distill", "save", "load", "StudentDenoiser", "parse_nfes"]


class _CallablePackage(types.ModuleType):
    """This package: ``diffsampler.distill(denoiser, ...)`` calls :func:`.train.distill`."""

    def __call__(self, denoiser, shape=None, **kwargs) -> StudentDenoiser:
        return distill(denoiser, shape, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
