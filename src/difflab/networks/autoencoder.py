"""The KL-regularised autoencoder of latent diffusion (SPEC §5; Rombach et al. 2022, App. G) and its patch
discriminator.

- :class:`Encoder` ``x (B, C, H, W) -> (μ, log σ²)``, each ``(B, c, H/f, W/f)`` with ``f = 2^(levels − 1)``;
  ``log σ²`` is clamped to :data:`LOGVAR_RANGE` (as Stable Diffusion's ``DiagonalGaussianDistribution``), so
  ``σ = exp(½ log σ²)`` never overflows nor vanishes to an exact zero.
- :class:`Decoder` ``z (B, c, H/f, W/f) -> x̂ (B, C, H, W)`` (mirror image, nearest-neighbour upsampling).
- :class:`KLAutoencoder` holds both: ``encode``, ``decode`` and ``forward(x, ε) -> (x̂, μ, log σ²)`` with the
  re-parameterised ``z = μ + σ ε`` (SPEC §1).
- :class:`PatchDiscriminator` ``x -> (B, 1, h, w)`` logits, one per overlapping patch (pix2pix / taming's
  ``NLayerDiscriminator`` at a size that fits 28×28 digits).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from difflab.networks.attention import group_norm

LOGVAR_RANGE = (-30.0, 20.0)
"""Clamp of ``log σ²`` (Stable Diffusion's values): ``σ ∈ [3e-7, 2.2e4]``."""


class PlainResBlock(nn.Module):
    """``x + Conv(SiLU(GN(Conv(SiLU(GN(x))))))`` with a 1×1 skip when the width changes; no time input."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(group_norm(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1),
                                  group_norm(out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.body(x)


class Encoder(nn.Module):
    """``conv_in`` → per level a residual block (+ a stride-2 conv but at the last level) → residual block →
    GN, SiLU, conv to ``2 · latent_channels`` = ``(μ, log σ²)``."""

    def __init__(self, in_channels: int, latent_channels: int, base_channels: int, channel_mults: Sequence[int]):
        super().__init__()
        ch = base_channels * channel_mults[0]
        layers: list = [nn.Conv2d(in_channels, ch, 3, padding=1)]
        for i, mult in enumerate(channel_mults):
            layers.append(PlainResBlock(ch, base_channels * mult))
            ch = base_channels * mult
            if i < len(channel_mults) - 1:
                layers.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        layers += [PlainResBlock(ch, ch), group_norm(ch), nn.SiLU(), nn.Conv2d(ch, 2 * latent_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.net(x).chunk(2, dim=1)  # (B, c, h, w) each
        return mu, logvar.clamp(*LOGVAR_RANGE)


class Decoder(nn.Module):
    """``conv_in`` from the latent → residual block → per level (deepest first) a residual block and a
    nearest-neighbour ×2 upsample + conv but at the last → GN, SiLU, ``conv_out`` (the layer the adaptive
    adversarial weight is measured at)."""

    def __init__(self, out_channels: int, latent_channels: int, base_channels: int, channel_mults: Sequence[int]):
        super().__init__()
        ch = base_channels * channel_mults[-1]
        layers: list = [nn.Conv2d(latent_channels, ch, 3, padding=1), PlainResBlock(ch, ch)]
        for i in reversed(range(len(channel_mults))):
            layers.append(PlainResBlock(ch, base_channels * channel_mults[i]))
            ch = base_channels * channel_mults[i]
            if i > 0:
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch, ch, 3, padding=1)]
        layers += [group_norm(ch), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(ch, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.net(z))


class KLAutoencoder(nn.Module):
    """Encoder + decoder of images ``(C, H, W)`` to latents ``(latent_channels, H/f, W/f)``, ``f = 2^(levels − 1)``."""

    def __init__(self, image_shape: Sequence[int], latent_channels: int = 4, base_channels: int = 32,
                 channel_mults: Sequence[int] = (1, 2)):
        super().__init__()
        C, H, W = (int(d) for d in image_shape)
        f = 2 ** (len(channel_mults) - 1)
        if H % f or W % f:
            raise ValueError(f"images of {H}×{W} are not divisible by the autoencoder's factor {f} "
                             f"(len(channel_mults) − 1 = {len(channel_mults) - 1} halvings)")
        self.image_shape = (C, H, W)
        self.latent_shape = (latent_channels, H // f, W // f)
        self.encoder = Encoder(C, latent_channels, base_channels, channel_mults)
        self.decoder = Decoder(C, latent_channels, base_channels, channel_mults)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ²)`` of ``q(z | x)``."""
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x̂, μ, log σ²)`` with ``x̂ = decode(μ + exp(½ log σ²) ε)`` (re-parameterisation, SPEC §1)."""
        mu, logvar = self.encode(x)
        return self.decode(mu + torch.exp(0.5 * logvar) * eps), mu, logvar

    @property
    def last_layer(self) -> torch.Tensor:
        """The decoder's last weight, where ``λ = ‖∇L_rec‖ / (‖∇L_adv‖ + δ)`` is measured."""
        return self.decoder.conv_out.weight


class PatchDiscriminator(nn.Module):
    """Two stride-2 4×4 convs (LeakyReLU 0.2, GroupNorm on the second) and a 3×3 conv to one logit per patch:
    ``(B, C, H, W) -> (B, 1, H/4, W/4)``."""

    def __init__(self, in_channels: int, base_channels: int = 32):
        super().__init__()
        ch = base_channels
        self.net = nn.Sequential(nn.Conv2d(in_channels, ch, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
                                 nn.Conv2d(ch, 2 * ch, 4, stride=2, padding=1), group_norm(2 * ch), nn.LeakyReLU(0.2),
                                 nn.Conv2d(2 * ch, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, diag σ²) || N(0, I)) = ½ Σ (μ² + σ² − 1 − log σ²)`` per example ``[B]`` (SPEC §1, nats)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss ``½ (E relu(1 − D(x)) + E relu(1 + D(x̂)))`` per example ``[B]``."""
    return 0.5 * (F.relu(1.0 - logits_real).flatten(1).mean(1) + F.relu(1.0 + logits_fake).flatten(1).mean(1))
