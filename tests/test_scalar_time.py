"""A batch that shares one time takes the scalar-coefficient path; it must match the per-element path."""

import pytest
import torch

from difflab import DiscretePath, LinearPath, NetworkDenoiser, TrigPath, VPPath
from difflab.parameterization import TARGETS, Prediction, linear_form
from difflab.paths import DiscreteTimeContinuation, EDMPath, SplineTimeContinuation, VPCosinePath, shared_time
from difflab.samplers.ancestral import ddpm_step
from difflab.samplers.chain import time_tensor
from difflab.samplers.ddim import ddim_step

DISCRETE = DiscretePath.from_schedule("linear", T=1000)
CONTINUOUS = [VPPath(), LinearPath(), TrigPath(), VPCosinePath(), EDMPath(), DiscreteTimeContinuation(DISCRETE),
              DiscreteTimeContinuation(DiscretePath.from_schedule("linear", T=1000, zero_terminal_snr=True)),
              SplineTimeContinuation(DISCRETE),
              SplineTimeContinuation(DiscretePath.from_schedule("linear", T=1000, zero_terminal_snr=True))]
B, D = 6, 3


def linear_net(x, t, **cond):
    w = torch.linspace(-1.0, 1.0, x.shape[1], dtype=x.dtype)
    return 0.3 * x + w * t.to(x.dtype)[:, None] / (1.0 + t.to(x.dtype)[:, None])


def _per_element_and_shared(t_value, other, dtype):
    """``[B+1]`` times (the last one differs: the per-element path) and the tagged ``[B]`` broadcast."""
    t_mixed = torch.tensor([t_value] * B + [other], dtype=dtype)
    return t_mixed, time_tensor(t_value, B, "cpu")


