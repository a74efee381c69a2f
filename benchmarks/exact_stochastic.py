"""Exact KL of the stochastic samplers on the 16-D Gaussian beds, with no sampling noise (SPEC §3, §5, §6, §8).

On a single-Gaussian bed the exact denoiser is affine in ``x_t``, so every DDPM, DDIM (η = 1), Euler–Maruyama and
ancestral step is affine in the state plus independent Gaussian noise; the output law is Gaussian and
:func:`difflab.testbeds.chain_pushforward` propagates its mean and covariance step by step from the prior
``N(0, s_T² I)``, so ``KL(output ‖ data)`` is exact. It replaces the Monte-Carlo fits of the accuracy benchmark
(:mod:`benchmarks.accuracy`), whose own floor is 3e-3 to 7e-3 nats. Each sampler runs as the accuracy benchmark
runs it (same names): the DDPM chains on the trailing grid of the discrete path, the pipeline's ``sde``
(Euler–Maruyama) and ``ancestral`` on ``uniform_t`` of the path's continuous-time view.
"""

from __future__ import annotations

import time
from functools import partial

import torch

from benchmarks import beds
from difflab.paths import DiscreteTimeContinuation
from difflab.samplers.ancestral import ddpm_step
from difflab.samplers.ddim import ddim_step
from difflab.samplers.grids import discrete_timesteps
from difflab.samplers.sde import euler_maruyama_step
from difflab.samplers.time_grids import uniform_t
from difflab.testbeds import chain_pushforward

STEPS = (10, 20, 50, 100, 1000)
QUICK_STEPS = (10, 20)


def _trailing(path, steps):
    return discrete_timesteps(path.T, steps, "trailing")


# name (as in benchmarks.samplers) -> (continuous time?, grid(path, steps), chain transition)
CHAINS = {
    "DDPM β̃ trailing": (False, _trailing, ddpm_step),
    "DDPM β trailing": (False, _trailing, partial(ddpm_step, variance="beta")),
    "DDIM η=1 trailing": (False, _trailing, partial(ddim_step, eta=1.0)),
    "sde (pipeline)": (True, uniform_t, euler_maruyama_step),
    "ancestral (pipeline)": (True, uniform_t, partial(ddpm_step, variance="beta_tilde")),
}


def run(quick: bool = False, log=print) -> dict:
    path = beds.ddpm_path()
    cont = DiscreteTimeContinuation(path)
    prior_std = path.prior_std()
    steps_list = QUICK_STEPS if quick else STEPS
    out = {"steps": list(steps_list), "quick": quick, "gaussian": {}}
    gaussian_beds = dict(list(beds.GAUSSIAN_BEDS.items())[:1]) if quick else beds.GAUSSIAN_BEDS
    for bed_name, make_bed in gaussian_beds.items():
        bed = make_bed()
        start = (torch.zeros(bed.D, dtype=torch.float64), prior_std**2 * torch.eye(bed.D, dtype=torch.float64))
        t0 = time.perf_counter()
        rows = {}
        for name, (continuous, grid_fn, step) in CHAINS.items():
            p = cont if continuous else path
            points = []
            for steps in steps_list:
                tic = time.perf_counter()
                mean, cov = chain_pushforward(bed.denoiser(p), grid_fn(p, steps), step, *start)
                points.append({"steps": steps, "nfe": steps, "kl": float(bed.kl_from_gaussian(mean, cov)),
                               "method": "exact", "wall_s": time.perf_counter() - tic})
            rows[name] = {"points": points}
        out["gaussian"][bed_name] = {"dim": bed.D, "prior_floor_kl": beds.prior_floor_kl(bed, path), "samplers": rows}
        log(f"  [{bed_name}] {len(CHAINS)} stochastic samplers × {len(steps_list)} step counts, exact  "
            f"[{time.perf_counter() - t0:.0f}s]")
    return out
