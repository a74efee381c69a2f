"""Experiment ``ode-solvers``: Euler / Heun / RK4 / DPM-Solver++(2M) / DEIS / adaptive RK45 on the
probability-flow ODE — quality vs NFE on a trained model, and exact KL vs NFE on the exact Gaussian bed
(SPEC §6 solvers, §8 metrics).

1. **Exact 16-D Gaussian bed** (condition number 100, DDPM linear schedule, T = 1000, in continuous time
   through :class:`~difflab.paths.DiscreteTimeContinuation`): the model is exact and every solver is affine
   in ``x_T``, so its output Gaussian — and its KL to the data — is exact (no sampling noise). Each solver
   runs on the grid ``difflab sample`` gives it for the budget (:func:`solver_grid`); RK45 on its tolerances.
   DDIM (η = 0) on the discrete chain is the baseline.
2. **A trained model** (``run_dir``, or the built-in two-moons run): each solver by its name in
   :data:`difflab.pipeline.SAMPLERS`, quality (sliced W2 / FD-<dataset>) vs the NFE it actually made. A
   solver missing from ``SAMPLERS`` is skipped with a note.
"""

from __future__ import annotations

import time
import inspect
from pathlib import Path
from typing import Optional

from difflab.experiments.common import exact_kl, line_plot, provenance, quality, reference_for, series_by, \
    trained_or_built_in
from difflab.experiments.report import Report

SOLVERS = ("euler", "heun", "rk4", "dpmpp2m", "deis")
ADAPTIVE = "rk45"
LABELS = {"ddim": "DDIM (η = 0)", "euler": "Euler", "heun": "Heun", "rk4": "RK4", "dpmpp2m": "DPM-Solver++(2M)",
          "deis": "DEIS (log-ρ AB3)", "rk45": "RK45 (adaptive)"}
NFE_BUDGETS = (5, 10, 20, 50, 100)
QUICK_NFE_BUDGETS = (10, 20)
TOLERANCES = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)
QUICK_TOLERANCES = (1e-2, 1e-3)
EVALS_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4, "dpmpp2m": 1, "deis": 1}  # the clean last step costs 1


def attempt(notes: list, label: str, fn, *args) -> list:
    """``fn(*args)``; if it fails, a note in the report (the experiment goes on without that solver) and ``[]``."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - one solver's failure is reported, not fatal to the others
        notes.append(f"{label}: failed and skipped ({type(err).__name__}: {err})")
        return []


def bed_part(report: Report, quick: bool) -> list:
    from difflab.paths import DiscretePath, DiscreteTimeContinuation
    from difflab.samplers import sample_ddim
    from difflab.samplers import ode
    from difflab.testbeds import gaussian_bed

    bed = gaussian_bed(16, condition=100.0, seed=0)
    discrete = DiscretePath.from_schedule("linear", T=1000)
    path = DiscreteTimeContinuation(discrete)
    den, prior_std = bed.denoiser(path), path.prior_std()
    budgets = QUICK_NFE_BUDGETS if quick else NFE_BUDGETS
    solvers = getattr(ode, "ODE_SOLVERS", {})
    rows, notes = [], []

    def measured(fn):
        """Exact KL of ``fn(x) -> Samples`` and the NFE it made."""
        nfe = []

        def sample(x):
            out = fn(x)
            nfe.append(out.nfe)
            return out.x
        return exact_kl(bed, sample, prior_std), nfe[0]

    def row(name, budget, fn):
        kl, nfe = measured(fn)
        return {"solver": name, "budget": budget, "NFE": nfe, "KL [nats]": kl}

    def bed_rows(name):
        if name == ADAPTIVE:
            grid = solver_grid(path, 1, ADAPTIVE)
            return [row(name, f"rtol = atol = {tol:g}", lambda x: solvers[name](den, x, grid, rtol=tol, atol=tol))
                    for tol in (QUICK_TOLERANCES if quick else TOLERANCES)]
        return [row(name, budget, lambda x: solvers[name](den, x, solver_grid(path, budget, name)))
                for budget in budgets]

    rows += [row("ddim", budget, lambda x: sample_ddim(bed.denoiser(discrete), x, steps=budget)) for budget in budgets]
    for name in (*SOLVERS, ADAPTIVE):
        if name not in solvers:
            notes.append(f"{LABELS[name]}: not available in difflab.samplers.ode; skipped")
        else:
            rows += attempt(notes, LABELS[name], bed_rows, name)

    report.heading("Exact 16-D Gaussian bed")
    report.text("Exact KL(solver output ‖ data) in nats: each deterministic solver is affine in x_T on a Gaussian "
                "bed, so 17 probe points give its exact output Gaussian (SPEC §8). " + grid_description() +
                "; DDIM runs the discrete chain (trailing spacing). Budget: the NFE asked for; NFE: what the solver "
                "actually made, counted from its denoiser calls.")
    for note in notes:
        report.text(f"_Note: {note}._")
    report.table(rows, key="exact_bed")
    plot_bed_kl(rows, report.path("bed_kl_vs_nfe.png"))
    report.image("bed_kl_vs_nfe.png", "exact KL vs NFE per solver")
    return rows


def plot_bed_kl(rows: list, out: Path) -> Path:
    """The figure of the bed table's rows: exact KL against the NFE made, one line per solver."""
    return line_plot(out, series_by(rows, "solver", "NFE", "KL [nats]", LABELS), "network evaluations per sample (NFE)",
                     "KL(solver output ‖ data) [nats]", "Exact 16-D Gaussian bed (linear schedule, T = 1000)",
                     logx=True, logy=True)


