"""Training a diffusion or flow model from a run config: :func:`train` runs the diffusion objective
(:class:`~difflab.objectives.diffusion.DiffusionObjective`, ``L = E_{t, x0, ε} w(t) ||target − target̂||²``,
SPEC §3) on the engine (:mod:`difflab.engine`) into a run directory::

    run_dir/config.yaml          the config (rewritten on --resume with the new train.* values)
    run_dir/metrics.jsonl        {"step", "loss", "grad_norm", "lr", "samples_per_s", "elapsed"} per log
    run_dir/samples/step_*.png   DDIM samples of the EMA model (a scatter plot for 2-D points)
    run_dir/checkpoints/         safetensors + JSON (see :mod:`difflab.checkpoint`)
    run_dir/tensorboard/         with ``train.log_to: [jsonl, tensorboard]``
    run_dir/loss.png             the loss curve, at the end

Every random draw of step ``k`` comes from generators seeded by ``(seed, k − 1, stream)``, so a run resumed
from a checkpoint repeats the uninterrupted run's losses and weights bit for bit on the CPU. Under ``torchrun``
``train.batch_size`` is the global batch, split over the ranks; only rank 0 writes. A non-finite loss, gradient
or weight, or a loss far above its running level, stops the run and keeps only checkpoints from before it
(:mod:`difflab.engine.loop`). The run directory is locked while in use, and ``--overwrite`` clears the old run
only once the new one's config, data and model are built (:mod:`difflab.engine.rundir`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Union

from torch import nn

from difflab.config import ConfigError, RunConfig
from difflab.ema import EMA
from difflab.engine import Engine, RunDir, Settings, TrainingError
from difflab.engine.rundir import CONFIG_FILE, LOSS_CURVE, METRICS_FILE, SAMPLES_DIR
from difflab.engine.stream import batch_indices, epoch_permutation, init_distributed, resolve_device, step_seed
from difflab.objectives.diffusion import RESUME_MUST_MATCH, DiffusionObjective

__all__ = ["train", "train_objective", "TrainResult", "TrainingError", "learning_rate", "run_exists", "step_seed", "batch_indices",
           "epoch_permutation", "CONFIG_FILE", "METRICS_FILE", "SAMPLES_DIR", "LOSS_CURVE", "RESUME_MUST_MATCH"]


@dataclass
class TrainResult:
    """What :func:`train` returns: the last step, its loss (global batch mean), the run directory,
    the trained network (unwrapped, raw weights) and its :class:`~difflab.ema.EMA`."""

    step: int
    loss: float
    run_dir: Path
    net: nn.Module
    ema: EMA


def learning_rate(cfg_train, step: int) -> float:
    """``lr · min(1, step / warmup_steps)`` for optimiser step ``step`` (1-based); constant after warm-up."""
    from difflab.engine import linear_warmup

    return cfg_train.lr * linear_warmup(cfg_train.warmup_steps)(step)


def run_exists(run_dir: Union[str, Path]) -> bool:
    """Whether ``run_dir`` holds a difflab run."""
    return RunDir(run_dir).holds_run()


def train_objective(cfg: RunConfig, run_dir: Union[str, Path], build: Callable, artifacts: tuple, noun: str,
                    resume: bool = False, overwrite: bool = False, progress: bool = True, device=None, **settings):
    """Fit the objective ``build(device)`` returns on the engine into ``run_dir`` (a ``noun`` directory holding
    ``artifacts``): check the directory early, set ``train.num_threads``, resolve the device, open the process
    context, run :meth:`Engine.fit` with ``train.*`` and the ``settings`` changes. Returns ``(objective, main)``,
    ``main`` whether this process is rank 0."""
    import torch

    cfg.validate()
    RunDir(run_dir, artifacts, noun=noun).check(resume, overwrite)
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = resolve_device(cfg.train.device, device)
    ctx = init_distributed(device)
    try:
        objective = build(device)
        Engine(objective, Settings.from_train(cfg.train, **settings), run_dir, device, ctx, progress,
               noun=noun).fit(resume, overwrite)
    finally:
        ctx.close()
    return objective, ctx.main


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
    Raises: :class:`TrainingError` (divergence, run-directory conflicts), ``ConfigError``, ``DataError``.
    """
    import torch

    cfg.validate()
    tc = cfg.train
    RunDir(run_dir).check(resume, overwrite)  # early, before the data are loaded; checked again under the lock
    device = resolve_device(tc.device, device)
    ctx = init_distributed(device)
    try:
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        if tc.batch_size % ctx.world:
            raise ConfigError(f"train.batch_size={tc.batch_size} must be divisible by the number of processes "
                              f"({ctx.world})")
        from difflab.latent import training_data
        from difflab.objectives.latent import LatentDiffusionObjective

        if dataset is None:
            dataset = training_data(cfg)
        if cfg.diffusion.objective == "ddgan":  # SPEC §5: generator and discriminator
            from difflab.objectives.ddgan import DDGANObjective

            objective = DDGANObjective(cfg, dataset, device)
        elif cfg.diffusion.objective == "matryoshka":  # SPEC §5: two resolutions jointly
            from difflab.objectives.matryoshka import MatryoshkaObjective

            objective = MatryoshkaObjective(cfg, dataset, device)
        elif cfg.data.autoencoder is not None:
            objective = LatentDiffusionObjective(cfg, dataset, device)
        else:
            objective = DiffusionObjective(cfg, dataset, device)
        engine = Engine(objective, Settings.from_train(tc), run_dir, device, ctx, progress, on_log)
        result = engine.fit(resume=resume, overwrite=overwrite)
        return TrainResult(step=result.step, loss=result.metrics.get("loss", float("nan")), run_dir=Path(run_dir),
                           net=objective.net, ema=engine.emas["net"])
    finally:
        ctx.close()
