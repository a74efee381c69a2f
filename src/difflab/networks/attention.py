"""Self- and cross-attention for feature maps, on the fused ``scaled_dot_product_attention`` kernel.

``Attention(Q, K, V) = softmax(Q Kᵀ / √d_head) V`` per head. Self-attention takes ``Q, K, V`` from the
feature map's ``N = H·W`` tokens; cross-attention (latent diffusion / Stable Diffusion conditioning,
SPEC §5) takes ``K, V`` from a context ``(B, L, context_dim)`` of class or token embeddings.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with ``gcd(channels, 32)`` groups (32 as in DDPM whenever the width allows)."""
    groups = max_groups
    while channels % groups:
        groups //= 2
    return nn.GroupNorm(groups, channels)


class MultiHeadAttention(nn.Module):
    """Multi-head attention of tokens ``(B, N, dim)`` on themselves or on ``context (B, L, context_dim)``."""

    def __init__(self, dim: int, num_heads: int, context_dim: Optional[int] = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.is_cross = context_dim is not None
        if self.is_cross:
            self.to_q = nn.Linear(dim, dim)
            self.to_kv = nn.Linear(context_dim, 2 * dim)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, z: torch.Tensor, parts: int) -> torch.Tensor:
        """``(B, N, parts·dim) -> (parts, B, heads, N, d_head)`` as a strided view."""
        B, N = z.shape[:2]
        return z.reshape(B, N, parts, self.num_heads, -1).permute(2, 0, 3, 1, 4)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        if self.is_cross:
            q = self._heads(self.to_q(x), 1)[0]
            k, v = self._heads(self.to_kv(context), 2)
        else:
            q, k, v = self._heads(self.to_qkv(x), 3)
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, d_head)
        return self.proj(out.transpose(1, 2).flatten(2))  # (B, N, dim)


class AttentionBlock(nn.Module):
    """Residual self-attention over a feature map, then (optionally) residual cross-attention.

    ``h = x + SelfAttn(GroupNorm(x))``; with ``context_dim`` set and a context given,
    ``h = h + CrossAttn(LayerNorm(h), context)``. Shapes: ``x (B, C, H, W)``, ``context (B, L, context_dim)``.
    """

    def __init__(self, channels: int, num_heads: int = 4, context_dim: Optional[int] = None):
        super().__init__()
        self.norm = group_norm(channels)
        self.self_attn = MultiHeadAttention(channels, num_heads)
        self.context_dim = context_dim
        if context_dim is not None:
            self.norm_cross = nn.LayerNorm(channels)
            self.cross_attn = MultiHeadAttention(channels, num_heads, context_dim=context_dim)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        h = x.flatten(2).transpose(1, 2) + self.self_attn(tokens)
        if context is not None and self.context_dim is not None:
            h = h + self.cross_attn(self.norm_cross(h), context)
        return h.transpose(1, 2).reshape(x.shape)
