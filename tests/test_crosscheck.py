"""Independent cross-checks of the solvers against other implementations and hand-written formulas.

Every check runs in float64 on the same analytic denoiser (a Gaussian mixture) and the same explicit
sigma grid, and compares at a tight tolerance (relative 1e-10 unless a test documents why not):

1. ``euler`` vs diffusers' ``EDMEulerScheduler``; ``dpmpp`` (orders 2 and 3) vs diffusers'
   ``EDMDPMSolverMultistepScheduler``, both driven by hand on our grid.
2. ``unipc`` (bh1/bh2, orders 1-3) vs diffusers' ``UniPCMultistepScheduler`` (a VP scheduler, driven
   on the VP image of our VE grid).
3. ``heun`` vs EDM's Algorithm 1 (Karras et al. 2022, no churn), written out here.
4. ``dpmpp`` order 1 == ``euler``; ``dpm2`` == the DPM-Solver-2 formulas written out here.
5. ``ipndm_v`` integrates polynomial directions exactly on non-uniform grids (and ``ipndm`` does not).
6. ``deis`` coefficients == scipy quadrature of the Lagrange basis in VP time.
7. ``DynamicThresholding`` == the Imagen formula; it is opt-in and hurts on data outside [-1, 1].

The diffusers schedulers are only *read* and *called* here; no code of theirs is copied.
"""
import math

import numpy as np
import pytest
import torch
from scipy.integrate import quad

from diffsampler import DynamicThresholding, GaussianMixture, get_solver, sample, schedules
from diffsampler.reference import solve_ode
from conftest import mixture

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
RTOL = 1e-10


# --- helpers ---------------------------------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (one scale for the whole tensor)."""
    return float((a - b).abs().max() / b.abs().max())


def assert_close(ours, theirs, what, rtol=RTOL):
    err = rel_err(ours, theirs)
    assert err <= rtol, f"{what}: relative difference {err:.3e} exceeds {rtol:.0e}"


def karras_grid(num_steps):
    return tuple(float(s) for s in schedules.polynomial(num_steps, SIGMA_MIN, SIGMA_MAX, rho=7.0))


