"""Fit the noise-level tables behind :func:`difflab.samplers.time_grids.optimized_grid` (SPEC §6).

    python -m benchmarks.fit_grids --nfe 4 5 6 8 10 12 15 20

For each budget, :func:`~difflab.samplers.time_grids.optimize_sigmas` minimises the exact KL of DEIS (order
:data:`~difflab.samplers.time_grids.DEIS_ORDER`) summed over the *fitting family*
(:func:`~difflab.samplers.time_grids.family_bed`: 1-D Gaussians, variances log-spread over 10^±2.2, means 0 and
0.5) on the DDPM linear schedule (T = 1000) in continuous time, warm-started from the previous budget's optimum
resampled. The family is not an evaluation bed: the benchmarks score the grids on the rotated 16-D Gaussians of
:mod:`benchmarks.beds` (other eigenvalues, other means). Prints the table as Python to paste into
``time_grids.OPTIMIZED_SIGMAS``, with each fit's family KL and the log-SNR-uniform grid's for comparison.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.beds import ddpm_path
from difflab.paths import DiscreteTimeContinuation
from difflab.samplers import time_grids as tg
from difflab.samplers.ode import sample_deis


def family_kl_of_grid(path, grid, order: int) -> float:
    bed = tg.family_bed()
    den = bed.denoiser(path)
    return tg.family_kl(lambda x: sample_deis(den, x, grid, order=order).x, bed, path.prior_std())


def fit(nfes, order: int, maxiter: int, log=print) -> dict:
    path = DiscreteTimeContinuation(ddpm_path())
    table: dict = {}
    for nfe in sorted(nfes):
        start = time.perf_counter()
        init = tg._table_knots(nfe, table) if table and nfe > 2 else None
        table[nfe] = tg.optimize_sigmas(path, nfe, order=order, maxiter=maxiter, init=init)
        fitted = family_kl_of_grid(path, tg.optimized_grid(path, nfe, table=table, table_range=tg.noise_range(path)), order)
        log_snr = family_kl_of_grid(path, tg.uniform_log_snr(path, nfe), order)
        log(f"# nfe {nfe}: family KL {fitted:.3e} (log-SNR-uniform grid {log_snr:.3e})  [{time.perf_counter() - start:.0f}s]")
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10, 12, 15, 20])
    parser.add_argument("--order", type=int, default=tg.DEIS_ORDER)
    parser.add_argument("--maxiter", type=int, default=200)
    args = parser.parse_args(argv)
    table = fit(args.nfe, args.order, args.maxiter, log=lambda m: print(m, flush=True))
    path = DiscreteTimeContinuation(ddpm_path())
    print(f"OPTIMIZED_RANGE = {tg.noise_range(path)!r}")
    print("OPTIMIZED_SIGMAS = {")
    for nfe, sigmas in table.items():
        print(f"    {nfe}: ({', '.join(f'{s:.6g}' for s in sigmas)}),")
    print("}")


if __name__ == "__main__":
    main()
