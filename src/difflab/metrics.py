"""Sample-quality metrics for points and vectors (evaluation, SPEC §8).

Every metric takes two sample sets ``x: (N, ...)`` and ``y: (M, ...)`` (flattened to vectors) and returns
a float; sample counts are the caller's to report.
"""

from __future__ import annotations

from typing import Optional

import torch


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256,
                        generator: Optional[torch.Generator] = None) -> float:
    """Sliced Wasserstein-2: ``√ E_θ W2²(θᵀx, θᵀy)`` over random unit directions θ.

    Each 1-D W2² is computed exactly from sorted projections (quantiles interpolated when N ≠ M).
    """
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(x @ theta, dim=0)
    py, _ = torch.sort(y @ theta, dim=0)
    n = max(px.shape[0], py.shape[0])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qx = torch.quantile(px, q, dim=0) if px.shape[0] != n else px
    qy = torch.quantile(py, q, dim=0) if py.shape[0] != n else py
    return float(((qx - qy) ** 2).mean().sqrt())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: Optional[float] = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel ``k(u, v) = exp(−||u−v||²/(2h²))``.

    ``h`` defaults to the median pairwise distance of the pooled samples (the median heuristic).
    """
    x = x.reshape(x.shape[0], -1).double()
    y = y.reshape(y.shape[0], -1).double()
    if bandwidth is None:
        pooled = torch.cat([x, y])[:2000]
        bandwidth = float(torch.cdist(pooled, pooled).median().clamp(min=1e-12))
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x) ** 2)
    kyy = torch.exp(-gamma * torch.cdist(y, y) ** 2)
    kxy = torch.exp(-gamma * torch.cdist(x, y) ** 2)
    n, m = x.shape[0], y.shape[0]
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(term_x + term_y - 2.0 * kxy.mean())
