"""SPEC §2: schedules, the forward process, its closed-form marginal and the exact reverse posterior."""

import math

import pytest
import torch

from difflab import DiscretePath, gaussian, schedules


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_schedules_are_valid(name):
    betas = schedules.make_betas(name, T=1000)
    assert betas.shape == (1000,) and betas.dtype == torch.float64
    assert (betas > 0).all() and (betas < 1).all()
    path = DiscretePath(betas)
    ab = path.alpha_bar
    assert ab[0] == 1.0 and (ab[1:] < ab[:-1]).all(), "ᾱ must start at 1 and decrease"
    torch.testing.assert_close(ab[1:], torch.cumprod(1 - betas, 0))


def test_linear_schedule_endpoints():
    betas = schedules.linear(1000)
    assert math.isclose(float(betas[0]), 1e-4) and math.isclose(float(betas[-1]), 0.02)


def test_cosine_alpha_bar_closed_form():
    """Nichol & Dhariwal eq. 17: ᾱ_t = f(t)/f(0) wherever β is not clipped."""
    T, s = 1000, 0.008
    path = DiscretePath(schedules.cosine(T, s))
    t = torch.arange(0, 900, dtype=torch.float64)
    f = torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
    torch.testing.assert_close(path.alpha_bar[t.long()], f / f[0], rtol=1e-9, atol=1e-12)


def test_zero_terminal_snr_rescale():
    betas = schedules.make_betas("linear", 1000, zero_terminal_snr=True)
    path = DiscretePath(betas)
    assert float(path.alpha_bar[-1]) == pytest.approx(0.0, abs=1e-20)
    assert float(path.snr(torch.tensor(1000))) == pytest.approx(0.0, abs=1e-20)
    orig = DiscretePath(schedules.linear(1000))
    assert float(path.alpha_bar[1]) == pytest.approx(float(orig.alpha_bar[1]), rel=1e-12)


def test_custom_schedule_validation():
    with pytest.raises(ValueError):
        schedules.custom([0.1, -0.2])
    with pytest.raises(ValueError):
        schedules.custom([1.0, 0.2])
    with pytest.raises(ValueError):
        schedules.make_betas("quadratic")
    assert DiscretePath(schedules.custom([0.1, 0.2, 0.3])).T == 3


def test_composed_transitions_match_closed_form_marginal(gen):
    """Running q(x_t|x_{t-1}) t times from a fixed x0 gives N(√ᾱ_t x0, (1−ᾱ_t) I).

    200k chains in float64; the sample mean must be within 5 standard errors, the variance within 2%.
    """
    path = DiscretePath(schedules.linear(50))
    x0 = torch.tensor([1.5, -0.7], dtype=torch.float64).expand(200_000, 2)
    x = x0.clone()
    for t in range(1, 51):
        x = path.transition(x, t, gen)
        if t in (1, 10, 50):
            mean, var = path.marginal(x0[:1], torch.tensor(t))
            se = var.sqrt() / math.sqrt(x.shape[0])
            assert ((x.mean(0) - mean[0]).abs() < 5 * se[0]).all()
            torch.testing.assert_close(x.var(0), var[0].expand(2), rtol=0.02, atol=0)


def test_posterior_matches_spec_formula(linear_path):
    """μ̃_t and β̃_t of SPEC §2, written out, equal the path's generic posterior for consecutive steps."""
    p = linear_path
    t = torch.tensor([2, 10, 500, 1000])
    ab, ab_prev, beta, alpha = p.alpha_bar[t], p.alpha_bar[t - 1], p.betas[t], p.alphas[t]
    c_x0, c_xt, var = p.posterior_coefficients(t, t - 1)
    torch.testing.assert_close(c_x0, ab_prev.sqrt() * beta / (1 - ab))
    torch.testing.assert_close(c_xt, alpha.sqrt() * (1 - ab_prev) / (1 - ab))
    torch.testing.assert_close(var, (1 - ab_prev) / (1 - ab) * beta)
    torch.testing.assert_close(p.posterior_variance(t), var)


def test_posterior_is_the_bayes_product(linear_path, gen):
    """q(x_{t-1}|x_t,x0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x0): compare with the explicit precision-weighted product."""
    p = linear_path
    for t in [2, 37, 999]:
        x0 = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        x_t = torch.randn(4, 3, generator=gen, dtype=torch.float64)
        tt = torch.full((4,), t)
        mean, var = p.posterior(x_t, x0, tt, tt - 1)
        # q(x_t | x_{t-1}) as a density in x_{t-1}: N(x_{t-1}; x_t/√α_t, β_t/α_t)
        alpha, beta, ab_prev = p.alphas[t], p.betas[t], p.alpha_bar[t - 1]
        m_ref, v_ref = gaussian.product_diag(x_t / alpha.sqrt(), beta / alpha, ab_prev.sqrt() * x0, 1 - ab_prev)
        torch.testing.assert_close(mean, m_ref, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(var.expand_as(mean), torch.as_tensor(v_ref).expand_as(mean), rtol=1e-9, atol=0)


def test_posterior_monte_carlo(gen):
    """Draw (x_{t-1}, x_t) jointly given x0 and regress: E[x_{t-1} | x_t] is linear with the posterior coefficients."""
    p = DiscretePath(schedules.linear(100))
    t = 40
    x0 = torch.full((400_000, 1), 0.8, dtype=torch.float64)
    x_prev, _ = p.sample(x0, torch.tensor(t - 1), generator=gen)
    x_t = p.transition(x_prev, t, gen)
    A = torch.cat([x_t, torch.ones_like(x_t)], 1)
    coef = torch.linalg.lstsq(A, x_prev).solution
    c_x0, c_xt, var = p.posterior_coefficients(torch.tensor(t), torch.tensor(t - 1))
    assert abs(float(coef[0]) - float(c_xt)) < 5e-3
    assert abs(float(coef[1]) - float(c_x0) * 0.8) < 5e-3
    resid = x_prev - A @ coef
    assert abs(float(resid.var()) / float(var) - 1) < 0.02


def test_discrete_time_bounds(linear_path):
    with pytest.raises(ValueError):
        linear_path.a(torch.tensor([1001]))
    assert float(linear_path.a(torch.tensor(0))) == 1.0 and float(linear_path.s(torch.tensor(0))) == 0.0
