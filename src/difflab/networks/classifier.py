"""A noise-conditional classifier ``p_φ(y | x_t, t)`` for classifier guidance (SPEC §7).

Dhariwal & Nichol (2021) guide a diffusion model with the gradient of a classifier trained on *noisy*
inputs ``x_t = a_t x0 + s_t ε`` at every time of the path; the classifier therefore takes the time as
a second input. :class:`NoisyClassifier` returns logits ``(B, num_classes)`` and serves both data kinds:

- points / vectors (``data_shape = (D,)``): the residual :class:`~difflab.networks.mlp.MLPBlock` trunk;
- images (``data_shape = (C, H, W)``): a small encoder of :class:`~difflab.networks.unet.ResBlock` s with
  strided-conv downsampling between resolutions and global average pooling — the U-Net's encoder half,
  as Dhariwal & Nichol's classifier.

The time enters through :class:`~difflab.networks.embeddings.TimeEmbedding` (sinusoidal features and an
MLP), which modulates every block, under the networks' time convention: integer DDPM time as given;
for a continuous path pass ``time_scale = CONTINUOUS_TIME_SCALE / path.t_max`` (what
:func:`~difflab.networks.embeddings.network_time_fn` does for denoisers). Samples are classified
independently (LayerNorm/GroupNorm, no batch statistics), which guidance's gradient of a batch sum needs.
Training objective: :func:`difflab.guidance.classifier_loss`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from difflab.networks.attention import group_norm
from difflab.networks.embeddings import TimeEmbedding
from difflab.networks.mlp import MLPBlock
from difflab.networks.unet import Downsample, ResBlock
from difflab.utils import per_sample_time


class NoisyClassifier(nn.Module):
    """Logits of ``p_φ(y | x_t, t)``: ``forward(x (B, *data_shape), t [B] or scalar) -> (B, num_classes)``.

    Args:
        data_shape: ``(D,)`` for points/vectors (MLP) or ``(C, H, W)`` for images (conv net).
        num_classes: number of classes.
        width: hidden width (MLP units or conv channels).
        depth: residual blocks (MLP) or resolutions (conv: one ResBlock each, halving H and W in between).
        time_dim: number of sinusoidal time features (even).
        time_scale: the network sees ``time_scale · t`` (1 for DDPM steps; see the module docstring).
    """

    def __init__(self, data_shape: Sequence[int], num_classes: int, width: int = 128, depth: int = 3,
                 time_dim: int = 64, time_scale: float = 1.0):
        super().__init__()
        self.data_shape = tuple(int(d) for d in data_shape)
        if len(self.data_shape) not in (1, 3):
            raise ValueError(f"data_shape must be (D,) or (C, H, W), got {self.data_shape}")
        if num_classes < 2 or width < 1 or depth < 1:
            raise ValueError(f"need num_classes >= 2, width >= 1, depth >= 1; got {num_classes}, {width}, {depth}")
        self.num_classes, self.time_scale = num_classes, float(time_scale)
        self.is_image = len(self.data_shape) == 3
        self.time = TimeEmbedding(time_dim, width)
        if self.is_image:
            self.stem = nn.Conv2d(self.data_shape[0], width, 3, padding=1)
            self.blocks = nn.ModuleList(ResBlock(width, width, width) for _ in range(depth))
            self.downs = nn.ModuleList(Downsample(width) for _ in range(depth - 1))
            self.out_norm = group_norm(width)
        else:
            self.stem = nn.Linear(self.data_shape[0], width)
            self.blocks = nn.ModuleList(MLPBlock(width) for _ in range(depth))
            self.out_norm = nn.LayerNorm(width)
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(width, num_classes))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"expected inputs of shape (B, {self.data_shape}), got {tuple(x.shape)}")
        dtype = self.stem.weight.dtype
        t = per_sample_time(t, x.shape[0], x.device)
        emb = self.time(self.time_scale * t.double()).to(dtype)  # (B, width)
        h = self.stem(x.to(dtype))
        for i, block in enumerate(self.blocks):
            h = block(h, emb)
            if self.is_image and i < len(self.downs):
                h = self.downs[i](h)
        if self.is_image:
            h = self.out_norm(h).mean(dim=(-2, -1))  # global average pool → (B, width)
        else:
            h = self.out_norm(h)
        return self.head(h)  # (B, num_classes)
