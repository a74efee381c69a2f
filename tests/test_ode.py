"""SPEC §6: probability-flow ODE solvers on the exact Gaussian test bed (SPEC §8).

On a single-Gaussian bed the exact denoiser is affine in ``x_t``, so every solver maps its start state
affinely, ``x ↦ M x + c``, and the PF-ODE's own flow map is known in closed form: in the covariance's
eigenbasis ``Σ = U Λ Uᵀ`` the marginal ``N(a μ, a²Λ + s²)`` is carried by the scaling
``√(a₁²λ + s₁²)/√(a₀²λ + s₀²)`` per direction. The global error ``‖(M, c) − (M*, c*)‖`` of a solver is thus
measured exactly (no sampling noise), and its log-log slope against the step count is the solver's order.
(The exact KL of the output Gaussian is quadratic in this error, so its slope would be twice the order.)
"""

import math

import pytest
import torch

from difflab import LinearPath, TrigPath, VPPath, gaussian_bed
from difflab.samplers import ode
from difflab.samplers.time_grids import uniform_log_snr, uniform_t
from difflab.testbeds import affine_pushforward

BED = gaussian_bed(dim=4, condition=100.0, seed=0)
T_END = 0.02  # the order is measured on [T_END, t_max], away from the clean end where ṡ of a VP path is infinite
STEPS = (16, 32, 64)


def exact_flow_map(path, t0: float, t1: float):
    """``(M*, c*)`` of the exact PF-ODE map ``x_{t0} ↦ x_{t1}`` for the single-Gaussian bed (module docstring)."""
    lam, U, mu = BED.eigvals[0], BED.eigvecs[0], BED.means[0]
    tt = torch.tensor([t0, t1], dtype=torch.float64)
    a, s = path.a(tt), path.s(tt)
    M = U @ torch.diag(torch.sqrt(a[1] ** 2 * lam + s[1] ** 2) / torch.sqrt(a[0] ** 2 * lam + s[0] ** 2)) @ U.T
    return M, a[1] * mu - M @ (a[0] * mu)


def solver_map(sample_fn, den, grid):
    probes = torch.cat([torch.zeros(1, BED.D, dtype=torch.float64), torch.eye(BED.D, dtype=torch.float64)])
    out = sample_fn(den, probes, grid).x
    return (out[1:] - out[0]).T, out[0]


def global_error(sample_fn, path, grid) -> float:
    M, c = solver_map(sample_fn, BED.denoiser(path), grid)
    M_star, c_star = exact_flow_map(path, float(grid[0]), float(grid[-1]))
    return float(torch.sqrt(((M - M_star) ** 2).sum() + ((c - c_star) ** 2).sum()))


def fitted_order(errors, steps=STEPS) -> float:
    """Least-squares slope of ``−log error`` against ``log steps``."""
    x = torch.log(torch.tensor(steps, dtype=torch.float64))
    y = -torch.log(torch.tensor(errors, dtype=torch.float64))
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def order_grid(path, steps: int, solver: str) -> torch.Tensor:
    """Uniform in t for the Runge–Kutta methods, uniform in log-SNR for the exponential integrator."""
    t_max = 1.0 if isinstance(path, VPPath) else 0.98  # stay off a = 0 (linear, trig) where σ̄ is infinite
    if solver == "dpmpp2m":
        return log_snr_grid(path, t_max, steps)
    return torch.linspace(t_max, T_END, steps + 1, dtype=torch.float64)


def log_snr_grid(path, t_max: float, steps: int) -> torch.Tensor:
    """``steps`` intervals evenly spaced in log-SNR from ``t_max`` to ``T_END``, both ends pinned."""
    ends = path.log_snr(torch.tensor([t_max, T_END], dtype=torch.float64))
    grid = path.t_from_log_snr(torch.linspace(float(ends[0]), float(ends[1]), steps + 1, dtype=torch.float64))
    grid[0], grid[-1] = t_max, T_END
    return grid


ORDERS = {"euler": 1, "heun": 2, "rk4": 4, "dpmpp2m": 2}


@pytest.mark.parametrize("path", [VPPath(), LinearPath(), TrigPath()], ids=["vp", "linear", "trig"])
@pytest.mark.parametrize("solver", list(ORDERS))
def test_solver_converges_at_its_order(solver, path):
    """SPEC §6: the global error of the flow map at 16, 32, 64 steps falls at the theoretical order.

    Tolerance ±0.3 on the fitted slope. Measured slopes (VP / linear / trig): Euler 0.96/0.98/1.02,
    Heun 2.03/2.06/2.03, RK4 4.27/3.71/3.91, DPM-Solver++ 2M 1.93/1.93/1.94.
    """
    errors = [global_error(ode.ODE_SOLVERS[solver], path, order_grid(path, n, solver)) for n in STEPS]
    assert all(e1 > e2 for e1, e2 in zip(errors[:-1], errors[1:])), errors
    assert abs(fitted_order(errors) - ORDERS[solver]) < 0.3, (errors, fitted_order(errors))