def solver_grid(path, budget: int, solver: str):
    """The grid a solver gets for ``budget`` evaluations: the one ``difflab sample --sampler NAME`` uses
    (:func:`difflab.pipeline.solver_grid`) where it exists, else evenly spaced in log-SNR from ``σ̄(t_max)`` to
    ``σ̄(t_min)`` plus one ``x̂0`` step to the clean end (SPEC §6), as many steps as fit at the solver's
    evaluations per step; RK45 gets ``[t_max, t_min, clean end]`` and picks its own steps."""
    import torch

    from difflab import pipeline
    from difflab.samplers.time_grids import uniform_log_snr

    if hasattr(pipeline, "solver_grid"):
        return pipeline.solver_grid(path, max(budget, 1), solver)
    if solver == ADAPTIVE:
        return torch.tensor([float(path.t_max), float(path.t_min), float(path.clean_time())], dtype=torch.float64)
    return uniform_log_snr(path, max(1, 1 + (budget - 1) // EVALS_PER_STEP[solver]))


def grid_description() -> str:
    from difflab import pipeline

    if hasattr(pipeline, "solver_grid"):
        return ("Every solver runs on the grid `difflab sample --sampler NAME` gives it for that budget "
                "(`difflab.pipeline.solver_grid`)")
    return ("Every fixed-step solver runs on a grid evenly spaced in log-SNR from σ̄(t_max) to σ̄(t_min) plus one "
            "x̂0 step to the clean end, with as many steps as the budget allows at its evaluations per step")


def trained_part(report: Report, pipe, quick: bool, num: int, seed: int) -> list:
    from difflab.pipeline import SAMPLERS

    ref = reference_for(pipe.config)
    num = min(num, ref.max_samples())
    steps_list = (10,) if quick else (5, 10, 20, 50, 100)
    rows, notes = [], []
    def trained_rows(name):
        if name != ADAPTIVE:
            settings = [(steps, {}) for steps in steps_list]
        elif "rtol" in inspect.signature(SAMPLERS[name]).parameters:
            settings = [(f"rtol = atol = {tol:g}", {"rtol": tol, "atol": tol})
                        for tol in (QUICK_TOLERANCES[:1] if quick else TOLERANCES[:3])]
        else:
            settings = [("its default tolerance", {})]
        out_rows = []
        for steps, options in settings:
            out = pipe.sample(num, sampler=name, steps=steps if isinstance(steps, int) else 1, seed=seed,
                              progress=False, **options)
            q = quality(out.x, ref, seed)
            out_rows.append({"solver": name, "steps": steps, "NFE": out.nfe, q["metric"]: q["value"],
                             "noise floor": q["noise_floor"], "n": q["n_samples"]})
        return out_rows

    for name in ("ddim", *SOLVERS, ADAPTIVE):
        if name not in SAMPLERS:
            notes.append(f"{LABELS[name]}: no sampler {name!r} in difflab.pipeline.SAMPLERS; skipped")
        else:
            rows += attempt(notes, LABELS[name], trained_rows, name)

    report.text(f"{num} samples per setting from the same seed ({seed}); {ref.metric} against half of "
                f"{ref.description} ({ref.x.shape[0]} examples), next to the real-vs-real noise floor (SPEC §8). "
                "Steps: the value passed to the sampler; NFE: the network evaluations it reports.")
    for note in notes:
        report.text(f"_Note: {note}._")
    report.table(rows, key="trained_model")
    series = series_by(rows, "solver", "NFE", ref.metric, LABELS)
    line_plot(report.path("quality_vs_nfe.png"), series, "network evaluations per sample (NFE)",
              f"{ref.metric} [{ref.unit}]", "Trained model: sample quality vs NFE (lower is better)", logx=True,
              hlines={"real vs real noise floor": rows[0]["noise floor"]})
    report.image("quality_vs_nfe.png", f"{ref.metric} vs NFE per solver; dashed: the noise floor")
    return rows


def run(out_dir, run_dir: Optional[str] = None, quick: bool = False, seed: int = 0,
        num_samples: Optional[int] = None) -> Path:
    """Write ``report.md``, ``results.json`` and the figures into ``out_dir``; returns the report's path.

    ``num_samples`` per setting defaults to 2000 (300 with ``quick``), capped at half the reference set.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    report = Report(out_dir, "Probability-flow ODE solvers: accuracy vs network evaluations")
    bed_part(report, quick)
    report.heading("Trained model")
    pipe = trained_or_built_in(run_dir, out_dir, quick, seed, report)
    trained_part(report, pipe, quick, num_samples or (300 if quick else 2000), seed)
    provenance(report, started)
    return report.write()
