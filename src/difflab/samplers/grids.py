"""Time grids for the discrete reverse chain (SPEC §5).

Every grid is a strictly decreasing ``long`` tensor of ``steps + 1`` times that starts at ``T`` (the
noisiest step, where ``x_T`` is drawn from the prior) and ends at ``0`` (clean data, ``ᾱ_0 = 1``), so a
sampler on it makes exactly ``steps`` network evaluations and its last transition lands on
``x̂0`` itself. The three spacings differ only inside the grid:

- ``linspace``: ``round(linspace(T, 0, steps + 1))``, evenly spread;
- ``trailing``: ``T, T − k, T − 2k, …`` with real stride ``k = T/steps`` rounded, then ``0``;
- ``leading``: integer stride ``k = T // steps`` counted up from the bottom (``1, 1 + k, …``) as in the
  DDIM reference code, with its top pinned to ``T`` so the chain never starts below the prior.
"""

from __future__ import annotations

import torch

SPACINGS = ("linspace", "leading", "trailing")


def discrete_timesteps(T: int, steps: int, spacing: str = "trailing") -> torch.Tensor:
    """A decreasing grid ``T = t_0 > t_1 > … > t_steps = 0`` for a chain of ``steps`` transitions."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > T:
        raise ValueError(f"steps ({steps}) cannot exceed the number of diffusion steps T ({T})")
    if spacing == "linspace":
        grid = torch.linspace(T, 0, steps + 1, dtype=torch.float64).round().long()
    elif spacing == "trailing":
        grid = torch.cat([(T - torch.arange(steps, dtype=torch.float64) * T / steps).round().long(),
                          torch.zeros(1, dtype=torch.long)])
    elif spacing == "leading":
        k = T // steps
        up = 1 + k * torch.arange(steps, dtype=torch.long)  # 1, 1+k, …, 1+(steps−1)k
        up[-1] = T
        grid = torch.cat([up.flip(0), torch.zeros(1, dtype=torch.long)])
    else:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")
    if not (grid[:-1] > grid[1:]).all():  # guaranteed by construction for steps ≤ T; kept as a guard
        raise AssertionError(f"non-decreasing grid for T={T}, steps={steps}, spacing={spacing}")
    return grid
