"""Denoiser networks: every one is called as ``net(x, t, y=None, context=None) -> Tensor``.

The output has ``x``'s shape (or twice the channels along dim 1 with ``learned_variance``); what it
*means* (ε, x0, v, score, velocity) is decided by :class:`~difflab.parameterization.NetworkDenoiser`
(SPEC §4), not by the network. ``t`` is the network time (see :mod:`difflab.networks.embeddings`:
integer DDPM steps as given, continuous time via :func:`network_time_fn`), ``y`` long labels with
:data:`NULL_LABEL` for "no class", ``context`` a ``(B, L, context_dim)`` cross-attention context.

- :class:`MLPDenoiser` (:mod:`.mlp`): points and flat vectors.
- :class:`UNet` (:mod:`.unet`): images; its :class:`ResBlock` and the embeddings are reusable.
- :class:`MatryoshkaUNet` (:mod:`.matryoshka`): an image and its half-size version jointly, packed as one
  ``(C, H·W + h·w)`` tensor (multi-scale diffusion, SPEC §5).
"""

from __future__ import annotations

import inspect
from typing import Sequence

from torch import nn

from difflab.networks.attention import AttentionBlock, MultiHeadAttention, group_norm
from difflab.networks.embeddings import (NULL_LABEL, ClassEmbedding, ConditionEmbedding, TimeEmbedding,
                                         network_time_fn, timestep_embedding)
from difflab.networks.mlp import MLPDenoiser
from difflab.networks.matryoshka import MatryoshkaUNet, NestedLayout
from difflab.networks.unet import Downsample, ResBlock, UNet, Upsample


def count_parameters(net: nn.Module) -> int:
    """Number of scalar parameters of ``net`` (trainable or not)."""
    return sum(p.numel() for p in net.parameters())


def _build_mlp(data_shape: tuple, num_classes: int, learned_variance: bool, **kwargs) -> MLPDenoiser:
    return MLPDenoiser(data_shape, num_classes=num_classes, learned_variance=learned_variance, **kwargs)


def _build_unet(data_shape: tuple, num_classes: int, learned_variance: bool, **kwargs) -> UNet:
    if len(data_shape) != 3:
        raise ValueError(f"the unet needs images of shape (C, H, W), got data_shape={tuple(data_shape)}")
    size = data_shape[1] if data_shape[1] == data_shape[2] else tuple(data_shape[1:])
    return UNet(in_channels=data_shape[0], image_size=size, num_classes=num_classes,
                learned_variance=learned_variance, **kwargs)


def _build_matryoshka(data_shape: tuple, num_classes: int, learned_variance: bool, **kwargs) -> MatryoshkaUNet:
    if learned_variance:
        raise ValueError("the matryoshka network predicts the target only (no learned variance)")
    layout = NestedLayout.of_packed(data_shape)  # (C, H·W + h·w) of square images
    return MatryoshkaUNet(in_channels=layout.channels, image_size=layout.height, num_classes=num_classes, **kwargs)


# kind -> (builder, the network class whose keyword arguments the builder derives from data_shape etc.)
NETWORKS = {"mlp": (_build_mlp, MLPDenoiser, ("dim",)), "unet": (_build_unet, UNet, ("in_channels", "image_size")),
            "matryoshka": (_build_matryoshka, MatryoshkaUNet, ("in_channels", "image_size"))}
_SET_BY_BUILDER = ("num_classes", "learned_variance")


def network_options(kind: str) -> tuple:
    """The keyword arguments :func:`build_network` accepts for ``kind`` (beyond its own arguments)."""
    if kind not in NETWORKS:
        raise ValueError(f"unknown network kind {kind!r}; choose one of {sorted(NETWORKS)}")
    _, cls, derived = NETWORKS[kind]
    params = inspect.signature(cls.__init__).parameters
    return tuple(p for p in params if p != "self" and p not in derived and p not in _SET_BY_BUILDER)


def build_network(kind: str, data_shape: Sequence[int], num_classes: int = 0, learned_variance: bool = False,
                  **kwargs) -> nn.Module:
    """Build a ``kind`` network ("mlp" or "unet") for per-sample data of shape ``data_shape``.

    ``data_shape`` is ``(D,)`` for points or ``(C, H, W)`` for images (the unet needs ``H == W``);
    the remaining keyword arguments go to the network (see :func:`network_options`).
    """
    allowed = network_options(kind)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for the {kind} network; allowed: {list(allowed)}")
    builder = NETWORKS[kind][0]
    return builder(tuple(int(d) for d in data_shape), num_classes, learned_variance, **kwargs)


__all__ = [
    "NULL_LABEL", "AttentionBlock", "ClassEmbedding", "ConditionEmbedding", "Downsample", "MLPDenoiser",
    "MatryoshkaUNet", "MultiHeadAttention", "NETWORKS", "NestedLayout", "ResBlock", "TimeEmbedding", "UNet", "Upsample", "build_network",
    "count_parameters", "group_norm", "network_options", "network_time_fn", "timestep_embedding",
]
