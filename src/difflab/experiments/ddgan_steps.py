"""Experiment ``ddgan-steps``: DDGAN with T ∈ {1, 2, 4, 8} large steps against DDPM with the same T and DDPM-1000 on
two 2-D mixtures — sliced W2 over its floor, modes covered, each mode's weight error, train and sample time (SPEC §5,
§8; Xiao, Kreis, Vahdat 2022).

The claim measured: with few large steps the true reverse kernel is multimodal, so a Gaussian step (DDPM) fails,
while DDGAN's implicit kernel (a generator of ``x̂0`` followed by the exact posterior ``q(x_{t−1} | x_t, x̂0)``) can
follow it; T = 1 is a plain GAN, prone to dropping modes.

Beds (:mod:`difflab.testbeds`, data drawn by :mod:`difflab.data`): the 5×5 grid of Gaussians
(:func:`~difflab.testbeds.grid_bed_2d`: spacing 1, std 0.05) and the 2-D mixture bed
(:func:`~difflab.testbeds.mixture_bed_2d`: four blobs of std 0.3 on a circle of radius 2). For every T the VP
schedule sampled at T points (:func:`difflab.schedules.vp`, DDGAN's) carries both a DDGAN run and a DDPM run (the same
MLP trained on ε, sampled by ancestral steps with β̃); DDPM-1000 uses the same schedule at 1000 points.

Scores of ``n`` samples (:func:`mode_scores`): sliced W2 to ``n`` fresh data samples over the data-vs-data floor
(:func:`difflab.experiments.reverse_kernel.sliced_w2`: the mean of ten pairs at the same ``n``); a mode is
*covered* when a sample lies within 3σ of its mean; a sample within 3σ of a mode counts for that mode, and each
mode's weight error is ``|n_k / n_in − w_k| / w_k`` over the ``n_in`` samples that lie within 3σ of some mode (the
rest, the *off-mode* fraction, is reported apart). Train time is the wall time of ``difflab train``'s loop; sample
time the wall time of drawing the ``n`` samples.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from difflab.experiments.common import provenance, sample_panels, timed, train_quietly
from difflab.experiments.report import Report
from difflab.testbeds import grid_bed_2d, mixture_bed_2d

STEPS = (1, 2, 4, 8)
QUICK_STEPS = (2,)
QUICK_FULL_T = 20
DDPM_FULL_T = 1000
COVER_SIGMAS = 3.0
BEDS = {"grid": {"name": "gaussian_grid", "title": "5×5 grid of Gaussians (spacing 1, std 0.05)"},
        "mixture": {"name": "mixture", "title": "2-D mixture bed (4 blobs, radius 2, std 0.3)"}}

MLP = {"kind": "mlp", "hidden": 128, "depth": 3, "time_dim": 32}
DDGAN_RUN = {"model": MLP, "diffusion": {"path": "discrete", "schedule": "vp", "objective": "ddgan"},
             "ddgan": {"nz": 16, "lr_g": 2e-4, "lr_d": 2e-4, "r1_gamma": 0.01, "lazy_reg": 4, "d_width": 128,
                       "d_depth": 3},
             "train": {"steps": 5000, "batch_size": 256, "ema_decay": 0.999, "grad_clip": 0.0, "log_every": 100,
                       "checkpoint_every": 0, "num_threads": 1}}
DDPM_RUN = {"model": MLP, "diffusion": {"path": "discrete", "schedule": "vp", "target": "eps"},
            "train": {"steps": 3000, "batch_size": 256, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.995,
                      "log_every": 100, "checkpoint_every": 0, "num_threads": 1}}
QUICK = {"model": {"hidden": 32, "depth": 1, "time_dim": 16}, "ddgan": {"nz": 4, "d_width": 32, "d_depth": 1},
         "train": {"steps": 20, "batch_size": 64}}
N_DATA = 20_000
BED_BUILDERS = {"grid": grid_bed_2d, "mixture": mixture_bed_2d}


def mode_scores(bed, x: torch.Tensor) -> dict:
    """Modes covered, the largest and mean weight error and the off-mode fraction of samples ``x (n, 2)`` (module
    docstring); the bed's components are its modes, each of std ``σ = √λ_max`` of its covariance."""
    x = x.double()
    dist = torch.cdist(x, bed.means)  # (n, K)
    sigma = bed.eigvals.max(-1).values.sqrt()  # (K,)
    d_min, k = (dist / sigma).min(-1)
    inside = d_min <= COVER_SIGMAS
    counts = torch.bincount(k[inside], minlength=bed.K).double()
    n_in = max(int(inside.sum()), 1)
    err = (counts / n_in - bed.weights).abs() / bed.weights
    return {"modes covered": int((counts > 0).sum()), "modes": bed.K, "max weight error": float(err.max()),
            "mean weight error": float(err.mean()), "off-mode fraction": 1.0 - float(inside.double().mean())}


