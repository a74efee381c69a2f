"""Small tensor helpers shared by every module (shape-agnostic broadcasting, reductions)."""

from __future__ import annotations

import functools

import torch


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims so a per-sample ``[B]`` (or scalar) tensor broadcasts against an ``ndim`` tensor."""
    v = torch.as_tensor(v)
    if v.ndim > ndim:
        raise ValueError(f"cannot broadcast a {v.ndim}-d tensor against {ndim} dims")
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def bcast(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``v`` (scalar or ``[B]``) shaped to broadcast against ``x`` with ``x``'s dtype and device."""
    return append_dims(torch.as_tensor(v, device=x.device).to(x.dtype), x.ndim)


def sum_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Sum over every dim but the first: ``(B, ...) -> [B]``."""
    return x.reshape(x.shape[0], -1).sum(-1)


def mean_except_batch(x: torch.Tensor) -> torch.Tensor:
    """Mean over every dim but the first: ``(B, ...) -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(-1)


def per_sample_time(t, batch: int, device=None, dtype=None) -> torch.Tensor:
    """A time given as a Python number or tensor, expanded to a ``[B]`` tensor."""
    t = torch.as_tensor(t, device=device, dtype=dtype)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"time must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


@functools.lru_cache(maxsize=512, typed=True)
def constant_time(value, batch: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A read-only ``[batch]`` tensor holding one time ``value`` (a Python number), tagged with that value.

    Samplers evaluate a whole batch at one time, step after step; this builds each such tensor once (a cached
    broadcast of a 0-d tensor, so writing into it raises) and tags it ``_shared_time = value`` so that
    :func:`difflab.paths.shared_time` reads the time without touching the device.
    """
    t = torch.tensor(value, dtype=dtype, device=device).expand(batch)
    t._shared_time = value
    return t


def randn(shape, generator: torch.Generator | None = None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise drawn from an optional generator (whose device decides where it is drawn)."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


def default_device(device=None) -> torch.device:
    """``device`` if given, else CUDA when available, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
