"""Equivalences between paths: one model on any Gaussian path, and DDIM ≡ rectified-flow Euler (SPEC §6).

Two Gaussian paths with marginals ``x = a x0 + s ε`` and ``x' = a' x0 + s' ε`` describe the same noisy data
wherever their log-SNRs agree: at times ``t, t'`` with ``s/a = s'/a' = σ̄``, ``x' = (a'/a) x`` carries exactly
the same information about ``(x0, ε)``, so ``E[x0 | x']`` and ``E[ε | x']`` are the denoiser's ``x̂0``, ``ε̂``
at ``(x, t)``. Hence :func:`change_path` re-times any model onto any other path exactly.

In the scale-free coordinates ``x̄ = x/a``, ``σ̄ = s/a`` the PF-ODE is ``dx̄/dσ̄ = ε̂``, and a deterministic DDIM
step ``x_{t'} = a' x̂0 + s' ε̂`` reads ``x̄' = x̂0 + σ̄' ε̂ = x̄ + (σ̄' − σ̄) ε̂``: Euler in ``σ̄``. On the linear path
``x = (1−t) x0 + t ε`` the same roles are played by ``x/(1−t)`` and ``t/(1−t)``, and Euler in ``t`` is again
``x_{t'} = (1−t') x̂0 + t' ε̂``. So DDIM on any grid equals Euler on the linear path at the matched times

    t_lin = σ̄/(1 + σ̄) = s/(a + s),       x_lin = x (1 − t_lin)/a = x/(a + s),

which :func:`ddim_to_linear` returns; the test suite checks the two samplers agree to float64 rounding.
"""

from __future__ import annotations

import torch

from difflab.paths import ContinuousPath, GaussianPath
from difflab.utils import bcast


def matching_time(src: GaussianPath, t, dst: ContinuousPath) -> torch.Tensor:
    """The time on ``dst`` with the same log-SNR as ``src`` at ``t`` (float64, shaped like ``t``)."""
    return dst.t_from_log_snr(src.log_snr(torch.as_tensor(t)))


def ddim_to_linear(path: GaussianPath, timesteps):
    """Map a DDIM grid on ``path`` to the linear (rectified-flow) path: ``(t_lin, scale)`` with
    ``t_lin = s/(a + s)`` and ``x_lin = scale · x``, ``scale = 1/(a + s)`` (SPEC §6 last bullet). float64."""
    t = torch.as_tensor(timesteps)
    a, s = path.a(t).to(torch.float64), path.s(t).to(torch.float64)
    return s / (a + s), 1.0 / (a + s)


class PathChange:
    """A denoiser on ``source.path`` seen on another path ``path`` (exact; module docstring).

    At time ``τ`` on ``path`` it calls the source at ``t = matching_time(path, τ, source.path)`` on
    ``x · k`` with ``k = a_src(t)/a(τ) = s_src(t)/s(τ) = (a_src + s_src)/(a + s)`` (the last form is finite at
    both ends, where ``a`` or ``s`` vanishes) and returns the source's prediction unchanged (``x̂0`` and ``ε̂``
    are path-free). NFE passes through (``last_nfe``).
    """

    def __init__(self, source, path: ContinuousPath):
        if not isinstance(source.path, ContinuousPath):
            raise ValueError("the source model needs a continuous path (wrap a DiscretePath in DiscreteTimeContinuation)")
        self.source, self.path = source, path

    @property
    def last_nfe(self) -> int:
        return int(getattr(self.source, "last_nfe", 1))

    def __call__(self, x: torch.Tensor, t, **cond):
        tau = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        t_src = matching_time(self.path, tau, self.source.path)
        src = self.source.path
        scale = (src.a(t_src) + src.s(t_src)) / (self.path.a(tau) + self.path.s(tau))
        return self.source(x * bcast(scale, x), t_src, **cond)


def change_path(denoiser, path: ContinuousPath) -> PathChange:
    """``denoiser`` re-timed onto ``path`` (e.g. :class:`~difflab.paths.EDMPath`, where the PF-ODE is ``dx/dσ = ε̂``)."""
    return PathChange(denoiser, path)
