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

from difflab import gaussian, schedules
from difflab.utils import bcast, randn

# Halvings of the generic log-SNR inverse (:meth:`ContinuousPath.t_from_log_snr`): 64 halvings of
# ``[0, t_max]`` reach float64 resolution for any ``t_max`` up to ~1e3.
_BISECTION_STEPS = 64


# Entries kept by a path's memo of scalar coefficients (:meth:`GaussianPath.tabulate`) before it starts afresh.
_MEMO_LIMIT = 1 << 16


def _f64(t) -> torch.Tensor:
    return torch.as_tensor(t, dtype=torch.float64)


def shared_time(t):
    """The one time shared by a whole batch of times, as a Python number, or ``None`` if they differ.

    Samplers evaluate every sample at the same time; then the path's coefficients are scalars, computed
    once (:meth:`GaussianPath.coefficients_at`) and broadcast, instead of per element. Recognised: Python
    numbers, 0-d tensors, ``[B]`` tensors tagged by :func:`difflab.samplers.chain.time_tensor` (free on any
    device), and, on the CPU, ``[B]`` tensors whose entries are all equal (one comparison, no device sync).
    A time that requires grad is never reduced (its gradient goes through the per-element path).
    """
    if isinstance(t, (int, float)) and not isinstance(t, bool):
        return t
    if not isinstance(t, torch.Tensor) or t.requires_grad:
        return None
    tagged = getattr(t, "_shared_time", None)
    if tagged is not None:
        return tagged
    if t.device.type != "cpu" or t.is_complex() or t.dtype == torch.bool:
        return None
    if t.ndim == 0:
        return t.item()
    if t.ndim != 1 or t.numel() == 0:
        return None
    first = t[0]
    if t.numel() == 1 or t.stride(0) == 0 or bool((t == first).all()):
        return first.item()
    return None


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

    def _posterior_terms(self, t, t_prev):
        a_t, s_t, a_p, s_p = self.a(t), self.s(t), self.a(t_prev), self.s(t_prev)
        alpha_ts = a_t / a_p
        var_ts = (s_t**2 - alpha_ts**2 * s_p**2).clamp(min=0.0)
        return a_p * var_ts / s_t**2, alpha_ts * s_p**2 / s_t**2, var_ts * s_p**2 / s_t**2, var_ts

    def posterior_coefficients(self, t, t_prev):
        """Coefficients of ``q(x_{t'} | x_t, x0) = N(c_x0·x0 + c_xt·x_t, var)`` for ``t' < t``.

        For the Markov forward process with these marginals, ``x_t | x_{t'} ~ N(α_{t|t'} x_{t'}, σ²_{t|t'})``
        with ``α_{t|t'} = a_t/a_{t'}`` and ``σ²_{t|t'} = s_t² − α_{t|t'}² s_{t'}²``; Bayes' rule (the product of
        Gaussians, SPEC §1) gives ``c_xt = α_{t|t'} s_{t'}²/s_t²``, ``c_x0 = a_{t'} σ²_{t|t'}/s_t²``,
        ``var = σ²_{t|t'} s_{t'}²/s_t²``. For consecutive DDPM steps these are exactly SPEC §2's
        ``μ̃_t`` and ``β̃_t``. Returns ``(c_x0, c_xt, var)`` as tensors shaped like ``t``.
        """
        return self._posterior_terms(t, t_prev)[:3]

    # --- scalar coefficients at one time shared by the batch (memoised; SPEC §4 values, as Python floats) ---
    def derivatives(self, t):
        """``(ȧ_t, ṡ_t)`` together (paths that share work between the two override this)."""
        return self.a_dot(t), self.s_dot(t)

    def _memo(self) -> dict:
        memo = self.__dict__.get("_scalar_memo")
        if memo is None or len(memo) > _MEMO_LIMIT:
            memo = self.__dict__["_scalar_memo"] = {}
        return memo

    def tabulate(self, times, derivatives: bool = False, pairs: bool = False) -> None:
        """Evaluate the scalar coefficients at many times in one vectorised call and memoise them.

        A sampler calls this once per grid (the analogue of diffusers' ``set_timesteps``): ``a, s`` at every
        time, ``ȧ, ṡ`` too with ``derivatives``, and with ``pairs`` the posterior terms of every consecutive
        pair ``(times[i], times[i+1])``. Later :meth:`coefficients_at`, :meth:`derivatives_at` and
        :meth:`posterior_at` return them without tensor work. Values are exactly those of the tensor methods.
        """
        times = list(times)
        memo = self._memo()
        times_known = all(("as", t) in memo for t in times) and (
            not derivatives or all(("dots", t) in memo for t in times))
        pairs_known = not pairs or all(("post", t, t_prev) in memo for t, t_prev in zip(times[:-1], times[1:]))
        if not times or (times_known and pairs_known):  # a grid sampled before: nothing to compute
            return
        tt = torch.tensor([float(t) for t in times], dtype=torch.float64)
        for t, a, s in zip(times, self.a(tt).tolist(), self.s(tt).tolist()):
            memo[("as", t)] = (a, s)
        if derivatives:
            a_dot, s_dot = self.derivatives(tt)
            for t, ad, sd in zip(times, a_dot.tolist(), s_dot.tolist()):
                memo[("dots", t)] = (ad, sd)
        if pairs and len(times) > 1:
            terms = [v.tolist() for v in self._posterior_terms(tt[:-1], tt[1:])]
            for t, t_prev, *values in zip(times[:-1], times[1:], *terms):
                memo[("post", t, t_prev)] = tuple(values)

    def _scalar(self, key, compute):
        memo = self._memo()
        value = memo.get(key)
        if value is None:
            value = memo[key] = compute()
        return value

    def coefficients_at(self, t) -> tuple:
        """``(a_t, s_t)`` at one time ``t`` (a Python number) as Python floats, memoised."""
        memo = self.__dict__.get("_scalar_memo")
        value = memo.get(("as", t)) if memo is not None else None
        if value is not None:  # the per-step fast path: one dict lookup
            return value

        def compute():
            tt = torch.tensor([float(t)], dtype=torch.float64)
            return float(self.a(tt)[0]), float(self.s(tt)[0])
        return self._scalar(("as", t), compute)

    def derivatives_at(self, t) -> tuple:
        """``(ȧ_t, ṡ_t)`` at one time ``t`` as Python floats, memoised (continuous paths)."""
        memo = self.__dict__.get("_scalar_memo")
        value = memo.get(("dots", t)) if memo is not None else None
        if value is not None:
            return value

        def compute():
            a_dot, s_dot = self.derivatives(torch.tensor([float(t)], dtype=torch.float64))
            return float(a_dot[0]), float(s_dot[0])
        return self._scalar(("dots", t), compute)

    def posterior_at(self, t, t_prev) -> tuple:
        """:meth:`posterior_coefficients` ``(c_x0, c_xt, var)`` and ``σ²_{t|t'}`` at one pair of times, as
        Python floats, memoised."""
        def compute():
            tt = torch.tensor([float(t), float(t_prev)], dtype=torch.float64)
            return tuple(float(v[0]) for v in self._posterior_terms(tt[:1], tt[1:]))
        return self._scalar(("post", t, t_prev), compute)

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

    def transition(self, x_prev: torch.Tensor, t, generator: torch.Generator | None = None,
                   eps: torch.Tensor | None = None) -> torch.Tensor:
        """One forward step ``x_t ~ q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I)`` (SPEC §2), with the noise ``eps``
        when given (else drawn from ``generator``)."""
        t = torch.as_tensor(t, device=x_prev.device)
        if eps is None:
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

    # --- continuous-time helpers used by the ODE/SDE samplers, time grids and likelihood (SPEC §6) ---
    def sigma_bar(self, t) -> torch.Tensor:
        """``σ̄_t = s_t/a_t``, the noise level of the rescaled state ``x/a = x0 + σ̄ ε`` (EDM's σ; SPEC §6)."""
        if isinstance(t, torch.Tensor) and t.ndim == 0 and t.device.type == "cpu" and not t.requires_grad:
            a, s = self.coefficients_at(float(t))  # one time: the memoised scalars, the same division
            return torch.tensor(s, dtype=torch.float64) / a
        return self.s(t) / self.a(t)

    def _constant(self, name: str, compute):
        """A constant of the path (a function of its fixed parameters), computed once per instance."""
        memo = self.__dict__.setdefault("_constants", {})
        if name not in memo:
            memo[name] = compute()
        return memo[name]

    def clean_time(self):
        """The time at which ``s = 0`` (the data itself, where samplers end with ``x̂0``), or ``None``."""
        return self._constant("clean_time", lambda: 0.0 if float(self.s(torch.zeros((), dtype=torch.float64))) == 0.0
                              else None)

    def log_snr_range(self):
        """``(λ_noise, λ_clean)``: the log-SNR at ``t_max`` and at the clean end (or ``t_min``); may be ±inf."""
        def compute():
            lo_t = self.clean_time() if self.clean_time() is not None else self.t_min
            return float(self.log_snr(torch.tensor(float(self.t_max), dtype=torch.float64))), \
                float(self.log_snr(torch.tensor(float(lo_t), dtype=torch.float64)))
        return self._constant("log_snr_range", compute)

    def t_from_log_snr(self, lam) -> torch.Tensor:
        """The time ``t`` with ``log_snr(t) = λ`` (float64, shaped like ``λ``).

        The log-SNR decreases strictly along every path, so the generic inverse is a bisection on
        ``[clean end (or t_min), t_max]`` to float64 resolution; paths with a closed form override it.
        Raises ``ValueError`` for ``λ`` outside the path's range.
        """
        lam = self._checked_log_snr(lam)
        lo_t = self.clean_time() if self.clean_time() is not None else float(self.t_min)
        lo, hi = torch.full_like(lam, lo_t), torch.full_like(lam, float(self.t_max))
        for _ in range(_BISECTION_STEPS):
            mid = 0.5 * (lo + hi)
            later = self.log_snr(mid) > lam  # λ(mid) still above the target: the answer lies later
            lo, hi = torch.where(later, mid, lo), torch.where(later, hi, mid)
        lam_noise, lam_clean = self.log_snr_range()
        t = torch.where(lam >= lam_clean, torch.full_like(lam, lo_t), 0.5 * (lo + hi))
        return torch.where(lam <= lam_noise, torch.full_like(lam, float(self.t_max)), t)

    def t_from_sigma_bar(self, sigma_bar) -> torch.Tensor:
        """The time with ``s/a = σ̄`` (``σ̄ = 0`` is the clean end), through ``λ = −2 log σ̄``."""
        return self.t_from_log_snr(-2.0 * torch.log(torch.as_tensor(sigma_bar, dtype=torch.float64)))

    def prior_logp(self, x: torch.Tensor) -> torch.Tensor:
        """``log N(x; 0, s_max² I)``: the density of :meth:`prior_sample` at ``t_max``, ``[B]`` nats."""
        return gaussian.log_normal_diag(x, torch.zeros_like(x), self.prior_std() ** 2)

    def _checked_log_snr(self, lam) -> torch.Tensor:
        lam = torch.as_tensor(lam, dtype=torch.float64)
        lam_noise, lam_clean = self.log_snr_range()
        tol = 1e-9 * (1.0 + lam.abs().nan_to_num(posinf=0.0, neginf=0.0))
        if torch.isnan(lam).any() or ((lam > lam_clean + tol) | (lam < lam_noise - tol)).any():
            raise ValueError(f"log-SNR outside the range [{lam_noise:.4g}, {lam_clean:.4g}] of {type(self).__name__}")
        return lam


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



