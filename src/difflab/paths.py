"""Gaussian probability paths ``x_t = a_t x0 + s_t ε`` (SPEC §2, §4, §6).

Notation map (SPEC §4): ``a`` is the signal scale ``a_t = √ᾱ_t``, ``s`` the noise scale
``s_t = √(1−ᾱ_t)``; ``a_dot``/``s_dot`` their time derivatives (continuous paths only).

One abstraction serves discrete DDPM time (:class:`DiscretePath`, integer ``t ∈ {0..T}``) and
continuous time (:class:`ContinuousPath` subclasses, ``t ∈ [t_min, t_max]``). Samplers, losses and
the parameterisation wrapper only ever ask a path for ``a(t)`` and ``s(t)`` (and, for the velocity
target, ``a_dot``/``s_dot``), so any path plugs into any of them.
"""

from __future__ import annotations

import math

import torch

from difflab import schedules
from difflab.utils import bcast, randn


class GaussianPath:
    """Base class: a family of marginals ``q(x_t | x0) = N(a_t x0, s_t² I)``.

    Subclasses implement :meth:`a` and :meth:`s` for a ``[B]`` (or scalar) time tensor and set
    ``t_min``/``t_max`` (clean end / noise end).
    """

    t_min: float = 0.0
    t_max: float = 1.0
    discrete: bool = False

    def a(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def s(self, t: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def a_dot(self, t: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a discrete-time path: it has no time derivative")

    def s_dot(self, t: torch.Tensor) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} is a discrete-time path: it has no time derivative")

    # --- derived quantities -------------------------------------------------------------
    def snr(self, t) -> torch.Tensor:
        """``SNR_t = a_t² / s_t²`` (SPEC §2)."""
        return self.a(t) ** 2 / self.s(t) ** 2

    def log_snr(self, t) -> torch.Tensor:
        """``λ_t = log(a_t² / s_t²)``."""
        return 2.0 * (torch.log(self.a(t)) - torch.log(self.s(t)))

    def sample(self, x0: torch.Tensor, t, eps: torch.Tensor | None = None,
               generator: torch.Generator | None = None):
        """Draw ``x_t = a_t x0 + s_t ε`` from ``q(x_t | x0)`` (SPEC §2). Returns ``(x_t, ε)``."""
        if eps is None:
            eps = randn(x0.shape, generator, x0.device, x0.dtype)
        t = torch.as_tensor(t, device=x0.device)
        return bcast(self.a(t), x0) * x0 + bcast(self.s(t), x0) * eps, eps

    def marginal(self, x0: torch.Tensor, t):
        """Mean and variance of ``q(x_t | x0)``: ``(a_t x0, s_t²)``."""
        t = torch.as_tensor(t, device=x0.device)
        return bcast(self.a(t), x0) * x0, bcast(self.s(t) ** 2, x0)

    def posterior_coefficients(self, t, t_prev):
        """Coefficients of ``q(x_{t'} | x_t, x0) = N(c_x0·x0 + c_xt·x_t, var)`` for ``t' < t``.

        For the Markov forward process with these marginals, ``x_t | x_{t'} ~ N(α_{t|t'} x_{t'}, σ²_{t|t'})``
        with ``α_{t|t'} = a_t/a_{t'}`` and ``σ²_{t|t'} = s_t² − α_{t|t'}² s_{t'}²``; Bayes' rule (the product of
        Gaussians, SPEC §1) gives ``c_xt = α_{t|t'} s_{t'}²/s_t²``, ``c_x0 = a_{t'} σ²_{t|t'}/s_t²``,
        ``var = σ²_{t|t'} s_{t'}²/s_t²``. For consecutive DDPM steps these are exactly SPEC §2's
        ``μ̃_t`` and ``β̃_t``. Returns ``(c_x0, c_xt, var)`` as tensors shaped like ``t``.
        """
        a_t, s_t, a_p, s_p = self.a(t), self.s(t), self.a(t_prev), self.s(t_prev)
        alpha_ts = a_t / a_p
        var_ts = (s_t**2 - alpha_ts**2 * s_p**2).clamp(min=0.0)
        return a_p * var_ts / s_t**2, alpha_ts * s_p**2 / s_t**2, var_ts * s_p**2 / s_t**2

    def posterior(self, x_t: torch.Tensor, x0: torch.Tensor, t, t_prev):
        """Exact reverse posterior ``q(x_{t'} | x_t, x0)`` (SPEC §2): returns ``(mean, var)``."""
        t = torch.as_tensor(t, device=x_t.device)
        t_prev = torch.as_tensor(t_prev, device=x_t.device)
        c_x0, c_xt, var = self.posterior_coefficients(t, t_prev)
        return bcast(c_x0, x_t) * x0 + bcast(c_xt, x_t) * x_t, bcast(var, x_t)

    def prior_sample(self, shape, generator: torch.Generator | None = None, device=None,
                     dtype=torch.float32) -> torch.Tensor:
        """Draw ``x_{t_max}`` from the prior ``N(0, s_max² I)`` (the path's signal at ``t_max`` is
        assumed negligible, or exactly zero for zero-terminal-SNR and linear paths)."""
        s_max = float(self.s(torch.tensor(self.t_max, dtype=torch.float64)))
        return s_max * randn(shape, generator, device, dtype)

    def prior_std(self) -> float:
        return float(self.s(torch.tensor(self.t_max, dtype=torch.float64)))


class DiscretePath(GaussianPath):
    """The DDPM forward process for a β schedule (SPEC §2); time is an integer ``t ∈ {0, …, T}``.

    ``alphas[t] = α_t = 1 − β_t`` and ``alpha_bar[t] = ᾱ_t = ∏_{s≤t} α_s`` are stored for
    ``t = 0..T`` with ``α_0 = ᾱ_0 = 1`` (so index ``t`` is step ``t``, no off-by-one), in float64.
    """

    discrete = True
    t_min = 0

    def __init__(self, betas: torch.Tensor):
        betas = schedules.custom(betas)
        self.T = int(betas.numel())
        self.t_max = self.T
        one = torch.ones(1, dtype=torch.float64)
        self.betas = torch.cat([torch.zeros(1, dtype=torch.float64), betas])  # betas[t] = β_t, β_0 = 0
        self.alphas = 1.0 - self.betas
        self.alpha_bar = torch.cat([one, torch.cumprod(betas.new_ones(()) - betas, 0)])
        self._device_cache: dict = {}

    @classmethod
    def from_schedule(cls, name: str = "linear", T: int = 1000, zero_terminal_snr: bool = False, **kwargs):
        return cls(schedules.make_betas(name, T, zero_terminal_snr=zero_terminal_snr, **kwargs))

    def _table(self, name: str, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        key = (name, t.device)
        table = self._device_cache.get(key)
        if table is None:
            table = self._device_cache[key] = getattr(self, name).to(t.device)
        idx = t.long() if not t.is_floating_point() else t.round().long()
        if (idx < 0).any() or (idx > self.T).any():
            raise ValueError(f"discrete time must lie in 0..{self.T}")
        return table[idx]

    def a(self, t):
        return self._table("alpha_bar", t).sqrt()

    def s(self, t):
        return (1.0 - self._table("alpha_bar", t)).sqrt()

    def beta(self, t):
        return self._table("betas", t)

    def alpha(self, t):
        return self._table("alphas", t)

    def posterior_variance(self, t):
        """``β̃_t = (1−ᾱ_{t−1})/(1−ᾱ_t) β_t`` (SPEC §2), for ``t ≥ 1``."""
        t = torch.as_tensor(t)
        ab, ab_prev = self._table("alpha_bar", t), self._table("alpha_bar", t - 1)
        return (1.0 - ab_prev) / (1.0 - ab) * self._table("betas", t)

    def transition(self, x_prev: torch.Tensor, t, generator: torch.Generator | None = None) -> torch.Tensor:
        """One forward step ``x_t ~ q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I)`` (SPEC §2)."""
        t = torch.as_tensor(t, device=x_prev.device)
        eps = randn(x_prev.shape, generator, x_prev.device, x_prev.dtype)
        return bcast(self.alpha(t).sqrt(), x_prev) * x_prev + bcast(self.beta(t).sqrt(), x_prev) * eps

    def config(self) -> dict:
        return {"kind": "discrete", "betas": self.betas[1:].tolist()}


class ContinuousPath(GaussianPath):
    """A path in continuous time ``t ∈ [t_min, t_max]`` with differentiable ``a(t)``, ``s(t)``.

    Subclasses give closed forms for ``a``, ``s``, ``a_dot``, ``s_dot``; the SDE view (drift ``f``,
    diffusion ``g``, SPEC §6) follows from them: for ``x_t = a x0 + s ε`` the linear SDE
    ``dx = (ȧ/a) x dt + g dW`` with ``g² = 2 s ṡ − 2 (ȧ/a) s²`` has exactly these marginals.
    """

    def f_coef(self, t) -> torch.Tensor:
        """Drift coefficient ``f(x, t) = f_coef(t) · x`` with ``f_coef = ȧ/a``."""
        return self.a_dot(t) / self.a(t)

    def g2(self, t) -> torch.Tensor:
        """Squared diffusion ``g(t)² = d(s²)/dt − 2 (ȧ/a) s²``."""
        s = self.s(t)
        return (2.0 * s * self.s_dot(t) - 2.0 * self.f_coef(t) * s**2).clamp(min=0.0)


class LinearPath(ContinuousPath):
    """Rectified-flow path ``x_t = (1−t) x0 + t ε`` on ``t ∈ [0, 1]`` (SPEC §6)."""

    def a(self, t):
        return 1.0 - torch.as_tensor(t, dtype=torch.float64)

    def s(self, t):
        return torch.as_tensor(t, dtype=torch.float64)

    def a_dot(self, t):
        return -torch.ones_like(torch.as_tensor(t, dtype=torch.float64))

    def s_dot(self, t):
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))


class VPPath(ContinuousPath):
    """Variance-preserving path with linear ``β(t) = β_min + t(β_max − β_min)`` (Song et al. 2021; SPEC §6).

    ``a(t) = exp(−½ ∫_0^t β)``, ``s(t) = √(1 − a(t)²)``; ``β_min=0.1, β_max=20`` is the continuous limit
    of the DDPM linear schedule with T=1000.
    """

    def __init__(self, beta_min: float = 0.1, beta_max: float = 20.0, t_min: float = 1e-5):
        self.beta_min, self.beta_max, self.t_min = beta_min, beta_max, t_min

    def _int_beta(self, t):
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.beta_min * t + 0.5 * (self.beta_max - self.beta_min) * t**2

    def beta(self, t):
        return self.beta_min + torch.as_tensor(t, dtype=torch.float64) * (self.beta_max - self.beta_min)

    def a(self, t):
        return torch.exp(-0.5 * self._int_beta(t))

    def s(self, t):
        return (-torch.expm1(-self._int_beta(t))).sqrt()

    def a_dot(self, t):
        return -0.5 * self.beta(t) * self.a(t)

    def s_dot(self, t):
        return 0.5 * self.beta(t) * self.a(t) ** 2 / self.s(t)


class TrigPath(ContinuousPath):
    """Trigonometric path ``a = cos(πt/2)``, ``s = sin(πt/2)`` (variance preserving)."""

    def a(self, t):
        return torch.cos(0.5 * math.pi * torch.as_tensor(t, dtype=torch.float64))

    def s(self, t):
        return torch.sin(0.5 * math.pi * torch.as_tensor(t, dtype=torch.float64))

    def a_dot(self, t):
        return -0.5 * math.pi * self.s(t)

    def s_dot(self, t):
        return 0.5 * math.pi * self.a(t)

