"""Parity with the implementations users come from, each variant checked by its formula.

1. ``ipndm_v(legacy=True)``: the variable-step weights of diff-sampler's ``ipndm_v`` sampler and
   ComfyUI's ``sample_ipndm_v`` (written out here from their formula, in its original unsimplified
   form), on random non-uniform grids, to 1e-12; one step on a mixture model equals that formula
   applied to the same directions; their order-4 weights are [57, -65, 43, -11]/24 on uniform
   steps, so the measured order is 3 there and 2 on polynomial grids.
2. ``deis``: both time maps re-derived as an integral in t of l_j(t) dsigma/dt (scipy quad), the
   integral diff-sampler's ``deis_tab`` writes; ``variant="vp"`` (default) is that integral with
   beta = (19.9, 0.1), ``variant="diff-sampler"`` with beta refitted to t(0.002) = 1e-3,
   t(80) = 1.  Their 10,000-point rectangle sum (re-derived) is within 1e-4 of the step of the
   exact integral.  Our ``time_uniform`` schedule with their betas is their time-uniform grid.
3. ``dpmpp(legacy_third_order=True)`` is still there (its formula is checked in test_crosscheck).

No code of those projects is copied or run here.
"""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from diffsampler import get_solver, sample, schedules
from diffsampler.reference import solve_ode
from diffsampler.solvers.deis import DIFF_SAMPLER_BETA_D, DIFF_SAMPLER_BETA_MIN
from conftest import mixture


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def random_grid(num_steps, seed, hi=80.0, lo=0.002):
    """Descending, non-uniform: log-spaced with random jitter, so step ratios vary by ~3x."""
    rng = np.random.default_rng(seed)
    steps = rng.uniform(0.3, 1.0, num_steps)
    u = np.concatenate([[0.0], np.cumsum(steps)]) / steps.sum()
    points = np.exp(math.log(hi) + u * (math.log(lo) - math.log(hi)))
    points[0], points[-1] = hi, lo
    return tuple(float(p) for p in points)


# --- 1. ipndm_v legacy ----------------------------------------------------------------------------------

def reference_ipndm_v_weights(sigmas, i, order):
    """diff-sampler / ComfyUI iPNDM_v, written from the formula: x_next = x_i + h sum_j w_j d_{i-j} with
    h_n = sigma_{n+1} - sigma_n and
        w = e0 + (h/(2 h1)) (e0 - e1) + T1 D2 + T2 D3,
        T1 = (1 - [h / (3 (h + h1))] [h (h + h1)] / [h1 (h1 + h2)]) / 2,
        T2 = ((1 - h / (3 (h + h1))) / 2 + (1 - h / (2 (h + h1))) h / (6 (h + h1 + h2)))
             * h (h + h1)(h + h1 + h2) / (h1 (h1 + h2)(h1 + h2 + h3)),
        D2 = e0 - (1 + h1/h2) e1 + (h1/h2) e2,
        D3 = e0 - (1 + h1/h2 + q) e1 + (h1/h2 + q (1 + h2/h3)) e2 - q (h1/h2) e3,  q = h1 (h1+h2) / (h2 (h2+h3)),
    each term only from the order that uses it on (e_j: the unit vector of d_{i-j})."""
    h = sigmas[i + 1] - sigmas[i]
    h1, h2, h3 = (sigmas[i - k] - sigmas[i - k - 1] if i - k - 1 >= 0 else np.nan for k in range(3))
    e = np.eye(4)
    w = e[0].copy()
    if order >= 2:
        w += h / (2 * h1) * (e[0] - e[1])
    if order >= 3:
        t1 = (1 - (h / (3 * (h + h1))) * (h * (h + h1)) / (h1 * (h1 + h2))) / 2
        w += t1 * (e[0] - (1 + h1 / h2) * e[1] + (h1 / h2) * e[2])
    if order >= 4:
        t2 = ((1 - h / (3 * (h + h1))) / 2 + (1 - h / (2 * (h + h1))) * h / (6 * (h + h1 + h2))) \
            * (h * (h + h1) * (h + h1 + h2)) / (h1 * (h1 + h2) * (h1 + h2 + h3))
        q = h1 * (h1 + h2) / (h2 * (h2 + h3))
        w += t2 * (e[0] - (1 + h1 / h2 + q) * e[1] + (h1 / h2 + q * (1 + h2 / h3)) * e[2] - q * (h1 / h2) * e[3])
    return h * w[:order]


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ipndm_v_legacy_weights_are_the_reference_formula(order):
    """On random non-uniform grids (step ratios up to ~3x, sigma 80 -> 0.002) every step's weights
    equal the re-derived formula to 1e-12 of the step's largest weight."""
    solver = get_solver("ipndm_v", max_order=order, legacy=True)
    for seed in range(5):
        grid = random_grid(9, seed)
        for i in range(order - 1, 9):
            got = np.array(solver.coefficients(grid, i, order))
            want = reference_ipndm_v_weights(grid, i, order)
            err = np.abs(got - want).max() / np.abs(want).max()
            assert err < 1e-12, f"order {order}, seed {seed}, step {i}: {got} vs {want} (rel {err:.1e})"