def _config(base: dict, bed: str, T: int, seed: int, quick: bool):
    from difflab.config import RunConfig
    from difflab.experiments.common import merged

    return RunConfig.from_dict(merged(base, {"data": {"name": BEDS[bed]["name"], "n": N_DATA},
                                             "diffusion": {"T": T}, "train": {"seed": seed}}, QUICK if quick else {}))


def _measure(kind: str, cfg, run_dir: Path, bed, n: int, seed: int, steps: int) -> tuple:
    """Train ``cfg`` (timed), draw ``n`` samples in ``steps`` steps (timed) and score them; returns (row, samples)."""
    from difflab.experiments.reverse_kernel import sliced_w2

    pipe, train_s = timed(train_quietly, cfg, run_dir)
    sampler = "ddgan" if kind == "DDGAN" else "ddpm"
    out, sample_s = timed(pipe.sample, n, sampler=sampler, steps=steps, seed=seed, progress=False)
    finite = bool(torch.isfinite(out.x).all())
    sw, floor, floor_max = sliced_w2(bed, out.x, torch.Generator().manual_seed(seed))
    row = {"model": kind, "T": cfg.diffusion.T, "NFE": out.nfe, "sliced W2": sw, "floor": floor,
           "sW2 / floor": sw / floor, **mode_scores(bed, out.x), "finite": finite, "train [s]": train_s,
           "sample [s]": sample_s}
    return row, out.x


def bed_rows(name: str, steps_list, n: int, seed: int, quick: bool, runs: Path) -> tuple:
    """Every model of one bed: ``(rows, {T: panels}, DDPM-full panel)`` (runs written under ``runs/name``)."""
    bed = BED_BUILDERS[name]()
    rows, panels = [], {}
    for T in steps_list:
        for kind, base in (("DDGAN", DDGAN_RUN), ("DDPM", DDPM_RUN)):
            row, x = _measure(kind, _config(base, name, T, seed, quick), runs / name / f"{kind.lower()}-{T}", bed, n,
                              seed, T)
            rows.append({"bed": name, **row})
            panels.setdefault(T, []).append((f"{name}: {kind}, T = {T}: sW2/floor {row['sW2 / floor']:.2g}, "
                                             f"{row['modes covered']}/{row['modes']} modes", x))
    full_T = QUICK_FULL_T if quick else DDPM_FULL_T
    row, x = _measure("DDPM", _config(DDPM_RUN, name, full_T, seed, quick), runs / name / f"ddpm-{full_T}", bed, n,
                      seed, full_T)
    rows.append({"bed": name, **row})
    return rows, panels, (f"{name}: DDPM, T = {full_T}: sW2/floor {row['sW2 / floor']:.2g}", x)