def make_noise(batch=4, dim=12, seed=7):
    return torch.randn(batch, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def call(model, x, sigma):
    """Our denoiser at a Python-float sigma, as the sampling loop calls it."""
    return model(x, torch.full((x.shape[0],), float(sigma), dtype=torch.float64))


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """All tensors here are tiny: intra-op threads only add overhead (10x on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return mixture()


@pytest.fixture(scope="module")
def noise():
    return make_noise()


# --- 1. euler and dpmpp vs diffusers' EDM schedulers ---------------------------------------------------

def edm_network_output(sigma, x, denoised, sigma_data):
    """The raw network output F that EDM's precondition_outputs (epsilon prediction) turns into exactly
    ``denoised``: D = c_skip x + c_out F  =>  F = (D - c_skip x) / c_out."""
    c_skip = sigma_data ** 2 / (sigma ** 2 + sigma_data ** 2)
    c_out = sigma * sigma_data / math.sqrt(sigma ** 2 + sigma_data ** 2)
    return (denoised - c_skip * x) / c_out


def put_grid_on_edm_scheduler(scheduler, grid):
    """Make an EDM scheduler step over exactly our grid: its ``sigmas`` are the grid in float64 (its own
    ``set_timesteps`` builds float32 Karras sigmas and appends a final 0 or sigma_min), its
    ``timesteps`` the matching c_noise values (one per step), and it starts at index 0."""
    scheduler.set_timesteps(len(grid) - 1)   # resets the multistep history
    scheduler.sigmas = torch.tensor(grid, dtype=torch.float64)
    scheduler.timesteps = scheduler.precondition_noise(scheduler.sigmas[:-1])
    scheduler.num_inference_steps = len(grid) - 1
    scheduler.set_begin_index(0)


@pytest.fixture(scope="module")
def edm_schedulers():
    from diffusers.schedulers.scheduling_edm_dpmsolver_multistep import EDMDPMSolverMultistepScheduler
    from diffusers.schedulers.scheduling_edm_euler import EDMEulerScheduler
    return EDMEulerScheduler, EDMDPMSolverMultistepScheduler


@pytest.mark.parametrize("num_steps", [5, 8, 12])
def test_euler_matches_diffusers_edm_euler(model, noise, edm_schedulers, num_steps):
    """Our Euler step == EDMEulerScheduler.step on every step of the grid.

    EDMEulerScheduler.step casts the sample to float32 (hard-coded ``sample.to(torch.float32)``), so the
    step-by-step check feeds both sides the same float32-representable state (the cast is then lossless)
    and hands the scheduler our x0 as ``pred_original_sample`` (its precondition_outputs would multiply
    the float32 sample by c_skip in float32); everything else in its step then runs in float64 and the
    two must agree to 1e-12.  The end-to-end run through ``sample()`` and the scheduler's own
    precondition path is compared at 1e-5: that is the float32 cast, not a disagreement.
    """
    euler_cls, _ = edm_schedulers
    grid = karras_grid(num_steps)
    ours = get_solver("euler")
    sched = euler_cls(final_sigmas_type="sigma_min")
    put_grid_on_edm_scheduler(sched, grid)
    x = (noise * grid[0]).float().double()
    for i, t in enumerate(sched.timesteps):
        denoised = call(model, x, grid[i])
        scaled = sched.scale_model_input(x, t)   # the network input; must be c_in * x
        assert_close(scaled, x / math.sqrt(grid[i] ** 2 + 0.25), f"scale_model_input at step {i}", 1e-14)
        theirs = sched.step(denoised, t, x, pred_original_sample=denoised).prev_sample
        mine, _, _ = ours.step(lambda x_, s: call(model, x_, s), x, i, grid, None)
        assert theirs.dtype == torch.float64
        assert_close(mine, theirs, f"euler step {i} of {num_steps} vs EDMEulerScheduler", 1e-12)
        x = mine.float().double()

    # End to end: sample() vs the scheduler's own loop with a network output through precondition_outputs.
    sched = euler_cls(final_sigmas_type="sigma_min")
    put_grid_on_edm_scheduler(sched, grid)
    x = noise * grid[0]
    for i, t in enumerate(sched.timesteps):
        sched.scale_model_input(x, t)
        out = edm_network_output(grid[i], x, call(model, x, grid[i]), sched.config.sigma_data)
        x = sched.step(out, t, x).prev_sample
    result = sample(model, noise, solver="euler", sigmas=grid)
    assert result.nfe == num_steps
    assert_close(result.samples, x, f"sample(euler) vs EDMEulerScheduler loop ({num_steps} steps, float32 inside)", 1e-5)


def run_diffusers_dpmpp(scheduler_cls, model, noise, grid, order, lower_order_final=True):
    """Drive EDMDPMSolverMultistepScheduler (dpmsolver++, midpoint) over our grid.

    final_sigmas_type="sigma_min": with "zero" the scheduler forces a first-order last step whatever
    the number of steps (and our grid has no final 0 anyway); the sigmas are then replaced by our grid.
    precondition_inputs / scale_model_input only produce the network input (c_in x); the "network" here
    is our denoiser on x itself, whose x0 is returned through F = (D - c_skip x) / c_out.
    """
    sched = scheduler_cls(solver_order=order, algorithm_type="dpmsolver++", solver_type="midpoint",
                          lower_order_final=lower_order_final, final_sigmas_type="sigma_min",
                          prediction_type="epsilon")
    put_grid_on_edm_scheduler(sched, grid)
    x = noise * grid[0]
    for i, t in enumerate(sched.timesteps):
        denoised = call(model, x, grid[i])
        out = edm_network_output(grid[i], x, denoised, sched.config.sigma_data)
        sigma_t = torch.tensor(grid[i], dtype=torch.float64)
        assert rel_err(sched.precondition_outputs(x, out, sigma_t), denoised) < 1e-13, "F inversion is off"
        x = sched.step(out, t, x).prev_sample
        assert x.dtype == torch.float64
    return x


@pytest.mark.parametrize("num_steps", [5, 8, 12])
def test_dpmpp2_matches_diffusers_edm_dpmsolver(model, noise, edm_schedulers, num_steps):
    """dpmpp max_order=2 (midpoint) == EDMDPMSolverMultistepScheduler(solver_order=2); below 15 steps
    diffusers' lower_order_final makes the last step first order, as our min(max_order, i+1, steps-i)."""
    _, dpm_cls = edm_schedulers
    grid = karras_grid(num_steps)
    theirs = run_diffusers_dpmpp(dpm_cls, model, noise, grid, order=2)
    ours = sample(model, noise, solver="dpmpp", sigmas=grid, max_order=2, solver_type="midpoint")
    assert ours.nfe == num_steps
    assert_close(ours.samples, theirs, f"dpmpp order 2 vs diffusers, {num_steps} steps")


def test_dpmpp_lower_order_final_at_15_steps_or_more(model, noise, edm_schedulers):
    """At >= 15 steps diffusers keeps the full order to the end (its lower_order_final only acts below 15
    steps); ours drops the order at the end whenever lower_order_final=True.  So 16 steps match
    diffusers with our lower_order_final=False, and differ with True (a documented difference)."""
    _, dpm_cls = edm_schedulers
    grid = karras_grid(16)
    theirs = run_diffusers_dpmpp(dpm_cls, model, noise, grid, order=2, lower_order_final=True)
    full = sample(model, noise, solver="dpmpp", sigmas=grid, max_order=2, lower_order_final=False).samples
    lowered = sample(model, noise, solver="dpmpp", sigmas=grid, max_order=2, lower_order_final=True).samples
    assert_close(full, theirs, "dpmpp order 2, 16 steps, lower_order_final=False vs diffusers")
    diff = rel_err(lowered, theirs)
    assert diff > 1e-6, f"lower_order_final=True at 16 steps should differ from diffusers, differs by {diff:.2e}"


@pytest.mark.parametrize("num_steps", [5, 8, 12])
def test_dpmpp3_legacy_matches_diffusers_and_default_differs(model, noise, edm_schedulers, num_steps):
    """dpmpp max_order=3 with legacy_third_order=True reproduces diffusers' third-order update (its D2
    weight is (phi + h)/h^2 - 1/2); our default doubles that weight (see the dpmpp docstring), so it
    must visibly differ from diffusers whenever a third-order step is taken (>= 5 steps here)."""
    _, dpm_cls = edm_schedulers
    grid = karras_grid(num_steps)
    theirs = run_diffusers_dpmpp(dpm_cls, model, noise, grid, order=3)
    legacy = sample(model, noise, solver="dpmpp", sigmas=grid, max_order=3, legacy_third_order=True).samples
    assert_close(legacy, theirs, f"dpmpp order 3 legacy vs diffusers, {num_steps} steps")
    default = sample(model, noise, solver="dpmpp", sigmas=grid, max_order=3, legacy_third_order=False).samples
    diff = rel_err(default, theirs)
    print(f"\n{num_steps} steps: dpmpp order 3 (exact D2 weight) differs from diffusers by {diff:.3e} (relative)")
    assert diff > 1e-6, f"legacy_third_order=False should differ from diffusers, differs by only {diff:.2e}"


# --- 2. unipc vs diffusers' UniPCMultistepScheduler -----------------------------------------------------

def vp_alpha(sigma_ve):
    """VP <-> VE: x_vp = alpha x_ve with alpha = 1/sqrt(1 + sigma_ve^2), sigma_vp = alpha sigma_ve."""
    return 1.0 / math.sqrt(1.0 + sigma_ve ** 2)


def run_diffusers_unipc(model, noise, grid, order, variant):
    """Drive UniPCMultistepScheduler (predict_x0, prediction_type="sample") on the VP image of our grid.

    Its ``sigmas`` attribute already holds VE sigmas, sqrt((1 - alphabar) / alphabar), and its steps get
    (alpha_t, sigma_t) from them via 1/sqrt(1 + s^2) and s/sqrt(1 + s^2), so lambda = -log(s): setting
    ``sigmas`` to our grid puts it on exactly our lambda grid (final_sigmas_type="sigma_min" so that
    ``set_timesteps`` leaves no trailing 0 to worry about; the sigmas are replaced anyway).  It works on
    x_vp = alpha x_ve; the model output is our x0 at x_ve = x_vp / alpha.  Its corrector runs at the
    start of the next ``step`` call, so ``last_sample`` after the call for step j is the corrected state
    at grid point j.  Returns the final x_ve and the corrected VE states at grid points 1 .. N-1.
    """
    from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler
    sched = UniPCMultistepScheduler(solver_order=order, prediction_type="sample", predict_x0=True,
                                    solver_type=variant, lower_order_final=True, disable_corrector=[],
                                    final_sigmas_type="sigma_min")
    num_steps = len(grid) - 1
    sched.set_timesteps(num_steps)
    assert len(sched.timesteps) == num_steps
    sched.sigmas = torch.tensor(grid, dtype=torch.float64)
    sched.set_begin_index(0)
    alpha_t, sigma_t = sched._sigma_to_alpha_sigma_t(sched.sigmas)
    assert rel_err(sigma_t / alpha_t, sched.sigmas) < 1e-14, "scheduler's VP <-> VE map is not the expected one"

    x_vp = noise * grid[0] * vp_alpha(grid[0])
    corrected = []
    for i, t in enumerate(sched.timesteps):
        x_vp = sched.step(call(model, x_vp / vp_alpha(grid[i]), grid[i]), t, x_vp).prev_sample
        if i > 0:
            corrected.append(sched.last_sample / vp_alpha(grid[i]))
    return x_vp / vp_alpha(grid[-1]), corrected


@pytest.mark.parametrize("num_steps", [6, 10])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_diffusers(model, noise, order, variant, num_steps):
    """UniPC is an exponential integrator in lambda = log(alpha / sigma_vp) = -log(sigma_ve), so the VP
    scheduler and our VE solver must agree after rescaling x_ve = x_vp / alpha, at every grid point."""
    grid = karras_grid(num_steps)
    theirs, theirs_traj = run_diffusers_unipc(model, noise, grid, order, variant)
    ours_traj = []
    result = sample(model, noise, solver="unipc", sigmas=grid, max_order=order, variant=variant,
                    callback=lambda info: ours_traj.append(info.x_next))
    assert result.nfe == num_steps, f"unipc should cost one evaluation per step, made {result.nfe}"
    assert len(theirs_traj) == len(ours_traj) - 1 == num_steps - 1
    for j, (mine, ref) in enumerate(zip(ours_traj, theirs_traj), start=1):
        assert_close(mine, ref, f"unipc {variant} order {order}: state at grid point {j} of {num_steps}")
    assert_close(result.samples, theirs, f"unipc {variant} order {order}, {num_steps} steps: endpoint")


# --- 3. heun vs EDM Algorithm 1 -----------------------------------------------------------------------

def edm_algorithm_1(model, noise, t):
    """Karras et al. 2022, Algorithm 1 (deterministic sampler), written out; ``t`` may end at 0."""
    x = noise * t[0]
    for i in range(len(t) - 1):
        d = (x - call(model, x, t[i])) / t[i]
        x_next = x + (t[i + 1] - t[i]) * d
        if t[i + 1] != 0:
            d_prime = (x_next - call(model, x_next, t[i + 1])) / t[i + 1]
            x_next = x + (t[i + 1] - t[i]) * (0.5 * d + 0.5 * d_prime)
        x = x_next
    return x


@pytest.mark.parametrize("num_steps", [4, 9])
def test_heun_matches_edm_algorithm_1(model, noise, num_steps):
    grid = karras_grid(num_steps)
    result = sample(model, noise, solver="heun", sigmas=grid)
    assert result.nfe == 2 * num_steps
    assert_close(result.samples, edm_algorithm_1(model, noise, grid), f"heun vs EDM Alg. 1, {num_steps} steps")
    # With denoise_to_zero the last evaluation is Algorithm 1's final Euler step to t = 0 (x = D(x, t_N)).
    result = sample(model, noise, solver="heun", sigmas=grid, denoise_to_zero=True)
    assert result.nfe == 2 * num_steps + 1
    assert_close(result.samples, edm_algorithm_1(model, noise, grid + (0.0,)),
                 f"heun + denoise_to_zero vs EDM Alg. 1 ending at t=0, {num_steps} steps")


# --- 4. dpmpp order 1 == euler; dpm2 == DPM-Solver-2 ------------------------------------------------------

@pytest.mark.parametrize("num_steps", [3, 10])
def test_first_order_methods_equal_euler(model, noise, num_steps):
    """dpmpp max_order=1 ((s'/s) x - expm1(-h) D) and deis max_order=1 (integral of the constant Lagrange
    basis) are Euler written differently: equal up to rounding (1e-12, the formulas round differently)."""
    grid = karras_grid(num_steps)
    euler = sample(model, noise, solver="euler", sigmas=grid).samples
    dpmpp1 = sample(model, noise, solver="dpmpp", sigmas=grid, max_order=1).samples
    deis1 = sample(model, noise, solver="deis", sigmas=grid, max_order=1).samples
    assert_close(dpmpp1, euler, f"dpmpp max_order=1 vs euler, {num_steps} steps", 1e-12)
    assert_close(deis1, euler, f"deis max_order=1 vs euler, {num_steps} steps", 1e-12)


def dpm_solver_2(model, noise, grid, r):
    """DPM-Solver-2 (Lu et al. 2022, Algorithm 1, noise prediction) with alpha = 1, sigma = VE sigma,
    lambda = -log(sigma), eps = (x - D) / sigma, written with the exponentials of the paper:
        s = t_{i-1} + r h in lambda,  u = x - sigma_s (e^{r h} - 1) eps(x)
        x_next = x - sigma_t (e^h - 1) eps(x) - sigma_t / (2 r) (e^h - 1) (eps(u, s) - eps(x))."""
    x = noise * grid[0]
    for i in range(len(grid) - 1):
        lam_prev, lam_t = -math.log(grid[i]), -math.log(grid[i + 1])
        h = lam_t - lam_prev
        sigma_s = math.exp(-(lam_prev + r * h))
        sigma_t = grid[i + 1]
        eps = (x - call(model, x, grid[i])) / grid[i]
        u = x - sigma_s * math.expm1(r * h) * eps
        eps_u = (u - call(model, u, sigma_s)) / sigma_s
        x = x - sigma_t * math.expm1(h) * eps - sigma_t / (2 * r) * math.expm1(h) * (eps_u - eps)
    return x


def midpoint_in_log_sigma(model, noise, grid):
    """The midpoint method in log sigma: half an Euler step to sqrt(s_i s_next), then the full step with
    the direction there."""
    x = noise * grid[0]
    for i in range(len(grid) - 1):
        s, s_next = grid[i], grid[i + 1]
        s_mid = math.sqrt(s * s_next)
        x_mid = x + (s_mid - s) * (x - call(model, x, s)) / s
        x = x + (s_next - s) * (x_mid - call(model, x_mid, s_mid)) / s_mid
    return x


@pytest.mark.parametrize("num_steps", [4, 9])
def test_dpm2_matches_midpoint_and_dpm_solver_2(model, noise, num_steps):
    grid = karras_grid(num_steps)
    result = sample(model, noise, solver="dpm2", sigmas=grid, r=0.5)
    assert result.nfe == 2 * num_steps
    assert_close(result.samples, midpoint_in_log_sigma(model, noise, grid), f"dpm2 r=0.5 vs midpoint, {num_steps} steps")
    assert_close(result.samples, dpm_solver_2(model, noise, grid, 0.5), f"dpm2 r=0.5 vs DPM-Solver-2, {num_steps} steps")
    other = sample(model, noise, solver="dpm2", sigmas=grid, r=0.3).samples
    assert_close(other, dpm_solver_2(model, noise, grid, 0.3), f"dpm2 r=0.3 vs DPM-Solver-2, {num_steps} steps")


# --- 5. ipndm_v is exact on polynomials ------------------------------------------------------------------

def random_grid(num_steps, seed, hi=4.0, lo=0.5):
    """A descending non-uniform grid from hi to lo; neighbouring steps differ by up to a factor ~3."""
    steps = np.random.default_rng(seed).uniform(0.3, 1.0, num_steps)
    points = hi - (hi - lo) * np.concatenate([[0.0], np.cumsum(steps)]) / steps.sum()
    points[-1] = lo
    return tuple(float(p) for p in points)


def uniform_grid(num_steps, hi=4.0, lo=0.5):
    return tuple(float(p) for p in np.linspace(hi, lo, num_steps + 1))


def polynomial_problem(degree, dim=5, seed=0):
    """A denoiser D(x, sigma) = x - sigma p(sigma) whose ODE direction is d = p(sigma) (vector coefficients,
    independent of x), and P with P' = p, so a step from s to s' must add exactly P(s') - P(s)."""
    coeffs = torch.randn(degree + 1, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))

    def p(sigma):
        return sum(c * sigma ** j for j, c in enumerate(coeffs))

    def antiderivative(sigma):
        return sum(c * sigma ** (j + 1) / (j + 1) for j, c in enumerate(coeffs))

    def denoiser(x, sigma):
        s = sigma.to(torch.float64)[:, None]
        return x - s * p(s)

    return denoiser, antiderivative


