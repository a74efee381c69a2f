"""``difflab demo``: the main job on built-in data, end to end, in one report.

It (1) draws the forward process on real digits (the paper's first experiment, SPEC §2), (2) trains an
MLP denoiser on two moons and a class-conditional U-Net on scikit-learn's 8×8 digits (SPEC §3–§4),
(3) samples both with DDPM ancestral sampling and with DDIM at several step counts (SPEC §5), scoring
each against its data (sliced W2 for points, a Fréchet distance in the features of a small digits
classifier — "FD-digits8", not Inception FID — and class accuracy for images, each with its
real-vs-real noise floor), (4) draws a classifier-free-guided grid, one row per class (SPEC §7), and
(5) writes ``report.md`` with every picture, the loss curves and a table of the numbers.

The 8×8 digits rather than MNIST-5k because the demo must finish in about ten minutes on two CPU
cores; ``configs/mnist5k.yaml`` is the 28×28 run (see the README).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from difflab.config import RunConfig
from difflab.experiments.report import Report

MOONS = {
    "data": {"name": "two_moons", "n": 10000},
    "model": {"kind": "mlp", "hidden": 128, "depth": 3, "time_dim": 64},
    "diffusion": {"path": "discrete", "schedule": "cosine", "T": 1000, "target": "v"},
    "train": {"steps": 3000, "batch_size": 256, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.995,
              "log_every": 25, "checkpoint_every": 0, "sample_every": 0, "num_threads": 1},
}
"""Two moons, an MLP, v-prediction on the cosine schedule (one thread: a small MLP only loses to thread sync)."""

DIGITS = {
    "data": {"name": "digits8"},
    "model": {"kind": "unet", "conditional": True, "base_channels": 32, "channel_mults": [1, 2],
              "num_res_blocks": 1, "attn_resolutions": [4]},
    "diffusion": {"path": "discrete", "schedule": "cosine", "T": 1000, "target": "v"},
    "train": {"steps": 2000, "batch_size": 64, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.995,
              "p_uncond": 0.1, "log_every": 25, "checkpoint_every": 0, "sample_every": 0},
}
"""scikit-learn's 8×8 digits, a class-conditional U-Net with label dropout for classifier-free guidance."""

QUICK_STEPS = {"moons": 60, "digits": 30}
"""Training steps in ``--quick`` mode (a smoke run for tests: pictures are noise)."""

DDIM_STEPS = (10, 20, 50)
NUM_POINTS = 1000
"""Samples per sampler on two moons (scored against 2 × as many held-out points, whose halves give the floor)."""
NUM_IMAGES = 100
"""Samples per sampler on the digits (scored against all 1,797 digits)."""
GUIDANCE_SCALE = 3.0


def demo_config(raw: dict, steps: Optional[int] = None, seed: int = 0) -> RunConfig:
    """One of the demo's configs, with ``steps`` training steps and the seed set."""
    cfg = RunConfig.from_dict({k: dict(v) for k, v in raw.items()})
    if steps is not None:
        cfg.train.steps = steps
    cfg.train.seed = seed
    return cfg.validate()


def _train(name: str, cfg: RunConfig, out: Path, progress: bool) -> tuple[Path, float]:
    from difflab.training import train

    run_dir = out / "runs" / name
    start = time.perf_counter()
    threads = torch.get_num_threads()
    try:
        train(cfg, run_dir, overwrite=True, progress=progress)
    finally:
        torch.set_num_threads(threads)  # train.num_threads is process-wide; the next stage starts afresh
    return run_dir, time.perf_counter() - start


def _sampler_settings(quick: bool) -> list[tuple[str, int]]:
    """``(sampler, steps)`` pairs: DDPM over every step, and DDIM at :data:`DDIM_STEPS`."""
    if quick:
        return [("ddpm", 20), ("ddim", 5)]
    return [("ddpm", 1000)] + [("ddim", s) for s in DDIM_STEPS]


