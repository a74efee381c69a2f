"""The exact test beds the sampler benchmarks run on, and exact / Monte-Carlo scores of a sampler's output.

Beds (SPEC §8): two 16-D Gaussians with a random rotation and eigenvalues log-spread over 2 and 4 decades,
and a labelled 2-D mixture of four blobs. The model is the bed's exact ε-prediction on the DDPM linear
schedule with T = 1000 (``DiscretePath.from_schedule("linear", 1000)``), so a sampler's error is its own.

Scores:

- **Deterministic samplers on a Gaussian bed — exact KL, no sampling noise.** The exact denoiser is affine
  in ``x_t``, so every deterministic sampler is an affine map ``x_out = M x_T + c`` of its starting point;
  :func:`difflab.testbeds.affine_pushforward` recovers ``M, c`` from ``D + 1`` probe points, the output is
  exactly ``N(c, σ_p² M Mᵀ)`` for the prior ``N(0, σ_p² I)``, and we report ``KL(output ‖ data)`` in nats.
- **Stochastic samplers on a Gaussian bed — Monte-Carlo KL** of a Gaussian fitted to ``n`` outputs (the output
  is still exactly Gaussian), next to its noise floor: the same estimate for ``n`` exact data samples.
- **Mixture bed — sliced W2** of ``n`` outputs to ``n`` data samples, next to the real-vs-real floor.
- **Prior floor**: even an exact ODE solve starts from ``N(0, s_T² I)`` rather than the true
  ``p_T = N(a_T μ, a_T² Σ + s_T² I)``. For a Gaussian the probability-flow map is known in closed form
  (per eigen-direction ``x0 − μ = √(λ/(a_T²λ + s_T²)) (x_T − a_T μ)``), so the KL that this prior mismatch
  alone leaves is exact; no sampler started from that prior can be expected to do better.
"""

from __future__ import annotations

import time
from typing import Callable, Optional

import torch

from difflab.metrics import sliced_wasserstein2
from difflab.paths import DiscretePath
from difflab.testbeds import GaussianMixtureBed, affine_pushforward, fit_gaussian, gaussian_bed, mixture_bed_2d

T_TRAIN = 1000  # DDPM linear schedule, β from 1e-4 to 0.02 (SPEC §2) — the diffusers defaults too


def ddpm_path() -> DiscretePath:
    return DiscretePath.from_schedule("linear", T=T_TRAIN)


GAUSSIAN_BEDS: dict[str, Callable[[], GaussianMixtureBed]] = {
    "gauss16-cond1e2": lambda: gaussian_bed(16, condition=1e2, seed=0),
    "gauss16-cond1e4": lambda: gaussian_bed(16, condition=1e4, seed=0),
}
MIXTURE_BEDS: dict[str, Callable[[], GaussianMixtureBed]] = {
    "mixture2d-4": lambda: mixture_bed_2d(num_classes=4),
}


def exact_kl(bed: GaussianMixtureBed, sample_fn: Callable[[torch.Tensor], torch.Tensor], prior_std: float) -> float:
    """Exact ``KL(output ‖ data)`` of a deterministic sampler ``sample_fn(x_T) -> x_0`` on a single-Gaussian bed."""
    mean, cov = affine_pushforward(sample_fn, bed.D, prior_std=prior_std)
    return float(bed.kl_from_gaussian(mean, cov))


def monte_carlo_kl(bed: GaussianMixtureBed, samples: torch.Tensor) -> float:
    """``KL(N(m̂, Σ̂) ‖ data)`` for the Gaussian fitted to ``samples`` (biased up by ≈ D(D+3)/(4n) nats)."""
    return float(bed.kl_from_gaussian(*fit_gaussian(samples)))


def monte_carlo_kl_floor(bed: GaussianMixtureBed, n: int, generator: torch.Generator, repeats: int = 3) -> float:
    """The Monte-Carlo KL estimate for ``n`` exact data samples (averaged over ``repeats``): its noise floor."""
    return sum(monte_carlo_kl(bed, bed.sample(n, generator, dtype=torch.float64)) for _ in range(repeats)) / repeats


def prior_floor_kl(bed: GaussianMixtureBed, path: DiscretePath, prior_std: Optional[float] = None) -> float:
    """Exact KL left by starting the *exact* probability-flow map from ``N(0, prior_std² I)`` instead of ``p_T``."""
    T = torch.tensor(path.t_max)
    a_T, s_T = float(path.a(T)), float(path.s(T))
    prior_std = path.prior_std() if prior_std is None else prior_std
    mu, lam, U = bed.means[0], bed.eigvals[0], bed.eigvecs[0]
    G = (U * (lam / (a_T**2 * lam + s_T**2)).sqrt()) @ U.T  # the flow map's linear part
    mean = mu - a_T * G @ mu
    cov = prior_std**2 * G @ G.T
    return float(bed.kl_from_gaussian(mean, cov))


def score_on_gaussian_bed(bed: GaussianMixtureBed, run: Callable[[torch.Tensor], torch.Tensor], deterministic: bool,
                          prior_std: float, n_mc: int, generator: torch.Generator) -> dict:
    """KL of a sampler's output to a single-Gaussian bed: exact for a deterministic ``run(x_T) -> x_0``
    (``x_T`` then holds probe points), Monte-Carlo over ``n_mc`` prior draws ``x_T ~ N(0, prior_std² I)`` otherwise.
    Returns ``{"kl", "method", "n", "wall_s"}`` (``wall_s``: the sampler's wall time on that batch)."""
    start = time.perf_counter()
    if deterministic:
        kl = exact_kl(bed, run, prior_std)
        return {"kl": kl, "method": "exact", "n": bed.D + 1, "wall_s": time.perf_counter() - start}
    x_T = prior_std * torch.randn(n_mc, bed.D, generator=generator, dtype=torch.float64)
    start = time.perf_counter()
    samples = run(x_T)
    wall = time.perf_counter() - start
    return {"kl": monte_carlo_kl(bed, samples), "method": "monte-carlo", "n": n_mc, "wall_s": wall}


def sliced_w2_with_floor(bed: GaussianMixtureBed, samples: torch.Tensor, generator: torch.Generator,
                         num_projections: int = 256) -> dict:
    """Sliced W2 of ``samples`` to as many fresh data samples, and the data-vs-data floor at that count."""
    n = samples.shape[0]
    ref = bed.sample(n, generator, dtype=torch.float64)
    ref2 = bed.sample(n, generator, dtype=torch.float64)
    return {"sw2": sliced_wasserstein2(samples.double(), ref, num_projections, generator),
            "floor": sliced_wasserstein2(ref2, ref, num_projections, generator), "n": n}
