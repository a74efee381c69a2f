"""The training engine: one loop for every objective, with every guarantee written once.

An :class:`Objective` names its trainable modules (:class:`Trainable`: the module, its AdamW settings,
learning-rate schedule, gradient clipping and optional EMA) and does one step on a batch through a
:class:`StepContext`; :class:`Engine` does everything else:

- the data stream (:mod:`difflab.engine.stream`): per-step seeded generators, the step's batch positions,
  each rank's rows under ``torchrun`` (DistributedDataParallel around every trainable module);
- per step and module: the scheduled learning rate, backward, gradient-norm clipping, AdamW, the EMA update
  (:meth:`StepContext.optimize`); bf16 autocast on CUDA (:meth:`StepContext.autocast`); opt-in ``torch.compile``;
- the progress bar, log records (window means of the objective's named metrics, learning rates, gradient
  norms, throughput) to ``metrics.jsonl`` and optionally TensorBoard (:mod:`difflab.engine.sinks`), sample hooks;
- atomic safetensors + JSON checkpoints of every module, EMA and optimiser (:mod:`difflab.checkpoint`): the first
  module as the parts ``model``/``ema``/``optimizer`` (what ``difflab sample`` reads), any other module ``m``
  as ``module/m``, ``ema/m``, ``optimizer/m``; bit-exact ``--resume``; only rank 0 writes;
- the run directory's lock, overwrite-after-validation and repairs (:mod:`difflab.engine.rundir`);
- the divergence stop (below).

Divergence. After every step the engine checks that every metric is finite, that each metric in
``objective.monitor`` stays below ``divergence_factor`` × its running level (an exponential average with
weight :data:`LEVEL_DECAY` of its earlier values), and that every weight and EMA weight is finite (their norms
do not overflow). A loss is computed with the weights of the step before, so a bad loss at step ``k`` condemns
the state of step ``k − 1``: a checkpoint counts as *verified* once the step after it passed, and on a divergence
the unverified checkpoint of step ``k − 1`` is removed (``latest.json`` moves back to the verified one, which
pruning never removes). Non-finite weights after step ``k`` are caught before any save. So a diverged run never
leaves a checkpoint with non-finite weights, nor one whose weights produced the divergent loss.

Writing an objective (a regression, say)::

    class Regression(Objective):
        def __init__(self, x, y):
            self.x, self.y = x, y
            self.trainables = {"net": Trainable(nn.Linear(3, 1), lr=1e-2, grad_clip=1.0, ema_decay=0.99)}

        def step(self, ctx):
            idx = ctx.indices(len(self.x))                     # this rank's rows of the seeded global batch
            with ctx.autocast():
                loss = (ctx.net("net")(self.x[idx]) - self.y[idx]).pow(2).mean()
            ctx.optimize("net", loss)                          # backward, clip, AdamW, EMA
            return {"loss": loss.detach()}

    Engine(Regression(x, y), Settings(steps=100, batch_size=32), run_dir="runs/reg").fit()

Two optimisers (a GAN) are two trainables and two ``ctx.optimize`` calls in one ``step``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from difflab.compilation import maybe_compile
from difflab.checkpoint import Checkpoint, atomic_write_bytes, list_checkpoints, load_checkpoint, save_checkpoint
from difflab.ema import EMA
from difflab.engine.errors import TrainingError
from difflab.engine.rundir import CONFIG_FILE, LOSS_CURVE, SAMPLES_DIR, RunDir
from difflab.engine.sinks import open_sinks
from difflab.engine.stream import Dist, autocast, autocast_dtype, batch_indices, seed_global_rng, step_seed
from difflab.optim import adamw

LEVEL_DECAY = 0.9
"""The running level of a monitored metric: ``level ← 0.9 level + 0.1 value`` after each step that passed."""
MAIN_PARTS = ("model", "ema", "optimizer")


# --- what an objective declares -----------------------------------------------------------------------------
def constant(step: int) -> float:
    """The learning-rate multiplier 1 at every step."""
    return 1.0


def linear_warmup(warmup_steps: int) -> Callable[[int], float]:
    """``min(1, k / warmup_steps)`` at optimiser step ``k`` (1-based); constant 1 after (and with no warm-up)."""
    if warmup_steps <= 0:
        return constant
    return lambda step: min(1.0, step / warmup_steps)


def cosine_decay(total_steps: int) -> Callable[[int], float]:
    """``½ (1 + cos(π (k − 1) / total_steps))``: from 1 at step 1 towards 0 (``CosineAnnealingLR``'s values)."""
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * (step - 1) / total_steps))


