"""Velocity regression for small models — flow matching, reflow and one-step distillation (SPEC §6) — on the
engine, in memory.

:class:`VelocityObjective` minimises the conditional flow-matching loss ``E ||v_θ(x_t, t) − (ȧ x0 + ṡ ε)||²``
(:func:`~difflab.flows.flow_matching_loss`) on batches from a ``sample_batch_fn``: fresh data (independent or
minibatch-OT coupling), or fixed ``(ε, x̂0)`` pairs (reflow, where the pair replaces the independent coupling,
Liu et al. 2023 §3), optionally at one time only (``t = t_max``: one-step distillation). :func:`fit_velocity`
runs it with AdamW and a cosine learning-rate decay to zero, no clipping and no EMA, and returns the loss per step.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from difflab.engine.loop import Engine, Objective, Settings, Trainable, cosine_decay
from difflab.flows import FlowBatch, flow_matching_loss
from difflab.parameterization import NetworkDenoiser


class VelocityObjective(Objective):
    """CFM on ``denoiser.path`` for ``denoiser.net`` (module ``net``); see the module docstring.

    The draws come from the engine's per-step generator, or from ``generator`` when one is given: one sequential
    stream owned by the caller (an in-memory fit, which is never resumed, keeps the caller's randomness).
    """

    def __init__(self, denoiser: NetworkDenoiser, sample_batch_fn: Callable, steps: int, lr: float, batch_size: int,
                 coupling: Optional[str] = None, t_value: Optional[float] = None, weight_decay: float = 0.0,
                 generator: Optional[torch.Generator] = None):
        self.denoiser, self.sample_batch_fn, self.batch_size = denoiser, sample_batch_fn, batch_size
        self.generator = generator
        self.coupling, self.t_value = coupling, t_value
        self.trainables = {"net": Trainable(denoiser.net, lr=lr, weight_decay=weight_decay,
                                            schedule=cosine_decay(steps))}

    def step(self, ctx) -> dict:
        gen = ctx.generator if self.generator is None else self.generator
        batch = self.sample_batch_fn(self.batch_size, gen)
        if isinstance(batch, torch.Tensor):
            batch = FlowBatch(batch)
        if batch.eps is not None and self.coupling is not None:
            raise ValueError("fixed (noise, data) pairs already define the coupling; use coupling=None")
        t = None if self.t_value is None else float(self.t_value)
        with ctx.autocast():
            loss = flow_matching_loss(self.denoiser, batch.x0, self.coupling, batch.eps, t, gen,
                                      **(batch.cond or {})).mean()
        ctx.optimize("net", loss)
        return {"loss": loss.detach()}


def fit_velocity(denoiser: NetworkDenoiser, sample_batch_fn: Callable, steps: int, lr: float = 1e-3,
                 batch_size: int = 256, generator: Optional[torch.Generator] = None, coupling: Optional[str] = None,
                 t_value: Optional[float] = None, weight_decay: float = 0.0) -> list:
    """Train ``denoiser.net`` in place with the CFM loss on ``denoiser.path``; returns the loss per step.

    Args:
        denoiser: ``NetworkDenoiser(net, path, target="velocity", time_fn=…)`` — the path and the network's
            time map travel with it (difflab's networks use ``networks.network_time_fn(path)``).
        sample_batch_fn: ``(batch_size, generator) -> x0`` tensor or :class:`~difflab.flows.FlowBatch` (fixed pairs
            carry their ``eps``: reflow training, where the pair replaces the independent coupling).
        generator: the random stream of the batches, ``t`` and ``ε`` (drawn in turn, step after step); None uses
            the engine's per-step generators of seed 0 (:mod:`difflab.engine.stream`).
        coupling: ``None`` or ``"ot"`` (:func:`~difflab.flows.flow_matching_loss`); must be ``None`` with fixed pairs.
        t_value: train at this single time only (``path.t_max`` gives one-step distillation); else uniform.
    Raises: :class:`~difflab.engine.TrainingError` when the loss, a gradient or a weight stops being finite.
    """
    if steps < 1:
        raise ValueError(f"steps must be positive, got {steps}")
    objective = VelocityObjective(denoiser, sample_batch_fn, steps, lr, batch_size, coupling, t_value, weight_decay,
                                  generator)
    losses = []
    settings = Settings(steps=steps, batch_size=batch_size, log_every=steps, divergence_factor=0.0)
    Engine(objective, settings, on_step=lambda step, metrics: losses.append(metrics["loss"])).fit()
    denoiser.net.eval()
    return losses
