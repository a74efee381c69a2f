"""SPEC §2/§6: the smooth continuous-time view of a discrete DDPM schedule (:class:`SplineTimeContinuation`).

Exact at every integer step, smooth between them (``λ̇`` continuous across steps, unlike the piecewise-linear
:class:`DiscreteTimeContinuation`), so Runge–Kutta solvers reach their order and the adaptive solver's cost stays
bounded as its tolerance tightens. Oracle: the exact flow map of the single-Gaussian bed (tests/test_ode.py).
"""

import pytest
import torch

from difflab.paths import DiscretePath, DiscreteTimeContinuation, SplineTimeContinuation, smooth_continuation
from difflab.samplers import ode

from test_ode import BED, exact_flow_map, fitted_order, global_error

LINEAR = DiscretePath.from_schedule("linear", T=1000)


@pytest.mark.parametrize("schedule,zero_terminal_snr", [("linear", False), ("cosine", False), ("sigmoid", False),
                                                        ("linear", True), ("cosine", True)])
def test_log_snr_is_strictly_decreasing(schedule, zero_terminal_snr):
    """So the log-SNR inverse exists (the monotone fallback covers schedules whose spline would overshoot; exactness at
    integer steps is tests/test_continuous_paths.py's); ``t = 0`` is the clean end."""
    path = SplineTimeContinuation(DiscretePath.from_schedule(schedule, T=200, zero_terminal_snr=zero_terminal_snr))
    lam = path.log_snr(torch.linspace(0.001, 0.999, 2001, dtype=torch.float64))
    assert (lam[1:] < lam[:-1]).all() and path.clean_time() == 0.0


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_log_snr_slope_is_continuous_across_steps(schedule):
    """One-sided slopes of ``λ`` at interior integer steps agree to 1e-4 relative on the spline; on the linear
    interpolation they jump (by ~1e-3 relative and more), which is the kink an adaptive solver chases."""
    discrete = DiscretePath.from_schedule(schedule, T=1000)
    k = torch.tensor([3.0, 100.0, 500.0, 900.0], dtype=torch.float64)
    h = 1e-7

    def jumps(path):
        left = (path.log_snr((k - 0) / 1000) - path.log_snr((k - h) / 1000)) / h
        right = (path.log_snr((k + h) / 1000) - path.log_snr((k + 0) / 1000)) / h
        return ((left - right).abs() / right.abs()).max().item()

    assert jumps(SplineTimeContinuation(discrete)) < 1e-4
    assert jumps(DiscreteTimeContinuation(discrete)) > 1e-3


def test_derivatives_match_the_log_snr_inverse_and_finite_differences():
    path = SplineTimeContinuation(LINEAR)
    t = torch.tensor([0.0123, 0.25, 0.5007, 0.9], dtype=torch.float64)
    h = 1e-7
    torch.testing.assert_close(path.a_dot(t), (path.a(t + h) - path.a(t - h)) / (2 * h), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(path.s_dot(t), (path.s(t + h) - path.s(t - h)) / (2 * h), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(path.t_from_log_snr(path.log_snr(t)), t, rtol=0, atol=1e-12)


@pytest.mark.parametrize("solver,order", [("heun", 2), ("rk4", 4)])
def test_runge_kutta_reaches_its_order_on_a_ddpm_schedule(solver, order):
    """Uniform-in-t grids on ``[1, 0.02]``: fitted order within 0.3 of the theory (measured: Heun 2.03, RK4 4.27)."""
    path = SplineTimeContinuation(LINEAR)
    errors = [global_error(ode.ODE_SOLVERS[solver], path, torch.linspace(1.0, 0.02, n + 1, dtype=torch.float64))
              for n in (16, 32, 64)]
    assert abs(fitted_order(errors) - order) < 0.3, errors


def test_rk45_cost_stays_bounded_as_the_tolerance_tightens():
    """Dormand–Prince on the DDPM linear schedule from ``t = 1`` to ``t = 0.02``: on the spline the NFE grows
    modestly and the error falls with the tolerance; on the piecewise-linear continuation the same solve chases
    the kinks (measured NFE / max error at 1e-5 and 1e-7: spline 67 / 2.1e-5 and 133 / 4.5e-7; linear interpolation
    61 / 1.5e-3 and 1,939 / 1.1e-3)."""
    grid = torch.tensor([1.0, 0.02], dtype=torch.float64)
    x = torch.randn(8, BED.D, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    results = {}
    for cls in (SplineTimeContinuation, DiscreteTimeContinuation):
        path = cls(LINEAR)
        M, c = exact_flow_map(path, 1.0, 0.02)
        ref = x @ M.T + c
        results[cls] = [(out.nfe, float((out.x - ref).abs().max()))
                        for out in (ode.sample_rk45(BED.denoiser(path), x, grid, rtol=tol, atol=tol) for tol in (1e-5, 1e-7))]
    (n5, e5), (n7, e7) = results[SplineTimeContinuation]
    assert n7 < 3 * n5 and e7 < e5, results
    assert results[DiscreteTimeContinuation][1][0] > 5 * n7, results


def test_smooth_continuation_is_built_once_per_path():
    path = DiscretePath.from_schedule("cosine", T=100)
    assert smooth_continuation(path) is smooth_continuation(path)
    assert isinstance(smooth_continuation(path), SplineTimeContinuation)
