"""Flow matching with optional minibatch optimal-transport coupling (SPEC §6).

Notation map (difflab's time runs from data at ``t_min`` to noise at ``t_max``, as on every path):

- path ``x_t = a_t x0 + s_t ε`` (:mod:`difflab.paths`); the *conditional velocity* is
  ``u = ȧ x0 + ṡ ε`` (Lipman et al. 2023, Thm 3, for a Gaussian path), the target
  ``velocity`` of :mod:`difflab.parameterization`;
- the *marginal velocity* ``v*(x, t) = E[u | x_t = x] = ȧ E[x0|x_t] + ṡ E[ε|x_t]`` generates the path's
  marginals (continuity equation ``∂_t p_t + ∇·(p_t v*) = 0``), so integrating ``dx/dt = v*`` from
  ``t_max`` to ``t_min`` carries the prior to the data;
- the conditional flow-matching (CFM) loss ``E_{t, x0, ε} ||v_θ(x_t, t) − u||²`` equals
  ``E ||v_θ − v*||² + E ||v* − u||²`` (the second term does not depend on θ), so its minimiser is ``v*``;
- rectified flow (Liu et al. 2023) is CFM on :class:`~difflab.paths.LinearPath`,
  ``x_t = (1−t) x0 + t ε`` with ``u = ε − x0``. Liu et al. write ``X_0`` for noise and ``X_1`` for data;
  their ``X_τ`` is our ``x_{1−τ}`` and their drift is ``−v``.

The loss itself is the core's :func:`~difflab.losses.diffusion_loss` on a ``target="velocity"``
denoiser; this module adds the couplings (independent, minibatch OT (Tong et al. 2023), or fixed
pairs for reflow), the exact marginal velocity of a test bed and few-step sampling from standard-normal noise.
Training small velocity models is :func:`difflab.objectives.distillation.fit_velocity`; reflow lives in
:mod:`difflab.reflow`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from difflab.losses import diffusion_loss
from difflab.metrics import sliced_wasserstein2
from difflab.parameterization import NetworkDenoiser, from_x0_eps
from difflab.paths import GaussianPath
from difflab.samplers.chain import Samples
from difflab.samplers.ddim import sample_ddim
from difflab.samplers.grids import discrete_timesteps
from difflab.samplers.ode import sample_euler, sample_heun
from difflab.samplers.time_grids import uniform_t
from difflab.testbeds import GaussianMixtureBed
from difflab.utils import per_sample_time, randn

COUPLINGS = (None, "ot")


# --- couplings -------------------------------------------------------------------------------------
def ot_assignment(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The minibatch optimal-transport pairing of data with noise (Tong et al. 2023, OT-CFM).

    Solves the assignment problem ``min_π Σ_i ||x0_i − ε_{π(i)}||²`` over permutations ``π`` exactly
    (``scipy.optimize.linear_sum_assignment`` on the float64 squared-Euclidean cost matrix); for equal
    batch sizes with uniform weights this *is* the discrete OT plan between the two empirical measures.

    Args: ``x0, eps``: ``(B, ...)`` of the same shape. Returns: ``π`` as a long ``[B]`` on ``x0``'s
    device, so ``eps[π]`` is the noise paired with ``x0``.
    """
    if x0.shape != eps.shape:
        raise ValueError(f"data and noise must have the same shape, got {tuple(x0.shape)} and {tuple(eps.shape)}")
    cost = torch.cdist(x0.reshape(x0.shape[0], -1).double(), eps.reshape(eps.shape[0], -1).double()) ** 2  # (B, B)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long, device=x0.device)


def couple(x0: torch.Tensor, eps: torch.Tensor, coupling: Optional[str]) -> torch.Tensor:
    """The noise paired with ``x0`` under ``coupling``: ``None`` keeps the given pairing (independent
    draws, or fixed reflow pairs), ``"ot"`` re-pairs by :func:`ot_assignment`.

    Only the noise is permuted: the data keeps its row, so labels and every other per-example
    conditioning stay attached to the data they belong to.
    """
    if coupling is None:
        return eps
    if coupling == "ot":
        return eps[ot_assignment(x0, eps)]
    raise ValueError(f"unknown coupling {coupling!r}; choose one of {COUPLINGS}")


# --- the objective ---------------------------------------------------------------------------------
def flow_matching_loss(denoiser: NetworkDenoiser, x0: torch.Tensor, coupling: Optional[str] = None,
                       eps: Optional[torch.Tensor] = None, t: Optional[torch.Tensor] = None,
                       generator: Optional[torch.Generator] = None, **cond) -> torch.Tensor:
    """Per-example conditional flow-matching loss ``mean||v_θ(x_t, t) − (ȧ x0 + ṡ ε)||²`` (SPEC §6), ``[B]``.

    Args:
        denoiser: a ``NetworkDenoiser`` with ``target="velocity"`` on any continuous Gaussian path.
        x0: data ``(B, ...)``.
        coupling: ``None`` (independent ``ε``, or the given ``eps`` as fixed pairs) or ``"ot"``
            (the drawn/given noise minibatch re-paired with ``x0`` by exact minibatch OT).
        eps: noise ``(B, ...)``; drawn from ``generator`` when omitted.
        t: times ``[B]`` (or a scalar); uniform on ``[t_min, t_max]`` when omitted.
        **cond: conditioning for the network (``y=``, ``context=``), row-aligned with ``x0``.
    """
    if getattr(denoiser, "target", None) != "velocity":
        raise ValueError("flow matching regresses the velocity: use NetworkDenoiser(net, path, target='velocity')")
    if eps is None:
        eps = randn(x0.shape, generator, x0.device, x0.dtype)
    eps = couple(x0, eps, coupling)
    if t is not None:
        t = per_sample_time(t, x0.shape[0], x0.device, torch.float64)
    return diffusion_loss(denoiser, x0, t=t, eps=eps, generator=generator, **cond)


