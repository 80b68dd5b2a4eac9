"""The sample() contract: measured NFE, conditioning, AFS, callbacks, dtypes and clear errors."""
import math

import pytest
import torch

from diffsampler.defaults import DEFAULT_SOLVER

from diffsampler import SOLVERS, Denoiser, DynamicThresholding, NonFiniteOutputError, Schedule, sample, schedules
from conftest import mixture


class Recording:
    """A denoiser that records every call (sigma and the conditioning it received)."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, x, sigma, **cond):
        self.calls.append((sigma.clone(), dict(cond)))
        return self.inner(x, sigma)


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("afs", [False, True])
@pytest.mark.parametrize("denoise_to_zero", [False, True])
def test_measured_nfe_equals_documented_rule(name, afs, denoise_to_zero):
    solver = SOLVERS[name]()
    for nfe in solver.valid_nfes(afs, denoise_to_zero)[:5]:
        model = Recording(mixture())
        result = sample(model, torch.randn(2, 12, dtype=torch.float64), solver=name, nfe=nfe, afs=afs,
                        denoise_to_zero=denoise_to_zero)
        steps = len(result.sigmas) - 1
        documented = solver.evals_per_step * steps - int(afs) + int(denoise_to_zero)
        assert result.nfe == len(model.calls) == nfe == documented


@pytest.mark.parametrize("name", list(SOLVERS))
def test_invalid_nfe_says_which_values_work(name):
    solver = SOLVERS[name]()
    invalid = [n for n in range(-1, 8) if n not in solver.valid_nfes()]
    for nfe in invalid:
        with pytest.raises(ValueError, match="nfe must be one of"):
            sample(mixture(), torch.randn(2, 12), solver=name, nfe=nfe)


def test_two_evaluation_solvers_reject_odd_nfe_and_accept_it_with_afs():
    with pytest.raises(ValueError, match=r"nfe must be one of 2, 4, 6"):
        sample(mixture(), torch.randn(2, 12), solver="heun", nfe=5)
    assert sample(mixture(), torch.randn(2, 12), solver="heun", nfe=5, afs=True).nfe == 5


@pytest.mark.parametrize("name", list(SOLVERS))
def test_conditioning_reaches_every_model_call(name):
    label = torch.tensor([3, 7])
    model = Recording(mixture())
    sample(model, torch.randn(2, 12), solver=name, nfe=SOLVERS[name]().valid_nfes()[3],
           cond={"class_labels": label, "prompt": "a cat"})
    assert model.calls
    for _, cond in model.calls:
        assert cond["prompt"] == "a cat" and torch.equal(cond["class_labels"], label)


def test_model_sees_noise_dtype_and_one_sigma_per_sample():
    seen = []

    def model(x, sigma):
        seen.append((x.dtype, sigma.dtype, sigma.shape))
        return torch.zeros_like(x)

    result = sample(model, torch.randn(3, 4, dtype=torch.float32), solver="dpmpp", nfe=4)
    assert result.samples.dtype == torch.float32
    assert set(seen) == {(torch.float32, torch.float32, torch.Size([3]))}


def test_afs_replaces_the_first_evaluation_only():
    model = Recording(mixture())
    result = sample(model, torch.randn(2, 12, dtype=torch.float64), solver="ipndm", nfe=5, afs=True)
    assert len(result.sigmas) == 7                        # 6 steps for 5 evaluations
    called = [float(s[0]) for s, _ in model.calls]
    assert called == pytest.approx([float(s) for s in result.sigmas[1:-1]])   # never at sigma_max


def test_afs_first_step_is_the_closed_form_direction():
    model = Recording(mixture())
    noise = torch.randn(2, 12, dtype=torch.float64)
    steps = []
    sample(model, noise, solver="euler", sigmas=[80.0, 20.0, 1.0], afs=True, callback=steps.append)
    sigma, sigma_next = 80.0, 20.0
    x = noise * sigma
    expected = x + (sigma_next - sigma) * x / math.sqrt(1 + sigma ** 2)
    torch.testing.assert_close(steps[0].x_next, expected, rtol=1e-14, atol=0)


def test_denoise_to_zero_returns_the_model_estimate_at_the_last_sigma():
    model = mixture()
    noise = torch.randn(2, 12, dtype=torch.float64)
    plain = sample(model, noise, solver="euler", nfe=6)
    final = sample(model, noise, solver="euler", nfe=7, denoise_to_zero=True)
    torch.testing.assert_close(final.sigmas, plain.sigmas)
    torch.testing.assert_close(final.samples, model(plain.samples, torch.full((2,), 0.002, dtype=torch.float64)))


def test_callback_sees_every_step_in_order():
    steps = []
    result = sample(mixture(), torch.randn(2, 12, dtype=torch.float64), solver="dpmpp", nfe=6, callback=steps.append)
    assert [s.index for s in steps] == list(range(6))
    assert [s.sigma for s in steps] == [float(v) for v in result.sigmas[:-1]]
    assert all(torch.equal(a.x_next, b.x) for a, b in zip(steps, steps[1:]))
    torch.testing.assert_close(steps[-1].x_next, result.samples)


def test_default_schedules_and_grids():
    noise = torch.randn(2, 12, dtype=torch.float64)
    quadratic = schedules.time_uniform(5, 0.002, 80.0, rho=2.0)       # every solver's default, by measurement
    for name in ("ipndm", "ipndm_v", "dpmpp", "unipc", "deis", "euler"):
        torch.testing.assert_close(sample(mixture(), noise, solver=name, nfe=5).sigmas, quadratic)
    amed = sample(mixture(), noise, solver="amed", nfe=6).sigmas              # AMED keeps the grid it was measured on
    torch.testing.assert_close(amed, schedules.polynomial(3, 0.002, 80.0, rho=7.0))
    rho5 = sample(mixture(), noise, solver="euler", nfe=5, schedule="polynomial", schedule_options=dict(rho=5))
    torch.testing.assert_close(rho5.sigmas, schedules.polynomial(5, 0.002, 80.0, rho=5))


def test_schedule_object_and_file_are_accepted(tmp_path):
    grid = Schedule(torch.tensor([80.0, 5.0, 0.5, 0.002]), {"made_by": "test"})
    path = grid.save(tmp_path / "grid.json")
    noise = torch.randn(2, 12, dtype=torch.float64)
    a = sample(mixture(), noise, solver="ipndm", schedule=grid)
    b = sample(mixture(), noise, solver="ipndm", schedule=str(path), nfe=3)
    c = sample(mixture(), noise, solver="ipndm", sigmas=[80.0, 5.0, 0.5, 0.002])
    assert a.nfe == b.nfe == c.nfe == 3
    torch.testing.assert_close(a.samples, b.samples)
    torch.testing.assert_close(a.samples, c.samples)
    with pytest.raises(ValueError, match="does not match the given grid"):
        sample(mixture(), noise, solver="ipndm", schedule=grid, nfe=5)


def test_a_schedule_file_without_a_named_solver_samples_with_its_own_solver(tmp_path):
    sigmas = [80.0, 5.0, 0.5, 0.002]
    fitted = Schedule(torch.tensor(sigmas), {"solver": "ipndm", "solver_options": {"max_order": 2}}).save(tmp_path / "f.json")
    noise = torch.randn(2, 12, dtype=torch.float64)
    own = sample(mixture(), noise, schedule=str(fitted))
    assert own.plan.record["solver"]["name"] == "ipndm" and own.plan.record["solver"]["max_order"] == 2
    torch.testing.assert_close(own.samples, sample(mixture(), noise, solver="ipndm", max_order=2, sigmas=sigmas).samples)
    named = sample(mixture(), noise, schedule=str(fitted), solver="euler")          # a named solver wins
    torch.testing.assert_close(named.samples, sample(mixture(), noise, solver="euler", sigmas=sigmas).samples)
    plain = Schedule(torch.tensor(sigmas), {"made_by": "test"}).save(tmp_path / "p.json")   # no solver recorded
    assert sample(mixture(), noise, schedule=str(plain)).plan.record["solver"]["name"] == DEFAULT_SOLVER


def test_same_seed_same_sample_whatever_the_batch():
    noise = torch.randn(6, 12, dtype=torch.float64)
    together = sample(mixture(), noise, solver="unipc", nfe=6).samples
    alone = torch.cat([sample(mixture(), noise[i:i + 1], solver="unipc", nfe=6).samples for i in range(6)])
    torch.testing.assert_close(together, alone, rtol=1e-12, atol=1e-12)


def test_thresholding_is_never_applied_unless_asked():
    far = mixture()
    far.means = far.means * 0 + 3.0          # data far outside [-1, 1]
    noise = torch.randn(2, 12, dtype=torch.float64)
    for name in ("dpmpp", "unipc"):
        plain = sample(far, noise, solver=name, nfe=10).samples
        assert plain.abs().max() > 2.0
        clipped = sample(DynamicThresholding(far), noise, solver=name, nfe=10).samples
        assert not torch.allclose(plain, clipped)


@pytest.mark.parametrize("kwargs,match", [
    (dict(solver="nope", nfe=5), "unknown solver 'nope': valid solvers are euler, heun"),
    (dict(solver="ipndm", nfe=5, schedule="nope"), "unknown schedule 'nope': use one of polynomial, logsnr"),
    (dict(solver="ipndm", nfe=5, max_order=7), r"max_order must be one of \[1, 2, 3, 4\]"),
    (dict(solver="ipndm", nfe=5, bogus=1), "has no option 'bogus'; its options are: max_order"),
    (dict(solver="ipndm", nfe=0), "nfe must be one of"),
    (dict(solver="ipndm", nfe=2.5), "nfe must be an integer"),
    (dict(solver="ipndm", sigmas=[1.0, 2.0, 0.5]), "strictly descending"),
    (dict(solver="ipndm", sigmas=[2.0, 1.0, 0.0]), "must be positive"),
    (dict(solver="ipndm", sigmas=[2.0]), "at least 2 points"),
    (dict(solver="ipndm", sigmas=[2.0, float("nan")]), "finite"),
    (dict(solver="ipndm"), "give nfe="),
    (dict(solver="ipndm", nfe=5, schedule="polynomial", schedule_options=dict(rho=-1)), "rho must be positive"),
    (dict(solver="ipndm", nfe=5, schedule_options=dict(bogus=1)), "schedule option not accepted"),
])
def test_bad_requests_raise_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        sample(mixture(), torch.randn(2, 12), **kwargs)


def test_noise_with_wrong_dims_is_refused():
    with pytest.raises(ValueError, match="shape \\(batch, \\*sample_shape\\)"):
        sample(mixture(), torch.randn(12), solver="euler", nfe=3)
    with pytest.raises(ValueError, match=r"sample shape \(3, 4\) but the model expects \(12,\)"):
        sample(mixture(), torch.randn(2, 3, 4), solver="euler", nfe=3)
    with pytest.raises(ValueError, match="must return an x0 estimate of the same shape"):
        sample(lambda x, sigma: x[:, :3], torch.randn(2, 12), solver="euler", nfe=3)


def test_non_finite_model_output_names_the_step_and_sigma():
    inner = mixture()

    def broken(x, sigma):
        out = inner(x, sigma)
        return out * float("nan") if float(sigma[0]) < 1.0 else out

    result_sigmas = schedules.polynomial(8, 0.002, 80.0)
    first_bad = next(i for i, s in enumerate(result_sigmas) if s < 1.0)
    with pytest.raises(NonFiniteOutputError, match=f"at step {first_bad} \\(sigma={float(result_sigmas[first_bad]):.6g}"):
        sample(broken, torch.randn(2, 12), solver="euler", nfe=8, schedule="polynomial")


class Distilled(Denoiser):
    """A model that declares the sampler it was distilled for (as SFD students do)."""

    shape = (12,)

    def __init__(self):
        self.inner, self.seen = mixture(), []

    def native_plans(self):
        return {2: dict(solver="euler", sigmas=[80.0, 10.0, 1.0, 0.002], afs=True, model_inputs={"steps": 2}),
                3: dict(solver="euler", sigmas=[80.0, 20.0, 5.0, 0.5, 0.002], afs=True, model_inputs={"steps": 3})}

    def denoise(self, x, sigma, steps=None):
        self.seen.append(steps)
        return self.inner(x, sigma)


def test_a_distilled_model_samples_with_its_own_plan_and_refuses_other_nfes():
    model = Distilled()
    noise = torch.randn(3, 12, dtype=torch.float64)
    out = sample(model, noise, nfe=2)
    assert out.nfe == 2 and out.sigmas.tolist() == [80.0, 10.0, 1.0, 0.002] and model.seen == [2, 2]
    direct = sample(model.inner, noise, solver="euler", sigmas=[80.0, 10.0, 1.0, 0.002], afs=True)
    assert torch.equal(out.samples, direct.samples)
    with pytest.raises(ValueError, match="distilled for NFE 2, 3, not 4"):
        sample(model, noise, nfe=4)
    assert sample(model, noise, solver="heun", nfe=4).nfe == 4        # named explicitly: an ordinary model
