"""Schedules are pure functions: descending float64 grids of the right length, endpoints and shape."""
import math

import numpy as np
import pytest
import torch

from diffsampler import Schedule, schedules

RANGE = (0.002, 80.0)


@pytest.mark.parametrize("name", ["polynomial", "logsnr", "time_uniform", "time_quadratic"])
@pytest.mark.parametrize("steps", [1, 3, 10, 60])
def test_grids_descend_with_exact_endpoints(name, steps):
    sigmas = schedules.SCHEDULES[name](steps, *RANGE)
    assert sigmas.dtype == torch.float64 and sigmas.shape == (steps + 1,)
    assert float(sigmas[0]) == RANGE[1] and float(sigmas[-1]) == RANGE[0]
    assert bool((sigmas[1:] < sigmas[:-1]).all())


def test_polynomial_is_uniform_in_sigma_to_the_one_over_rho():
    for rho in (1.0, 3.0, 7.0):
        sigmas = schedules.polynomial(12, *RANGE, rho=rho)
        np.testing.assert_allclose(np.diff(sigmas.numpy() ** (1 / rho)),
                                   (RANGE[0] ** (1 / rho) - RANGE[1] ** (1 / rho)) / 12, rtol=1e-10)


def test_logsnr_is_uniform_in_log_sigma():
    np.testing.assert_allclose(np.diff(np.log(schedules.logsnr(9, *RANGE).numpy())),
                               math.log(RANGE[0] / RANGE[1]) / 9, rtol=1e-12)


def test_time_schedules_are_uniform_in_vp_time():
    beta_d, beta_min = 19.9, 0.1
    t_of = lambda s: (np.sqrt(beta_min ** 2 + 2 * beta_d * np.log1p(s ** 2)) - beta_min) / beta_d
    uniform = t_of(schedules.time_uniform(10, *RANGE).numpy())
    np.testing.assert_allclose(np.diff(uniform), (t_of(RANGE[0]) - t_of(RANGE[1])) / 10, rtol=1e-8)
    quadratic = np.sqrt(t_of(schedules.time_quadratic(10, *RANGE).numpy()))
    np.testing.assert_allclose(np.diff(quadratic), (math.sqrt(t_of(RANGE[0])) - math.sqrt(t_of(RANGE[1]))) / 10, rtol=1e-8)
    torch.testing.assert_close(schedules.time_quadratic(7, *RANGE), schedules.time_uniform(7, *RANGE, rho=2.0))
    s = torch.tensor([0.01, 1.0, 80.0], dtype=torch.float64)
    torch.testing.assert_close(schedules.vp_sigma(schedules.vp_time(s)), s, rtol=1e-12, atol=0)


def test_discrete_uses_the_models_integer_timesteps():
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    table = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    sigma_fn = lambda t: table[t.long()]
    sigma_inv = lambda s: torch.tensor(np.interp(np.log(s.numpy()), np.log(table.numpy()), np.arange(1000.0)))
    sigmas = schedules.discrete(10, float(table[0]), float(table[-1]), sigma_fn=sigma_fn, sigma_inv=sigma_inv)
    assert len(sigmas) == 11 and float(sigmas[0]) == float(table[-1]) and float(sigmas[-1]) == float(table[0])
    assert all(bool((table == s).any()) for s in sigmas)          # every point is a training timestep
    with pytest.raises(ValueError, match="without repeating one"):
        schedules.discrete(2000, float(table[0]), float(table[-1]), sigma_fn=sigma_fn, sigma_inv=sigma_inv)


def test_subsample_and_its_errors():
    sigmas = schedules.polynomial(10, *RANGE)
    torch.testing.assert_close(schedules.subsample(sigmas, [0, 3, 10]), sigmas[[0, 3, 10]])
    with pytest.raises(ValueError, match="strictly increasing"):
        schedules.subsample(sigmas, [0, 5, 5])
    with pytest.raises(ValueError, match=r"lie in \[0, 10\]"):
        schedules.subsample(sigmas, [0, 11])


@pytest.mark.parametrize("bad,match", [(dict(num_steps=0), "positive integer"),
                                       (dict(sigma_min=5.0, sigma_max=1.0), "0 < sigma_min < sigma_max"),
                                       (dict(sigma_min=0.0), "0 < sigma_min < sigma_max")])
def test_schedule_arguments_are_checked(bad, match):
    args = {**dict(num_steps=5, sigma_min=0.002, sigma_max=80.0), **bad}
    with pytest.raises(ValueError, match=match):
        schedules.polynomial(**args)


def test_schedule_file_round_trips_and_prints_as_a_plain_list(tmp_path):
    grid = Schedule(schedules.polynomial(5, *RANGE), {"solver": "ipndm", "nfe": 5, "made_by": "test"})
    path = grid.save(tmp_path / "s.json")
    loaded = Schedule.load(path)
    assert torch.equal(loaded.sigmas, grid.sigmas) and loaded.info == grid.info
    assert [float(v) for v in str(loaded).split(",")] == grid.sigmas.tolist()
    assert not list(tmp_path.glob(".*tmp"))            # atomic write leaves no temporary file


def test_schedule_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="schedule file not found"):
        Schedule.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("not json")
    with pytest.raises(ValueError, match="not a schedule file"):
        Schedule.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text('{"a": 1}')
    with pytest.raises(ValueError, match="format='diffsampler-schedule/1'"):
        Schedule.load(tmp_path / "other.json")
