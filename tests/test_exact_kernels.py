"""SPEC §2, §5, §8: the exact posterior q(x0|x_t), the true reverse kernel q(x_t'|x_t), the exact-kernel sampler,
and the exact output law of stochastic samplers on a Gaussian bed (:func:`difflab.testbeds.chain_pushforward`).

Oracles: the product of Gaussians (SPEC §1) per component, the bed's exact ``E[x0|x_t]``, Bayes' rule through the
bed's exact marginals, 2-D quadrature, and Monte Carlo with tolerances of 5 standard errors (a false alarm about
once in 10⁶ per check).
"""

from functools import partial

import pytest
import torch

from difflab import gaussian
from difflab.exact_kernels import X0DrawDenoiser, oracle_x0_sampler, posterior_x0, reverse_kernel, \
    sample_exact_kernel, sample_marginal
from difflab.metrics import sliced_wasserstein2
from difflab.paths import DiscretePath, DiscreteTimeContinuation, LinearPath, VEPath, VPPath
from difflab.samplers.ancestral import ddpm_step
from difflab.samplers.ddim import ddim_step
from difflab.samplers.grids import discrete_timesteps
from difflab.samplers.sde import euler_maruyama_step, langevin_step
from difflab.testbeds import GaussianMixtureBed, affine_pushforward, chain_pushforward, fit_gaussian

# (path, t, t') with t' < t: discrete DDPM, a large discrete jump, and three continuous paths
PATHS = [
    pytest.param(DiscretePath.from_schedule("linear", T=1000), 400, 399, id="ddpm-one-step"),
    pytest.param(DiscretePath.from_schedule("cosine", T=1000), 700, 200, id="ddpm-cosine-jump"),
    pytest.param(LinearPath(), 0.8, 0.3, id="linear"),
    pytest.param(VPPath(), 0.5, 0.2, id="vp"),
    pytest.param(VEPath(), 0.6, 0.4, id="ve"),
]


def _mixture(D=2):
    g = torch.Generator().manual_seed(5)
    means = torch.randn(3, D, generator=g, dtype=torch.float64) * 1.5
    A = torch.randn(3, D, D, generator=g, dtype=torch.float64) * 0.4
    covs = A @ A.transpose(-1, -2) + 0.05 * torch.eye(D, dtype=torch.float64)
    return GaussianMixtureBed(means, covs, weights=[0.2, 0.5, 0.3], labels=[0, 1, 1])


def _x_t(bed, path, t, n=6, seed=0):
    return sample_marginal(bed, path, n, t, torch.Generator().manual_seed(seed))


def _t(path, t):
    return torch.tensor(t, dtype=torch.long if path.discrete else torch.float64)


@pytest.mark.parametrize("path, t, t_prev", PATHS)
def test_posterior_components_are_gaussian_products_and_mean_is_the_beds(path, t, t_prev):
    """Each component of q(x0|x_t) is N(μ_k, Σ_k) times the likelihood N(x_t; a x0, s² I), i.e. the product
    with N(x0; x_t/a, s²/a² I) (SPEC §1), to 1e-7 (gaussian.product inverts both covariances explicitly, losing
    about 8 digits at s/a = 4); the mixture's mean is the bed's exact E[x0|x_t] to 1e-10."""
    bed = _mixture(3)
    x = _x_t(bed, path, t)
    post = posterior_x0(bed, path, x, t)
    a, s = float(path.a(_t(path, t))), float(path.s(_t(path, t)))
    covs = torch.einsum("kdj,bkj,kej->bkde", post.eigvecs, post.eigvals, post.eigvecs)
    for k in range(bed.K):
        m, P = gaussian.product(bed.means[k].expand(6, 3), bed.covs[k].expand(6, 3, 3), x / a,
                                (s / a) ** 2 * torch.eye(3, dtype=torch.float64).expand(6, 3, 3))
        torch.testing.assert_close(post.means[:, k], m, rtol=1e-7, atol=1e-7)
        torch.testing.assert_close(covs[:, k], P, rtol=1e-7, atol=1e-7)
    mean, _ = post.moments()
    x0_exact = bed.posterior_means(x, path.a(_t(path, t)), path.s(_t(path, t)))[0]
    torch.testing.assert_close(mean, x0_exact, rtol=1e-10, atol=1e-10)


