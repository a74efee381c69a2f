"""SPEC §6: continuous paths — derivatives, the SDE view (f, g²) reproducing the marginals, the log-SNR
inverse, the prior density, and the exact continuation of discrete DDPM time."""

import math

import pytest
import torch

from difflab.paths import (ContinuousPath, DiscretePath, DiscreteTimeContinuation, EDMPath, LinearPath, SplineTimeContinuation,
                           SubVPPath, TrigPath, VEPath, VPCosinePath, VPPath)
from difflab.utils import randn

PATHS = {
    "vp": VPPath(),
    "vp_cosine": VPCosinePath(),
    "sub_vp": SubVPPath(),
    "ve": VEPath(),
    "edm": EDMPath(),
    "linear": LinearPath(),
    "trig": TrigPath(),
    "ddpm_continuation": DiscreteTimeContinuation(DiscretePath.from_schedule("linear", T=1000)),
    "cosine_continuation": DiscreteTimeContinuation(DiscretePath.from_schedule("cosine", T=100)),
    "ddpm_spline": SplineTimeContinuation(DiscretePath.from_schedule("linear", T=1000)),
}


def interior(path, n=9):
    """Interior times, off the continuation's integer-step kinks (where its derivative is one-sided)."""
    lo, hi = float(path.t_min), float(path.t_max)
    u = torch.linspace(0.07, 0.93, n, dtype=torch.float64) + 0.0123 / n
    return lo + (hi - lo) * u


