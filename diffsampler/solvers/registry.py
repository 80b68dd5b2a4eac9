"""The solver registry: ``@register("name")`` on a Solver dataclass makes it available everywhere.

The CLI choices, ``diffsampler list``, the README table and the parametrized tests all read this
registry, so adding a solver is one file plus the decorator.
"""
from __future__ import annotations

from typing import Dict, List, Type

from .base import Solver

SOLVERS: Dict[str, Type[Solver]] = {}


def register(name: str):
    """Class decorator registering a :class:`Solver` subclass under ``name``."""
    def decorate(cls: Type[Solver]) -> Type[Solver]:
        if name in SOLVERS:
            raise ValueError(f"solver {name!r} is already registered")
        cls.name = name
        SOLVERS[name] = cls
        return cls
    return decorate


def list_solvers() -> List[str]:
    return list(SOLVERS)


def get_solver(name, **options) -> Solver:
    """An instance of the solver registered as ``name`` with the given options (dataclass fields)."""
    if isinstance(name, Solver):
        if options:
            raise ValueError("solver options cannot be given together with a solver instance")
        return name
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}: valid solvers are {', '.join(SOLVERS)}")
    cls = SOLVERS[name]
    unknown = sorted(set(options) - set(cls.options()))
    if unknown:
        valid = ", ".join(cls.options()) or "none"
        raise ValueError(f"solver {name!r} has no option {', '.join(map(repr, unknown))}; its options are: {valid}")
    return cls(**options)
