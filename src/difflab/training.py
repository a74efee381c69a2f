"""The training loop: ``L = E_{t, x0, ε} w(t) ||target − target̂||²`` (SPEC §3) with AdamW.

:func:`train` runs one :class:`~difflab.config.RunConfig` into a run directory::

    run_dir/config.yaml          the config (rewritten on --resume with the new train.* values)
    run_dir/metrics.jsonl        {"step", "loss", "lr", "grad_norm", "samples_per_s", "elapsed"} per log
    run_dir/samples/step_*.png   DDIM samples of the EMA model (a scatter plot for 2-D points)
    run_dir/checkpoints/         safetensors + JSON (see :mod:`difflab.checkpoint`)
    run_dir/loss.png             the loss curve, at the end

Per step ``k`` (1-based; the 0-based index ``k − 1`` names its randomness):

1. the global batch: positions ``(k−1)·B … k·B − 1`` of an endless sequence of data-set permutations,
   one per epoch (sampling without replacement, as ``DistributedSampler`` does);
2. ``t ~ U{1..T}`` (or ``U[t_min, t_max]``), ``ε ~ N(0, I)`` and the label-dropout mask (a fraction
   ``p_uncond`` of labels becomes ``NULL_LABEL``, SPEC §7) for the whole global batch;
3. the loss :func:`~difflab.losses.diffusion_loss` through the run's
   :class:`~difflab.parameterization.NetworkDenoiser` (bf16 autocast on CUDA when enabled);
4. backward, gradient-norm clipping, the linear warm-up learning rate, AdamW, the EMA update.

Every random draw of step ``k`` comes from generators seeded by a hash of ``(seed, k − 1, stream)``
(the global torch RNG, used by dropout, is re-seeded the same way), so a step is a pure function of
the weights, the optimiser state and ``(seed, k)``: a run resumed from a checkpoint repeats the
uninterrupted run's loss sequence bit for bit on the CPU.

Distributed (``torchrun --nproc_per_node N difflab train ...``, env ``WORLD_SIZE > 1``): the process
group is initialised (gloo on CPU, NCCL on CUDA), the network wrapped in DistributedDataParallel,
and rank ``r`` takes rows ``r, r + N, r + 2N, …`` of the global batch, so ``train.batch_size`` is
the global batch (it must be divisible by ``N``) and the update equals the single-process one up to
floating-point summation order. Only rank 0 writes files, logs and shows progress; every rank reads
the run directory (for ``--resume`` it must be on a file system all ranks see).

A non-finite loss or gradient stops the run with :class:`TrainingError` before the optimiser step,
so no bad state is saved and the last checkpoint stays as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from difflab.checkpoint import (CHECKPOINT_DIR, atomic_write_bytes, has_checkpoint, load_checkpoint,
                                save_checkpoint)
from difflab.config import ConfigError, RunConfig, build_path, save_config
from difflab.ema import EMA
from difflab.flows import flow_matching_loss
from difflab.losses import diffusion_loss, sample_time
from difflab.optim import adamw
from difflab.pipeline import build_denoiser, build_model, generate

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
LOSS_CURVE = "loss.png"
RUN_ARTIFACTS = (CONFIG_FILE, METRICS_FILE, SAMPLES_DIR, CHECKPOINT_DIR, LOSS_CURVE)
"""What a run directory holds; ``overwrite=True`` removes exactly these (nothing else in the folder)."""

RESUME_MUST_MATCH = ("data", "model", "diffusion", "train.seed", "train.batch_size")
"""Config entries a resumed run must share with the checkpoint (the other ``train.*`` may change)."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a run directory in the way, nothing to resume, ...)."""


@dataclass
class TrainResult:
    """What :func:`train` returns: the last step, its loss (global batch mean), the run directory,
    the trained network (unwrapped, raw weights) and its :class:`~difflab.ema.EMA`."""

    step: int
    loss: float
    run_dir: Path
    net: nn.Module
    ema: EMA


