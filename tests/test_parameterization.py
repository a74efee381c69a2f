"""SPEC §4: conversions between ε, x0, v, score and velocity are exact and invertible."""

import itertools

import pytest
import torch

from difflab import DiscretePath, LinearPath, NetworkDenoiser, TrigPath, VPPath
from difflab.parameterization import TARGETS, convert, from_x0_eps, to_x0_eps

DISCRETE_TARGETS = ("eps", "x0", "v", "score")
CASES = [(DiscretePath.from_schedule("cosine", T=1000), torch.tensor([1, 250, 999]), DISCRETE_TARGETS),
         (VPPath(), torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64), TARGETS),
         (LinearPath(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), TARGETS),
         (TrigPath(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64), TARGETS)]


@pytest.mark.parametrize("path,t,targets", CASES)
@pytest.mark.parametrize("shape", [(3, 2), (3, 1, 4, 4)])
def test_round_trip_every_pair(path, t, targets, shape):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    x, _ = path.sample(x0, t, eps)
    for src, tgt in itertools.product(targets, targets):
        out = from_x0_eps(x0, eps, x, t, path, src)
        back = convert(convert(out, x, t, path, src, tgt), x, t, path, tgt, src)
        torch.testing.assert_close(back, out, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(convert(out, x, t, path, src, tgt), from_x0_eps(x0, eps, x, t, path, tgt),
                                   rtol=1e-9, atol=1e-9)
    for tgt in targets:
        x0_hat, eps_hat = to_x0_eps(from_x0_eps(x0, eps, x, t, path, tgt), x, t, path, tgt)
        torch.testing.assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)


def test_definitions():
    """v = aε − s x0, score = −ε/s, u = ȧ x0 + ṡ ε on the linear path is ε − x0."""
    path = LinearPath()
    t = torch.tensor([0.3], dtype=torch.float64)
    x0, eps = torch.tensor([[2.0]], dtype=torch.float64), torch.tensor([[-1.0]], dtype=torch.float64)
    x, _ = path.sample(x0, t, eps)
    assert float(from_x0_eps(x0, eps, x, t, path, "velocity")) == pytest.approx(-3.0)
    assert float(from_x0_eps(x0, eps, x, t, path, "v")) == pytest.approx(0.7 * -1.0 - 0.3 * 2.0)
    assert float(from_x0_eps(x0, eps, x, t, path, "score")) == pytest.approx(1.0 / 0.3)


def test_v_prediction_survives_zero_terminal_snr():
    """At ᾱ_T = 0 ε-prediction cannot give x0 (division by a = 0) but v-prediction can."""
    path = DiscretePath.from_schedule("linear", T=100, zero_terminal_snr=True)
    t = torch.tensor([100])
    x0, eps = torch.tensor([[0.5, -0.5]], dtype=torch.float64), torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    x, _ = path.sample(x0, t, eps)
    v = from_x0_eps(x0, eps, x, t, path, "v")
    x0_hat, eps_hat = to_x0_eps(v, x, t, path, "v")
    torch.testing.assert_close(x0_hat, x0)
    torch.testing.assert_close(eps_hat, eps)


def test_network_denoiser_wraps_any_target():
    path = DiscretePath.from_schedule("linear", T=100)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, generator=g, dtype=torch.float64), torch.randn(4, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([5, 20, 60, 99])
    x, _ = path.sample(x0, t, eps)
    for target in DISCRETE_TARGETS:
        truth = from_x0_eps(x0, eps, x, t, path, target)
        den = NetworkDenoiser(lambda x_, t_, **_: truth.float(), path, target)
        pred = den(x.float(), t)
        torch.testing.assert_close(pred.x0, x0.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(pred.eps, eps.float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError):
        NetworkDenoiser(lambda *a: None, path, "noise")
