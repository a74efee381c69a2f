"""Known-truth test beds: Gaussian and Gaussian-mixture data (SPEC §8).

For ``p_0 = Σ_k w_k N(μ_k, Σ_k)`` and any Gaussian path ``x_t = a x0 + s ε``, every noisy marginal is
``p_t = Σ_k w_k N(a μ_k, C_k)`` with ``C_k = a² Σ_k + s² I``, and the posterior expectations are exact:

- responsibilities ``r_k(x) ∝ w_k N(x; a μ_k, C_k)``,
- ``E[x0 | x_t] = Σ_k r_k [μ_k + a Σ_k C_k⁻¹ (x − a μ_k)]``,
- ``E[ε | x_t] = Σ_k r_k [s C_k⁻¹ (x − a μ_k)]``,
- ``∇log p_t(x) = −Σ_k r_k C_k⁻¹ (x − a μ_k)``.

These are evaluated in each component's eigenbasis (``Σ_k = U Λ Uᵀ``, so ``C_k⁻¹ = U (a²Λ + s²)⁻¹ Uᵀ``),
in float64, stably at both ends of the path (``s = 0`` and ``a = 0``). A bed *is* a denoiser:
``bed.denoiser(path)`` plugs into every sampler, so a sampler run on it measures only its own error.
Data of any shape is flattened to ``(B, D)`` on the way in and reshaped on the way out.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from difflab import gaussian
from difflab.parameterization import Prediction
from difflab.paths import GaussianPath
from difflab.utils import randn


class GaussianMixtureBed:
    """A Gaussian mixture in ``R^D`` with optional class labels per component.

    Args:
        means: ``(K, D)``; covs: ``(K, D, D)`` (or ``(K, D)`` diagonal variances); weights: ``(K,)``
        (uniform if omitted); labels: ``(K,)`` integer class of each component (optional);
        shape: the data shape samples are reshaped to (default ``(D,)``).
    """

    def __init__(self, means, covs, weights=None, labels: Optional[Sequence[int]] = None, shape=None):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2:
            raise ValueError("means must have shape (K, D)")
        K, D = means.shape
        covs = torch.as_tensor(covs, dtype=torch.float64)
        if covs.ndim == 2:
            covs = torch.diag_embed(covs)
        if covs.shape != (K, D, D):
            raise ValueError(f"covs must have shape ({K}, {D}, {D}) or ({K}, {D})")
        weights = torch.full((K,), 1.0 / K, dtype=torch.float64) if weights is None else \
            torch.as_tensor(weights, dtype=torch.float64)
        if weights.shape != (K,) or (weights < 0).any():
            raise ValueError(f"weights must be {K} non-negative numbers")
        self.means, self.covs, self.weights = means, covs, weights / weights.sum()
        self.labels = None if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.K, self.D = K, D
        self.shape = tuple(shape) if shape is not None else (D,)
        if math.prod(self.shape) != D:
            raise ValueError(f"shape {self.shape} does not hold {D} values")
        self.eigvals, self.eigvecs = torch.linalg.eigh(self.covs)  # (K, D), (K, D, D)
        if (self.eigvals <= 0).any():
            raise ValueError("every covariance must be positive definite")
        self.chol = torch.linalg.cholesky(self.covs)

    @property
    def num_classes(self) -> int:
        return 0 if self.labels is None else int(self.labels.max()) + 1

    # --- data -------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, y=None, return_labels: bool = False,
               dtype=torch.float32):
        """Draw ``n`` samples (of ``self.shape``); ``y`` restricts to the components of that class."""
        w = self._class_weights(y)
        if w.ndim == 1:
            w = w.expand(n, self.K)
        k = torch.multinomial(w.float(), 1, generator=generator).squeeze(-1)
        z = randn((n, self.D), generator, dtype=torch.float64)
        x = self.means[k] + (self.chol[k] @ z.unsqueeze(-1)).squeeze(-1)
        x = x.to(dtype).reshape(n, *self.shape)
        if return_labels:
            return x, (self.labels[k] if self.labels is not None else k)
        return x

    def log_prob(self, x: torch.Tensor, y=None) -> torch.Tensor:
        """Exact ``log p_0(x)`` (or ``log p_0(x | y)``), ``[B]``."""
        return self.marginal_log_prob(x, a=1.0, s=0.0, y=y)

    # --- noisy marginals ----------------------------------------------------------------------
    def _class_weights(self, y):
        if y is None:
            return self.weights
        if self.labels is None:
            raise ValueError("this bed has no class labels")
        y = torch.as_tensor(y)
        mask = (self.labels.unsqueeze(0) == y.reshape(-1, 1)).double()  # (B, K)
        w = self.weights * mask
        return (w / w.sum(-1, keepdim=True)).squeeze(0) if y.ndim == 0 else w / w.sum(-1, keepdim=True)

    def _component_terms(self, x, a, s):
        """Per-component log-densities and ``C_k⁻¹(x − aμ_k)`` for flattened ``x: (B, D)``; ``a, s: (B,)``."""
        a, s = a.reshape(-1, 1, 1), s.reshape(-1, 1, 1)
        c = a**2 * self.eigvals.unsqueeze(0) + s**2  # (B, K, D): eigenvalues of C_k
        diff = x.unsqueeze(1) - a * self.means.unsqueeze(0)  # (B, K, D)
        z = torch.einsum("kdj,bkd->bkj", self.eigvecs, diff)  # Uᵀ(x − aμ)
        cinv_diff = torch.einsum("kdj,bkj->bkd", self.eigvecs, z / c)  # C⁻¹(x − aμ)
        logp = -0.5 * ((z**2 / c).sum(-1) + torch.log(c).sum(-1) + self.D * gaussian.LOG_2PI)
        return logp, cinv_diff, a, z, c

    def _prep(self, x, a, s):
        B = x.shape[0]
        xf = x.reshape(B, -1).double()
        if xf.shape[1] != self.D:
            raise ValueError(f"expected data with {self.D} values per sample, got {xf.shape[1]}")
        a = torch.as_tensor(a, dtype=torch.float64).expand(B) if torch.as_tensor(a).ndim == 0 else \
            torch.as_tensor(a, dtype=torch.float64).reshape(B)
        s = torch.as_tensor(s, dtype=torch.float64).expand(B) if torch.as_tensor(s).ndim == 0 else \
            torch.as_tensor(s, dtype=torch.float64).reshape(B)
        return xf, a.to(xf.device), s.to(xf.device)

    def _responsibilities(self, logp, y):
        w = self._class_weights(y).to(logp.device)
        return torch.softmax(logp + torch.log(w.clamp(min=1e-300)), dim=-1)

    def marginal_log_prob(self, x: torch.Tensor, a, s, y=None) -> torch.Tensor:
        """``log p_t(x)`` for the marginal with signal ``a`` and noise ``s`` (scalars or ``[B]``)."""
        xf, a, s = self._prep(x, a, s)
        logp, *_ = self._component_terms(xf, a, s)
        w = self._class_weights(y).to(logp.device)
        return torch.logsumexp(logp + torch.log(w.clamp(min=1e-300)), dim=-1).to(x.dtype)

    def posterior_means(self, x: torch.Tensor, a, s, y=None):
        """Exact ``(E[x0|x_t], E[ε|x_t], ∇log p_t(x_t))`` at signal ``a``, noise ``s``; each shaped like ``x``."""
        xf, a, s = self._prep(x, a, s)
        logp, cinv_diff, a3, _, _ = self._component_terms(xf, a, s)
        r = self._responsibilities(logp, y).unsqueeze(-1)  # (B, K, 1)
        sigma_cinv = torch.einsum("kde,bke->bkd", self.covs, cinv_diff)  # Σ_k C_k⁻¹(x − aμ_k)
        x0 = (r * (self.means.unsqueeze(0) + a3 * sigma_cinv)).sum(1)
        eps = (r * s.reshape(-1, 1, 1) * cinv_diff).sum(1)
        score = -(r * cinv_diff).sum(1)
        shape = x.shape
        return x0.to(x.dtype).reshape(shape), eps.to(x.dtype).reshape(shape), score.to(x.dtype).reshape(shape)

    def class_posterior(self, x: torch.Tensor, a, s) -> torch.Tensor:
        """Exact ``p(y | x_t)`` for every class, ``(B, num_classes)`` (the ideal noise-conditional classifier)."""
        if self.labels is None:
            raise ValueError("this bed has no class labels")
        xf, a, s = self._prep(x, a, s)
        logp, *_ = self._component_terms(xf, a, s)
        r = self._responsibilities(logp, None)
        return torch.zeros(r.shape[0], self.num_classes, dtype=r.dtype, device=r.device).index_add_(1, self.labels, r)

    def denoiser(self, path: GaussianPath) -> "BedDenoiser":
        """The exact denoiser on ``path``: a model with zero learning error."""
        return BedDenoiser(self, path)

    # --- exact Gaussian facts -------------------------------------------------------------
    def moments(self):
        """Mean ``(D,)`` and covariance ``(D, D)`` of the whole mixture."""
        mean = (self.weights.unsqueeze(-1) * self.means).sum(0)
        dev = self.means - mean
        cov = (self.weights.reshape(-1, 1, 1) * (self.covs + dev.unsqueeze(-1) * dev.unsqueeze(-2))).sum(0)
        return mean, cov

    def kl_from_gaussian(self, mean, cov) -> torch.Tensor:
        """Exact ``KL(N(mean, cov) || p_0)`` when the bed is a single Gaussian (SPEC §1, §8)."""
        if self.K != 1:
            raise ValueError("the exact Gaussian KL needs a single-component bed")
        return gaussian.kl_normal(torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64),
                                  self.means[0], self.covs[0])

    def entropy(self) -> float:
        """Differential entropy in nats (exact for one component)."""
        if self.K != 1:
            raise ValueError("closed-form entropy needs a single-component bed")
        return 0.5 * (self.D * (1.0 + gaussian.LOG_2PI) + float(torch.linalg.slogdet(self.covs[0])[1]))


class BedDenoiser:
    """The exact ``(E[x0|x_t], E[ε|x_t])`` of a test bed on a path, as a sampler-ready denoiser.

    Accepts ``y=`` (class labels) for the exact conditional model. ``nfe`` counts calls.
    """

    def __init__(self, bed: GaussianMixtureBed, path: GaussianPath):
        self.bed, self.path = bed, path

    def __call__(self, x: torch.Tensor, t, y=None, **_ignored) -> Prediction:
        t = torch.as_tensor(t, device=x.device)
        x0, eps, _ = self.bed.posterior_means(x, self.path.a(t), self.path.s(t), y=y)
        return Prediction(x0, eps)

    def score(self, x: torch.Tensor, t, y=None) -> torch.Tensor:
        t = torch.as_tensor(t, device=x.device)
        return self.bed.posterior_means(x, self.path.a(t), self.path.s(t), y=y)[2]


def gaussian_bed(dim: int = 16, condition: float = 100.0, seed: int = 0, mean_scale: float = 1.0) -> GaussianMixtureBed:
    """A single Gaussian in ``R^dim`` with a random rotation and eigenvalues log-spread over ``condition``.

    Eigenvalues run geometrically from ``1/√condition`` to ``√condition`` so the covariance is
    ill-conditioned by the factor ``condition`` (100 = two decades).
    """
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    eig = torch.logspace(-0.5 * math.log10(condition), 0.5 * math.log10(condition), dim, dtype=torch.float64)
    cov = q @ torch.diag(eig) @ q.T
    cov = 0.5 * (cov + cov.T)
    mean = mean_scale * torch.randn(dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
    return GaussianMixtureBed(mean.unsqueeze(0), cov.unsqueeze(0))


def mixture_bed_2d(num_classes: int = 4, radius: float = 2.0, std: float = 0.3, components_per_class: int = 1) -> GaussianMixtureBed:
    """A labelled 2-D mixture: ``num_classes × components_per_class`` isotropic blobs on a circle."""
    K = num_classes * components_per_class
    angles = torch.arange(K, dtype=torch.float64) * 2 * math.pi / K
    means = radius * torch.stack([torch.cos(angles), torch.sin(angles)], -1)
    covs = torch.full((K, 2), std**2, dtype=torch.float64)
    labels = torch.arange(K) % num_classes
    return GaussianMixtureBed(means, covs, labels=labels.tolist())


def grid_bed_2d(side: int = 5, spacing: float = 1.0, std: float = 0.05) -> GaussianMixtureBed:
    """A ``side × side`` grid of equal isotropic 2-D blobs ``spacing`` apart, centred on 0 (the "25 Gaussians" of the
    GAN mode-collapse literature for ``side = 5``); each blob is its own class (row-major)."""
    ticks = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.cartesian_prod(ticks, ticks)
    covs = torch.full((side * side, 2), std**2, dtype=torch.float64)
    return GaussianMixtureBed(means, covs, labels=list(range(side * side)))


def fit_gaussian(x: torch.Tensor):
    """Sample mean and (unbiased) covariance of flattened samples, float64."""
    xf = x.reshape(x.shape[0], -1).double()
    mean = xf.mean(0)
    dev = xf - mean
    return mean, dev.T @ dev / (xf.shape[0] - 1)


def affine_pushforward(sample_fn, dim: int, prior_std: float = 1.0, dtype=torch.float64):
    """Exact output Gaussian of a deterministic sampler that is affine in its starting point.

    On a single-Gaussian bed the exact denoiser is affine in ``x_t``, so every deterministic sampler
    (DDIM η=0, any ODE solver) maps ``x_T`` affinely: ``x_out = M x_T + c``. Running ``sample_fn`` on the
    ``D + 1`` probe points ``0, e_1, …, e_D`` recovers ``M`` and ``c`` exactly, and the output of a prior
    ``N(0, prior_std² I)`` is ``N(c, prior_std² M Mᵀ)`` — the sampler's exact output distribution with
    no sampling noise. ``sample_fn(x: (D+1, dim)) -> (D+1, dim)``. Returns ``(mean, cov)`` in float64.
    """
    probes = torch.cat([torch.zeros(1, dim, dtype=dtype), torch.eye(dim, dtype=dtype)])
    out = sample_fn(probes).reshape(dim + 1, dim).double()
    c = out[0]
    M = (out[1:] - c).T  # column j is the image of e_j
    return c, prior_std**2 * M @ M.T


def chain_pushforward(denoiser, timesteps, step, mean, cov, generator: torch.Generator | None = None,
                      max_draws: int = 4, **cond):
    """Exact output Gaussian of a *stochastic* chain whose steps are affine in the state plus Gaussian noise.

    On a single-Gaussian bed the exact denoiser is affine in ``x_t``, so every DDPM, DDIM (η > 0),
    Euler–Maruyama and ancestral step (SPEC §3, §5, §6) is ``x' = A x + b + Σ_j C_j z_j`` with the noise
    ``z_j ~ N(0, I)`` the step draws, independent of ``x``. Starting from ``x ~ N(mean, cov)``, the output is
    exactly ``N(A mean + b, A cov Aᵀ + Σ_j C_j C_jᵀ)`` step after step (float64, no sampling noise; the sibling of
    :func:`affine_pushforward`).

    Each step is identified by running it once on a probe batch — ``m·D + 1`` copies of ``0`` and the unit vectors
    ``e_1 … e_D`` — and replaying ``generator`` to read the noise it drew: the step must draw its noise as ``m ≤
    max_draws`` calls of ``randn(x.shape, generator)`` in float64 (as every sampler here does; the replay checks
    the generator's state afterwards and a fresh probe batch checks the affine fit, and either failing raises
    ``ValueError``, e.g. for the predictor–corrector's batch-normalised Langevin step).

    Args: ``denoiser(x, t, **cond) -> Prediction`` with a ``path``; ``timesteps`` the decreasing grid;
    ``step(path, x, pred, t, t_next, generator) -> x_next`` a chain transition (:mod:`difflab.samplers.chain`);
    ``mean (D,)``, ``cov (D, D)`` the law of the starting state. Returns ``(mean, cov)`` of the output, float64.
    """
    from difflab.samplers.chain import time_tensor

    mean = torch.as_tensor(mean, dtype=torch.float64)
    cov = torch.as_tensor(cov, dtype=torch.float64)
    D = mean.shape[0]
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    eye = torch.eye(D, dtype=torch.float64)
    grid = torch.as_tensor(timesteps).tolist()
    for t, t_next in zip(grid[:-1], grid[1:]):
        def run(x):
            t_b, t_next_b = time_tensor(t, x.shape[0], x.device), time_tensor(t_next, x.shape[0], x.device)
            state = generator.get_state()
            out = step(denoiser.path, x, denoiser(x, t_b, **cond), t_b, t_next_b, generator)
            replay = torch.Generator(generator.device).set_state(state)
            after = generator.get_state()
            draws = []
            while not torch.equal(replay.get_state(), after):
                if len(draws) == max_draws:
                    raise ValueError(f"the step drew noise other than up to {max_draws} randn(x.shape) calls")
                draws.append(randn(x.shape, replay, x.device, torch.float64))
            return out.reshape(x.shape[0], D).double(), [z.reshape(x.shape[0], D) for z in draws]

        n_zero = max_draws * D + 1
        probes = torch.cat([torch.zeros(n_zero, D, dtype=torch.float64), eye])
        out, draws = run(probes)
        # zero rows: out = b + Σ_j C_j z_j, an exact linear system in [b, C_1ᵀ, …] (least squares on n_zero rows)
        design = torch.cat([torch.ones(n_zero, 1, dtype=torch.float64)] + [z[:n_zero] for z in draws], 1)
        coef = torch.linalg.lstsq(design, out[:n_zero]).solution  # (1 + mD, D)
        b, C = coef[0], coef[1:].T  # C: (D, mD), the noise loading
        noise = torch.cat([z[n_zero:] for z in draws], 1) if draws else torch.zeros(D, 0, dtype=torch.float64)
        A = (out[n_zero:] - b - noise @ C.T).T  # column i is the image of e_i
        check_x = torch.randn(3, D, generator=torch.Generator().manual_seed(len(grid)), dtype=torch.float64)
        check_out, check_draws = run(check_x)
        check_noise = torch.cat(check_draws, 1) if check_draws else torch.zeros(3, 0, dtype=torch.float64)
        predicted = check_x @ A.T + b + check_noise @ C.T
        scale = 1.0 + check_out.abs().max()
        if len(check_draws) != len(draws) or (predicted - check_out).abs().max() > 1e-8 * scale:
            raise ValueError(f"the step {t} → {t_next} is not affine in the state plus Gaussian noise")
        mean = A @ mean + b
        cov = A @ cov @ A.T + C @ C.T
        cov = 0.5 * (cov + cov.T)
    return mean, cov
