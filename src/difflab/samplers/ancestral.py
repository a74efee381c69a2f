"""DDPM ancestral sampling (SPEC §3): ``x_{t−1} ~ p_θ(x_{t−1} | x_t) = N(μ_θ(x_t, t), σ_t² I)``.

``μ_θ(x_t, t) = (x_t − β_t/√(1−ᾱ_t) ε̂)/√α_t`` equals the posterior mean ``μ̃_t(x_t, x̂0)`` with
``x̂0 = (x_t − s_t ε̂)/a_t`` exactly, so the step is written through
:meth:`~difflab.paths.GaussianPath.posterior_coefficients`, which also serves step subsets.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch

from difflab.paths import GaussianPath, shared_time
from difflab.parameterization import Prediction
from difflab.samplers.chain import Samples, sample_chain
from difflab.samplers.grids import discrete_timesteps
from difflab.utils import append_dims, bcast, randn

VARIANCES = ("beta_tilde", "beta", "learned")


def ddpm_variance(path: GaussianPath, pred: Prediction, t, t_next, variance: str) -> torch.Tensor:
    """``σ_t²`` of the reverse step ``t → t_next`` (SPEC §3), shaped ``[B]`` or like ``pred.x0``.

    - ``beta_tilde``: the posterior variance ``β̃``; exact when the data is a point mass.
    - ``beta``: the forward variance ``β_t`` (``σ²_{t|t'} = s_t² − (a_t/a_{t'})² s_{t'}²`` for a skip);
      optimal for ``x0 ~ N(0, I)``.
    - ``learned``: ``exp(v log β + (1−v) log β̃)`` with the network's ``v`` (improved DDPM); ``β̃`` at
      the first step is taken from the next one up (it is 0 there), as in improved DDPM's "clipped" log-variance.
    """
    c_x0, c_xt, beta_tilde = path.posterior_coefficients(t, t_next)
    a_t, s_t, a_n, s_n = path.a(t), path.s(t), path.a(t_next), path.s(t_next)
    beta = (s_t**2 - (a_t / a_n) ** 2 * s_n**2).clamp(min=0.0)
    if variance == "beta_tilde":
        return beta_tilde
    if variance == "beta":
        return beta
    if variance == "learned":
        if pred.var_interp is None:
            raise ValueError("variance='learned' needs a denoiser with learned_variance=True")
        floor = torch.where(beta_tilde > 0, beta_tilde, beta * 1e-3 + 1e-20)  # clipped at the first step
        v = pred.var_interp
        log_var = v * bcast(torch.log(beta), v) + (1 - v) * bcast(torch.log(floor), v)
        return torch.exp(log_var)
    raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")


def ddpm_step(path: GaussianPath, x: torch.Tensor, pred: Prediction, t, t_next,
              generator: Optional[torch.Generator] = None, variance: str = "beta_tilde") -> torch.Tensor:
    """One ancestral step ``x_{t_next} = μ̃(x_t, x̂0) + σ z`` (SPEC §2–§3).

    The last step (``t_next = 0``) adds no noise: it returns the posterior mean, which is ``x̂0``.
    """
    t_s, t_next_s = shared_time(t), shared_time(t_next)
    if variance in ("beta_tilde", "beta") and t_s is not None and t_next_s is not None:
        # one time for the batch: scalar coefficients; σ²_{t|t'} is the forward variance "beta" of ddpm_variance
        c_x0, c_xt, beta_tilde, beta = path.posterior_at(t_s, t_next_s)
        var = beta_tilde if variance == "beta_tilde" else beta
        mean = pred.combine(c_x0, 0.0, x=x, c_x=c_xt)
        noise = randn(x.shape, generator, x.device, x.dtype)  # drawn on the last step too (same generator use)
        if path.coefficients_at(t_next_s)[1] == 0:
            return mean
        return mean.add_(noise, alpha=math.sqrt(var))
    c_x0, c_xt, _ = path.posterior_coefficients(t, t_next)
    mean = bcast(c_x0, x) * pred.x0 + bcast(c_xt, x) * x
    var = ddpm_variance(path, pred, t, t_next, variance)
    var = bcast(var, x) if var.ndim <= 1 else var.to(x.dtype)
    last = append_dims(path.s(t_next) == 0, x.ndim).to(x.device)
    noise = randn(x.shape, generator, x.device, x.dtype)
    return mean + torch.where(last, torch.zeros_like(x), var.sqrt() * noise)


def sample_ddpm(denoiser, x: torch.Tensor, steps: Optional[int] = None, variance: str = "beta_tilde",
                spacing: str = "trailing", generator: Optional[torch.Generator] = None,
                callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """DDPM ancestral sampling from ``x = x_T`` on a :class:`~difflab.paths.DiscretePath` (SPEC §3).

    Args:
        denoiser: ``denoiser(x, t, **cond) -> Prediction`` whose ``path`` is discrete.
        x: ``x_T`` of any shape ``(B, ...)``, e.g. ``path.prior_sample(shape, generator)``.
        steps: number of transitions (default: all ``T``); fewer gives the respaced chain.
        variance: ``beta_tilde`` | ``beta`` | ``learned`` (see :func:`ddpm_variance`).
    Returns: :class:`Samples` ``(x0, nfe)`` with ``nfe == steps``.
    """
    path = denoiser.path
    if not getattr(path, "discrete", False):
        raise TypeError("sample_ddpm needs a discrete path; use the SDE samplers for continuous time")
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; choose one of {VARIANCES}")
    timesteps = discrete_timesteps(path.T, steps or path.T, spacing)
    step = partial(ddpm_step, variance=variance)
    return sample_chain(denoiser, x, timesteps, step, generator, callback, progress, **cond)