def test_ipndm_v_legacy_differs_from_exact_where_the_formula_says():
    """Order 2 is the exact variable-step weight; order 3 only on uniform steps ([23, -16, 5]/12);
    order 4 is [57, -65, 43, -11]/24 even on uniform steps (AB4: [55, -59, 37, -9]/24), and on
    non-uniform steps its weights do not sum to h (they do not integrate a constant direction)."""
    uniform = tuple(np.linspace(4.0, 1.0, 9).tolist())
    h = uniform[1] - uniform[0]
    legacy = {k: get_solver("ipndm_v", max_order=k, legacy=True) for k in (2, 3, 4)}
    exact = {k: get_solver("ipndm_v", max_order=k, legacy=False) for k in (2, 3, 4)}
    np.testing.assert_allclose(np.array(legacy[3].coefficients(uniform, 5, 3)) / h, [23 / 12, -16 / 12, 5 / 12], rtol=1e-12)
    np.testing.assert_allclose(np.array(legacy[4].coefficients(uniform, 5, 4)) / h, [57 / 24, -65 / 24, 43 / 24, -11 / 24],
                               rtol=1e-12)
    inconsistency = 0.0
    for seed in range(3):
        grid = random_grid(9, seed)
        for i in range(3, 9):
            step = grid[i + 1] - grid[i]
            np.testing.assert_allclose(legacy[2].coefficients(grid, i, 2), exact[2].coefficients(grid, i, 2), rtol=1e-12)
            assert np.abs(np.subtract(legacy[3].coefficients(grid, i, 3), exact[3].coefficients(grid, i, 3))).max() > 0.1 * abs(step)
            assert abs(sum(exact[4].coefficients(grid, i, 4)) - step) < 1e-12 * abs(step)
            assert abs(sum(legacy[3].coefficients(grid, i, 3)) - step) < 1e-12 * abs(step)
            inconsistency = max(inconsistency, abs(sum(legacy[4].coefficients(grid, i, 4)) - step) / abs(step))
    assert inconsistency > 1e-2, inconsistency


