"""Probability-flow ODE solvers (SPEC §6).

The forward SDE ``dx = f dt + g dW`` and the ODE ``dx/dt = f − ½ g² ∇log p_t`` share their marginals
(Fokker–Planck is a continuity equation, SPEC §6). On a Gaussian path ``x = a x0 + s ε`` with
``f = (ȧ/a) x``, ``g² = 2 s ṡ − 2 (ȧ/a) s²`` and ``∇log p_t = −ε̂/s`` (exact for ``ε̂ = E[ε | x_t]``),
and with ``x = a x̂0 + s ε̂``, the velocity is exactly

    v(x, t) = (ȧ/a)(a x̂0 + s ε̂) + (s ṡ − (ȧ/a) s²) ε̂/s = ȧ x̂0 + ṡ ε̂,

which is what every solver here integrates, from ``t_max`` down the given grid, in the denoiser's
path time (``path = denoiser.path``; :func:`difflab.equivalence.change_path` re-times a model onto
another path exactly, e.g. EDM's ``a = 1, s = t`` where ``v = ε̂``).

Final step. A step whose target is the clean end (``s(t_next) = 0``) returns ``x̂0`` of the denoiser at
``t`` — one evaluation, no correction, in every solver. It is the exact ODE solution over the step for a
locally constant ``x̂0`` (the DDIM / first-order exponential-integrator step; on the linear and EDM paths
it *is* the Euler step), and it never evaluates ``v`` at ``s = 0``, where ``ṡ`` of a VP path is infinite.
EDM's Heun sampler does the same (no correction on its last step to σ = 0).

NFE is counted from actual denoiser calls (``samplers.chain.denoiser_cost``), never assumed. State is kept
in ``x``'s dtype, float32 or float64 (:func:`state_dtype`; cast at the network boundary by the denoiser
wrapper) and returned in the input dtype; the pipeline starts every continuous-time solver from a float64
``x_T`` (:func:`precise_dtype`), as EDM's sampler does.
Notation map: ``h`` is the signed step ``t_next − t`` (negative: time runs toward the data); in
DPM-Solver++ ``λ = log(a/s)`` is half the log-SNR and ``h = λ_next − λ > 0`` (Lu et al. 2022).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from difflab.parameterization import Prediction
from difflab.samplers.chain import Samples, denoiser_cost, time_tensor
from difflab.utils import bcast


def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The sampler state's dtype: the caller's (``x``'s) when it is float32 or float64, else float32 — a
    half-precision state would lose the small late-step updates (STYLE rule 8). Pass float64 for exact-answer
    work; :func:`precise_dtype` is what the pipeline uses."""
    return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32


def precise_dtype(device) -> torch.dtype:
    """float64, except on devices without it (Apple MPS), where float32: the pipeline's ODE/SDE state (as EDM's)."""
    return torch.float32 if torch.device(device).type == "mps" else torch.float64


class ProbabilityFlow:
    """The PF-ODE field ``v(x, t) = ȧ x̂0 + ṡ ε̂`` of a denoiser (SPEC §6), counting network evaluations.

    ``flow(t, x)`` evaluates ``v`` (one denoiser call); ``flow.predict(x, t)`` returns the
    :class:`~difflab.parameterization.Prediction`; ``flow.last`` is the prediction of the latest call and
    ``flow.nfe`` the evaluations so far. ``t`` is a Python float shared by the batch.
    """

    def __init__(self, denoiser, cond: Optional[dict] = None):
        self.denoiser, self.path, self.cond = denoiser, denoiser.path, cond or {}
        self.nfe = 0
        self.last: Optional[Prediction] = None

    def prepare(self, times, derivatives: bool = True) -> None:
        """Tabulate the path's coefficients at every time the solve will visit (one vectorised call)."""
        self.path.tabulate([float(t) for t in times], derivatives=derivatives)

    def predict(self, x: torch.Tensor, t: float) -> Prediction:
        t_b = time_tensor(float(t), x.shape[0], x.device)
        self.last = self.denoiser(x, t_b, **self.cond)
        self.nfe += denoiser_cost(self.denoiser)
        return self.last

    def velocity(self, pred: Prediction, t: float, like: torch.Tensor) -> torch.Tensor:
        """``ȧ_t x̂0 + ṡ_t ε̂`` for a prediction made at time ``t``."""
        a_dot, s_dot = self.path.derivatives_at(float(t))
        v = pred.combine(a_dot, s_dot)
        return v if v.dtype == like.dtype else v.to(like.dtype)

    def __call__(self, t: float, x: torch.Tensor) -> torch.Tensor:
        return self.velocity(self.predict(x, t), t, x)

    def is_clean(self, t: float) -> bool:
        return self.path.coefficients_at(float(t))[1] == 0.0