class VPCosinePath(ContinuousPath):
    """Variance-preserving path with the cosine schedule in continuous time (Nichol & Dhariwal 2021; SPEC §6).

    ``a(t) = cos θ(t) / cos θ(0)`` with ``θ(t) = (t + s0)/(1 + s0) · π/2``, ``s(t) = √(1 − a²)``: the
    continuous-time ``ᾱ(t) = a(t)²`` of which the DDPM cosine schedule samples ``t = k/T``. Its SDE is
    the VP one with ``β(t) = −2ȧ/a = 2θ' tan θ``, so ``f = −½β x`` and ``g² = β``.
    ``a`` vanishes at ``t = 1`` (where ``β`` is infinite), so the path stops at ``t_max = 0.995``,
    where the log-SNR is −9.7 (VPPath ends at −10.05) and the ``N(0, I)`` prior is off by
    ``a² ≈ 6e-5`` in variance.
    """

    def __init__(self, s0: float = 0.008, t_min: float = 0.0, t_max: float = 0.995):
        if not 0.0 <= t_min < t_max < 1.0:
            raise ValueError(f"need 0 <= t_min < t_max < 1, got t_min={t_min}, t_max={t_max}")
        self.s0, self.t_min, self.t_max = s0, t_min, t_max
        self._theta0 = 0.5 * math.pi * s0 / (1.0 + s0)
        self._theta_dot = 0.5 * math.pi / (1.0 + s0)

    def _theta(self, t):
        return self._theta0 + self._theta_dot * _f64(t)

    def a(self, t):
        return torch.cos(self._theta(t)) / math.cos(self._theta0)

    def s(self, t):
        # 1 − a² = (cos²θ0 − cos²θ)/cos²θ0 = sin(θ−θ0) sin(θ+θ0)/cos²θ0, free of cancellation near t = 0
        theta = self._theta(t)
        return (torch.sin(theta - self._theta0) * torch.sin(theta + self._theta0)).clamp(min=0.0).sqrt() \
            / math.cos(self._theta0)

    def a_dot(self, t):
        return -self._theta_dot * torch.sin(self._theta(t)) / math.cos(self._theta0)

    def s_dot(self, t):
        return -self.a(t) * self.a_dot(t) / self.s(t)  # from a² + s² = 1; infinite at the clean end t = 0

    def beta(self, t):
        """``β(t) = −2ȧ/a = 2θ' tan θ(t)``."""
        return 2.0 * self._theta_dot * torch.tan(self._theta(t))

    def g2(self, t):
        return self.beta(t)  # the VP identity g² = −2ȧ/a, finite at t = 0 where s·ṡ is 0·∞

    def t_from_log_snr(self, lam):
        lam = self._checked_log_snr(lam)
        a = torch.exp(0.5 * torch.nn.functional.logsigmoid(lam))  # a² = sigmoid(λ) on a VP path
        return ((torch.arccos((a * math.cos(self._theta0)).clamp(max=1.0)) - self._theta0) / self._theta_dot).clamp(
            min=0.0)