def step_errors(solver, degree, grid, seed=0, **options):
    """Per step i: relative error of the increment x_{i+1} - x_i against the exact integral of p."""
    denoiser, antiderivative = polynomial_problem(degree, seed=seed)
    increments = []
    sample(denoiser, make_noise(3, 5, seed=seed), solver=solver, sigmas=grid,
           callback=lambda info: increments.append(info.x_next - info.x), **options)
    errors = []
    for i, inc in enumerate(increments):
        exact = antiderivative(grid[i + 1]) - antiderivative(grid[i])
        errors.append(float((inc - exact).norm() / exact.expand_as(inc).norm()))
    return errors


@pytest.mark.parametrize("max_order", [1, 2, 3, 4])
def test_ipndm_v_integrates_polynomials_exactly(max_order):
    """Step i of ipndm_v uses k = min(max_order, i + 1) directions, so it must integrate any p of degree
    < k exactly on any grid, and must not be exact for degree == k (the leading error term is
    p^(k)/k! * integral of prod_j (sigma - sigma_{i-j}), whose integrand has one sign on the step)."""
    for seed in (1, 2, 3):
        grid = random_grid(7, seed)
        for degree in range(0, max_order + 1):
            errors = step_errors("ipndm_v", degree, grid, seed=seed, max_order=max_order, legacy=False)
            for i, err in enumerate(errors):
                k = min(max_order, i + 1)
                if degree < k:
                    assert err < 1e-12, (f"ipndm_v max_order={max_order}, step {i} (order {k}) should integrate a "
                                         f"degree-{degree} polynomial exactly; relative error {err:.2e}, grid {grid}")
                elif degree == k:
                    assert err > 1e-8, (f"ipndm_v max_order={max_order}, step {i} (order {k}) integrates a degree-"
                                        f"{degree} polynomial 'exactly' ({err:.2e}): the test has no teeth")


