"""Solvers of the probability-flow ODE, one file per family, all registered by name.

Importing this package registers every built-in solver.  See :mod:`.base` for the step contract
and the NFE rule, and :mod:`.registry` for ``register`` / ``get_solver``.
"""
from .base import Solver
from .registry import ALIASES, SOLVERS, get_solver, list_solvers, register, register_alias, solver_names
from . import euler, heun, dpm2, ipndm, ipndm_v, deis, dpmpp, unipc, amed  # noqa: F401  (registration)

register_alias("ddim", "euler", "DDIM: Euler on the probability-flow ODE (the same update)")
register_alias("dpmpp_2m", "dpmpp", "DPM-Solver++(2M) as in k-diffusion/ComfyUI: second order throughout",
               max_order=2, lower_order_final=False)
register_alias("dpmpp_3m", "dpmpp", "DPM-Solver++(3M): third-order multistep, no lower-order final steps",
               max_order=3, lower_order_final=False)
register_alias("unipc_bh2", "unipc", "UniPC with B(h) = expm1(-h) (ComfyUI's uni_pc_bh2)", variant="bh2")
register_alias("unipc_bh1", "unipc", "UniPC with B(h) = -h (ComfyUI's uni_pc)", variant="bh1")

__all__ = ["Solver", "SOLVERS", "ALIASES", "get_solver", "list_solvers", "register", "register_alias", "solver_names"]
