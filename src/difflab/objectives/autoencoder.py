"""The KL-autoencoder objective of latent diffusion (SPEC §5; Rombach et al. 2022, App. G; Esser et al. 2021).

Per example (sums over pixels and latent entries, Stable Diffusion's scale)::

    L_rec = Σ |x − x̂| + perceptual_weight · CHW · Σ_layers mean_hw ||φ̂_l(x) − φ̂_l(x̂)||²
    L     = L_rec + kl_weight · KL(N(μ, σ²) || N(0, I)) [+ disc_weight · λ · L_adv after disc_start steps]

with ``x̂ = D(μ + σ ε)`` (re-parameterised, SPEC §1). The perceptual term compares the channel-normalised
activations ``φ̂_l`` of the three stages of the project's own classifier (the feature network of FD-<dataset>,
:func:`difflab.evaluation.features.feature_network`, frozen): no pretrained VGG/LPIPS can be downloaded here. It is
counted once per pixel (``CHW`` times), as Stable Diffusion's ``LPIPSWithDiscriminator`` adds it to every pixel's
L1 before summing, so ``perceptual_weight: 1`` is its value.
With ``disc_weight > 0`` a :class:`~difflab.networks.autoencoder.PatchDiscriminator` (module ``discriminator``)
is trained with the hinge loss, and the decoder gets ``L_adv = −mean D(x̂)`` weighted adaptively
(Esser et al. 2021, eq. 7) by ``λ = ‖∇_w L_rec‖ / (‖∇_w L_adv‖ + δ)`` at the decoder's last layer ``w``,
clamped to ``[0, ADAPTIVE_MAX]``; both switch on after ``disc_start`` steps (a warm-up on reconstruction alone).

At the end (:meth:`AutoencoderObjective.finish`) every example is encoded once (``μ``), the scale factor
``1 / std(μ)`` of the training split is measured, and the autoencoder's weights, the latents and the record are
written (:func:`difflab.latent.save_autoencoder`).
"""

from __future__ import annotations

import time

import torch

from difflab.config import ConfigError, RunConfig
from difflab.engine.loop import Objective, Trainable, require_same
from difflab.engine.stream import step_seed
from difflab.latent import (LATENTS_FILE, RECORD_FILE, WEIGHTS_FILE, TrainedAutoencoder, build_autoencoder,
                            save_autoencoder, scale_factor)
from difflab.networks.autoencoder import PatchDiscriminator, hinge_d_loss, kl_to_standard_normal
from difflab.objectives.classifier import split

ADAPTIVE_DELTA = 1e-4
"""``δ`` in ``λ = ‖∇L_rec‖ / (‖∇L_adv‖ + δ)`` (taming-transformers' value): keeps λ finite when ∇L_adv vanishes."""
ADAPTIVE_MAX = 1e4
"""λ is clamped to ``[0, 1e4]`` (taming-transformers' clamp)."""
UNIT_EPS = 1e-10
"""Added to the channel norm before dividing by it (LPIPS's ``normalize_tensor``), so zero activations stay finite."""
RESUME_MUST_MATCH = ("data", "autoencoder", "train.seed", "train.batch_size")
"""Config entries a resumed autoencoder must share with its checkpoint."""


def adaptive_weight(rec: torch.Tensor, adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """``λ = ‖∇_w rec‖ / (‖∇_w adv‖ + δ)`` at the weight ``w`` (detached, clamped to ``[0, ADAPTIVE_MAX]``)."""
    g_rec = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(adv, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + ADAPTIVE_DELTA)).clamp(0.0, ADAPTIVE_MAX).detach()