def run(out_dir, quick: bool = False, seed: int = 0) -> Path:
    """Write ``report.md``, ``results.json`` and the figures into ``out_dir``; returns the report's path. The full
    version trains the two beds in two processes (one torch thread each)."""
    from concurrent.futures import ProcessPoolExecutor

    started = time.perf_counter()
    out_dir = Path(out_dir)
    report = Report(out_dir, "DDGAN vs DDPM with a few large steps (2-D mixtures)")
    steps_list, n = (QUICK_STEPS, 500) if quick else (STEPS, 10_000)
    jobs = [(name, steps_list, n, seed, quick, out_dir / "runs") for name in BEDS]
    if quick:
        results = [bed_rows(*job) for job in jobs]
    else:
        with ProcessPoolExecutor(max_workers=len(jobs), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            results = list(pool.map(bed_rows, *zip(*jobs)))
    rows = [r for bed_result in results for r in bed_result[0]]
    panels = {T: [p for bed_result in results for p in bed_result[1][T]] for T in steps_list}
    full_panels = [bed_result[2] for bed_result in results]

    report.text(f"{n} samples per model (seed {seed}); sliced W2 (256 projections) against {n} fresh data samples, "
                "over the mean of ten data-vs-data pairs at the same n (the floor). A mode is covered when a sample "
                f"lies within {COVER_SIGMAS:g}σ of it; weight errors are relative, over the samples within "
                f"{COVER_SIGMAS:g}σ of some mode. Networks: {_describe(DDGAN_RUN, DDPM_RUN, quick)}. "
                "Times are wall seconds on a shared machine (see the end): compare rows, not machines.")
    for name, spec in BEDS.items():
        report.heading(spec["title"], 3)
        report.table([{k: v for k, v in r.items() if k not in ("bed", "modes", "floor")} for r in rows
                      if r["bed"] == name], key=name)
    report.heading("Samples")
    for T, items in panels.items():
        file = f"samples_T{T}.png"
        sample_panels(report.path(file), items, max_points=n)
        report.image(file, f"T = {T}: DDGAN and DDPM on both beds (grey: data)")
    sample_panels(report.path("samples_ddpm_full.png"), full_panels, max_points=n)
    report.image("samples_ddpm_full.png", "DDPM with its full chain, for reference")
    report.text(_reading(rows))
    provenance(report, started)
    (out_dir / "configs.json").write_text(json.dumps({"ddgan": DDGAN_RUN, "ddpm": DDPM_RUN,
                                                      "quick_changes": QUICK if quick else {}}, indent=2))
    return report.write()


def _describe(ddgan: dict, ddpm: dict, quick: bool) -> str:
    if quick:
        return "quick mode (tiny networks, 20 steps): a smoke test, not a measurement"
    m, d, g, p = ddgan["model"], ddgan["ddgan"], ddgan["train"], ddpm["train"]
    return (f"generator and DDPM denoiser: residual MLP (hidden {m['hidden']}, depth {m['depth']}); DDGAN: latent "
            f"nz {d['nz']}, discriminator MLP (width {d['d_width']}, depth {d['d_depth']}), Adam β (0.5, 0.9), "
            f"lr_G {d['lr_g']:g}, lr_D {d['lr_d']:g}, R1 γ {d['r1_gamma']:g} every {d['lazy_reg']} step(s), "
            f"{g['steps']} steps of batch {g['batch_size']}, EMA {g['ema_decay']:g}; DDPM: ε-MSE, {p['steps']} steps "
            f"of batch {p['batch_size']}, lr {p['lr']:g}, EMA {p['ema_decay']:g}")


def _reading(rows: list) -> str:
    """The measured claim, in numbers: per bed, DDGAN's best T and DDPM at T = 4 against DDGAN at T = 4."""
    lines = ["Reading (from the tables above):"]
    for bed in BEDS:
        sel = {(r["model"], r["T"]): r for r in rows if r["bed"] == bed}
        gan = {T: r for (kind, T), r in sel.items() if kind == "DDGAN"}
        if not gan:
            continue
        parts = [f"T = {T}: sW2/floor {r['sW2 / floor']:.2g}, {r['modes covered']}/{r['modes']} modes, max weight "
                 f"error {100 * r['max weight error']:.0f} %" for T, r in sorted(gan.items())]
        line = f"- {bed}: DDGAN " + "; ".join(parts)
        if ("DDPM", 4) in sel and 4 in gan:
            ratio = sel[("DDPM", 4)]["sliced W2"] / gan[4]["sliced W2"]
            line += f". DDPM with T = 4 has {ratio:.2g}× DDGAN's sliced W2 at T = 4"
        lines.append(line + ".")
    return "\n".join(lines)
