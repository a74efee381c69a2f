"""Sample-quality metrics for points and vectors (evaluation, SPEC §8).

Every metric takes two sample sets ``x: (N, ...)`` and ``y: (M, ...)`` (flattened to vectors, computed in
float64) and returns plain numbers; sample counts and noise floors are reported by the caller
(:func:`difflab.evaluation.evaluate_samples` does both). The same functions serve raw points and the
feature vectors of images (:mod:`difflab.evaluation.features`).

==========================  =====================================================================
metric                      definition
==========================  =====================================================================
sliced W2                   ``√ E_θ W2²(θᵀx, θᵀy)`` over random unit directions θ
MMD (RBF)                   unbiased ``MMD²`` with ``k(u, v) = exp(−‖u−v‖²/2h²)``
Fréchet distance            ``‖μ_x−μ_y‖² + tr(Σ_x + Σ_y − 2(Σ_x^½ Σ_y Σ_x^½)^½)`` of fitted Gaussians
KID                         unbiased ``MMD²`` with ``k(u, v) = (uᵀv/d + 1)³``, averaged over subsets
precision / recall          k-NN manifold overlap (Kynkäänniemi et al. 2019)
==========================  =====================================================================
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from difflab.testbeds import fit_gaussian


def _flat64(x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x)
    return x.reshape(x.shape[0], -1).double()


def _pair(x: torch.Tensor, y: torch.Tensor, min_count: int = 1):
    x, y = _flat64(x), _flat64(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < min_count or y.shape[0] < min_count:
        raise ValueError(f"need at least {min_count} samples in each set, got {x.shape[0]} and {y.shape[0]}")
    return x, y


def _mmd2_unbiased(kxx: torch.Tensor, kyy: torch.Tensor, kxy: torch.Tensor) -> torch.Tensor:
    """Unbiased ``MMD²`` from the three kernel matrices (diagonals of ``k_xx``, ``k_yy`` excluded)."""
    n, m = kxx.shape[0], kyy.shape[0]
    term_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    term_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return term_x + term_y - 2.0 * kxy.mean()


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256,
                        generator: Optional[torch.Generator] = None) -> float:
    """Sliced Wasserstein-2: ``√ E_θ W2²(θᵀx, θᵀy)`` over random unit directions θ.

    Each 1-D W2² is computed exactly from sorted projections (quantiles interpolated when N ≠ M).
    """
    x, y = _pair(x, y)
    theta = torch.randn(x.shape[1], num_projections, generator=generator, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    px, _ = torch.sort(theta.T @ x.T, dim=1)  # (P, N): one sorted projection per row (contiguous sort)
    py, _ = torch.sort(theta.T @ y.T, dim=1)  # (P, M)
    n = max(px.shape[1], py.shape[1])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    qx = torch.quantile(px, q, dim=1).T if px.shape[1] != n else px
    qy = torch.quantile(py, q, dim=1).T if py.shape[1] != n else py
    return float(((qx - qy) ** 2).mean().sqrt())


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidth: Optional[float] = None) -> float:
    """Unbiased squared MMD with a Gaussian kernel ``k(u, v) = exp(−||u−v||²/(2h²))``.

    ``h`` defaults to the median pairwise distance of the pooled samples (the median heuristic).
    """
    x, y = _pair(x, y, min_count=2)
    if bandwidth is None:
        pooled = torch.cat([x, y])[:2000]
        bandwidth = float(torch.cdist(pooled, pooled).median().clamp(min=1e-12))
    gamma = 1.0 / (2.0 * bandwidth**2)
    kxx = torch.exp(-gamma * torch.cdist(x, x) ** 2)
    kyy = torch.exp(-gamma * torch.cdist(y, y) ** 2)
    kxy = torch.exp(-gamma * torch.cdist(x, y) ** 2)
    return float(_mmd2_unbiased(kxx, kyy, kxy))


# --- Fréchet distance -----------------------------------------------------------------------------------
def _psd_sqrt(S: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative eigenvalues from
    round-off clamped to 0)."""
    lam, U = torch.linalg.eigh(0.5 * (S + S.T))
    return (U * lam.clamp(min=0.0).sqrt()) @ U.T


