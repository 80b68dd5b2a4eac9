"""The solver registry: ``@register("name")`` on a Solver dataclass makes it available everywhere.

The CLI choices, ``diffsampler list``, the README table and the parametrized tests all read this
registry, so adding a solver is one file plus the decorator.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple, Type

from .base import Solver

SOLVERS: Dict[str, Type[Solver]] = {}
# Names users know from k-diffusion, ComfyUI and diffusers: alias -> (solver, options it fixes, what it is).
ALIASES: Dict[str, Tuple[str, Dict[str, Any], str]] = {}


def register(name: str):
    """Class decorator registering a :class:`Solver` subclass under ``name``."""
    def decorate(cls: Type[Solver]) -> Type[Solver]:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        cls.name = name
        SOLVERS[name] = cls
        return cls
    return decorate


def register_alias(alias: str, solver: str, description: str, **options) -> None:
    """Make ``alias`` name ``solver`` with ``options`` fixed (e.g. ``dpmpp_2m``: DPM-Solver++
    second order throughout)."""
    if alias in SOLVERS or alias in ALIASES:
        raise ValueError(f"solver name {alias!r} is already taken")
    ALIASES[alias] = (solver, dict(options), description)


def list_solvers() -> List[str]:
    return list(SOLVERS)


def solver_names() -> List[str]:
    """Every name ``get_solver`` accepts: the registered solvers, then the aliases."""
    return list(SOLVERS) + list(ALIASES)


def get_solver(name, **options) -> Solver:
    """An instance of the solver registered as ``name`` with the given options (dataclass fields)."""
    if isinstance(name, Solver):
        if options:
            raise ValueError("solver options cannot be given together with a solver instance")
        return name
    if name in ALIASES:
        target, fixed, _ = ALIASES[name]
        clash = sorted(k for k in options if k in fixed and options[k] != fixed[k])
        if clash:
            raise ValueError(f"solver {name!r} is {target} with {', '.join(f'{k}={fixed[k]!r}' for k in clash)}; "
                             f"use solver {target!r} for other values")
        return get_solver(target, **{**fixed, **options})
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: valid solvers are {', '.join(solver_names())}")
    cls = SOLVERS[name]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        valid = ", ".join(cls.options()) or "none"
        raise ValueError(f"solver {name!r} has no option {', '.join(map(repr, unknown))}; its options are: {valid}")
    return cls(**options)
