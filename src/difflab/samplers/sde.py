"""Reverse-SDE samplers: Euler–Maruyama and predictor–corrector with Langevin (SPEC §6).

On a Gaussian path ``x = a x0 + s ε`` the forward SDE is ``dx = f dt + g dW`` with ``f = (ȧ/a) x`` and
``g² = d(s²)/dt − 2 (ȧ/a) s²`` (:class:`~difflab.paths.ContinuousPath`), and its time reversal is

    dx = [f(x, t) − g(t)² ∇log p_t(x)] dt + g(t) dW̄,     ∇log p_t(x) = −ε̂/s   (SPEC §4, §6),

run from ``t_max`` down to the data. With the signed step ``h = t' − t < 0`` the Euler–Maruyama step is

    x' = x + [f_coef(t) x + g²(t) ε̂/s] h + g(t) √|h| z,    z ~ N(0, I).

Final step: a step onto the clean end (``s(t') = 0``) returns the denoised ``x̂0 = E[x0 | x_t]`` at ``t``
(Tweedie's formula; Song et al.'s ``denoise=True``) without noise. It costs the one evaluation at ``t``
that the step makes anyway, so NFE = number of steps (× ``1 + corrector_steps`` for PC). Grids from
:mod:`difflab.samplers.time_grids` end there by default. A step from pure noise (``a(t) = 0``, where ``f`` and
``g`` are infinite) is the ancestral draw (:func:`euler_maruyama_step`).
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional

import torch

from difflab.parameterization import Prediction
from difflab.paths import GaussianPath
from difflab.samplers.ancestral import ddpm_step
from difflab.samplers.chain import Samples, denoiser_cost, sample_chain
from difflab.samplers.ode import grid_intervals, report_step, state_dtype
from difflab.utils import append_dims, bcast, randn


def _clean(path: GaussianPath, t_next: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return append_dims(path.s(t_next) == 0, x.ndim).to(x.device)


def euler_maruyama_step(path: GaussianPath, x: torch.Tensor, pred: Prediction, t, t_next,
                        generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One reverse-SDE Euler–Maruyama step ``t → t_next`` (module docstring); ``x̂0`` onto the clean end.

    Where ``a(t) = 0`` (pure noise: the linear path's ``t = 1``, zero terminal SNR) ``f`` and ``g²`` are infinite;
    the step from there is the ancestral draw ``x' ~ q(x_{t'} | x_t, x̂0) = N(a' x̂0, s'² I)`` (the reverse
    transition for a locally constant ``x̂0``; :func:`~difflab.samplers.ancestral.ddpm_step`).
    A chain transition (:func:`~difflab.samplers.chain.sample_chain` signature); ``t, t_next`` are ``[B]``.
    """
    h = bcast(t_next - t, x)
    s = bcast(path.s(t), x)
    z = randn(x.shape, generator, x.device, x.dtype)
    pure_noise = append_dims(path.a(t) == 0, x.ndim).to(x.device)
    if pure_noise.any():
        c_x0, _, var = path.posterior_coefficients(t, t_next)
        from_noise = bcast(c_x0, x) * pred.x0 + bcast(var.sqrt(), x) * z
    drift = bcast(path.f_coef(t), x) * x + bcast(path.g2(t), x) * pred.eps / s
    x_next = x + drift * h + bcast(path.g2(t).sqrt(), x) * (-h).sqrt() * z
    if pure_noise.any():
        x_next = torch.where(pure_noise, from_noise, x_next)
    return torch.where(_clean(path, t_next, x), pred.x0, x_next)


