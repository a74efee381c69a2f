"""The continuous-time view of a DDPM schedule, old against new, on the exact Gaussian beds (SPEC §2, §6).

:class:`~difflab.paths.DiscreteTimeContinuation` (log-SNR linear between integer steps: a kink at every step) and
:class:`~difflab.paths.SplineTimeContinuation` (a cubic spline of ``log ᾱ`` through every step: smooth), both exact
at integer steps, on the DDPM linear schedule (T = 1000) with each bed's exact denoiser, so every number is the
solver's own error. Reported: adaptive Dormand–Prince at tolerances 1e-5, 1e-7, 1e-9 (NFE and exact KL of the
output to the data), and the fixed-step solvers on their default grids at 5–100 evaluations (exact KL). The
exponential integrators (DPM-Solver++ 2M, DEIS) use only ``a`` and ``s`` at the grid's noise levels, so they give
the same numbers on both views; they are listed once.

    python -m benchmarks.continuation --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import beds

TOLERANCES = (1e-5, 1e-7, 1e-9)
NFE = (5, 9, 10, 20, 50, 100)


def run(log=print) -> dict:
    from difflab.paths import DiscreteTimeContinuation, SplineTimeContinuation
    from difflab.samplers import ode, time_grids

    torch.set_num_threads(1)
    discrete = beds.ddpm_path()
    out = {"command": "python -m benchmarks.continuation --out benchmarks/results", "beds": {}}
    for bed_name, make in beds.GAUSSIAN_BEDS.items():
        bed = make()
        rows = {"prior_floor_kl": beds.prior_floor_kl(bed, discrete)}
        for cls in (DiscreteTimeContinuation, SplineTimeContinuation):
            path = cls(discrete)
            den = bed.denoiser(path)
            view = {"rk45": []}
            for tol in TOLERANCES:
                used, start = [], time.perf_counter()

                def solve(x, tol=tol, used=used):
                    result = ode.sample_rk45(den, x, time_grids.default_grid(path, 1, "rk45"), rtol=tol, atol=tol)
                    used.append(result.nfe)
                    return result.x

                kl = beds.exact_kl(bed, solve, 1.0)
                view["rk45"].append({"tol": tol, "nfe": used[-1], "kl": kl, "wall_s": time.perf_counter() - start})
            for solver in ("heun", "rk4", "dpmpp2m", "deis"):
                if solver in ("dpmpp2m", "deis") and cls is DiscreteTimeContinuation:
                    continue
                options = {"order": time_grids.DEIS_ORDER} if solver == "deis" else {}
                view[solver] = [{"nfe": n, "kl": beds.exact_kl(bed, lambda x, n=n: ode.ODE_SOLVERS[solver](
                    den, x, time_grids.default_grid(path, n, solver), **options).x, 1.0)} for n in NFE]
            rows[cls.__name__] = view
            log(f"  [{bed_name}] {cls.__name__}: rk45 NFE " + ", ".join(str(r["nfe"]) for r in view["rk45"]))
        out["beds"][bed_name] = rows
    return out


def markdown(result: dict) -> str:
    lines = ["# Continuous time for a DDPM schedule: piecewise-linear log-SNR vs cubic spline of log ᾱ", "",
             f"Made by `{result['command']}`. Exact KL (nats) of the samplers' output to the bed's data; the model is "
             "the bed's exact denoiser on the DDPM linear schedule (T = 1000) seen in continuous time.", ""]
    for bed_name, rows in result["beds"].items():
        lines += [f"## {bed_name} (prior floor {rows['prior_floor_kl']:.2e})", "",
                  "| rk45 tolerance | linear log-SNR: NFE | KL | spline: NFE | KL |", "| --- | --- | --- | --- | --- |"]
        old, new = rows["DiscreteTimeContinuation"], rows["SplineTimeContinuation"]
        for a, b in zip(old["rk45"], new["rk45"]):
            lines.append(f"| {a['tol']:g} | {a['nfe']} | {a['kl']:.3e} | {b['nfe']} | {b['kl']:.3e} |")
        lines += ["", "| solver (default grid) | view | " + " | ".join(f"NFE {n}" for n in NFE) + " |",
                  "| --- | --- | " + " | ".join("---" for _ in NFE) + " |"]
        for solver in ("heun", "rk4", "dpmpp2m", "deis"):
            for label, view in (("linear log-SNR", old), ("spline", new)):
                if solver in view:
                    lines.append(f"| {solver} | {label} | " + " | ".join(f"{p['kl']:.2e}" for p in view[solver]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run()
    result["seconds"] = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "continuation.json").write_text(json.dumps(result, indent=1))
    (args.out / "continuation.md").write_text(markdown(result))
    print(f"wrote {args.out / 'continuation.md'} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
