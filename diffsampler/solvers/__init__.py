"""Solvers of the probability-flow ODE, one file per family, all registered by name.

Importing this package registers every built-in solver.  See :mod:`.base` for the step contract
and the NFE rule, and :mod:`.registry` for ``register`` / ``get_solver``.
"""
from .base import Solver
from .registry import SOLVERS, get_solver, list_solvers, register
from . import euler, heun, dpm2, ipndm, ipndm_v, deis, dpmpp, unipc, amed  # noqa: F401  (registration)

__all__ = ["Solver", "SOLVERS", "get_solver", "list_solvers", "register"]