class SubVPPath(VPPath):
    """Sub-VP path (Song et al. 2021, eq. 29; SPEC §6): ``a = e^{−B/2}``, ``s = 1 − e^{−B}``, ``B(t) = ∫_0^t β``.

    It shares the VP path's ``β(t)`` and ``a(t)`` (so ``f = −½β x``); its noise scale is the VP variance
    itself, ``s = 1 − a²``, so its variance stays below VP's, and ``g² = d(s²)/dt + β s² = β (1 − e^{−2B})``.
    """

    def s(self, t):
        return -torch.expm1(-self._int_beta(t))

    def s_dot(self, t):
        return self.beta(t) * torch.exp(-self._int_beta(t))

    def g2(self, t):
        return -self.beta(t) * torch.expm1(-2.0 * self._int_beta(t))


class VEPath(ContinuousPath):
    """Variance-exploding path (SMLD; Song et al. 2021, eq. 30; SPEC §6): ``a = 1``, ``s = σ_min (σ_max/σ_min)^t``.

    ``f = 0`` and ``g² = dσ²/dt = 2 σ² log(σ_max/σ_min)`` on ``t ∈ [0, 1]``. The path starts at noise
    ``σ_min`` (it has no clean end: samplers stop at ``σ_min``). Defaults are Song et al.'s CIFAR-10 values.
    """

    def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50.0):
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max = 0.0, 1.0
        self._log_ratio = math.log(sigma_max / sigma_min)

    def a(self, t):
        return torch.ones_like(_f64(t))

    def s(self, t):
        return self.sigma_min * torch.exp(self._log_ratio * _f64(t))

    def a_dot(self, t):
        return torch.zeros_like(_f64(t))

    def s_dot(self, t):
        return self._log_ratio * self.s(t)

    def t_from_log_snr(self, lam):
        lam = self._checked_log_snr(lam)
        return ((-0.5 * lam - math.log(self.sigma_min)) / self._log_ratio).clamp(0.0, 1.0)