def _timed_samples(pipe, num: int, quick: bool, seed: int):
    """Yield ``(sampler, steps, samples, seconds)`` for every :func:`_sampler_settings` pair, all from ``seed``."""
    for sampler, steps in _sampler_settings(quick):
        start = time.perf_counter()
        samples = pipe.sample(num, sampler=sampler, steps=steps, seed=seed, progress=False)
        yield sampler, steps, samples, time.perf_counter() - start


def _moons(report: Report, out: Path, quick: bool, seed: int, progress: bool) -> list[dict]:
    from difflab.data import load_dataset
    from difflab.evaluation import evaluate_samples
    from difflab.pipeline import load_run
    from difflab.plotting import save_loss_curve, save_scatter

    cfg = demo_config(MOONS, QUICK_STEPS["moons"] if quick else None, seed)
    run_dir, seconds = _train("moons", cfg, out, progress)
    pipe = load_run(run_dir, device="cpu")
    held_out = load_dataset(cfg.data.name, n=2 * NUM_POINTS, seed=seed + 1).x
    num = 500 if quick else NUM_POINTS
    report.heading("Two moons: an MLP denoiser")
    report.text(f"{pipe.net.__class__.__name__} with {sum(p.numel() for p in pipe.net.parameters()):,} parameters, "
                f"{cfg.train.steps} steps of batch {cfg.train.batch_size} ({seconds:.0f} s). Samples (blue) over "
                "held-out data (grey); sliced W2 to held-out data, with the same metric between two halves of "
                "the held-out data as the noise floor.")
    save_loss_curve(run_dir / "metrics.jsonl", report.path("moons_loss.png"), title="two moons: training loss")
    rows = []
    for sampler, steps, samples, seconds in _timed_samples(pipe, num, quick, seed):
        fname = f"moons_{sampler}{steps}.png"
        save_scatter(samples.x, report.path(fname), reference=held_out[:num], title=f"{sampler}, {samples.nfe} NFE")
        metrics = evaluate_samples(samples.x, held_out, "points", seed=seed)["metrics"]
        sw2 = metrics["sliced_w2"]
        rows.append({"data": "two moons", "sampler": sampler, "NFE": samples.nfe, "samples": num,
                     "sliced W2": sw2["value"], "noise floor": sw2.get("noise_floor"), "seconds": seconds})
    report.text(" ".join(f"![{r['sampler']} {r['NFE']}](moons_{r['sampler']}{r['NFE']}.png)" for r in rows))
    report.image("moons_loss.png", "two moons: training loss per step")
    return rows


def _digits(report: Report, out: Path, quick: bool, seed: int, progress: bool) -> list[dict]:
    from difflab.data import load_dataset
    from difflab.evaluation import evaluate_samples, feature_network
    from difflab.pipeline import load_run
    from difflab.plotting import save_image_grid, save_loss_curve

    cfg = demo_config(DIGITS, QUICK_STEPS["digits"] if quick else None, seed)
    run_dir, seconds = _train("digits8", cfg, out, progress)
    pipe = load_run(run_dir, device="cpu")
    data = load_dataset(cfg.data.name, seed=seed)
    judge, info = feature_network(cfg.data.name, data.x, data.y, data.num_classes, root=out / "features",
                                  max_seconds=5.0 if quick else 60.0)
    num = 100 if quick else NUM_IMAGES
    report.heading("8×8 digits: a class-conditional U-Net")
    report.text(f"U-Net with {sum(p.numel() for p in pipe.net.parameters()):,} parameters, {cfg.train.steps} steps "
                f"of batch {cfg.train.batch_size} ({seconds:.0f} s), label dropout {cfg.train.p_uncond} for "
                "classifier-free guidance. Each grid row cycles through the classes 0–9. FD-digits8 is a Fréchet "
                "distance in the penultimate features of a small classifier trained on the same digits (held-out "
                f"accuracy {info.get('held_out_accuracy', float('nan')):.3f}); it is not Inception FID. Class accuracy "
                "is that classifier's agreement with the requested class.")
    save_loss_curve(run_dir / "metrics.jsonl", report.path("digits_loss.png"), title="8×8 digits: training loss")
    rows = []
    for sampler, steps, samples, seconds in _timed_samples(pipe, num, quick, seed):
        fname = f"digits_{sampler}{steps}.png"
        save_image_grid(samples.x[:100], report.path(fname), nrow=10, scale=4)
        labels = pipe.labels(num)
        metrics = evaluate_samples(samples.x, data.x, "image", dataset=cfg.data.name, feature_net=judge,
                                   sample_labels=labels, seed=seed)["metrics"]
        fd = metrics[f"FD-{cfg.data.name}"]
        rows.append({"data": "8×8 digits", "sampler": sampler, "NFE": samples.nfe, "samples": num,
                     "FD-digits8": fd["value"], "noise floor": fd.get("noise_floor"),
                     "class accuracy": metrics["class_accuracy"]["value"], "seconds": seconds})
        report.image(fname, f"{sampler}, {samples.nfe} network evaluations")
    report.image("digits_loss.png", "8×8 digits: training loss per step")
    _guided_grid(report, pipe, quick, seed)
    return rows


