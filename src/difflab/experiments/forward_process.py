"""Experiment ``forward-process``: x_t for a grid of t on real images, under several schedules (SPEC §2).

The paper's first experiment: draw ``x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`` in closed form (one ε per image, shared
across t and schedules so only the schedule differs), and plot the schedules' log-SNR curves.
"""

from __future__ import annotations

from pathlib import Path

import torch

from difflab.data import load_dataset
from difflab.experiments.report import Report
from difflab.paths import DiscretePath

SCHEDULES = {"linear": ("linear", False), "cosine": ("cosine", False), "sigmoid": ("sigmoid", False),
             "linear, zero terminal SNR": ("linear", True)}
DEFAULT_TIMES = (0, 50, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000)


def forward_process_images(path: DiscretePath, x0: torch.Tensor, times, eps: torch.Tensor) -> torch.Tensor:
    """``(len(times) · N, C, H, W)``: ``x_t`` of every image at every time (time-major, so a grid row is one t)."""
    rows = [path.sample(x0, torch.full((x0.shape[0],), t), eps)[0] for t in times]
    return torch.stack(rows, 1).reshape(-1, *x0.shape[1:])  # (N · len(times), ...): row = image, column = t


def plot_log_snr(paths: dict, out: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for name, path in paths.items():
        t = torch.arange(1, path.T + 1)
        ax.plot(t.numpy(), path.log_snr(t).clamp(min=-30).numpy(), label=name)
    ax.set_xlabel("step t")
    ax.set_ylabel("log SNR_t = log(ᾱ_t / (1 − ᾱ_t))  [nats]")
    ax.set_title("Noise schedules (T = 1000); zero terminal SNR clipped at −30")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def run(out_dir, dataset: str = "mnist5k", num_images: int = 4, times=DEFAULT_TIMES, T: int = 1000, seed: int = 0,
        data_path=None) -> Path:
    """Write ``forward_*.png`` (one per schedule: rows = images, columns = t), ``log_snr.png`` and the report."""
    from difflab.plotting import save_image_grid

    data = load_dataset(dataset, path=data_path, seed=seed)
    if data.kind != "image":
        raise ValueError(f"forward-process needs an image data set, {dataset!r} is {data.kind}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data), generator=g)[:num_images]
    x0 = data.x[idx].double()
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    report = Report(out_dir, f"Forward process on {dataset}")
    report.text(f"`x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε` drawn in closed form (SPEC §2), one ε per image shared by all t "
                f"and schedules; columns are t = {', '.join(map(str, times))} (T = {T}).")
    paths = {name: DiscretePath.from_schedule(s, T=T, zero_terminal_snr=z) for name, (s, z) in SCHEDULES.items()}
    rows = []
    for name, path in paths.items():
        fname = "forward_" + name.replace(", ", "_").replace(" ", "_") + ".png"
        save_image_grid(forward_process_images(path, x0, times, eps).float(), report.path(fname), nrow=len(times))
        report.heading(name, 3)
        report.image(fname, f"{name} schedule: each row one image, t increasing to the right")
        tt = torch.tensor([t for t in times if t > 0])
        rows.append({"schedule": name, **{f"ᾱ at t={int(t)}": float(path.alpha_bar[t]) for t in tt[:: max(1, len(tt) // 5)]}})
    plot_log_snr(paths, report.path("log_snr.png"))
    report.heading("Signal left at each step")
    report.table(rows, key="alpha_bar")
    report.image("log_snr.png", "log-SNR of each schedule")
    return report.write()