@pytest.mark.parametrize("degree,max_order", [(2, 3), (2, 4), (3, 4)])
def test_ipndm_fixed_weights_exact_only_on_uniform_grids(degree, max_order):
    """ipndm's constant-step Adams-Bashforth weights are exact for degree < k on a uniform grid, where
    they coincide with ipndm_v's, but not on a non-uniform grid, which is why ipndm_v exists."""
    grid = uniform_grid(8)
    for i, err in enumerate(step_errors("ipndm", degree, grid, max_order=max_order)):
        if degree < min(max_order, i + 1):
            assert err < 1e-12, f"ipndm order {max_order}, uniform grid, step {i}: relative error {err:.2e} on degree {degree}"
    for i in range(max_order - 1, 8):   # the fixed and the variable weights agree on a uniform grid
        fixed = get_solver("ipndm", max_order=max_order).coefficients(grid, i, max_order)
        variable = get_solver("ipndm_v", max_order=max_order, legacy=False).coefficients(grid, i, max_order)
        np.testing.assert_allclose(fixed, variable, rtol=1e-12, err_msg=f"ipndm vs ipndm_v weights, uniform step {i}")

    worst = 0.0
    for seed in (1, 2, 3):
        grid = random_grid(8, seed)
        exact = step_errors("ipndm_v", degree, grid, seed=seed, max_order=max_order, legacy=False)
        fixed = step_errors("ipndm", degree, grid, seed=seed, max_order=max_order)
        for i in range(degree, 8):   # steps whose order exceeds the degree
            assert exact[i] < 1e-12, f"ipndm_v step {i}: relative error {exact[i]:.2e}"
            worst = max(worst, fixed[i])
    assert worst > 1e-3, (f"ipndm order {max_order} on non-uniform grids should not integrate degree {degree} "
                          f"exactly, worst relative step error only {worst:.2e}")