def test_ipndm_v_legacy_step_on_a_model_is_the_hand_formula():
    """Driving the solver on the mixture over a non-uniform grid, each step's output equals
    x + sum_j w_j d_{i-j} with the re-derived weights and the directions d = (x - D(x, sigma)) / sigma
    recorded along the way (warm-up orders 1, 2, 3, then 4)."""
    model = mixture()
    grid = random_grid(7, 3, hi=20.0, lo=0.05)
    x = 3.0 * torch.randn(4, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    solver = get_solver("ipndm_v", legacy=True)
    state, directions = solver.init_state(), []
    for i in range(len(grid) - 1):
        seen = []

        def evaluate(x_, s, seen=seen):
            out = model(x_, torch.full((x_.shape[0],), s, dtype=torch.float64))
            seen.append((x_ - out) / s)
            return out
        x_next, _, state = solver.step(evaluate, x, i, grid, state)
        directions.insert(0, seen[0])
        order = min(4, i + 1)
        hand = x + sum(w * d for w, d in zip(reference_ipndm_v_weights(grid, i, order), directions))
        assert float((x_next - hand).abs().max()) < 1e-12 * float(hand.abs().max()), f"step {i}"
        x = x_next


def test_ipndm_v_legacy_is_an_option_that_samples():
    """legacy=True goes through sample(); the default stays the exact method."""
    model = mixture()
    noise = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    exact = sample(model, noise, solver="ipndm_v", nfe=6, legacy=False).samples
    legacy = sample(model, noise, solver="ipndm_v", nfe=6).samples
    # the default is the legacy weights: measured more accurate at NFE 3-10 (evaluation/results/defaults.md)
    assert get_solver("ipndm_v").legacy is True and "legacy" in get_solver("ipndm_v").options()
    assert float((exact - legacy).abs().max()) > 1e-6


# --- convergence orders of the new variants ----------------------------------------------------------

STEPS = (64, 128, 256, 512)


def grids(kind, n, hi=2.0, lo=0.8):
    u = np.linspace(0.0, 1.0, n + 1)
    points = hi + u * (lo - hi) if kind == "uniform" else (hi ** (1 / 7) + u * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    points[0], points[-1] = hi, lo
    return tuple(points.tolist())


@pytest.fixture(scope="module")
def trajectories():
    model = mixture()
    x0 = 3.0 * torch.randn(8, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    return model, {(kind, n): solve_ode(model, x0, 2.0, 0.8, tol=1e-13, sigmas_out=grids(kind, n))
                   for kind in ("uniform", "polynomial") for n in STEPS}


def observed_order(solver, model, trajectories, kind):
    """Global error slope, history started on the exact trajectory (as test_convergence_order does)."""
    errors = []
    for n in STEPS:
        sigmas, exact = grids(kind, n), trajectories[(kind, n)]
        state, x, worst = solver.init_state(), exact[0], 0.0
        for i in range(n):
            start = exact[i] if i < 3 else None
            evaluate = lambda x_, s, start=start: model(x_ if start is None else start,
                                                        torch.full((8,), s, dtype=torch.float64))
            x, _, state = solver.step(evaluate, x, i, sigmas, state)
            x = exact[i + 1] if i < 3 else x
            worst = max(worst, float((x - exact[i + 1]).norm(dim=1).max()))
        errors.append(worst)
    return -np.polyfit(np.log(STEPS[1:]), np.log(errors[1:]), 1)[0]


@pytest.mark.parametrize("name,options,kind,expected", [
    ("ipndm_v", {"max_order": 3, "legacy": True}, "polynomial", 3),
    ("ipndm_v", {"max_order": 4, "legacy": True}, "uniform", 3),
    ("ipndm_v", {"max_order": 4, "legacy": True}, "polynomial", 2),
    ("deis", {"max_order": 4, "variant": "diff-sampler"}, "polynomial", 4),
])
def test_variant_orders(trajectories, name, options, kind, expected):
    """legacy order 4 is third order on uniform steps (its nominal ``order``) and second order on a
    smoothly varying grid; the diff-sampler DEIS keeps order 4."""
    model, exact = trajectories
    solver = get_solver(name, **options)
    slope = observed_order(solver, model, exact, kind)
    assert abs(slope - expected) < 0.3, f"{name} {options} on {kind} steps: observed order {slope:.2f}"
    if kind == "uniform" or name == "deis":
        assert solver.order == expected


# --- 2. DEIS tAB ------------------------------------------------------------------------------------

def vp_time(sigma, beta_d, beta_min):
    return (math.sqrt(beta_min ** 2 + 2 * beta_d * math.log1p(sigma * sigma)) - beta_min) / beta_d


def dsigma_dt(t, beta_d, beta_min):
    """sigma(t) = sqrt(exp(beta_d t^2/2 + beta_min t) - 1): dsigma/dt = (beta_d t + beta_min)(1 + sigma^2) / (2 sigma)."""
    sigma = math.sqrt(math.expm1(0.5 * beta_d * t * t + beta_min * t))
    return (beta_d * t + beta_min) * (1 + sigma * sigma) / (2 * sigma)


def tab_weights(sigmas, i, order, beta_d, beta_min):
    """DEIS tAB in the form diff-sampler writes it: c_j = integral_{t_i}^{t_next} l_j(t) dsigma/dt dt,
    l_j the Lagrange basis on t_i, ..., t_{i-order+1}; adaptive quadrature in t."""
    ts = [vp_time(sigmas[i - k], beta_d, beta_min) for k in range(order)]
    lo, hi = vp_time(sigmas[i], beta_d, beta_min), vp_time(sigmas[i + 1], beta_d, beta_min)

    def integrand(t, j):
        basis = math.prod((t - ts[m]) / (ts[j] - ts[m]) for m in range(order) if m != j)
        return basis * dsigma_dt(t, beta_d, beta_min)
    return np.array([quad(integrand, lo, hi, args=(j,), epsabs=0.0, epsrel=1e-13, limit=200)[0] for j in range(order)])


def rectangle_sum_weights(sigmas, i, order, beta_d, beta_min, points=10_000):
    """The same integral as diff-sampler evaluates it: ``points`` equally spaced t from t_i to t_next
    (both included), summed and multiplied by (t_next - t_i) / points."""
    ts = np.array([vp_time(sigmas[i - k], beta_d, beta_min) for k in range(order)])
    lo, hi = vp_time(sigmas[i], beta_d, beta_min), vp_time(sigmas[i + 1], beta_d, beta_min)
    t = np.linspace(lo, hi, points)
    sigma = np.sqrt(np.expm1(0.5 * beta_d * t ** 2 + beta_min * t))
    weight = (beta_d * t + beta_min) * (1 + sigma ** 2) / (2 * sigma)
    out = []
    for j in range(order):
        basis = np.prod([(t - ts[m]) / (ts[j] - ts[m]) for m in range(order) if m != j], axis=0)
        out.append(np.sum(weight * basis) * (hi - lo) / points)
    return np.array(out)


def test_diff_sampler_time_map():
    """Their VP schedule is refitted to the EDM range: t(0.002) = 1e-3 and t(80) = 1."""
    assert abs(vp_time(0.002, DIFF_SAMPLER_BETA_D, DIFF_SAMPLER_BETA_MIN) - 1e-3) < 1e-12
    assert abs(vp_time(80.0, DIFF_SAMPLER_BETA_D, DIFF_SAMPLER_BETA_MIN) - 1.0) < 1e-12
    assert abs(DIFF_SAMPLER_BETA_D - 17.538) < 1e-3 and abs(DIFF_SAMPLER_BETA_MIN + 0.00477) < 1e-5


def same_grids():
    for num_steps in (5, 10):
        for name, options in (("time_uniform", {"rho": 1.0}), ("time_uniform", {"rho": 2.0}), ("polynomial", {})):
            yield f"{name}{options.get('rho', '')}-{num_steps}", tuple(
                float(s) for s in getattr(schedules, name)(num_steps, 0.002, 80.0, **options))


@pytest.mark.parametrize("variant,betas", [("vp", (19.9, 0.1)), ("diff-sampler", (DIFF_SAMPLER_BETA_D, DIFF_SAMPLER_BETA_MIN))])
def test_deis_variants_are_the_tab_integral_with_their_time_map(variant, betas):
    """Both variants are the same integral; they differ only in (beta_d, beta_min) of t(sigma).
    Each weight to 1e-10 of the step."""
    for label, grid in same_grids():
        for order in (2, 3, 4):
            solver = get_solver("deis", max_order=order, variant=variant)
            for i in range(order - 1, len(grid) - 1):
                got = np.array(solver.coefficients(grid, i, order))
                want = tab_weights(grid, i, order, *betas)
                err = np.abs(got - want).max() / abs(grid[i + 1] - grid[i])
                assert err < 1e-10, f"{variant} order {order}, {label}, step {i}: {got} vs {want} ({err:.1e} of the step)"


def test_deis_variants_differ_and_their_quadrature_error_is_small():
    """The documented numbers: on the same grids the two time maps give weights up to ~3% (rho=1)
    and ~9% (rho=2) of the step apart at 10 steps; diff-sampler's rectangle sum is within 1e-4 of
    the step of the exact integral of its formula."""
    apart, quadrature = {}, 0.0
    for label, grid in same_grids():
        vp, ds = get_solver("deis", variant="vp"), get_solver("deis", variant="diff-sampler")
        worst = 0.0
        for i in range(1, len(grid) - 1):
            order, step = min(4, i + 1), abs(grid[i + 1] - grid[i])
            ours = np.array(ds.coefficients(grid, i, order))
            worst = max(worst, np.abs(ours - np.array(vp.coefficients(grid, i, order))).max() / step)
            theirs = rectangle_sum_weights(grid, i, order, DIFF_SAMPLER_BETA_D, DIFF_SAMPLER_BETA_MIN)
            quadrature = max(quadrature, np.abs(ours - theirs).max() / step)
        apart[label] = worst
    assert 0.02 < apart["time_uniform1.0-10"] < 0.05 and 0.07 < apart["time_uniform2.0-10"] < 0.12, apart
    assert quadrature < 1e-4, quadrature


def test_time_uniform_with_their_betas_is_their_grid():
    """diff-sampler's time_uniform grid: t_k = (1 + k/N (1e-3^(1/rho) - 1))^rho, sigma = sigma(t_k) in their
    VP schedule; ours with their betas and the range 0.002..80 is the same grid."""
    for rho in (1.0, 2.0):
        ours = schedules.time_uniform(8, 0.002, 80.0, rho=rho, beta_d=DIFF_SAMPLER_BETA_D,
                                      beta_min=DIFF_SAMPLER_BETA_MIN).numpy()
        t = (1 + np.arange(9) / 8 * (1e-3 ** (1 / rho) - 1)) ** rho
        theirs = np.sqrt(np.expm1(0.5 * DIFF_SAMPLER_BETA_D * t ** 2 + DIFF_SAMPLER_BETA_MIN * t))
        np.testing.assert_allclose(ours, theirs, rtol=1e-10)


def test_deis_variant_is_validated_and_samples():
    with pytest.raises(ValueError, match="variant"):
        get_solver("deis", variant="comfy")
    model = mixture()
    noise = torch.randn(3, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    a = sample(model, noise, solver="deis", nfe=8).samples
    b = sample(model, noise, solver="deis", nfe=8, variant="diff-sampler").samples
    assert 1e-6 < float((a - b).abs().max()) < 0.1 * float(a.abs().max())


# --- 3. DPM-Solver++ legacy third order --------------------------------------------------------------

def test_dpmpp_legacy_third_order_stays():
    assert get_solver("dpmpp").legacy_third_order is True      # the default, by measurement
    assert get_solver("dpmpp", legacy_third_order=True).order == 2
