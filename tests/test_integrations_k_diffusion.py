"""diffsampler.integrations.k_diffusion against the real k-diffusion.

k-diffusion's own sampler functions (``k_diffusion.sampling`` from the installed wheel) and ours run
on the same model, the same x and the same sigmas, with and without the trailing 0:

* ``sampler("euler")`` == ``sample_euler``, ``sampler("dpmpp_2m")`` == ``sample_dpmpp_2m`` (second
  order throughout, as k-diffusion's 2M is), ``sampler("heun")`` == ``sample_heun``,
  ``sampler("dpm2")`` == ``sample_dpm_2``: relative 1e-6 in float32 (k-diffusion's arithmetic is
  float32, ours float64), 1e-12 in float64;
* the model is called the same number of times, at the same sigmas, with ``extra_args`` every time;
* the callbacks get the same dicts (``x``, ``i``, ``sigma``, ``sigma_hat``, ``denoised``).

k-diffusion's package ``__init__`` imports its training stack (accelerate, clean-fid, wandb, ...),
so ``k_diffusion/sampling.py`` and ``utils.py`` are loaded from the installed wheel by file path
(``pip install --no-deps k-diffusion``).  Its SDE and adaptive samplers need torchsde and
torchdiffeq; where those are missing, empty placeholders stand in (the ODE samplers compared here
never touch them).  The test skips only when k-diffusion is not installed.
"""
import importlib.util
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

from diffsampler import GaussianMixture, Schedule, sample
from diffsampler.integrations.k_diffusion import sampler
from diffsampler.solvers import solver_names


def load_k_diffusion_sampling():
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed: pip install --no-deps k-diffusion")
    folder = Path(list(spec.submodule_search_locations)[0])
    names = ["k_diffusion", "k_diffusion.utils", "k_diffusion.sampling", "torchsde", "torchdiffeq"]
    saved = {name: sys.modules.get(name) for name in names}
    try:
        package = types.ModuleType("k_diffusion")
        package.__path__ = [str(folder)]
        sys.modules["k_diffusion"] = package
        for optional in ("torchsde", "torchdiffeq"):
            if importlib.util.find_spec(optional) is None:
                placeholder = types.ModuleType(optional)
                placeholder.odeint = None      # torchdiffeq.odeint: only sample_dpm_adaptive uses it
                sys.modules[optional] = placeholder
        modules = {}
        for name in ("utils", "sampling"):
            file_spec = importlib.util.spec_from_file_location(f"k_diffusion.{name}", folder / f"{name}.py")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[f"k_diffusion.{name}"] = module
            setattr(package, name, module)
            file_spec.loader.exec_module(module)
            modules[name] = module
        return modules["sampling"]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


@pytest.fixture(scope="module")
def kd():
    return load_k_diffusion_sampling()


class Model:
    """A k-diffusion model: the exact denoiser of a Gaussian mixture in 16 dims plus ``shift`` from
    extra_args (a conditioning input); records the sigma and the extra_args of every call."""

    def __init__(self):
        gen = torch.Generator().manual_seed(3)
        self.gmm = GaussianMixture(0.8 * torch.randn(4, 16, dtype=torch.float64, generator=gen), stds=0.3)
        self.calls = []

    def __call__(self, x, sigma, shift=None):
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype and sigma.device == x.device
        self.calls.append((float(sigma[0]), shift))
        out = self.gmm(x, sigma)
        return out if shift is None else out + shift


def karras(n, sigma_min=0.02, sigma_max=40.0, rho=7.0, zero=True, dtype=torch.float32):
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if zero:
        sigmas = torch.cat([sigmas, sigmas.new_zeros(1)])
    return sigmas.to(dtype)


def rel_err(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def run_both(kd_fn, ours, sigmas, dtype, extra=True):
    """Both samplers from the same x on fresh models; returns (ours, theirs, our calls, their calls,
    our callback dicts, their callback dicts)."""
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype) * sigmas[0]
    shift = torch.full((3, 16), 0.05, dtype=dtype)
    results = []
    for fn in (ours, kd_fn):
        model, seen = Model(), []
        out = fn(model, x.clone(), sigmas, extra_args={"shift": shift} if extra else None,
                 callback=seen.append, disable=True)
        results.append((out, model.calls, seen))
    (a, calls_a, seen_a), (b, calls_b, seen_b) = results
    return a, b, calls_a, calls_b, seen_a, seen_b


PAIRS = [("euler", "sample_euler"), ("dpmpp_2m", "sample_dpmpp_2m"), ("heun", "sample_heun"), ("dpm2", "sample_dpm_2")]


@pytest.mark.parametrize("zero", [True, False], ids=["trailing-zero", "no-zero"])
@pytest.mark.parametrize("ours,theirs", PAIRS)
def test_samplers_equal_k_diffusion(kd, ours, theirs, zero):
    for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
        sigmas = karras(8, zero=zero, dtype=dtype)
        a, b, calls_a, calls_b, seen_a, seen_b = run_both(getattr(kd, theirs), sampler(ours), sigmas, dtype)
        err = rel_err(a, b)
        print(f"\n{ours} vs k-diffusion {theirs} ({dtype}, {'with' if zero else 'without'} trailing 0): "
              f"relative difference {err:.2e}, {len(calls_a)} model calls")
        assert a.dtype == dtype and a.shape == b.shape
        assert err <= tol, f"{ours} vs {theirs} ({dtype}): {err:.3e}"
        assert len(calls_a) == len(calls_b), "the same number of model evaluations"
        sig_a, sig_b = [c[0] for c in calls_a], [c[0] for c in calls_b]
        assert max(abs(p - q) / q for p, q in zip(sig_a, sig_b)) < 1e-6, "the model is called at the same sigmas"
        assert all(c[1] is not None for c in calls_a), "extra_args reach every model call"
        assert [d["i"] for d in seen_a] == [d["i"] for d in seen_b] == list(range(len(sigmas) - 1))
        for da, db in zip(seen_a, seen_b):
            assert set(da) == set(db) == {"x", "i", "sigma", "sigma_hat", "denoised"}
            assert float(da["sigma"]) == float(db["sigma"]) and float(da["sigma_hat"]) == float(db["sigma_hat"])
            assert da["x"].dtype == dtype and da["denoised"].dtype == dtype
            assert rel_err(da["x"], db["x"]) <= 10 * tol and rel_err(da["denoised"], db["denoised"]) <= 10 * tol


