"""The nested U-Net of multi-scale (Matryoshka) diffusion (SPEC §5, the multi-scale reading of "nested"; Gu et al.
2023, their NestedUNet): one network that denoises an image and its ``ratio``-times smaller version jointly.

Layout. The two resolutions travel as one tensor (:class:`NestedLayout`): ``(B, C, H·W + h·w)``, the high
resolution's pixels then the low resolution's, flattened per channel — so the joint state is one sampler state, and
every sampler, guidance and :class:`~difflab.parameterization.NetworkDenoiser` see it unchanged (shape-agnostic math,
STYLE rule 5). Only the network unpacks it.

Network. With ``channel_mults = [m0, m1, …]`` (the widths of :class:`~difflab.networks.unet.UNet`):

- the *inner* network is a complete :class:`UNet` at ``h = H/2`` with ``channel_mults = [m1, …]``: its own input
  and output convolutions read and predict the low resolution;
- the *outer* level is the U-Net's first level at ``H`` (width ``base·m0``): ``conv_in``, ``num_res_blocks`` blocks
  and a stride-2 downsample, whose features enter the inner network through ``in_adapter`` (added to the inner
  ``conv_in``'s output); the inner network's last decoder features come back through ``out_adapter`` (added to the
  downsampled features), then upsample, ``num_res_blocks + 1`` blocks with the skip connections and ``conv_out``.

Both adapters are zero-initialised 3×3 convolutions, so the outer level starts as a no-op for the inner network:
after the progressive schedule's first phase (the inner network trained alone, ``inner_only=True``) the joint
network begins exactly where the inner one stands. Time and class embeddings are the inner network's, shared by
both levels (one ``t`` for both resolutions). With the same ``base_channels``/``channel_mults`` as a pixel
``unet`` the computation at ``h`` and below is the pixel U-Net's, plus the inner input/output convolutions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks.attention import group_norm
from difflab.networks.unet import Downsample, ResAttnBlock, UNet, Upsample

RATIO = 2
"""Side-length ratio of the two resolutions: the outer level has one stride-2 downsample (28×28 over 14×14)."""


@dataclass(frozen=True)
class NestedLayout:
    """Images ``(C, H, W)`` and their ``ratio``-times smaller versions ``(C, H/ratio, W/ratio)`` packed as
    ``(C, H·W + h·w)`` per sample (module docstring)."""

    channels: int
    height: int
    width: int
    ratio: int = RATIO

    def __post_init__(self):
        if min(self.channels, self.height, self.width, self.ratio) < 1:
            raise ValueError(f"a nested layout needs positive sizes, got {self}")
        if self.height % self.ratio or self.width % self.ratio:
            raise ValueError(f"image side {self.height}×{self.width} is not divisible by the ratio {self.ratio}")

    @classmethod
    def of_image(cls, image_shape: Sequence[int], ratio: int = RATIO) -> "NestedLayout":
        c, h, w = (int(v) for v in image_shape)
        return cls(c, h, w, ratio)

    @classmethod
    def of_packed(cls, packed_shape: Sequence[int], ratio: int = RATIO) -> "NestedLayout":
        """The layout of square images whose packed shape is ``(C, P)``: ``P = H² (1 + 1/ratio²)``."""
        if len(packed_shape) != 2:
            raise ValueError(f"a packed multi-resolution shape is (C, pixels), got {tuple(packed_shape)}")
        c, p = (int(v) for v in packed_shape)
        side = math.isqrt(p * ratio * ratio // (ratio * ratio + 1))
        layout = cls(c, side, side, ratio) if side > 0 and side % ratio == 0 else None
        if layout is None or layout.packed_shape != (c, p):
            raise ValueError(f"{p} pixels per channel are not a square image plus its 1/{ratio} version")
        return layout

    @property
    def high_shape(self) -> tuple:
        return self.channels, self.height, self.width

    @property
    def low_shape(self) -> tuple:
        return self.channels, self.height // self.ratio, self.width // self.ratio

    @property
    def packed_shape(self) -> tuple:
        return self.channels, self.height * self.width + math.prod(self.low_shape[1:])

    def pack(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        """``high (B, C, H, W)``, ``low (B, C, h, w)`` -> ``(B, C, H·W + h·w)``."""
        return torch.cat([high.flatten(2), low.flatten(2)], dim=2)

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, C, H·W + h·w)`` -> ``high (B, C, H, W)``, ``low (B, C, h, w)`` (views)."""
        if tuple(x.shape[1:]) != self.packed_shape:
            raise ValueError(f"expected packed images of shape (B, {', '.join(map(str, self.packed_shape))}), "
                             f"got {tuple(x.shape)}")
        n = self.height * self.width
        return x[:, :, :n].unflatten(2, self.high_shape[1:]), x[:, :, n:].unflatten(2, self.low_shape[1:])