@dataclass
class Trainable:
    """A module the engine trains: AdamW(``lr · schedule(k)``, ``betas``, ``weight_decay``) on its parameters
    that require gradients, gradient-norm clipping at ``grad_clip`` (0: measured, not clipped) and, with
    ``ema_decay``, an :class:`~difflab.ema.EMA` starting after ``ema_start`` steps."""

    module: nn.Module
    lr: float
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    schedule: Callable[[int], float] = constant
    grad_clip: float = 0.0
    ema_decay: Optional[float] = None
    ema_start: int = 0


class Objective:
    """What is trained and how one step goes; subclasses set :attr:`trainables` and implement :meth:`step`.

    Attributes:
        trainables: ``{name: Trainable}``; the first is the main module (checkpoint parts ``model``/``ema``/``optimizer``).
        config: the run's :class:`~difflab.config.RunConfig` (written to ``config.yaml`` and every checkpoint).
        stream: the name of the per-step generator's stream (see :func:`~difflab.engine.stream.step_seed`).
        monitor: the metrics the divergence check follows (each must be ≥ 0).
        artifacts: file names the objective writes into the run directory (``--overwrite`` removes them).
    """

    trainables: dict
    config = None
    stream: str = "batch"
    monitor: tuple = ("loss",)
    artifacts: tuple = ()

    def step(self, ctx: "StepContext") -> dict:
        """One optimiser step on the step's batch: draw from ``ctx``, call ``ctx.optimize(name, loss)`` for each
        module it updates, return ``{name: 0-d tensor}`` per-step metrics (global-batch means)."""
        raise NotImplementedError

    def sample(self, engine: "Engine", step: int, out: Path) -> Optional[Path]:
        """Optional hook every ``sample_every`` steps on rank 0: write a picture to ``out`` and return it."""
        return None

    def meta(self) -> dict:
        """JSON-serialisable facts stored in every checkpoint (data shape, ...)."""
        return {}

    def describe(self) -> str:
        """The one-line summary printed at the start."""
        return type(self).__name__

    def begin(self, engine: "Engine") -> None:
        """Optional hook on rank 0 once the run directory is prepared (locked, cleared on overwrite, config
        written), before the first step: files the run needs from the start (e.g. a latent run's autoencoder)."""

    def finish(self, engine: "Engine", step: int) -> None:
        """Optional hook on every rank after the last step (inside the run directory's lock): final measurements
        and artefacts (write files on ``engine.dist.main`` only)."""

    def check_resumable(self, saved_config) -> None:
        """Raise :class:`TrainingError` when a checkpoint with ``saved_config`` cannot be continued by this objective."""


def require_same(config, saved, keys: Sequence[str]) -> None:
    """Refuse to resume when any of ``keys`` (a section, or ``section.name``) differs between ``config`` and the
    checkpoint's ``saved`` config; the message names the first differing dotted key."""
    new, old = config.to_dict(), saved.to_dict()
    for key in keys:
        section, _, name = key.partition(".")
        a, b = (new[section], old[section]) if not name else (new[section][name], old[section].get(name))
        if a != b:
            if not name:
                diff = [k for k in a if a[k] != b.get(k)]
                key, a, b = f"{section}.{diff[0]}", a[diff[0]], b.get(diff[0])
            raise TrainingError(f"cannot resume with a different {key} ({a!r}; the run has {b!r})")


# --- how the engine runs -------------------------------------------------------------------------------------------
@dataclass
class Settings:
    """The loop's knobs (``train.*`` of the config for the diffusion objective; see :meth:`from_train`)."""

    steps: int
    batch_size: int
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    sample_every: int = 0
    mixed_precision: str = "no"
    compile: bool = False
    log_to: Sequence[str] = ("jsonl",)
    divergence_factor: float = 1000.0

    @classmethod
    def from_train(cls, tc, **changes) -> "Settings":
        """From a :class:`~difflab.config.TrainConfig`, with ``changes`` (e.g. the classifier's own steps)."""
        values = {name: getattr(tc, name) for name in cls.__dataclass_fields__ if hasattr(tc, name)}
        return cls(**{**values, **changes})