class EDMPath(ContinuousPath):
    """EDM's path (Karras et al. 2022, Table 1; SPEC §6): ``a = 1``, ``s = t = σ`` on ``[σ_min, σ_max]``.

    The probability-flow velocity is ``dx/dσ = ε̂`` exactly; ``g² = dσ²/dt = 2σ``. Time *is* the noise
    level, so ``t = 0`` is the clean end (outside ``[σ_min, σ_max]``, reached by a final ``x̂0`` step).
    """

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        if not 0.0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        self.sigma_min, self.sigma_max = sigma_min, sigma_max
        self.t_min, self.t_max = sigma_min, sigma_max

    def a(self, t):
        return torch.ones_like(_f64(t))

    def s(self, t):
        return _f64(t).clone()

    def a_dot(self, t):
        return torch.zeros_like(_f64(t))

    def s_dot(self, t):
        return torch.ones_like(_f64(t))

    def t_from_log_snr(self, lam):
        return torch.exp(-0.5 * self._checked_log_snr(lam))


class DiscreteTimeContinuation(ContinuousPath):
    """A discrete DDPM path in continuous time ``t ∈ [0, 1]``, exact at every step ``k``: ``t = k/T``.

    Between integer steps the log-SNR ``λ = log(ᾱ/(1−ᾱ))`` is interpolated linearly in the fractional
    step ``u = tT`` (diffusers' log-σ interpolation for Karras grids is the same rule, since
    ``log σ̄ = −λ/2``); on the first segment ``u ∈ [0, 1]`` (``λ_0 = +∞``) the noise level
    ``σ̄ = s/a`` is interpolated linearly instead, ``σ̄ = u σ̄_1``, and on a zero-terminal-SNR last segment
    (``λ_T = −∞``) ``1/σ̄`` is. The path is VP, so ``a² = sigmoid(λ)``, ``s² = sigmoid(−λ)``.

    A network trained on the discrete path takes :meth:`network_time` (the fractional DDPM step ``u``) as
    its time input: ``NetworkDenoiser(net, cont, target, time_fn=cont.network_time)``.
    ``t_min = 1/T`` is the least noise the network was trained on; ``t = 0`` is the clean end.
    """

    def __init__(self, discrete_path: "DiscretePath"):
        if not isinstance(discrete_path, DiscretePath):
            raise ValueError("DiscreteTimeContinuation needs a DiscretePath")
        self.source, self.T = discrete_path, discrete_path.T
        self.t_min, self.t_max = 1.0 / self.T, 1.0
        ab = discrete_path.alpha_bar
        self.lam = torch.log(ab) - torch.log1p(-ab)  # λ_k, k = 0..T; λ_0 = +inf
        self.zero_terminal_snr = bool(ab[-1] == 0.0)

    def network_time(self, t) -> torch.Tensor:
        """The fractional DDPM step ``u = tT`` (float64) to feed a network trained on discrete time."""
        return _f64(t) * self.T

    def _segment(self, t):
        """Segment index ``k`` (``u ∈ [k, k+1]``) and fraction ``w = u − k``."""
        u = (_f64(t) * self.T).clamp(0.0, float(self.T))
        k = u.floor().clamp(max=self.T - 1)
        return k.long(), u - k

    def log_snr(self, t):
        k, w = self._segment(t)
        lam = self.lam.to(k.device)
        lam_k, lam_k1 = lam[k], lam[k + 1]
        inner = (1.0 - w) * lam_k.nan_to_num(posinf=0.0, neginf=0.0) + w * lam_k1.nan_to_num(posinf=0.0, neginf=0.0)
        out = torch.where(k == 0, lam[1] - 2.0 * torch.log(w), inner)  # σ̄ = w σ̄_1
        if self.zero_terminal_snr:
            out = torch.where(k == self.T - 1, lam[self.T - 1] + 2.0 * torch.log1p(-w), out)  # 1/σ̄ = (1−w)/σ̄_{T−1}
        return out

    @staticmethod
    def _a_from(lam):
        return torch.exp(0.5 * torch.nn.functional.logsigmoid(lam))

    @staticmethod
    def _s_from(lam):
        return torch.exp(0.5 * torch.nn.functional.logsigmoid(-lam))

    def a(self, t):
        return self._a_from(self.log_snr(t))

    def s(self, t):
        return self._s_from(self.log_snr(t))

    def _derivatives(self, t):
        """``(ȧ, ṡ)`` on the segment of ``t`` (right-hand derivatives at integer steps).

        On a VP path ``ȧ = ½ a s² λ̇`` and ``ṡ = −½ s a² λ̇`` with the segment's constant ``λ̇ = T(λ_{k+1} − λ_k)``.
        On the first segment ``σ̄ = w σ̄_1`` (so ``a = (1+σ̄²)^{−½}``, ``s = σ̄ a``): ``ȧ = −σ̄ a³ σ̄'``, ``ṡ = a³ σ̄'``
        with ``σ̄' = T σ̄_1``; on a zero-terminal-SNR last segment ``ρ = 1/σ̄ = (1−w) ρ_{T−1}``:
        ``ȧ = s³ ρ'``, ``ṡ = −ρ s³ ρ'`` with ``ρ' = −T ρ_{T−1}``. All stay finite at both ends.
        """
        k, w = self._segment(t)
        lam_t = self.log_snr(t)
        a, s = self._a_from(lam_t), self._s_from(lam_t)
        lam = self.lam.to(k.device)
        lam_dot = self.T * (lam[k + 1] - lam[k]).nan_to_num(posinf=0.0, neginf=0.0)
        a_dot, s_dot = 0.5 * a * s**2 * lam_dot, -0.5 * s * a**2 * lam_dot
        sigma_bar_1 = math.exp(-0.5 * float(self.lam[1]))
        sigma_bar_dot = self.T * sigma_bar_1
        a_dot = torch.where(k == 0, -w * sigma_bar_1 * a**3 * sigma_bar_dot, a_dot)
        s_dot = torch.where(k == 0, a**3 * sigma_bar_dot, s_dot)
        if self.zero_terminal_snr:
            rho_last = math.exp(0.5 * float(self.lam[self.T - 1]))
            rho_dot = -self.T * rho_last
            a_dot = torch.where(k == self.T - 1, s**3 * rho_dot, a_dot)
            s_dot = torch.where(k == self.T - 1, -(1.0 - w) * rho_last * s**3 * rho_dot, s_dot)
        return a_dot, s_dot

    def a_dot(self, t):
        return self._derivatives(t)[0]

    def s_dot(self, t):
        return self._derivatives(t)[1]

    def derivatives(self, t):
        return self._derivatives(t)

    def g2(self, t):
        return -2.0 * self.f_coef(t)  # VP: g² = β(t) = −2ȧ/a

    def t_from_log_snr(self, lam):
        """Exact inverse of the piecewise interpolation (a table search, no iteration)."""
        lam = self._checked_log_snr(lam)
        table = self.lam.to(lam.device)
        # segment k holds λ ∈ [λ_{k+1}, λ_k]; −λ increases with k
        k = torch.searchsorted(-table[1:].contiguous(), -lam.contiguous(), right=False).clamp(max=self.T - 1)
        lam_k, lam_k1 = table[k], table[k + 1]
        w = ((lam_k - lam) / (lam_k - lam_k1)).nan_to_num(0.0)
        w = torch.where(k == 0, torch.exp(0.5 * (table[1] - lam)), w)
        if self.zero_terminal_snr:
            w = torch.where(k == self.T - 1, -torch.expm1(0.5 * (lam - table[self.T - 1])), w)
        return ((k + w.clamp(0.0, 1.0)) / self.T).to(torch.float64)