def frechet_distance_gaussians(mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor) -> float:
    """Squared 2-Wasserstein (Fréchet) distance between ``N(μ1, Σ1)`` and ``N(μ2, Σ2)``:

    ``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2 (Σ1^½ Σ2 Σ1^½)^½)`` (Dowson & Landau 1982). The matrix square roots
    are taken by symmetric eigendecomposition in float64, so the result is exact up to round-off
    (no complex parts to discard, unlike ``scipy.linalg.sqrtm`` on the non-symmetric ``Σ1 Σ2``).
    """
    mu1, mu2 = torch.as_tensor(mu1, dtype=torch.float64), torch.as_tensor(mu2, dtype=torch.float64)
    cov1, cov2 = torch.as_tensor(cov1, dtype=torch.float64), torch.as_tensor(cov2, dtype=torch.float64)
    if mu1.shape != mu2.shape or cov1.shape != cov2.shape or cov1.shape != (mu1.numel(), mu1.numel()):
        raise ValueError(f"inconsistent Gaussian shapes: {tuple(mu1.shape)}, {tuple(cov1.shape)}, "
                         f"{tuple(mu2.shape)}, {tuple(cov2.shape)}")
    r1 = _psd_sqrt(cov1)
    cross = _psd_sqrt(r1 @ cov2 @ r1)
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2.0 * torch.trace(cross))


def frechet_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to ``x: (N, ...)`` and ``y: (M, ...)`` (unbiased covariances).

    On raw vectors this is the "FD-raw" of :func:`difflab.evaluation.evaluate_samples`; on feature vectors
    of a classifier it is FD-<dataset>. It is biased upwards by ``O(D/N)`` at finite sample counts, which is
    why evaluations report it next to its real-vs-real noise floor at the same counts.
    """
    x, y = _pair(x, y, min_count=2)
    return frechet_distance_gaussians(*fit_gaussian(x), *fit_gaussian(y))


# --- KID --------------------------------------------------------------------------------------------------
class KID(NamedTuple):
    """Kernel distance: mean and standard deviation of the unbiased ``MMD²`` over ``num_subsets`` subsets."""

    mean: float
    std: float
    subset_size: int
    num_subsets: int


def kernel_distance(x: torch.Tensor, y: torch.Tensor, subset_size: int = 1000, num_subsets: int = 50,
                    generator: Optional[torch.Generator] = None) -> KID:
    """KID (Bińkowski et al. 2018): unbiased ``MMD²`` with the cubic polynomial kernel
    ``k(u, v) = (uᵀv/d + 1)³``, averaged over ``num_subsets`` random subsets of ``subset_size`` from each set.

    Unbiased: its expectation is exactly 0 when ``x`` and ``y`` come from the same distribution, whatever
    the sample count (so, unlike the Fréchet distance, its noise floor is 0 ± std).
    """
    x, y = _pair(x, y, min_count=2)
    size = min(subset_size, x.shape[0], y.shape[0])
    if size < 2:
        raise ValueError("KID needs subsets of at least 2 samples")
    d = x.shape[1]
    values = []
    for _ in range(num_subsets):
        xs = x[torch.randperm(x.shape[0], generator=generator)[:size]]
        ys = y[torch.randperm(y.shape[0], generator=generator)[:size]]
        kxx = (xs @ xs.T / d + 1.0) ** 3
        kyy = (ys @ ys.T / d + 1.0) ** 3
        kxy = (xs @ ys.T / d + 1.0) ** 3
        values.append(_mmd2_unbiased(kxx, kyy, kxy))
    v = torch.stack(values)
    return KID(float(v.mean()), float(v.std()) if num_subsets > 1 else 0.0, size, num_subsets)


# --- precision / recall -----------------------------------------------------------------------------------
class PrecisionRecall(NamedTuple):
    precision: float
    recall: float
    k: int


def _knn_radii(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """Distance from each row of ``x`` to its ``k``-th nearest other row, ``[N]``."""
    radii = []
    for start in range(0, x.shape[0], chunk):
        d = torch.cdist(x[start:start + chunk], x)  # (c, N), includes the zero self-distance
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int) -> float:
    """Fraction of ``points`` inside at least one ball ``B(centres_j, radii_j)``."""
    inside = []
    for start in range(0, points.shape[0], chunk):
        d = torch.cdist(points[start:start + chunk], centres)  # (c, M)
        inside.append((d <= radii.unsqueeze(0)).any(dim=1))
    return float(torch.cat(inside).double().mean())


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3, chunk: int = 2048) -> PrecisionRecall:
    """Improved precision and recall (Kynkäänniemi et al. 2019).

    The real manifold is the union of balls around each real sample with radius the distance to its
    ``k``-th nearest real neighbour; precision is the fraction of fake samples inside it. Recall swaps the
    roles: the fraction of real samples inside the fake manifold. Identical sets give (1, 1); far-apart
    sets give (0, 0).
    """
    real, fake = _pair(real, fake, min_count=k + 1)
    if k < 1:
        raise ValueError(f"k must be a positive integer, got {k}")
    precision = _coverage(fake, real, _knn_radii(real, k, chunk), chunk)
    recall = _coverage(real, fake, _knn_radii(fake, k, chunk), chunk)
    return PrecisionRecall(precision, recall, k)
