"""DDIM on any step subset and any η (SPEC §5; Song, Meng, Ermon 2021, eq. 12).

Notation map: ``a = √ᾱ_t``, ``s = √(1−ᾱ_t)``, primes for the next (less noisy) time ``t'``;
``sigma`` is the paper's ``σ_t(η)``.

    x̂0 = (x_t − s ε̂)/a,   x_{t'} = a' x̂0 + √(s'² − σ²) ε̂ + σ z,
    σ = η √((1−ᾱ_{t'})/(1−ᾱ_t)) √(1 − ᾱ_t/ᾱ_{t'})

For a general Gaussian path ``σ²`` is η² times the exact posterior variance of
:meth:`~difflab.paths.GaussianPath.posterior_coefficients`, which reduces to the formula above.
η = 1 is the DDPM posterior variance; η = 0 is deterministic (the probability-flow ODE's
first-order solver, SPEC §6).
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch

from difflab.parameterization import Prediction
from difflab.paths import GaussianPath, shared_time
from difflab.samplers.chain import Samples, sample_chain
from difflab.samplers.grids import discrete_timesteps
from difflab.utils import bcast, randn


def ddim_step(path: GaussianPath, x: torch.Tensor, pred: Prediction, t, t_next,
              generator: Optional[torch.Generator] = None, eta: float = 0.0) -> torch.Tensor:
    """One DDIM update ``x_t → x_{t'}`` (SPEC §5). At ``t' = 0`` it returns ``x̂0`` exactly."""
    t_s, t_next_s = shared_time(t), shared_time(t_next)
    if t_s is not None and t_next_s is not None:  # one time for the batch: scalar coefficients
        posterior_var = path.posterior_at(t_s, t_next_s)[2]
        a_next, s_next = path.coefficients_at(t_next_s)
        sigma2 = eta**2 * posterior_var
        x_next = pred.combine(a_next, math.sqrt(max(s_next**2 - sigma2, 0.0)))
        if eta > 0:
            x_next = x_next.add_(randn(x.shape, generator, x.device, x.dtype), alpha=math.sqrt(sigma2))
        return x_next
    _, _, posterior_var = path.posterior_coefficients(t, t_next)
    sigma2 = bcast(eta**2 * posterior_var, x)
    a_next, s_next = bcast(path.a(t_next), x), bcast(path.s(t_next), x)
    x_next = a_next * pred.x0 + (s_next**2 - sigma2).clamp(min=0.0).sqrt() * pred.eps
    if eta > 0:
        x_next = x_next + sigma2.sqrt() * randn(x.shape, generator, x.device, x.dtype)
    return x_next


def sample_ddim(denoiser, x: torch.Tensor, steps: int = 50, eta: float = 0.0, spacing: str = "trailing",
                timesteps: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """DDIM sampling from ``x = x_T`` with ``steps`` network evaluations (SPEC §5).

    Args:
        denoiser: ``denoiser(x, t, **cond) -> Prediction``.
        x: ``x_T`` of any shape ``(B, ...)``.
        steps: number of transitions on a discrete path (ignored if ``timesteps`` is given).
        eta: stochasticity, 0 (deterministic) … 1 (DDPM posterior variance).
        spacing: ``linspace`` | ``leading`` | ``trailing`` (see :mod:`difflab.samplers.grids`).
        timesteps: an explicit decreasing grid (any subset of steps, or continuous times).
    Returns: :class:`Samples` ``(x0, nfe)``.
    """
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    path = denoiser.path
    if timesteps is None:
        if not getattr(path, "discrete", False):
            raise ValueError("on a continuous path pass an explicit `timesteps` grid")
        timesteps = discrete_timesteps(path.T, steps, spacing)
    return sample_chain(denoiser, x, timesteps, partial(ddim_step, eta=eta), generator, callback, progress, **cond)
