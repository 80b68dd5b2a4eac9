"""Every registered solver converges with its nominal order, and all agree at high NFE.

Order: on a Gaussian mixture whose exact trajectory comes from the adaptive reference solver
(accurate to ~1e-12 here), the global error (worst over the grid points) is fitted against the
number of uniform steps; the slope must match ``solver.order``.  Multistep methods start from
exact history (their first three steps are taken on the exact trajectory), so what is measured is
the method, not its lower-order warm-up; ``lower_order_final`` (a deliberate order drop at the
end) is switched off.  New solvers are picked up from the registry automatically.
"""
import numpy as np
import pytest
import torch

from diffsampler import SOLVERS, get_solver, sample
from diffsampler.reference import solve_ode
from conftest import mixture

STEPS = (64, 128, 256, 512)
SIGMA_HI, SIGMA_LO = 2.0, 0.8
EXACT_START = 3


def variants():
    for name, cls in SOLVERS.items():
        options = {"lower_order_final": False} if "lower_order_final" in cls.options() else {}
        if "max_order" not in cls.options():
            yield name, options
            continue
        for k in (1, 2, 3, 4):
            try:
                cls(max_order=k, **options)
            except ValueError:
                continue
            yield name, {"max_order": k, **options}
    yield "dpmpp", {"max_order": 3, "legacy_third_order": True, "lower_order_final": False}
    yield "unipc", {"max_order": 2, "variant": "bh1", "lower_order_final": False}


@pytest.fixture(scope="module")
def problem():
    model = mixture()
    x_start = 3.0 * torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = {}
    for n in STEPS:
        sigmas = tuple(np.linspace(SIGMA_HI, SIGMA_LO, n + 1).tolist())
        exact[n] = (sigmas, solve_ode(model, x_start, SIGMA_HI, SIGMA_LO, tol=1e-13, sigmas_out=sigmas))
    return model, exact


def global_error(solver, model, sigmas, trajectory):
    sigma_t = lambda s: torch.full((trajectory.shape[1],), s, dtype=torch.float64)
    state, x, worst = solver.init_state(), trajectory[0], 0.0
    for i in range(len(sigmas) - 1):
        if i < EXACT_START:   # evaluate on the exact trajectory wherever it is known
            known = {sigmas[i]: trajectory[i], sigmas[i + 1]: trajectory[i + 1]}
            evaluate = lambda x_, s, known=known: model(known.get(s, x_), sigma_t(s))
        else:
            evaluate = lambda x_, s: model(x_, sigma_t(s))
        x, _, state = solver.step(evaluate, x, i, sigmas, state)
        if i < EXACT_START:
            x = trajectory[i + 1]
        worst = max(worst, float((x - trajectory[i + 1]).norm(dim=1).max()))
    return worst


@pytest.mark.parametrize("name,options", list(variants()), ids=lambda v: str(v))
def test_observed_order_matches_nominal(problem, name, options):
    model, exact = problem
    solver = get_solver(name, **options)
    errors = [global_error(solver, model, *exact[n]) for n in STEPS]
    slope = -np.polyfit(np.log(STEPS[1:]), np.log(errors[1:]), 1)[0]
    assert abs(slope - solver.order) < 0.3, \
        f"{name} {options}: observed order {slope:.2f}, nominal {solver.order}, errors {errors}"


@pytest.fixture(scope="module")
def endpoint_problem():
    model = mixture()
    noise = torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    return model, noise, solve_ode(model, noise * 80.0, 80.0, 0.002, tol=1e-11)


@pytest.mark.parametrize("name", list(SOLVERS))
def test_all_solvers_reach_reference_endpoint_at_high_nfe(endpoint_problem, name):
    model, noise, reference = endpoint_problem
    solver = SOLVERS[name]()
    nfe = 2000 if solver.order == 1 else 160 * solver.evals_per_step
    result = sample(model, noise, solver=solver, nfe=nfe)
    error = (result.samples - reference).flatten(1).norm(dim=1).max()
    scale = reference.flatten(1).norm(dim=1).max()
    assert error < 1e-3 * scale, f"{name}: relative error {error / scale:.3g} at nfe {nfe}"
