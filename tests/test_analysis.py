"""Trajectory geometry (diffsampler.analysis) against exact answers, invariances and the CLI."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from conftest import mixture, single_gaussian
from diffsampler import GaussianMixture, sample
from diffsampler.analysis import (
    GaussianDenoiser, chord_length, curvature_torsion, denoiser_gap, distance_to_final, frame_coordinates,
    frame_spread, kernel_weights, line_deviation, mean_shift_step, mean_shift_vector, norms, pca_project,
    pca_variance, record_trajectories, step_cosine, step_sizes, summarize, trajectory_curvature)
from diffsampler.cli import main
from diffsampler.reference import solve_ode


def random_orthogonal(dim, seed, reflect=False):
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(dim, dim, dtype=torch.float64, generator=gen))
    q = q * torch.sign(torch.diagonal(r))
    if reflect:
        q[:, 0] = -q[:, 0]
    return q


def helix(radius, pitch, n=400, turns=2.0, nonuniform=True):
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    t = 2 * math.pi * turns * (u ** 2 if nonuniform else u)          # uneven spacing: arc length must handle it
    return torch.stack([radius * torch.cos(t), radius * torch.sin(t), pitch * t], dim=-1)


@pytest.fixture(scope="module")
def mixture_trajectories():
    model = mixture(components=5, dim=12, seed=3)
    noise = torch.randn(6, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    model.shape = (3, 2, 2)
    return record_trajectories(model, noise, solver="heun", nfe=40)


# -- straight trajectories -----------------------------------------------------------------

def test_single_gaussian_trajectories_are_straight_lines():
    model = single_gaussian(dim=16, std=0.5)
    noise = torch.randn(5, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    traj = record_trajectories(model, noise, solver="heun", nfe=30)
    assert traj.sampling.shape == (16, 5, 16) and traj.denoising.shape == (15, 5, 16)
    for points in (traj.sampling, traj.denoising_aligned):
        dev = line_deviation(points, relative=True)
        assert float(dev.abs().max()) < 1e-12
        top = pca_variance(points, 3)
        assert torch.allclose(top[:, 0], torch.ones(5, dtype=torch.float64), atol=1e-12)
        coords = frame_coordinates(points)
        assert float(coords.coords[..., 1:].abs().max()) < 1e-10 and float(coords.residual.max()) < 1e-10
    # the exact flow of a single Gaussian runs on the same line: deviation 0 on any grid
    sig = traj.sigmas.tolist()
    exact = torch.stack([model.exact_flow(noise * sig[0], sig[0], s) for s in sig])
    assert float(line_deviation(exact, relative=True).max()) < 1e-12
    # the step points straight at the final sample
    assert torch.allclose(step_cosine(traj.sampling), torch.ones(15, 5, dtype=torch.float64), atol=1e-9)


def test_anisotropic_gaussian_bends_and_the_measures_see_it():
    gen = torch.Generator().manual_seed(0)
    q = random_orthogonal(6, 2)
    model = GaussianDenoiser(torch.zeros(6), torch.tensor([4.0, 1.0, 0.25, 0.05, 0.01, 1e-3]), q.T)
    noise = torch.randn(4, 6, dtype=torch.float64, generator=gen)
    traj = record_trajectories(model, noise, sigmas=torch.logspace(math.log10(5.0), -3, 80, dtype=torch.float64),
                               solver="heun")
    assert float(line_deviation(traj.sampling, relative=True).amax(0).min()) > 1e-3
    assert float(pca_variance(traj.sampling, 1).min()) < 1 - 1e-4


# -- curvature and torsion ----------------------------------------------------------------

def assert_close_to(values, expected, interior_rtol, end_rtol, trim=3):
    """Interior points (away from the one-sided fits at the ends) to interior_rtol, all to end_rtol."""
    rel = (values / expected - 1).abs()
    assert float(rel[..., trim:-trim].max()) < interior_rtol, float(rel[..., trim:-trim].max())
    assert float(rel.max()) < end_rtol, float(rel.max())


@pytest.mark.parametrize("radius,pitch", [(2.0, 0.5), (1.0, 1.5)])
def test_helix_curvature_and_torsion(radius, pitch):
    kappa_true, tau_true = radius / (radius ** 2 + pitch ** 2), pitch / (radius ** 2 + pitch ** 2)
    # smoothed (7-point cubic fits) on an uneven grid: the smoothing costs a little accuracy
    kappa, tau = curvature_torsion(helix(radius, pitch))
    assert_close_to(kappa, kappa_true, 5e-3, 3e-2)
    assert_close_to(tau, tau_true, 5e-3, 5e-2)
    # unsmoothed finite differences (window = 4) on a uniform grid
    kappa4, tau4 = curvature_torsion(helix(radius, pitch, nonuniform=False), window=4)
    assert_close_to(kappa4, kappa_true, 2e-4, 2e-3)
    assert_close_to(tau4, tau_true, 4e-4, 4e-3)
    # a left-handed helix has negative torsion
    mirrored = helix(radius, pitch) * torch.tensor([1.0, -1.0, 1.0], dtype=torch.float64)
    assert_close_to(curvature_torsion(mirrored)[1], -tau_true, 5e-3, 5e-2)


def test_helix_embedded_in_high_dimension_through_pca():
    points = torch.cat([helix(2.0, 0.5), torch.zeros(400, 7, dtype=torch.float64)], dim=1) @ random_orthogonal(10, 5).T
    traj = (points + 3.0)[:, None, :].reshape(400, 1, 2, 5)                  # translated, image-shaped
    kappa, tau = trajectory_curvature(traj, normalize=False)
    assert kappa.shape == (400, 1)
    assert_close_to(kappa[:, 0], 2.0 / 4.25, 5e-3, 3e-2)
    assert_close_to(tau.abs()[:, 0], 0.5 / 4.25, 5e-3, 5e-2)
    # normalized by the chord: curvature scales with the chord length
    kappa_n, tau_n = trajectory_curvature(traj, normalize=True)
    chord = float(chord_length(traj)[0])
    assert torch.allclose(kappa_n, kappa * chord, rtol=1e-8)
    assert torch.allclose(tau_n, tau * chord, rtol=1e-5)      # r''' of the densely sampled start is at rounding level


def test_curvature_is_nan_where_the_curve_stands_still():
    points = torch.cat([helix(1.0, 0.3, n=50), helix(1.0, 0.3, n=50)[-1:].expand(20, 3)])
    kappa, tau = curvature_torsion(points)
    assert bool(torch.isfinite(kappa[:40]).all()) and bool(torch.isnan(kappa[-10:]).all())


# -- invariances and chunking ----------------------------------------------------------------

def _all_measures(traj, max_elements=2 ** 24):
    kappa, tau = trajectory_curvature(traj, max_elements=max_elements)
    frame = frame_coordinates(traj, max_elements=max_elements)
    return {
        "deviation": line_deviation(traj, max_elements=max_elements),
        "relative_deviation": line_deviation(traj, relative=True, max_elements=max_elements),
        "distance": distance_to_final(traj, max_elements=max_elements),
        "cosine": step_cosine(traj, max_elements=max_elements),
        "steps": step_sizes(traj, max_elements=max_elements),
        "pca": pca_variance(traj, 3, max_elements=max_elements),
        "projection": pca_project(traj, 3, max_elements=max_elements)[0],
        "kappa": kappa, "tau": tau, "frame": frame.coords, "residual": frame.residual,
    }


def assert_same_measures(a, b, rtol=1e-7, atol=1e-9):
    for name in a:
        x, y = a[name], b[name]
        if name in ("kappa", "tau"):
            # where a trajectory is straight up to rounding, curvature and torsion are rounding noise:
            # compare where the curvature is well above it
            keep = a["kappa"] > 1e-4 * a["kappa"].nan_to_num().max()
            x, y = x[keep], y[keep]
            assert keep.float().mean() > 0.5
            if name == "tau":     # the most rounding-sensitive: third derivatives over |r' x r''|^2
                assert torch.allclose(x, y, rtol=1e-5, atol=1e-6 * float(x.abs().max())), name
                continue
        assert torch.allclose(x, y, rtol=rtol, atol=atol, equal_nan=True), name


@pytest.mark.parametrize("reflect", [False, True])
def test_measures_are_invariant_to_orthogonal_maps_and_translations(mixture_trajectories, reflect):
    traj = mixture_trajectories.sampling                                      # (21, 6, 3, 2, 2)
    q = random_orthogonal(12, 11, reflect=reflect)
    moved = (traj.reshape(*traj.shape[:2], 12) @ q.T + 0.7).reshape(traj.shape)
    assert_same_measures(_all_measures(traj), _all_measures(moved))
    assert torch.allclose(norms(traj), norms((traj.reshape(*traj.shape[:2], 12) @ q.T).reshape(traj.shape)))


def test_chunked_equals_unchunked_and_shape_does_not_matter(mixture_trajectories):
    traj = mixture_trajectories.sampling
    whole = _all_measures(traj)
    assert_same_measures(whole, _all_measures(traj, max_elements=1))
    assert_same_measures(whole, _all_measures(traj.reshape(traj.shape[0], traj.shape[1], -1)))


def test_known_values_on_a_hand_made_trajectory():
    # a right-angle path (0,0) -> (1,1) -> (2,0): deviation 1 at the corner, chord 2
    traj = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)[:, None, :]
    assert line_deviation(traj)[:, 0].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert line_deviation(traj, relative=True)[1, 0] == pytest.approx(0.5)
    assert distance_to_final(traj)[:, 0].tolist() == pytest.approx([2.0, math.sqrt(2), 0.0])
    assert step_cosine(traj)[:, 0].tolist() == pytest.approx([1 / math.sqrt(2), 1.0])
    assert step_sizes(traj)[:, 0].tolist() == pytest.approx([math.sqrt(2)] * 2)
    coords = frame_coordinates(traj).coords[:, 0]
    assert coords.flatten().tolist() == pytest.approx([0, 0, 0, 0.5, 0.5, 0, 1, 0, 0], abs=1e-12)
    # PCA of 3 points in a plane: variances 2 (x) and 2/3 (y) around the mean point (1, 1/3)
    frac = pca_variance(traj, 3)[0]
    assert frac.tolist() == pytest.approx([0.75, 1.0, 1.0])


def test_summaries_ignore_nan():
    values = torch.tensor([[1.0, 3.0, float("nan")], [2.0, 2.0, 2.0]])
    s = summarize(values)
    assert s["mean"].tolist() == [2.0, 2.0] and s["std"].tolist() == pytest.approx([math.sqrt(2), 0.0])
    assert s["median"].tolist() == [1.0, 2.0] and s["max"].tolist() == [3.0, 2.0]


def test_common_frame_aligns_copies_of_one_shape(mixture_trajectories):
    one = mixture_trajectories.sampling[:, :1].reshape(21, 1, 12)
    copies = torch.cat([one @ random_orthogonal(12, s, reflect=s % 2 == 1).T * (1 + s) + s for s in range(4)], dim=1)
    frame = frame_coordinates(copies)
    assert float(frame_spread(frame.coords).max()) < 1e-9
    assert torch.allclose(frame.coords[-1], torch.tensor([[1.0, 0, 0]] * 4, dtype=torch.float64), atol=1e-12)
    assert float(frame.coords[..., 1].mean()) > 0                            # bulges towards +e2


# -- recording ----------------------------------------------------------------------------------

def test_recording_matches_the_sampler_and_the_model():
    model = mixture(components=4, dim=6, seed=2)
    noise = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    traj = record_trajectories(model, noise, solver="ipndm", nfe=8)
    result = sample(model, noise, solver="ipndm", nfe=8)
    assert traj.nfe == 8 and traj.steps == 8 and traj.solver == "ipndm"
    assert torch.equal(traj.samples, result.samples) and torch.equal(traj.sampling[-1], result.samples)
    assert torch.allclose(traj.sampling[0], noise * 80.0)
    sig = traj.sigmas
    for i in range(traj.steps):
        expect = model(traj.sampling[i], torch.full((5,), float(sig[i]), dtype=torch.float64))
        assert torch.allclose(traj.denoising[i], expect, atol=1e-12)
    chunked = record_trajectories(model, noise, solver="ipndm", nfe=8, batch_size=2)
    assert torch.allclose(chunked.sampling, traj.sampling, rtol=1e-12, atol=1e-12)   # BLAS rounding only
    assert torch.allclose(chunked.denoising, traj.denoising, rtol=1e-12, atol=1e-12)
    assert traj.denoising_aligned.shape == traj.sampling.shape
    assert torch.equal(traj.select([1, 3]).sampling, traj.sampling[:, [1, 3]])


def test_recording_passes_per_sample_conditioning_through_chunks():
    seen = []

    def denoiser(x, sigma, class_labels=None):
        assert class_labels is not None and class_labels.shape == (x.shape[0], 3)
        seen.append(class_labels.argmax(1).tolist())
        return x / (1 + sigma[:, None] ** 2)

    labels = torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 1, 0]), 3).float()
    record_trajectories(denoiser, torch.randn(5, 4), solver="euler", nfe=3, batch_size=2,
                        cond={"class_labels": labels})
    assert seen[0] == [0, 1] and seen[3] == [2, 1] and seen[6] == [0]


# -- optimal denoiser, mean shift, Gaussian approximations ----------------------------------------

def test_mean_shift_step_equals_the_euler_step_of_the_optimal_denoiser():
    gen = torch.Generator().manual_seed(4)
    data = torch.randn(40, 2, 3, dtype=torch.float64, generator=gen)
    x = 2.0 * torch.randn(7, 2, 3, dtype=torch.float64, generator=gen)
    kde = GaussianMixture.from_data(data)
    for sigma, sigma_next in [(2.0, 1.3), (0.9, 0.1), (5.0, 4.99)]:
        euler = sample(kde, x / sigma, solver="euler", sigmas=[sigma, sigma_next]).samples
        assert torch.allclose(mean_shift_step(data, x, sigma, sigma_next), euler, atol=1e-12)
        d = kde(x, torch.full((7,), sigma, dtype=torch.float64))
        assert torch.allclose(mean_shift_vector(data, x, sigma), d - x, atol=1e-12)
    # the step to sigma = 0 is one full mean-shift iteration: the kernel-weighted mean
    w = kernel_weights(data, x, 0.8)
    assert torch.allclose(w.sum(1), torch.ones(7, dtype=torch.float64))
    assert torch.allclose(mean_shift_step(data, x, 0.8, 0.0), (w @ data.reshape(40, -1)).reshape(x.shape), atol=1e-12)


def test_denoiser_gap(mixture_trajectories):
    traj = mixture_trajectories
    model = mixture(components=5, dim=12, seed=3)
    model.shape = (3, 2, 2)
    other = single_gaussian(dim=12)
    other.shape = (3, 2, 2)
    same = denoiser_gap(traj.sampling[:-1], traj.sigmas[:-1], model, model)
    assert float(same.abs().max()) == 0.0
    gap = denoiser_gap(traj.sampling[:-1], traj.sigmas[:-1], model, other, batch_size=4, rms=False)
    i = 5
    sig = torch.full((6,), float(traj.sigmas[i]), dtype=torch.float64)
    direct = (model(traj.sampling[i], sig) - other(traj.sampling[i], sig)).reshape(6, -1).norm(dim=1)
    assert torch.allclose(gap[i], direct)


def test_gaussian_denoisers_equal_the_mixture_for_one_isotropic_gaussian():
    gmm = single_gaussian(dim=8, std=0.7)
    mu = gmm.means[0]
    full = GaussianDenoiser.from_covariance(mu, 0.49 * torch.eye(8, dtype=torch.float64))
    iso = GaussianDenoiser(mu, torch.zeros(0), torch.zeros(0, 8), iso_var=0.49)
    low = GaussianDenoiser(mu, torch.full((2,), 0.49), torch.eye(8, dtype=torch.float64)[:2], iso_var=0.49)
    x = 3 * torch.randn(6, 8, dtype=torch.float64)
    for s in (0.01, 0.5, 2.0, 80.0):
        sigma = torch.full((6,), s, dtype=torch.float64)
        expect = gmm(x, sigma)
        for model in (full, iso, low):
            assert torch.allclose(model(x, sigma), expect, atol=1e-12)
    assert torch.allclose(full.exact_flow(x, 5.0, 0.3), gmm.exact_flow(x, 5.0, 0.3), atol=1e-12)


@pytest.mark.parametrize("rank", [None, 3, 0])
def test_gaussian_denoiser_is_tweedie_of_its_density(rank):
    gen = torch.Generator().manual_seed(9)
    data = torch.randn(200, 1, 2, 3, dtype=torch.float64, generator=gen) @ torch.diag(
        torch.tensor([2.0, 0.5, 0.1], dtype=torch.float64)) + 0.3
    model = GaussianDenoiser.fit(data, rank=rank)
    cov = model.covariance()
    assert torch.allclose(cov, cov.T)
    if rank is None:
        assert torch.allclose(cov, torch.cov(data.reshape(200, -1).T, correction=0), atol=1e-12)
    x = torch.randn(4, 1, 2, 3, dtype=torch.float64, generator=gen)
    for s in (0.05, 0.7, 10.0):
        xg = x.clone().requires_grad_(True)
        noisy = torch.distributions.MultivariateNormal(model.mean, cov + s ** 2 * torch.eye(6, dtype=torch.float64))
        logp = noisy.log_prob(xg.reshape(4, -1))
        (score,) = torch.autograd.grad(logp.sum(), xg)
        tweedie = x + s ** 2 * score
        assert torch.allclose(model(x, torch.full((4,), s, dtype=torch.float64)), tweedie, atol=1e-10)
        assert torch.allclose(model.log_prob(x, s), logp.detach(), atol=1e-10)


def test_gaussian_fit_from_few_samples_and_exact_flow():
    gen = torch.Generator().manual_seed(1)
    data = torch.randn(5, 10, dtype=torch.float64, generator=gen)             # fewer samples than dims
    model = GaussianDenoiser.fit(data)
    assert model.rank == 4
    assert torch.allclose(model.covariance(), torch.cov(data.T, correction=0), atol=1e-12)
    low = GaussianDenoiser.fit(data, rank=2)
    assert low.rank == 2 and low.iso_var > 0
    assert float(low.covariance().trace()) == pytest.approx(float(torch.cov(data.T, correction=0).trace()))
    x = 4 * torch.randn(3, 10, dtype=torch.float64, generator=gen)
    ref = solve_ode(low, x, 4.0, 0.05, tol=1e-11)
    assert torch.allclose(low.exact_flow(x, 4.0, 0.05), ref, atol=1e-8)
    result = sample(low, x / 80, solver="heun", nfe=60)                       # usable with sample()
    assert result.samples.shape == x.shape and bool(torch.isfinite(result.samples).all())


# -- errors ---------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="points, batch"):
        line_deviation(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="at least 2 points"):
        step_cosine(torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="k must be"):
        pca_variance(torch.zeros(4, 2, 3), 0)
    with pytest.raises(ValueError, match="3-D points"):
        curvature_torsion(torch.zeros(10, 2))
    with pytest.raises(ValueError, match="at least 4"):
        trajectory_curvature(torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="final"):
        distance_to_final(torch.zeros(4, 2, 3), final=torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bandwidth"):
        mean_shift_vector(torch.zeros(4, 2), torch.zeros(3, 2), -1.0)
    with pytest.raises(ValueError, match="sample shape"):
        mean_shift_vector(torch.zeros(4, 2), torch.zeros(3, 3), 1.0)
    with pytest.raises(ValueError, match="orthonormal"):
        GaussianDenoiser(torch.zeros(3), torch.ones(2), torch.ones(2, 3))
    with pytest.raises(ValueError, match="rank"):
        GaussianDenoiser.fit(torch.randn(10, 4), rank=7)
    with pytest.raises(TypeError):
        norms([[1.0]])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_measures_on_gpu_match_cpu(mixture_trajectories):
    traj = mixture_trajectories.sampling
    cpu, gpu = _all_measures(traj), _all_measures(traj.cuda())
    for name in cpu:
        assert torch.allclose(cpu[name], gpu[name].cpu(), rtol=1e-6, atol=1e-9, equal_nan=True), name


# -- CLI ------------------------------------------------------------------------------------------

def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_analyze_writes_figures_and_numbers(tmp_path):
    out = tmp_path / "an"
    result = run("analyze", "--model", "gmm:synthetic:3:1x4x4", "--solver", "euler", "--nfe", 8, "--seeds", "0-4",
                 "--strips", 2, "--show", 3, "--reference", "gmm:synthetic:3:1x4x4:1", "--out", out)
    assert result.exit_code == 0, result.output
    names = {p.name for p in out.iterdir()}
    assert {"deviation.png", "distance.png", "pca_variance.png", "projection_3d.png", "curvature_torsion.png",
            "strips.png", "denoiser_gap.png", "numbers.json"} <= names
    assert all((out / n).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for n in names if n.endswith(".png"))
    numbers = json.loads((out / "numbers.json").read_text())
    assert numbers["seeds"] == [0, 1, 2, 3, 4] and numbers["nfe"] == 8 and len(numbers["sigmas"]) == 9
    top = [numbers["sampling"]["pca_variance"][f"top{k}"]["mean"] for k in (1, 2, 3)]
    assert 0.5 < top[0] <= top[1] <= top[2] <= 1.0 + 1e-12
    dev = numbers["sampling"]["max_relative_deviation"]
    assert 0 < dev["of_mean_profile"] < 0.5 and dev["at_sigma"] in numbers["sigmas"]
    assert len(numbers["reference_gap"]["mean"]) == 8
    assert "trajectories analyzed" in result.output and "PCA variance" in result.output


@pytest.mark.parametrize("args,message", [
    (["--seeds", "5-1"], "empty"),
    (["--model", "nope"], "unknown model"),
    (["--solver", "euler", "--nfe", "2"], "at least 3 steps"),
    (["--reference", "gmm:synthetic:2:1x3x3"], "sample shape"),
    (["--class", "3"], "unconditional"),
])
def test_analyze_rejects_bad_input(tmp_path, args, message):
    base = ["analyze", "--model", "gmm:synthetic:2:1x4x4", "--nfe", "8", "--seeds", "0-1", "--out", str(tmp_path / "x")]
    result = CliRunner().invoke(main, base + args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "x" / "numbers.json").exists()
