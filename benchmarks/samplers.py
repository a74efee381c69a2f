"""difflab's samplers as the benchmarks run them: one :class:`SamplerSpec` line per sampler.

A spec says which path its denoiser lives on (``"discrete"``: the DDPM chain's integer steps;
``"continuous"``: the same schedule in continuous time through
:func:`difflab.paths.smooth_continuation`, a spline exact at every integer step), whether it is deterministic,
and how to spend a budget of ``nfe`` network evaluations (``run(denoiser, x_T, nfe, generator) -> Samples``;
the benchmarks report the NFE the sampler itself counted). Adding a sampler to every benchmark is adding
one line to :data:`DIFFLAB_SAMPLERS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from difflab.samplers import Samples, sample_ddim, sample_ddpm


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    path: str  # "discrete" | "continuous"
    deterministic: bool
    run: Callable[..., Samples]  # run(denoiser, x_T, nfe, generator) -> Samples


def steps_for_budget(nfe: int, evals_per_step: int) -> int:
    """Grid steps whose cost fits ``nfe`` when each step costs ``evals_per_step`` and the clean step 1."""
    return max(1, (nfe - 1) // evals_per_step + 1)


DIFFLAB_SAMPLERS: list[SamplerSpec] = [
    SamplerSpec("DDIM trailing", "discrete", True, lambda d, x, n, g: sample_ddim(d, x, steps=n, spacing="trailing")),
    SamplerSpec("DDIM linspace", "discrete", True, lambda d, x, n, g: sample_ddim(d, x, steps=n, spacing="linspace")),
    SamplerSpec("DDIM leading", "discrete", True, lambda d, x, n, g: sample_ddim(d, x, steps=n, spacing="leading")),
    SamplerSpec("DDPM β̃ trailing", "discrete", False, lambda d, x, n, g: sample_ddpm(d, x, steps=n, generator=g)),
    SamplerSpec("DDPM β trailing", "discrete", False,
                lambda d, x, n, g: sample_ddpm(d, x, steps=n, variance="beta", generator=g)),
    SamplerSpec("DDIM η=1 trailing", "discrete", False, lambda d, x, n, g: sample_ddim(d, x, steps=n, eta=1.0, generator=g)),
]


GRID_NAMES = ("logSNR", "karras", "uniform-t")
DEFAULT_NAME = "deis optimised (default)"


def _ode_spec(solver_name: str, grid_name: str) -> SamplerSpec:
    from difflab.samplers import ode, time_grids

    solver, per_step = ode.ODE_SOLVERS[solver_name], ode.EVALS_PER_STEP[solver_name]
    grid = {"logSNR": time_grids.uniform_log_snr, "karras": time_grids.karras, "uniform-t": time_grids.uniform_t}[grid_name]
    options = {"order": time_grids.DEIS_ORDER} if solver_name == "deis" else {}

    def run(denoiser, x, nfe, generator):
        return solver(denoiser, x, grid(denoiser.path, steps_for_budget(nfe, per_step)), **options)

    return SamplerSpec(f"{solver_name} {grid_name}", "continuous", True, run)


def _default_spec() -> SamplerSpec:
    """difflab's default for a budget: DEIS of order ``DEIS_ORDER`` on ``default_grid(path, nfe, "deis")``."""
    from difflab.samplers import ode, time_grids

    def run(denoiser, x, nfe, generator):
        grid = time_grids.default_grid(denoiser.path, nfe, "deis")
        return ode.sample_deis(denoiser, x, grid, order=time_grids.DEIS_ORDER)

    return SamplerSpec(DEFAULT_NAME, "continuous", True, run)


def _pipeline_spec(name: str) -> SamplerSpec:
    """A stochastic sampler as ``difflab sample --sampler NAME`` runs it (its own default grid)."""
    from difflab.pipeline import SAMPLERS

    return SamplerSpec(f"{name} (pipeline)", "discrete", False,
                       lambda d, x, n, g: SAMPLERS[name](d, x, n, generator=g))


DIFFLAB_SAMPLERS += [_default_spec()]
DIFFLAB_SAMPLERS += [_ode_spec(solver, grid) for solver in ("deis", "dpmpp2m", "euler", "heun", "rk4")
                     for grid in GRID_NAMES]
DIFFLAB_SAMPLERS += [_pipeline_spec(name) for name in ("sde", "pc", "ancestral")]


def _sample_default_spec() -> SamplerSpec:
    """``difflab sample``'s default sampler (:func:`difflab.pipeline.run_default`: DEIS order 3, ρ = 7 grid capped
    at σ̄ = 80)."""
    from difflab.pipeline import run_default

    return SamplerSpec("default (difflab sample)", "continuous", True, lambda d, x, n, g: run_default(d, x, n))


DIFFLAB_SAMPLERS += [_sample_default_spec()]


def denoiser_for(spec: SamplerSpec, bed, discrete_path):
    """The bed's exact denoiser on the path the sampler expects (the same schedule either way)."""
    if spec.path == "discrete":
        return bed.denoiser(discrete_path)
    from difflab.paths import smooth_continuation

    return bed.denoiser(smooth_continuation(discrete_path))


def run_spec(spec: SamplerSpec, bed, discrete_path, x_T: torch.Tensor, nfe: int, generator=None) -> Samples:
    return spec.run(denoiser_for(spec, bed, discrete_path), x_T, nfe, generator)
