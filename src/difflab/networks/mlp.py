"""A residual MLP denoiser for points and flat vectors: ``net(x, t, y=None) -> x``-shaped output.

``x`` of any per-sample shape ``(B, *shape)`` is flattened to ``(B, D)``, lifted to ``hidden`` units,
passed through ``depth`` residual blocks

    h <- h + W₂ SiLU(W₁ LayerNorm(h) + P emb),        emb = TimeMLP(t) + ClassEmb(y)

(each block has its own projection ``P`` of the conditioning vector), and mapped back to ``D`` values
by a zero-initialised linear layer (the untrained network predicts 0), then reshaped to ``(B, *shape)``.
With ``learned_variance`` the output is ``(B, 2·shape[0], *shape[1:])``: the target, then the raw
variance interpolation (SPEC §3), split by ``chunk(2, dim=1)``. Time and labels follow the convention
of :mod:`difflab.networks.embeddings`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks.embeddings import ConditionEmbedding
from difflab.utils import per_sample_time


class MLPBlock(nn.Module):
    """``h (B, hidden)``, ``emb (B, hidden)`` -> ``h + W₂ SiLU(W₁ LN(h) + P SiLU(emb))``."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, hidden)
        self.emb_proj = nn.Linear(hidden, hidden)
        self.fc2 = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(F.silu(self.fc1(self.norm(h)) + self.emb_proj(F.silu(emb))))


class MLPDenoiser(nn.Module):
    """Residual MLP for data of per-sample shape ``dim`` (an int ``D`` or a shape tuple).

    Args:
        dim: per-sample data shape (``2`` for 2-D points, ``(1, 8, 8)`` for flattened images, …).
        hidden: width of the residual stream; depth: number of residual blocks.
        time_dim: number of sinusoidal time features (even).
        num_classes: classes for label conditioning (0 = unconditional).
        learned_variance: double the output along dim 1 (target, raw variance interpolation).
        latent_dim: width of a latent ``z`` added to the conditioning vector (a DDGAN generator; 0 = none).
    """

    def __init__(self, dim: Union[int, Sequence[int]], hidden: int = 256, depth: int = 4, time_dim: int = 128,
                 num_classes: int = 0, learned_variance: bool = False, latent_dim: int = 0):
        super().__init__()
        self.shape = (int(dim),) if isinstance(dim, int) else tuple(int(d) for d in dim)
        if not self.shape or min(self.shape) < 1 or hidden < 1 or depth < 0:
            raise ValueError(f"MLPDenoiser needs a non-empty positive shape, hidden >= 1, depth >= 0; "
                             f"got dim={dim}, hidden={hidden}, depth={depth}")
        self.num_classes, self.learned_variance = num_classes, learned_variance
        D = math.prod(self.shape)
        self.out_shape = ((2 * self.shape[0],) + self.shape[1:]) if learned_variance else self.shape
        self.embed = ConditionEmbedding(time_dim, hidden, num_classes, latent_dim)
        self.inp = nn.Linear(D, hidden)
        self.blocks = nn.ModuleList([MLPBlock(hidden) for _ in range(depth)])
        self.norm_out = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, D * (2 if learned_variance else 1))
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x (B, *shape)``, ``t [B]`` (network time), ``y [B]`` labels, ``z (B, latent_dim)`` -> ``(B, *out_shape)``."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"MLPDenoiser expects input of shape (B, {', '.join(map(str, self.shape))}), "
                             f"got {tuple(x.shape)}")
        if context is not None:
            raise ValueError("MLPDenoiser takes no cross-attention context; use the UNet with context_dim")
        B = x.shape[0]
        emb = self.embed(per_sample_time(t, B, device=x.device), y, z)  # (B, hidden)
        h = self.inp(x.reshape(B, -1))
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm_out(h))).reshape(B, *self.out_shape)