def _guided_grid(report: Report, pipe, quick: bool, seed: int) -> None:
    from difflab.plotting import save_image_grid

    per_class = 10
    y = torch.arange(pipe.num_classes).repeat_interleave(per_class)
    rows = {}
    for scale in (1.0, GUIDANCE_SCALE):
        samples = pipe.sample(len(y), sampler="ddim", steps=5 if quick else 50, seed=seed, y=y,
                              guidance_scale=scale, progress=False)
        name = f"digits_guided_{scale:g}.png"
        save_image_grid(samples.x, report.path(name), nrow=per_class, scale=4)
        rows[scale] = (name, samples.nfe)
    report.heading("Classifier-free guidance", 3)
    report.text(f"One row per class (0 at the top), DDIM {5 if quick else 50} steps. Left: λ = 1 (the conditional model as trained). "
                f"Right: λ = {GUIDANCE_SCALE:g}, ε̂ = ε̂(x, ∅) + λ (ε̂(x, y) − ε̂(x, ∅)) evaluated in one batched network "
                f"call ({rows[GUIDANCE_SCALE][1]} network evaluations per sample, counting both halves).")
    report.text(" ".join(f"![λ = {s:g}]({n})" for s, (n, _) in rows.items()))


def run(out_dir="demo_out", quick: bool = False, seed: int = 0, progress: bool = True) -> Path:
    """Run the demo into ``out_dir`` and return the path of its ``report.md``."""
    from difflab.experiments import forward_process

    out = Path(out_dir)
    start = time.perf_counter()
    report = Report(out, "difflab demo")
    report.text("Everything below was produced by `difflab demo` on this machine, from built-in data, in one run.")
    report.heading("The forward process")
    fp = forward_process.run(out / "forward_process", dataset="mnist5k", num_images=4, seed=seed)
    report.text("`x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε` on four MNIST digits for t = 0 … 1000 under the linear schedule; "
                f"the other schedules and the log-SNR curves are in [forward_process/report.md]({fp.relative_to(out)}).")
    report.image("forward_process/forward_linear.png", "forward process, linear schedule: t grows to the right")
    moons = _moons(report, out, quick, seed, progress)
    digits = _digits(report, out, quick, seed, progress)
    report.heading("The numbers")
    report.text("Lower is better for sliced W2 and FD; the noise floor is the same metric between two equal halves "
                "of real data at the same sample count. Seconds are sampling wall time on this machine.")
    report.table(moons, key="two_moons")
    report.table(digits, key="digits8")
    total = time.perf_counter() - start
    report.results["seconds_total"] = total
    report.text(f"Total time: {total / 60:.1f} minutes ({torch.get_num_threads()} CPU threads).")
    return report.write()
