"""Experiment ``guidance-scale``: sweep the classifier-free guidance scale λ of a class-conditional image model (SPEC §7).

For each λ the same ``x_T`` and the same requested labels (``samples_per_class`` of every class) are sampled
with :class:`~difflab.guidance.ClassifierFreeGuidance` (through ``Pipeline.sample(guidance_scale=λ)``), and
the samples are judged by a classifier trained on the real, clean data set — the data set's feature network
(:func:`difflab.evaluation.feature_network`, the one behind FD-<dataset>; *not* Inception):

- ``accuracy``: the fraction the judge puts in the requested class; ``confidence``: the judge's mean
  probability of the requested class (:func:`difflab.guidance_experiment.sweep_guidance_scale`);
- ``diversity_px`` / ``diversity_feat``: the mean over classes of the mean pairwise distance between the
  samples of one class, in pixel space and in the judge's feature space;
- ``FD``: the Fréchet distance in the judge's feature space between the samples (shuffled, so every class
  is represented) and half B of the data, next to its noise floor ``FD(half A, half B)`` at the same counts.

Without a ``run_dir`` a small class-conditional digits model is trained first (:func:`small_digits_config`).
:func:`guided_grid` writes one row of samples per class, for the demo report.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from difflab.config import RunConfig
from difflab.experiments.report import Report
from difflab.guidance_experiment import mean_pairwise_distance, plot_sweep, sweep_guidance_scale

DEFAULT_SCALES = (0.0, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5)
QUICK_SCALES = (0.0, 1.0, 3.0)
GRID_SCALES = (0.0, 1.0, 3.0, 7.5)
"""Scales shown as sample grids in the report (those of the sweep that are among these)."""

# A small class-conditional model of the 8×8 digits: configs/digits8.yaml's data, path and label dropout
# with the U-Net swapped for a residual MLP on the 64 pixels, so it trains in seconds on one CPU core.
SMALL_DIGITS = {"data": {"name": "digits8"},
                "model": {"kind": "mlp", "conditional": True, "hidden": 256, "depth": 3, "time_dim": 64},
                "diffusion": {"path": "discrete", "schedule": "cosine", "T": 1000, "target": "v"},
                "train": {"steps": 2000, "batch_size": 64, "lr": 2e-3, "warmup_steps": 20, "ema_decay": 0.995,
                          "p_uncond": 0.2, "log_every": 50, "sample_every": 0, "checkpoint_every": 0}}
QUICK_DIGITS = {"model": {"hidden": 128, "depth": 2}, "train": {"steps": 200, "ema_decay": 0.99}}


def small_digits_config(quick: bool = False, seed: int = 0) -> RunConfig:
    """:data:`SMALL_DIGITS` (with :data:`QUICK_DIGITS` when ``quick``) and ``train.seed = seed``, validated."""
    raw = {section: dict(values) for section, values in SMALL_DIGITS.items()}
    for section, values in (QUICK_DIGITS if quick else {}).items():
        raw[section].update(values)
    raw["train"]["seed"] = seed
    return RunConfig.from_dict(raw)


def requested_labels(num_classes: int, per_class: int) -> torch.Tensor:
    """``0 … 0, 1 … 1, …``: ``per_class`` of every class in blocks, long ``[num_classes · per_class]``."""
    return torch.arange(num_classes).repeat_interleave(per_class)


def guided_grid(pipe, out_png: Union[str, Path], scale: float, per_class: int = 10, steps: int = 50, seed: int = 0,
                sampler: str = "ddim") -> Path:
    """Write a grid of CFG samples at scale λ = ``scale``: one row per class, ``per_class`` samples each."""
    from difflab.plotting import save_image_grid

    if not pipe.num_classes:
        raise ValueError("a guided grid needs a class-conditional model")
    y = requested_labels(pipe.num_classes, per_class)
    x = pipe.sample(len(y), sampler=sampler, steps=steps, seed=seed, y=y, guidance_scale=scale, progress=False).x
    return save_image_grid(x, out_png, nrow=per_class)


def judge_for(cfg: RunConfig):
    """The judge of a run's samples: the cached feature network of its data set (trained on first use)."""
    from difflab.data import load_dataset
    from difflab.evaluation import feature_network

    ds = load_dataset(cfg.data.name, path=cfg.data.path_for_run(None), n=cfg.data.n, seed=cfg.train.seed,
                      **cfg.data.options)
    if ds.kind != "image" or ds.y is None:
        raise ValueError(f"the guidance-scale sweep needs labelled images; {cfg.data.name!r} is not")
    key = cfg.data.name if not cfg.data.path else f"{cfg.data.name}-{Path(cfg.data.path).name}"
    net, info = feature_network(key, ds.x, ds.y, ds.num_classes or None)
    return net, info, ds