# --- per-step randomness ----------------------------------------------------------------------------------
def step_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed that is a pure function of ``(seed, index, stream)`` (BLAKE2b; no process state)."""
    digest = hashlib.blake2b(f"{seed}/{index}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the ``n`` examples (long ``[n]``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, "epoch")))


def batch_indices(n: int, batch_size: int, seed: int, index: int) -> torch.Tensor:
    """Data indices of the global batch of step ``index`` (0-based): positions ``index·B … index·B + B − 1``
    of the concatenated epoch permutations (each example once per epoch), long ``[B]``."""
    position, remaining, parts = index * batch_size, batch_size, []
    while remaining:
        epoch, offset = divmod(position, n)
        take = min(n - offset, remaining)
        parts.append(epoch_permutation(n, seed, epoch)[offset:offset + take])
        position, remaining = position + take, remaining - take
    return torch.cat(parts)


def learning_rate(cfg_train, step: int) -> float:
    """``lr · min(1, step / warmup_steps)`` for optimiser step ``step`` (1-based); constant after warm-up."""
    if cfg_train.warmup_steps <= 0:
        return cfg_train.lr
    return cfg_train.lr * min(1.0, step / cfg_train.warmup_steps)


# --- distributed context -------------------------------------------------------------------------------------
@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _resolve_device(preference: str, explicit=None) -> torch.device:
    if explicit is not None:
        return torch.device(explicit)
    if preference == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def _init_distributed(device: torch.device) -> _Dist:
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), created=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _Dist(dist.get_rank(), dist.get_world_size(), created=True)


def _autocast_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    if mode == "bf16":
        return torch.bfloat16
    if mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


# --- the run directory -----------------------------------------------------------------------------------------
def run_exists(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR))


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume and overwrite:
        raise TrainingError("choose --resume or --overwrite, not both")
    if resume and not has_checkpoint(run_dir):
        raise TrainingError(f"nothing to resume in {str(run_dir)!r}: it has no checkpoint "
                            "(start it without --resume, or with --overwrite)")
    if not resume and not overwrite and run_exists(run_dir):
        raise TrainingError(f"{str(run_dir)!r} already holds a run: pass --resume to continue it "
                            "or --overwrite to replace it")


def _clear_run_dir(run_dir: Path) -> None:
    for name in RUN_ARTIFACTS:
        p = run_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _check_resumable(cfg: RunConfig, saved: RunConfig) -> None:
    new, old = cfg.to_dict(), saved.to_dict()
    for key in RESUME_MUST_MATCH:
        section, _, name = key.partition(".")
        a, b = (new[section], old[section]) if not name else (new[section][name], old[section][name])
        if a != b:
            if not name:
                diff = [k for k in a if a[k] != b.get(k)]
                key, a, b = f"{section}.{diff[0]}", a[diff[0]], b.get(diff[0])
            raise TrainingError(f"cannot resume with a different {key} ({a!r}; the run has {b!r})")


def _truncate_metrics(path: Path, step: int, log_every: int) -> None:
    """Drop the log records a resumed run will write again (atomic rewrite): those after the checkpoint,
    and the checkpoint step's own record when it closed a run mid-window (the resumed run continues
    that window and logs it at the next multiple of ``log_every``)."""
    if not path.exists():
        return
    records = [line for line in path.read_text().splitlines() if line.strip()]
    keep = [line for line in records if (s := json.loads(line)["step"]) < step or (s == step and s % log_every == 0)]
    atomic_write_bytes(path, "".join(line + "\n" for line in keep).encode())


# --- training ----------------------------------------------------------------------------------------------------
def train(cfg: RunConfig, run_dir: Union[str, Path], resume: bool = False, overwrite: bool = False,
          dataset=None, progress: bool = True, device=None,
          on_log: Optional[Callable[[dict], None]] = None) -> TrainResult:
    """Train the model ``cfg`` describes, writing into ``run_dir`` (see the module docstring).

    Args:
        cfg: a validated :class:`~difflab.config.RunConfig`.
        run_dir: the run directory; one that already holds a run is refused unless ``resume`` (continue
            from its latest checkpoint up to ``cfg.train.steps``) or ``overwrite`` (replace it).
        dataset: an ``ArrayDataset`` to use instead of loading ``cfg.data`` (e.g. from a demo).
        progress: show the progress bar and a one-line summary (rank 0 only).
        device: force a device (default: ``cfg.train.device``; under torchrun ``cuda:LOCAL_RANK``).
        on_log: called on rank 0 with every metrics record.
    Returns: :class:`TrainResult`.
    Raises: :class:`TrainingError` (non-finite loss, run-directory conflicts), ``ConfigError``, ``DataError``.
    """
    cfg.validate()
    run_dir = Path(run_dir)
    device = _resolve_device(cfg.train.device, device)
    ctx = _init_distributed(device)
    try:
        return _train(cfg, run_dir, resume, overwrite, dataset, progress, device, ctx, on_log)
    finally:
        if ctx.created:
            dist.destroy_process_group()


def _train(cfg: RunConfig, run_dir: Path, resume: bool, overwrite: bool, dataset, progress: bool,
           device: torch.device, ctx: _Dist, on_log) -> TrainResult:
    tc = cfg.train
    if tc.num_threads > 0:
        torch.set_num_threads(tc.num_threads)
    if tc.batch_size % ctx.world:
        raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the number of processes ({ctx.world})")
    _check_run_dir(run_dir, resume, overwrite)  # every rank checks the same files before anyone writes
    ckpt = load_checkpoint(run_dir, map_location=device) if resume else None
    if ckpt is not None:
        _check_resumable(cfg, ckpt.config)
    ctx.barrier()
    if ctx.main:
        if overwrite:
            _clear_run_dir(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / CONFIG_FILE)
        if ckpt is not None:
            _truncate_metrics(run_dir / METRICS_FILE, ckpt.step, tc.log_every)

    # data
    if dataset is None:
        from difflab.data import load_dataset

        dataset = load_dataset(cfg.data.name, path=cfg.data.path, n=cfg.data.n, seed=tc.seed, **cfg.data.options)
    x_data = dataset.x.to(device)  # (N, *data_shape)
    n, data_shape = x_data.shape[0], tuple(x_data.shape[1:])
    num_classes = 0
    if cfg.model.conditional:
        if dataset.y is None or not dataset.num_classes:
            raise ConfigError(f"model.conditional needs class labels, and data set {cfg.data.name!r} has none")
        num_classes = int(dataset.num_classes)
        y_data = dataset.y.to(device).long()

    # model, objective, optimiser
    path = build_path(cfg.diffusion)
    _seed_global_rng(step_seed(tc.seed, -1, "init"), device)
    net = build_model(cfg, data_shape, num_classes).to(device)
    ema = EMA(net, tc.ema_decay, tc.ema_start)
    optimizer = adamw(net.parameters(), lr=learning_rate(tc, 1), weight_decay=tc.weight_decay)
    book = {"window_loss": 0.0, "window_grad_norm": 0.0, "window_count": 0, "elapsed": 0.0, "loss": float("nan")}
    start = 0
    if ckpt is not None:
        net.load_state_dict(ckpt.model)
        ema.load_state_dict(ckpt.ema)
        optimizer.load_state_dict(ckpt.optimizer)
        book.update(ckpt.meta["bookkeeping"])
        start = ckpt.step
    model = net
    if ctx.world > 1:
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    denoiser = build_denoiser(cfg, model, path)
    sample_denoiser = build_denoiser(cfg, net, path)  # rank-0 sampling must not go through DDP's collectives
    amp_dtype = _autocast_dtype(tc.mixed_precision, device)
    num_params = sum(p.numel() for p in net.parameters())
    meta = {"data_shape": list(data_shape), "num_classes": num_classes, "data_kind": getattr(dataset, "kind", None),
            "num_examples": n, "path": path.config() if hasattr(path, "config") else {"kind": cfg.diffusion.path},
            "target": cfg.diffusion.target, "learned_variance": cfg.model.learned_variance,
            "num_parameters": num_params, "world_size": ctx.world,
            "rng": {"scheme": "blake2b(seed/index/stream) per step", "seed": tc.seed}}

    show = progress and ctx.main
    if show:
        print(f"difflab: {cfg.model.kind} with {num_params:,} parameters; {n} examples of shape {data_shape}; "
              f"{cfg.diffusion.path} path, target {cfg.diffusion.target}; device {device}"
              f"{f' x {ctx.world} processes' if ctx.world > 1 else ''}"
              f"{'; bf16 autocast' if amp_dtype is not None else ''}", flush=True)
    last_saved = start if ckpt is not None else None
    bar = tqdm(total=tc.steps, initial=start, disable=not show, desc="training", dynamic_ncols=True)
    mine = slice(ctx.rank, None, ctx.world)
    window_time, window_steps, t_start = time.perf_counter(), 0, time.perf_counter()
    elapsed_before = float(book["elapsed"])
    net.train()
    for index in range(start, tc.steps):
        k = index + 1
        _seed_global_rng(step_seed(tc.seed, index, f"torch/{ctx.rank}"), device)  # dropout & co.
        gen = torch.Generator().manual_seed(step_seed(tc.seed, index, "batch"))
        idx = batch_indices(n, tc.batch_size, tc.seed, index)[mine].to(device)
        t = sample_time(path, tc.batch_size, gen)[mine].to(device)
        eps = torch.randn((tc.batch_size, *data_shape), generator=gen)[mine].to(device)
        cond = {}
        if num_classes:
            drop = (torch.rand(tc.batch_size, generator=gen) < tc.p_uncond)[mine].to(device)
            y = y_data[idx]
            cond["y"] = torch.where(drop, torch.full_like(y, _null_label()), y)

        lr = learning_rate(tc, k)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, amp_dtype):
            if cfg.diffusion.coupling == "ot":  # flow matching on minibatch-OT pairs (SPEC §6)
                loss = flow_matching_loss(denoiser, x_data[idx], "ot", eps=eps, t=t, **cond).mean()
            else:
                loss = diffusion_loss(denoiser, x_data[idx], cfg.diffusion.weighting, t=t, eps=eps,
                                      min_snr_gamma=cfg.diffusion.min_snr_gamma, **cond).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        loss_global = loss.detach().float()
        if ctx.world > 1:
            dist.all_reduce(loss_global)
            loss_global /= ctx.world
        loss_value, grad_value = float(loss_global), float(grad_norm)
        if not (math.isfinite(loss_value) and math.isfinite(grad_value)):
            bar.close()
            kept = f"the last good checkpoint (step {last_saved}) is intact" if last_saved else "no checkpoint was written"
            raise TrainingError(f"non-finite training loss ({loss_value}) or gradient norm ({grad_value}) at step {k}: "
                                f"stopped without saving; {kept} in {str(run_dir)!r}")
        optimizer.step()
        ema.update(net, k)

        book["loss"] = loss_value
        book["window_loss"] += loss_value
        book["window_grad_norm"] += grad_value
        book["window_count"] += 1
        window_steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        now = time.perf_counter()
        book["elapsed"] = elapsed_before + (now - t_start)
        if ctx.main and (k % tc.log_every == 0 or k == tc.steps):
            speed = window_steps * tc.batch_size / max(now - window_time, 1e-9)
            record = {"step": k, "loss": book["window_loss"] / book["window_count"], "lr": lr,
                      "grad_norm": book["window_grad_norm"] / book["window_count"],
                      "samples_per_s": speed, "elapsed": book["elapsed"]}
            with open(run_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{speed:.0f}", refresh=False)
            if on_log is not None:
                on_log(record)
        if k % tc.log_every == 0:  # every rank resets, so checkpoints agree; a run that ends mid-window
            book.update(window_loss=0.0, window_grad_norm=0.0, window_count=0)  # keeps it open for a resume
            window_time, window_steps = time.perf_counter(), 0
        if ctx.main and tc.sample_every and k % tc.sample_every == 0:
            _save_samples(cfg, sample_denoiser, net, ema, data_shape, num_classes, x_data, run_dir, k, device)
        if ctx.main and ((tc.checkpoint_every and k % tc.checkpoint_every == 0) or k == tc.steps):
            _checkpoint(run_dir, k, cfg, net, ema, optimizer, meta, book)
            last_saved = k
    bar.close()
    if ctx.main and start < tc.steps and (run_dir / METRICS_FILE).exists():
        from difflab.plotting import save_loss_curve

        save_loss_curve(run_dir / METRICS_FILE, run_dir / LOSS_CURVE)
    if show:
        print(f"difflab: trained to step {tc.steps}, loss {book['loss']:.4f}, run in {run_dir}", flush=True)
    ctx.barrier()
    return TrainResult(step=max(start, tc.steps), loss=book["loss"], run_dir=run_dir, net=net, ema=ema)


def _seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed torch's default generators of the CPU and of ``device`` (not ``torch.manual_seed``, which
    also queues a lazy seeding of every accelerator type on each call)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


def _autocast(device: torch.device, dtype: Optional[torch.dtype]):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def _null_label() -> int:
    from difflab.networks import NULL_LABEL

    return NULL_LABEL


def _checkpoint(run_dir: Path, step: int, cfg: RunConfig, net: nn.Module, ema: EMA, optimizer, meta: dict,
                book: dict) -> None:
    save_checkpoint(run_dir, step, cfg, net.state_dict(), ema.state_dict(), optimizer.state_dict(),
                    meta={**meta, "bookkeeping": dict(book)}, keep=cfg.train.keep_checkpoints)


@torch.no_grad()
def _save_samples(cfg: RunConfig, denoiser, net: nn.Module, ema: EMA, data_shape: tuple, num_classes: int,
                  x_data: torch.Tensor, run_dir: Path, step: int, device: torch.device) -> Optional[Path]:
    """DDIM samples of the EMA model as ``samples/step_XXXXXXXX.png`` (a scatter plot for 2-D points)."""
    from difflab.plotting import save_image_grid, save_scatter

    tc = cfg.train
    steps = min(tc.sample_steps, getattr(denoiser.path, "T", tc.sample_steps))
    y = torch.arange(tc.num_sample_images) % num_classes if num_classes else None
    generator = torch.Generator().manual_seed(step_seed(tc.seed, 0, "samples"))  # the same noise every time
    with ema.swapped_in(net):
        net.eval()
        try:
            x = generate(denoiser, data_shape, tc.num_sample_images, "ddim", steps, generator, y, device=device).x
        finally:
            net.train()
    out = run_dir / SAMPLES_DIR / f"step_{step:08d}.png"
    if len(data_shape) == 1 and data_shape[0] == 2:
        return save_scatter(x, out, reference=x_data[:2000].cpu(), title=f"step {step}", labels=y)
    if len(data_shape) == 3:
        return save_image_grid(x, out, nrow=num_classes or None)
    return None  # other vector data has no picture