def test_posterior_log_prob_and_draws(gen):
    """log q(x0|x_t) equals Σ_k r_k N(x0; m_k, P_k) written with gaussian.log_normal; 40 000 draws per row have the
    exact mean and covariance (each entry within 5 standard errors)."""
    bed, path = _mixture(2), VPPath()
    x = _x_t(bed, path, 0.4, n=3)
    post = posterior_x0(bed, path, x, 0.4)
    x0 = post.sample(gen, 5)  # (5, 3, 2)
    covs = torch.einsum("kdj,bkj,kej->bkde", post.eigvecs, post.eigvals, post.eigvecs)
    ref = torch.logsumexp(post.log_weights + gaussian.log_normal(x0.unsqueeze(-2), post.means, covs), -1)
    torch.testing.assert_close(post.log_prob(x0), ref, rtol=1e-10, atol=1e-10)
    n = 40_000
    draws = post.sample(gen, n)  # (n, 3, 2)
    mean, cov = post.moments()
    se = (torch.diagonal(cov, dim1=-2, dim2=-1) / n).sqrt()
    assert ((draws.mean(0) - mean).abs() <= 5 * se).all()
    dev = draws - mean
    emp = torch.einsum("nbd,nbe->bde", dev, dev) / n
    se_cov = ((torch.einsum("nbd,nbe->nbde", dev, dev) - cov).std(0) / n**0.5)
    assert ((emp - cov).abs() <= 5 * se_cov + 1e-12).all()


def test_class_conditional_posterior(gen):
    """q(x0|x_t, y) keeps only the components of class y, and its mean is the bed's exact E[x0|x_t, y]."""
    bed, path = _mixture(2), LinearPath()
    x = _x_t(bed, path, 0.6, n=4)
    for y in (0, 1):
        post = posterior_x0(bed, path, x, 0.6, y=torch.full((4,), y))
        assert (post.weights[:, bed.labels != y] < 1e-290).all()  # weight 0 is held as 1e-300
        ref = bed.posterior_means(x, path.a(_t(path, 0.6)), path.s(_t(path, 0.6)), y=torch.full((4,), y))[0]
        torch.testing.assert_close(post.moments()[0], ref, rtol=1e-10, atol=1e-10)
    draw = oracle_x0_sampler(bed, path)(x, 0.6, gen, y=torch.zeros(4, dtype=torch.long))
    assert draw.shape == x.shape  # one draw per row, shaped like x_t


@pytest.mark.parametrize("path, t, t_prev", PATHS)
def test_kernel_density_is_bayes_rule(path, t, t_prev):
    """log q(x_t'|x_t) = log q(x_t|x_t') + log p_t'(x_t') − log p_t(x_t) (Bayes, with the forward transition
    N(x_t; (a_t/a_t') x_t', s_t² − (a_t/a_t')² s_t'² I) and the bed's exact marginals), to 1e-8."""
    bed = _mixture(3)
    x = _x_t(bed, path, t)
    kernel = reverse_kernel(bed, path, x, t, t_prev)
    x_prev = kernel.sample(torch.Generator().manual_seed(2), 4)  # (4, 6, 3)
    tt, tp = _t(path, t), _t(path, t_prev)
    alpha = float(path.a(tt) / path.a(tp))
    var = float(path.s(tt) ** 2 - alpha**2 * path.s(tp) ** 2)
    flat = x_prev.reshape(-1, 3)
    forward = gaussian.log_normal_diag(x.repeat(4, 1), alpha * flat, var)
    bayes = forward + bed.marginal_log_prob(flat, path.a(tp), path.s(tp)) - bed.marginal_log_prob(x, path.a(tt),
                                                                                                   path.s(tt)).repeat(4)
    torch.testing.assert_close(kernel.log_prob(x_prev).reshape(-1), bayes, rtol=1e-8, atol=1e-8)


