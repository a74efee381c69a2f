"""The diffusion objective: ``L = E_{t, x0, ε} w(t) ||target − target̂||²`` (SPEC §3, §4), or flow matching on
minibatch-OT pairs (SPEC §6), for the network and path of a :class:`~difflab.config.RunConfig`.

Per step ``k`` (randomness from the engine's step generator, stream ``batch``):

1. the global batch ``ctx.indices`` (:func:`~difflab.engine.stream.batch_indices`);
2. ``t ~ U{1..T}`` (or ``U[t_min, t_max]``), ``ε ~ N(0, I)`` and the label-dropout mask (a fraction
   ``p_uncond`` of labels becomes ``NULL_LABEL``, SPEC §7) for the whole global batch, then this rank's rows;
3. the loss :func:`~difflab.losses.diffusion_loss` (or :func:`~difflab.flows.flow_matching_loss` with
   ``coupling: ot``) through the run's :class:`~difflab.parameterization.NetworkDenoiser`;
4. one AdamW step of the module ``net`` with the linear warm-up learning rate, clipping and EMA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from difflab.config import ConfigError, RunConfig, build_path
from difflab.engine.loop import Objective, Trainable, linear_warmup, require_same
from difflab.engine.stream import seed_global_rng, step_seed
from difflab.flows import flow_matching_loss
from difflab.losses import diffusion_loss, sample_time
from difflab.networks.embeddings import NULL_LABEL
from difflab.pipeline import build_denoiser, build_model, generate

RESUME_MUST_MATCH = ("data", "model", "diffusion", "train.seed", "train.batch_size")
"""Config entries a resumed run must share with the checkpoint (the other ``train.*`` may change)."""


class DiffusionObjective(Objective):
    """Train ``cfg.model`` on ``dataset`` (an ``ArrayDataset``: ``x``, ``y``, ``num_classes``) as ``cfg.diffusion`` says."""

    def __init__(self, cfg: RunConfig, dataset, device: torch.device):
        tc = cfg.train
        self.setup_data(cfg, dataset, device)
        self.net = build_model(cfg, self.data_shape, self.num_classes).to(device)
        self.trainables = {"net": Trainable(self.net, lr=tc.lr, weight_decay=tc.weight_decay,
                                            schedule=linear_warmup(tc.warmup_steps), grad_clip=tc.grad_clip,
                                            ema_decay=tc.ema_decay, ema_start=tc.ema_start)}
        self._denoiser = None

    def setup_data(self, cfg: RunConfig, dataset, device: torch.device) -> None:
        """The config, data (``x_data``, ``data_shape``, ``num_classes``, ``y_data``, ``data_kind``) and ``path`` on
        ``device``, then the global RNG seeded for building the networks."""
        self.config, self.device = cfg, device
        self.x_data = dataset.x.to(device)  # (N, *data_shape)
        self.data_shape = tuple(self.x_data.shape[1:])
        self.num_classes, self.y_data = 0, None
        if cfg.model.conditional:
            if dataset.y is None or not dataset.num_classes:
                raise ConfigError(f"model.conditional needs class labels, and data set {cfg.data.name!r} has none")
            self.num_classes, self.y_data = int(dataset.num_classes), dataset.y.to(device).long()
        self.data_kind = getattr(dataset, "kind", None)
        self.path = build_path(cfg.diffusion)
        seed_global_rng(step_seed(cfg.train.seed, -1, "init"), device)

    def draw(self, ctx) -> tuple:
        """The step's ``(x0, t, ε, cond)`` (steps 1–2 of the module docstring): this rank's rows of the global
        batch, its times and noise, and ``{"y": labels with dropout}`` for a class-conditional model."""
        tc, gen = self.config.train, ctx.generator
        idx = ctx.indices(self.x_data.shape[0])
        t = ctx.shard(sample_time(self.path, tc.batch_size, gen))
        eps = ctx.shard(torch.randn((tc.batch_size, *self.data_shape), generator=gen))
        cond = {}
        if self.num_classes:
            drop = ctx.shard(torch.rand(tc.batch_size, generator=gen) < tc.p_uncond)
            y = self.y_data[idx]
            cond["y"] = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
        return self.x_data[idx], t, eps, cond

    def denoiser(self, ctx):
        """The run's denoiser around the forward module (DDP / compiled), built once."""
        if self._denoiser is None:
            self._denoiser = build_denoiser(self.config, ctx.net("net"), self.path)
        return self._denoiser

    def step(self, ctx) -> dict:
        x0, t, eps, cond = self.draw(ctx)
        d = self.config.diffusion
        with ctx.autocast():
            if d.coupling == "ot":  # flow matching on minibatch-OT pairs (SPEC §6)
                loss = flow_matching_loss(self.denoiser(ctx), x0, "ot", eps=eps, t=t, **cond).mean()
            else:
                loss = diffusion_loss(self.denoiser(ctx), x0, d.weighting, t=t, eps=eps,
                                      min_snr_gamma=d.min_snr_gamma, **cond).mean()
        ctx.optimize("net", loss)
        return {"loss": loss.detach()}

    def check_resumable(self, saved_config: RunConfig) -> None:
        require_same(self.config, saved_config, RESUME_MUST_MATCH)

    def meta(self) -> dict:
        cfg, path = self.config, self.path
        return {"data_shape": list(self.data_shape), "num_classes": self.num_classes, "data_kind": self.data_kind,
                "num_examples": int(self.x_data.shape[0]),
                "path": path.config() if hasattr(path, "config") else {"kind": cfg.diffusion.path},
                "target": cfg.diffusion.target, "learned_variance": cfg.model.learned_variance,
                "num_parameters": sum(p.numel() for p in self.net.parameters())}

    def describe(self) -> str:
        cfg = self.config
        return (f"{cfg.model.kind} with {sum(p.numel() for p in self.net.parameters()):,} parameters; "
                f"{self.x_data.shape[0]} examples of shape {self.data_shape}; {cfg.diffusion.path} path, "
                f"target {cfg.diffusion.target}")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """What a sample is shown as: the sample itself (a latent objective decodes it to an image)."""
        return x

    def shows_images(self) -> bool:
        """Whether :meth:`decode` makes images of the samples (else 2-D points are scattered, other data skipped)."""
        return len(self.data_shape) == 3

    def preview_sampler(self) -> tuple:
        """``(denoiser, sampler, steps)`` of the sample hook: DDIM with ``train.sample_steps`` (at most ``T``)
        around the raw network (no DDP collectives)."""
        tc = self.config.train
        steps = min(tc.sample_steps, getattr(self.path, "T", tc.sample_steps))
        return build_denoiser(self.config, self.net, self.path), "ddim", steps

    @torch.no_grad()
    def sample(self, engine, step: int, out: Path) -> Optional[Path]:
        """Samples of the EMA model (:meth:`preview_sampler`) as a grid (images) or a scatter plot (2-D points);
        other data: none."""
        from difflab.plotting import save_image_grid, save_scatter

        tc, shape = self.config.train, self.data_shape
        if not (self.shows_images() or shape == (2,)):
            return None
        denoiser, sampler, steps = self.preview_sampler()
        y = torch.arange(tc.num_sample_images) % self.num_classes if self.num_classes else None
        generator = torch.Generator().manual_seed(step_seed(tc.seed, 0, "samples"))  # the same noise every time
        with engine.emas["net"].swapped_in(self.net):
            self.net.eval()
            try:
                x = generate(denoiser, shape, tc.num_sample_images, sampler, steps, generator, y, device=self.device).x
            finally:
                self.net.train()
        if not self.shows_images():
            return save_scatter(x, out, reference=self.x_data[:2000].cpu(), title=f"step {step}", labels=y)
        return save_image_grid(self.decode(x), out, nrow=self.num_classes or None)
