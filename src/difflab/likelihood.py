"""Exact likelihood along the probability-flow ODE (instantaneous change of variables; SPEC §6).

For ``dx/dt = v(x, t)`` the density along a trajectory obeys ``d log p_t(x_t)/dt = −∇·v(x_t, t)``, so
integrating the data point forward from ``t_start`` (``≈`` data) to ``t_max`` (noise),

    log p_{t_start}(x) = log p_{t_max}(x_{t_max}) + ∫_{t_start}^{t_max} ∇·v(x_t, t) dt,

with ``v = ȧ x̂0 + ṡ ε̂`` (:class:`~difflab.samplers.ode.ProbabilityFlow`) and ``p_{t_max}`` replaced by the
path's prior ``N(0, s_max² I)`` (:meth:`~difflab.paths.ContinuousPath.prior_logp`; off by ``O(a(t_max)²)``).
The state ``(x, ℓ)`` with ``dℓ/dt = ∇·v`` is integrated by the same Runge–Kutta code as the samplers.

Divergence: ``exact`` takes ``D`` vector–Jacobian products per evaluation (``∇·v = Σ_i ∂v_i/∂x_i``; small
``D``); ``hutchinson`` uses ``∇·v = E[zᵀ (∂v/∂x) z]`` with ``K`` probes ``z`` (Rademacher or Gaussian), drawn
once and held fixed along the solve (so the integrand stays smooth for the adaptive solver). Each probe
gives its own estimate of the integral (one ``ℓ`` channel per probe); the reported ``logp`` is their mean
and ``logp_stderr`` their standard error (``std/√K``), the estimator's Monte-Carlo error.

Bits per dimension for 8-bit data scaled to ``[−1, 1]`` (``x_k = k/127.5 − 1``, bin width ``Δ = 2/255``),
with uniform dequantisation ``y = x + u``, ``u ~ U[−Δ/2, Δ/2)^D`` (the same bins as the ELBO's discretised
decoder): ``P(k) = ∫_bin p(y) dy ≥ Δ^D exp E_u log p(x + u)`` (Jensen), hence

    bits/dim ≤ (−log p(x + u) − D log Δ) / (D ln 2) = (−log p(x + u) + D log 127.5) / (D ln 2),

an upper bound on the discrete model's bits/dim (one ``u`` per example; average over examples).
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

from difflab.elbo import bits_per_dim
from difflab.samplers.ode import EULER, HEUN, RK4, ProbabilityFlow, integrate_adaptive, runge_kutta_step
from difflab.utils import randn

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
FIXED_STEP_SOLVERS = {"euler": EULER, "heun": HEUN, "rk4": RK4}
# −log Δ for 8-bit data on [−1, 1]: bins of width Δ = 2/255 = 1/127.5.
LOG_BIN_WIDTH_INV = math.log(127.5)


def divergence_exact(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``∇·v = Σ_i ∂v_i/∂x_i`` by ``D`` vector–Jacobian products; ``v`` computed from ``x`` with grad, ``[B]``."""
    v_flat = v.reshape(v.shape[0], -1)
    div = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
    for i in range(v_flat.shape[1]):
        (grad,) = torch.autograd.grad(v_flat[:, i].sum(), x, retain_graph=True)
        div = div + grad.reshape(grad.shape[0], -1)[:, i]
    return div