def test_dpmpp_2m_is_second_order_throughout(kd):
    """The alias differs from dpmpp's default (lower_order_final, max_order 3), which k-diffusion's 2M is not."""
    sigmas = karras(6, dtype=torch.float64)
    a, b, *_ = run_both(kd.sample_dpmpp_2m, sampler("dpmpp_2m"), sigmas, torch.float64)
    c, *_ = run_both(kd.sample_dpmpp_2m, sampler("dpmpp", max_order=2), sigmas, torch.float64)
    assert rel_err(a, b) < 1e-12 and rel_err(c, b) > 1e-6


def test_every_solver_runs_and_counts(kd):
    """Every registered name gives a sampler; each makes the NFE its rule says (+1 for the step to 0)."""
    sigmas = karras(7)
    x = torch.randn(2, 16) * sigmas[0]
    for name in solver_names():
        model = Model()
        out = sampler(name)(model, x, sigmas, disable=True)
        reference = sample(lambda z, s: Model()(z, s), x.double() / float(sigmas[0]), name,
                           sigmas=sigmas[:-1].double(), denoise_to_zero=True)
        assert len(model.calls) == reference.nfe, name
        assert out.dtype == torch.float32 and torch.isfinite(out).all(), name
        assert rel_err(out, reference.samples) < 1e-6, name


def test_edge_grids_and_bad_input(kd):
    model, x = Model(), torch.randn(2, 16) * 10
    assert torch.equal(sampler("euler")(model, x, torch.tensor([10.0])), x) and not model.calls
    # [sigma, 0]: the one step to 0, as k-diffusion
    one = sampler("ipndm")(model, x, torch.tensor([10.0, 0.0]), disable=True)
    ref = kd.sample_euler(Model(), x, torch.tensor([10.0, 0.0]), disable=True)
    assert len(model.calls) == 1 and rel_err(one, ref) < 1e-6
    with pytest.raises(ValueError, match="strictly descending"):
        sampler("euler")(model, x, torch.tensor([10.0, 20.0, 0.0]))
    with pytest.raises(ValueError, match="only the last may be 0"):
        sampler("euler")(model, x, torch.tensor([10.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="unknown sampler 'nope'.*euler"):
        sampler("nope")
    with pytest.raises(ValueError, match="has no option 'order'"):
        sampler("ipndm", order=3)
    with pytest.raises(FileNotFoundError):
        sampler("missing.pt")


def test_schedule_file_brings_its_grid(tmp_path):
    """A schedule file: its solver, options and grid; x rescaled from sigmas[0] to the file's first sigma;
    the trailing 0 still adds the step to 0; a warning says the incoming grid was replaced."""
    grid = karras(5, zero=False, dtype=torch.float64)
    path = Schedule(grid, {"made_by": "gits", "solver": "ipndm", "solver_options": {"max_order": 2},
                           "afs": False, "shape": [16]}).save(tmp_path / "gits.json")
    fn = sampler(str(path))
    x_noise = torch.randn(2, 16, dtype=torch.float64)
    incoming = karras(9)
    model = Model()
    with pytest.warns(UserWarning, match="replaces the incoming sigmas"):
        out = fn(model, (x_noise * incoming[0]).float(), incoming, disable=True)
    ref_model = Model()
    ref = sample(lambda z, s: ref_model(z, s), x_noise, "ipndm", sigmas=grid, max_order=2, denoise_to_zero=True)
    assert len(model.calls) == ref.nfe == 5
    assert rel_err(out, ref.samples) < 1e-6
    # the file's own sigmas (plus 0) as the incoming grid: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(Model(), (x_noise * grid[0]).float(), torch.cat([grid, grid.new_zeros(1)]).float(), disable=True)
    # a file for another sample shape is refused
    other = Schedule(grid, {"solver": "ipndm", "shape": [8]}).save(tmp_path / "other.json")
    with pytest.raises(ValueError, match="shape"):
        sampler(str(other))(Model(), torch.randn(2, 16), incoming, disable=True)


def test_amed_file(tmp_path):
    """An AMED predictor file: the model it was trained for, its grid, per-sample intermediate points."""
    sys.path.insert(0, str(Path(__file__).resolve().parent / "golden"))
    import record
    model, noise = record.model_and_noise()
    path = Path(__file__).resolve().parent / "golden" / "amed_dpmpp4.pt"
    reference = sample(model, noise, amed=str(path))
    sigma0 = float(reference.sigmas[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = sampler(str(path))(model, noise * sigma0, reference.sigmas.float(), disable=True)
    assert rel_err(out, reference.samples) < 1e-12
    with pytest.raises(ValueError, match="another model|trained for"):
        other = GaussianMixture.from_data(torch.randn(5, *model.shape, dtype=torch.float64), 0.3)
        sampler(str(path))(other, noise * sigma0, reference.sigmas, disable=True)