def test_deis_is_third_order():
    """DEIS's 3-step log-ρ Adams–Bashforth on VP: fitted order 3.67 measured; asserted > 2.7 (third order)."""
    path = VPPath()
    grids = [log_snr_grid(path, 1.0, n) for n in STEPS]
    errors = [global_error(lambda d, x, g: ode.sample_deis(d, x, g, from_pure_noise=False), path, g) for g in grids]
    assert fitted_order(errors) > 2.7, errors


@pytest.mark.parametrize("order,measured", [(1, 2.07), (2, 4.08), (3, 3.69)])
def test_deis_corrector_raises_the_order(order, measured):
    """UniC on DEIS (Zhao et al. 2023; ``corrector=True``): on VP log-SNR grids of 16/32/64 steps the corrected error
    is below the predictor's alone at every grid and falls at least as fast. Fitted orders measured with / without
    the corrector: 2.07 / 0.97, 4.08 / 1.93, 3.69 / 3.67 for orders 1 / 2 / 3 (on this Gaussian bed ``x̂0`` is affine
    in ``x``, which the implicit node's held ``x̂0`` treats nearly exactly); asserted: at least one order higher for
    orders 1 and 2."""
    path = VPPath()
    grids = [log_snr_grid(path, 1.0, n) for n in STEPS]

    def errors(corrector):
        return [global_error(lambda d, x, g: ode.sample_deis(d, x, g, order=order, from_pure_noise=False,
                                                             corrector=corrector), path, g) for g in grids]

    corrected, plain = errors(True), errors(False)
    assert all(c < p for c, p in zip(corrected, plain)), (corrected, plain)
    assert fitted_order(corrected) > fitted_order(plain) - 0.1, (corrected, plain, measured)
    if order < 3:
        assert fitted_order(corrected) > order + 0.65, (corrected, measured)


