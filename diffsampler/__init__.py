"""diffsampler: fast sampling of diffusion models through their probability-flow ODE.

    from diffsampler import sample
    result = sample(denoiser, noise, solver="ipndm", nfe=5)
"""
from . import schedules
from .models import Denoiser, DynamicThresholding, GaussianMixture
from .sampling import NonFiniteOutputError, SampleResult, StepInfo, sample
from .schedules import Schedule
from .solvers import SOLVERS, Solver, get_solver, list_solvers, register

__version__ = "0.1.0"

__all__ = [
    "sample", "SampleResult", "StepInfo", "NonFiniteOutputError", "schedules", "Schedule",
    "Solver", "SOLVERS", "get_solver", "list_solvers", "register",
    "Denoiser", "GaussianMixture", "DynamicThresholding", "__version__",
]
