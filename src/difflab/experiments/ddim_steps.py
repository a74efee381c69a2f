"""Experiment ``ddim-steps``: DDPM with all T steps vs DDIM with T/100/50/20/10 — quality, NFE and wall time
(the paper's experiment 3; SPEC §3 ancestral sampling, §5 DDIM, §8 metrics).

Two parts:

1. **A trained model** (``run_dir``, or the built-in two-moons run trained first): the same ``x_T`` for
   every sampler; quality is the data kind's headline metric (sliced W2 for points, FD-<dataset> for
   images) next to its real-vs-real noise floor; wall time is the whole sampling call on this machine.
2. **The exact 16-D Gaussian bed** (:func:`difflab.testbeds.gaussian_bed`, condition number 100, linear
   schedule, T = 1000): the model is exact, so what is left is the sampler's own error. Deterministic
   DDIM's output is exactly Gaussian (affine push-forward), so its KL to the data is exact; DDPM's is a
   Monte-Carlo KL of a fitted Gaussian, next to the same estimate for as many exact data samples (its floor).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from difflab.experiments.common import exact_kl, line_plot, provenance, quality, reference_for, \
    sample_panels, series_by, timed, trained_or_built_in
from difflab.experiments.report import Report

DDIM_STEPS = (1000, 100, 50, 20, 10)
BED_T = 1000


def step_list(T: int, steps=DDIM_STEPS) -> list:
    """DDIM step counts: ``T`` itself, then those of ``steps`` below it (a chain cannot make more than T steps)."""
    return sorted({T, *(s for s in steps if s < T)}, reverse=True)


def trained_model_part(report: Report, pipe, num: int, seed: int) -> list:
    ref = reference_for(pipe.config)
    num = min(num, ref.max_samples())
    path = pipe.path
    T = path.T if getattr(path, "discrete", False) else max(DDIM_STEPS)
    rows, panels = [], []
    for sampler, steps in [("ddpm", T)] + [("ddim", s) for s in step_list(T)]:
        out, wall = timed(pipe.sample, num, sampler=sampler, steps=steps, seed=seed, progress=False)
        q = quality(out.x, ref, seed)
        rows.append({"sampler": sampler.upper(), "steps": steps, "NFE": out.nfe, "wall [s]": wall,
                     "ms per sample": 1e3 * wall / num, q["metric"]: q["value"], "noise floor": q["noise_floor"],
                     "n": q["n_samples"]})
        panels.append((f"{sampler.upper()} {steps} steps: {q['metric']} {q['value']:.3g}", out.x))
    metric = ref.metric
    report.text(f"{num} samples per sampler from the same seed ({seed}); reference: {ref.description} "
                f"({ref.x.shape[0]} examples). {metric} is computed on {rows[0]['n']} samples against one half of "
                f"the reference; the noise floor is the other half against that half (SPEC §8). "
                f"Wall time: the whole sampling call on this machine (see the end of the report); on a shared machine "
                f"other jobs inflate it, so compare it with NFE and between rows of one run only.")
    report.table(rows, key="trained_model")
    names = {"DDIM": "DDIM (η = 0)", "DDPM": "DDPM (ancestral)"}
    line_plot(report.path("quality_vs_nfe.png"), series_by(rows, "sampler", "NFE", metric, names),
              "network evaluations per sample (NFE)", f"{metric} [{ref.unit}]",
              "Sample quality vs NFE (lower is better)", logx=True,
              hlines={"real vs real noise floor": rows[0]["noise floor"]})
    line_plot(report.path("time_vs_nfe.png"), series_by(rows, "sampler", "NFE", "wall [s]", names),
              "network evaluations per sample (NFE)", f"wall time for {num} samples [s]",
              "Sampling time vs NFE", logx=True, logy=True)
    report.image("quality_vs_nfe.png", f"{metric} vs NFE; dashed: the real-vs-real noise floor")
    report.image("time_vs_nfe.png", "wall time vs NFE")
    if ref.kind == "image" or out.x[0].numel() == 2:
        sample_panels(report.path("samples.png"), panels, reference=ref.x if ref.kind == "points" else None)
        report.image("samples.png", "samples of each sampler from the same x_T (grey: held-out data)")
    return rows


def exact_bed_part(report: Report, quick: bool, seed: int) -> list:
    from difflab.paths import DiscretePath
    from difflab.samplers import sample_ddim, sample_ddpm
    from difflab.testbeds import fit_gaussian, gaussian_bed

    bed = gaussian_bed(16, condition=100.0, seed=0)
    path = DiscretePath.from_schedule("linear", T=BED_T)
    den = bed.denoiser(path)
    prior_std = path.prior_std()
    ddim_steps = step_list(100 if quick else BED_T)
    ddpm_steps = 100 if quick else BED_T
    n_mc = 500 if quick else 4000
    rows = []
    for steps in ddim_steps:
        kl, wall = timed(exact_kl, bed, lambda x: sample_ddim(den, x, steps=steps).x, prior_std)
        rows.append({"sampler": "DDIM", "steps": steps, "NFE": steps, "KL [nats]": kl, "method": "exact",
                     "MC floor [nats]": "", "wall [s]": wall})
    g = torch.Generator().manual_seed(seed)
    x_T = path.prior_sample((n_mc, bed.D), g, dtype=torch.float64)
    out, wall = timed(sample_ddpm, den, x_T, steps=ddpm_steps, generator=g)
    floor = float(bed.kl_from_gaussian(*fit_gaussian(bed.sample(n_mc, g, dtype=torch.float64))))
    rows.insert(0, {"sampler": "DDPM", "steps": ddpm_steps, "NFE": out.nfe,
                    "KL [nats]": float(bed.kl_from_gaussian(*fit_gaussian(out.x))),
                    "method": f"Monte Carlo, n = {n_mc}",
                    "MC floor [nats]": floor, "wall [s]": wall})
    report.heading("Exact 16-D Gaussian bed")
    report.text(f"The exact denoiser of a 16-D Gaussian (eigenvalues log-spread over a factor 100) on the linear "
                f"schedule with T = {BED_T}: a perfect model, so the KL is the sampler's own error. DDIM (η = 0) is "
                f"affine in x_T here, so its output Gaussian and KL are exact (17 probe points; wall time is for "
                f"those). DDPM is stochastic: KL of a Gaussian fitted to {n_mc} samples, whose bias is shown by the "
                f"floor (the same estimate for {n_mc} exact data samples).")
    report.table(rows, key="exact_bed")
    ddim = [r for r in rows if r["sampler"] == "DDIM"]
    line_plot(report.path("bed_kl_vs_nfe.png"),
              {"DDIM (exact KL)": ([r["NFE"] for r in ddim], [r["KL [nats]"] for r in ddim]),
               f"DDPM (Monte-Carlo KL, n = {n_mc})": ([rows[0]["NFE"]], [rows[0]["KL [nats]"]])},
              "network evaluations per sample (NFE)", "KL(sampler output ‖ data) [nats]",
              "Exact 16-D Gaussian bed: sampler error vs NFE", logx=True, logy=True,
              hlines={f"Monte-Carlo floor, n = {n_mc}": floor})
    report.image("bed_kl_vs_nfe.png", "KL to the data vs NFE on the exact bed")
    return rows


def run(out_dir, run_dir: Optional[str] = None, quick: bool = False, seed: int = 0,
        num_samples: Optional[int] = None) -> Path:
    """Write ``report.md``, ``results.json`` and the figures into ``out_dir``; returns the report's path.

    ``num_samples`` per sampler defaults to 2000 (300 with ``quick``), capped at half the reference set.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    report = Report(out_dir, "DDPM vs DDIM: quality, NFE and time by number of steps")
    report.heading("Trained model")
    pipe = trained_or_built_in(run_dir, out_dir, quick, seed, report)
    trained_model_part(report, pipe, num_samples or (300 if quick else 2000), seed)
    exact_bed_part(report, quick, seed)
    provenance(report, started)
    return report.write()