class MatryoshkaUNet(nn.Module):
    """The nested U-Net ``net(x, t, y=None) -> (B, C, H·W + h·w)`` on packed two-resolution states (module docstring).

    Args (as :class:`~difflab.networks.unet.UNet`'s, for the whole network):
        in_channels: image channels ``C``.
        base_channels, channel_mults: level ``i`` has width ``base_channels · channel_mults[i]``; level 0 is the outer
            level at ``image_size``, levels ``1…`` the inner U-Net at ``image_size / 2`` (at least two entries).
        num_res_blocks, attn_resolutions, dropout, num_heads: as the U-Net's; ``attn_resolutions`` may include
            the outer resolution (``None``: the lowest only).
        num_classes: class conditioning (0 = unconditional), shared by both levels.
        image_size: the high resolution's side ``H`` (square images), divisible by ``2^(len(channel_mults) − 1)``.
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32, channel_mults: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 2, attn_resolutions: Optional[Sequence[int]] = None, dropout: float = 0.0,
                 num_classes: int = 0, num_heads: int = 4, image_size: int = 28):
        super().__init__()
        if len(channel_mults) < 2:
            raise ValueError("the nested U-Net needs at least two levels in channel_mults (outer, inner…)")
        self.layout = NestedLayout(in_channels, image_size, image_size, RATIO)
        low = image_size // RATIO
        lowest = image_size // 2 ** (len(channel_mults) - 1)
        attn = {lowest} if attn_resolutions is None else set(attn_resolutions)
        self.inner = UNet(in_channels, base_channels, channel_mults[1:], num_res_blocks,
                          sorted(r for r in attn if r <= low), dropout, num_classes, num_heads=num_heads, image_size=low)
        emb_dim = 4 * base_channels  # the inner U-Net's embedding width (UNet: 4 · base_channels)
        outer, inner_width = base_channels * channel_mults[0], base_channels * channel_mults[1]

        def block(c_in, c_out):
            return ResAttnBlock(c_in, c_out, emb_dim, dropout, image_size in attn, num_heads, None)

        self.conv_in = nn.Conv2d(in_channels, outer, 3, padding=1)
        self.down = nn.ModuleList([block(outer, outer) for _ in range(num_res_blocks)])
        self.downsample = Downsample(outer)
        self.in_adapter = _zero_conv(outer, inner_width)
        self.out_adapter = _zero_conv(inner_width, outer)
        self.upsample = Upsample(outer, outer)
        self.up = nn.ModuleList([block(2 * outer, outer) for _ in range(num_res_blocks + 1)])
        self.norm_out = group_norm(outer)
        self.conv_out = _zero_conv(outer, in_channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None,
                inner_only: bool = False) -> torch.Tensor:
        """``x (B, C, H·W + h·w)`` packed, ``t [B]`` network time, ``y [B]`` labels -> the packed prediction.

        ``inner_only``: the inner U-Net alone on the low resolution (the first phase of progressive training); the
        high resolution's prediction is then zero (and carries no gradient)."""
        x_high, x_low = self.layout.unpack(x)  # (B, C, H, W), (B, C, h, w)
        emb = self.inner.embedding(x, t, y)  # (B, emb_dim), one time for both levels
        if inner_only:
            out_low = self.inner.head(self.inner.features(x_low, emb))
            return self.layout.pack(torch.zeros_like(x_high), out_low)
        h = self.conv_in(x_high)
        skips = [h]
        for layer in self.down:
            h = layer(h, emb)
            skips.append(h)
        h = self.downsample(h)  # (B, outer, h, w)
        inner = self.inner.features(x_low, emb, added=self.in_adapter(h))  # (B, inner_width, h, w)
        out_low = self.inner.head(inner)
        h = self.upsample(h + self.out_adapter(inner))  # (B, outer, H, W)
        for layer in self.up:
            h = layer(torch.cat([h, skips.pop()], dim=1), emb)
        out_high = self.conv_out(F.silu(self.norm_out(h)))
        return self.layout.pack(out_high, out_low)


def _zero_conv(c_in: int, c_out: int) -> nn.Conv2d:
    """A 3×3 convolution initialised to output zero."""
    conv = nn.Conv2d(c_in, c_out, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv
