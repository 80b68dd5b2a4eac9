"""AMED-Solver and AMED-Plugin (Zhou et al., CVPR 2024): learned intermediate times.

    predictor = diffsampler.amed.train(denoiser, shape, solver="amed", nfe=5)
    predictor.save("amed.pt")
    sample(denoiser, noise, amed=diffsampler.amed.load("amed.pt"))

The solver itself is ``diffsampler.solvers.amed`` (registered as ``amed``); this package holds
the predictor network and file format (:mod:`.predictor`) and the distillation (:mod:`.train`).
"""
from .predictor import Predictor, load, model_fingerprint
from .train import refine, train

__all__ = ["Predictor", "load", "train", "refine", "model_fingerprint"]