# --- 6. deis coefficients vs scipy quadrature --------------------------------------------------------

BETA_D, BETA_MIN = 19.9, 0.1


def vp_time(sigma):
    return (math.sqrt(BETA_MIN ** 2 + 2 * BETA_D * math.log1p(sigma * sigma)) - BETA_MIN) / BETA_D


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_deis_coefficients_match_quadrature(order):
    """c_ij = integral over [sigma_i, sigma_{i+1}] of l_j(t(sigma)) dsigma, l_j the Lagrange basis on
    t_i .. t_{i-order+1}; each coefficient to 1e-10 relative to the largest of the step's coefficients
    (one of them can be small by cancellation; quad itself is asked for 1e-13)."""
    grid = karras_grid(10)
    solver = get_solver("deis", max_order=order)
    for i in range(order - 1, 10):
        nodes = [vp_time(grid[i - j]) for j in range(order)]

        def basis(sigma, j):
            t = vp_time(sigma)
            return math.prod((t - nodes[m]) / (nodes[j] - nodes[m]) for m in range(order) if m != j)

        reference = np.array([quad(basis, grid[i], grid[i + 1], args=(j,), epsabs=0.0, epsrel=1e-13, limit=200)[0]
                              for j in range(order)])
        got = np.array(solver.coefficients(grid, i, order))
        err = np.abs(got - reference).max() / np.abs(reference).max()
        assert err < 1e-10, f"deis order {order}, step {i}: coefficients {got} vs quadrature {reference} (rel {err:.2e})"
        assert abs(reference.sum() - (grid[i + 1] - grid[i])) < 1e-10 * abs(grid[i + 1] - grid[i])


