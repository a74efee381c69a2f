"""The variational bound, term by term, and bits/dim (SPEC §3).

    −log p_θ(x0) ≤ L_T + Σ_{t=2..T} L_{t−1} + L_0
    L_T     = KL(q(x_T | x0) || N(0, I))
    L_{t−1} = KL(q(x_{t−1} | x_t, x0) || p_θ(x_{t−1} | x_t))
            = β_t² / (2 σ_t² α_t (1−ᾱ_t)) · ||ε − ε_θ||²  (+ variance terms unless σ_t² = β̃_t)
    L_0     = −log p_θ(x0 | x1)   (discretised Gaussian on 256 bins, or a Gaussian density for continuous data)

Every term is returned per example ``[B]`` in nats, named as in the paper; the caller reduces.
The sum over ``t`` is exact (every ``t = 2..T`` visited once per example, one ``x_t`` draw each).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from difflab import gaussian
from difflab.paths import DiscretePath
from difflab.samplers.ancestral import ddpm_variance
from difflab.utils import bcast, randn, sum_except_batch

DECODERS = ("gaussian", "discretized")


def prior_kl(path: DiscretePath, x0: torch.Tensor) -> torch.Tensor:
    """``L_T = KL(N(a_T x0, s_T² I) || N(0, I))``, ``[B]``."""
    T = torch.tensor(path.T, device=x0.device)
    mean, var = path.marginal(x0, T)
    return gaussian.kl_normal_diag(mean, var, torch.zeros_like(x0), torch.ones_like(x0))


def term_kl(denoiser, x0: torch.Tensor, t: int, variance: str = "beta_tilde",
            generator: Optional[torch.Generator] = None, eps: Optional[torch.Tensor] = None, **cond) -> torch.Tensor:
    """``L_{t−1}`` for one ``t ≥ 2`` at one draw of ``x_t ~ q(x_t | x0)``, ``[B]`` (SPEC §3)."""
    path = denoiser.path
    B = x0.shape[0]
    t_b = torch.full((B,), t, device=x0.device, dtype=torch.long)
    if eps is None:
        eps = randn(x0.shape, generator, x0.device, x0.dtype)
    x_t, _ = path.sample(x0, t_b, eps)
    pred = denoiser(x_t, t_b, **cond)
    mean_q, var_q = path.posterior(x_t, x0, t_b, t_b - 1)
    mean_p, _ = path.posterior(x_t, pred.x0, t_b, t_b - 1)
    var_p = ddpm_variance(path, pred, t_b, t_b - 1, variance)
    var_p = bcast(var_p, x0) if var_p.ndim <= 1 else var_p
    return gaussian.kl_normal_diag(mean_q, var_q, mean_p, var_p)


def decoder_nll(denoiser, x0: torch.Tensor, variance: str = "beta_tilde", decoder: str = "gaussian",
                generator: Optional[torch.Generator] = None, **cond) -> torch.Tensor:
    """``L_0 = −log p_θ(x0 | x1)`` with ``p_θ(x0|x1) = N(μ_θ(x1, 1), σ_1²)``, ``[B]``.

    ``decoder='discretized'`` integrates that Gaussian over the 256 bins of 8-bit data on [-1, 1];
    ``'gaussian'`` uses its density (continuous data, e.g. the test beds). At ``t = 1`` ``β̃_1 = 0``,
    so ``beta_tilde`` uses ``β̃_2`` instead (improved DDPM's clipped log-variance); ``beta`` uses ``β_1``.
    """
    path = denoiser.path
    B = x0.shape[0]
    one = torch.ones(B, device=x0.device, dtype=torch.long)
    x1, _ = path.sample(x0, one, generator=generator)
    pred = denoiser(x1, one, **cond)
    mean = pred.x0  # μ̃_1(x1, x̂0) = x̂0 since ᾱ_0 = 1
    if variance == "beta":
        var = path.beta(one)
    elif variance == "beta_tilde":
        var = path.posterior_variance(one + 1)
    elif variance == "learned":
        v = pred.var_interp
        log_var = v * bcast(torch.log(path.beta(one)), v) + (1 - v) * bcast(torch.log(path.posterior_variance(one + 1)), v)
        var = torch.exp(log_var)
    else:
        raise ValueError(f"unknown variance {variance!r}")
    var = bcast(var, x0) if var.ndim <= 1 else var
    if decoder == "gaussian":
        return -gaussian.log_normal_diag(x0, mean, var)
    if decoder == "discretized":
        return -sum_except_batch(gaussian.discretized_gaussian_log_likelihood(x0, mean, 0.5 * torch.log(var)))
    raise ValueError(f"unknown decoder {decoder!r}; choose one of {DECODERS}")


@torch.no_grad()
def elbo_terms(denoiser, x0: torch.Tensor, variance: str = "beta_tilde", decoder: str = "gaussian",
               generator: Optional[torch.Generator] = None, progress: bool = False, **cond) -> Dict[str, torch.Tensor]:
    """All ELBO terms per example, in nats: ``{"L_T", "L_mid", "L_0", "total"}`` each ``[B]`` (SPEC §3).

    ``L_mid = Σ_{t=2..T} L_{t−1}`` is the exact sum over every ``t`` (``T − 1`` network calls of batch B).
    """
    from tqdm.auto import tqdm

    path = denoiser.path
    if not isinstance(path, DiscretePath):
        raise TypeError("the discrete ELBO needs a DiscretePath; use difflab.likelihood for the ODE")
    L_T = prior_kl(path, x0)
    L_mid = torch.zeros_like(L_T)
    for t in tqdm(range(2, path.T + 1), disable=not progress, desc="ELBO", leave=False):
        L_mid = L_mid + term_kl(denoiser, x0, t, variance, generator, **cond)
    L_0 = decoder_nll(denoiser, x0, variance, decoder, generator, **cond)
    return {"L_T": L_T, "L_mid": L_mid, "L_0": L_0, "total": L_T + L_mid + L_0}


def bits_per_dim(nats: torch.Tensor, num_dims: int) -> torch.Tensor:
    """bits/dim = nats / (D · ln 2) (SPEC §3)."""
    return nats / (num_dims * math.log(2.0))
