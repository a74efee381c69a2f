"""Time grids for the continuous-time samplers (SPEC §6).

Every grid is a strictly decreasing float64 tensor of path times ``t_0 = t_max > t_1 > … > t_N``; a
solver on it makes ``N`` steps. Where the path has a clean end (``s = 0``, see
:meth:`~difflab.paths.ContinuousPath.clean_time`) and ``clean_end=True``, the grid's last entry is that
time, and every solver's last step onto it returns the denoiser's ``x̂0`` at ``t_{N−1}`` (see
:mod:`difflab.samplers.ode`). The noise-level grids are laid out in ``σ̄ = s/a`` (EDM's σ; ``λ = −2 log σ̄``):

- :func:`uniform_t`: evenly spaced in the path's own time;
- :func:`uniform_log_snr`: evenly spaced in ``λ`` (diffusers' ``use_lu_lambdas``, DPM-Solver's default);
- :func:`karras`: ``σ̄_i = (σ̄_max^{1/ρ} + i/(n−1) (σ̄_min^{1/ρ} − σ̄_max^{1/ρ}))^ρ`` (Karras et al. 2022, eq. 5).

``σ̄_max`` defaults to the path's own ``σ̄(t_max)`` and ``σ̄_min`` to ``σ̄(t_min)`` (the least noise the
model is trained on). Where ``a(t_max) = 0`` (``σ̄ = ∞``, e.g. the linear path) or ``σ̄(t_min) = 0``, the
fallbacks are EDM's ``σ̄ ∈ [0.002, 80]`` and the grid starts with one step from ``t_max`` to ``t(σ̄_max)``.
- :func:`optimized_grid`: noise levels fit offline for DEIS (order :data:`DEIS_ORDER`) and a budget of
  network evaluations, by minimising the exact KL over a family of 1-D Gaussians (:func:`optimize_sigmas`,
  :data:`OPTIMIZED_SIGMAS`); the sampler is affine on Gaussian data, so the fit needs no sampling noise.

:func:`default_grid` is difflab's measured best grid for a solver and a budget of network evaluations.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch

from difflab.paths import ContinuousPath

# EDM's noise range (Karras et al. 2022, Table 1), used only where the path's own ends are σ̄ = 0 or ∞.
FALLBACK_SIGMA_MIN = 0.002
FALLBACK_SIGMA_MAX = 80.0


def _check(path, steps: int):
    if not isinstance(path, ContinuousPath):
        raise ValueError("continuous time grids need a ContinuousPath (wrap a DiscretePath in DiscreteTimeContinuation)")
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")


def _f64(t) -> torch.Tensor:
    return torch.tensor(float(t), dtype=torch.float64)


def _tail(path, clean_end: bool) -> list:
    clean = path.clean_time()
    return [clean] if clean_end and clean is not None and clean < path.t_min else []


def uniform_t(path: ContinuousPath, steps: int, clean_end: bool = True) -> torch.Tensor:
    """``steps + 1`` times evenly spaced from ``t_max`` to ``t_min``; if ``clean_end`` and the path's clean
    end lies below ``t_min``, the knots run from ``t_max`` to ``t_min`` and one last step reaches the clean end."""
    _check(path, steps)
    tail = _tail(path, clean_end)
    knots = torch.linspace(float(path.t_max), float(path.t_min), steps + 1 - len(tail), dtype=torch.float64)
    if steps + 1 - len(tail) == 1:
        knots = _f64(path.t_max).reshape(1)
    return torch.cat([knots, torch.tensor(tail, dtype=torch.float64)])


def noise_range(path: ContinuousPath, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None):
    """The ``(σ̄_min, σ̄_max)`` a noise-level grid spans: the path's own ``σ̄(t_min)``, ``σ̄(t_max)`` unless given
    (with the EDM fallbacks where those are 0 or ∞)."""
    if sigma_min is None:
        sigma_min = float(path.sigma_bar(_f64(path.t_min)))
        sigma_min = sigma_min if sigma_min > 0 else FALLBACK_SIGMA_MIN
    if sigma_max is None:
        sigma_max = float(path.sigma_bar(_f64(path.t_max)))
        sigma_max = sigma_max if math.isfinite(sigma_max) else FALLBACK_SIGMA_MAX
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    return float(sigma_min), float(sigma_max)


def sigma_grid(path: ContinuousPath, steps: int, spacing: Callable, sigma_min: Optional[float] = None,
               sigma_max: Optional[float] = None, clean_end: bool = True, key=None) -> torch.Tensor:
    """A grid from noise levels: ``spacing(σ̄_max, σ̄_min, n) -> (n,)`` decreasing ``σ̄`` knots, mapped to path time.

    The grid has ``steps + 1`` entries: ``t_max`` first (an extra head step where ``σ̄_max`` is below the
    path's own ``σ̄(t_max)``), then the ``σ̄`` knots, then the clean end (``clean_end`` and the path has one).
    With a hashable ``key`` naming ``spacing``, the grid is built once per path and arguments (it is a pure
    function of them) and a copy is returned on every later call.
    """
    if key is not None:
        memo = path._memo()
        full_key = ("grid", key, steps, sigma_min, sigma_max, clean_end)
        if full_key not in memo:
            memo[full_key] = sigma_grid(path, steps, spacing, sigma_min, sigma_max, clean_end)
        return memo[full_key].clone()
    _check(path, steps)
    sigma_min, sigma_max = noise_range(path, sigma_min, sigma_max)
    path_sigma_max = float(path.sigma_bar(_f64(path.t_max)))
    head = [float(path.t_max)] if path_sigma_max > sigma_max * (1 + 1e-12) else []
    tail = [path.clean_time()] if clean_end and path.clean_time() is not None else []
    n = steps + 1 - len(head) - len(tail)
    if n < 1:
        raise ValueError(f"{steps} steps cannot hold this grid's fixed ends; use more steps")
    sigmas = spacing(sigma_max, sigma_min, n) if n > 1 else torch.tensor([sigma_max], dtype=torch.float64)
    knots = path.t_from_sigma_bar(sigmas)
    if not head:  # pin the path's own ends exactly (the inverse is exact only to rounding)
        knots[0] = float(path.t_max)
    if sigma_min == float(path.sigma_bar(_f64(path.t_min))) and n > 1:
        knots[-1] = float(path.t_min)
    grid = torch.cat([torch.tensor(head, dtype=torch.float64), knots, torch.tensor(tail, dtype=torch.float64)])
    if not (grid[:-1] > grid[1:]).all():
        raise ValueError("the grid is not strictly decreasing; check sigma_min/sigma_max against the path")
    return grid


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """``σ̄_i = (σ̄_max^{1/ρ} + i/(n−1) (σ̄_min^{1/ρ} − σ̄_max^{1/ρ}))^ρ``, ``i = 0..n−1`` (Karras et al. 2022, eq. 5)."""
    ramp = torch.linspace(0.0, 1.0, n, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def log_snr_sigmas(sigma_max: float, sigma_min: float, n: int) -> torch.Tensor:
    """``σ̄`` evenly spaced in ``log σ̄ = −λ/2`` (the ``ρ → ∞`` limit of :func:`karras_sigmas`)."""
    return torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64))


def karras(path: ContinuousPath, steps: int, sigma_min: Optional[float] = None, sigma_max: Optional[float] = None,
           rho: float = 7.0, clean_end: bool = True) -> torch.Tensor:
    """Karras ρ-spacing in ``σ̄ = s/a`` (ρ = 7 by default), mapped to path time; see :func:`sigma_grid`."""
    if rho <= 0:
        raise ValueError(f"rho must be positive, got {rho}")
    return sigma_grid(path, steps, lambda hi, lo, n: karras_sigmas(hi, lo, n, rho), sigma_min, sigma_max, clean_end,
                      key=("karras", rho))


def uniform_log_snr(path: ContinuousPath, steps: int, sigma_min: Optional[float] = None,
                    sigma_max: Optional[float] = None, clean_end: bool = True) -> torch.Tensor:
    """Even spacing in log-SNR ``λ`` between ``σ̄_max`` and ``σ̄_min``, mapped to path time; see :func:`sigma_grid`."""
    return sigma_grid(path, steps, log_snr_sigmas, sigma_min, sigma_max, clean_end, key="log_snr")


# --- grids optimised for a budget of network evaluations --------------------------------------------
# The family the grids are optimised on: 1-D Gaussian data N(μ, v) with v log-spread over [10^-2.2, 10^2.2]
# (unit-scale data whose covariance spectrum spans four decades either side of 1) and μ ∈ {0, 0.5}.
FAMILY_LOG10_VARIANCE = (-2.2, 2.2)
FAMILY_SIZE = 23
FAMILY_MEANS = (0.0, 0.5)
# The DEIS order the optimised grids are fit for and meant to be run with (``sample_deis(..., order=DEIS_ORDER)``):
# at 10 evaluations the fitted order-4 grid's family KL is ~20x below the fitted order-3 grid's.
DEIS_ORDER = 4


def family_bed():
    """The diagonal Gaussian bed of the optimisation family: one coordinate per (μ, v) pair."""
    from difflab.testbeds import GaussianMixtureBed

    v = torch.logspace(*FAMILY_LOG10_VARIANCE, FAMILY_SIZE, dtype=torch.float64)
    means = torch.cat([torch.full_like(v, m) for m in FAMILY_MEANS])
    return GaussianMixtureBed(means.unsqueeze(0), torch.cat([v] * len(FAMILY_MEANS)).unsqueeze(0))


def family_kl(sample_fn: Callable, bed, prior_std: float = 1.0) -> float:
    """Exact ``Σ_k KL(N(c_k, m_k²) || N(μ_k, v_k))`` of a deterministic sampler on a diagonal Gaussian bed.

    The bed's exact denoiser acts coordinate-wise and affinely, so the sampler maps ``x_T ↦ m ⊙ x_T + c``;
    two probes (``0`` and ``1``) recover ``m`` and ``c``. ``sample_fn(x: (2, D)) -> (2, D)``.
    """
    out = sample_fn(torch.stack([torch.zeros(bed.D, dtype=torch.float64), torch.ones(bed.D, dtype=torch.float64)]))
    c, m = out[0], out[1] - out[0]
    mu, v = bed.means[0], torch.diagonal(bed.covs[0])
    ratio = (prior_std * m) ** 2 / v
    return float(0.5 * (ratio - 1.0 - torch.log(ratio) + (c - mu) ** 2 / v).sum())


def _knots_from_params(theta, n: int, log_hi: float, log_lo: float, min_gap: float):
    """``n`` decreasing ``log σ̄`` knots in ``(log_lo, log_hi)``: partial sums of ``n + 1`` gaps, each at least
    ``min_gap/(n+1)`` of the range (so no two knots collapse)."""
    import numpy as np

    p = np.exp(theta - theta.max())
    p = p / p.sum()
    floor = min_gap / (n + 1)
    gaps = floor + (1.0 - (n + 1) * floor) * p
    return log_hi - (log_hi - log_lo) * np.cumsum(gaps)[:-1]


def _params_from_knots(log_sigma, log_hi: float, log_lo: float, min_gap: float):
    """The inverse of :func:`_knots_from_params` (up to a constant): parameters whose knots are ``log_sigma``."""
    import numpy as np

    n = len(log_sigma)
    edges = np.concatenate([[log_hi], np.asarray(log_sigma, dtype=float), [log_lo]])
    gaps = -np.diff(edges) / (log_hi - log_lo)
    floor = min_gap / (n + 1)
    p = np.clip((gaps - floor) / (1.0 - (n + 1) * floor), 1e-6, None)
    return np.log(p / p.sum())


def optimize_sigmas(path: ContinuousPath, nfe: int, order: int = None, min_gap: float = 0.25,
                    maxiter: int = 200, init: Optional[Sequence[float]] = None) -> list:
    """Noise levels ``σ̄_1 > … > σ̄_{nfe−1}`` minimising :func:`family_kl` of :func:`~difflab.samplers.ode.sample_deis`.

    The grid is ``[t_max, t(σ̄_1), …, t(σ̄_{nfe−1}), clean end]`` (``nfe`` evaluations, the first from pure
    noise); the objective is the log of the exact summed KL over :func:`family_bed` (no sampling noise),
    minimised by L-BFGS-B (finite-difference gradients) from ``init`` (``nfe − 1`` decreasing noise levels, e.g.
    a smaller budget's optimum resampled by :func:`_table_knots`) or else the log-SNR-uniform grid. ``order`` is
    DEIS's order (default :data:`DEIS_ORDER`). Slow (seconds to minutes): difflab ships the results in
    :data:`OPTIMIZED_SIGMAS`, made by ``python -m benchmarks.fit_grids`` with this function on the DDPM linear
    schedule (T = 1000) in continuous time (:class:`~difflab.paths.DiscreteTimeContinuation`).
    """
    import numpy as np
    from scipy.optimize import minimize

    from difflab.samplers.ode import sample_deis

    order = DEIS_ORDER if order is None else order
    if path.clean_time() is None or nfe < 2:
        raise ValueError("grid optimisation needs a path with a clean end and nfe >= 2")
    bed = family_bed()
    den = bed.denoiser(path)
    lo, hi = noise_range(path)
    n = nfe - 1
    head = torch.tensor([float(path.t_max)], dtype=torch.float64)
    tail = torch.tensor([path.clean_time()], dtype=torch.float64)

    def objective(theta):
        log_sigma = _knots_from_params(theta, n, math.log(hi), math.log(lo), min_gap)
        grid = torch.cat([head, path.t_from_sigma_bar(torch.exp(torch.from_numpy(log_sigma))), tail])
        return math.log(family_kl(lambda x: sample_deis(den, x, grid, order=order).x, bed, path.prior_std()))

    if init is None:
        theta0 = np.zeros(n + 1)
    else:
        if len(init) != n:
            raise ValueError(f"init needs {n} noise levels, got {len(init)}")
        theta0 = _params_from_knots(np.log(np.asarray(init, dtype=float)), math.log(hi), math.log(lo), min_gap)
    result = minimize(objective, theta0, method="L-BFGS-B", options={"maxiter": maxiter})
    return np.exp(_knots_from_params(result.x, n, math.log(hi), math.log(lo), min_gap)).tolist()


def _table_knots(nfe: int, table: dict) -> list:
    """The table's knots for ``nfe`` evaluations; for a budget not in the table, the nearest larger entry's
    knots resampled log-linearly in ``log σ̄`` over the knot index (as Align Your Steps does)."""
    if nfe in table:
        return list(table[nfe])
    larger = [n for n in table if n > nfe]
    source = list(table[min(larger) if larger else max(table)])
    position = torch.linspace(0.0, 1.0, len(source), dtype=torch.float64)
    wanted = torch.linspace(0.0, 1.0, nfe - 1, dtype=torch.float64)
    log_sigma = torch.log(torch.tensor(source, dtype=torch.float64))
    index = torch.searchsorted(position, wanted, right=True).clamp(1, len(source) - 1)
    w = (wanted - position[index - 1]) / (position[index] - position[index - 1])
    return torch.exp((1 - w) * log_sigma[index - 1] + w * log_sigma[index]).tolist()


def optimized_grid(path: ContinuousPath, nfe: int, table: Optional[dict] = None,
                   table_range: Optional[tuple] = None) -> torch.Tensor:
    """``[t_max, t(σ̄_1), …, t(σ̄_{nfe−1}), clean end]``: the grid for :func:`~difflab.samplers.ode.sample_deis`
    (order :data:`DEIS_ORDER`) with ``nfe`` evaluations, from :data:`OPTIMIZED_SIGMAS` (see :func:`optimize_sigmas`)
    or a ``table`` fit over ``σ̄ ∈ table_range``. A budget not in the table resamples the nearest larger entry
    (:func:`_table_knots`).

    The table was optimised for ``σ̄ ∈ OPTIMIZED_RANGE``; on a path with another range the knots are mapped
    affinely in ``log σ̄`` onto the path's own :func:`noise_range` (the identity on the DDPM linear schedule).
    """
    _check(path, nfe)
    if path.clean_time() is None:
        raise ValueError(f"{type(path).__name__} has no clean end; use karras(..., clean_end=False)")
    head = torch.tensor([float(path.t_max)], dtype=torch.float64)
    tail = torch.tensor([path.clean_time()], dtype=torch.float64)
    if nfe == 1:
        return torch.cat([head, tail])
    knots = torch.tensor(_table_knots(nfe, OPTIMIZED_SIGMAS if table is None else table), dtype=torch.float64)
    lo, hi = noise_range(path)
    t_lo, t_hi = (math.log(v) for v in (OPTIMIZED_RANGE if table_range is None else table_range))
    u = (torch.log(knots) - t_lo) / (t_hi - t_lo)
    knots = torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))
    return torch.cat([head, path.t_from_sigma_bar(knots), tail])


# --- the committed table ------------------------------------------------------------------------------
# Fit by `python -m benchmarks.fit_grids --nfe 4 5 6 8 10 12 15 20` (optimize_sigmas, DEIS order DEIS_ORDER = 4,
# L-BFGS-B, maxiter 200, each budget warm-started from the previous one resampled; ~15 minutes on one core) on
# the family bed (family_bed: 1-D Gaussians, variances over 10^±2.2, means 0 and 0.5) along the DDPM linear
# schedule (T = 1000) in continuous time. Family KL of the fits vs the log-SNR-uniform grid, same solver:
# NFE 4: 5.2 vs 8.7; 6: 0.18 vs 0.82; 8: 4.7e-3 vs 7.7e-2; 10: 2.9e-4 vs 9.5e-3; 12: 2.7e-5 vs 1.6e-3;
# 15: 1.9e-6 vs 2.6e-4; 20: 3.1e-7 vs 1.6e-4 nats. The benchmark beds (rotated 16-D Gaussians) are not in
# the family; their scores are in benchmarks/results/README.md.
OPTIMIZED_RANGE = (0.01000050003750257, 157.40728081040766)
OPTIMIZED_SIGMAS = {
    4: (7.52007, 0.961097, 0.0973826),
    5: (11.7463, 2.72205, 0.248055, 0.0162134),
    6: (19.3849, 7.73724, 1.16707, 0.146057, 0.0149588),
    8: (38.402, 21.255, 5.13042, 1.22034, 0.302269, 0.0678691, 0.0135264),
    10: (48.7441, 32.3632, 9.42925, 3.06204, 1.10452, 0.374364, 0.128851, 0.0430063, 0.0139884),
    12: (53.3796, 42.424, 13.8947, 5.35164, 2.28209, 0.957919, 0.402102, 0.172199, 0.0735785, 0.0297462, 0.012231),
    15: (62.226, 52.6034, 22.5496, 10.6526, 5.44749, 2.83847, 1.47822, 0.787856, 0.423979, 0.224266, 0.116779, 0.058425, 0.0265849, 0.0117483),
    20: (56.8931, 50.4052, 42.1255, 36.0984, 17.0584, 9.32746, 6.16035, 3.69084, 2.25882, 1.42826, 0.889912, 0.548281, 0.336944, 0.198669, 0.110858, 0.0596167, 0.0288404, 0.0127576, 0.0112991),
}

# Measured best fixed grid per solver (exact KL on the 16-D Gaussian beds of condition 1e2 and 1e4 at 13 budgets
# from 4 to 100 evaluations, benchmarks/results/accuracy.json): Euler on Karras ρ = 7 (below log-SNR at 12 and 10
# of 13 budgets); Heun, RK4 and the multistep solvers in log-SNR (Heun: at 10 and 20 evaluations on both beds;
# RK4: at 11 and 10 of 13 budgets). DEIS uses the optimised grids up to 20 evaluations.
DEFAULT_GRIDS: dict = {"euler": karras, "heun": uniform_log_snr, "rk4": uniform_log_snr, "dpmpp2m": uniform_log_snr,
                       "deis": uniform_log_snr}


def default_grid(path: ContinuousPath, nfe: int, solver: str = "deis") -> torch.Tensor:
    """difflab's measured best grid for ``solver`` and a budget of ``nfe`` network evaluations (SPEC §6).

    ``deis`` on a path with a clean end and ``nfe`` up to the table's largest budget (20): :func:`optimized_grid`
    (run it with ``order=DEIS_ORDER``), the winner of the side-by-side benchmark at every budget it covers; above
    that, the log-SNR-uniform grid (measured: the 20-evaluation table resampled to 25–50 is no better, both sit at
    the final ``x̂0`` step's error from ``σ̄_min``); other solvers: :data:`DEFAULT_GRIDS` with the most steps that fit the budget at
    the solver's evaluations per step (the clean step costs 1), so the solver's counted NFE is at most ``nfe``
    (:func:`uniform_t` below 3 steps).
    ``rk45`` (adaptive) gets ``[t_max, t(σ̄_min), clean end]``: where to start, where to stop integrating, and the
    final ``x̂0`` step.
    """
    from difflab.samplers.ode import EVALS_PER_STEP

    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if solver == "rk45":
        lo, _ = noise_range(path)
        ends = [float(path.t_max), float(path.t_from_sigma_bar(torch.tensor(lo, dtype=torch.float64)))]
        return torch.tensor(ends + ([path.clean_time()] if path.clean_time() is not None else []), dtype=torch.float64)
    if solver not in EVALS_PER_STEP:
        raise ValueError(f"unknown solver {solver!r}; choose one of {tuple(EVALS_PER_STEP)} or 'rk45'")
    if solver == "deis" and path.clean_time() is not None and nfe <= max(OPTIMIZED_SIGMAS):
        return optimized_grid(path, nfe)
    steps = max(1, 1 + (nfe - 1) // EVALS_PER_STEP[solver])
    if steps < 3:  # a noise-level grid may need a head step (σ̄(t_max) = ∞) and the clean step of its own
        return uniform_t(path, steps)
    return DEFAULT_GRIDS[solver](path, steps)