# --- 7. dynamic thresholding -------------------------------------------------------------------------

def imagen_threshold(x0, ratio):
    """Saharia et al. 2022: s = max(1, quantile(|x0|, ratio)) per sample; clamp to [-s, s], divide by s."""
    flat = x0.reshape(x0.shape[0], -1).numpy()
    s = np.maximum(1.0, np.quantile(np.abs(flat), ratio, axis=1, method="linear"))[:, None]
    return torch.from_numpy(np.clip(flat, -s, s) / s).reshape(x0.shape)


def thresholding_inputs():
    gen = torch.Generator().manual_seed(5)
    x0 = torch.randn(6, 3, 8, 8, dtype=torch.float64, generator=gen)
    x0[0] *= 0.2          # all inside [-1, 1]: s = 1, nothing changes
    x0[1] *= 4.0          # mostly outside: s >> 1
    return x0


@pytest.mark.parametrize("ratio", [0.995, 0.9, 0.5])
def test_dynamic_thresholding_is_the_imagen_formula(ratio):
    """The wrapper equals the Imagen formula written here, in float64, to rounding."""
    x0 = thresholding_inputs()
    wrapped = DynamicThresholding(lambda x, sigma: x0.clone(), ratio=ratio, max_value=1.0)
    got = wrapped(torch.zeros_like(x0), torch.ones(6, dtype=torch.float64))
    expected = imagen_threshold(x0, ratio)
    assert got.dtype == torch.float64 and got.shape == x0.shape
    assert_close(got, expected, f"DynamicThresholding(ratio={ratio}) vs Imagen formula", 1e-12)
    assert torch.equal(got[0], x0[0].clamp(-1, 1)), "a sample with quantile <= 1 must only be clamped to [-1, 1]"
    assert float(got.abs().max()) <= 1.0 + 1e-12, "thresholded values must lie in [-1, 1]"


