"""Nested diffusion: anytime sampling with an inner sampler as the outer sampler's ``x̂0`` (SPEC §5;
Elata et al. 2023, "Nested Diffusion Processes for Anytime Image Generation", Alg. 1).

The outer sampler is DDIM (any η) on a coarse grid ``t_0 > t_1 > … > t_N`` (clean end last). At each outer
step its clean-data estimate is not the denoiser's one-evaluation ``x̂0`` but the *output of an inner
sampler* run from the current state ``x_{t_i}`` down to the clean end:

    x̂0_i = inner(x_{t_i}, t_i),   ε̂_i = (x_{t_i} − a_i x̂0_i)/s_i   (SPEC §4, the ε implied by x̂0),
    x_{t_{i+1}} = ddim_step(x_{t_i}; x̂0_i, ε̂_i, η)                  (SPEC §5, :func:`~difflab.samplers.ddim.ddim_step`).

Every ``x̂0_i`` is a finished sample (*anytime*): the callback receives it after each outer step, and the
last one is the output (the DDIM step onto the clean end returns ``x̂0`` itself). The budget is
``Σ_i NFE(inner at t_i)`` — ``N × M`` for an inner budget of ``M`` — counted from the inner runs.

Two exact reductions (tested): an inner sampler that is one DDIM step (``x̂0`` of the denoiser) gives DDIM on
the outer grid; one outer step (grid ``[t_max, clean end]``) gives the inner sampler itself. With an inner
sampler that draws exactly from ``q(x0 | x_t)`` (an *oracle*) and η = 1 every ``x_{t_i}`` has the exact
marginal ``p_{t_i}`` (the step is then a draw from ``q(x_{t'} | x_t, x0)``), so every anytime output is exactly
distributed as the data. The same holds for any η: the DDIM family keeps ``q(x_t | x0)``, and with a posterior draw
``x̂0`` the implied ``ε̂`` is exactly the noise of ``x_t``, independent of ``x̂0``.

Which inner sampler. That argument needs ``x̂0_i`` to be a *draw* from ``q(x0 | x_{t_i})``. A deterministic inner
run (DDIM with η = 0, any ODE solver) returns one point instead — the end of the probability-flow path through
``x_{t_i}`` — whose implied ``ε̂`` is not independent of it, and the outer states drift away from ``p_t``. On the
16-D Gaussian bed (exact denoiser, outer η = 0, 10 outer × 10 inner DDIM steps) the exact KL of the anytime outputs
goes 0.82 → 0.26 (outer step 4) → 5.0 nats (last); with a stochastic inner run (DDIM η = 1) it falls at every
outer step, 1.50 → 0.06 nats (Monte Carlo, n = 20000; ``tests/test_nested.py``). Elata et al.'s code uses an
inner η of 0.85 (:data:`difflab.pipeline.NESTED_INNER_ETA`).

Inner samplers. An *inner sampler* is ``inner(denoiser, x_t, t, generator=None, **cond) -> Samples(x̂0, nfe)``
with ``t`` the outer time (a Python number shared by the batch). :func:`inner_sampler` makes one from any
difflab sampler ``sample_fn(denoiser, x, timesteps=…, generator=…, **cond) -> Samples`` (DDIM, the ODE solvers,
the SDE samplers, :func:`sample_nested` itself) by running it on :func:`sub_grid` from ``t`` to the clean end;
:func:`oracle_inner` makes one from an exact posterior sampler ``oracle(x_t, t, generator=None, **cond) -> x0``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm

from difflab.parameterization import Prediction, to_x0_eps
from difflab.samplers.chain import Samples, time_tensor
from difflab.samplers.ddim import ddim_step
from difflab.samplers.grids import discrete_timesteps

InnerSampler = Callable[..., Samples]
"""``inner(denoiser, x_t, t, generator=None, **cond) -> Samples(x̂0, nfe)``: a sample of the clean end from ``x_t``."""

OracleSampler = Callable[..., torch.Tensor]
"""``oracle(x_t, t, generator=None, **cond) -> x0``: an exact draw from ``q(x0 | x_t)`` at path time ``t`` (a Python
number shared by the batch; ``cond`` e.g. ``y=`` labels), shaped like ``x_t``. Costs no network evaluation."""


@torch.no_grad()
def sample_nested(denoiser, x: torch.Tensor, timesteps, inner: InnerSampler, eta: float = 0.0,
                  generator: Optional[torch.Generator] = None, callback: Optional[Callable] = None,
                  progress: bool = False, **cond) -> Samples:
    """Nested diffusion from ``x = x_{t_0}`` (module docstring; SPEC §5).

    Args:
        denoiser: ``denoiser(x, t, **cond) -> Prediction`` with a ``path``; passed unchanged to ``inner`` (so a
            guided denoiser guides every inner step).
        x: the starting state at ``timesteps[0]``, any shape ``(B, ...)``.
        timesteps: the outer grid, strictly decreasing, ending at the clean end (``s = 0``).
        inner: the inner sampler (:data:`InnerSampler`; e.g. ``inner_sampler(sample_ddim, 10)``).
        eta: the outer DDIM's stochasticity, 0 (deterministic) … 1 (DDPM posterior variance).
        generator: the only source of randomness (outer noise for η > 0, and the inner sampler's).
        callback: called after each outer step with ``{"i", "t", "t_next", "x", "x0_hat", "nfe"}``: ``x0_hat``
            the anytime output ``(B, ...)`` and ``nfe`` the evaluations made so far.
        **cond: conditioning passed unchanged to every inner run.
    Returns: :class:`~difflab.samplers.chain.Samples` ``(x0, nfe)`` with ``x0`` the last anytime output.
    """
    if eta < 0:
        raise ValueError(f"eta must be non-negative, got {eta}")
    path, batch = denoiser.path, x.shape[0]
    grid = torch.as_tensor(timesteps).tolist()
    if len(grid) < 2 or any(t <= t_next for t, t_next in zip(grid[:-1], grid[1:])):
        raise ValueError("timesteps must be a strictly decreasing grid of at least two times")
    if path.coefficients_at(grid[-1])[1] != 0.0:
        raise ValueError("the outer grid must end at the clean end (s = 0), where the anytime output is the sample")
    nfe = 0
    pairs = list(zip(grid[:-1], grid[1:]))
    for i, (t, t_next) in enumerate(tqdm(pairs, disable=not progress, desc="nested", leave=False)):
        x0_hat, cost = inner(denoiser, x, t, generator=generator, **cond)
        nfe += cost
        t_b, t_next_b = time_tensor(t, batch, x.device), time_tensor(t_next, batch, x.device)
        pred = Prediction(*to_x0_eps(x0_hat.to(x.dtype), x, t_b, path, "x0"))  # ε̂ implied by (x_t, x̂0)
        x = ddim_step(path, x, pred, t_b, t_next_b, generator, eta)
        if callback is not None:
            callback({"i": i, "t": t, "t_next": t_next, "x": x, "x0_hat": pred.x0, "nfe": nfe})
    return Samples(x, nfe)


def sub_grid(path, t, steps: int) -> torch.Tensor:
    """A grid of ``steps`` transitions from ``t`` to the clean end, for an inner run (the outer grid's spacing rules).

    - discrete path: :func:`~difflab.samplers.grids.discrete_timesteps` ``(t, steps, "trailing")`` — integer steps
      ``t, …, 0``, with at most ``t`` transitions;
    - continuous path: ``t``, then noise levels evenly spaced in log-SNR from ``σ̄(t)`` (capped at
      :func:`~difflab.samplers.time_grids.noise_range`'s ``σ̄_max`` where ``a(t) = 0``) down to ``σ̄(t_min)``
      (:func:`~difflab.samplers.time_grids.log_snr_sigmas`), then the clean end (where the path has one; the
      solvers' last step onto it returns ``x̂0``).
    """
    from difflab.samplers.time_grids import log_snr_sigmas, noise_range

    if getattr(path, "discrete", False):
        t = int(t)
        return discrete_timesteps(t, min(steps, t), "trailing")
    t = float(t)
    clean = path.clean_time()
    tail = [clean] if clean is not None and clean < t else []
    sigma_min, sigma_max = noise_range(path)
    sigma_t = min(float(path.sigma_bar(torch.tensor(t, dtype=torch.float64))), sigma_max)  # σ̄ = ∞ where a = 0
    n = steps + 1 - len(tail)  # noise-level knots, t itself included
    if n <= 1 or t <= float(path.t_min) or sigma_t <= sigma_min:
        knots = torch.tensor([t], dtype=torch.float64)
    else:
        knots = path.t_from_sigma_bar(log_snr_sigmas(sigma_t, sigma_min, n))
        knots[0] = t  # the ends exactly (the inverse is exact only to rounding)
        if sigma_min == float(path.sigma_bar(torch.tensor(float(path.t_min), dtype=torch.float64))):
            knots[-1] = float(path.t_min)
    return torch.cat([knots, torch.tensor(tail, dtype=torch.float64)])


def inner_sampler(sample_fn: Callable[..., Samples], steps: int, **options) -> InnerSampler:
    """Any difflab sampler as an inner sampler: ``sample_fn(denoiser, x_t, timesteps=sub_grid(path, t, steps),
    generator=, **options, **cond)``.

    ``sample_fn`` takes the grid as ``timesteps=`` (:func:`~difflab.samplers.ddim.sample_ddim`, the solvers of
    :mod:`difflab.samplers.ode` and :mod:`difflab.samplers.sde`, :func:`sample_nested` with ``inner=`` in
    ``options``). ``steps`` is the number of inner transitions (one evaluation each for DDIM and the multistep
    solvers; the counted NFE is what the run reports).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"inner steps must be a positive integer, got {steps!r}")

    def inner(denoiser, x: torch.Tensor, t, generator: Optional[torch.Generator] = None, **cond) -> Samples:
        return sample_fn(denoiser, x, timesteps=sub_grid(denoiser.path, t, steps), generator=generator,
                         **options, **cond)

    inner.steps = steps
    return inner


def oracle_inner(oracle: OracleSampler) -> InnerSampler:
    """An exact posterior sampler (:data:`OracleSampler`) as an inner sampler: ``Samples(oracle(x_t, t), nfe=0)``."""

    def inner(denoiser, x: torch.Tensor, t, generator: Optional[torch.Generator] = None, **cond) -> Samples:
        return Samples(oracle(x, t, generator=generator, **cond), 0)

    return inner


# The split (outer steps, inner evaluations) per budget of network evaluations, chosen by ``difflab experiment nested``
# on a selection Gaussian bed (covariance seed 1) by the final output's KL: see
# benchmarks/results/experiments/nested/report.md ("The split per budget").
DEFAULT_SPLITS: dict = {20: (10, 2), 50: (5, 10), 100: (4, 25)}


def default_split(nfe: int) -> tuple:
    """``(outer, inner)`` for a budget of ``nfe`` evaluations: :data:`DEFAULT_SPLITS` at its budgets; otherwise the
    outer step count of the nearest budget there (at most ``nfe``) and ``inner = nfe // outer``."""
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"the budget must be a positive integer, got {nfe!r}")
    if nfe in DEFAULT_SPLITS:
        return DEFAULT_SPLITS[nfe]
    nearest = min(DEFAULT_SPLITS, key=lambda b: (abs(b - nfe), b))
    outer = min(DEFAULT_SPLITS[nearest][0], nfe)
    return outer, nfe // outer


class AnytimeOutputs:
    """A :func:`sample_nested` callback that keeps every anytime output (on the CPU, in its dtype), across batches.

    After sampling, :meth:`outputs` lists ``(outer step i, nfe after it, x̂0_i (num, ...))`` in step order; with
    several batches (:func:`~difflab.pipeline.generate`) the batches are concatenated in order, and ``nfe`` is the
    largest over batches (as ``generate`` reports it).
    """

    def __init__(self):
        self.x0: dict = {}
        self.nfe: dict = {}

    def __call__(self, info: dict) -> None:
        i = info["i"]
        self.x0.setdefault(i, []).append(info["x0_hat"].detach().cpu())
        self.nfe[i] = max(self.nfe.get(i, 0), int(info["nfe"]))

    def outputs(self) -> list:
        return [(i, self.nfe[i], torch.cat(self.x0[i])) for i in sorted(self.x0)]

    def save(self, out_dir, kind: str = "npz") -> list:
        """One file per outer step in ``out_dir``: ``step_{i:03d}_nfe_{n}.{png|npz}``, each written atomically
        (a temporary file in the same folder, then ``os.replace``). ``kind``: ``grid`` (images, a PNG grid),
        ``scatter`` (2-D points, a PNG) or ``npz`` (arrays ``x``, ``nfe``, ``step``). Returns the paths."""
        import numpy as np

        from difflab.plotting import save_image_grid, save_scatter

        writers = {"grid": lambda x, n, p: save_image_grid(x, p),
                   "scatter": lambda x, n, p: save_scatter(x, p, title=f"anytime output after {n} NFE"),
                   "npz": None}
        if kind not in writers:
            raise ValueError(f"unknown anytime output kind {kind!r}; choose one of {tuple(writers)}")
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for i, nfe, x in self.outputs():
            suffix = ".npz" if kind == "npz" else ".png"
            target = out_dir / f"step_{i:03d}_nfe_{nfe}{suffix}"
            if kind == "npz":
                _write_atomically(target, lambda p: np.savez(p, x=x.float().numpy(), nfe=np.array(nfe), step=np.array(i)))
            else:
                _write_atomically(target, lambda p: writers[kind](x.float(), nfe, p))
            written.append(target)
        return written


def _write_atomically(target: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``target`` (same suffix), then ``os.replace`` it into place."""
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.stem}.", suffix=target.suffix)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
