"""The reverse chain with a pluggable transition (SPEC §3, §5).

A *transition* is a plain function ``step(path, x, pred, t, t_next, generator) -> x_next`` that maps
the state at ``t`` and the denoiser's :class:`~difflab.parameterization.Prediction` there to the state
at ``t_next < t``. DDPM's posterior draw, DDIM's update and (later) a GAN generator step or an ODE/SDE
solver step are all transitions; :func:`sample_chain` runs any of them over any time grid.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from tqdm.auto import tqdm

from difflab.utils import constant_time


class Samples(NamedTuple):
    """What every sampler returns: the samples and the number of network evaluations it made."""

    x: torch.Tensor
    nfe: int


def denoiser_cost(denoiser) -> int:
    """Network evaluations made by the denoiser's last call.

    A plain network or test bed costs 1; a wrapper that evaluates the network more than once per call
    (classifier-free guidance: conditional + unconditional, even when batched into one pass) sets
    ``last_nfe`` after each call so that samplers count honestly.
    """
    return int(getattr(denoiser, "last_nfe", 1))


def time_tensor(t, batch: int, device) -> torch.Tensor:
    """A grid value as a ``[B]`` tensor keeping its dtype (``long`` discrete, ``float64`` continuous).

    For a Python number this is :func:`~difflab.utils.constant_time`: a cached read-only broadcast tagged
    with the value, so that :func:`difflab.paths.shared_time` finds it without reading the device and the
    path's coefficients are computed once per step as scalars.
    """
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return torch.as_tensor(t, device=device).expand(batch)
    device = device if isinstance(device, torch.device) else torch.device(device)
    return constant_time(t, batch, device, torch.float64 if isinstance(t, float) else torch.long)


@torch.no_grad()
def sample_chain(denoiser, x: torch.Tensor, timesteps: torch.Tensor, step: Callable,
                 generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
                 progress: bool = False, **cond) -> Samples:
    """Run ``x_{t_{i+1}} = step(path, x_{t_i}, denoiser(x_{t_i}, t_i), t_i, t_{i+1})`` along ``timesteps``.

    Args:
        denoiser: ``denoiser(x, t, **cond) -> Prediction`` with a ``path`` attribute.
        x: the starting state at ``timesteps[0]`` (any shape ``(B, ...)``), e.g. a prior draw.
        timesteps: decreasing 1-D grid; ``len(timesteps) − 1`` transitions are made.
        step: the transition function.
        generator: the only source of randomness for stochastic transitions.
        callback: called after each transition with ``{"i", "t", "t_next", "x", "x0_hat"}``.
        progress: show a progress bar.
        **cond: conditioning passed unchanged to every denoiser call (``y=``, ``context=`` …).
    Returns: :class:`Samples` ``(x, nfe)``.
    """
    path, batch = denoiser.path, x.shape[0]
    nfe = 0
    grid = timesteps.tolist()
    pairs = list(zip(grid[:-1], grid[1:]))
    path.tabulate(grid, pairs=True)  # every step's coefficients in one vectorised call
    for i, (t, t_next) in enumerate(tqdm(pairs, disable=not progress, desc="sampling", leave=False)):
        t_b, t_next_b = time_tensor(t, batch, x.device), time_tensor(t_next, batch, x.device)
        pred = denoiser(x, t_b, **cond)
        nfe += denoiser_cost(denoiser)
        x = step(path, x, pred, t_b, t_next_b, generator)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "x0_hat": pred.x0})
    return Samples(x, nfe)