def sweep(pipe, judge, reference: torch.Tensor, scales: Sequence[float], per_class: int, sampler: str = "ddim",
          steps: int = 50, seed: int = 0) -> list:
    """One row per λ: accuracy, confidence, diversities, FD in the judge's features with its floor, counts, NFE.

    Every λ uses the same seed, hence the same ``x_T`` (and the same noise for stochastic samplers).
    """
    from difflab.metrics import frechet_distance

    g = torch.Generator().manual_seed(seed)
    half = torch.randperm(reference.shape[0], generator=g)
    half_a, half_b = reference[half[: len(half) // 2]], reference[half[len(half) // 2:]]
    feat_a, feat_b = judge.embed(half_a), judge.embed(half_b)
    num = per_class * pipe.num_classes
    n_fd = min(num, feat_a.shape[0])
    floor = frechet_distance(feat_a[:n_fd], feat_b)
    shuffle = torch.randperm(num, generator=g)
    extra: dict = {}

    def sample_fn(scale, y, _generator):
        out = pipe.sample(len(y), sampler=sampler, steps=steps, seed=seed, y=y, guidance_scale=scale, progress=False)
        feats = judge.embed(out.x)
        extra[scale] = {
            "nfe": out.nfe,
            "diversity_feat": within_class_diversity(feats, y),
            "FD": frechet_distance(feats[shuffle][:n_fd], feat_b),
        }
        return out.x

    rows = sweep_guidance_scale(sample_fn, lambda x: judge(x.float()), scales, pipe.num_classes, per_class)
    return [{"scale": r["scale"], "nfe": extra[r["scale"]]["nfe"], "accuracy": r["accuracy"],
             "confidence": r["confidence"], "diversity_px": r["diversity"],
             "diversity_feat": extra[r["scale"]]["diversity_feat"], "FD": extra[r["scale"]]["FD"], "FD_floor": floor,
             "n_samples": num, "n_fd": n_fd, "n_reference": feat_b.shape[0]} for r in rows]


def within_class_diversity(v: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over the classes present in ``y`` of the mean pairwise distance between the rows of ``v`` of that class."""
    classes = torch.unique(y).tolist()
    return sum(mean_pairwise_distance(v[y == c]) for c in classes) / len(classes)


def data_diversity(x: torch.Tensor, y: torch.Tensor, judge) -> dict:
    """Within-class diversity of real data, in pixels and in the judge's features."""
    return {"diversity_px": within_class_diversity(x, y), "diversity_feat": within_class_diversity(judge.embed(x), y)}


def run(out_dir, run_dir=None, quick: bool = False, seed: int = 0, scales: Optional[Sequence[float]] = None,
        samples_per_class: Optional[int] = None, sampler: str = "ddim", steps: Optional[int] = None,
        judge=None) -> Path:
    """Sweep λ on ``run_dir`` (default: train :func:`small_digits_config` into ``out_dir/run``); write
    ``report.md``, ``results.json``, ``sweep.png`` and ``grid_scale_*.png`` into ``out_dir``.

    ``judge`` replaces the data set's cached feature network (a :class:`~difflab.evaluation.FeatureNet`).
    """
    from difflab.pipeline import load_run

    out_dir = Path(out_dir)
    scales = tuple(scales if scales is not None else (QUICK_SCALES if quick else DEFAULT_SCALES))
    per_class = samples_per_class or (20 if quick else 100)
    steps = steps or (20 if quick else 50)
    report = Report(out_dir, "Guidance scale: class agreement against diversity and quality")
    if run_dir is not None:
        pipe = load_run(run_dir, device="cpu")
        report.text(f"Model: the trained run `{run_dir}` (step {pipe.step}, EMA weights).")
    else:
        from difflab.training import train

        cfg = small_digits_config(quick, seed)
        start = time.perf_counter()
        train(cfg, out_dir / "run", overwrite=True, progress=False)
        pipe = load_run(out_dir / "run", device="cpu")
        report.text(f"Model: no run was given, so a small class-conditional digits model was trained first "
                    f"({cfg.train.steps} steps, {time.perf_counter() - start:.0f} s; MLP on the 64 pixels, "
                    f"cosine schedule, v target, label dropout {cfg.train.p_uncond}).")
    if not pipe.num_classes:
        raise ValueError("the guidance-scale sweep needs a class-conditional model (model.conditional: true, "
                         "train.p_uncond > 0)")
    if len(pipe.data_shape) != 3:
        raise ValueError(f"the guidance-scale sweep needs an image model; this run's data has shape {pipe.data_shape}")
    if judge is None:
        judge, info, ds = judge_for(pipe.config)
        judge_text = (f"the {pipe.config.data.name} feature network (held-out accuracy "
                      f"{info.get('held_out_accuracy', float('nan')):.3f}), a classifier trained on the real clean data")
    else:
        from difflab.data import load_dataset

        ds = load_dataset(pipe.config.data.name, path=pipe.config.data.path_for_run(None), n=pipe.config.data.n)
        judge_text = "a classifier trained on the real clean data (given by the caller)"
    judge.eval()
    start = time.perf_counter()
    rows = sweep(pipe, judge, ds.x, scales, per_class, sampler, steps, seed)
    seconds = time.perf_counter() - start
    report.text(f"CFG `ε̂ = ε(x, ∅) + λ (ε(x, y) − ε(x, ∅))` (SPEC §7) with {sampler.upper()} in {steps} steps "
                f"(λ ≠ 1 costs 2 network evaluations per step: `nfe`), {per_class} samples of each of the "
                f"{pipe.num_classes} classes from the same `x_T` for every λ (seed {seed}); {seconds:.0f} s in all. "
                f"Judge: {judge_text}. `accuracy`: fraction classified as requested; `confidence`: mean judge "
                f"probability of the requested class; `diversity_px` / `diversity_feat`: mean pairwise distance "
                f"within a class in pixels / judge features; `FD`: Fréchet distance in judge features of "
                f"`n_fd` shuffled samples to `n_reference` real images, `FD_floor` the same between two real halves.")
    report.heading("Sweep")
    report.table(rows, key="sweep")
    real = data_diversity(ds.x, ds.y, judge)
    report.results["data"] = real
    report.text(f"The real data, for reference: within-class diversity {real['diversity_px']:.4g} (pixels), "
                f"{real['diversity_feat']:.4g} (judge features). At λ = 0 the requested label does not steer the "
                f"sample, so the 'within-class' diversity there is the diversity of the whole sample set.")
    plot_sweep([{"scale": r["scale"], "accuracy": r["accuracy"], "confidence": r["confidence"],
                 "diversity": r["diversity_feat"], "quality": r["FD"]} for r in rows], report.path("sweep.png"))
    report.image("sweep.png", "class agreement, diversity (judge features) and FD (judge features) against λ")
    report.heading("Samples (one row per class)")
    for scale in [s for s in scales if s in GRID_SCALES] or scales[:1]:
        name = f"grid_scale_{scale:g}.png"
        guided_grid(pipe, report.path(name), scale, per_class=10, steps=steps, seed=seed, sampler=sampler)
        report.image(name, f"λ = {scale:g}")
    return report.write()
