"""SPEC §3: the ELBO term by term, the simplified loss and its weightings, bits/dim."""

import math

import pytest
import torch

from difflab import DiscretePath, GaussianMixtureBed, NetworkDenoiser, gaussian
from difflab.elbo import bits_per_dim, decoder_nll, elbo_terms, prior_kl, term_kl
from difflab.losses import WEIGHTINGS, diffusion_loss, eps_space_weight
from difflab.parameterization import from_x0_eps
from difflab.utils import sum_except_batch

PATH = DiscretePath.from_schedule("linear", T=1000)


class NoisyEps:
    """A deliberately imperfect ε-model: the exact bed ε plus a fixed offset, so the KL terms are non-trivial."""

    def __init__(self, bed, path, offset=0.1, learned=None):
        self.exact, self.path, self.offset, self.learned = bed.denoiser(path), path, offset, learned

    def __call__(self, x, t, **cond):
        from difflab.parameterization import Prediction, to_x0_eps
        eps = self.exact(x, t).eps + self.offset
        x0, eps = to_x0_eps(eps, x, t, self.path, "eps")
        v = None if self.learned is None else torch.full_like(x, self.learned)
        return Prediction(x0, eps, v)


@pytest.fixture
def bed():
    return GaussianMixtureBed(torch.zeros(1, 4, dtype=torch.float64), torch.full((1, 4), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("t", [2, 50, 700])
def test_L_t_closed_form_is_the_weighted_eps_error(bed, t):
    """With σ² = β̃_t: L_{t−1} = β_t²/(2σ²α_t(1−ᾱ_t))·||ε − ε_θ||² exactly (SPEC §3)."""
    g = torch.Generator().manual_seed(0)
    model = NoisyEps(bed, PATH)
    x0 = bed.sample(8, g, dtype=torch.float64)
    eps = torch.randn(8, 4, generator=g, dtype=torch.float64)
    kl = term_kl(model, x0, t, "beta_tilde", eps=eps)
    x_t, _ = PATH.sample(x0, torch.full((8,), t), eps)
    eps_theta = model(x_t, torch.full((8,), t)).eps
    beta, alpha, ab = PATH.betas[t], PATH.alphas[t], PATH.alpha_bar[t]
    sigma2 = PATH.posterior_variance(torch.tensor(t))
    ref = beta**2 / (2 * sigma2 * alpha * (1 - ab)) * sum_except_batch((eps - eps_theta) ** 2)
    torch.testing.assert_close(kl, ref, rtol=1e-8, atol=1e-12)
    # σ² = β_t adds the variance term ½D(β̃/β − 1 − log(β̃/β)) and rescales the mean term.
    kl_beta = term_kl(model, x0, t, "beta", eps=eps)
    r = float(sigma2 / beta)
    ref_beta = ref * r + 0.5 * 4 * (r - 1 - math.log(r))
    torch.testing.assert_close(kl_beta, ref_beta, rtol=1e-8, atol=1e-12)


def test_L_t_matches_monte_carlo_kl(bed):
    """The closed-form KL against E_q[log q − log p] over 200k draws of x_{t−1} (tolerance 5 standard errors)."""
    g = torch.Generator().manual_seed(1)
    model = NoisyEps(bed, PATH, offset=0.3, learned=0.3)
    t = 30
    x0 = bed.sample(1, g, dtype=torch.float64)
    eps = torch.randn(1, 4, generator=g, dtype=torch.float64)
    tt = torch.tensor([t])
    x_t, _ = PATH.sample(x0, tt, eps)
    for variance in ("beta_tilde", "beta", "learned"):
        closed = float(term_kl(model, x0, t, variance, eps=eps))
        mean_q, var_q = PATH.posterior(x_t, x0, tt, tt - 1)
        pred = model(x_t, tt)
        mean_p, _ = PATH.posterior(x_t, pred.x0, tt, tt - 1)
        from difflab.samplers.ancestral import ddpm_variance
        var_p = ddpm_variance(PATH, pred, tt, tt - 1, variance)
        var_p = var_p if var_p.ndim > 1 else var_p.reshape(1, 1)
        draws = mean_q + var_q.sqrt() * torch.randn(200_000, 4, generator=g, dtype=torch.float64)
        diff = gaussian.log_normal_diag(draws, mean_q.expand_as(draws), var_q.expand_as(draws)) - \
            gaussian.log_normal_diag(draws, mean_p.expand_as(draws), var_p.expand_as(draws))
        assert abs(float(diff.mean()) - closed) < 5 * float(diff.std()) / math.sqrt(200_000) + 1e-9


def test_elbo_of_exact_model_bounds_true_nll(bed16):
    """On the 16-D bed (T=1000, σ² = β_t) the ELBO upper-bounds −log p(x0) and is within 0.03 bits/dim of it.

    Measured gap: +0.012 bits/dim on 1000 examples. The bound holds in expectation; we allow 3 standard errors
    of the per-example (ELBO − NLL) mean below zero for Monte-Carlo noise."""
    g = torch.Generator().manual_seed(0)
    x0 = bed16.sample(400, g, dtype=torch.float64)
    terms = elbo_terms(bed16.denoiser(PATH), x0, variance="beta", generator=g)
    assert set(terms) == {"L_T", "L_mid", "L_0", "total"} and all(v.shape == (400,) for v in terms.values())
    gap = bits_per_dim(terms["total"] + bed16.log_prob(x0), 16)
    se = float(gap.std()) / math.sqrt(400)
    assert float(gap.mean()) > -3 * se
    assert float(gap.mean()) < 0.03


def test_prior_term_and_decoder(bed):
    x0 = torch.full((2, 4), 0.5, dtype=torch.float64)
    T = torch.tensor(1000)
    a, s = float(PATH.a(T)), float(PATH.s(T))
    ref = 0.5 * 4 * (s**2 + (a * 0.5) ** 2 - 1 - math.log(s**2))
    torch.testing.assert_close(prior_kl(PATH, x0), torch.full((2,), ref, dtype=torch.float64))
    # Discretised decoder on 8-bit data: a probability, so −log p ≥ 0.
    img = (torch.randint(0, 256, (3, 1, 2, 2)).double() / 127.5 - 1.0)
    flat = GaussianMixtureBed(torch.zeros(1, 4, dtype=torch.float64), torch.full((1, 4), 0.3, dtype=torch.float64),
                              shape=(1, 2, 2))
    nll = decoder_nll(flat.denoiser(PATH), img, decoder="discretized", generator=torch.Generator().manual_seed(0))
    assert nll.shape == (3,) and (nll >= 0).all()


def test_bits_per_dim():
    assert float(bits_per_dim(torch.tensor(math.log(2.0) * 10), 10)) == pytest.approx(1.0)


@pytest.mark.parametrize("target", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_every_loss_is_a_weighted_eps_mse(target, weighting):
    """Each (target, weighting) loss equals w(t)·mean||ε − ε̂||² with the documented ε-space weight."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(16, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(16, 3, generator=g, dtype=torch.float64)
    t = torch.randint(1, 1001, (16,), generator=g)
    x_t, _ = PATH.sample(x0, t, eps)
    err = 0.1 * torch.randn(16, 3, generator=g, dtype=torch.float64)  # a fixed ε-error of the "network"
    out = from_x0_eps((x_t - PATH.s(t).unsqueeze(-1) * (eps + err)) / PATH.a(t).unsqueeze(-1), eps + err, x_t, t, PATH, target)
    net = lambda x, tt, **_: out  # noqa: E731
    loss = diffusion_loss(NetworkDenoiser(net, PATH, target), x0, weighting, t=t, eps=eps)
    w = eps_space_weight(PATH, t, target, weighting)
    torch.testing.assert_close(loss, w * (err**2).mean(-1), rtol=1e-7, atol=1e-12)


def test_simple_loss_is_zero_for_the_exact_noise():
    x0 = torch.randn(4, 2, dtype=torch.float64)
    eps = torch.randn(4, 2, dtype=torch.float64)
    loss = diffusion_loss(NetworkDenoiser(lambda x, t: eps, PATH, "eps"), x0, eps=eps)
    assert float(loss.abs().max()) == 0.0
