"""Rectified flow: reflow, path straightness and one-step distillation (Liu et al. 2023; SPEC §6).

Rectified flow trains a velocity ``v_θ`` on the linear path ``x_t = (1−t) x0 + t ε`` (target
``u = ε − x0``; :func:`difflab.flows.flow_matching_loss` on :class:`~difflab.paths.LinearPath`). Its ODE
``dx/dt = v_θ`` from ``x_1 = ε`` defines a deterministic coupling ``(ε, x̂0 = ODE(ε))``. *Reflow* retrains
on these fixed pairs — ``x_t = (1−t) x̂0 + t ε`` with the pair's own ``ε`` replacing the independent
draw — which keeps the marginals and makes the paths straighter, so few Euler steps suffice
(Liu et al. 2023, §3). *One-step distillation* then fits ``v(ε, 1) = ε − x̂0`` alone, so a single
Euler step ``x̂0 = x_1 − v(x_1, 1)`` reproduces the coupling.

Straightness (Liu et al. 2023's ``S(Z)``, in difflab's time direction): for a trajectory ``x_t`` from ``t_max`` to
``t_min`` with ``T = t_max − t_min``,

    S = (1/T) ∫ E || (x_{t_max} − x_{t_min})/T − dx_t/dt ||² dt      (squared Euclidean norm, summed over dims)

which is zero exactly for straight paths traversed at constant speed and equals Liu et al.'s
``∫_0^1 E||(Z_1 − Z_0) − Ż_t||² dt`` on the linear path. :func:`straightness` evaluates it on the
piecewise-linear trajectory the ODE solver produces on a uniform grid (segment slopes as ``dx/dt``);
it converges to ``S`` as the grid is refined.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from difflab.flows import default_solver, few_step_sw2, index_cond, pair_batches, sample_flow
from difflab.networks.embeddings import network_time_fn
from difflab.objectives.distillation import fit_velocity
from difflab.parameterization import NetworkDenoiser
from difflab.paths import LinearPath
from difflab.utils import randn, sum_except_batch


@torch.no_grad()
def reflow_pairs(denoiser, num: int, shape: Sequence[int], sampler: Optional[Callable] = None, steps: int = 50,
                 generator: Optional[torch.Generator] = None, batch_size: Optional[int] = None, device=None, **cond):
    """Draw ``num`` standard-normal ``ε`` and solve the denoiser's ODE from each: ``(ε, x̂0 = ODE(ε))``.

    Args:
        denoiser: the teacher, any denoiser on any path (its start state is ``s_{t_max} ε``).
        num: number of pairs; shape: the data shape (without the batch dim).
        sampler: ODE solver ``(denoiser, x, timesteps, generator=, callback=, **cond) -> Samples``;
            defaults to Heun (second order, 2 evaluations per step; DDIM on a discrete path), see
            :func:`difflab.flows.default_solver`.
        steps: solver steps on a uniform grid (:func:`difflab.flows.flow_timesteps`).
        batch_size: solve in chunks of this many pairs (per-pair conditioning is sliced with them).
        device: where the noise is put and the ODE solved (the noise is drawn from ``generator`` on its device).
        **cond: conditioning, per pair (``num`` rows) or shared.
    Returns: ``(eps, x0_hat)``, each ``(num, *shape)`` float32 on ``device``.
    """
    if num < 1:
        raise ValueError(f"num must be positive, got {num}")
    eps = randn((num, *shape), generator, device)
    sampler = default_solver(denoiser.path, order=2) if sampler is None else sampler
    batch_size = num if batch_size is None else batch_size
    chunks = []
    for start in range(0, num, batch_size):
        idx = torch.arange(start, min(start + batch_size, num), device=eps.device)
        chunks.append(sample_flow(denoiser, eps[idx], steps, sampler, generator, **index_cond(cond, idx, num)).x)
    return eps, torch.cat(chunks).float()


@torch.no_grad()
def straightness(denoiser, eps: torch.Tensor, steps: int = 100, sampler: Optional[Callable] = None, **cond) -> float:
    """Liu et al.'s straightness ``S`` of the denoiser's ODE trajectories from noise ``eps`` (see module doc).

    Runs the solver on ``steps`` uniform steps, records the states ``x_{t_i}`` and returns
    ``Σ_i (|Δt_i|/T) · mean_b ||d̄ − d_i||²`` with segment slopes ``d_i = (x_{t_{i+1}} − x_{t_i})/(t_{i+1} − t_i)``
    and mean slope ``d̄ = (x_{t_min} − x_{t_max})/(t_min − t_max)``.
    """
    path = denoiser.path
    states = [path.prior_std() * eps]
    times = []

    def record(info):
        states.append(info["x"])
        times.append((float(info["t"]), float(info["t_next"])))

    sample_flow(denoiser, eps, steps, sampler, callback=record, **cond)
    t_start, t_end = times[0][0], times[-1][1]
    T = t_start - t_end
    d_mean = (states[-1] - states[0]) / (t_end - t_start)
    total = 0.0
    for (t, t_next), x, x_next in zip(times, states[:-1], states[1:]):
        d = (x_next - x) / (t_next - t)
        total += (t - t_next) / T * float(sum_except_batch((d_mean - d).double() ** 2).mean())
    return total


def rectified_flow_denoiser(net: torch.nn.Module, time_fn: Optional[Callable] = None) -> NetworkDenoiser:
    """``net`` as a rectified flow: a ``target="velocity"`` denoiser on :class:`LinearPath`.

    ``time_fn`` maps ``t ∈ [0, 1]`` to the network's time input; ``None`` uses difflab's network
    convention (:func:`difflab.networks.embeddings.network_time_fn`, ``t ↦ 1000 t``).
    """
    path = LinearPath()
    return NetworkDenoiser(net, path, target="velocity", time_fn=network_time_fn(path) if time_fn is None else time_fn)


def distill_one_step(denoiser: NetworkDenoiser, eps: torch.Tensor, x0_hat: torch.Tensor, train_steps: int,
                     lr: float = 1e-3, batch_size: int = 256, generator: Optional[torch.Generator] = None,
                     **cond) -> NetworkDenoiser:
    """One-step distillation (Liu et al. 2023): a copy of a rectified flow trained at ``t = 1`` only, on pairs.

    The loss ``||v(ε, 1) − (ε − x̂0)||²`` is the flow-matching loss at ``t = 1`` on the linear path, so
    one Euler step ``x̂0 = x_1 − v(x_1, 1)`` maps each ``ε`` to its pair. ``denoiser`` (a velocity
    denoiser on :class:`LinearPath`) is not modified; returns the distilled denoiser (same ``time_fn``).
    """
    if not isinstance(denoiser.path, LinearPath) or denoiser.target != "velocity":
        raise ValueError("one-step distillation needs a rectified flow: a velocity denoiser on LinearPath")
    student = NetworkDenoiser(copy.deepcopy(denoiser.net), denoiser.path, "velocity", time_fn=denoiser.time_fn)
    fit_velocity(student, pair_batches(eps, x0_hat, **cond), train_steps, lr, batch_size, generator,
                 t_value=denoiser.path.t_max)
    return student


@dataclass
class ReflowResult:
    """What :func:`reflow` returns: the new network and its denoiser, the pairs it was trained on, the
    measurements (``{"before": {...}, "after": {...}}`` with ``straightness`` and, given reference data,
    ``sw2`` = ``{steps: sliced W2}`` at the requested Euler step counts) and the training losses."""

    net: torch.nn.Module
    denoiser: NetworkDenoiser
    eps: torch.Tensor
    x0_hat: torch.Tensor
    measurements: dict = field(default_factory=dict)
    losses: list = field(default_factory=list)


def reflow(net: torch.nn.Module, teacher, shape: Sequence[int], num_pairs: int, train_steps: int,
           pair_steps: int = 50, sampler: Optional[Callable] = None, lr: float = 1e-3, batch_size: int = 256,
           reference: Optional[torch.Tensor] = None, eval_num: int = 2000, few_steps: Sequence[int] = (1, 2),
           straightness_steps: int = 100, time_fn: Optional[Callable] = None,
           generator: Optional[torch.Generator] = None, **cond) -> ReflowResult:
    """One round of reflow: pairs from the ``teacher``'s ODE, then a copy of ``net`` retrained on them.

    Args:
        net: the network to warm-start the new rectified flow from (copied, never modified); for
            ``k``-rectified flow pass the ``(k−1)``-flow's network with its denoiser as ``teacher``.
        teacher: the denoiser whose ODE generates the pairs (any path and target, e.g. a DDPM model).
        shape: data shape without the batch dim; num_pairs: pair count; train_steps: AdamW steps.
        pair_steps, sampler: the solver making the pairs (:func:`reflow_pairs`).
        reference: held-out data ``(N, *shape)``; when given, ``sw2`` at ``few_steps`` Euler steps is measured.
            Pairs, training and measurements run on ``net``'s device.
        eval_num, straightness_steps: noise draws and solver steps for the measurements.
        time_fn: the new network's time map (:func:`rectified_flow_denoiser`).
        **cond: per-pair (``num_pairs`` rows) or shared conditioning; measurements use its first ``eval_num`` rows.
    Returns: :class:`ReflowResult`; the new model is :func:`rectified_flow_denoiser` of the retrained copy.
    """
    if eval_num > num_pairs and any(isinstance(v, torch.Tensor) and v.ndim > 0 and v.shape[0] == num_pairs
                                    for v in cond.values()):
        raise ValueError(f"eval_num ({eval_num}) cannot exceed num_pairs ({num_pairs}) with per-pair conditioning")
    device = next(net.parameters()).device
    eps, x0_hat = reflow_pairs(teacher, num_pairs, shape, sampler, pair_steps, generator, device=device, **cond)
    denoiser = rectified_flow_denoiser(copy.deepcopy(net), time_fn)
    losses = fit_velocity(denoiser, pair_batches(eps, x0_hat, **cond), train_steps, lr, batch_size, generator)

    eval_eps = randn((eval_num, *shape), generator, device)
    eval_cond = index_cond(cond, torch.arange(min(eval_num, num_pairs), device=device), num_pairs)
    measurements = {}
    for name, model in (("before", teacher), ("after", denoiser)):
        m = {"straightness": straightness(model, eval_eps, straightness_steps, **eval_cond)}
        if reference is not None:
            m["sw2"] = few_step_sw2(model, eval_eps, reference, few_steps, **eval_cond)
        measurements[name] = m
    return ReflowResult(denoiser.net, denoiser, eps, x0_hat, measurements, losses)