# --- Runge–Kutta machinery ------------------------------------------------------------------------
@dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method: nodes ``c``, stage matrix ``a`` (row ``i`` has ``i`` entries),
    weights ``b`` and, for embedded pairs, ``b_err = b − b̂`` (the local error estimate's weights)."""

    name: str
    order: int
    c: Sequence[float]
    a: Sequence[Sequence[float]]
    b: Sequence[float]
    b_err: Optional[Sequence[float]] = None


EULER = ButcherTableau("euler", 1, c=(0.0,), a=((),), b=(1.0,))
HEUN = ButcherTableau("heun", 2, c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5))  # explicit trapezoid (EDM Alg. 1)
RK4 = ButcherTableau("rk4", 4, c=(0.0, 0.5, 0.5, 1.0), a=((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)),
                     b=(1 / 6, 1 / 3, 1 / 3, 1 / 6))
# Dormand & Prince (1980), RK5(4)7FSAL: the 7th stage is evaluated at the accepted step's end (first same as last).
DOPRI5 = ButcherTableau(
    "dopri5", 5,
    c=(0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    a=((),
       (1 / 5,),
       (3 / 40, 9 / 40),
       (44 / 45, -56 / 15, 32 / 9),
       (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
       (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
       (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84)),
    b=(35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0),
    b_err=(71 / 57600, 0.0, -71 / 16695, 71 / 1920, -17253 / 339200, 22 / 525, -1 / 40),
)


def runge_kutta_step(f: Callable, t: float, y: torch.Tensor, h: float, tableau: ButcherTableau,
                     k1: Optional[torch.Tensor] = None):
    """One explicit RK step ``y(t) → y(t + h)`` of ``dy/dt = f(t, y)``.

    ``k1 = f(t, y)`` may be passed in (it is then not re-evaluated). Returns ``(y_next, error, ks)``:
    ``error = h Σ b_err_i k_i`` (``None`` without an embedded pair) and the stage derivatives ``ks``.
    """
    ks = [f(t, y) if k1 is None else k1]
    for c_i, a_i in zip(tableau.c[1:], tableau.a[1:]):
        ks.append(f(t + c_i * h, _axpy(y, h, a_i, ks)))
    y_next = _axpy(y, h, tableau.b, ks)
    error = None if tableau.b_err is None else _axpy(None, h, tableau.b_err, ks)
    return y_next, error, ks


def runge_kutta_step_from(flow: "ProbabilityFlow", t: float, x: torch.Tensor, h: float, tableau: ButcherTableau,
                          pred: Prediction) -> torch.Tensor:
    """:func:`runge_kutta_step` on the PF-ODE, written in the denoiser's predictions: the same update
    ``x + h Σ b_j k_j`` (and stage states ``x + h Σ a_ij k_j``) with ``k_j = ȧ_j x̂0_j + ṡ_j ε̂_j`` summed by
    :meth:`~difflab.parameterization.Prediction.combine` / ``add_to``, which never form ``k_j``, ``x̂0`` or
    ``ε̂`` (two tensor operations per term instead of four). ``pred`` is the prediction at ``(x, t)``.
    """
    stages = [(pred, t)]
    for c_i, a_i in zip(tableau.c[1:], tableau.a[1:]):
        t_i = t + c_i * h
        stages.append((flow.predict(_stage_sum(flow.path, x, h, a_i, stages), t_i), t_i))
    return _stage_sum(flow.path, x, h, tableau.b, stages)


def _stage_sum(path, x: torch.Tensor, h: float, weights, stages) -> torch.Tensor:
    """``x + h Σ_j w_j (ȧ_j x̂0_j + ṡ_j ε̂_j)`` over ``stages = [(prediction, time), ...]``, the first made at ``x``."""
    (pred0, t0), w0 = stages[0], weights[0]
    a_dot, s_dot = path.derivatives_at(t0)
    out = pred0.combine(h * w0 * a_dot, h * w0 * s_dot, x=x, c_x=1.0)
    for w, (pred, t_j) in zip(weights[1:], stages[1:]):
        if w != 0.0:
            a_dot, s_dot = path.derivatives_at(t_j)
            pred.add_to(out, h * w * a_dot, h * w * s_dot)
    return out


def stage_times(t: float, h: float, tableau: ButcherTableau) -> list:
    """The times ``t + c_i h`` at which :func:`runge_kutta_step` evaluates ``f`` (the same floats)."""
    return [t + c_i * h for c_i in tableau.c[1:]]


def _axpy(y: Optional[torch.Tensor], h: float, weights, ks) -> torch.Tensor:
    """``y + h Σ w_j k_j`` (``h Σ w_j k_j`` without ``y``) over the nonzero weights, in fused steps."""
    terms = [(h * w, k) for w, k in zip(weights, ks) if w != 0.0]
    if y is None:
        (c0, k0), terms = terms[0], terms[1:]
        out = k0 * c0
    else:
        out = y.clone() if not terms else None
    for c, k in terms:
        out = torch.add(y, k, alpha=c) if out is None else out.add_(k, alpha=c)
    return out


class AdaptiveResult(NamedTuple):
    y: torch.Tensor
    k_end: torch.Tensor  # f(t1, y(t1)), the FSAL stage of the last accepted step
    h: float  # the step size proposed for whatever follows
    accepted: int
    rejected: int


# Step-size controller (Hairer, Nørsett & Wanner, "Solving ODEs I", §II.4): h ← h · clip(0.9 err^{−1/5}, 0.2, 10).
SAFETY, MIN_FACTOR, MAX_FACTOR = 0.9, 0.2, 10.0


def error_ratio(error: torch.Tensor, y: torch.Tensor, y_next: torch.Tensor, rtol: float, atol: float) -> float:
    """RMS of ``error / (atol + rtol max(|y|, |y_next|))`` over every entry; a step is accepted when ≤ 1."""
    scale = atol + rtol * torch.maximum(y.abs(), y_next.abs())
    return float((error / scale).pow(2).mean().sqrt())


def integrate_adaptive(f: Callable, t0: float, t1: float, y: torch.Tensor, rtol: float, atol: float,
                       k1: Optional[torch.Tensor] = None, h: Optional[float] = None,
                       tableau: ButcherTableau = DOPRI5) -> AdaptiveResult:
    """Integrate ``dy/dt = f(t, y)`` from ``t0`` to ``t1`` (either direction) with an embedded RK pair.

    The error of each step is controlled in the RMS norm of :func:`error_ratio` (one step size for the
    whole batch, as ``scipy.integrate.solve_ivp`` on the flattened state). Without ``h`` the first step is
    ``0.01 ‖y‖/‖f(t0, y)‖`` (Hairer et al.'s first guess, in the same scaled norm), capped at ``|t1 − t0|``.
    """
    if rtol <= 0 or atol <= 0:
        raise ValueError(f"rtol and atol must be positive, got {rtol}, {atol}")
    direction = math.copysign(1.0, t1 - t0)
    span = abs(t1 - t0)
    k1 = f(t0, y) if k1 is None else k1
    if h is None:
        scale = atol + rtol * y.abs()
        d0, d1 = float((y / scale).pow(2).mean().sqrt()), float((k1 / scale).pow(2).mean().sqrt())
        h = 1e-6 * span if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
    h = min(abs(h), span)
    t, accepted, rejected = t0, 0, 0
    while direction * (t1 - t) > 0:
        last = h >= abs(t1 - t)
        step = (t1 - t) if last else direction * h
        y_next, error, ks = runge_kutta_step(f, t, y, step, tableau, k1)
        ratio = error_ratio(error, y, y_next, rtol, atol)
        factor = MAX_FACTOR if ratio == 0 else min(MAX_FACTOR, max(MIN_FACTOR, SAFETY * ratio ** (-1 / (tableau.order))))
        if ratio <= 1.0:
            t = t1 if last else t + step
            y, k1, accepted = y_next, ks[-1], accepted + 1
            h = h * factor if not last else max(h, abs(step)) * factor
        else:
            rejected += 1
            h = abs(step) * factor
        if h < 1e-14 * max(1.0, abs(t)):
            raise RuntimeError(f"step size underflow at t={t}; loosen rtol/atol")
    return AdaptiveResult(y, k1, h, accepted, rejected)


# --- samplers ------------------------------------------------------------------------------------
def grid_intervals(timesteps, progress: bool):
    grid = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if grid.numel() < 2 or not (grid[:-1] > grid[1:]).all():
        raise ValueError("timesteps must be a strictly decreasing grid of at least two times")
    values = grid.tolist()
    return tqdm(list(enumerate(zip(values[:-1], values[1:]))), disable=not progress, desc="ODE", leave=False)


def grid_times(intervals) -> list:
    """The grid's times (Python floats) from :func:`grid_intervals`, without advancing its progress bar."""
    pairs = [pair for _, pair in intervals.iterable]
    return [t for t, _ in pairs] + [pairs[-1][1]]


def report_step(callback, i, t, t_next, x, pred):
    if callback is not None:
        callback({"i": i, "t": t, "t_next": t_next, "x": x, "x0_hat": pred.x0})


@torch.no_grad()
def sample_runge_kutta(denoiser, x: torch.Tensor, timesteps, tableau: ButcherTableau,
                       generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
                       progress: bool = False, **cond) -> Samples:
    """Fixed-grid explicit Runge–Kutta on the PF-ODE ``dx/dt = ȧ x̂0 + ṡ ε̂`` (SPEC §6).

    Each step ``t → t_next`` costs ``len(tableau.b)`` evaluations; the step onto the clean end returns
    ``x̂0`` at ``t`` (one evaluation; see the module docstring). ``generator`` is unused (deterministic).
    Returns :class:`Samples` ``(x, nfe)``.
    """
    flow, dtype = ProbabilityFlow(denoiser, cond), x.dtype
    x = x.to(state_dtype(x))
    intervals = grid_intervals(timesteps, progress)
    times = grid_times(intervals) + [u for _, (t, t_next) in intervals.iterable
                                     for u in stage_times(t, t_next - t, tableau)]
    flow.prepare(times)
    for i, (t, t_next) in intervals:
        pred = flow.predict(x, t)
        if flow.is_clean(t_next):
            x = pred.x0
        else:
            x = runge_kutta_step_from(flow, t, x, t_next - t, tableau, pred)
        report_step(callback, i, t, t_next, x, pred)
    return Samples(x.to(dtype), flow.nfe)


def sample_euler(denoiser, x, timesteps, generator=None, callback=None, progress=False, **cond) -> Samples:
    """Euler on the PF-ODE: ``x ← x + (t_next − t) v(x, t)``; first order; NFE = steps (SPEC §6).

    On the linear path (and EDM's) this is deterministic DDIM (SPEC §6 last bullet). The last step onto the
    clean end returns ``x̂0`` at ``t`` (on the linear and EDM paths that *is* the Euler step).
    """
    return sample_runge_kutta(denoiser, x, timesteps, EULER, generator, callback, progress, **cond)


def sample_heun(denoiser, x, timesteps, generator=None, callback=None, progress=False, **cond) -> Samples:
    """Heun's second-order method (EDM's Algorithm 1, in the path's time): ``x̃ = x + h v(x, t)``,
    ``x ← x + h (v(x, t) + v(x̃, t_next))/2``; the last step onto the clean end is ``x̂0`` (no correction).
    NFE = 2 per step, 1 for the clean step."""
    return sample_runge_kutta(denoiser, x, timesteps, HEUN, generator, callback, progress, **cond)


def sample_rk4(denoiser, x, timesteps, generator=None, callback=None, progress=False, **cond) -> Samples:
    """Classical fourth-order Runge–Kutta on the PF-ODE; NFE = 4 per step. The last step onto the clean end
    returns ``x̂0`` at ``t`` (1 evaluation, no stages: the field's ``ṡ`` is infinite at ``s = 0`` on VP paths)."""
    return sample_runge_kutta(denoiser, x, timesteps, RK4, generator, callback, progress, **cond)


def _start_on_grid(denoiser, x: torch.Tensor, timesteps, progress: bool, cond: dict):
    """``(flow, state, intervals)`` for a solver that reads only ``a`` and ``s`` at the grid times: the counting
    field, ``x`` in :func:`state_dtype`, and the grid's intervals with their coefficients tabulated."""
    flow = ProbabilityFlow(denoiser, cond)
    intervals = grid_intervals(timesteps, progress)
    flow.prepare(grid_times(intervals), derivatives=False)
    return flow, x.to(state_dtype(x)), intervals


def exponential_step(a: float, s: float, a_next: float, s_next: float) -> tuple[float, float]:
    """``(h, c)`` of the first-order exponential step ``x' = (s'/s) x + c x̂0`` (deterministic DDIM, SPEC §5):
    ``h = λ' − λ`` with ``λ = log(a/s)`` (``−∞`` where ``a = 0``) and ``c = a'(1 − e^{−h})``."""
    h = math.log(a_next / s_next) - (math.log(a / s) if a > 0 else -math.inf)
    return h, -a_next * math.expm1(-h)


@torch.no_grad()
def sample_dpmpp_2m(denoiser, x: torch.Tensor, timesteps, generator: Optional[torch.Generator] = None,
                    callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """DPM-Solver++(2M): multistep, data prediction, in ``λ = log(a/s)`` (Lu et al. 2022, Alg. 2; SPEC §6).

    The PF-ODE in ``λ`` has the exact solution ``x_{t'} = (s'/s) x_t + s' ∫_λ^{λ'} e^{λ} x̂0 dλ``; taking
    ``x̂0`` linear in ``λ`` through the last two evaluations gives, with ``h = λ' − λ`` and ``r = h_prev/h``,

        x_{t'} = (s'/s) x_t − a' (e^{−h} − 1) D,    D = (1 + 1/(2r)) x̂0_i − 1/(2r) x̂0_{i−1},

    and ``D = x̂0_i`` (first order, = DDIM) on the first step and after a step from ``a = 0`` (``h = ∞``).
    The step onto the clean end (``λ' = ∞``, ``s' = 0``) returns ``x̂0_i``, the ``h → ∞`` limit of the first-order
    step. Only ``a`` and ``s`` at the grid times enter, so the result is the same on every path with the same
    log-SNR grid. NFE = steps.
    """
    dtype = x.dtype
    flow, x, intervals = _start_on_grid(denoiser, x, timesteps, progress, cond)
    path = flow.path
    x0_prev, h_prev = None, None
    for i, (t, t_next) in intervals:
        pred = flow.predict(x, t)
        (a, s), (a_next, s_next) = path.coefficients_at(t), path.coefficients_at(t_next)
        if s_next == 0.0:
            x = pred.x0
        else:
            h, c = exponential_step(a, s, a_next, s_next)  # x' = (s'/s) x + c D
            if x0_prev is None or not math.isfinite(h_prev):  # D = x̂0_i
                x = pred.combine(c, 0.0, x=x, c_x=s_next / s)
            else:  # D = (1 + 1/(2r)) x̂0_i − 1/(2r) x̂0_{i−1}
                r = h_prev / h
                x = pred.combine(c * (1.0 + 0.5 / r), 0.0, x=x, c_x=s_next / s).add_(x0_prev, alpha=-c * 0.5 / r)
            x0_prev, h_prev = pred.x0, h
        report_step(callback, i, t, t_next, x, pred)
    return Samples(x.to(dtype), flow.nfe)


@torch.no_grad()
def sample_heun_exp(denoiser, x: torch.Tensor, timesteps, generator: Optional[torch.Generator] = None,
                    callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """Heun's trapezoid in ``λ = log(a/s)`` on the data prediction: the exponential-integrator Heun (SPEC §6).

    In the exact solution ``x_{t'} = (s'/s) x_t + s' ∫_λ^{λ'} e^{λ} x̂0 dλ`` (see :func:`sample_dpmpp_2m`) the
    predictor takes ``x̂0`` constant — deterministic DDIM, ``x̃ = (s'/s) x + a'(1 − e^{−h}) x̂0`` — and the
    corrector takes it linear in ``λ`` between ``x̂0`` at ``(x, t)`` and ``x̂0'`` at ``(x̃, t')``:

        x_{t'} = (s'/s) x + a' (1 − e^{−h}) x̂0 + a' φ₂(h) (x̂0' − x̂0),    φ₂(h) = 1 − (1 − e^{−h})/h,

    with ``h = λ' − λ``. Second order; its first stage *is* DDIM, so it never loses to DDIM by more than the
    correction's error (Heun in path time, :func:`sample_heun`, is stiff where ``ȧ/a`` is large, e.g. the last
    steps of a cosine schedule). A step from ``a = 0`` (``h = ∞``) is the DDIM step alone; the step onto the
    clean end returns ``x̂0`` (module docstring). NFE = 2 per step, 1 for the clean step.
    """
    dtype = x.dtype
    flow, x, intervals = _start_on_grid(denoiser, x, timesteps, progress, cond)
    for i, (t, t_next) in intervals:
        pred = flow.predict(x, t)
        (a, s), (a_next, s_next) = flow.path.coefficients_at(t), flow.path.coefficients_at(t_next)
        if s_next == 0.0:
            x = pred.x0
        else:
            h, c = exponential_step(a, s, a_next, s_next)
            x_pred = pred.combine(c, 0.0, x=x, c_x=s_next / s)
            if math.isfinite(h):
                phi2 = 1.0 + math.expm1(-h) / h
                x0_next = flow.predict(x_pred, t_next).x0
                x = x_pred.add_(x0_next - pred.x0, alpha=a_next * phi2)
            else:
                x = x_pred
        report_step(callback, i, t, t_next, x, pred)
    return Samples(x.to(dtype), flow.nfe)


# Gauss–Legendre rule for the multistep weights: 12 nodes integrate ℓ_j(z) e^z over a step of |Δ log σ̄| ≤ 5
# to ~1e-16 relative (the error term scales as (Δ/2)^24 / 24!).
_GL_NODES, _GL_WEIGHTS = (v.tolist() for v in np.polynomial.legendre.leggauss(12))


def log_rho_weights(log_nodes: Sequence[float], sigma: float, sigma_next: float) -> list:
    """``W_j = ∫_σ̄^σ̄' ℓ_j(log u) du`` for the Lagrange basis ``ℓ_j`` on ``log σ̄`` nodes (DEIS's log-ρ AB weights)."""
    lo, hi = math.log(sigma), math.log(sigma_next)
    half = 0.5 * (hi - lo)
    z = [lo + (g + 1.0) * half for g in _GL_NODES]
    jac = [w * half * math.exp(zi) for w, zi in zip(_GL_WEIGHTS, z)]
    out = []
    for j, n_j in enumerate(log_nodes):
        total = 0.0
        for zi, wi in zip(z, jac):
            basis = 1.0
            for m, n_m in enumerate(log_nodes):
                if m != j:
                    basis *= (zi - n_m) / (n_j - n_m)
            total += wi * basis
        out.append(total)
    return out


@torch.no_grad()
def sample_deis(denoiser, x: torch.Tensor, timesteps, order: int = 3, from_pure_noise: bool = True,
                corrector: bool = False, generator: Optional[torch.Generator] = None,
                callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """Multistep Adams–Bashforth on the PF-ODE in EDM coordinates: DEIS's log-ρ AB (Zhang & Chen 2023; SPEC §6),
    optionally with a UniC-style Adams–Moulton corrector (Zhao et al. 2023) at no extra evaluation.

    With ``x̄ = x/a`` and ``σ̄ = s/a`` the PF-ODE is ``dx̄/dσ̄ = ε̂`` (SPEC §6 last bullet). Each step
    integrates the Lagrange polynomial through the last ``order`` values of ``ε̂``, interpolated in ``log σ̄``:

        x̄' = x̄ + Σ_j W_j ε̂_j,    W_j = ∫_σ̄^σ̄' ℓ_j(log u) du   (:func:`log_rho_weights`),

    with lower orders while the history is short. Only ``a`` and ``s`` at the grid times enter, so the
    result is the same on every path with the same ``σ̄`` grid. NFE = steps.

    Corrector (``corrector=True``). The evaluation at the predicted ``x̄'_p`` — which the next step needs anyway —
    is added as a node and the same step is integrated again from ``x̄`` (Adams–Moulton, on the predictor's nodes
    and ``log σ̄'``): the PEC scheme of UniPC's UniC, which raises the order by one for no network evaluation. Two
    things keep it from amplifying the predictor's error where ``ε̂`` is stiff (``∂ε̂/∂x̄ ≈ 1/σ̄`` across the
    data, the last steps): the new node is taken implicitly with the data prediction ``x̂0'`` held at its
    predicted value, ``ε̂' = (x̄' − x̂0')/σ̄'`` (``x̂0`` varies slowly in ``x``, at most as ``1/a``), so

        x̄'_c = (x̄ + Σ_{j<n} W^c_j ε̂_j − (W^c_n/σ̄') x̂0') / (1 − W^c_n/σ̄'),

    and the history carries ``ε̂' = (x̄'_c − x̂0')/σ̄'`` at the corrected state. Where ``x̂0`` does not depend on
    ``x`` this is the implicit Adams–Moulton step solved exactly. The step onto the clean end returns ``x̂0'``
    (module docstring); the first step from pure noise (an infinite interval in ``log σ̄``) is not corrected.

    First step (``from_pure_noise``): :meth:`~difflab.paths.GaussianPath.prior_sample` draws ``x`` from
    ``N(0, s_max² I)``, which is the marginal at ``λ = −∞`` of a VP path, not ``p_{t_max}`` (``a(t_max) > 0``
    on most schedules). So the first step is the exact first-order step from ``λ = −∞``,
    ``x' = a' x̂0 + s' x/s_max``, with the model's ``x̂0`` at ``t_max`` standing in for its ``λ = −∞`` limit;
    this removes the prior's ``O(a(t_max))`` mean error. With ``False``, ``x`` is taken to be ``x_{t_max}``
    (also the case where ``a(t_max) = 0``, when the two coincide). Last step: ``x̂0`` (module docstring).
    """
    if order < 1:
        raise ValueError(f"order must be a positive integer, got {order}")
    flow, dtype = ProbabilityFlow(denoiser, cond), x.dtype
    path = flow.path
    x = x.to(state_dtype(x))
    history = []  # (log σ̄, ε̂) of the latest `order` evaluations
    step_from = None  # (x̄, σ̄, σ̄', predictor's history) of the latest multistep step, for the corrector
    intervals = grid_intervals(timesteps, progress)
    flow.prepare(grid_times(intervals), derivatives=False)
    for i, (t, t_next) in intervals:
        pred = flow.predict(x, t)
        (a, s), (a_next, s_next) = path.coefficients_at(t), path.coefficients_at(t_next)
        eps = pred.eps
        if step_from is not None:  # UniC: re-integrate the step that led here through the new node, implicitly
            x_bar, sigma_prev, sigma, nodes = step_from
            weights = log_rho_weights([n for n, _ in nodes] + [math.log(sigma)], sigma_prev, sigma)
            for w, (_, eps_j) in zip(weights, nodes):
                x_bar.add_(eps_j, alpha=w)
            implicit = weights[-1] / sigma
            x_bar.add_(pred.x0, alpha=-implicit).div_(1.0 - implicit)
            x = x_bar * a
            eps = (x_bar - pred.x0) / sigma  # ε̂ at the corrected state, x̂0 held
            step_from = None
        if a > 0.0:
            history = (history + [(math.log(s / a), eps)])[-order:]
        if s_next == 0.0:
            x = pred.x0
        elif i == 0 and (from_pure_noise or a == 0.0):
            x = torch.add(a_next * pred.x0, x, alpha=s_next / s)
        else:
            weights = log_rho_weights([n for n, _ in history], s / a, s_next / a_next)
            x_bar = x / a
            if corrector:
                step_from = (x_bar.clone(), s / a, s_next / a_next, list(history))
            for w, (_, eps) in zip(weights, history):
                x_bar.add_(eps, alpha=w)
            x = x_bar.mul_(a_next)
        report_step(callback, i, t, t_next, x, pred)
    return Samples(x.to(dtype), flow.nfe)


@torch.no_grad()
def sample_rk45(denoiser, x: torch.Tensor, timesteps, rtol: float = 1e-5, atol: float = 1e-5,
                generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
                progress: bool = False, **cond) -> Samples:
    """Adaptive Dormand–Prince 5(4) on the PF-ODE with error control ``rtol``/``atol`` (SPEC §6).

    The solver passes through every time of ``timesteps`` (``callback`` fires there) and chooses its own
    steps in between (:func:`integrate_adaptive`); a typical grid is ``[t_max, t_min, clean end]``. The step
    onto the clean end returns ``x̂0`` at the previous grid time, taken from the last accepted step's FSAL
    evaluation there (no extra call). NFE = 1 + 6 per attempted step (accepted or rejected), as counted.
    """
    flow, dtype = ProbabilityFlow(denoiser, cond), x.dtype
    x = x.to(state_dtype(x))
    pred = flow.predict(x, float(torch.as_tensor(timesteps)[0]))
    k, h = flow.velocity(pred, float(torch.as_tensor(timesteps)[0]), x), None
    for i, (t, t_next) in grid_intervals(timesteps, progress):
        pred_t = pred  # the prediction at (x, t)
        if flow.is_clean(t_next):
            x = pred.x0
        else:
            x, k, h, _, _ = integrate_adaptive(flow, t, t_next, x, rtol, atol, k1=k, h=h)
            pred = flow.last  # the last accepted step's FSAL stage: the prediction at (x, t_next)
        report_step(callback, i, t, t_next, x, pred_t)
    return Samples(x.to(dtype), flow.nfe)


# Names for the CLI and evaluation-cost bookkeeping: evaluations per ordinary step (the clean step costs 1).
ODE_SOLVERS = {"euler": sample_euler, "heun": sample_heun, "rk4": sample_rk4, "dpmpp2m": sample_dpmpp_2m,
               "deis": sample_deis, "rk45": sample_rk45}
EVALS_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4, "dpmpp2m": 1, "deis": 1}
