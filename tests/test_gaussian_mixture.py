"""The analytic model: the closed-form denoiser against Tweedie's formula, and the reference solver."""
import pytest
import torch

from diffsampler import GaussianMixture
from diffsampler.reference import solve_ode
from conftest import mixture, single_gaussian


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0, 40.0])
def test_denoiser_equals_tweedie_score_formula(sigma):
    """E[x0 | x] = x + sigma^2 grad log p_sigma(x), with the gradient taken by autograd."""
    model = mixture()
    x = (model.sample_data(16) + sigma * torch.randn(16, 12, dtype=torch.float64)).requires_grad_(True)
    sig = torch.full((16,), sigma, dtype=torch.float64)
    grad, = torch.autograd.grad(model.log_prob(x, sig).sum(), x)
    torch.testing.assert_close(model(x.detach(), sig), x.detach() + sigma ** 2 * grad, rtol=1e-9, atol=1e-9)


def test_optimal_denoiser_of_a_dataset_is_a_softmax_weighted_mean():
    data = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    model = GaussianMixture.from_data(data)
    x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    sigma = torch.full((3,), 0.7, dtype=torch.float64)
    d2 = ((x.reshape(3, 1, 4) - data.reshape(1, 5, 4)) ** 2).sum(-1)
    weights = torch.softmax(-d2 / (2 * 0.7 ** 2), dim=1)
    torch.testing.assert_close(model(x, sigma), (weights @ data.reshape(5, 4)).reshape(3, 1, 2, 2))
    assert model(x, sigma).dtype == torch.float64
    assert model(x.float(), sigma.float()).dtype == torch.float32


def test_reference_solver_matches_the_closed_form_flow():
    model = single_gaussian()
    x = 10.0 * torch.randn(4, 16, dtype=torch.float64)
    exact = model.exact_flow(x, 10.0, 0.01)
    torch.testing.assert_close(solve_ode(model, x, 10.0, 0.01, tol=1e-11), exact, rtol=1e-8, atol=1e-8)
    path = solve_ode(model, x, 10.0, 0.01, tol=1e-11, sigmas_out=[10.0, 1.0, 0.01])
    torch.testing.assert_close(path[1], model.exact_flow(x, 10.0, 1.0), rtol=1e-8, atol=1e-8)


def test_exact_flow_only_for_one_component_and_inputs_checked():
    with pytest.raises(ValueError, match="single Gaussian"):
        mixture().exact_flow(torch.zeros(1, 12), 1.0, 0.5)
    with pytest.raises(ValueError, match="stds must be"):
        GaussianMixture(torch.zeros(3, 4), stds=[-1.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="weights must be"):
        GaussianMixture(torch.zeros(3, 4), weights=[1.0, 2.0])
