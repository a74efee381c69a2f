"""Experiment ``parameterization``: ε vs x0 vs v training at equal budget — held-out loss curves in common
units, error by noise level, and sample quality (the paper's open question 3; SPEC §3 losses, §4 targets).

The same small model (two moons, residual MLP, cosine schedule, same steps, batch, learning rate and seed)
is trained three times, regressing ε, x0 or v with the plain MSE in its own target space (``weighting:
none``). The training losses are in three different units, so every saved checkpoint is evaluated on one
fixed held-out set of ``(x0, t, ε)`` — ``t`` on an even grid of the T steps, so averages are over
``t ~ U{1..T}`` — through :class:`~difflab.parameterization.NetworkDenoiser`, which turns any target into
both ``ε̂`` and ``x̂0``:

- **ε-MSE** ``mean ||ε − ε̂||²`` per coordinate: ``L_simple``, the DDPM loss (SPEC §3);
- **x0-MSE** ``mean ||x0 − x̂0||²`` per coordinate, ``= ε-MSE / SNR`` at each t (SPEC §4).

Each weights the noise levels differently (the two are the same errors seen through ``1/SNR``), so both are
shown, with the per-t curve of the final models that explains the difference.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from difflab.experiments.common import describe_config, line_plot, provenance, quality, reference_for, \
    sample_panels, series_by, small_config, timed, train_quietly
from difflab.experiments.report import Report

TARGETS = ("eps", "x0", "v")
LABELS = {"eps": "ε-prediction", "x0": "x0-prediction", "v": "v-prediction"}
NUM_CHECKPOINTS = 8
NUM_TIMES = 20  # the held-out set's t grid: NUM_TIMES evenly spaced steps in 1..T
SAMPLE_STEPS = 50


def held_out_set(ref_x: torch.Tensor, T: int, per_time: int, seed: int):
    """``(x0, t, ε)``: ``per_time`` held-out points at each of :data:`NUM_TIMES` evenly spaced ``t``, fixed noise."""
    g = torch.Generator().manual_seed(seed + 12345)
    times = torch.linspace(1, T, NUM_TIMES).round().long()
    idx = torch.randint(0, ref_x.shape[0], (NUM_TIMES * per_time,), generator=g)
    x0 = ref_x[idx].float()
    t = times.repeat_interleave(per_time)
    eps = torch.randn(x0.shape, generator=g)
    return x0, t, eps, times


@torch.no_grad()
def held_out_errors(denoiser, x0, t, eps) -> tuple:
    """Per-example ε and x0 squared errors (mean over coordinates), ``([N], [N])``, in float64."""
    x_t, _ = denoiser.path.sample(x0, t, eps)
    pred = denoiser(x_t, t)
    dims = tuple(range(1, x0.ndim))
    return ((pred.eps.double() - eps.double()) ** 2).mean(dims), ((pred.x0.double() - x0.double()) ** 2).mean(dims)


def first_step_gain_note(path, steps: int) -> str:
    """How much DDIM's first step amplifies an error in ``ε̂`` when ``x̂0 = (x − s ε̂)/a`` (SPEC §4, §5).

    With ``x_{t1} = a_{t1} x̂0 + s_{t1} ε̂`` and ``x̂0`` from ``ε̂``, an error ``δ`` in ``ε̂`` moves ``x_{t1}`` by
    ``(s_{t1} − a_{t1} s_{t0}/a_{t0}) δ``; an x0- or v-network's ``x̂0`` does not divide by ``a``.
    """
    from difflab.samplers import discrete_timesteps

    t0, t1 = discrete_timesteps(path.T, steps)[:2]
    (a0, a1), (s0, s1) = path.a(torch.stack([t0, t1])).tolist(), path.s(torch.stack([t0, t1])).tolist()
    gain = abs(s1 - a1 * s0 / a0)
    return (f"Sensitivity of sampling to the target: DDIM's first step, t = {int(t0)} → "
            f"{int(t1)}, moves x by {gain:.3g}·δ for an error δ in ε̂ when x̂0 = (x − s ε̂)/a is formed from an "
            f"ε-network (a_T = {a0:.2g} here; no x̂0 clipping for points), while an x0- or v-network's x̂0 does not "
            "divide by a (SPEC §4). The x0-MSE column of the ε-model at the largest t above is that error.")


def run(out_dir, quick: bool = False, seed: int = 0, num_samples: Optional[int] = None) -> Path:
    """Write ``report.md``, ``results.json`` and the figures into ``out_dir``; returns the report's path.

    Trains one model per target into ``out_dir/runs/<target>`` with :data:`NUM_CHECKPOINTS` checkpoints (3 quick)
    (about 1.5 minutes each on one core; seconds with ``quick``).
    """
    from difflab.pipeline import load_run
    from difflab.plotting import read_metrics

    started = time.perf_counter()
    out_dir = Path(out_dir)
    report = Report(out_dir, "ε vs x0 vs v: training at equal budget")
    num = num_samples or (300 if quick else 2000)
    curves, finals, panels, per_t, cfgs = [], [], [], {}, []
    ref = held = None
    for target in TARGETS:
        base = small_config(quick, seed)
        every = max(1, base.train.steps // (3 if quick else NUM_CHECKPOINTS))
        cfg = small_config(quick, seed, diffusion={"target": target, "schedule": "cosine"},
                           train={"checkpoint_every": every, "keep_checkpoints": NUM_CHECKPOINTS + 2})
        cfgs.append(cfg)
        run_dir = out_dir / "runs" / target
        pipe, train_s = timed(train_quietly, cfg, run_dir)
        if ref is None:
            ref = reference_for(cfg)
            held = held_out_set(ref.x, pipe.path.T, 25 if quick else 200, seed)
        x0, t, eps, times = held
        for step in sorted({*range(every, cfg.train.steps + 1, every), cfg.train.steps}):
            raw = load_run(run_dir, ema=False, device="cpu", which=step)
            e_eps, e_x0 = held_out_errors(raw.denoiser, x0, t, eps)
            curves.append({"target": target, "step": step, "ε-MSE": float(e_eps.mean()), "x0-MSE": float(e_x0.mean())})
        e_eps, e_x0 = held_out_errors(pipe.denoiser, x0, t, eps)  # the final EMA model, as sampled
        per_t[target] = (e_eps.reshape(NUM_TIMES, -1).mean(1), e_x0.reshape(NUM_TIMES, -1).mean(1))
        n = min(num, ref.max_samples())
        out = pipe.sample(n, sampler="ddim", steps=20 if quick else SAMPLE_STEPS, seed=seed, progress=False)
        q = quality(out.x, ref, seed)
        own = read_metrics(run_dir / "metrics.jsonl")[-1]["loss"]
        finals.append({"target": target, "training [s]": train_s, "final training loss (own units)": own,
                       "held-out ε-MSE (EMA)": float(e_eps.mean()), "held-out x0-MSE (EMA)": float(e_x0.mean()),
                       "sliced W2": q["value"], "noise floor": q["noise_floor"], "n": q["n_samples"]})
        panels.append((f"{LABELS[target]}: sliced W2 {q['value']:.3g}", out.x))

    x0, t, eps, times = held
    report.text(f"Each model: {describe_config(cfgs[0])}, with only the target changed (plain MSE in the target's "
                f"own space). Held-out set: {x0.shape[0]} points of {ref.description}, {x0.shape[0] // NUM_TIMES} at "
                f"each of {NUM_TIMES} evenly spaced t in 1..{pipe.path.T}, with fixed ε; curves use the raw weights "
                f"every {every} steps, the final table the EMA weights that are sampled.")
    report.heading("Held-out loss during training, in common units")
    line_plot(report.path("eps_mse_vs_step.png"), series_by(curves, "target", "step", "ε-MSE", LABELS),
              "training step",
              "held-out ε-MSE = L_simple [per coordinate, ε units²]",
              "Held-out ε-MSE (the DDPM loss) during training", logy=True)
    line_plot(report.path("x0_mse_vs_step.png"), series_by(curves, "target", "step", "x0-MSE", LABELS), "training step",
              "held-out x0-MSE [per coordinate, data units²]", "Held-out x0-MSE during training", logy=True)
    report.image("eps_mse_vs_step.png", "held-out ε-MSE (L_simple units) vs training step")
    report.image("x0_mse_vs_step.png", "held-out x0-MSE (data units²) vs training step")
    report.table(curves, key="curves")

    report.heading("Final models: error by noise level")
    log_snr = pipe.path.log_snr(times).double()
    line_plot(report.path("eps_mse_vs_log_snr.png"),
              {LABELS[k]: (log_snr.tolist(), per_t[k][0].tolist()) for k in TARGETS},
              "log SNR_t = log(ᾱ_t / (1 − ᾱ_t)) [nats]  (noisy ← → clean)", "held-out ε-MSE [ε units²]",
              "Final EMA models: ε-MSE at each noise level", logy=True)
    report.image("eps_mse_vs_log_snr.png", "ε-MSE of the final models at each t (x0-MSE = ε-MSE / SNR)")
    report.table([{"t": int(tt), "log SNR [nats]": float(ls), **{f"ε-MSE {k}": float(per_t[k][0][i]) for k in TARGETS},
                   **{f"x0-MSE {k}": float(per_t[k][1][i]) for k in TARGETS}}
                  for i, (tt, ls) in enumerate(zip(times, log_snr))], key="per_t")

    report.heading("Sample quality")
    report.text(f"DDIM (η = 0), {20 if quick else SAMPLE_STEPS} steps from the same seed; sliced W2 (data units) "
                f"against half of the held-out draws, next to the real-vs-real noise floor (SPEC §8). The final "
                "training loss is each target's own MSE (not comparable across rows).")
    report.table(finals, key="final")
    report.text(first_step_gain_note(pipe.path, 20 if quick else SAMPLE_STEPS))
    sample_panels(report.path("samples.png"), panels, reference=ref.x)
    report.image("samples.png", "samples of the final model of each target (grey: held-out data)")
    provenance(report, started)
    return report.write()