def test_dynamic_thresholding_max_value_rescales_the_unit_range():
    """max_value = m treats [-m, m] as the data range: the result is m * (Imagen formula on x0 / m), so
    values already inside [-m, m] pass unchanged."""
    x0 = thresholding_inputs()
    m = 2.5
    wrapped = DynamicThresholding(lambda x, sigma: x0.clone(), ratio=0.9, max_value=m)
    got = wrapped(torch.zeros_like(x0), torch.ones(6, dtype=torch.float64))
    assert_close(got, m * imagen_threshold(x0 / m, 0.9), f"DynamicThresholding(max_value={m}) vs m * Imagen(x0 / m)", 1e-12)
    assert torch.equal(got[0], x0[0]), "a sample inside [-max_value, max_value] must pass unchanged"


def test_dynamic_thresholding_is_float64_exact():
    x0 = thresholding_inputs()
    wrapped = DynamicThresholding(lambda x, sigma: x0.clone(), ratio=0.995, max_value=1.0)
    got = wrapped(torch.zeros_like(x0), torch.ones(6, dtype=torch.float64))
    assert_close(got, imagen_threshold(x0, 0.995), "DynamicThresholding in float64 vs Imagen formula", 1e-12)


@pytest.fixture(scope="module")
def wide_mixture():
    """Two modes with means near +3 and -3 (data well outside [-1, 1]), noise, and the reference endpoint."""
    gen = torch.Generator().manual_seed(11)
    dim = 8
    means = torch.cat([3.0 + 0.3 * torch.randn(1, dim, generator=gen, dtype=torch.float64),
                       -3.0 + 0.3 * torch.randn(1, dim, generator=gen, dtype=torch.float64)])
    model = GaussianMixture(means, stds=0.4)
    noise = torch.randn(6, dim, dtype=torch.float64, generator=gen)
    reference = solve_ode(model, noise * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN, tol=1e-10)
    return model, noise, reference


