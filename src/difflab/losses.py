"""Training losses: ``L_simple`` and its weightings (SPEC §3).

Every loss here is the same ε-MSE with a per-time weight. With ``SNR = a²/s²`` the target-space
errors relate to the ε error exactly (SPEC §4):

    ||x0 − x̂0||² = ||ε − ε̂||² / SNR,        ||v − v̂||² = (a² + s²)² / a² · ||ε − ε̂||²,

so regressing ``x0`` is ε-MSE with weight ``1/SNR`` and regressing ``v`` on a variance-preserving path
is weight ``1 + 1/SNR``. :func:`eps_space_weight` states each weighting in ε-space; the loss itself is
computed in the network's own target space (no division by ``a`` or ``s`` at the ends of the path).
Weightings: ``none`` (plain MSE in the target space), ``snr`` (ε-space weight ``SNR``),
``min_snr`` (ε-space weight ``min(SNR, γ)/SNR``, Hang et al. 2023) and ``truncated_snr``
(ε-space weight ``max(SNR, 1)/SNR``: the x0-MSE ``1/SNR`` floored at 1, Salimans & Ho 2022).
"""

from __future__ import annotations

from typing import Optional

import torch

from difflab.parameterization import NetworkDenoiser, from_x0_eps
from difflab.paths import GaussianPath
from difflab.utils import mean_except_batch, randn

WEIGHTINGS = ("none", "snr", "min_snr", "truncated_snr")


def target_eps_factor(path: GaussianPath, t: torch.Tensor, target: str) -> torch.Tensor:
    """``||target − target̂||² / ||ε − ε̂||²`` for a prediction error at fixed ``x_t`` (SPEC §4)."""
    a, s = path.a(t), path.s(t)
    if target == "eps":
        return torch.ones_like(a)
    if target == "x0":
        return s**2 / a**2
    if target == "v":
        return (a**2 + s**2) ** 2 / a**2
    if target == "score":
        return 1.0 / s**2
    if target == "velocity":
        a_dot, s_dot = path.a_dot(t), path.s_dot(t)
        return ((a * s_dot - s * a_dot) / a) ** 2
    raise ValueError(f"unknown target {target!r}")


def eps_space_weight(path: GaussianPath, t: torch.Tensor, target: str, weighting: str = "none",
                     min_snr_gamma: float = 5.0) -> torch.Tensor:
    """The loss of (target, weighting) written as ``w(t) ||ε − ε̂||²``; returns ``w(t)``."""
    snr = path.snr(t)
    if weighting == "none":
        return target_eps_factor(path, t, target)
    if weighting == "snr":
        return snr
    if weighting == "min_snr":
        return torch.clamp(snr, max=min_snr_gamma) / snr
    if weighting == "truncated_snr":
        return torch.clamp(snr, min=1.0) / snr
    raise ValueError(f"unknown weighting {weighting!r}; choose one of {WEIGHTINGS}")


def sample_time(path: GaussianPath, batch: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
    """Training times: uniform on ``{1..T}`` (discrete) or on ``[t_min, t_max]`` (continuous), ``[B]``."""
    gen_device = generator.device if generator is not None else device
    if getattr(path, "discrete", False):
        return torch.randint(1, path.T + 1, (batch,), generator=generator, device=gen_device).to(device)
    u = torch.rand(batch, generator=generator, device=gen_device, dtype=torch.float64).to(device)
    return path.t_min + (path.t_max - path.t_min) * u


def target_error(denoiser: NetworkDenoiser, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                 **cond) -> torch.Tensor:
    """The squared error ``(target − target̂)²`` of every entry of ``x0`` at ``x_t = a_t x0 + s_t ε`` (SPEC §3, §4),
    in ``denoiser.target`` space, shaped like ``x0`` (callers reduce it: :func:`diffusion_loss`, or per resolution
    :func:`difflab.matryoshka.multiresolution_loss`)."""
    path = denoiser.path
    x_t, _ = path.sample(x0, t, eps)
    out = denoiser.raw(x_t, t, **cond).to(x0.dtype)
    if denoiser.learned_variance:
        out = out.chunk(2, dim=1)[0]
    return (out - from_x0_eps(x0, eps, x_t, t, path, denoiser.target)) ** 2


def diffusion_loss(denoiser: NetworkDenoiser, x0: torch.Tensor, weighting: str = "none",
                   t: Optional[torch.Tensor] = None, eps: Optional[torch.Tensor] = None,
                   generator: Optional[torch.Generator] = None, min_snr_gamma: float = 5.0, **cond) -> torch.Tensor:
    """Per-example ``w(t) · mean||target − target̂||²`` on ``x_t = a_t x0 + s_t ε`` (SPEC §3), ``[B]``.

    With ``target='eps'`` and ``weighting='none'`` this is ``L_simple``. ``t`` and ``ε`` are drawn
    when not given. The regression happens in ``denoiser.target`` space; other weightings multiply by
    ``eps_space_weight / target_eps_factor`` so the ε-space weight is exactly as documented.
    """
    path, target = denoiser.path, denoiser.target
    B = x0.shape[0]
    if t is None:
        t = sample_time(path, B, generator, x0.device)
    if eps is None:
        eps = randn(x0.shape, generator, x0.device, x0.dtype)
    mse = mean_except_batch(target_error(denoiser, x0, t, eps, **cond))
    if weighting == "none":
        return mse
    w = eps_space_weight(path, t, target, weighting, min_snr_gamma) / target_eps_factor(path, t, target)
    return w.to(mse.dtype) * mse
