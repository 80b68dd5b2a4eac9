"""diffsampler: fast sampling of diffusion models through their probability-flow ODE.

    from diffsampler import load_model, sample
    model = load_model("fashion-mnist")
    result = sample(model, noise, solver="ipndm", nfe=5)

The public names are loaded on first use, so that ``import diffsampler`` (and the command line's
``--help``) does not import torch.  ``diffsampler.distill`` is a callable package:
``distill(model, nfe=2)`` distils a student (SFD), ``distill.save`` / ``distill.load`` store it.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "sample": "sampling", "SampleResult": "sampling", "StepInfo": "sampling", "NonFiniteOutputError": "sampling",
    "Plan": "plan", "make_plan": "plan",
    "learn": "learned", "load_learned": "learned", "LearnedSampler": "learned",
    "Schedule": "schedules",
    "Solver": "solvers", "SOLVERS": "solvers", "get_solver": "solvers", "list_solvers": "solvers", "register": "solvers",
    "Denoiser": "models", "GaussianMixture": "models", "DynamicThresholding": "models",
    "load_model": "models.specs",
}
_MODULES = ("schedules", "gits", "amed", "learned", "distill", "analysis", "pipelines", "models", "solvers", "plan",
            "sampling")

__all__ = sorted(_PUBLIC) + ["schedules", "__version__"]


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'diffsampler' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC) | set(_MODULES))
