"""Discrete noise schedules ``β_1..β_T`` (SPEC §2).

Each function returns a float64 tensor ``betas`` of shape ``(T,)``; ``betas[t-1]`` is ``β_t``.
:class:`difflab.paths.DiscretePath` turns it into ``α_t``, ``ᾱ_t`` and the Gaussian path.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

# β is clipped here so that no single step destroys all signal (Nichol & Dhariwal 2021, §3.2).
MAX_BETA = 0.999


def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """Linear β from ``beta_start`` to ``beta_end`` (Ho et al. 2020; 1e-4..0.02 at T=1000).

    For T ≠ 1000 the endpoints are scaled by 1000/T so the total noise stays comparable.
    """
    _check_T(T)
    scale = 1000.0 / T
    return torch.linspace(beta_start * scale, beta_end * scale, T, dtype=torch.float64)


def cosine(T: int = 1000, s: float = 0.008) -> torch.Tensor:
    """Cosine schedule: ``ᾱ(t) = f(t)/f(0)``, ``f(t) = cos²(((t/T + s)/(1 + s)) π/2)`` (Nichol & Dhariwal 2021, eq. 17)."""
    _check_T(T)
    steps = torch.arange(T + 1, dtype=torch.float64) / T
    f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return betas_from_alpha_bar(f / f[0])


def sigmoid(T: int = 1000, start: float = -3.0, end: float = 3.0, tau: float = 1.0) -> torch.Tensor:
    """Sigmoid schedule on ``ᾱ`` (Chen 2023, "On the importance of noise scheduling", Alg. 1).

    ``ᾱ(t) = (σ(end/τ) − σ((t(end−start)+start)/τ)) / (σ(end/τ) − σ(start/τ))`` for ``t ∈ [0, 1]``.
    """
    _check_T(T)
    t = torch.arange(T + 1, dtype=torch.float64) / T
    v_start, v_end = torch.sigmoid(torch.tensor(start / tau)), torch.sigmoid(torch.tensor(end / tau))
    alpha_bar = (v_end - torch.sigmoid((t * (end - start) + start) / tau)) / (v_end - v_start)
    return betas_from_alpha_bar(alpha_bar.double())


def custom(betas: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Any user array of β values in (0, 1] (1 is allowed only at the last step: zero terminal SNR)."""
    betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if betas.numel() == 0:
        raise ValueError("the beta schedule is empty")
    if not torch.isfinite(betas).all() or (betas <= 0).any() or (betas > 1).any():
        raise ValueError("every beta must lie in (0, 1]")
    if (betas[:-1] >= 1).any():
        raise ValueError("beta = 1 is only allowed at the last step (zero terminal SNR)")
    return betas


def betas_from_alpha_bar(alpha_bar: torch.Tensor, max_beta: float = MAX_BETA) -> torch.Tensor:
    """``β_t = 1 − ᾱ_t/ᾱ_{t−1}`` from ``ᾱ_0..ᾱ_T`` (``T+1`` values, ``ᾱ_0`` first), clipped at ``max_beta``."""
    betas = 1.0 - alpha_bar[1:] / alpha_bar[:-1]
    return betas.clamp(min=1e-12, max=max_beta)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale so that ``ᾱ_T = 0`` (zero terminal SNR) keeping ``ᾱ_1`` (Lin et al. 2024, Alg. 1).

    ``√ᾱ`` is shifted so its last value is 0 and scaled so its first is unchanged; the last β becomes 1.
    """
    alpha_bar_sqrt = torch.cumprod(1.0 - betas.double(), 0).sqrt()
    first, last = alpha_bar_sqrt[0].clone(), alpha_bar_sqrt[-1].clone()
    alpha_bar_sqrt = (alpha_bar_sqrt - last) * first / (first - last)
    alpha_bar = alpha_bar_sqrt**2
    alphas = torch.cat([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


# The first grid time of :func:`vp`: DDGAN's ``eps_small`` (Xiao et al. 2022, ``get_sigma_schedule``), so that the
# first step starts just above clean data rather than at t = 0, where the VP SDE's β(t) is smallest.
VP_T_MIN = 1e-3


def vp(T: int = 4, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = VP_T_MIN) -> torch.Tensor:
    """The VP SDE sampled at ``T + 1`` equally spaced times ``τ_i = t_min + (i/T)(1 − t_min)`` (DDGAN's schedule,
    Xiao et al. 2022, ``get_sigma_schedule``; SPEC §5): ``ᾱ(τ) = exp(−β_min τ − ½(β_max − β_min) τ²)`` (the
    :class:`~difflab.paths.VPPath` signal ``a(τ)²``, SPEC §6) and ``β_i = 1 − ᾱ(τ_i)/ᾱ(τ_{i−1})``, unclipped.

    For a handful of large steps (T ∈ {1, 2, 4, 8}) the steps are coarse but the last one reaches
    ``ᾱ_T = exp(−10.05)``; T = 1 is a plain GAN from ``N(0, I)``.
    """
    _check_T(T)
    tau = t_min + torch.arange(T + 1, dtype=torch.float64) / T * (1.0 - t_min)
    alpha_bar = torch.exp(-beta_min * tau - 0.5 * (beta_max - beta_min) * tau**2)
    return betas_from_alpha_bar(alpha_bar, max_beta=1.0)


SCHEDULES = {"linear": linear, "cosine": cosine, "sigmoid": sigmoid, "vp": vp}


def make_betas(name: str = "linear", T: int = 1000, zero_terminal_snr: bool = False, **kwargs) -> torch.Tensor:
    """A named schedule (``linear``, ``cosine``, ``sigmoid``), optionally rescaled to zero terminal SNR."""
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)} or pass an array to custom()")
    betas = SCHEDULES[name](T, **kwargs)
    return rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas


def _check_T(T: int) -> None:
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"T must be a positive integer, got {T!r}")