class PolynomialEps:
    """A denoiser whose ``ε̂`` ignores ``x`` and is a polynomial of degree ``degree`` in ``log σ̄``: the PF-ODE in
    ``x̄ = x/a`` is then a quadrature, ``x̄(σ̄') = x̄(σ̄) + ∫ ε̂ dσ̄``, which a multistep rule on ``degree + 1`` nodes
    integrates exactly."""

    def __init__(self, path, degree: int, dim: int = 3):
        self.path, self.degree = path, degree
        self.coef = torch.linspace(0.5, -0.3, (degree + 1) * dim, dtype=torch.float64).reshape(degree + 1, dim)

    def eps(self, log_sigma: torch.Tensor) -> torch.Tensor:  # (B,) -> (B, dim)
        return sum(c * log_sigma[:, None] ** k for k, c in enumerate(self.coef))

    def __call__(self, x, t, **cond):
        from difflab.parameterization import Prediction

        a, s = self.path.a(t.double()), self.path.s(t.double())
        eps = self.eps(torch.log(s / a)).to(x.dtype)
        return Prediction((x - s[:, None] * eps) / a[:, None], eps)

    def exact(self, x_bar: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
        """``x̄ + ∫_σ̄^σ̄' ε̂ dσ̄`` in closed form: ``∫ u (log u)^k`` by parts, via a fine Gauss–Legendre rule."""
        import numpy as np

        z, w = np.polynomial.legendre.leggauss(64)
        lo, hi = math.log(sigma), math.log(sigma_next)
        u = torch.tensor(lo + (z + 1) * (hi - lo) / 2, dtype=torch.float64)
        jac = torch.tensor(w * (hi - lo) / 2, dtype=torch.float64) * torch.exp(u)
        return x_bar + (jac[:, None] * self.eps(u)).sum(0)


@pytest.mark.parametrize("order,degree,exact", [(1, 0, True), (3, 0, True), (1, 1, False), (3, 1, False)])
def test_deis_quadrature_is_exact_where_its_nodes_allow(order, degree, exact):
    """Limiting case: with ``ε̂`` a polynomial of degree ``degree`` in ``log σ̄`` (independent of ``x``) each step is a
    quadrature on as many nodes as it holds, exact for degree ≤ nodes − 1; the first step has one node, so the output
    is the exact flow map for a constant ``ε̂`` and not for a linear one, whatever the order."""
    path = VPPath()
    den = PolynomialEps(path, degree)
    grid = log_snr_grid(path, 0.9, 6)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = ode.sample_deis(den, x, grid, order=order, from_pure_noise=False).x
    a, s = path.a(grid), path.s(grid)
    want = den.exact(x / a[0], float(s[0] / a[0]), float(s[-1] / a[-1])) * a[-1]
    error = float((out - want).abs().max())
    assert (error < 1e-10) == exact, error


class ConstantX0:
    """A denoiser whose ``x̂0`` is a fixed point ``c`` (all mass there): ``ε̂ = (x̄ − c)/σ̄``, and the exact flow keeps
    ``ε̂`` constant, ``x̄(σ̄') = c + (x̄ − c) σ̄'/σ̄``."""

    def __init__(self, path, dim: int = 3):
        self.path, self.c = path, torch.linspace(-1.0, 1.0, dim, dtype=torch.float64)

    def __call__(self, x, t, **cond):
        from difflab.parameterization import Prediction

        a, s = self.path.a(t.double())[:, None], self.path.s(t.double())[:, None]
        x0 = self.c.to(x.dtype).expand_as(x)
        return Prediction(x0, (x - a * x0) / s)


@pytest.mark.parametrize("order", [1, 2, 3])
def test_deis_corrector_solves_the_implicit_step_exactly_when_x0_is_fixed(order):
    """Limiting case of the corrector's implicit node: where ``x̂0`` does not depend on ``x`` the corrected step is
    implicit Adams–Moulton solved exactly, which keeps the exact flow's constant ``ε̂`` — so the output is the exact
    flow map to float64 rounding (a wrong implicit factor or a stale ``ε̂`` in the history breaks it)."""
    path = VPPath()
    den = ConstantX0(path)
    grid = log_snr_grid(path, 0.9, 6)
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = ode.sample_deis(den, x, grid, order=order, from_pure_noise=False, corrector=True).x
    a, s = path.a(grid), path.s(grid)
    want = (den.c + (x / a[0] - den.c) * (s[-1] / a[-1]) / (s[0] / a[0])) * a[-1]
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


def test_deis_corrector_costs_no_evaluation_and_leaves_the_predictor_alone():
    """The corrector reuses the next step's evaluation (NFE = steps), and ``corrector=False`` is DEIS unchanged."""
    path = VPPath()
    counted = CountingDenoiser(BED.denoiser(path))
    x = torch.randn(5, BED.D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    grid = torch.cat([log_snr_grid(path, 1.0, 8), torch.zeros(1, dtype=torch.float64)])
    out = ode.sample_deis(counted, x, grid, corrector=True)
    assert out.nfe == counted.calls == 9
    assert not torch.equal(out.x, ode.sample_deis(BED.denoiser(path), x, grid).x)


class CountingDenoiser:
    """Wraps a denoiser and counts its calls independently of the solvers' own bookkeeping."""

    def __init__(self, den):
        self.den, self.path, self.calls = den, den.path, 0

    def __call__(self, x, t, **cond):
        self.calls += 1
        return self.den(x, t, **cond)


@pytest.mark.parametrize("solver,expected", [("euler", 10), ("heun", 2 * 9 + 1), ("rk4", 4 * 9 + 1),
                                             ("dpmpp2m", 10), ("deis", 10)])
def test_nfe_is_counted_and_the_clean_step_costs_one(solver, expected):
    """SPEC §6 (NFE counted, not assumed): 10 steps ending at the clean end; the last step is one evaluation."""
    path = VPPath()
    den = CountingDenoiser(BED.denoiser(path))
    grid = uniform_t(path, 10)
    assert float(grid[-1]) == 0.0
    out = ode.ODE_SOLVERS[solver](den, torch.randn(3, BED.D, dtype=torch.float64), grid)
    assert out.nfe == den.calls == expected


@pytest.mark.parametrize("solver", list(ode.ODE_SOLVERS))
def test_final_step_returns_the_denoised_estimate(solver):
    """Module docstring of samplers/ode.py: the step onto ``s = 0`` returns ``x̂0`` at the previous grid time
    exactly (to float64 rounding, 1e-12)."""
    path = VPPath()
    den = BED.denoiser(path)
    grid = torch.tensor([1.0, 0.5, 0.1, 0.0], dtype=torch.float64)
    seen = []
    out = ode.ODE_SOLVERS[solver](den, torch.randn(3, BED.D, dtype=torch.float64), grid, callback=seen.append)
    before = seen[-2]["x"]
    x0_hat = den(before, torch.full((3,), 0.1, dtype=torch.float64)).x0
    assert torch.allclose(out.x, x0_hat, atol=1e-12, rtol=0)


def test_rk45_meets_its_tolerance_and_reports_nfe():
    """SPEC §6: adaptive Dormand–Prince against the exact flow map (module docstring).

    Tolerance: the global error, in the solver's own RMS norm ``|err| / (atol + rtol |x|)``, is at most 10
    (the controller bounds local errors; the global error accumulates over the steps — measured 1.7, 0.26, 0.54
    at tolerances 1e-3, 1e-5, 1e-7 with 25, 55, 133 evaluations)
    and falls with the tolerance; NFE equals the counted calls and grows as the tolerance tightens.
    """
    path = VPPath()
    den = CountingDenoiser(BED.denoiser(path))
    x = path.prior_sample((32, BED.D), torch.Generator().manual_seed(0), dtype=torch.float64)
    grid = torch.tensor([1.0, T_END], dtype=torch.float64)
    M_star, c_star = exact_flow_map(path, 1.0, T_END)
    ref = x @ M_star.T + c_star
    errors, nfes = [], []
    for tol in (1e-3, 1e-5, 1e-7):
        den.calls = 0
        out = ode.sample_rk45(den, x, grid, rtol=tol, atol=tol)
        assert out.nfe == den.calls
        rms = float((((out.x - ref) / (tol + tol * ref.abs())) ** 2).mean().sqrt())
        assert rms < 10.0, (tol, rms)
        errors.append(float((out.x - ref).abs().max()))
        nfes.append(out.nfe)
    assert errors[0] > errors[1] > errors[2] and nfes[0] < nfes[1] < nfes[2], (errors, nfes)


def test_solvers_reach_the_truth_on_the_16d_bed(bed16):
    """End to end to the clean end on the ill-conditioned 16-D bed (SPEC §8): exact KL of the output Gaussian
    (affine push-forward) falls with NFE for Heun and DPM-Solver++ 2M; at 40 NFE both are below 0.05 nats.
    Measured: Heun 20 → 40 NFE: 0.033 → 0.0021; DPM-Solver++ 2M: 0.0069 → 0.00052 (uniform log-SNR grid)."""
    path = VPPath()
    den = bed16.denoiser(path)
    for solver, grid_fn, per_step in (("heun", uniform_log_snr, 2), ("dpmpp2m", uniform_log_snr, 1)):
        kls = []
        for nfe in (20, 40):
            grid = grid_fn(path, 1 + (nfe - 1) // per_step)
            mean, cov = affine_pushforward(lambda x: ode.ODE_SOLVERS[solver](den, x, grid).x, bed16.D,
                                           prior_std=path.prior_std())
            kls.append(float(bed16.kl_from_gaussian(mean, cov)))
        assert kls[0] > kls[1] and kls[1] < 0.05, (solver, kls)


def test_bad_grids_are_rejected():
    den = BED.denoiser(VPPath())
    with pytest.raises(ValueError):
        ode.sample_heun(den, torch.zeros(2, BED.D), torch.tensor([0.5, 1.0]))
    with pytest.raises(ValueError):
        ode.sample_rk45(den, torch.zeros(2, BED.D), torch.tensor([1.0, 0.5]), rtol=0.0)



@pytest.mark.parametrize("tableau", [ode.EULER, ode.HEUN, ode.RK4], ids=lambda t: t.name)
@pytest.mark.parametrize("target", ["eps", "v", "x0"])
def test_prediction_form_step_equals_the_vector_field_step(tableau, target):
    """The samplers' RK step summed through the predictions' linear forms equals the textbook RK step on
    ``v = ȧ x̂0 + ṡ ε̂`` (float64, 1e-12) — for a network wrapper (linear form) of every target."""
    from difflab import NetworkDenoiser
    from difflab.parameterization import from_x0_eps

    path = VPPath()

    def net(x, t, **cond):  # the bed's exact target, through the generic conversion
        t_b = t.to(torch.float64)
        pred = BED.denoiser(path)(x, t_b)
        return from_x0_eps(pred.x0, pred.eps, x, t_b, path, target)

    den = NetworkDenoiser(net, path, target)
    x = torch.randn(5, BED.D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    flow = ode.ProbabilityFlow(den)
    t, h = 0.6, -0.05
    pred = flow.predict(x, t)
    fast = ode.runge_kutta_step_from(flow, t, x, h, tableau, pred)
    ref, _, _ = ode.runge_kutta_step(flow, t, x, h, tableau)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype,state", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                         (torch.bfloat16, torch.float32)])
def test_state_keeps_the_callers_precision_at_least_float32(dtype, state):
    seen = []
    den = BED.denoiser(VPPath())
    grid = uniform_t(VPPath(), 4)
    out = ode.sample_heun(den, torch.randn(3, BED.D).to(dtype), grid, callback=lambda info: seen.append(info["x"].dtype))
    assert out.x.dtype == dtype and set(seen) == {state}