def langevin_step(path: GaussianPath, x: torch.Tensor, pred: Prediction, t, snr: float,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One Langevin corrector step at fixed ``t`` (Song et al. 2021, Alg. 4–5):

        x ← x + δ ∇log p_t(x) + √(2δ) z,    δ = 2 α (snr ‖z‖ / ‖∇log p_t(x)‖)²,

    with ``∇log p_t = −ε̂/s`` and, as in Song et al.'s code, the norms averaged over the batch (a per-example
    ratio explodes for an example that sits on a mode, where its score vanishes, in low dimension).
    ``α = 1`` (Song et al.'s VE value; their VP value ``α_i = 1 − β_i`` is within 2 % of 1 at N = 1000).
    ``snr`` is the target ratio of the step's drift to its noise.
    """
    score = -pred.eps / bcast(path.s(t), x)
    z = randn(x.shape, generator, x.device, x.dtype)
    mean_norm = lambda v: v.reshape(v.shape[0], -1).norm(dim=-1).mean()  # noqa: E731
    delta = 2.0 * (snr * mean_norm(z) / mean_norm(score).clamp(min=1e-30)) ** 2
    return x + delta * score + (2.0 * delta).sqrt() * z


def _sample_transition(denoiser, x, timesteps, step, generator, callback, progress, cond) -> Samples:
    dtype = x.dtype
    grid = torch.as_tensor(timesteps, dtype=torch.float64)
    out = sample_chain(denoiser, x.to(state_dtype(x)), grid, step, generator, callback, progress, **cond)
    return Samples(out.x.to(dtype), out.nfe)


def sample_euler_maruyama(denoiser, x: torch.Tensor, timesteps, generator: Optional[torch.Generator] = None,
                          callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """Reverse-SDE sampling by Euler–Maruyama over a decreasing continuous grid (SPEC §6).

    Args:
        denoiser: ``denoiser(x, t, **cond) -> Prediction`` on a continuous path.
        x: the prior draw at ``timesteps[0]``, e.g. ``path.prior_sample(shape, generator)``.
        timesteps: decreasing float grid (:mod:`difflab.samplers.time_grids`); ending at the clean end
            makes the last step the denoising step ``x̂0``.
    Returns: :class:`Samples` ``(x, nfe)``, NFE = steps. State in ``x``'s precision (:func:`~difflab.samplers.ode.state_dtype`),
    returned in ``x``'s dtype.
    """
    return _sample_transition(denoiser, x, timesteps, euler_maruyama_step, generator, callback, progress, cond)


def sample_ancestral(denoiser, x: torch.Tensor, timesteps, generator: Optional[torch.Generator] = None,
                     callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """Ancestral sampling on a continuous grid, for comparison: draw ``x_{t'} ~ q(x_{t'} | x_t, x̂0)``.

    The DDPM step (SPEC §2–3) with the exact posterior of the path between any two grid times
    (:meth:`~difflab.paths.GaussianPath.posterior_coefficients`); it returns ``x̂0`` onto the clean end.
    """
    return _sample_transition(denoiser, x, timesteps, partial(ddpm_step, variance="beta_tilde"), generator,
                              callback, progress, cond)


@torch.no_grad()
def sample_pc(denoiser, x: torch.Tensor, timesteps, snr: float = 0.16, corrector_steps: int = 1,
              predictor: Callable = euler_maruyama_step, generator: Optional[torch.Generator] = None,
              callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """Predictor–corrector sampling (Song et al. 2021, Alg. 1): at each grid time ``t``, ``corrector_steps``
    Langevin steps (:func:`langevin_step`, signal-to-noise ``snr``; 0.16 is Song et al.'s CIFAR-10 VE value),
    then one ``predictor`` transition ``t → t_next`` (Euler–Maruyama by default; :func:`~difflab.samplers.
    ancestral.ddpm_step` is the ancestral predictor). Onto the clean end the predictor returns ``x̂0``.

    NFE = steps × (1 + corrector_steps), counted. State in ``x``'s precision (:func:`~difflab.samplers.ode.state_dtype`),
    returned in ``x``'s dtype.
    """
    if corrector_steps < 0 or snr < 0:
        raise ValueError(f"need corrector_steps >= 0 and snr >= 0, got {corrector_steps}, {snr}")
    path, dtype = denoiser.path, x.dtype
    x = x.to(state_dtype(x))
    nfe = 0
    for i, (t, t_next) in grid_intervals(timesteps, progress):
        t_b = torch.full((x.shape[0],), t, dtype=torch.float64, device=x.device)
        t_next_b = torch.full_like(t_b, t_next)
        for _ in range(corrector_steps):
            pred = denoiser(x, t_b, **cond)
            nfe += denoiser_cost(denoiser)
            x = langevin_step(path, x, pred, t_b, snr, generator)
        pred = denoiser(x, t_b, **cond)
        nfe += denoiser_cost(denoiser)
        x = predictor(path, x, pred, t_b, t_next_b, generator)
        report_step(callback, i, t, t_next, x, pred)
    return Samples(x.to(dtype), nfe)


SDE_SAMPLERS = {"sde": sample_euler_maruyama, "pc": sample_pc, "ancestral": sample_ancestral}
