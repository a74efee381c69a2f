"""Time and class embeddings shared by every denoiser network.

Time convention (one choice for every network)
----------------------------------------------
A network embeds the time ``t`` it is given *as is*, with the sinusoidal features of Vaswani et al.
(2017) / DDPM: ``[cos(t ω_k), sin(t ω_k)]`` with ``ω_k = P^(−k/(d/2))``, ``k = 0..d/2−1``, max period
``P = 10000``. The frequencies run from 1 down to 1/P rad per unit of ``t``, so they resolve the
DDPM integer range ``t ∈ {0..1000}`` well (neighbouring steps differ in the fastest features, the slow
ones vary smoothly over the whole range). A continuous path's time ``t ∈ [0, 1]`` would only reach
the fastest features' first radian, so continuous paths feed the network ``t · 1000 / t_max``:
:func:`network_time_fn` builds that map for :class:`~difflab.parameterization.NetworkDenoiser`'s
``time_fn`` hook (identity, i.e. ``None``, for discrete paths).

Labels
------
A class embedding has ``num_classes + 1`` rows; the last is the learned *null* label used for the
unconditional model of classifier-free guidance (SPEC §7). ``y=None`` means every sample is null, and
the constant :data:`NULL_LABEL` (``-1``) in ``y`` marks individual samples as null (label dropout).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import nn

NULL_LABEL = -1
"""A label value meaning "no class" (the learned null embedding), for classifier-free guidance."""

MAX_PERIOD = 10000.0
"""Longest period of the sinusoidal time features (in units of the network's time input)."""

CONTINUOUS_TIME_SCALE = 1000.0
"""Network time for the end of a continuous path: ``t_net = t · 1000 / t_max`` (the DDPM range)."""


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = MAX_PERIOD) -> torch.Tensor:
    """Sinusoidal features of a time ``[B]`` -> ``(B, dim)``: ``[cos(t ω_k), sin(t ω_k)]``, ``ω_k = P^(−2k/dim)``.

    ``dim`` must be even. ``t`` may be integer-valued (discrete DDPM time) or any float.
    """
    if dim % 2:
        raise ValueError(f"time embedding dim must be even, got {dim}")
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angle = t.to(torch.float32).reshape(-1, 1) * omega  # (B, half)
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=-1)


class TimeScale:
    """``t -> scale · t``: maps a continuous path's time onto the network's time range."""

    def __init__(self, scale: float):
        self.scale = float(scale)

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return t * self.scale

    def __repr__(self) -> str:
        return f"TimeScale({self.scale:g})"


def network_time_fn(path) -> Optional[Callable]:
    """The ``time_fn`` for :class:`NetworkDenoiser` under this module's time convention.

    ``None`` (identity) for a discrete path (the network sees the integer step), else
    ``t -> t · CONTINUOUS_TIME_SCALE / path.t_max`` so a continuous path's end maps to ``t_net = 1000``.
    """
    if getattr(path, "discrete", False):
        return None
    return TimeScale(CONTINUOUS_TIME_SCALE / float(path.t_max))


class TimeEmbedding(nn.Module):
    """Sinusoidal features -> ``Linear -> SiLU -> Linear``: time ``[B]`` -> ``(B, out_dim)``."""

    def __init__(self, freq_dim: int, out_dim: int, max_period: float = MAX_PERIOD):
        super().__init__()
        if freq_dim % 2:
            raise ValueError(f"time embedding dim must be even, got {freq_dim}")
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim, self.max_period))


class ClassEmbedding(nn.Module):
    """``num_classes + 1`` learned vectors; row ``num_classes`` is the null label (SPEC §7).

    ``forward(y, batch)``: ``y`` long ``[B]`` with values in ``0..num_classes−1`` or :data:`NULL_LABEL`,
    or ``None`` (all null) -> ``(B, dim)``.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"a class embedding needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: Optional[torch.Tensor], batch: int) -> torch.Tensor:
        null = self.num_classes
        if y is None:
            idx = torch.full((batch,), null, dtype=torch.long, device=self.table.weight.device)
        else:
            y = check_labels(y, batch, self.num_classes)
            idx = torch.where(y == NULL_LABEL, torch.full_like(y, null), y)
        return self.table(idx)


def check_labels(y, batch: int, num_classes: int) -> torch.Tensor:
    """Validate labels ``[B]`` (``0..num_classes−1`` or :data:`NULL_LABEL`); returns a long tensor."""
    y = torch.as_tensor(y)
    if y.ndim == 0:
        y = y.expand(batch)
    if y.shape != (batch,) or y.is_floating_point():
        raise ValueError(f"labels y must be an integer tensor of shape ({batch},), got {tuple(y.shape)} {y.dtype}")
    y = y.long()
    bad = (y != NULL_LABEL) & ((y < 0) | (y >= num_classes))
    if bad.any():
        raise ValueError(f"labels must lie in 0..{num_classes - 1} or be NULL_LABEL={NULL_LABEL}, "
                         f"got {y[bad][0].item()}")
    return y


class ConditionEmbedding(nn.Module):
    """The per-sample conditioning vector ``emb(t, y, z) = TimeMLP(t) + ClassEmb(y) [+ Mapping(z)]`` -> ``(B, dim)``.

    With ``num_classes == 0`` the network is unconditional: ``y`` must be ``None`` or all null. With
    ``latent_dim > 0`` a latent ``z (B, latent_dim)`` enters through a mapping MLP (``Linear -> SiLU -> Linear``)
    into the same vector, so it modulates every block the way time does — the scale/shift of the U-Net's norms
    (AdaGN, as DDGAN's generator injects its latent; SPEC §5).
    """

    def __init__(self, freq_dim: int, dim: int, num_classes: int = 0, latent_dim: int = 0):
        super().__init__()
        self.num_classes, self.latent_dim = num_classes, latent_dim
        self.time = TimeEmbedding(freq_dim, dim)
        self.label = ClassEmbedding(num_classes, dim) if num_classes > 0 else None
        self.mapping = (nn.Sequential(nn.Linear(latent_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
                        if latent_dim > 0 else None)

    def forward(self, t: torch.Tensor, y: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        emb = self.time(t)  # (B, dim)
        batch = emb.shape[0]
        if self.mapping is not None:
            if z is None or z.shape != (batch, self.latent_dim):
                raise ValueError(f"this network takes a latent z of shape ({batch}, {self.latent_dim}), "
                                 f"got {None if z is None else tuple(z.shape)}")
            emb = emb + self.mapping(z.to(emb.dtype))
        elif z is not None:
            raise ValueError("this network was built without a latent (latent_dim=0) but got z")
        if self.label is not None:
            return emb + self.label(y, batch)
        if y is not None and (torch.as_tensor(y) != NULL_LABEL).any():
            raise ValueError("this network is unconditional (num_classes=0) but got class labels y")
        return emb