@pytest.mark.parametrize("path", CONTINUOUS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("target", TARGETS)
def test_denoiser_shared_time_matches_per_element(path, target):
    den = NetworkDenoiser(linear_net, path, target)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B + 1, D, generator=g, dtype=torch.float64)
    lo, hi = float(path.t_min), float(path.t_max)
    for frac in (0.02, 0.37, 0.9):
        t = lo + frac * (hi - lo)
        t_mixed, t_b = _per_element_and_shared(t, lo + 0.5 * (hi - lo) + 1e-3, torch.float64)
        ref = den(x, t_mixed)
        for t_arg in (t_b, torch.tensor(t, dtype=torch.float64), torch.full((B,), t, dtype=torch.float64)):
            pred = den(x[:B], t_arg)
            torch.testing.assert_close(pred.x0, ref.x0[:B], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(pred.eps, ref.eps[:B], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_and_ddpm_steps_shared_time_match_per_element(eta):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B + 1, D, generator=g, dtype=torch.float64)
    den = NetworkDenoiser(linear_net, DISCRETE, "eps")
    for t, t_next in ((999, 979), (500, 480), (20, 0)):
        t_mixed = torch.tensor([t] * B + [t - 7])
        t_next_mixed = torch.tensor([t_next] * B + [max(t_next - 7, 0)])
        pred = den(x, t_mixed)
        pred_b = den(x[:B], time_tensor(t, B, "cpu"))
        steps = [lambda p, xx, pr, a, b, gen: ddim_step(p, xx, pr, a, b, gen, eta=eta)]
        steps += [lambda p, xx, pr, a, b, gen, v=v: ddpm_step(p, xx, pr, a, b, gen, variance=v)
                  for v in ("beta_tilde", "beta")]
        for step in steps:
            ref = step(DISCRETE, x, pred, t_mixed, t_next_mixed, torch.Generator().manual_seed(2))
            fast = step(DISCRETE, x[:B], pred_b, time_tensor(t, B, "cpu"), time_tensor(t_next, B, "cpu"),
                        torch.Generator().manual_seed(2))
            if (eta > 0 or step is not steps[0]) and t_next != 0:
                continue  # the noise draws differ in length (B+1 vs B samples): only deterministic steps compare
            torch.testing.assert_close(fast, ref[:B], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", CONTINUOUS + [DISCRETE], ids=lambda p: type(p).__name__)
def test_tabulated_scalars_equal_tensor_methods(path):
    lo, hi = float(path.t_min), float(path.t_max)
    times = [hi, lo + 0.6 * (hi - lo), lo + 0.1 * (hi - lo), lo]
    if path.discrete:
        times = [int(round(t)) for t in times]
    path.tabulate(times, derivatives=not path.discrete, pairs=True)
    tt = torch.tensor(times, dtype=torch.float64)
    for i, t in enumerate(times):
        assert path.coefficients_at(t) == (float(path.a(tt)[i]), float(path.s(tt)[i]))
        if not path.discrete:
            assert path.derivatives_at(t) == (float(path.a_dot(tt)[i]), float(path.s_dot(tt)[i]))
    for i, (t, t_prev) in enumerate(zip(times[:-1], times[1:])):
        c_x0, c_xt, var = path.posterior_coefficients(tt[:-1], tt[1:])
        assert path.posterior_at(t, t_prev)[:3] == (float(c_x0[i]), float(c_xt[i]), float(var[i]))


def test_shared_time_detection():
    assert shared_time(0.5) == 0.5 and shared_time(torch.tensor(3)) == 3
    assert shared_time(torch.tensor([0.2, 0.2, 0.2])) == pytest.approx(0.2)
    assert shared_time(torch.tensor([0.2, 0.3])) is None
    assert shared_time(torch.tensor([0.2, 0.2], requires_grad=True)) is None
    assert shared_time(time_tensor(0.7, 4, "cpu")) == 0.7


@pytest.mark.parametrize("target", TARGETS)
def test_combine_of_linear_form_equals_the_formed_estimates(target):
    """``combine`` on the linear form (two operations) equals ``c_x x + c_0 x̂0 + c_ε ε̂`` from the formed
    ``x̂0, ε̂`` (float64, 1e-12), for the state itself and for another tensor, and returns a new tensor."""
    den = NetworkDenoiser(linear_net, VPPath(), target)
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pred = den(x, time_tensor(0.4, B, "cpu"))
    eager = Prediction(pred.x0.clone(), pred.eps.clone())
    lazy = den(x, time_tensor(0.4, B, "cpu"))
    for c_x0, c_eps, c_x in ((0.7, -1.3, 0.0), (0.0, 2.0, 0.5), (1.1, 0.0, -0.25), (1.0, 1.0, 1.0)):
        ref = c_x0 * eager.x0 + c_eps * eager.eps + c_x * x
        torch.testing.assert_close(lazy.combine(c_x0, c_eps, x=x, c_x=c_x), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(eager.combine(c_x0, c_eps, x=x, c_x=c_x), ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(lazy.combine(c_x0, c_eps, x=x.clone(), c_x=c_x), ref, rtol=1e-12, atol=1e-12)
    out = lazy.combine(0.0, 1.0)
    out.add_(1.0)  # never an alias of the network output or the state
    torch.testing.assert_close(lazy.eps, eager.eps, rtol=0, atol=0)
    with pytest.raises(ValueError, match="needs the state"):
        eager.combine(1.0, 0.0, c_x=1.0)


def test_linear_form_falls_back_where_a_coefficient_is_infinite():
    """Where ``a = 0`` an ε-prediction has no finite ``x̂0`` coefficient: the elementwise path is used."""
    path = DiscreteTimeContinuation(DiscretePath.from_schedule("linear", T=1000, zero_terminal_snr=True))
    assert linear_form(path, float(path.t_max), "eps") is None
    assert linear_form(path, float(path.t_max), "v") is not None
    assert path.coefficients_at(0.0)[1] == 0.0 and linear_form(path, 0.0, "x0") is None


def test_time_tensors_are_cached_and_read_only():
    t = time_tensor(0.25, 5, "cpu")
    assert t is time_tensor(0.25, 5, torch.device("cpu")) and t.dtype == torch.float64
    assert time_tensor(7, 5, "cpu").dtype == torch.long and time_tensor(7, 5, "cpu") is not time_tensor(7.0, 5, "cpu")
    with pytest.raises(RuntimeError):
        t.add_(1.0)
