"""Exact reverse kernels on the Gaussian-mixture test beds (SPEC §2, §5, §8).

For data ``p_0 = Σ_k w_k N(μ_k, Σ_k)`` (:class:`~difflab.testbeds.GaussianMixtureBed`) and any Gaussian path
``x_t = a_t x0 + s_t ε`` (:class:`~difflab.paths.GaussianPath`), both the posterior of the data and the true
reverse kernel are Gaussian mixtures in closed form:

- **posterior** ``q(x0 | x_t) = Σ_k r_k(x_t) N(m_k, P_k)`` with the responsibilities ``r_k ∝ w_k N(x_t; a μ_k, C_k)``,
  ``C_k = a² Σ_k + s² I`` (the bed's, :meth:`~difflab.testbeds.GaussianMixtureBed.posterior_means`), and each
  component's Gaussian posterior (the product of ``N(x0; μ_k, Σ_k)`` and ``N(x_t; a x0, s² I)``, SPEC §1)
  ``m_k = μ_k + a Σ_k C_k⁻¹ (x_t − a μ_k)``, ``P_k = Σ_k − a² Σ_k C_k⁻¹ Σ_k = U_k diag(s² λ/(a² λ + s²)) U_kᵀ``
  in the eigenbasis ``Σ_k = U_k diag(λ) U_kᵀ``; with class labels ``y`` the weights ``w_k`` are those of the class;
- **true reverse kernel** ``q(x_{t'} | x_t) = ∫ q(x_{t'} | x_t, x0) q(x0 | x_t) dx0`` for any ``t' < t``: the path's
  posterior ``q(x_{t'} | x_t, x0) = N(c_x0 x0 + c_xt x_t, v I)`` (:meth:`~difflab.paths.GaussianPath.
  posterior_coefficients`; SPEC §2's ``μ̃_t, β̃_t`` for consecutive DDPM steps) is affine in ``x0``, so the kernel
  is the mixture with the same ``r_k`` and components ``N(c_x0 m_k + c_xt x_t, c_x0² P_k + v I)``.

Both are :class:`MixtureBatch` objects (one mixture per row of ``x_t``): exact draws, log-densities, moments,
the moment-matched Gaussian and ``KL(mixture ‖ moment-matched Gaussian)`` — Monte Carlo with its standard error
in any dimension, or trapezoidal quadrature in 2-D (:meth:`MixtureBatch.kl_to_gaussian_quadrature`).

:func:`oracle_x0_sampler` is the exact DDGAN generator (``x̂0 ~ q(x0 | x_t)``, SPEC §5) and the oracle inner
sampler of nested diffusion; :func:`sample_exact_kernel` follows it with the path's posterior step, which draws
``x_{t'}`` from the true kernel, so its output is exact for any number of steps.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Optional

import torch

from difflab import gaussian
from difflab.parameterization import Prediction
from difflab.paths import GaussianPath
from difflab.samplers.ancestral import ddpm_step
from difflab.samplers.chain import Samples, sample_chain
from difflab.testbeds import GaussianMixtureBed
from difflab.utils import bcast, randn

# Quadrature (2-D): the grid covers each component with non-negligible weight out to this many of its standard
# deviations, with at least this many grid points per smallest standard deviation. The trapezoidal rule on a
# Gaussian of standard deviation σ with spacing h errs by about exp(−2π² σ²/h²): 2 points per σ gives 1e-34.
QUADRATURE_HALF_WIDTH = 9.0
QUADRATURE_POINTS_PER_STD = 2.0
QUADRATURE_MAX_POINTS = 801  # per axis
NEGLIGIBLE_WEIGHT = 1e-15  # components below this weight hold less mass than float64 resolves next to 1


class MixtureBatch:
    """``B`` Gaussian mixtures in ``R^D``, one per row: ``q_b = Σ_k π_bk N(m_bk, U_k diag(λ_bk) U_kᵀ)``.

    The components of row ``b`` share the eigenvectors ``U_k`` of the bed's ``Σ_k`` (true of every posterior and
    kernel on a Gaussian path). Args: ``log_weights (B, K)``; ``means (B, K, D)``; ``eigvecs (K, D, D)``;
    ``eigvals (B, K, D)`` (non-negative; zero is a point mass in that direction, fine for draws and moments, not
    for densities); ``shape``: the data shape draws are reshaped to. Everything is float64.
    """

    def __init__(self, log_weights, means, eigvecs, eigvals, shape=None):
        self.log_weights, self.means, self.eigvecs, self.eigvals = log_weights, means, eigvecs, eigvals
        self.B, self.K, self.D = means.shape
        self.shape = tuple(shape) if shape is not None else (self.D,)

    @property
    def weights(self) -> torch.Tensor:
        return self.log_weights.exp()

    def sample(self, generator: Optional[torch.Generator] = None, num: int = 1) -> torch.Tensor:
        """One exact draw per row (``(B, *shape)``), or ``num`` per row (``(num, B, *shape)``).

        A component index per draw (skipped for one component), then the reparameterised draw
        ``m_k + U_k diag(√λ_k) z`` (SPEC §1) from one ``randn`` of ``(num·B, D)``.
        """
        n = num * self.B
        if self.K == 1:
            k = torch.zeros(n, dtype=torch.long, device=self.means.device)
        else:
            k = torch.multinomial(self.weights.repeat(num, 1).float(), 1, True, generator=generator).squeeze(-1)
        rows = torch.arange(self.B, device=self.means.device).repeat(num)
        z = randn((n, self.D), generator, self.means.device, torch.float64)
        x = self.means[rows, k] + torch.einsum("ndj,nj->nd", self.eigvecs[k], self.eigvals[rows, k].sqrt() * z)
        x = x.reshape(num, self.B, *self.shape)
        return x[0] if num == 1 else x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log q_b(x)`` for ``x`` of shape ``(..., B, *shape)`` (row ``b`` under mixture ``b``): ``(..., B)``."""
        lead = x.shape[: x.ndim - len(self.shape) - 1]
        xf = x.reshape(*lead, self.B, 1, self.D).double()
        z = torch.einsum("kdj,...bkd->...bkj", self.eigvecs, xf - self.means)  # U_kᵀ(x − m_k)
        logp = -0.5 * ((z**2 / self.eigvals).sum(-1) + torch.log(self.eigvals).sum(-1) + self.D * gaussian.LOG_2PI)
        return torch.logsumexp(logp + self.log_weights, dim=-1)

    def moments(self):
        """Mean ``(B, D)`` and covariance ``(B, D, D)`` of each row's mixture (the moment-matched Gaussian)."""
        w = self.weights.unsqueeze(-1)
        mean = (w * self.means).sum(1)
        covs = torch.einsum("kdj,bkj,kej->bkde", self.eigvecs, self.eigvals, self.eigvecs)
        dev = self.means - mean.unsqueeze(1)
        cov = (w.unsqueeze(-1) * (covs + dev.unsqueeze(-1) * dev.unsqueeze(-2))).sum(1)
        return mean, 0.5 * (cov + cov.transpose(-1, -2))

    def kl_to_gaussian(self, num_samples: int, generator: Optional[torch.Generator] = None):
        """Monte-Carlo ``KL(q_b ‖ N(mean_b, cov_b))`` to the moment-matched Gaussian, with its standard error.

        ``KL = E_q[log q(x) − log N(x)]`` averaged over ``num_samples`` exact draws per row; the difference (not
        ``−H(q)`` alone) is averaged because its variance vanishes as ``q`` approaches a Gaussian.
        Returns ``(kl [B], standard_error [B])`` in nats.
        """
        mean, cov = self.moments()
        x = self.sample(generator, num_samples).reshape(num_samples, self.B, self.D)
        diff = self.log_prob(x) - gaussian.log_normal(x, mean, cov)  # (n, B)
        return diff.mean(0), diff.std(0) / math.sqrt(num_samples)

    def kl_to_gaussian_quadrature(self, max_points: int = QUADRATURE_MAX_POINTS):
        """``KL(q_b ‖ N(mean_b, cov_b))`` by the trapezoidal rule in 2-D, with the integral of ``q_b``.

        The grid lives in the whitened coordinates ``u = L⁻¹(x − mean)`` (``cov = L Lᵀ``), spans every component
        of weight above ``NEGLIGIBLE_WEIGHT`` out to ``QUADRATURE_HALF_WIDTH`` of its standard deviations, and has
        ``QUADRATURE_POINTS_PER_STD`` points per smallest component standard deviation (at most ``max_points``
        per axis; one grid serves the batch). Returns ``(kl [B], mass [B])``; ``mass`` should be 1 to rounding.
        """
        if self.D != 2:
            raise ValueError(f"quadrature is for 2-D mixtures (this one has D = {self.D}); use kl_to_gaussian")
        mean, cov = self.moments()
        L = torch.linalg.cholesky(cov)  # (B, 2, 2)
        Linv = torch.linalg.inv(L)
        m_w = torch.einsum("bde,bke->bkd", Linv, self.means - mean.unsqueeze(1))  # whitened component means
        covs = torch.einsum("kdj,bkj,kej->bkde", self.eigvecs, self.eigvals, self.eigvecs)
        cov_w = Linv.unsqueeze(1) @ covs @ Linv.transpose(-1, -2).unsqueeze(1)
        std_w = torch.linalg.eigvalsh(cov_w).clamp(min=0.0).sqrt()  # (B, K, 2)
        keep = self.weights > NEGLIGIBLE_WEIGHT
        reach = (m_w.abs() + QUADRATURE_HALF_WIDTH * std_w[..., -1:]).amax(-1)  # (B, K)
        half = float(reach[keep].max())
        h = float(std_w[..., 0][keep].min()) / QUADRATURE_POINTS_PER_STD
        n = min(max_points, 2 * math.ceil(half / h) + 1)
        u1 = torch.linspace(-half, half, n, dtype=torch.float64)
        h = float(u1[1] - u1[0])
        u = torch.cartesian_prod(u1, u1)  # (n², 2)
        det_L = torch.diagonal(L, dim1=-2, dim2=-1).prod(-1)  # dx = det L du
        kl = torch.zeros(self.B, dtype=torch.float64)
        mass = torch.zeros(self.B, dtype=torch.float64)
        for chunk in u.split(max(1, (1 << 20) // (self.B * self.K))):
            x = mean + torch.einsum("bde,ne->nbd", L, chunk)  # (n_chunk, B, 2)
            log_q = self.log_prob(x)
            log_g = -0.5 * ((chunk**2).sum(-1, keepdim=True) + 2 * gaussian.LOG_2PI) - torch.log(det_L)
            q = log_q.exp()
            kl += (q * (log_q - log_g)).sum(0)
            mass += q.sum(0)
        scale = det_L * h**2
        return kl * scale, mass * scale


def _time(t, device) -> torch.Tensor:
    """A time as a tensor; a Python float becomes float64 (not torch's default float32)."""
    return torch.as_tensor(t, dtype=torch.float64 if isinstance(t, float) else None, device=device)


def _components(bed: GaussianMixtureBed, path: GaussianPath, x_t: torch.Tensor, t, y=None):
    """``(log r (B, K), m (B, K, D), posterior eigenvalues (B, K, D), flat x_t)`` of ``q(x0 | x_t)`` (module docstring)."""
    t = _time(t, x_t.device)
    xf, a, s = bed._prep(x_t, path.a(t), path.s(t))
    logp, cinv_diff, a3, _, _ = bed._component_terms(xf, a, s)
    log_r = torch.log(bed._responsibilities(logp, y).clamp(min=1e-300))
    m = bed.means.unsqueeze(0) + a3 * torch.einsum("kde,bke->bkd", bed.covs, cinv_diff)  # μ_k + a Σ_k C_k⁻¹(x − aμ_k)
    lam, a2, s2 = bed.eigvals.unsqueeze(0), a.reshape(-1, 1, 1) ** 2, s.reshape(-1, 1, 1) ** 2
    post = s2 * lam / (a2 * lam + s2)  # eigenvalues of P_k = Σ_k − a² Σ_k C_k⁻¹ Σ_k
    return log_r, m, post, xf


def posterior_x0(bed: GaussianMixtureBed, path: GaussianPath, x_t: torch.Tensor, t, y=None) -> MixtureBatch:
    """The exact posterior ``q(x0 | x_t)`` (or ``q(x0 | x_t, y)`` with class labels ``y``) at time ``t``, one
    mixture per row of ``x_t`` (module docstring; SPEC §8). Its mean is the bed's ``E[x0 | x_t]``."""
    log_r, m, post, _ = _components(bed, path, x_t, t, y)
    return MixtureBatch(log_r, m, bed.eigvecs, post, bed.shape)


def reverse_kernel(bed: GaussianMixtureBed, path: GaussianPath, x_t: torch.Tensor, t, t_prev, y=None) -> MixtureBatch:
    """The true reverse kernel ``q(x_{t'} | x_t)`` (or ``q(x_{t'} | x_t, y)``) for ``t' = t_prev < t`` on ``path``:
    the posterior mixture pushed through the path's ``q(x_{t'} | x_t, x0) = N(c_x0 x0 + c_xt x_t, v I)`` (SPEC §2)."""
    log_r, m, post, xf = _components(bed, path, x_t, t, y)
    c_x0, c_xt, var = (c.expand(xf.shape[0]).reshape(-1, 1, 1) if c.ndim == 0 else c.reshape(-1, 1, 1)
                       for c in path.posterior_coefficients(_time(t, xf.device), _time(t_prev, xf.device)))
    means = c_x0 * m + c_xt * xf.unsqueeze(1)
    return MixtureBatch(log_r, means, bed.eigvecs, c_x0**2 * post + var, bed.shape)


def sample_marginal(bed: GaussianMixtureBed, path: GaussianPath, num: int, t, generator=None, y=None) -> torch.Tensor:
    """``num`` exact draws of ``x_t ~ p_t`` (``x0`` from the bed, then ``q(x_t | x0)``, SPEC §2), float64."""
    x0 = bed.sample(num, generator, y=y, dtype=torch.float64)
    return path.sample(x0, torch.full((num,), t, dtype=torch.float64 if isinstance(t, float) else torch.long),
                       generator=generator)[0]


def oracle_x0_sampler(bed: GaussianMixtureBed, path: GaussianPath) -> Callable:
    """The exact generator ``(x_t, t, generator, **cond) -> x̂0 ~ q(x0 | x_t[, y])`` (SPEC §5 DDGAN, §8).

    ``t`` is a time of ``path`` (a number or ``[B]``); ``cond`` may hold ``y=`` class labels, anything else is
    ignored. Returns a draw shaped and typed like ``x_t``.
    """
    def draw(x_t: torch.Tensor, t, generator: Optional[torch.Generator] = None, y=None, **_ignored) -> torch.Tensor:
        return posterior_x0(bed, path, x_t, t, y).sample(generator).to(x_t.dtype).reshape(x_t.shape)

    return draw


class X0DrawDenoiser:
    """A denoiser whose ``x̂0`` is a *draw* ``x0_sampler(x_t, t, generator, **cond)`` (a DDGAN generator, or the
    :func:`oracle_x0_sampler`), with ``ε̂ = (x_t − a_t x̂0)/s_t`` (SPEC §4), for the reverse chain.

    With :func:`~difflab.samplers.ancestral.ddpm_step` (``β̃``) as the transition, each step draws
    ``x_{t'} ~ q(x_{t'} | x_t, x̂0)``, SPEC §5's DDGAN step. The draws come from ``generator``.
    """

    def __init__(self, x0_sampler: Callable, path: GaussianPath, generator: Optional[torch.Generator] = None):
        self.x0_sampler, self.path, self.generator = x0_sampler, path, generator

    def __call__(self, x: torch.Tensor, t, **cond) -> Prediction:
        x0 = self.x0_sampler(x, t, self.generator, **cond)
        t = _time(t, x.device)
        return Prediction(x0, (x - bcast(self.path.a(t), x) * x0) / bcast(self.path.s(t), x))


def sample_x0_draws(x0_sampler: Callable, path: GaussianPath, x: torch.Tensor, timesteps,
                    generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
                    progress: bool = False, **cond) -> Samples:
    """The reverse chain driven by ``x̂0`` draws: ``x̂0 ~ x0_sampler(x_t)``, then ``x_{t'} ~ q(x_{t'} | x_t, x̂0)``
    along the decreasing grid ``timesteps`` (SPEC §5, DDGAN's sampler). NFE counts the draws."""
    den = X0DrawDenoiser(x0_sampler, path, generator)
    grid = torch.as_tensor(timesteps)
    return sample_chain(den, x, grid, partial(ddpm_step, variance="beta_tilde"), generator, callback, progress, **cond)


def sample_exact_kernel(bed: GaussianMixtureBed, path: GaussianPath, x_T: torch.Tensor, timesteps,
                        generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
                        progress: bool = False, **cond) -> Samples:
    """Draw ``x_{t'} ~ q(x_{t'} | x_t)`` exactly along ``timesteps`` (any number of steps, any path; SPEC §8).

    Each step is the oracle ``x̂0 ~ q(x0 | x_t)`` (:func:`oracle_x0_sampler`) followed by the path's posterior step,
    which together draw from the true kernel; started from ``x_T ~ p_T`` (:func:`sample_marginal`) every state is an
    exact draw of its marginal. ``y=`` conditions on a class (``q(x_{t'} | x_t, y)``).
    """
    return sample_x0_draws(oracle_x0_sampler(bed, path), path, x_T, timesteps, generator, callback, progress, **cond)
