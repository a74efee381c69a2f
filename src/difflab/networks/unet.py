"""The image denoiser: a DDPM-style U-Net ``net(x, t, y=None, context=None) -> (B, C_out, H, W)``.

Layout (Ho et al. 2020; Dhariwal & Nichol 2021): ``conv_in`` -> per resolution ``num_res_blocks``
residual blocks (+ self-attention where the resolution is in ``attn_resolutions``) and a strided-conv
downsample -> middle (res, attention, res) -> the mirror image with ``num_res_blocks + 1`` blocks per
resolution, each fed the matching encoder activation by concatenation, nearest-neighbour upsampling
+ conv -> GroupNorm, SiLU, zero-initialised ``conv_out`` (so the untrained network predicts 0).

Conditioning: ``emb = TimeMLP(t) + ClassEmb(y)`` (see :mod:`difflab.networks.embeddings` for the time
convention and the null label) modulates every residual block by scale-shift,
``GroupNorm(h)·(1 + scale) + shift``; a ``context (B, L, context_dim)`` enters by cross-attention in
every attention block (latent diffusion, SPEC §5). With ``learned_variance`` the output has
``2·in_channels`` channels: the target, then the raw variance interpolation (SPEC §3), the layout
:class:`~difflab.parameterization.NetworkDenoiser` splits with ``chunk(2, dim=1)``.

CPU speed: attention only at the low resolutions (by default only the lowest, 7×7 for MNIST), on the
fused ``scaled_dot_product_attention`` kernel; no per-block reshapes outside attention.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks.attention import AttentionBlock, group_norm
from difflab.networks.embeddings import ConditionEmbedding
from difflab.utils import per_sample_time

MIN_TIME_FREQ_DIM = 64
"""At least 32 sine/cosine pairs, so the frequencies sample the 4 decades of ``MAX_PERIOD`` densely."""


class ResBlock(nn.Module):
    """Residual block with time/class modulation: ``x (B, C_in, H, W)``, ``emb (B, emb_dim)`` -> ``(B, C_out, H, W)``.

    ``h = Conv(SiLU(GN(x)))``; ``h = GN(h)·(1 + scale) + shift`` with ``(scale, shift) = Linear(SiLU(emb))``;
    ``out = skip(x) + Conv(Dropout(SiLU(h)))``, ``skip`` a 1×1 conv when the width changes.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb_proj(F.silu(emb))[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
        h = torch.addcmul(shift, self.norm2(h), 1.0 + scale)
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class ResAttnBlock(nn.Module):
    """A :class:`ResBlock` optionally followed by an :class:`AttentionBlock` (self- and cross-attention)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, dropout: float, attention: bool,
                 num_heads: int, context_dim: Optional[int]):
        super().__init__()
        self.res = ResBlock(in_channels, out_channels, emb_dim, dropout)
        self.attn = AttentionBlock(out_channels, num_heads, context_dim) if attention else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.res(x, emb)
        return self.attn(h, context) if self.attn is not None else h


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3×3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, emb=None, context=None) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Double the resolution: a 3×3 conv at the coarse resolution (``in -> out`` channels), then nearest ×2.

    Convolving *before* interpolating costs a quarter of the usual interpolate-then-conv (the
    following residual block's 3×3 convs smooth the 2×2 blocks), and moving to the finer level's
    width here keeps the fine decoder blocks narrow.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, emb=None, context=None) -> torch.Tensor:
        return F.interpolate(self.conv(x), scale_factor=2.0, mode="nearest")


class UNet(nn.Module):
    """U-Net denoiser for images ``(B, in_channels, H, W)`` (``image_size`` is ``H = W``, or ``(H, W)``).

    Args:
        in_channels: image channels ``C``; the output has ``C`` (or ``2C`` with ``learned_variance``).
        base_channels, channel_mults: width at resolution level ``i`` is ``base_channels · channel_mults[i]``;
            level ``i`` runs at ``image_size / 2^i`` (28 -> 14 -> 7 for the default MNIST config).
        num_res_blocks: residual blocks per level in the encoder (``+1`` in the decoder).
        attn_resolutions: resolutions (side lengths) with self-attention; ``None`` means the lowest
            resolution only (7 for 28×28 with three levels), ``()`` means no attention at all.
        dropout: dropout inside the residual blocks.
        num_classes: number of classes for label conditioning (0 = unconditional); see
            :class:`~difflab.networks.embeddings.ClassEmbedding` for the null label.
        context_dim: width of the cross-attention context ``(B, L, context_dim)`` (None = no cross-attention).
        num_heads: attention heads (must divide the width at every attention resolution).
        learned_variance: double the output channels (target, raw variance interpolation).
        image_size: the input side length, or ``(H, W)`` for a rectangle (e.g. the 28×56 two-digit canvas); each side
            must be divisible by ``2^(len(channel_mults) − 1)``. Resolutions (``attn_resolutions``) are heights.
        latent_dim: width of a latent ``z`` that modulates every residual block's norm with the time
            (:class:`~difflab.networks.embeddings.ConditionEmbedding`; a DDGAN generator, SPEC §5; 0 = none).
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Optional[Sequence[int]] = None, dropout: float = 0.0,
                 num_classes: int = 0, context_dim: Optional[int] = None, num_heads: int = 4,
                 learned_variance: bool = False, image_size=28, latent_dim: int = 0):
        super().__init__()
        levels = len(channel_mults)
        if levels < 1 or num_res_blocks < 1 or base_channels < 1:
            raise ValueError("UNet needs at least one level, one residual block per level and base_channels >= 1")
        factor = 2 ** (levels - 1)
        height, width = (image_size, image_size) if isinstance(image_size, int) else (int(v) for v in image_size)
        if height % factor or width % factor:
            raise ValueError(f"image_size={image_size} is not divisible by 2^(len(channel_mults)-1)={factor}; "
                             f"use fewer levels or pad the images")
        resolutions = [height // 2**i for i in range(levels)]
        attn = {resolutions[-1]} if attn_resolutions is None else set(attn_resolutions)
        if not attn <= set(resolutions):
            raise ValueError(f"attn_resolutions {sorted(attn)} must be among this U-Net's resolutions {resolutions}")
        if context_dim is not None and not attn:
            raise ValueError("context_dim needs at least one attention resolution (cross-attention lives there)")
        self.in_channels, self.image_size, self.num_classes = in_channels, (height, width), num_classes
        self.context_dim, self.learned_variance = context_dim, learned_variance
        self.out_channels = in_channels * (2 if learned_variance else 1)

        emb_dim = 4 * base_channels
        freq_dim = max(MIN_TIME_FREQ_DIM, base_channels + base_channels % 2)  # sinusoidal features (even)
        self.embed = ConditionEmbedding(freq_dim, emb_dim, num_classes, latent_dim)

        def block(c_in, c_out, res):
            return ResAttnBlock(c_in, c_out, emb_dim, dropout, res in attn, num_heads, context_dim)

        ch = base_channels * channel_mults[0]
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        skip_channels = [ch]
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(block(ch, base_channels * mult, resolutions[i]))
                ch = base_channels * mult
                skip_channels.append(ch)
            if i < levels - 1:
                self.down.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid = nn.ModuleList([block(ch, ch, resolutions[-1]), ResBlock(ch, ch, emb_dim, dropout)])

        self.up = nn.ModuleList()
        self.up_takes_skip = []
        for i, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(ch + skip_channels.pop(), base_channels * mult, resolutions[i]))
                self.up_takes_skip.append(True)
                ch = base_channels * mult
            if i > 0:
                self.up.append(Upsample(ch, base_channels * channel_mults[i - 1]))
                ch = base_channels * channel_mults[i - 1]
                self.up_takes_skip.append(False)

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                context: Optional[torch.Tensor] = None, z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x (B, C, H, W)``, ``t [B]`` (network time), ``y [B]`` labels, ``context (B, L, context_dim)``,
        ``z (B, latent_dim)``."""
        expected = (self.in_channels, *self.image_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"UNet expects input of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        context = self._check_context(context, x.shape[0])
        emb = self.embedding(x, t, y, z)  # (B, emb_dim)
        return self.head(self.features(x, emb, context))

    def embedding(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                  z: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The conditioning ``emb (B, emb_dim)`` of time ``t``, labels ``y`` and latent ``z`` for a batch ``x``."""
        return self.embed(per_sample_time(t, x.shape[0], device=x.device), y, z)

    def features(self, x: torch.Tensor, emb: torch.Tensor, context: Optional[torch.Tensor] = None,
                 added: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The last decoder features ``(B, base_channels · channel_mults[0], H, W)`` of ``x (B, C, H, W)``;
        ``added`` (the width of ``conv_in``'s output) is added to ``conv_in(x)`` (an enclosing network's features,
        :class:`~difflab.networks.matryoshka.MatryoshkaUNet`). Inputs as :meth:`forward` checks them."""
        h = self.conv_in(x)
        if added is not None:
            h = h + added
        skips = [h]
        for layer in self.down:
            h = layer(h, emb, context)
            skips.append(h)
        h = self.mid[1](self.mid[0](h, emb, context), emb)
        for layer, takes_skip in zip(self.up, self.up_takes_skip):
            if takes_skip:
                h = torch.cat([h, skips.pop()], dim=1)
            h = layer(h, emb, context)
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """The output ``conv_out(SiLU(GroupNorm(h)))`` of the last decoder features ``h``."""
        return self.conv_out(F.silu(self.norm_out(h)))

    def _check_context(self, context, batch: int):
        if context is None:
            return None
        if self.context_dim is None:
            raise ValueError("this UNet was built without context_dim, so it cannot take a context")
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != self.context_dim:
            raise ValueError(f"context must have shape ({batch}, L, {self.context_dim}), got {tuple(context.shape)}")
        return context