@pytest.mark.parametrize("solver", ["dpmpp", "unipc"])
def test_dynamic_thresholding_is_opt_in_and_biases_data_outside_unit_range(wide_mixture, solver):
    """Data with means near +-3: without the wrapper the solver reaches the reference endpoint closely at
    NFE 20; with it (max_value=1) every x0 estimate is squeezed into [-1, 1] and the endpoint is far off."""
    model, noise, reference = wide_mixture
    assert float(reference.abs().mean()) > 2.0, "the data should lie outside [-1, 1]"

    def endpoint_error(result):   # worst relative L2 error over the batch
        return float(((result.samples - reference).norm(dim=1) / reference.norm(dim=1)).max())

    plain = sample(model, noise, solver=solver, nfe=20)
    thresholded = sample(DynamicThresholding(model, ratio=0.995, max_value=1.0), noise, solver=solver, nfe=20)
    assert plain.nfe == thresholded.nfe == 20
    err_plain, err_thresholded = endpoint_error(plain), endpoint_error(thresholded)
    ratio = err_thresholded / err_plain
    print(f"\n{solver} NFE 20: worst relative endpoint error without thresholding {err_plain:.2e}, "
          f"with {err_thresholded:.2e}, ratio {ratio:.1f}")
    # One of the 6 samples starts near the boundary between the two modes and is the hardest (~3% at
    # NFE 20, ~100x less on the others); 5% is "close" for NFE 20, and the error falls with NFE.
    assert err_plain < 5e-2, f"{solver} without thresholding should reach the reference, relative error {err_plain:.2e}"
    assert ratio > 2, f"thresholding should make the endpoint error several times larger; ratio only {ratio:.2f}"
