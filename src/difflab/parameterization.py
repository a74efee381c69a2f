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

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from difflab.paths import GaussianPath, shared_time
from difflab.utils import bcast

TARGETS = ("eps", "x0", "v", "score", "velocity")


@dataclass
class Prediction:
    """What a denoiser says about ``x_t``: the clean-data and noise estimates ``x̂0``, ``ε̂``.

    ``var_interp`` (optional, shape of ``x``) is the improved-DDPM learned-variance output ``v ∈ [0,1]``:
    ``log σ² = v log β_t + (1−v) log β̃_t`` (SPEC §3).
    """

    x0: torch.Tensor
    eps: torch.Tensor
    var_interp: Optional[torch.Tensor] = None


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
        t_in = self.time_fn(t) if self.time_fn is not None else t
        return self.net(x.to(net_dtype), t_in.to(torch.float32), **cond)

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        out = self.raw(x, t, **cond).to(x.dtype)
        var_interp = None
        if self.learned_variance:
            out, v_raw = out.chunk(2, dim=1)
            var_interp = (v_raw + 1.0) / 2.0
        x0, eps = to_x0_eps(out, x, t, self.path, self.target)
        return Prediction(x0, eps, var_interp)


def _param_dtype(net, default: torch.dtype) -> torch.dtype:
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            return p.dtype
    return default