def test_kernel_integrates_to_one_and_draws_match_its_moments(mix2d, linear_path, gen):
    """2-D: the kernel's density sums to 1 on a plain 601² trapezoid grid over [−6, 6]² (to 1e-8); 40 000 draws
    have its mean (5 standard errors); its moment-matched KL by quadrature and by Monte Carlo (20 000 draws)
    agree within 5 standard errors, on a one-step jump T → 0 where the kernel is the four-blob posterior."""
    x = _x_t(mix2d, linear_path, 1000, n=3)
    for t_prev in (0, 500):
        kernel = reverse_kernel(mix2d, linear_path, x, 1000, t_prev)
        u = torch.linspace(-6, 6, 601, dtype=torch.float64)
        grid = torch.cartesian_prod(u, u).unsqueeze(1).expand(-1, 3, 2)
        mass = kernel.log_prob(grid).exp().sum(0) * float(u[1] - u[0]) ** 2
        torch.testing.assert_close(mass, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-8)
        n = 40_000
        draws = kernel.sample(gen, n)
        mean, cov = kernel.moments()
        assert ((draws.mean(0) - mean).abs() <= 5 * (torch.diagonal(cov, dim1=-2, dim2=-1) / n).sqrt()).all()
    kl_q, mass_q = kernel.kl_to_gaussian_quadrature()
    kl_mc, se = reverse_kernel(mix2d, linear_path, x, 1000, 0).kl_to_gaussian(20_000, gen)
    kl_q0, _ = reverse_kernel(mix2d, linear_path, x, 1000, 0).kl_to_gaussian_quadrature()
    torch.testing.assert_close(mass_q, torch.ones(3, dtype=torch.float64), rtol=0, atol=1e-10)
    assert ((kl_mc - kl_q0).abs() <= 5 * se).all() and (kl_q0 > 1.0).all()  # four well-separated blobs: far from Gaussian
    assert (kl_q >= -1e-12).all() and (kl_q < kl_q0).all()  # the half-way kernel is closer to Gaussian


def test_kernel_of_a_gaussian_bed_is_gaussian(bed16, linear_path):
    """One component: the kernel is its own moment-matched Gaussian, so the Monte-Carlo KL is 0 to rounding."""
    x = _x_t(bed16, linear_path, 800, n=2)
    kl, se = reverse_kernel(bed16, linear_path, x, 800, 100).kl_to_gaussian(200, torch.Generator().manual_seed(0))
    assert (kl.abs() < 1e-9).all()


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exact_kernel_sampler_is_exact_on_a_gaussian_bed(bed16, linear_path, steps):
    """The law of the exact-kernel sampler from x_T ~ p_T, propagated exactly (chain_pushforward), is the data's:
    KL < 1e-10 nats with 1, 2 and 4 steps (DDPM with 4 steps: 5.4 nats; benchmarks/results/accuracy.json)."""
    T = torch.tensor(1000)
    a, s = linear_path.a(T), linear_path.s(T)
    g = torch.Generator().manual_seed(3)
    den = X0DrawDenoiser(oracle_x0_sampler(bed16, linear_path), linear_path, g)
    mean, cov = chain_pushforward(den, discrete_timesteps(1000, steps), ddpm_step, a * bed16.means[0],
                                  a**2 * bed16.covs[0] + s**2 * torch.eye(16, dtype=torch.float64), generator=g)
    assert float(bed16.kl_from_gaussian(mean, cov)) < 1e-10


def _sw2(x, y):
    return sliced_wasserstein2(x, y, 128, torch.Generator().manual_seed(7))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_exact_kernel_sampler_reaches_the_floor_on_a_mixture(mix2d, linear_path, steps):
    """Four 2-D blobs, 2000 samples: sliced W2 to fresh data is below twice the data-vs-data floor at the same n
    (the floor is the mean of three data-vs-data pairs; single pairs measured 0.09–0.20, dominated by the
    multinomial spread of the blob counts; sampler-vs-data over seeds 0.08–0.20). DDPM with 4 steps: 0.42, with 1 step: 1.4."""
    g = torch.Generator().manual_seed(steps)
    n = 2000
    x_T = sample_marginal(mix2d, linear_path, n, 1000, g)
    out = sample_exact_kernel(mix2d, linear_path, x_T, discrete_timesteps(1000, steps), g)
    assert out.nfe == steps
    ref = mix2d.sample(n, g, dtype=torch.float64)
    floor = sum(_sw2(mix2d.sample(n, g, dtype=torch.float64), ref) for _ in range(3)) / 3
    assert _sw2(out.x, ref) < 2 * floor


def test_class_conditional_exact_kernel_sampler(mix2d, linear_path, gen):
    """With y, every draw lands on the blob of class y (blob std 0.3, blobs 2.8 apart: within 1.4 of its mean)."""
    x_T = sample_marginal(mix2d, linear_path, 500, 1000, gen)
    y = torch.arange(500) % 4
    out = sample_exact_kernel(mix2d, linear_path, x_T, discrete_timesteps(1000, 2), gen, y=y)
    assert ((out.x - mix2d.means[y]).norm(dim=-1) < 1.4).all()


