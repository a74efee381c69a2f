"""DDGAN: a few-step reverse process whose steps are learned adversarially (SPEC §5; Xiao, Kreis, Vahdat 2022).

With few, large steps the true reverse kernel ``q(x_{t−1} | x_t)`` is far from Gaussian (multimodal), so DDGAN
models it implicitly: a generator ``G(x_t, z, t) → x̂0`` with a latent ``z ~ N(0, I)``, followed by a draw from
the exact posterior ``q(x_{t−1} | x_t, x̂0)`` of the path (SPEC §2), defines ``p_θ(x_{t−1} | x_t)``. A
time-conditional discriminator ``D(x_{t−1}, x_t, t)`` tells real pairs (``x_{t−1} ~ q(x_{t−1} | x0)``, then
``x_t ~ q(x_t | x_{t−1})``) from generated ones; the losses are the non-saturating GAN's with an R1 penalty on
the real ``x_{t−1}``. With the exact ``x̂0 ~ q(x0 | x_t)`` in place of ``G`` the chain draws from the true
reverse kernel (:func:`difflab.exact_kernels.oracle_x0_sampler`), which is what the tests check.

Notation map: time is SPEC's ``t ∈ {1..T}`` (``x_0`` is data); the reference code's index ``t ∈ {0..T−1}`` with
``G(x_{t+1}, t)`` is our ``t − 1``: here ``G(x_t, z, t)`` and ``D(x_{t−1}, x_t, t)`` both see the step ``t`` of
the transition ``t → t − 1``. Losses are per example ``[B]``; the caller reduces.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from difflab.paths import DiscretePath
from difflab.samplers.chain import Samples
from difflab.samplers.grids import discrete_timesteps
from difflab.utils import randn, sum_except_batch


def real_pair(path: DiscretePath, x0: torch.Tensor, t: torch.Tensor, eps_prev: torch.Tensor,
              eps_step: torch.Tensor) -> tuple:
    """A real pair at step ``t [B]``: ``x_{t−1} = a_{t−1} x0 + s_{t−1} ε`` (``q(x_{t−1} | x0)``, SPEC §2; exactly
    ``x0`` at ``t = 1``), then ``x_t = √α_t x_{t−1} + √β_t ε'`` (``q(x_t | x_{t−1})``). Returns ``(x_{t−1}, x_t)``."""
    x_prev = path.sample(x0, t - 1, eps=eps_prev)[0]
    return x_prev, path.transition(x_prev, t, eps=eps_step)


def posterior_draw(path: DiscretePath, x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    """``x_{t−1} = μ̃_t(x_t, x̂0) + √β̃_t · noise ~ q(x_{t−1} | x_t, x̂0)`` (SPEC §2, :meth:`~difflab.paths.
    GaussianPath.posterior`), differentiable in ``x̂0``; at ``t = 1`` it is ``x̂0`` itself (``β̃_1 = 0``)."""
    mean, var = path.posterior(x_t, x0_hat, t, t - 1)
    return mean + var.sqrt() * noise


def discriminator_loss(d_real: torch.Tensor, d_fake: torch.Tensor) -> torch.Tensor:
    """``softplus(−D(real)) + softplus(D(fake)) = −log σ(D(real)) − log(1 − σ(D(fake)))`` per example ``[B]``."""
    return F.softplus(-d_real) + F.softplus(d_fake)


def generator_loss(d_fake: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss ``softplus(−D(fake)) = −log σ(D(fake))`` per example ``[B]``."""
    return F.softplus(-d_fake)


def r1_penalty(d_real: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """``||∇_x D(x)||²`` at the real inputs ``x_real`` (which must require grad), per example ``[B]``; the graph is
    kept so the penalty can be differentiated (Mescheder et al. 2018; the loss adds ``γ/2`` times its mean)."""
    (grad,) = torch.autograd.grad(d_real.sum(), x_real, create_graph=True)
    return sum_except_batch(grad.pow(2))


class DDGANGenerator:
    """A trained generator as a sampler sees it: ``x0_draw(x_t, t, generator, y=None) = G(x_t, z, t)`` with a fresh
    ``z ~ N(0, I_nz)`` from ``generator`` per sample, on the run's discrete ``path``."""

    def __init__(self, net: nn.Module, path: DiscretePath, nz: int):
        self.net, self.path, self.nz = net, path, nz

    def x0_draw(self, x_t: torch.Tensor, t, generator: Optional[torch.Generator] = None, y=None,
                **_ignored) -> torch.Tensor:
        z = randn((x_t.shape[0], self.nz), generator, x_t.device, x_t.dtype)
        return self.net(x_t, t, y=y, z=z).to(x_t.dtype)


@torch.no_grad()
def sample_ddgan(x0_draw: Callable, path: DiscretePath, x: torch.Tensor, generator: Optional[torch.Generator] = None,
                 callback: Optional[Callable] = None, progress: bool = False, **cond) -> Samples:
    """DDGAN's sampler (SPEC §5): from ``x = x_T``, for ``t = T, …, 1``: ``x̂0 = x0_draw(x_t, t)`` then
    ``x_{t−1} ~ q(x_{t−1} | x_t, x̂0)``; ``T`` network evaluations. ``x0_draw`` is a :class:`DDGANGenerator`'s
    or the exact :func:`~difflab.exact_kernels.oracle_x0_sampler`."""
    from difflab.exact_kernels import sample_x0_draws

    grid = discrete_timesteps(path.T, path.T)  # T, T−1, …, 0: every step of the path
    return sample_x0_draws(x0_draw, path, x, grid, generator, callback, progress, **cond)