class Perceptual:
    """``Σ_l mean_hw ||φ̂_l(x) − φ̂_l(x̂)||²`` per example, ``φ̂_l`` the unit-normalised (over channels) activations
    after each of the three stages of a frozen :class:`~difflab.evaluation.features.FeatureNet` (LPIPS's form
    without its learned channel weights)."""

    def __init__(self, feature_net):
        self.net = feature_net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        layers = list(self.net.body)
        per_stage = len(layers) // len(self.net.widths)
        self.stages = [torch.nn.Sequential(*layers[i:i + per_stage]) for i in range(0, len(layers), per_stage)]

    def __call__(self, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        h, h_hat, total = x, x_hat, torch.zeros(x.shape[0], device=x.device)
        for stage in self.stages:
            h, h_hat = stage(h), stage(h_hat)
            unit, unit_hat = (v / (v.pow(2).sum(1, keepdim=True).sqrt() + UNIT_EPS) for v in (h, h_hat))
            total = total + (unit - unit_hat).pow(2).sum(1).flatten(1).mean(1)
        return total


class AutoencoderObjective(Objective):
    """Train :class:`~difflab.networks.autoencoder.KLAutoencoder` (module ``autoencoder``) on images of ``dataset``
    as ``cfg.autoencoder`` says, with AdamW at ``train.lr`` and ``train.grad_clip``; optionally a patch
    discriminator (module ``discriminator``, AdamW β = (0.5, 0.9))."""

    stream = "autoencoder/batch"
    monitor = ("rec",)
    artifacts = (RECORD_FILE, WEIGHTS_FILE, LATENTS_FILE)

    def __init__(self, cfg: RunConfig, dataset, device: torch.device):
        ac, tc = cfg.autoencoder, cfg.train
        if dataset.x.ndim != 4:
            raise ConfigError(f"an autoencoder needs images (N, C, H, W); data set {cfg.data.name!r} has shape "
                              f"{tuple(dataset.x.shape)}")
        self.config, self.device, self.dataset = cfg, device, dataset
        self.image_shape = tuple(dataset.x.shape[1:])
        self.train_idx, self.test_idx = split(dataset.x.shape[0], ac.held_out, tc.seed, "autoencoder/split")
        self.x_train = dataset.x[self.train_idx].to(device)
        torch.manual_seed(step_seed(tc.seed, -1, "autoencoder/init"))
        self.net = build_autoencoder(cfg, self.image_shape).to(device)
        self.latent_shape = self.net.latent_shape
        self.trainables = {"autoencoder": Trainable(self.net, lr=tc.lr, weight_decay=tc.weight_decay,
                                                    grad_clip=tc.grad_clip)}
        if ac.disc_weight > 0:
            self.disc = PatchDiscriminator(self.image_shape[0], ac.base_channels).to(device)
            self.trainables["discriminator"] = Trainable(self.disc, lr=tc.lr, betas=(0.5, 0.9), grad_clip=tc.grad_clip)
        self.perceptual = None
        if ac.perceptual_weight > 0:
            from difflab.evaluation.features import feature_network

            if dataset.y is None or dataset.num_classes < 2:
                raise ConfigError("autoencoder.perceptual_weight > 0 needs a labelled data set (the perceptual "
                                  f"features come from a classifier of it); {cfg.data.name!r} has no labels")
            net, _ = feature_network(cfg.data.name, dataset.x, dataset.y, dataset.num_classes)
            self.perceptual = Perceptual(net.to(device))
        self.final_meta: dict = {}
        self._started = time.perf_counter()

    def step(self, ctx) -> dict:
        ac, B = self.config.autoencoder, self.config.train.batch_size
        x = self.x_train[ctx.indices(self.x_train.shape[0])]
        eps = ctx.shard(torch.randn((B, *self.latent_shape), generator=ctx.generator))
        adversarial = ac.disc_weight > 0 and ctx.step > ac.disc_start
        with ctx.autocast():
            x_hat, mu, logvar = ctx.net("autoencoder")(x, eps)
            rec = (x - x_hat).abs().flatten(1).sum(1)  # (B,)
            metrics = {"rec": rec.mean().detach()}
            if self.perceptual is not None:
                perceptual = self.perceptual(x, x_hat)
                rec = rec + ac.perceptual_weight * x[0].numel() * perceptual
                metrics["perceptual"] = perceptual.mean().detach()
            kl = kl_to_standard_normal(mu, logvar)
            loss = rec.mean() + ac.kl_weight * kl.mean()
            if adversarial:
                adv = -ctx.net("discriminator")(x_hat).flatten(1).mean(1).mean()
                lam = adaptive_weight(rec.mean(), adv, self.net.last_layer)
                loss = loss + ac.disc_weight * lam * adv
                metrics.update(adv=adv.detach(), adaptive_weight=lam)
        ctx.optimize("autoencoder", loss)
        if adversarial:
            with ctx.autocast():
                disc = ctx.net("discriminator")
                d_loss = hinge_d_loss(disc(x), disc(x_hat.detach())).mean()
            ctx.optimize("discriminator", d_loss)
            metrics["d_loss"] = d_loss.detach()
        return {"loss": loss.detach(), **metrics, "kl": kl.mean().detach()}

    def check_resumable(self, saved_config: RunConfig) -> None:
        require_same(self.config, saved_config, RESUME_MUST_MATCH)

    def meta(self) -> dict:
        ac = self.config.autoencoder
        return {"image_shape": list(self.image_shape), "latent_shape": list(self.latent_shape),
                "num_classes": int(self.dataset.num_classes or 0), "data_key": self.config.data.name,
                "latent_channels": ac.latent_channels, "n_train": len(self.train_idx), "n_held_out": len(self.test_idx),
                "num_parameters": sum(p.numel() for p in self.net.parameters())}

    def describe(self) -> str:
        return (f"KL autoencoder with {sum(p.numel() for p in self.net.parameters()):,} parameters; "
                f"{len(self.train_idx)} training images of shape {self.image_shape} -> latents {self.latent_shape}"
                f"{'; patch discriminator' if 'discriminator' in self.trainables else ''}")

    def finish(self, engine, step: int) -> None:
        """Encode every example once, measure the scale factor on the training split, write the autoencoder."""
        ae = TrainedAutoencoder(self.net, self.config, {}, "")
        mu = ae.encode(self.dataset.x)
        scale = scale_factor(mu[self.train_idx])
        self.final_meta = {**self.meta(), "scale_factor": scale, "latent_mean": float(mu[self.train_idx].mean()),
                           "train_seconds": engine.book["elapsed"], "final": dict(engine.book["last"])}
        if engine.run is not None and engine.dist.main:
            latents = {"mu": mu} if self.dataset.y is None else {"mu": mu, "y": self.dataset.y.long()}
            save_autoencoder(engine.run.path, self.net, self.config, step, self.final_meta, latents)