@dataclass
class FitResult:
    """The last step reached, the last step's metrics, and the trained modules and EMAs by name."""

    step: int
    metrics: dict
    modules: dict
    emas: dict = field(default_factory=dict)


class _Diverged(Exception):
    """A non-finite loss or gradient found inside a step (before the optimiser stepped)."""


class StepContext:
    """What :meth:`Objective.step` sees of step ``step`` (1-based; ``index = step − 1``)."""

    def __init__(self, engine: "Engine", index: int):
        self.engine, self.index, self.step = engine, index, index + 1
        self.device = engine.device
        self.generator = torch.Generator().manual_seed(step_seed(engine.settings.seed, index, engine.objective.stream))
        """The step's CPU generator: draw the *global* batch's randomness from it, then :meth:`shard`."""

    def indices(self, n: int) -> torch.Tensor:
        """This rank's data indices of the step's global batch over a data set of ``n`` examples, long, on the device."""
        s = self.engine.settings
        return batch_indices(n, s.batch_size, s.seed, self.index)[self.engine.dist.rows].to(self.device)

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global-batch tensor, on the device."""
        return x[self.engine.dist.rows].to(self.device)

    def autocast(self):
        """bf16 autocast when the settings ask for it (``auto``: on CUDA); wrap the forward passes, not backward."""
        return autocast(self.device, self.engine.amp_dtype)

    def net(self, name: str) -> nn.Module:
        """Module ``name`` for the forward pass (its DDP wrapper under torchrun, compiled when asked)."""
        return self.engine.forward[name]

    def optimize(self, name: str, loss: torch.Tensor) -> float:
        """Backward ``loss``, clip module ``name``'s gradient norm, step its AdamW and its EMA; returns the norm.

        A non-finite loss or gradient norm stops the run before the optimiser steps."""
        engine = self.engine
        spec, optimizer = engine.objective.trainables[name], engine.optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, spec.grad_clip if spec.grad_clip > 0 else math.inf)
        loss_value, norm_value = float(loss.detach()), float(norm)
        if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
            raise _Diverged(f"non-finite training loss ({loss_value}) or gradient norm ({norm_value}) of {name}")
        optimizer.step()
        if name in engine.emas:
            engine.emas[name].update(spec.module, self.step)
        engine.grad_norms[name] = norm_value
        return norm_value


class Engine:
    """Train ``objective`` for ``settings.steps`` steps, into ``run_dir`` (or in memory when it is None).

    Args:
        objective: an :class:`Objective` whose modules are already on ``device``.
        settings: :class:`Settings`.
        run_dir: the run directory (see :mod:`difflab.engine.rundir`); None trains in memory (no files).
        device: where the modules live (default: the first module's device).
        dist: the :class:`~difflab.engine.stream.Dist` context (default: a single process).
        progress: show the progress bar and summary lines (rank 0).
        on_log: called on rank 0 with every log record; on_step: called with ``(step, metrics)`` after every step.
        noun: what the run directory holds, for messages.
    """

    def __init__(self, objective: Objective, settings: Settings, run_dir=None, device=None, dist: Optional[Dist] = None,
                 progress: bool = False, on_log: Optional[Callable] = None, on_step: Optional[Callable] = None,
                 noun: str = "run"):
        self.objective, self.settings = objective, settings
        self.run = RunDir(run_dir, objective.artifacts, noun) if run_dir is not None else None
        self.dist = dist or Dist()
        self.modules = {name: t.module for name, t in objective.trainables.items()}
        first = next(iter(self.modules.values()))
        self.device = torch.device(device) if device is not None else next(first.parameters()).device
        self.progress, self.on_log, self.on_step = progress and self.dist.main, on_log, on_step
        self.amp_dtype = autocast_dtype(settings.mixed_precision, self.device)
        self.optimizers = {name: adamw([p for p in t.module.parameters() if p.requires_grad], lr=t.lr * t.schedule(1),
                                       weight_decay=t.weight_decay, betas=t.betas)
                           for name, t in objective.trainables.items()}
        self.emas = {name: EMA(t.module, t.ema_decay, t.ema_start)
                     for name, t in objective.trainables.items() if t.ema_decay is not None}
        self.forward = {name: self._forward_module(m) for name, m in self.modules.items()}
        self.grad_norms: dict = {}
        self.book = {"window": {}, "window_count": 0, "elapsed": 0.0, "cpu_seconds": 0.0, "last": {}, "level": {}, "verified": None}
        self.start, self.last_saved, self.sinks = 0, None, []

    def _forward_module(self, module: nn.Module) -> nn.Module:
        if self.dist.world > 1 and any(p.requires_grad for p in module.parameters()):
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return maybe_compile(module, self.settings.compile)

    # --- the run ----------------------------------------------------------------------------------------------
    def fit(self, resume: bool = False, overwrite: bool = False) -> FitResult:
        """Prepare the run directory (lock; on resume load and check the checkpoint; then clear what an overwrite
        replaces and write the config), train, and release the directory."""
        run = self.run
        if run is None:
            return self._loop()
        run.check(resume, overwrite)  # fails fast; again under the lock: another process may have written in between

        def lock():
            run.lock()
            run.check(resume, overwrite)

        try:
            self._on_main(lock)
            ckpt = self._load(run) if resume else None

            def prepare():
                run.remove_temps()
                if overwrite:
                    run.clear()
                if self.objective.config is not None:
                    from difflab.config import dump_config

                    atomic_write_bytes(run.path / CONFIG_FILE, dump_config(self.objective.config).encode())
                if ckpt is not None:
                    run.truncate_metrics(ckpt.step, self.settings.log_every)
                self.sinks = open_sinks(self.settings.log_to, run)
                self.objective.begin(self)

            self._on_main(prepare)
            return self._loop()
        finally:
            for sink in self.sinks:
                sink.close()
            if self.dist.main:
                run.unlock()

    def _on_main(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on rank 0 only; every rank fails when it fails (its own error on rank 0)."""
        error = None
        if self.dist.main:
            try:
                fn()
            except Exception as err:  # re-raised below, after the other ranks have heard of it
                error = err
        if not self.dist.all_ok(error is None, self.device):
            if error is not None:
                raise error
            raise TrainingError(f"rank 0 could not prepare {str(self.run)!r} (see its message)")

    def _load(self, run: RunDir) -> Checkpoint:
        ckpt = load_checkpoint(run.path, map_location=self.device)
        if self.objective.config is not None:
            self.objective.check_resumable(ckpt.config)
        if ckpt.step > self.settings.steps:
            raise TrainingError(f"cannot resume {str(run)!r} to step {self.settings.steps}: it is already at step "
                                f"{ckpt.step} (ask for more steps, or copy the run to train it differently)")
        for i, (name, module) in enumerate(self.modules.items()):
            module.load_state_dict(_part(ckpt, "model" if i == 0 else f"module/{name}"))
            self.optimizers[name].load_state_dict(_part(ckpt, "optimizer" if i == 0 else f"optimizer/{name}"))
            if name in self.emas:
                self.emas[name].load_state_dict(_part(ckpt, "ema" if i == 0 else f"ema/{name}"))
        self.book.update(ckpt.meta["bookkeeping"])
        self.start = self.last_saved = ckpt.step
        return ckpt

    def _loop(self) -> FitResult:
        s, obj, run = self.settings, self.objective, self.run
        if self.progress:
            print(f"difflab: {obj.describe()}; device {self.device}"
                  f"{f' x {self.dist.world} processes' if self.dist.world > 1 else ''}"
                  f"{'; bf16 autocast' if self.amp_dtype is not None else ''}", flush=True)
        bar = tqdm(total=s.steps, initial=self.start, disable=not self.progress, desc="training", dynamic_ncols=True)
        window_time, window_steps, t_start = time.perf_counter(), 0, time.perf_counter()
        elapsed_before, cpu_before, cpu_start = float(self.book["elapsed"]), float(self.book.get("cpu_seconds", 0.0)), time.process_time()
        for module in self.modules.values():
            module.train()
        for index in range(self.start, s.steps):
            k = index + 1
            seed_global_rng(step_seed(s.seed, index, f"torch/{self.dist.rank}"), self.device)  # dropout & co.
            for name, t in obj.trainables.items():
                for group in self.optimizers[name].param_groups:
                    group["lr"] = t.lr * t.schedule(k)
            self.grad_norms = {}
            try:
                metrics = obj.step(StepContext(self, index))
            except _Diverged as err:
                bar.close()
                self._stop(k, str(err), suspect=k - 1)
            values = self._gather(metrics)
            self._check(k, values, bar)
            if self.last_saved == k - 1:
                self.book["verified"] = self.last_saved
            self._account(values)
            window_steps += 1
            now = time.perf_counter()
            self.book["elapsed"] = elapsed_before + (now - t_start)
            self.book["cpu_seconds"] = cpu_before + (time.process_time() - cpu_start)
            bar.update(1)
            bar.set_postfix({name: f"{v:.4f}" for name, v in values.items() if name in obj.monitor}, refresh=False)
            if self.dist.main and (k % s.log_every == 0 or k == s.steps):
                self._log(k, window_steps * s.batch_size / max(now - window_time, 1e-9))
            if k % s.log_every == 0:  # every rank resets, so checkpoints agree; a run that ends mid-window
                self.book.update(window={}, window_count=0)  # keeps it open for a resume
                window_time, window_steps = time.perf_counter(), 0
            if run is not None and self.dist.main:
                if s.sample_every and k % s.sample_every == 0:
                    self._sample(k)
                if (s.checkpoint_every and k % s.checkpoint_every == 0) or k == s.steps:
                    self._save(k)
            if self.on_step is not None:
                self.on_step(k, values)
        bar.close()
        obj.finish(self, max(self.start, s.steps))
        if run is not None and self.dist.main and self.start < s.steps and "loss" in self.book["last"]:
            from difflab.plotting import save_loss_curve

            save_loss_curve(run.metrics, run.path / LOSS_CURVE)
        if self.progress:
            last = ", ".join(f"{n} {v:.4f}" for n, v in self.book["last"].items() if n in obj.monitor)
            print(f"difflab: trained to step {max(self.start, s.steps)}, {last}"
                  f"{f', run in {run}' if run is not None else ''}", flush=True)
        self.dist.barrier()
        return FitResult(max(self.start, s.steps), dict(self.book["last"]), self.modules, self.emas)

    # --- per step -------------------------------------------------------------------------------------------------
    def _gather(self, metrics: dict) -> dict:
        """The step's metrics and gradient norms as floats (means over the ranks), and ``_weights``: the largest
        norm of a weight or EMA tensor (inf when one overflows or is not finite)."""
        updated = [n for n in self.objective.trainables if n in self.grad_norms]  # the modules this step updated
        names = [*metrics, *self._norm_names(updated)]
        tensors = [*self._weights(), *(e for ema in self.emas.values() for e in ema.shadow.values())]
        norms = [n.float() for n in torch._foreach_norm([t.detach() for t in tensors if t.is_floating_point()])]
        weights = torch.stack(norms).max() if norms else torch.zeros((), device=self.device)
        stacked = torch.stack([*(torch.as_tensor(v, device=self.device).float().reshape(()) for v in metrics.values()),
                               *(torch.tensor(self.grad_norms[n], device=self.device) for n in updated),
                               weights.to(self.device)])
        values = self.dist.mean(stacked).tolist()
        return {**dict(zip(names, values[:-1])), "_weights": values[-1]}

    def _weights(self):
        for module in self.modules.values():
            yield from module.parameters()

    def _norm_names(self, updated: list) -> list:
        """``grad_norm`` with one trainable module, else ``grad_norm_<name>`` for each one ``updated``."""
        return ["grad_norm"] if len(self.objective.trainables) == 1 else [f"grad_norm_{n}" for n in updated]

    def _check(self, k: int, values: dict, bar) -> None:
        """Stop on a non-finite metric, a monitored metric far above its running level, or non-finite weights."""
        factor, reason, suspect = self.settings.divergence_factor, None, k - 1
        for name, value in values.items():
            level = self.book["level"].get(name)
            if name == "_weights":
                if not math.isfinite(value):
                    reason, suspect = "the weights are no longer finite after the update", None
            elif not math.isfinite(value):
                reason = f"non-finite {name} ({value})"
            elif name in self.objective.monitor and factor > 0 and level and value > factor * level:
                reason = (f"training diverged: {name} {value:.4g} is over {factor:g}× its running level {level:.4g} "
                          "(train.divergence_factor)")
            if reason:
                bar.close()
                self._stop(k, reason, suspect)
        values.pop("_weights")

    def _account(self, values: dict) -> None:
        book = self.book
        book["last"] = dict(values)
        for name, value in values.items():
            book["window"][name] = book["window"].get(name, 0.0) + value
            if name in self.objective.monitor:
                level = book["level"].get(name)
                book["level"][name] = value if level is None else LEVEL_DECAY * level + (1 - LEVEL_DECAY) * value
        book["window_count"] += 1

    def _stop(self, k: int, reason: str, suspect: Optional[int]) -> None:
        """Raise the one-line :class:`TrainingError` of a divergence at step ``k``, after removing the unverified
        checkpoint of step ``suspect`` (whose weights gave the bad value), if there is one."""
        if self.run is None:
            raise TrainingError(f"{reason} at step {k}: stopped")
        dropped = ""
        if suspect is not None and suspect == self.last_saved and suspect != self.book["verified"]:
            if self.dist.main:
                self.run.rollback(suspect)
            dropped = f"removed the checkpoint of step {suspect}, whose weights gave it; "
        kept = [s for s in list_checkpoints(self.run.path) if not dropped or s < suspect]
        where = repr(str(self.run))
        if kept:
            tail = f"the last good checkpoint (step {kept[-1]}) is intact in {where}"
        else:
            tail = f"no checkpoint is left in {where}: start it again with --overwrite (a lower train.lr, if it diverged)"
        raise TrainingError(f"{reason} at step {k}: stopped without saving; {dropped}{tail}")

    def _log(self, k: int, samples_per_s: float) -> None:
        book, obj = self.book, self.objective
        record = {"step": k, **{n: v / book["window_count"] for n, v in book["window"].items()}}
        for name, t in obj.trainables.items():
            record["lr" if len(obj.trainables) == 1 else f"lr_{name}"] = t.lr * t.schedule(k)
        record.update(samples_per_s=samples_per_s, elapsed=book["elapsed"], cpu_seconds=book["cpu_seconds"])
        for sink in self.sinks:
            sink.log(record)
        if self.on_log is not None:
            self.on_log(record)

    def _sample(self, k: int) -> None:
        out = self.objective.sample(self, k, self.run.path / SAMPLES_DIR / f"step_{k:08d}.png")
        if out is not None:
            for sink in self.sinks:
                sink.image("samples", out, k)

    def _save(self, k: int) -> None:
        """Checkpoint step ``k`` (all modules, EMAs, optimisers, bookkeeping); keep the newest ``keep_checkpoints``
        and the newest verified one."""
        names = list(self.modules)
        parts = {}
        for name in names[1:]:
            parts[f"module/{name}"] = self.modules[name].state_dict()
            parts[f"optimizer/{name}"] = self.optimizers[name].state_dict()
            if name in self.emas:
                parts[f"ema/{name}"] = self.emas[name].state_dict()
        main = names[0]
        meta = {**self.objective.meta(), "world_size": self.dist.world, "bookkeeping": dict(self.book),
                "rng": {"scheme": "blake2b(seed/index/stream) per step", "seed": self.settings.seed}}
        save_checkpoint(self.run.path, k, self.objective.config, self.modules[main].state_dict(),
                        self.emas[main].state_dict() if main in self.emas else None, self.optimizers[main].state_dict(),
                        meta=meta, keep=0, parts=parts)
        self.last_saved = k
        verified = self.book["verified"]
        self.run.prune(self.settings.keep_checkpoints, [] if verified is None else [verified])


def _part(ckpt: Checkpoint, part: str):
    state = {"model": ckpt.model, "ema": ckpt.ema, "optimizer": ckpt.optimizer}.get(part, ckpt.parts.get(part))
    if state is None:
        raise TrainingError(f"{ckpt.file} has no {part!r} state to resume from")
    return state