def marginal_velocity_exact(bed: GaussianMixtureBed, path: GaussianPath, x: torch.Tensor, t, y=None) -> torch.Tensor:
    """The exact marginal velocity ``v*(x, t) = ȧ E[x0|x_t=x] + ṡ E[ε|x_t=x]`` of a test bed (SPEC §6, §8).

    ``x``: ``(B, ...)``; ``t``: scalar or ``[B]``; ``y``: optional class labels (the conditional
    velocity field). Computed in float64 from the bed's exact posterior means; returns ``x``'s shape/dtype.
    """
    t, x64 = per_sample_time(t, x.shape[0], x.device, torch.float64), x.double()
    x0_mean, eps_mean, _ = bed.posterior_means(x64, path.a(t), path.s(t), y=y)
    return from_x0_eps(x0_mean, eps_mean, x64, t, path, "velocity").to(x.dtype)


# --- training batches -----------------------------------------------------------------------
class FlowBatch(NamedTuple):
    """One training minibatch: data ``x0``, optionally its paired noise ``eps`` (reflow), and conditioning."""

    x0: torch.Tensor
    eps: Optional[torch.Tensor] = None
    cond: Optional[dict] = None


def pair_batches(eps: torch.Tensor, x0: torch.Tensor, **cond) -> Callable[[int, Optional[torch.Generator]], FlowBatch]:
    """A ``sample_batch_fn`` drawing random minibatches (with replacement) of fixed ``(ε, x0)`` pairs.

    Per-pair conditioning (tensors with ``len(eps)`` rows, e.g. ``y=``) is indexed with the pairs.
    """
    if eps.shape != x0.shape:
        raise ValueError(f"pairs must have equal shapes, got {tuple(eps.shape)} and {tuple(x0.shape)}")
    n = eps.shape[0]

    def sample_batch(batch_size: int, generator: Optional[torch.Generator] = None) -> FlowBatch:
        gen_device = generator.device if generator is not None else eps.device
        idx = torch.randint(0, n, (batch_size,), generator=generator, device=gen_device).to(eps.device)
        return FlowBatch(x0[idx], eps[idx], index_cond(cond, idx, n))

    return sample_batch


# --- sampling from standard-normal noise ------------------------------------------------------------
def flow_timesteps(path: GaussianPath, steps: int) -> torch.Tensor:
    """A decreasing grid of ``steps`` intervals from ``t_max`` to the clean end: uniform float64 in ``t`` on a
    continuous path (:func:`difflab.samplers.time_grids.uniform_t`; on :class:`~difflab.paths.LinearPath` the
    rectified-flow grid ``1, 1−1/N, …, 0``), the ``trailing`` integer grid on a discrete one."""
    if getattr(path, "discrete", False):
        return discrete_timesteps(path.T, steps, "trailing")
    return uniform_t(path, steps)


def default_solver(path: GaussianPath, order: int = 1) -> Callable:
    """The PF-ODE solver used when none is given: Euler (``order=1``) or Heun (``order=2``) on a continuous
    path (:mod:`difflab.samplers.ode`), deterministic DDIM (the first-order solver in discrete time) on a
    discrete one."""
    if getattr(path, "discrete", False):
        return sample_ddim
    return {1: sample_euler, 2: sample_heun}[order]


def sample_flow(denoiser, eps: torch.Tensor, steps: int, sampler: Optional[Callable] = None,
                generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None, **cond) -> Samples:
    """Integrate the denoiser's probability-flow ODE from standard-normal ``eps`` over ``steps`` uniform steps.

    The start state is ``x_{t_max} = s_{t_max} ε`` (exactly ``ε`` on the linear path, whose ``a(1) = 0``).
    ``sampler(denoiser, x, timesteps, generator=, callback=, **cond) -> Samples`` defaults to
    :func:`default_solver` (Euler: ``x_{t'} = x_t + (t' − t) v``, which on :class:`~difflab.paths.LinearPath`
    is also deterministic DDIM, SPEC §6). Returns :class:`~difflab.samplers.chain.Samples` ``(x, nfe)``.
    """
    path = denoiser.path
    sampler = default_solver(path) if sampler is None else sampler
    x = path.prior_std() * eps
    return sampler(denoiser, x, timesteps=flow_timesteps(path, steps), generator=generator, callback=callback, **cond)


def few_step_sw2(denoiser, eps: torch.Tensor, reference: torch.Tensor, steps: Sequence[int] = (1, 2),
                 sampler: Optional[Callable] = None, num_projections: int = 256, seed: int = 0, **cond) -> dict:
    """Sliced W2 between ``reference`` data and samples from ``eps`` after each step count, ``{k: float}``.

    The projections are drawn from ``seed`` so every entry (and every model compared) uses the same directions.
    """
    out = {}
    for k in steps:
        x = sample_flow(denoiser, eps, k, sampler, **cond).x
        out[k] = sliced_wasserstein2(x.cpu(), reference.cpu(), num_projections, torch.Generator().manual_seed(seed))
    return out


def index_cond(cond: dict, idx: torch.Tensor, n: int) -> dict:
    """Index per-example conditioning (tensors with ``n`` rows) by ``idx``; pass anything else through."""
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == n else v) for k, v in cond.items()}