def central(fn, t, h):
    return (fn(t + h) - fn(t - h)) / (2 * h)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_derivatives_match_finite_differences(name):
    """ȧ, ṡ against central differences; step 1e-6·range, so the truncation error is ~1e-12 relative and
    rounding ~1e-10: tolerance 1e-6 relative."""
    path = PATHS[name]
    t = interior(path)
    h = 1e-6 * (float(path.t_max) - float(path.t_min))
    torch.testing.assert_close(path.a_dot(t), central(path.a, t, h), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(path.s_dot(t), central(path.s, t, h), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", sorted(PATHS))
def test_drift_and_diffusion_reproduce_the_marginals(name):
    """The linear SDE dx = f_coef·x dt + g dW carries x0 to N(a x0, s²): its mean obeys da/dt = f_coef·a and its
    variance d(s²)/dt = 2 f_coef s² + g². Both ODEs are integrated with RK4 (400 steps) between two interior
    times and must land on a(t2), s(t2)² to 1e-7 relative (RK4's error at this step is far below that).
    On a continuation the coefficients are smooth only between integer steps, so the endpoints sit on steps
    and every RK4 step stays inside one segment."""
    path = PATHS[name]
    t1, t2 = interior(path, 2).tolist()
    n = 400
    segment = None
    if isinstance(path, DiscreteTimeContinuation):
        k1 = round(t1 * path.T)
        k2 = min(round(t2 * path.T), k1 + 40)  # 40 segments are plenty, and keep the test fast
        t1, t2, n = k1 / path.T, k2 / path.T, 8 * (k2 - k1)
        segment = 1.0 / path.T
    h = (t2 - t1) / n
    state = {"lo": t1}

    def at(t):  # on a continuation, keep each RK4 stage inside the current segment despite float rounding
        if segment is None:
            return torch.tensor(t, dtype=torch.float64)
        lo = state["lo"]
        return torch.tensor(min(max(t, lo + 1e-12), lo + segment - 1e-12), dtype=torch.float64)

    f = lambda t: float(path.f_coef(at(t)))  # noqa: E731
    g2 = lambda t: float(path.g2(at(t)))  # noqa: E731
    mean_rhs = lambda t, m: f(t) * m  # noqa: E731
    var_rhs = lambda t, v: 2 * f(t) * v + g2(t)  # noqa: E731
    m, v, t = float(path.a(torch.tensor(t1, dtype=torch.float64))), float(path.s(torch.tensor(t1, dtype=torch.float64))) ** 2, t1
    for i in range(n):
        if segment is not None:
            state["lo"] = t1 + (i // 8) * segment
        km = [mean_rhs(t, m)]
        kv = [var_rhs(t, v)]
        for c in (0.5, 0.5, 1.0):
            km.append(mean_rhs(t + c * h, m + c * h * km[-1]))
            kv.append(var_rhs(t + c * h, v + c * h * kv[-1]))
        m += h / 6 * (km[0] + 2 * km[1] + 2 * km[2] + km[3])
        v += h / 6 * (kv[0] + 2 * kv[1] + 2 * kv[2] + kv[3])
        t += h
    assert m == pytest.approx(float(path.a(torch.tensor(t2, dtype=torch.float64))), rel=1e-7, abs=1e-12)
    assert v == pytest.approx(float(path.s(torch.tensor(t2, dtype=torch.float64))) ** 2, rel=1e-7)


@pytest.mark.parametrize("name", ["vp", "sub_vp", "ve", "vp_cosine"])
def test_forward_sde_monte_carlo(name, gen):
    """Simulate the forward SDE by Euler–Maruyama (20k particles, 1000 steps) from x0 ~ N(1, 0.25) at t1 to t2;
    the mean a(t2)/a(t1)·E[x_t1] and variance must match the path's marginal within 5 standard errors
    (MC s.e. of the mean √(var/N), of the variance var·√(2/N)) plus EM's O(dt) bias (< 1e-3)."""
    path = PATHS[name]
    t1, t2 = interior(path, 2).tolist()
    n_par, n_steps = 20000, 1000
    x0 = 1.0 + 0.5 * randn((n_par,), gen, dtype=torch.float64)
    x = path.sample(x0, torch.tensor(t1, dtype=torch.float64), generator=gen)[0]
    dt = (t2 - t1) / n_steps
    for i in range(n_steps):
        t = torch.tensor(t1 + i * dt, dtype=torch.float64)
        x = x + path.f_coef(t) * x * dt + (path.g2(t) * dt).sqrt() * randn((n_par,), gen, dtype=torch.float64)
    a2, s2 = float(path.a(torch.tensor(t2, dtype=torch.float64))), float(path.s(torch.tensor(t2, dtype=torch.float64)))
    mean, var = a2 * 1.0, a2**2 * 0.25 + s2**2
    assert abs(float(x.mean()) - mean) < 5 * math.sqrt(var / n_par) + 1e-3 * (abs(mean) + 1)
    assert abs(float(x.var()) - var) < 5 * var * math.sqrt(2 / n_par) + 1e-3 * var


@pytest.mark.parametrize("name", ["sub_vp", "vp_cosine", "ddpm_continuation"])
def test_closed_form_g2_equals_the_generic_formula(name):
    """Paths that override g² (to stay finite at the clean end) must agree with d(s²)/dt − 2(ȧ/a)s² inside."""
    path = PATHS[name]
    t = interior(path)
    torch.testing.assert_close(path.g2(t), ContinuousPath.g2(path, t), rtol=1e-10, atol=1e-12)


def test_sub_vp_is_song_et_al():
    """Song et al. 2021 eq. 29: sub-VP variance (1 − e^{−B})² and g² = β(1 − e^{−2B}), B = ∫β."""
    path, t = SubVPPath(), torch.linspace(0.01, 1.0, 7, dtype=torch.float64)
    B = 0.1 * t + 0.5 * (20.0 - 0.1) * t**2
    torch.testing.assert_close(path.s(t) ** 2, (1 - torch.exp(-B)) ** 2)
    torch.testing.assert_close(path.g2(t), (0.1 + t * 19.9) * (1 - torch.exp(-2 * B)))


@pytest.mark.parametrize("name", sorted(PATHS))
def test_log_snr_inverse(name):
    path = PATHS[name]
    t = interior(path, 25)
    torch.testing.assert_close(path.t_from_log_snr(path.log_snr(t)), t, rtol=1e-9, atol=1e-12)
    lam_noise, lam_clean = path.log_snr_range()
    assert float(path.t_from_log_snr(torch.tensor(lam_noise, dtype=torch.float64))) == pytest.approx(float(path.t_max))
    if math.isfinite(lam_noise):
        with pytest.raises(ValueError):
            path.t_from_log_snr(torch.tensor(lam_noise - 1.0, dtype=torch.float64))
    if path.clean_time() is not None:
        assert float(path.t_from_sigma_bar(0.0)) == path.clean_time()
        assert float(path.s(torch.tensor(path.clean_time(), dtype=torch.float64))) == 0.0


def test_clean_ends():
    assert VEPath().clean_time() is None
    assert all(PATHS[n].clean_time() == 0.0 for n in PATHS if n != "ve")


@pytest.mark.parametrize("name", sorted(PATHS))
def test_prior_logp_is_the_density_of_prior_sample(name, gen):
    path = PATHS[name]
    x = path.prior_sample((5, 3), gen, dtype=torch.float64)
    std = path.prior_std()
    expected = torch.distributions.Normal(0.0, std).log_prob(x).sum(-1)
    torch.testing.assert_close(path.prior_logp(x), expected)


@pytest.mark.parametrize("cls", [DiscreteTimeContinuation, SplineTimeContinuation])
@pytest.mark.parametrize("schedule,zero_terminal_snr", [("linear", False), ("cosine", False), ("sigmoid", False),
                                                        ("linear", True), ("cosine", True)])
def test_continuation_is_exact_at_integer_steps(schedule, zero_terminal_snr, cls):
    """At t = k/T the continuation's a, s equal the discrete ᾱ table (to float64 rounding); network_time is k."""
    discrete = DiscretePath.from_schedule(schedule, T=200, zero_terminal_snr=zero_terminal_snr)
    path = cls(discrete)
    k = torch.arange(0, 201)
    t = k.double() / 200
    torch.testing.assert_close(path.a(t), discrete.a(k), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(path.s(t), discrete.s(k), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(path.network_time(t), k.double())
    assert path.zero_terminal_snr == zero_terminal_snr


def test_continuation_interpolates_log_snr_linearly():
    """Between steps k and k+1 the log-SNR is the linear interpolation (diffusers' log-σ interpolation);
    on the first segment σ̄ = s/a is linear in the fractional step instead (λ_0 = +∞)."""
    discrete = DiscretePath.from_schedule("linear", T=100)
    path = DiscreteTimeContinuation(discrete)
    lam = discrete.log_snr(torch.arange(0, 101))
    u = torch.tensor([3.25, 50.5, 98.75], dtype=torch.float64)
    k, w = u.floor().long(), u - u.floor()
    torch.testing.assert_close(path.log_snr(u / 100), (1 - w) * lam[k] + w * lam[k + 1])
    sigma_1 = float(discrete.s(torch.tensor(1)) / discrete.a(torch.tensor(1)))
    torch.testing.assert_close(path.sigma_bar(torch.tensor([0.0025, 0.005])),
                               torch.tensor([0.25 * sigma_1, 0.5 * sigma_1], dtype=torch.float64))


def test_continuation_derivatives_are_finite_at_both_ends():
    path = DiscreteTimeContinuation(DiscretePath.from_schedule("linear", T=100, zero_terminal_snr=True))
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    assert torch.isfinite(path.a_dot(t)).all() and torch.isfinite(path.s_dot(t)).all()


def test_bad_arguments():
    with pytest.raises(ValueError):
        VEPath(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError):
        EDMPath(sigma_min=0.0)
    with pytest.raises(ValueError):
        VPCosinePath(t_max=1.0)
    with pytest.raises(ValueError):
        DiscreteTimeContinuation(VPPath())