def test_chain_pushforward_matches_affine_pushforward_and_ddim_eta1_is_ddpm(bed16, linear_path):
    """Deterministic DDIM: chain_pushforward's law equals affine_pushforward's (1e-10). DDIM with η = 1 and DDPM
    with β̃ are the same Gaussian step (SPEC §5), so their exact output laws agree to 1e-10."""
    from difflab.samplers import sample_ddim

    den, grid = bed16.denoiser(linear_path), discrete_timesteps(1000, 10)
    start = (torch.zeros(16, dtype=torch.float64), torch.eye(16, dtype=torch.float64))
    mean, cov = chain_pushforward(den, grid, ddim_step, *start)
    ref_mean, ref_cov = affine_pushforward(lambda x: sample_ddim(den, x, timesteps=grid).x, 16)
    torch.testing.assert_close((mean, cov), (ref_mean, ref_cov), rtol=1e-10, atol=1e-10)
    ddpm = chain_pushforward(den, grid, ddpm_step, *start)
    ddim1 = chain_pushforward(den, grid, partial(ddim_step, eta=1.0), *start)
    torch.testing.assert_close(ddpm, ddim1, rtol=1e-10, atol=1e-10)


def test_exact_ddpm_1000_kl_agrees_with_monte_carlo(bed16, linear_path, gen):
    """SPEC §3. The exact KL of DDPM with all 1000 steps (6.1e-4 nats) and the Monte-Carlo KL of a Gaussian fit to
    2000 of its samples differ by less than twice that estimate's floor (the same estimate for 2000 data samples;
    ≈ 0.013 nats, mostly its upward bias D(D+3)/(4n) = 0.038 shrunk by the fit): the exact number is the one
    the Monte Carlo cannot resolve. Also the exact KL falls from 10 to 1000 steps."""
    from difflab.samplers import sample_ddpm

    den = bed16.denoiser(linear_path)
    prior = (torch.zeros(16, dtype=torch.float64), torch.eye(16, dtype=torch.float64))
    exact = float(bed16.kl_from_gaussian(*chain_pushforward(den, discrete_timesteps(1000, 1000), ddpm_step, *prior)))
    exact10 = float(bed16.kl_from_gaussian(*chain_pushforward(den, discrete_timesteps(1000, 10), ddpm_step, *prior)))
    n = 2000
    out = sample_ddpm(den, linear_path.prior_sample((n, 16), gen, dtype=torch.float64), generator=gen)
    mc = float(bed16.kl_from_gaussian(*fit_gaussian(out.x)))
    floor = float(bed16.kl_from_gaussian(*fit_gaussian(bed16.sample(n, gen, dtype=torch.float64))))
    assert 0 < exact < floor and abs(mc - exact) < 2 * floor
    assert exact10 > 1.0 > 100 * exact


def test_chain_pushforward_refuses_a_step_that_is_not_affine_gaussian(bed16):
    """The predictor–corrector's Langevin step scales its noise by batch norms: not affine, refused."""
    path = DiscreteTimeContinuation(DiscretePath.from_schedule("linear", T=1000))
    den = bed16.denoiser(path)

    def corrector(path, x, pred, t, t_next, generator):
        return langevin_step(path, x, pred, t, 0.16, generator)

    with pytest.raises(ValueError, match="not affine"):
        chain_pushforward(den, torch.tensor([1.0, 0.5]), corrector, torch.zeros(16), torch.eye(16))


def test_exact_euler_maruyama_kl_agrees_with_monte_carlo(bed16, linear_path, gen):
    """SPEC §6. Euler–Maruyama with 10 uniform steps (the pipeline's `sde` sampler): exact KL within twice the
    Monte-Carlo floor of a Gaussian fit to 2000 of its samples (benchmarks/results/accuracy.json: 0.61 nats by
    Monte Carlo at n = 4000)."""
    from difflab.samplers.sde import sample_euler_maruyama
    from difflab.samplers.time_grids import uniform_t

    path = DiscreteTimeContinuation(linear_path)
    den, grid = bed16.denoiser(path), uniform_t(path, 10)
    exact = float(bed16.kl_from_gaussian(*chain_pushforward(den, grid, euler_maruyama_step,
                                                            torch.zeros(16, dtype=torch.float64),
                                                            torch.eye(16, dtype=torch.float64))))
    n = 2000
    out = sample_euler_maruyama(den, path.prior_sample((n, 16), gen, dtype=torch.float64), grid, generator=gen)
    mc = float(bed16.kl_from_gaussian(*fit_gaussian(out.x)))
    floor = float(bed16.kl_from_gaussian(*fit_gaussian(bed16.sample(n, gen, dtype=torch.float64))))
    assert 0.3 < exact and abs(mc - exact) < 2 * floor
