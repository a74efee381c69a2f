"""Pictures of samples and training: image grids (Pillow), 2-D scatter plots and loss curves (matplotlib).

matplotlib is imported inside the functions and used through its object API on the Agg canvas
(no pyplot, no global backend switch), so ``import difflab`` stays fast and nothing needs a display.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

MIN_TILE_PX = 32
"""Small images (8×8 digits) are enlarged by an integer factor to at least this many pixels a side."""


def image_grid(x: torch.Tensor, nrow: Optional[int] = None, padding: int = 2, scale: Optional[int] = None) -> np.ndarray:
    """Tile images ``x (N, C, H, W)`` with values in ``[-1, 1]`` into one ``uint8`` array ``(H', W', C)``.

    ``nrow`` images per row (default ``ceil(√N)``); ``C`` must be 1 (grey) or 3 (RGB); ``scale`` is an
    integer nearest-neighbour enlargement (default: enough to make a tile ``MIN_TILE_PX`` wide).
    """
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"an image grid needs (N, 1|3, H, W) images, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape  # layout only; no math on these
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    scale = scale or max(1, math.ceil(MIN_TILE_PX / max(h, w)))
    pixels = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    th, tw = h * scale, w * scale
    nrows = math.ceil(n / nrow)
    grid = torch.full((c, nrows * (th + padding) + padding, nrow * (tw + padding) + padding), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (th + padding), padding + col * (tw + padding)
        grid[:, top:top + th, left:left + tw] = pixels[i]
    return grid.permute(1, 2, 0).numpy()


def save_image_grid(x: torch.Tensor, path: Union[str, Path], nrow: Optional[int] = None, padding: int = 2,
                    scale: Optional[int] = None) -> Path:
    """Write :func:`image_grid` of ``x (N, C, H, W)`` in ``[-1, 1]`` as a PNG (Pillow)."""
    from PIL import Image

    grid = image_grid(x, nrow, padding, scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path)
    return path


def save_scatter(points: torch.Tensor, path: Union[str, Path], reference: Optional[torch.Tensor] = None,
                 title: Optional[str] = None, labels: Optional[torch.Tensor] = None) -> Path:
    """Scatter plot of 2-D ``points (N, 2)`` (coloured by ``labels`` if given) over optional grey ``reference`` data."""
    from matplotlib.figure import Figure

    points = torch.as_tensor(points).detach().float().cpu()
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"a scatter plot needs (N, 2) points, got shape {tuple(points.shape)}")
    fig = Figure(figsize=(4.5, 4.5), dpi=100)
    ax = fig.subplots()
    if reference is not None:
        ref = torch.as_tensor(reference).detach().float().cpu()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, c="0.75", label="data")
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=2, c="C0", label="samples")
    else:
        ax.scatter(points[:, 0], points[:, 1], s=2, c=torch.as_tensor(labels).cpu().numpy(), cmap="tab10",
                   label="samples")
    ax.set_aspect("equal", adjustable="datalim")
    if title:
        ax.set_title(title)
    if reference is not None:
        ax.legend(loc="upper right", markerscale=4, fontsize="small")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def read_metrics(metrics_jsonl: Union[str, Path]) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, in order."""
    lines = Path(metrics_jsonl).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def save_loss_curve(metrics_jsonl: Union[str, Path], path: Union[str, Path], title: Optional[str] = None) -> Path:
    """Plot the logged training loss against the step (log scale) from a ``metrics.jsonl`` file."""
    from matplotlib.figure import Figure

    records = [r for r in read_metrics(metrics_jsonl) if "loss" in r]
    if not records:
        raise ValueError(f"{metrics_jsonl} holds no loss records")
    steps = [r["step"] for r in records]
    losses = [r["loss"] for r in records]
    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(steps, losses, lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    if min(losses) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
