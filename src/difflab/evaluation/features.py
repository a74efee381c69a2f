"""The feature network behind FD-<dataset> and KID-<dataset>: a small classifier trained on the data set itself.

This is **not** Inception FID. Inception-v3 weights cannot be fetched offline, and a network trained on
ImageNet says little about 8×8 or 28×28 digits anyway. Instead difflab trains, once per data set, a small
convolutional classifier on the data set's own labels (about a minute on 2 CPU cores) and uses its
penultimate layer (global-average-pooled conv features, :attr:`FeatureNet.feature_dim` values) as the
feature space. Numbers are therefore comparable between runs on the same data set with the same cached
feature network, never with published FIDs, and are named after the data set ("FD-digits8", "KID-mnist5k").

The weights are cached as safetensors (with a JSON sidecar: shape, classes, widths, held-out accuracy)
under ``$DIFFLAB_CACHE/features/<key>.safetensors`` (default ``~/.cache/difflab``), keyed by data set name;
a cached net whose shape or class count does not match the data is retrained.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
from torch import nn

from difflab.networks import group_norm

CACHE_ENV = "DIFFLAB_CACHE"


class FeatureNet(nn.Module):
    """Image classifier ``(B, C, H, W) -> (B, num_classes)`` whose :meth:`features` are ``(B, feature_dim)``.

    Three conv stages (widths ``widths``; the 2nd and 3rd downsample by 2), GroupNorm + SiLU, then a global
    average pool (so any image size works) and a linear classifier.
    """

    def __init__(self, in_channels: int, num_classes: int, widths: Sequence[int] = (32, 64, 128)):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a feature classifier needs labelled data with at least 2 classes, got {num_classes}")
        layers, c = [], in_channels
        for i, w in enumerate(widths):
            layers += [nn.Conv2d(c, w, 3, stride=1 if i == 0 else 2, padding=1), group_norm(w), nn.SiLU(),
                       nn.Conv2d(w, w, 3, padding=1), group_norm(w), nn.SiLU()]
            c = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)
        self.in_channels, self.num_classes, self.widths = in_channels, num_classes, tuple(widths)

    @property
    def feature_dim(self) -> int:
        return self.widths[-1]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mean(dim=(-2, -1))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    @torch.no_grad()
    def embed(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Features of a whole set, in eval mode and batches, on the CPU in float64 ``(N, feature_dim)``."""
        return self._batched(self.features, x, batch_size)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """Predicted class of each image, ``(N,)`` long."""
        return self._batched(self.forward, x, batch_size).argmax(-1)

    def _batched(self, fn, x, batch_size):
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        out = torch.cat([fn(x[i:i + batch_size].to(device, torch.float32)).double().cpu()
                         for i in range(0, x.shape[0], batch_size)])
        self.train(was_training)
        return out


def train_feature_net(x: torch.Tensor, y: torch.Tensor, num_classes: int, max_seconds: float = 900.0,
                      max_epochs: int = 15, batch_size: int = 128, lr: float = 2e-3, held_out: float = 0.1,
                      seed: int = 0) -> tuple[FeatureNet, dict]:
    """Train a :class:`FeatureNet` on images ``x: (N, C, H, W)`` with labels ``y: (N,)`` (cross-entropy, AdamW).

    Stops after ``max_epochs`` or ``max_seconds``, whichever comes first (the default time cap is a safety net:
    on a CPU the epochs decide, so the judge does not depend on the machine's load); a random ``held_out`` fraction is
    kept aside to report the accuracy. Returns ``(net in eval mode, info)``.
    """
    if x.ndim != 4 or y is None or y.shape != (x.shape[0],):
        raise ValueError("the feature network needs images (N, C, H, W) with one label each")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = max(1, int(held_out * x.shape[0]))
    test, train = perm[:n_test], perm[n_test:]
    net = FeatureNet(x.shape[1], num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    start, epochs = time.perf_counter(), 0
    net.train()
    while epochs < max_epochs and time.perf_counter() - start < max_seconds:
        order = train[torch.randperm(train.numel(), generator=g)]
        for i in range(0, order.numel(), batch_size):
            idx = order[i:i + batch_size]
            loss = nn.functional.cross_entropy(net(x[idx].float()), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        epochs += 1
    net.eval()
    accuracy = float((net.predict(x[test]) == y[test]).double().mean())
    info = {"epochs": epochs, "train_seconds": time.perf_counter() - start, "held_out_accuracy": accuracy,
            "n_train": int(train.numel()), "n_held_out": n_test}
    return net, info


def cache_dir(root: Optional[str | Path] = None) -> Path:
    root = Path(root) if root is not None else Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "difflab"))
    return root / "features"


def feature_network(key: str, x: Optional[torch.Tensor] = None, y: Optional[torch.Tensor] = None,
                    num_classes: Optional[int] = None, root: Optional[str | Path] = None, retrain: bool = False,
                    max_seconds: float = 900.0) -> tuple[FeatureNet, dict]:
    """The feature network for data set ``key``: from the cache, or trained on ``(x, y)`` and cached.

    Returns ``(net, info)`` where ``info`` holds the sidecar (shape, classes, held-out accuracy, cache path).
    """
    from safetensors.torch import load_file, save_file

    if not key or any(ch in key for ch in "/\\"):
        raise ValueError(f"feature-network key must be a plain name, got {key!r}")
    folder = cache_dir(root)
    weights, sidecar = folder / f"{key}.safetensors", folder / f"{key}.json"
    shape = None if x is None else list(x.shape[1:])
    if weights.exists() and sidecar.exists() and not retrain:
        info = json.loads(sidecar.read_text())
        if (shape is None or info["shape"] == shape) and (num_classes is None or info["num_classes"] == num_classes):
            net = FeatureNet(info["shape"][0], info["num_classes"], info["widths"])
            net.load_state_dict(load_file(str(weights)))
            return net.eval(), dict(info, cache=str(weights), cached=True)
    if x is None or y is None:
        raise ValueError(f"no cached feature network for {key!r}: pass the labelled images to train one")
    num_classes = int(num_classes or int(y.max()) + 1)
    net, info = train_feature_net(x, y, num_classes, max_seconds=max_seconds)
    info.update(key=key, shape=shape, num_classes=num_classes, widths=list(net.widths))
    folder.mkdir(parents=True, exist_ok=True)
    tmp = weights.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    tmp.replace(weights)
    sidecar.write_text(json.dumps(info, indent=1))
    return net, dict(info, cache=str(weights), cached=False)