def divergence_hutchinson(v: torch.Tensor, x: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``zᵀ (∂v/∂x) z`` for each probe ``z`` (``probes: (K, *x.shape)``), ``[B, K]``; unbiased when ``E[zzᵀ] = I``."""
    out = []
    for z in probes:
        (jtz,) = torch.autograd.grad((v * z).sum(), x, retain_graph=True)  # (∂v/∂x)ᵀ z
        out.append((jtz * z).reshape(z.shape[0], -1).sum(-1))
    return torch.stack(out, dim=-1)


def draw_probes(shape, num: int, kind: str, generator: Optional[torch.Generator], device, dtype) -> torch.Tensor:
    """``num`` probe tensors of ``shape`` with ``E[zzᵀ] = I``: Rademacher (±1) or standard Gaussian."""
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; choose one of {PROBES}")
    z = randn((num, *shape), generator, device, dtype)
    return torch.sign(z) if kind == "rademacher" else z


def ode_log_likelihood(denoiser, x0: torch.Tensor, solver: str = "rk45", timesteps=None, rtol: float = 1e-5,
                       atol: float = 1e-5, t_start: Optional[float] = None, divergence: str = "exact",
                       probes: int = 1, probe: str = "rademacher", generator: Optional[torch.Generator] = None,
                       **cond) -> Dict[str, torch.Tensor]:
    """``log p(x0)`` in nats under the model's probability-flow ODE (module docstring; SPEC §6).

    Args:
        denoiser: any denoiser on a continuous path (a DDPM model through
            :class:`~difflab.paths.DiscreteTimeContinuation`).
        x0: data ``(B, ...)``.
        solver: ``rk45`` (adaptive Dormand–Prince with ``rtol``/``atol``, from ``t_start`` to ``t_max``), or
            ``euler`` | ``heun`` | ``rk4`` over ``timesteps`` (a decreasing grid from ``t_max`` to ``t_start``,
            e.g. from :mod:`difflab.samplers.time_grids` with ``clean_end=False``, walked in reverse).
        t_start: where the data enters (default ``path.t_min``: 1e-5 on VPPath as in Song et al., 0 on the
            linear path, DDPM step 1 on a continuation); ``v`` must be finite there.
        divergence: ``exact`` | ``hutchinson`` (``probes`` probes of kind ``probe``).
    Returns: ``{"logp": [B], "logp_stderr": [B] (zero for exact), "prior_logp": [B], "delta_logp": [B],
    "nfe": int (network evaluations), "vjp": int (vector–Jacobian products)}``, float64.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; choose one of {DIVERGENCES}")
    if divergence == "hutchinson" and probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    path = denoiser.path
    flow = ProbabilityFlow(denoiser, cond)
    x = x0.detach().to(torch.float64)
    shape, batch = x.shape, x.shape[0]
    dim = x[0].numel()
    channels = 1 if divergence == "exact" else probes
    z = draw_probes(shape, probes, probe, generator, x.device, x.dtype) if divergence == "hutchinson" else None
    vjp = [0]

    def field(t: float, y: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x_t = y[:, :dim].reshape(shape).detach().requires_grad_(True)
            v = flow(t, x_t)
            if divergence == "exact":
                div = divergence_exact(v, x_t).unsqueeze(-1)
                vjp[0] += dim
            else:
                div = divergence_hutchinson(v, x_t, z)
                vjp[0] += probes
        return torch.cat([v.detach().reshape(batch, dim), div.detach()], dim=-1)

    y = torch.cat([x.reshape(batch, dim), torch.zeros(batch, channels, dtype=x.dtype, device=x.device)], dim=-1)
    t0 = float(path.t_min if t_start is None else t_start)
    if solver == "rk45":
        if timesteps is not None:
            raise ValueError("solver='rk45' chooses its own steps; pass rtol/atol, not timesteps")
        y = integrate_adaptive(field, t0, float(path.t_max), y, rtol, atol).y
    elif solver in FIXED_STEP_SOLVERS:
        if timesteps is None:
            raise ValueError(f"solver={solver!r} needs a timesteps grid")
        grid = torch.as_tensor(timesteps, dtype=torch.float64).flip(0).tolist()
        if len(grid) < 2 or any(b <= a for a, b in zip(grid[:-1], grid[1:])):
            raise ValueError("timesteps must be a strictly decreasing grid of at least two times")
        for t, t_next in zip(grid[:-1], grid[1:]):
            y = runge_kutta_step(field, t, y, t_next - t, FIXED_STEP_SOLVERS[solver])[0]
    else:
        raise ValueError(f"unknown solver {solver!r}; choose rk45 or one of {tuple(FIXED_STEP_SOLVERS)}")
    x_T = y[:, :dim].reshape(shape)
    estimates = y[:, dim:]  # [B, K]: one estimate of ∫∇·v dt per probe
    prior = path.prior_logp(x_T)
    delta = estimates.mean(-1)
    stderr = estimates.std(-1) / math.sqrt(channels) if channels > 1 else torch.zeros_like(delta)
    return {"logp": prior + delta, "logp_stderr": stderr, "prior_logp": prior, "delta_logp": delta,
            "nfe": flow.nfe, "vjp": vjp[0]}


def dequantize(x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``x + u``, ``u ~ U[−Δ/2, Δ/2)`` with ``Δ = 2/255``: 8-bit data on ``[−1, 1]`` made continuous."""
    u = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=generator.device if generator else x.device)
    return x + (u.to(x.device) - 0.5) * (2.0 / 255.0)


def dequantized_bits_per_dim(logp: torch.Tensor, num_dims: int) -> torch.Tensor:
    """``(−log p(x + u) + D log 127.5) / (D ln 2)``: bits/dim of 8-bit data on ``[−1, 1]`` (module docstring)."""
    return bits_per_dim(-logp + num_dims * LOG_BIN_WIDTH_INV, num_dims)


def ode_bits_per_dim(denoiser, x: torch.Tensor, generator: Optional[torch.Generator] = None, **kwargs):
    """Dequantise 8-bit data ``x`` on ``[−1, 1]``, run :func:`ode_log_likelihood` (``kwargs``) and report
    ``{"bpd": [B], "bpd_stderr": [B], "nfe": int, ...}`` beside the log-likelihood's own entries."""
    y = dequantize(x.to(torch.float64), generator)
    out = ode_log_likelihood(denoiser, y, generator=generator, **kwargs)
    dim = x[0].numel()
    out["bpd"] = dequantized_bits_per_dim(out["logp"], dim)
    out["bpd_stderr"] = out["logp_stderr"] / (dim * math.log(2.0))
    return out
