"""SPEC §8: the test beds' exact quantities against independent computations."""

import pytest
import torch

from difflab import DiscretePath, GaussianMixtureBed, VPPath
from difflab.testbeds import affine_pushforward, fit_gaussian


def _random_mixture(gen, K=3, D=3):
    means = torch.randn(K, D, generator=gen, dtype=torch.float64) * 2
    A = torch.randn(K, D, D, generator=gen, dtype=torch.float64) * 0.5
    covs = A @ A.transpose(-1, -2) + 0.1 * torch.eye(D, dtype=torch.float64)
    return GaussianMixtureBed(means, covs, weights=[0.2, 0.5, 0.3], labels=[0, 1, 1])


def test_log_prob_matches_torch_mixture(gen):
    bed = _random_mixture(gen)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    comps = torch.distributions.MultivariateNormal(bed.means, bed.covs)
    ref = torch.distributions.MixtureSameFamily(torch.distributions.Categorical(bed.weights), comps).log_prob(x)
    torch.testing.assert_close(bed.log_prob(x), ref)


@pytest.mark.parametrize("a,s", [(1.0, 0.0), (0.8, 0.6), (0.05, 0.9987), (0.0, 1.0)])
def test_score_is_gradient_of_marginal_log_density(gen, a, s):
    bed = _random_mixture(gen)
    x = (torch.randn(8, 3, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    if s == 0.0:
        return  # the score of p_0 is checked through log_prob's gradient below
    grad = torch.autograd.grad(bed.marginal_log_prob(x, a, s).sum(), x)[0]
    x0, eps, score = bed.posterior_means(x.detach(), a, s)
    torch.testing.assert_close(score, grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(eps, -s * score, rtol=1e-8, atol=1e-10)  # SPEC §4: score = −ε/s
    torch.testing.assert_close(x0 * a + s * eps, x.detach(), rtol=1e-8, atol=1e-10)  # x = a x0 + s ε


def test_posterior_mean_monte_carlo(gen):
    """E[x0 | x_t] by brute-force importance weighting of prior samples (200k) vs the closed form."""
    bed = _random_mixture(gen)
    a, s = 0.7, 0.714
    x0s = bed.sample(200_000, gen, dtype=torch.float64)
    x_t = torch.tensor([[0.5, -1.0, 1.0]], dtype=torch.float64)
    logw = -0.5 * ((x_t - a * x0s) ** 2).sum(-1) / s**2
    w = torch.softmax(logw, 0)
    mc = (w.unsqueeze(-1) * x0s).sum(0)
    ess = 1 / (w**2).sum()
    exact = bed.posterior_means(x_t, a, s)[0][0]
    assert ess > 1000
    torch.testing.assert_close(mc, exact, atol=0.05, rtol=0)


def test_class_posterior_is_bayes(gen):
    bed = _random_mixture(gen)
    x = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    a, s = 0.6, 0.8
    post = bed.class_posterior(x, a, s)
    torch.testing.assert_close(post.sum(-1), torch.ones(5, dtype=torch.float64))
    joint = torch.stack([bed.marginal_log_prob(x, a, s, y=k) for k in range(2)], -1)
    prior = torch.tensor([0.2, 0.8], dtype=torch.float64)
    ref = torch.softmax(joint + prior.log(), -1)
    torch.testing.assert_close(post, ref)


def test_sampling_moments(gen):
    bed = _random_mixture(gen)
    x = bed.sample(200_000, gen, dtype=torch.float64)
    mean, cov = bed.moments()
    m, c = fit_gaussian(x)
    torch.testing.assert_close(m, mean, atol=0.03, rtol=0)
    torch.testing.assert_close(c, cov, atol=0.08, rtol=0)
    xs, ys = bed.sample(1000, gen, y=1, return_labels=True)
    assert (ys == 1).all()


def test_exact_kl_and_entropy(bed16):
    mean, cov = bed16.means[0], bed16.covs[0]
    assert float(bed16.kl_from_gaussian(mean, cov)) == pytest.approx(0.0, abs=1e-10)
    x = bed16.sample(100_000, torch.Generator().manual_seed(0), dtype=torch.float64)
    assert float(-bed16.log_prob(x).mean()) == pytest.approx(bed16.entropy(), abs=0.03)


def test_affine_pushforward_recovers_the_marginal(bed16):
    """An explicit affine map x -> A x + b of N(0, I) gives N(b, A Aᵀ)."""
    A = torch.randn(16, 16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    b = torch.randn(16, dtype=torch.float64)
    mean, cov = affine_pushforward(lambda x: x @ A.T + b, 16)
    torch.testing.assert_close(mean, b)
    torch.testing.assert_close(cov, A @ A.T)


def test_bed_denoiser_on_any_shape_and_path(gen):
    bed = GaussianMixtureBed(torch.zeros(1, 16, dtype=torch.float64), torch.ones(1, 16, dtype=torch.float64), shape=(1, 4, 4))
    x = torch.randn(3, 1, 4, 4, generator=gen)
    for path, t in [(DiscretePath.from_schedule("linear", T=100), torch.tensor([50, 50, 50])), (VPPath(), torch.full((3,), 0.5))]:
        pred = bed.denoiser(path)(x, t)
        assert pred.x0.shape == x.shape and pred.x0.dtype == x.dtype
        a, s = float(path.a(t[0])), float(path.s(t[0]))
        # For N(0, I) data: E[x0|x] = a x / (a² + s²)
        torch.testing.assert_close(pred.x0, a * x / (a**2 + s**2), rtol=1e-5, atol=1e-6)
