"""The DDGAN objective (SPEC §5; Xiao, Kreis, Vahdat 2022): a generator ``G(x_t, z, t) → x̂0`` and a discriminator
``D(x_{t−1}, x_t, t)`` trained against each other on the ``T`` steps of the run's discrete path
(``diffusion.objective: ddgan``; the ``ddgan`` config section; the math in :mod:`difflab.ddgan`).

Per step ``k`` (randomness from the engine's step generator, stream ``batch``, drawn for the global batch and then
sharded), on the step's real batch ``x0`` (and labels ``y`` when ``model.conditional``):

1. **discriminator**: ``t ~ U{1..T}``, a real pair ``(x_{t−1}, x_t)`` (:func:`~difflab.ddgan.real_pair`), a fake
   ``x'_{t−1} ~ q(x_{t−1} | x_t, G(x_t, z, t))`` made without a graph (the reference's backward through ``G`` in
   this step is wasted work), and ``L_D = E[softplus(−D(x_{t−1}, x_t, t)) + softplus(D(x'_{t−1}, x_t, t))]``
   plus, on every ``lazy_reg``-th step, ``r1_gamma/2 · E||∇_{x_{t−1}} D(x_{t−1}, x_t, t)||²``; one Adam step of ``disc``;
2. **generator**: fresh ``t``, pair, ``z`` and posterior noise; ``L_G = E softplus(−D(x'_{t−1}, x_t, t))`` through
   the updated ``D``; one Adam step of ``net`` (the generator; its EMA is what ``difflab sample`` uses).

Metrics: ``loss_d`` (the adversarial part of ``L_D``, monitored for divergence) and ``loss_g``.
"""

from __future__ import annotations

import torch

from difflab.config import RunConfig
from difflab.ddgan import DDGANGenerator, discriminator_loss, generator_loss, posterior_draw, r1_penalty, real_pair
from difflab.engine.loop import Trainable, linear_warmup, require_same
from difflab.networks.discriminator import build_discriminator
from difflab.objectives.diffusion import RESUME_MUST_MATCH, DiffusionObjective
from difflab.pipeline import build_model


class DDGANObjective(DiffusionObjective):
    """Train the generator ``cfg.model`` (with a latent of ``ddgan.nz``) and a discriminator on ``dataset``."""

    monitor = ("loss_d",)

    def __init__(self, cfg: RunConfig, dataset, device: torch.device):
        tc, dc = cfg.train, cfg.ddgan
        self.setup_data(cfg, dataset, device)
        self.net = build_model(cfg, self.data_shape, self.num_classes).to(device)
        self.disc = build_discriminator(self.data_shape, self.num_classes, dc.d_width, dc.d_depth,
                                        dc.d_fourier, dc.d_fourier_scale).to(device)
        common = {"betas": tuple(dc.betas), "weight_decay": tc.weight_decay, "grad_clip": tc.grad_clip,
                  "schedule": linear_warmup(tc.warmup_steps)}
        self.trainables = {"net": Trainable(self.net, lr=dc.lr_g, ema_decay=tc.ema_decay, ema_start=tc.ema_start,
                                            **common),
                           "disc": Trainable(self.disc, lr=dc.lr_d, **common)}

    def _draws(self, ctx) -> dict:
        """One pass's randomness for the global batch (``t``, the pair's two noises, ``z``, the posterior noise),
        then this rank's rows."""
        B, gen, shape = self.config.train.batch_size, ctx.generator, (self.config.train.batch_size, *self.data_shape)
        draws = {"t": torch.randint(1, self.path.T + 1, (B,), generator=gen),
                 "eps_prev": torch.randn(shape, generator=gen), "eps_step": torch.randn(shape, generator=gen),
                 "z": torch.randn((B, self.config.ddgan.nz), generator=gen), "noise": torch.randn(shape, generator=gen)}
        return {name: ctx.shard(v) for name, v in draws.items()}

    def _fake(self, gen, x_t, d: dict, cond: dict) -> torch.Tensor:
        """``x'_{t−1} ~ q(x_{t−1} | x_t, G(x_t, z, t))``."""
        return posterior_draw(self.path, x_t, gen(x_t, d["t"], z=d["z"], **cond), d["t"], d["noise"])

    def step(self, ctx) -> dict:
        dc = self.config.ddgan
        idx = ctx.indices(self.x_data.shape[0])
        x0 = self.x_data[idx]
        cond = {"y": self.y_data[idx]} if self.num_classes else {}
        gen, disc = ctx.net("net"), ctx.net("disc")

        d = self._draws(ctx)  # the discriminator's step
        x_prev, x_t = real_pair(self.path, x0, d["t"], d["eps_prev"], d["eps_step"])
        regularise = dc.r1_gamma > 0 and ctx.step % dc.lazy_reg == 0
        x_prev.requires_grad_(regularise)
        with ctx.autocast():
            with torch.no_grad():
                fake = self._fake(gen, x_t, d, cond)
            d_real = disc(x_prev, x_t, d["t"], **cond)
            loss_d = discriminator_loss(d_real, disc(fake, x_t, d["t"], **cond)).mean()
        total = loss_d + 0.5 * dc.r1_gamma * r1_penalty(d_real, x_prev).mean() if regularise else loss_d
        ctx.optimize("disc", total)

        d = self._draws(ctx)  # the generator's step, through the updated discriminator
        _, x_t = real_pair(self.path, x0, d["t"], d["eps_prev"], d["eps_step"])
        with ctx.autocast():
            loss_g = generator_loss(disc(self._fake(gen, x_t, d, cond), x_t, d["t"], **cond)).mean()
        ctx.optimize("net", loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}

    def check_resumable(self, saved_config: RunConfig) -> None:
        require_same(self.config, saved_config, (*RESUME_MUST_MATCH, "ddgan"))

    def describe(self) -> str:
        dc, T = self.config.ddgan, self.path.T
        return (f"DDGAN, T = {T}: generator {self.config.model.kind} with {sum(p.numel() for p in self.net.parameters()):,}"
                f" parameters (nz {dc.nz}), discriminator with {sum(p.numel() for p in self.disc.parameters()):,}; "
                f"{self.x_data.shape[0]} examples of shape {self.data_shape}")

    def preview_sampler(self) -> tuple:
        """The generator chain in its ``T`` steps."""
        return DDGANGenerator(self.net, self.path, self.config.ddgan.nz), "ddgan", self.path.T
