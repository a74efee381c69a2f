"""What the trained-model experiments share: small built-in runs, one quality number with its noise floor,
timed sampling, exact KL on the Gaussian bed, and the figures (labelled axes, units in brackets).

Quality (SPEC §8) is one headline number per sample set, chosen by the data kind, always next to its
real-vs-real noise floor at the same sample counts (:func:`difflab.evaluation.evaluate_samples`):

- points: sliced Wasserstein-2 to held-out data, in data units;
- images: the Fréchet distance in the feature space of a classifier trained on the data set
  (``FD-<dataset>``; not Inception FID — see :mod:`difflab.evaluation.features`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from difflab.config import RunConfig

# The built-in small run: two moons and a residual MLP. Full: about a minute of training on one core;
# quick: a few seconds (and T = 100, so that a full-length DDPM chain stays cheap).
SMALL_RUN = {"data": {"name": "two_moons", "n": 10_000},
             "model": {"kind": "mlp", "hidden": 128, "depth": 3, "time_dim": 64},
             "diffusion": {"path": "discrete", "schedule": "cosine", "T": 1000, "target": "v"},
             "train": {"steps": 2000, "batch_size": 256, "lr": 2e-3, "warmup_steps": 100, "ema_decay": 0.995,
                       "log_every": 50, "sample_every": 0, "checkpoint_every": 0, "num_threads": 1}}
QUICK_RUN = {"data": {"n": 1000}, "model": {"hidden": 32, "depth": 2, "time_dim": 16},
             "diffusion": {"T": 100}, "train": {"steps": 60, "batch_size": 128, "lr": 3e-3, "warmup_steps": 0,
                                                 "ema_decay": 0.9, "log_every": 10}}


def merged(base: dict, *updates: dict) -> dict:
    """``base`` updated section by section (a nested copy; ``base`` is not changed)."""
    out = {section: dict(values) for section, values in base.items()}
    for update in updates:
        for section, values in update.items():
            out.setdefault(section, {}).update(values)
    return out


def small_config(quick: bool, seed: int = 0, **sections: dict) -> RunConfig:
    """:data:`SMALL_RUN` (or its quick version) with ``seed`` and per-section overrides, validated."""
    raw = merged(SMALL_RUN, QUICK_RUN if quick else {}, {"train": {"seed": seed}}, sections)
    return RunConfig.from_dict(raw)


def describe_config(cfg: RunConfig) -> str:
    """One line naming the data, network, path and training budget of a run."""
    m, d, t = cfg.model, cfg.diffusion, cfg.train
    net = f"MLP (hidden {m.hidden}, depth {m.depth})" if m.kind == "mlp" else f"U-Net (base {m.base_channels})"
    n = f" (n = {cfg.data.n})" if cfg.data.n else ""
    zero = ", zero terminal SNR" if d.zero_terminal_snr else ""
    return (f"{cfg.data.name}{n}, {net}, {d.path} path ({d.schedule}{zero}, T = {d.T}), target {d.target}; "
            f"{t.steps} steps of batch {t.batch_size}, lr {t.lr:g}, seed {t.seed}")


def train_quietly(cfg: RunConfig, run_dir: Path):
    """Train ``cfg`` into ``run_dir`` (replacing what is there) without progress output; returns the pipeline."""
    from difflab.pipeline import load_run
    from difflab.training import train

    train(cfg, run_dir, overwrite=True, progress=False)
    return load_run(run_dir, device="cpu")


def trained_or_built_in(run_dir, out_dir: Path, quick: bool, seed: int, report) -> "object":
    """``load_run(run_dir)``, or (without a run) train the built-in small run into ``out_dir/runs/built-in`` first
    (``runs/`` folders are ignored by git, so a committed report folder holds no checkpoints).

    Says in ``report`` which model the experiment uses.
    """
    from difflab.pipeline import load_run

    if run_dir is not None:
        pipe = load_run(run_dir, device="cpu")
        report.text(f"Model: the trained run `{run_dir}` (step {pipe.step}, EMA weights): "
                    f"{describe_config(pipe.config)}.")
        return pipe
    cfg = small_config(quick, seed)
    start = time.perf_counter()
    pipe = train_quietly(cfg, out_dir / "runs" / "built-in")
    report.text(f"Model: no run was given, so the built-in small run was trained first "
                f"({time.perf_counter() - start:.0f} s): {describe_config(cfg)}.")
    return pipe


def provenance(report, started: float) -> None:
    """A closing section: the command (when run from the CLI), the wall time, the machine and the versions."""
    import os
    import platform
    import sys

    import numpy

    lines = []
    if Path(sys.argv[0]).name == "difflab":
        lines.append(f"- command: `difflab {' '.join(sys.argv[1:])}`")
    lines += [f"- wall time: {time.perf_counter() - started:.0f} s",
              f"- machine: {platform.machine()}, {os.cpu_count()} CPUs visible, torch threads "
              f"{torch.get_num_threads()}, {platform.system()} {platform.release()}",
              f"- versions: Python {platform.python_version()}, torch {torch.__version__}, numpy {numpy.__version__}"]
    report.heading("How this was run")
    report.text("\n".join(lines))


# --- quality ----------------------------------------------------------------------------------------------
@dataclass
class Reference:
    """Held-out data to score samples against, and how (the feature network for images)."""

    x: torch.Tensor
    kind: str  # "points" or "image"
    description: str
    dataset: Optional[str] = None
    feature_net: Optional[object] = None

    @property
    def metric(self) -> str:
        return "sliced_w2" if self.kind == "points" else f"FD-{self.dataset}"

    @property
    def unit(self) -> str:
        return "data units" if self.kind == "points" else "squared feature units"

    def max_samples(self) -> int:
        """The noise floor splits the reference in halves: samples beyond one half are not used."""
        return self.x.shape[0] // 2


def reference_for(cfg: RunConfig) -> Reference:
    """The data a run's samples are scored against: held-out draws for generated point sets, the data set
    itself for images (with its cached feature network, trained on first use)."""
    from difflab.evaluation import feature_network
    from difflab.evaluation.evaluate import _reference_data

    ds, description = _reference_data(cfg, None)
    if ds.kind != "image":
        return Reference(ds.x.reshape(ds.x.shape[0], -1), "points", description)
    net, _ = feature_network(cfg.data.name, ds.x, ds.y, ds.num_classes or None)
    return Reference(ds.x, "image", description, cfg.data.name, net)


def quality(samples: torch.Tensor, ref: Reference, seed: int = 0) -> dict:
    """``{"metric", "value", "noise_floor", "n_samples", "n_reference"}``: the headline metric (SPEC §8)."""
    from difflab.evaluation import evaluate_samples

    x = samples.reshape(samples.shape[0], -1) if ref.kind == "points" else samples
    res = evaluate_samples(x, ref.x, ref.kind, dataset=ref.dataset, feature_net=ref.feature_net, seed=seed)
    entry = res["metrics"][ref.metric]
    return {"metric": ref.metric, "value": float(entry["value"]), "noise_floor": float(entry["noise_floor"]),
            "n_samples": entry["n_samples"], "n_reference": entry["n_reference"]}


def timed(fn: Callable, *args, **kwargs):
    """``(fn(*args, **kwargs), wall seconds)``."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def exact_kl(bed, sample_fn: Callable[[torch.Tensor], torch.Tensor], prior_std: float) -> float:
    """Exact ``KL(output ‖ data)`` in nats of a deterministic sampler on a single-Gaussian bed (SPEC §8):
    the sampler is affine in ``x_T`` there, so its output is exactly Gaussian
    (:func:`difflab.testbeds.affine_pushforward`)."""
    from difflab.testbeds import affine_pushforward

    mean, cov = affine_pushforward(sample_fn, bed.D, prior_std=prior_std)
    return float(bed.kl_from_gaussian(mean, cov))


