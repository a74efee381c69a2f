"""Gaussian toolkit (SPEC §1).

Everything the paper builds on: log-densities, the quadratic-expectation identity, the
re-parameterisation trick, the product of two Gaussian densities and the KL divergence between
Gaussians, plus the discretised Gaussian log-likelihood used by the ELBO's ``L_0`` term (SPEC §3).

Conventions: the last dimension is the event dimension for full-covariance functions
(``x: (..., D)``, ``cov: (..., D, D)``); diagonal functions take element-wise variances of the same
shape as ``x`` and sum over every non-batch dimension, returning one value per example ``[B]``.
"""

from __future__ import annotations

import math

import torch

from difflab.utils import sum_except_batch

LOG_2PI = math.log(2.0 * math.pi)


def log_normal(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """``log N(x; μ, Σ) = -½[(x-μ)ᵀΣ⁻¹(x-μ) + log det(2πΣ)]`` (SPEC §1), full covariance.

    Args: x, mean ``(..., D)``; cov ``(..., D, D)`` symmetric positive definite.
    Returns: ``(...)``.
    """
    d = x.shape[-1]
    chol = torch.linalg.cholesky(cov)
    diff = (x - mean).unsqueeze(-1)
    sol = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
    maha = (sol**2).sum(-1)
    logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (maha + logdet + d * LOG_2PI)


def log_normal_diag(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Diagonal-covariance ``log N(x; μ, diag(var))`` summed over all but the batch dim, ``[B]``."""
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device).expand_as(x)
    return sum_except_batch(-0.5 * ((x - mean) ** 2 / var + torch.log(var) + LOG_2PI))


def quadratic_expectation(mean, cov, a, A) -> torch.Tensor:
    """``E[(x-a)ᵀA(x-a)] = tr(AΣ) + (μ-a)ᵀA(μ-a)`` for ``x ~ N(μ, Σ)`` (SPEC §1)."""
    diff = (mean - a).unsqueeze(-1)
    return torch.diagonal(A @ cov, dim1=-2, dim2=-1).sum(-1) + (diff.transpose(-1, -2) @ A @ diff)[..., 0, 0]


def reparameterize(mean, cov_sqrt, eps) -> torch.Tensor:
    """``x = μ + Σ^{½} ε`` (SPEC §1). ``cov_sqrt`` is any square root (e.g. Cholesky factor) ``(..., D, D)``."""
    return mean + (cov_sqrt @ eps.unsqueeze(-1)).squeeze(-1)


def product(mean1, cov1, mean2, cov2):
    """Product of two Gaussian densities in x (SPEC §1).

    ``N(x; μ1, Σ1) N(x; μ2, Σ2) ∝ N(x; μ, Σ)`` with precision ``Σ⁻¹ = Σ1⁻¹ + Σ2⁻¹`` and the
    precision-weighted mean ``μ = Σ(Σ1⁻¹μ1 + Σ2⁻¹μ2)``.

    Returns: ``(mean, cov)``.
    """
    p1, p2 = torch.linalg.inv(cov1), torch.linalg.inv(cov2)
    cov = torch.linalg.inv(p1 + p2)
    mean = (cov @ (p1 @ mean1.unsqueeze(-1) + p2 @ mean2.unsqueeze(-1))).squeeze(-1)
    return mean, cov


def product_diag(mean1, var1, mean2, var2):
    """Element-wise (diagonal) version of :func:`product`; returns ``(mean, var)``."""
    var = 1.0 / (1.0 / var1 + 1.0 / var2)
    return var * (mean1 / var1 + mean2 / var2), var


def kl_normal(mean1, cov1, mean2, cov2) -> torch.Tensor:
    """``KL(N(μ1,Σ1) || N(μ2,Σ2)) = ½[tr(Σ2⁻¹Σ1) + (μ2-μ1)ᵀΣ2⁻¹(μ2-μ1) - D + log det Σ2 - log det Σ1]`` (SPEC §1)."""
    d = mean1.shape[-1]
    chol2 = torch.linalg.cholesky(cov2)
    inv2 = torch.cholesky_inverse(chol2)
    diff = (mean2 - mean1).unsqueeze(-1)
    trace = torch.diagonal(inv2 @ cov1, dim1=-2, dim2=-1).sum(-1)
    maha = (diff.transpose(-1, -2) @ inv2 @ diff)[..., 0, 0]
    logdet2 = 2.0 * torch.log(torch.diagonal(chol2, dim1=-2, dim2=-1)).sum(-1)
    logdet1 = torch.linalg.slogdet(cov1)[1]
    return 0.5 * (trace + maha - d + logdet2 - logdet1)


def kl_normal_diag(mean1, var1, mean2, var2) -> torch.Tensor:
    """Diagonal KL, summed over all but the batch dim, ``[B]``. Variances broadcast against the means."""
    var1 = torch.as_tensor(var1, dtype=mean1.dtype, device=mean1.device).expand_as(mean1)
    var2 = torch.as_tensor(var2, dtype=mean1.dtype, device=mean1.device).expand_as(mean1)
    kl = 0.5 * (var1 / var2 + (mean2 - mean1) ** 2 / var2 - 1.0 + torch.log(var2) - torch.log(var1))
    return sum_except_batch(kl)


def _std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


# Half a bin of 8-bit data scaled to [-1, 1]: 256 bins of width 2/255.
HALF_BIN_8BIT = 1.0 / 255.0


def discretized_gaussian_log_likelihood(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor,
                                        half_bin: float = HALF_BIN_8BIT) -> torch.Tensor:
    """``log p(x)`` of 8-bit data on [-1, 1] under a Gaussian discretised to 256 bins (SPEC §3, ``L_0``).

    Each interior value owns the bin ``[x - 1/255, x + 1/255]``; the edge bins extend to ±∞, so the
    256 probabilities sum to one exactly. Args: ``x`` in [-1, 1] on the 8-bit grid; ``mean`` and
    ``log_scale`` (log standard deviation) broadcastable to ``x``. Returns: per-element log-probabilities.
    """
    log_scale = torch.as_tensor(log_scale, dtype=x.dtype, device=x.device)
    inv_std = torch.exp(-log_scale)
    centered = x - mean
    cdf_plus = _std_normal_cdf(inv_std * (centered + half_bin))
    cdf_minus = _std_normal_cdf(inv_std * (centered - half_bin))
    tiny = 1e-12
    log_cdf_plus = torch.log(cdf_plus.clamp(min=tiny))
    log_one_minus_cdf_minus = torch.log((1.0 - cdf_minus).clamp(min=tiny))
    log_delta = torch.log((cdf_plus - cdf_minus).clamp(min=tiny))
    edge = 1.0 - half_bin  # values within half a bin of ±1 are the edge bins
    return torch.where(x < -edge, log_cdf_plus, torch.where(x > edge, log_one_minus_cdf_minus, log_delta))