class SplineTimeContinuation(DiscreteTimeContinuation):
    """A discrete DDPM path in *smooth* continuous time ``t ∈ [0, 1]``, exact at every step ``k``: ``t = k/T``.

    :class:`DiscreteTimeContinuation` interpolates ``λ`` linearly between steps, so ``λ̇`` jumps at each of the
    ``T`` integer steps: a high-order or adaptive solver sees a kink wherever a stage straddles a step, and
    ``rk45`` refines toward them without end as its tolerance tightens. Here ``L(u) = log ᾱ`` is a cubic
    spline in the fractional step ``u = tT`` through the knots ``(k, log ᾱ_k)``, ``k = 0..T`` (``log ᾱ_0 = 0``;
    scipy's not-a-knot ``CubicSpline``: ``L``, ``L'``, ``L''`` continuous), so ``a = e^{L/2}``,
    ``s = √(1 − e^L)`` (SPEC §2's ``a_t = √ᾱ_t``, ``s_t = √(1−ᾱ_t)`` at integer steps) and

        ``ȧ = ½ a T L'(u)``,  ``ṡ = −e^L T L'(u) / (2 s)``  (analytic; ``ṡ → ∞`` at the clean end ``t = 0``,
        as on every smooth VP path; solvers never evaluate there, SPEC §6's final ``x̂0`` step).

    If the spline is not strictly decreasing on some segment (an ``L`` with kinks, e.g. a clipped cosine
    schedule), the monotone ``PchipInterpolator`` (``C¹``) is used instead, so ``λ`` stays invertible.
    A zero-terminal-SNR schedule (``ᾱ_T = 0``, ``L_T = −∞``) keeps :class:`DiscreteTimeContinuation`'s last
    segment rule (``1/σ̄`` linear in ``u``); the spline runs through ``k = 0..T−1``. The network's time input is
    the same :meth:`network_time` (``u = tT``). All coefficients are float64.
    """

    def __init__(self, discrete_path: "DiscretePath"):
        import numpy as np
        from scipy.interpolate import CubicSpline, PchipInterpolator

        super().__init__(discrete_path)
        log_ab = torch.log(discrete_path.alpha_bar.to(torch.float64)).numpy()
        last = self.T - 1 if self.zero_terminal_snr else self.T
        knots = np.arange(last + 1, dtype=np.float64)
        spline = CubicSpline(knots, log_ab[:last + 1], bc_type="not-a-knot")
        self.monotone_fallback = not _strictly_decreasing(spline.c)
        if self.monotone_fallback:
            spline = PchipInterpolator(knots, log_ab[:last + 1])
        self.kind = "pchip" if self.monotone_fallback else "cubic"
        self._coef = torch.from_numpy(np.ascontiguousarray(spline.c[::-1].T)).to(torch.float64)  # (segments, 4): c0..c3
        self._segments = last

    def _log_alpha_bar(self, t):
        """``(L, L')`` of the spline at ``t`` (``L'`` per unit ``u``), on spline segments only."""
        u = (_f64(t) * self.T).clamp(0.0, float(self._segments))
        k = u.floor().clamp(max=self._segments - 1)
        w = u - k
        c = self._coef.to(w.device)[k.long()]  # (..., 4)
        L = c[..., 0] + w * (c[..., 1] + w * (c[..., 2] + w * c[..., 3]))
        dL = c[..., 1] + w * (2.0 * c[..., 2] + w * 3.0 * c[..., 3])
        return L.clamp(max=0.0), dL

    def _on_last_segment(self, t):
        return (_f64(t) * self.T > self.T - 1) if self.zero_terminal_snr else torch.zeros_like(_f64(t), dtype=torch.bool)

    def log_snr(self, t):
        L, _ = self._log_alpha_bar(t)
        out = L - torch.log(-torch.expm1(L))
        if self.zero_terminal_snr:
            out = torch.where(self._on_last_segment(t), DiscreteTimeContinuation.log_snr(self, t), out)
        return out

    def a(self, t):
        L, _ = self._log_alpha_bar(t)
        out = torch.exp(0.5 * L)
        if self.zero_terminal_snr:
            out = torch.where(self._on_last_segment(t), DiscreteTimeContinuation.a(self, t), out)
        return out

    def s(self, t):
        L, _ = self._log_alpha_bar(t)
        out = torch.sqrt(-torch.expm1(L))
        if self.zero_terminal_snr:
            out = torch.where(self._on_last_segment(t), DiscreteTimeContinuation.s(self, t), out)
        return out

    def _derivatives(self, t):
        """``(ȧ, ṡ) = (½ a T L', −e^L T L'/(2s))`` (class docstring); the zero-terminal-SNR last segment as in
        :meth:`DiscreteTimeContinuation._derivatives`."""
        L, dL = self._log_alpha_bar(t)
        a, s = torch.exp(0.5 * L), torch.sqrt(-torch.expm1(L))
        a_dot = 0.5 * a * self.T * dL
        s_dot = -torch.exp(L) * self.T * dL / (2.0 * s)
        if self.zero_terminal_snr:
            last = self._on_last_segment(t)
            a_last, s_last = DiscreteTimeContinuation._derivatives(self, t)
            a_dot, s_dot = torch.where(last, a_last, a_dot), torch.where(last, s_last, s_dot)
        return a_dot, s_dot

    def t_from_log_snr(self, lam):
        """The generic bisection of :meth:`ContinuousPath.t_from_log_snr` (λ is strictly decreasing in ``t``)."""
        return ContinuousPath.t_from_log_snr(self, lam)


