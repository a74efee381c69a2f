"""Sampler accuracy per NFE on the exact test beds, for every difflab sampler (:data:`DIFFLAB_SAMPLERS`).

- 16-D Gaussian beds (condition numbers 1e2 and 1e4): exact ``KL(output ‖ data)`` for deterministic samplers,
  Monte-Carlo KL (with its floor) for stochastic ones, next to the prior floor (:mod:`benchmarks.beds`).
- 2-D four-blob mixture: sliced W2 of ``n`` samples to ``n`` data samples, with the data-vs-data floor.

The model is the bed's exact ε on the DDPM linear schedule (T = 1000), so every number is the sampler's own
error. NFE is the count each sampler reports; a sampler whose step costs several evaluations gets the most
steps that fit the budget.
"""

from __future__ import annotations

import time

import torch

from benchmarks import beds
from benchmarks.samplers import DIFFLAB_SAMPLERS, run_spec

NFE = (4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 100)
QUICK_NFE = (10, 20)
MIXTURE_NFE = (5, 10, 20, 50, 100)
QUICK_MIXTURE_NFE = (10,)


def run(quick: bool = False, log=print) -> dict:
    gen = torch.Generator().manual_seed(0)
    n_mc = 2000 if quick else 4000
    n_mix = 500 if quick else 4000
    nfes = QUICK_NFE if quick else NFE
    path = beds.ddpm_path()
    prior_std = path.prior_std()
    out = {"nfe": list(nfes), "n_monte_carlo": n_mc, "quick": quick, "gaussian": {}, "mixture": {}}
    gaussian_beds = dict(list(beds.GAUSSIAN_BEDS.items())[:1]) if quick else beds.GAUSSIAN_BEDS
    for bed_name, make_bed in gaussian_beds.items():
        bed = make_bed()
        t0 = time.perf_counter()
        rows = {}
        for spec in DIFFLAB_SAMPLERS:
            points = []
            for nfe in nfes:
                used = []

                def sampler(x_T, spec=spec, nfe=nfe, used=used):
                    result = run_spec(spec, bed, path, x_T, nfe, gen)
                    used.append(result.nfe)
                    return result.x

                score = beds.score_on_gaussian_bed(bed, sampler, spec.deterministic, prior_std, n_mc, gen)
                points.append(dict(target_nfe=nfe, nfe=used[-1], **score))
            rows[spec.name] = {"deterministic": spec.deterministic, "points": points}
        out["gaussian"][bed_name] = {
            "dim": bed.D, "eigenvalues": [float(bed.eigvals[0].min()), float(bed.eigvals[0].max())],
            "prior_floor_kl": beds.prior_floor_kl(bed, path),
            "monte_carlo_floor_kl": beds.monte_carlo_kl_floor(bed, n_mc, gen), "samplers": rows}
        log(f"  [{bed_name}] {len(DIFFLAB_SAMPLERS)} samplers × {len(nfes)} NFE  [{time.perf_counter() - t0:.0f}s]")
    for bed_name, make_bed in beds.MIXTURE_BEDS.items():
        bed = make_bed()
        t0 = time.perf_counter()
        rows = {}
        for spec in DIFFLAB_SAMPLERS:
            points = []
            for nfe in (QUICK_MIXTURE_NFE if quick else MIXTURE_NFE):
                x_T = path.prior_sample((n_mix, bed.D), gen, dtype=torch.float64)
                result = run_spec(spec, bed, path, x_T, nfe, gen)
                points.append(dict(target_nfe=nfe, nfe=result.nfe, **beds.sliced_w2_with_floor(bed, result.x, gen)))
            rows[spec.name] = {"deterministic": spec.deterministic, "points": points}
        out["mixture"][bed_name] = {"n": n_mix, "samplers": rows}
        log(f"  [{bed_name}] sliced W2 with n = {n_mix}  [{time.perf_counter() - t0:.0f}s]")
    return out