# --- figures ---------------------------------------------------------------------------------------------
def series_by(rows: Sequence[dict], group: str, x: str, y: str, labels: Optional[dict] = None) -> dict:
    """``{label: (xs, ys)}`` for :func:`line_plot`: the rows grouped by ``rows[i][group]`` in order of appearance
    (``labels`` renames groups)."""
    series: dict = {}
    for r in rows:
        xs, ys = series.setdefault((labels or {}).get(r[group], r[group]), ([], []))
        xs.append(r[x])
        ys.append(r[y])
    return series


def line_plot(out: Path, series: dict, xlabel: str, ylabel: str, title: str, logx: bool = False,
              logy: bool = False, hlines: Optional[dict] = None, markers: bool = True,
              legend: Optional[dict] = None) -> Path:
    """One axes: ``series`` maps a label to ``(x, y)``; ``hlines`` maps a label to a horizontal reference value;
    ``legend``: keyword arguments for the legend (e.g. ``ncol``, ``loc``)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    for label, (x, y) in series.items():
        ax.plot(list(x), list(y), marker="o" if markers else None, ms=4, lw=1.4, label=label)
    for i, (label, value) in enumerate((hlines or {}).items()):
        ax.axhline(value, ls="--", lw=1, color=f"0.{3 + 2 * i}", label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize="medium")
    ax.grid(alpha=0.3, which="both")
    ax.legend(**{"fontsize": "small", **(legend or {})})
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.12, top=0.92)  # fixed margins: tight_layout costs seconds
    fig.savefig(out, dpi=120)
    return out


def sample_panels(out: Path, panels: Sequence[tuple], reference: Optional[torch.Tensor] = None,
                  max_points: int = 2000, max_images: int = 64) -> Path:
    """Side-by-side samples, one panel per ``(title, samples)``: scatter plots for 2-D points (over grey
    ``reference`` data) or image grids for images ``(N, C, H, W)``."""
    from matplotlib.figure import Figure

    from difflab.plotting import image_grid

    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 3.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, (title, x) in zip(axes, panels):
        x = torch.as_tensor(x).detach().float().cpu()
        if x.ndim == 2 and x.shape[1] == 2:
            if reference is not None:
                ax.scatter(reference[:max_points, 0], reference[:max_points, 1], s=1, c="0.8")
            ax.scatter(x[:max_points, 0], x[:max_points, 1], s=1, c="C0")
            ax.set_xlabel("x₁")
            ax.set_ylabel("x₂")
            ax.set_aspect("equal", adjustable="datalim")
        else:
            grid = image_grid(x[:max_images])
            ax.imshow(grid[..., 0] if grid.shape[-1] == 1 else grid, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(title, fontsize="small")
    for ax in axes[n:]:
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out
