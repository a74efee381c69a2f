"""DDGAN's time-conditional discriminator ``D(x_{t−1}, x_t, t, y=None) -> logit [B]`` (SPEC §5; Xiao et al. 2022).

It scores a pair — a candidate ``x_{t−1}`` and the ``x_t`` it came from — at step ``t``: the pair is joined
(concatenated features for points, stacked channels for images) and conditioned on ``emb(t, y)``
(:class:`~difflab.networks.embeddings.ConditionEmbedding`, the same time convention as the denoisers):

- :class:`PointDiscriminator`: a plain LeakyReLU MLP of ``depth`` layers on ``[x_{t−1}, x_t]`` (optionally with
  random Fourier features of each, :class:`FourierFeatures`) with ``emb`` added to its first layer;
- :class:`ImageDiscriminator`: ``Conv3×3(2C -> width)``, ``depth`` :class:`DownBlock` s (conv, LeakyReLU, the
  embedding as a per-channel bias, average-pool downsampling with a skip), spatial mean, ``Linear(-> 1)``.

Neither normalises its activations (GAN discriminators are plain: a normalised one was measured to go blind, see
:class:`PointDiscriminator`).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks.embeddings import ConditionEmbedding
from difflab.utils import per_sample_time

TIME_FREQ_DIM = 64
"""Sinusoidal time features of the discriminators (32 sine/cosine pairs, as the U-Net's minimum)."""
LEAK = 0.2
"""Negative slope of the discriminators' LeakyReLU (the GAN literature's usual value)."""
MAX_WIDTH_MULT = 4
"""The image discriminator's widest level is this multiple of ``width``."""
MIN_SIDE = 4
"""The image discriminator halves the side only while the result is at least this (8 -> 4; 28 -> 14 -> 7)."""


class FourierFeatures(nn.Module):
    """``x (B, D) -> [x, sin(2π x W), cos(2π x W)] (B, D + 2m)`` with fixed frequencies ``W (D, m) ~ N(0, scale²)``
    (random Fourier features, Tancik et al. 2020), a buffer saved with the weights.

    Why: an MLP on raw coordinates learns fine structure slowly (spectral bias). On a 4×4 grid of std-0.06 modes
    (spacing 1.25; a tuning bed, not one of :mod:`difflab.experiments.ddgan_steps`' beds) the plain discriminator
    stayed at chance (``loss_d ≈ 2 log 2 = 1.386``) for 3000 adversarial steps while the generator's points were
    still spread between the modes (median distance to the nearest mode 0.49 against the data's 0.07); with 64 of
    these features of scale 1 it told real points from the same points blurred by 0.15 within 150 steps (loss 0.87,
    against 1.37 without). Not a cure by itself: with it, 2000–4000 steps of the full DDGAN then collapsed onto 3–11
    of the 16 modes (lr 2e-4 or 5e-4, R1 γ 0.01–1), so the experiment's recipe leaves it off (``fourier = 0``).
    """

    def __init__(self, dim: int, num: int, scale: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(dim, num) * scale)
        self.out_dim = dim + 2 * num

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        phase = 2 * math.pi * x @ self.freqs  # (B, m)
        return torch.cat([x, phase.sin(), phase.cos()], dim=1)


class PointDiscriminator(nn.Module):
    """The MLP discriminator for data of per-sample shape ``shape`` (points, flat vectors): ``h = LeakyReLU(W_0 [φ(x_{t−1}),
    φ(x_t)] + emb(t, y))``, then ``depth − 1`` layers ``h = LeakyReLU(W h)``, then ``Linear(width -> 1)``; ``φ`` is the
    identity, or with ``fourier > 0`` the :class:`FourierFeatures` ``[x, sin, cos]`` of ``fourier`` frequencies of
    std ``fourier_scale`` (the same frequencies for both members of the pair).

    No normalisation: a discriminator with normalised residual blocks (the denoiser's :class:`~difflab.networks.mlp.
    MLPBlock`) was measured to lose its input dependence within a few hundred adversarial steps on 2-D data (its
    logits' spread fell to 1e-2 while the samples were still far off), the usual reason GAN discriminators are plain.
    """

    def __init__(self, shape: Sequence[int], width: int = 128, depth: int = 3, num_classes: int = 0,
                 fourier: int = 0, fourier_scale: float = 1.0):
        super().__init__()
        self.shape = tuple(int(d) for d in shape)
        D = math.prod(self.shape)
        self.features = FourierFeatures(D, fourier, fourier_scale) if fourier > 0 else None
        self.embed = ConditionEmbedding(TIME_FREQ_DIM, width, num_classes)
        self.inp = nn.Linear(2 * (self.features.out_dim if self.features is not None else D), width)
        self.layers = nn.ModuleList([nn.Linear(width, width) for _ in range(depth - 1)])
        self.out = nn.Linear(width, 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x_prev, x_t (B, *shape)``, ``t [B]`` (network time), ``y [B]`` -> logits ``[B]``."""
        B = x_t.shape[0]
        emb = self.embed(per_sample_time(t, B, device=x_t.device), y)  # (B, width)
        pair = [x_prev.reshape(B, -1), x_t.reshape(B, -1)]
        if self.features is not None:
            pair = [self.features(x.to(self.features.freqs.dtype)) for x in pair]
        h = F.leaky_relu(self.inp(torch.cat(pair, dim=1)) + emb, LEAK)
        for layer in self.layers:
            h = F.leaky_relu(layer(h), LEAK)
        return self.out(h).squeeze(-1)


class DownBlock(nn.Module):
    """``x (B, C_in, H, W)``, ``emb (B, emb_dim)`` -> ``(B, C_out, H', W')``: ``h = LeakyReLU(Conv(x)) + Linear(emb)``
    per channel, ``h = LeakyReLU(Conv(h))``, then (with ``down``) 2×2 average pooling of ``h`` and of the 1×1-conv
    skip, summed and scaled by ``1/√2`` (the reference's ``DownConvBlock``, without normalisation)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, down: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.down = down

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.conv1(x), LEAK) + self.emb_proj(emb)[:, :, None, None]
        h = F.leaky_relu(self.conv2(h), LEAK)
        skip = self.skip(x)
        if self.down:
            h, skip = F.avg_pool2d(h, 2), F.avg_pool2d(skip, 2)
        return (h + skip) / math.sqrt(2.0)


class ImageDiscriminator(nn.Module):
    """The convolutional discriminator for images ``(C, H, W)``: ``Conv3×3(2C -> width)``, ``depth``
    :class:`DownBlock` s (width doubling up to ``MAX_WIDTH_MULT`` ×, halving the side while it is at least
    ``2 · MIN_SIDE``), then ``LeakyReLU -> spatial mean -> Linear(-> 1)``."""

    def __init__(self, shape: Sequence[int], width: int = 64, depth: int = 2, num_classes: int = 0):
        super().__init__()
        channels, side = int(shape[0]), int(shape[1])
        emb_dim = 4 * width
        self.embed = ConditionEmbedding(TIME_FREQ_DIM, emb_dim, num_classes)
        self.conv_in = nn.Conv2d(2 * channels, width, 3, padding=1)
        self.blocks = nn.ModuleList()
        ch = width
        for i in range(depth):
            out, down = width * min(2 ** (i + 1), MAX_WIDTH_MULT), side >= 2 * MIN_SIDE
            self.blocks.append(DownBlock(ch, out, emb_dim, down))
            ch, side = out, side // 2 if down else side
        self.out = nn.Linear(ch, 1)

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x_prev, x_t (B, C, H, W)``, ``t [B]`` (network time), ``y [B]`` -> logits ``[B]``."""
        emb = self.embed(per_sample_time(t, x_t.shape[0], device=x_t.device), y)  # (B, emb_dim)
        h = F.leaky_relu(self.conv_in(torch.cat([x_prev, x_t], dim=1)), LEAK)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.leaky_relu(h, LEAK).mean(dim=(2, 3))).squeeze(-1)


def build_discriminator(data_shape: Sequence[int], num_classes: int = 0, width: int = 128,
                        depth: int = 3, fourier: int = 0, fourier_scale: float = 1.0) -> nn.Module:
    """:class:`ImageDiscriminator` for ``(C, H, W)`` data, else :class:`PointDiscriminator` (``fourier`` features:
    points only)."""
    if len(data_shape) == 3:
        if fourier:
            raise ValueError("Fourier features are for the point discriminator; an image discriminator takes none")
        return ImageDiscriminator(data_shape, width, depth, num_classes)
    return PointDiscriminator(data_shape, width, depth, num_classes, fourier, fourier_scale)
