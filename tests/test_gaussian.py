"""SPEC §1: every Gaussian fact against an independent closed form or Monte-Carlo estimate."""

import math

import torch

from difflab import gaussian


def _spd(d, g):
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.5 * torch.eye(d, dtype=torch.float64)


def test_log_normal_matches_torch_distributions(gen):
    d = 5
    mean, cov = torch.randn(d, generator=gen, dtype=torch.float64), _spd(d, gen)
    x = torch.randn(7, d, generator=gen, dtype=torch.float64)
    ref = torch.distributions.MultivariateNormal(mean, cov).log_prob(x)
    torch.testing.assert_close(gaussian.log_normal(x, mean, cov), ref, rtol=1e-10, atol=1e-10)
    var = torch.rand(d, generator=gen, dtype=torch.float64) + 0.1
    ref_diag = torch.distributions.Normal(mean, var.sqrt()).log_prob(x).sum(-1)
    torch.testing.assert_close(gaussian.log_normal_diag(x, mean, var), ref_diag)


def test_quadratic_expectation_monte_carlo(gen):
    """E[(x-a)ᵀA(x-a)] = tr(AΣ) + (μ-a)ᵀA(μ-a); MC with 400k draws, tolerance 5 standard errors."""
    d = 4
    mean, cov, A = torch.randn(d, generator=gen, dtype=torch.float64), _spd(d, gen), _spd(d, gen)
    a = torch.randn(d, generator=gen, dtype=torch.float64)
    x = gaussian.reparameterize(mean, torch.linalg.cholesky(cov), torch.randn(400_000, d, generator=gen, dtype=torch.float64))
    q = (((x - a) @ A) * (x - a)).sum(-1)
    exact = gaussian.quadratic_expectation(mean, cov, a, A)
    assert abs(q.mean() - exact) < 5 * q.std() / math.sqrt(q.numel())


def test_reparameterization_moments(gen):
    d = 3
    mean, cov = torch.randn(d, generator=gen, dtype=torch.float64), _spd(d, gen)
    x = gaussian.reparameterize(mean, torch.linalg.cholesky(cov), torch.randn(400_000, d, generator=gen, dtype=torch.float64))
    torch.testing.assert_close(x.mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(torch.cov(x.T), cov, atol=0.05 * float(cov.abs().max()), rtol=0)


def test_product_is_precision_weighted_and_proportional(gen):
    """The product density divided by N(x; μ, Σ) must be constant in x."""
    d = 3
    m1, c1, m2, c2 = (torch.randn(d, generator=gen, dtype=torch.float64), _spd(d, gen),
                      torch.randn(d, generator=gen, dtype=torch.float64), _spd(d, gen))
    m, c = gaussian.product(m1, c1, m2, c2)
    xs = torch.randn(6, d, generator=gen, dtype=torch.float64)
    ratio = gaussian.log_normal(xs, m1, c1) + gaussian.log_normal(xs, m2, c2) - gaussian.log_normal(xs, m, c)
    torch.testing.assert_close(ratio, ratio[0].expand(6), rtol=0, atol=1e-9)
    md, vd = gaussian.product_diag(m1, torch.diagonal(c1), m2, torch.diagonal(c2))
    mf, cf = gaussian.product(m1, torch.diag(torch.diagonal(c1)), m2, torch.diag(torch.diagonal(c2)))
    torch.testing.assert_close(md, mf)
    torch.testing.assert_close(vd, torch.diagonal(cf))


def test_kl_closed_form_vs_monte_carlo(gen):
    """KL formula vs E_q[log q − log p] from 400k draws, tolerance 5 standard errors."""
    d = 4
    m1, c1, m2, c2 = (torch.randn(d, generator=gen, dtype=torch.float64), _spd(d, gen),
                      torch.randn(d, generator=gen, dtype=torch.float64), _spd(d, gen))
    x = gaussian.reparameterize(m1, torch.linalg.cholesky(c1), torch.randn(400_000, d, generator=gen, dtype=torch.float64))
    diff = gaussian.log_normal(x, m1, c1) - gaussian.log_normal(x, m2, c2)
    kl = gaussian.kl_normal(m1, c1, m2, c2)
    assert abs(diff.mean() - kl) < 5 * diff.std() / math.sqrt(x.shape[0])
    ref = torch.distributions.kl_divergence(torch.distributions.MultivariateNormal(m1, c1),
                                            torch.distributions.MultivariateNormal(m2, c2))
    torch.testing.assert_close(kl, ref)
    v1, v2 = torch.diagonal(c1).unsqueeze(0), torch.diagonal(c2).unsqueeze(0)
    torch.testing.assert_close(gaussian.kl_normal_diag(m1.unsqueeze(0), v1, m2.unsqueeze(0), v2),
                               gaussian.kl_normal(m1, torch.diag(v1[0]), m2, torch.diag(v2[0])).unsqueeze(0))


def test_discretized_likelihood_sums_to_one_over_256_bins():
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    for mean, log_scale in [(0.0, math.log(0.3)), (0.9, math.log(0.05)), (-1.3, math.log(1.0))]:
        p = gaussian.discretized_gaussian_log_likelihood(bins, torch.tensor(mean), torch.tensor(log_scale)).exp()
        assert abs(float(p.sum()) - 1.0) < 1e-9
    # A narrow Gaussian centred on a bin puts almost all mass in it.
    lp = gaussian.discretized_gaussian_log_likelihood(bins[100:101], bins[100:101], torch.tensor(math.log(1e-4)))
    assert float(lp) > -1e-6
