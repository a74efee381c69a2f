"""SPEC §3, §5: DDPM and DDIM — a contract every sampler passes, and accuracy on the exact Gaussian bed."""

from functools import partial

import pytest
import torch

from difflab import DiscretePath, GaussianMixtureBed, sample_ddim, sample_ddpm
from difflab.samplers import discrete_timesteps
from difflab.samplers.ddim import ddim_step
from difflab.samplers.ancestral import ddpm_step
from difflab.testbeds import affine_pushforward, fit_gaussian

PATH = DiscretePath.from_schedule("linear", T=200)

SAMPLERS = {
    "ddpm_beta_tilde": partial(sample_ddpm, variance="beta_tilde"),
    "ddpm_beta": partial(sample_ddpm, variance="beta"),
    "ddpm_respaced": partial(sample_ddpm, steps=25),
    "ddim_eta0": partial(sample_ddim, steps=20),
    "ddim_eta1": partial(sample_ddim, steps=20, eta=1.0),
    "ddim_leading": partial(sample_ddim, steps=20, spacing="leading"),
    "ddim_linspace": partial(sample_ddim, steps=20, spacing="linspace", eta=0.5),
}
EXPECTED_NFE = {"ddpm_beta_tilde": 200, "ddpm_beta": 200, "ddpm_respaced": 25}
STOCHASTIC = {"ddpm_beta_tilde", "ddpm_beta", "ddpm_respaced", "ddim_eta1", "ddim_linspace"}


class Spy:
    """Wraps a denoiser; records calls and the conditioning it received."""

    def __init__(self, inner):
        self.inner, self.path, self.calls, self.kwargs = inner, inner.path, 0, []

    def __call__(self, x, t, **cond):
        self.calls += 1
        self.kwargs.append(cond)
        assert t.shape == (x.shape[0],)
        return self.inner(x, t)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("shape", [(6, 2), (6, 16), (6, 1, 4, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampler_contract(name, shape, dtype):
    D = 1
    for n in shape[1:]:
        D *= n
    bed = GaussianMixtureBed(torch.zeros(1, D, dtype=torch.float64), torch.full((1, D), 0.25, dtype=torch.float64),
                             shape=shape[1:])
    spy = Spy(bed.denoiser(PATH))
    sampler = SAMPLERS[name]
    x_T = PATH.prior_sample(shape, torch.Generator().manual_seed(0), dtype=dtype)
    out = sampler(spy, x_T, generator=torch.Generator().manual_seed(1), context="ctx")
    assert out.x.shape == shape and out.x.dtype == dtype and out.x.device == x_T.device
    assert torch.isfinite(out.x).all()
    assert out.nfe == spy.calls == EXPECTED_NFE.get(name, 20)
    assert all(k == {"context": "ctx"} for k in spy.kwargs), "conditioning must reach every call unchanged"
    again = sampler(bed.denoiser(PATH), x_T, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(again.x, out.x, rtol=0, atol=0)  # same generator seed, same samples
    other = sampler(bed.denoiser(PATH), x_T, generator=torch.Generator().manual_seed(2))
    assert (not torch.equal(other.x, out.x)) == (name in STOCHASTIC)


@pytest.mark.parametrize("spacing", ["linspace", "leading", "trailing"])
@pytest.mark.parametrize("T,steps", [(1000, 1), (1000, 10), (1000, 50), (1000, 999), (1000, 1000), (10, 3), (7, 7)])
def test_grids_start_at_T_and_end_at_0(spacing, T, steps):
    grid = discrete_timesteps(T, steps, spacing)
    assert grid[0] == T and grid[-1] == 0 and len(grid) == steps + 1
    assert (grid[:-1] > grid[1:]).all()


def test_grid_errors():
    with pytest.raises(ValueError):
        discrete_timesteps(100, 101)
    with pytest.raises(ValueError):
        discrete_timesteps(100, 0)
    with pytest.raises(ValueError):
        discrete_timesteps(100, 10, "quadratic")


def test_last_step_returns_x0_hat():
    """Both transitions land exactly on x̂0 at t' = 0 (ᾱ_0 = 1)."""
    bed = GaussianMixtureBed(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    x = torch.randn(5, 2, dtype=torch.float64)
    t, t0 = torch.full((5,), 3), torch.zeros(5, dtype=torch.long)
    pred = bed.denoiser(PATH)(x, t)
    for step in (partial(ddim_step, eta=0.0), partial(ddim_step, eta=1.0), ddpm_step, partial(ddpm_step, variance="beta")):
        torch.testing.assert_close(step(PATH, x, pred, t, t0, torch.Generator().manual_seed(0)), pred.x0)


def test_ddim_eta1_single_step_is_the_ddpm_posterior():
    """η = 1 gives the DDPM posterior variance: one DDIM step equals one DDPM(β̃) step with the same noise."""
    bed = GaussianMixtureBed(torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64))
    x = torch.randn(4, 3, dtype=torch.float64)
    t, tn = torch.full((4,), 120), torch.full((4,), 119)
    pred = bed.denoiser(PATH)(x, t)
    a = ddim_step(PATH, x, pred, t, tn, torch.Generator().manual_seed(5), eta=1.0)
    b = ddpm_step(PATH, x, pred, t, tn, torch.Generator().manual_seed(5))
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _exact_ddim_kl(bed, path, steps, spacing="trailing"):
    den = bed.denoiser(path)
    mean, cov = affine_pushforward(lambda x: sample_ddim(den, x, steps=steps, spacing=spacing).x, bed.D,
                                   prior_std=path.prior_std())
    return float(bed.kl_from_gaussian(mean, cov))


def test_ddim_exact_kl_falls_with_steps(bed16):
    """Exact output KL (affine push-forward, no sampling noise) on the 16-D ill-conditioned bed, T=1000.

    Measured (trailing): 10 → 0.81, 20 → 0.22, 50 → 0.036, 1000 → 1.1e-4 nats. Bounds leave a wide margin.
    """
    path = DiscretePath.from_schedule("linear", T=1000)
    kls = {n: _exact_ddim_kl(bed16, path, n) for n in (10, 20, 50, 1000)}
    assert kls[10] > kls[20] > kls[50] > kls[1000]
    assert kls[50] < 0.05 and kls[1000] < 1e-3


def test_ddpm_and_ddim_samples_match_the_truth(bed16):
    """Sampled KL of the fitted Gaussian (N = 6000). Its sampling bias is ≈ D(D+1)/(4N) = 0.011 nats,
    so the thresholds (0.06) sit above noise but far below a wrong sampler (prior vs data: KL > 10)."""
    path = DiscretePath.from_schedule("linear", T=1000)
    den = bed16.denoiser(path)
    g = torch.Generator().manual_seed(0)
    x_T = path.prior_sample((6000, 16), g, dtype=torch.float64)
    for out in (sample_ddpm(den, x_T, generator=g), sample_ddim(den, x_T, steps=1000),
                sample_ddim(den, x_T, steps=50)):
        kl = float(bed16.kl_from_gaussian(*fit_gaussian(out.x)))
        assert kl < 0.06, kl
    assert float(bed16.kl_from_gaussian(*fit_gaussian(x_T))) > 10


def test_ddpm_requires_discrete_path():
    from difflab import VPPath
    bed = GaussianMixtureBed(torch.zeros(1, 2, dtype=torch.float64), torch.ones(1, 2, dtype=torch.float64))
    with pytest.raises(TypeError):
        sample_ddpm(bed.denoiser(VPPath()), torch.randn(2, 2))
    with pytest.raises(ValueError):
        sample_ddim(bed.denoiser(PATH), torch.randn(2, 2), eta=-1)
