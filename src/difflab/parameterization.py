"""One model, any target: conversions between ε, x0, v, score and velocity (SPEC §4).

With ``x_t = a x0 + s ε`` (see :mod:`difflab.paths`):

====================  ===========================  =============================================
target                definition                   back to (x0, ε)
====================  ===========================  =============================================
``eps``               ε                            x0 = (x − s ε)/a
``x0``                x0                           ε = (x − a x0)/s
``v``                 v = a ε − s x0               x0 = (a x − s v)/(a²+s²), ε = (s x + a v)/(a²+s²)
``score``             ∇log p_t = −ε/s              ε = −s·score
``velocity``          u = ȧ x0 + ṡ ε               x0 = (ṡ x − s u)/(a ṡ − s ȧ), ε = (a u − ȧ x)/(a ṡ − s ȧ)
====================  ===========================  =============================================

Samplers consume a *denoiser*: any callable ``denoiser(x, t, **cond) -> Prediction`` with a
``path`` attribute. :class:`NetworkDenoiser` turns a network that predicts any target into one, so
samplers never branch on the prediction type.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from difflab.paths import GaussianPath, shared_time
from difflab.utils import bcast, constant_time

TARGETS = ("eps", "x0", "v", "score", "velocity")


class Prediction:
    """What a denoiser says about ``x_t``: the clean-data and noise estimates ``x̂0``, ``ε̂``.

    ``var_interp`` (optional, shape of ``x``) is the improved-DDPM learned-variance output ``v ∈ [0,1]``:
    ``log σ² = v log β_t + (1−v) log β̃_t`` (SPEC §3).

    A prediction is either given by its two tensors (``Prediction(x0, eps)``) or, as
    :class:`NetworkDenoiser` makes it when the batch shares one time, by the *linear form* that every
    parameterisation has (SPEC §4): ``x̂0 = p x + q u`` and ``ε̂ = p' x + q' u`` with scalar coefficients,
    ``u`` the network output and ``x`` the state it saw (:meth:`from_linear`). Then ``x0`` and ``eps`` are
    computed on first access, and :meth:`combine` evaluates any ``c_x x + c_0 x̂0 + c_ε ε̂`` — the shape
    of every sampler update — in two tensor operations without forming ``x̂0`` or ``ε̂`` at all.
    """

    __slots__ = ("_x0", "_eps", "var_interp", "_linear")

    def __init__(self, x0: Optional[torch.Tensor], eps: Optional[torch.Tensor],
                 var_interp: Optional[torch.Tensor] = None):
        self._x0, self._eps, self.var_interp, self._linear = x0, eps, var_interp, None

    @classmethod
    def from_linear(cls, x: torch.Tensor, out: torch.Tensor, x0_coefs: tuple, eps_coefs: tuple,
                    var_interp: Optional[torch.Tensor] = None) -> "Prediction":
        """``x̂0 = x0_coefs[0]·x + x0_coefs[1]·out``, ``ε̂ = eps_coefs[0]·x + eps_coefs[1]·out`` (Python floats).

        ``x`` and ``out`` are held by reference: they must not be modified in place while the prediction is
        in use (samplers build each new state as a new tensor)."""
        pred = cls(None, None, var_interp)
        pred._linear = (x, out, x0_coefs, eps_coefs)
        return pred

    @property
    def x0(self) -> torch.Tensor:
        if self._x0 is None:
            x, out, (p, q), _ = self._linear
            self._x0 = out if (p, q) == (0.0, 1.0) else _axpby(p, x, q, out)
        return self._x0

    @property
    def eps(self) -> torch.Tensor:
        if self._eps is None:
            x, out, _, (p, q) = self._linear
            self._eps = out if (p, q) == (0.0, 1.0) else _axpby(p, x, q, out)
        return self._eps

    def combine(self, c_x0: float, c_eps: float, x: Optional[torch.Tensor] = None, c_x: float = 0.0) -> torch.Tensor:
        """A new tensor ``c_x0 x̂0 + c_ε ε̂ + c_x x`` for Python-float coefficients, ``x`` the state the
        prediction was made at (needed only if ``c_x ≠ 0``).

        With the linear form this is one ``α x + β u`` (two tensor operations, ``x̂0`` and ``ε̂`` never
        formed); otherwise it is computed from ``x̂0`` and ``ε̂``. The two agree to rounding.
        """
        if self._linear is not None and (c_x == 0.0 or x is self._linear[0]):
            x_seen, out, (p, q), (p_e, q_e) = self._linear
            return _axpby(c_x + c_x0 * p + c_eps * p_e, x_seen, c_x0 * q + c_eps * q_e, out)
        result = _axpby(c_x0, self.x0, c_eps, self.eps)
        if c_x != 0.0:
            if x is None:
                raise ValueError("combine with c_x != 0 needs the state x the prediction was made at")
            result.add_(x, alpha=c_x)
        return result

    def add_to(self, out: torch.Tensor, c_x0: float, c_eps: float) -> torch.Tensor:
        """``out += c_x0 x̂0 + c_ε ε̂`` in place (Python-float coefficients; two operations) and return ``out``."""
        if self._linear is not None:
            x, u, (p, q), (p_e, q_e) = self._linear
            terms = ((c_x0 * p + c_eps * p_e, x), (c_x0 * q + c_eps * q_e, u))
        else:
            terms = ((c_x0, self.x0), (c_eps, self.eps))
        for c, v in terms:
            if c != 0.0:
                out.add_(v, alpha=c)
        return out

    def __repr__(self) -> str:
        shape = tuple(self._linear[1].shape if self._linear is not None else self._x0.shape)
        return f"Prediction(shape={shape}, linear={self._linear is not None}, var_interp={self.var_interp is not None})"


def _axpby(a: float, x: torch.Tensor, b: float, y: torch.Tensor) -> torch.Tensor:
    """A new tensor ``a x + b y`` (Python-float coefficients; one operation when either is zero)."""
    if b == 0.0:
        return x * a
    if a == 0.0:
        return y * b
    return torch.mul(x, a).add_(y, alpha=b)


def _coefs(path: GaussianPath, t, x, derivatives: bool = False):
    """``a, s`` (and ``ȧ, ṡ``) at ``t`` shaped to broadcast against ``x``: Python floats, computed once, when
    the whole batch shares one time (:func:`~difflab.paths.shared_time`), else per element."""
    t = torch.as_tensor(t, device=x.device)
    t_shared = shared_time(t)
    if t_shared is not None:
        a, s = path.coefficients_at(t_shared)
        return (a, s) if not derivatives else (a, s) + path.derivatives_at(t_shared)
    a, s = bcast(path.a(t), x), bcast(path.s(t), x)
    if not derivatives:
        return a, s
    return a, s, bcast(path.a_dot(t), x), bcast(path.s_dot(t), x)


def linear_form(path: GaussianPath, t: float, target: str):
    """The scalar coefficients of ``x̂0 = p x + q u`` and ``ε̂ = p' x + q' u`` for an output ``u`` of type
    ``target`` at one time ``t`` (SPEC §4; the table at the top of this module, solved for ``x`` and ``u``).
    Returns ``((p, q), (p', q'))``, or ``None`` where a coefficient is infinite (``a = 0`` for ε/score,
    ``s = 0`` for x0, a singular velocity map), which :func:`to_x0_eps` then handles elementwise."""
    a, s = path.coefficients_at(t)
    if target == "eps":
        return ((1.0 / a, -s / a), (0.0, 1.0)) if a != 0.0 else None
    if target == "x0":
        return ((0.0, 1.0), (1.0 / s, -a / s)) if s != 0.0 else None
    if target == "v":
        norm = a * a + s * s
        return (a / norm, -s / norm), (s / norm, a / norm)
    if target == "score":
        return ((1.0 / a, s * s / a), (0.0, -s)) if a != 0.0 else None
    if target == "velocity":
        a_dot, s_dot = path.derivatives_at(t)
        det = a * s_dot - s * a_dot
        return ((s_dot / det, -s / det), (-a_dot / det, a / det)) if det != 0.0 and math.isfinite(det) else None
    raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")


def to_x0_eps(output: torch.Tensor, x: torch.Tensor, t, path: GaussianPath, target: str):
    """Convert a network output of type ``target`` at ``(x, t)`` into ``(x̂0, ε̂)`` (SPEC §4)."""
    if target == "eps":
        a, s = _coefs(path, t, x)
        if isinstance(a, float):
            return torch.sub(x, output, alpha=s).div_(a), output
        return (x - s * output) / a, output
    if target == "x0":
        a, s = _coefs(path, t, x)
        return output, (x - a * output) / s
    if target == "v":
        a, s = _coefs(path, t, x)
        norm = a**2 + s**2
        return (a * x - s * output) / norm, (s * x + a * output) / norm
    if target == "score":
        a, s = _coefs(path, t, x)
        eps = -s * output
        return (x - s * eps) / a, eps
    if target == "velocity":
        a, s, a_dot, s_dot = _coefs(path, t, x, derivatives=True)
        det = a * s_dot - s * a_dot
        return (s_dot * x - s * output) / det, (a * output - a_dot * x) / det
    raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")


def from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, x: torch.Tensor, t, path: GaussianPath, target: str):
    """The ``target`` quantity implied by ``(x0, ε)`` at ``(x, t)`` (SPEC §4)."""
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    if target == "v":
        a, s = _coefs(path, t, x)
        return a * eps - s * x0
    if target == "score":
        _, s = _coefs(path, t, x)
        return -eps / s
    if target == "velocity":
        _, _, a_dot, s_dot = _coefs(path, t, x, derivatives=True)
        return a_dot * x0 + s_dot * eps
    raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")


def convert(output: torch.Tensor, x: torch.Tensor, t, path: GaussianPath, source: str, target: str):
    """Convert a prediction of type ``source`` into type ``target`` at ``(x, t)``; exact and invertible."""
    x0, eps = to_x0_eps(output, x, t, path, source)
    return from_x0_eps(x0, eps, x, t, path, target)


class NetworkDenoiser:
    """Wrap ``net(x, t, **cond) -> output`` predicting ``target`` into a sampler-ready denoiser.

    The network sees ``x`` cast to its own dtype and the path's time ``t`` (``[B]``); the prediction
    comes back in ``x``'s dtype (sampler state precision is the caller's choice, STYLE rule 8).
    If ``learned_variance`` the network outputs twice the channels along dim 1: the target and the
    variance interpolation ``v`` mapped to ``[0, 1]`` as ``(v_raw + 1)/2`` (improved DDPM).
    ``time_fn`` maps the path's time to the network's time input (identity by default).
    """

    def __init__(self, net: Callable, path: GaussianPath, target: str = "eps", learned_variance: bool = False,
                 time_fn: Callable | None = None):
        if target not in TARGETS:
            raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
        self.net, self.path, self.target = net, path, target
        self.learned_variance = learned_variance
        self.time_fn = time_fn

    def raw(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        """The network's own output (float32 or the network's dtype)."""
        net_dtype = _param_dtype(self.net, x.dtype)
        if self.time_fn is not None:
            t_in = self.time_fn(t).to(torch.float32)
        else:
            value = getattr(t, "_shared_time", None)
            t_in = t.to(torch.float32) if value is None else constant_time(float(value), x.shape[0], x.device,
                                                                            torch.float32)
        return self.net(x if x.dtype == net_dtype else x.to(net_dtype), t_in, **cond)

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        if not isinstance(t, torch.Tensor) or t.device != x.device:
            t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.raw(x, t, **cond)
        if out.dtype != x.dtype:
            out = out.to(x.dtype)
        var_interp = None
        if self.learned_variance:
            out, v_raw = out.chunk(2, dim=1)
            var_interp = (v_raw + 1.0) / 2.0
        t_shared = shared_time(t)
        form = linear_form(self.path, t_shared, self.target) if t_shared is not None else None
        if form is not None:  # one time for the batch: x̂0, ε̂ formed only when asked for
            return Prediction.from_linear(x, out, *form, var_interp)
        x0, eps = to_x0_eps(out, x, t, self.path, self.target)
        return Prediction(x0, eps, var_interp)


def _param_dtype(net, default: torch.dtype) -> torch.dtype:
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            return p.dtype
    return default