def _strictly_decreasing(coef) -> bool:
    """Whether a piecewise cubic (scipy's ``c``: ``(4, segments)``, highest power first, local variable
    ``w ∈ [0, 1]``) has a negative derivative ``3c₀w² + 2c₁w + c₂`` on every segment (checked at both ends and
    at the quadratic's stationary point where it lies inside)."""
    import numpy as np

    c3, c2, c1 = coef[0], coef[1], coef[2]
    ends = np.maximum(c1, 3 * c3 + 2 * c2 + c1)
    with np.errstate(divide="ignore", invalid="ignore"):
        w = np.where(c3 != 0, -c2 / (3 * c3), -1.0)
    inside = (w > 0) & (w < 1)
    peak = np.where(inside, 3 * c3 * w**2 + 2 * c2 * w + c1, -np.inf)
    return bool((np.maximum(ends, peak) < 0).all())


def smooth_continuation(discrete_path: "DiscretePath") -> SplineTimeContinuation:
    """The :class:`SplineTimeContinuation` of ``discrete_path`` (built once per path object and reused): the
    continuous-time view every continuous sampler runs a DDPM-time model on (SPEC §6)."""
    cached = discrete_path.__dict__.get("_smooth_continuation")
    if cached is None:
        cached = discrete_path.__dict__["_smooth_continuation"] = SplineTimeContinuation(discrete_path)
    return cached
