"""Typed run configuration: one dataclass per component, loaded from YAML, overridable with ``--set``.

A run is described by :class:`RunConfig` with these sections::

    data:      {name, path, n, options}                      -> difflab.data.load_dataset
    model:     {kind, conditional, learned_variance, ...}    -> difflab.networks.build_network
    diffusion: {path, schedule, T, zero_terminal_snr,        -> difflab.paths (SPEC §2, §6),
                target, weighting, min_snr_gamma, objective}    parameterisation (§4), loss (§3)
    ddgan:     {nz, lr_g, lr_d, r1_gamma, lazy_reg, ...}     -> difflab.objectives.ddgan (with objective: ddgan)
    train:     {steps, batch_size, lr, ...}                  -> difflab.training.train
    classifier: {width, depth, steps, ...}                   -> difflab.classifier_training (optional)
    autoencoder: {latent_channels, kl_weight, ...}           -> difflab.objectives.autoencoder (SPEC §5)
    matryoshka: {inner_steps}                                -> difflab.objectives.matryoshka (with objective: matryoshka)

Every value is checked at the edge — unknown keys (with the nearest valid key suggested), wrong
types, out-of-range numbers, bad enum values, combinations the math does not allow — and any
problem raises :class:`ConfigError` with a one-line message naming the dotted key.

Overrides use dotted keys and YAML values: ``train.lr=1e-3``, ``model.channel_mults=[1,2,2]``,
``data.options.noise=0.05``. (Plain YAML 1.1 reads ``1e-3`` as a string; this module's loader
reads it as the float it obviously is.)
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from difflab import limits
from difflab.losses import WEIGHTINGS
from difflab.schedules import SCHEDULES


class ConfigError(ValueError):
    """A configuration problem, with a one-line message that names the offending key."""


def _choices(*values: str) -> dict:
    return {"choices": values}


MAX_LEVELS = 16
"""Entries of ``model.channel_mults`` / ``attn_resolutions`` (U-Net levels)."""
MAX_CHANNEL_MULT = 64
MAX_SAMPLE_IMAGES = 10_000
MAX_DATA_EXAMPLES = 10_000_000
"""``data.n``: a generated 2-D set of this many points takes 160 MB."""


# --- the sections ------------------------------------------------------------------------------------
PATH_DATASETS = ("folder", "npz", "npy", "cifar10")
"""Data sets read from the user's files: they need ``data.path``."""


@dataclass
class DataConfig:
    """What to train on: ``difflab.data.load_dataset(name, path, n, seed=train.seed, **options)``.

    ``n`` keeps the first ``n`` examples (or draws ``n`` points for generated 2-D sets); ``options``
    are passed to the loader unchanged (e.g. ``noise`` for two moons, ``size`` for an image folder).
    ``autoencoder`` names an autoencoder run (``difflab train-autoencoder``) of this data set: the model is
    then trained on its cached, scaled latents (latent diffusion, SPEC §5; :mod:`difflab.latent`).
    """

    name: str = "two_moons"
    path: Optional[str] = None
    n: Optional[int] = None
    options: dict = field(default_factory=dict)
    autoencoder: Optional[str] = None

    def validate(self) -> None:
        from difflab.data import LOADERS

        if self.name not in LOADERS:
            raise ConfigError(f"data.name must be one of {', '.join(LOADERS)}; got {self.name!r}"
                              f"{_suggest(self.name, LOADERS)}")
        if self.n is not None:
            _in_range("data.n", self.n, 1, MAX_DATA_EXAMPLES)
        if self.name in PATH_DATASETS and not self.path:
            raise ConfigError(f"data set {self.name!r} reads your files: set data.path")
        if self.autoencoder is not None and not self.autoencoder.strip():
            raise ConfigError("data.autoencoder must name an autoencoder run directory (or be null)")

    def path_for_run(self, given: Optional[str]) -> Optional[str]:
        """Where to read a *trained run's* data from: the path the user gives on this machine (``--data``),
        never the ``data.path`` stored in the run, which may come from anywhere. Built-in and generated
        sets read no path."""
        if self.name not in PATH_DATASETS:
            if given is not None:
                raise ConfigError(f"this run's data set {self.name!r} is built in and reads no path: drop --data")
            return None
        if given is None:
            raise ConfigError(f"this run was trained on your files ({self.name} at {self.path!r}); pass --data PATH "
                              "to read them here (difflab never reads a path stored in a run directory)")
        return given


NETWORK_FIELDS = {
    "mlp": ("hidden", "depth", "time_dim"),
    "unet": ("base_channels", "channel_mults", "num_res_blocks", "attn_resolutions", "num_heads", "dropout",
             "context_dim"),
    "matryoshka": ("base_channels", "channel_mults", "num_res_blocks", "attn_resolutions", "num_heads", "dropout"),
}
"""Which :class:`ModelConfig` fields each network kind takes (the others are ignored for that kind);
they are the keyword arguments of :class:`~difflab.networks.MLPDenoiser` and :class:`~difflab.networks.UNet`."""


@dataclass
class ModelConfig:
    """The denoiser network: ``difflab.networks.build_network(kind, data_shape, num_classes, ...)``.

    ``conditional: true`` trains on the data set's class labels (the network gets a class embedding
    with a learned null label, SPEC §7). ``learned_variance`` doubles the output channels for the
    improved-DDPM variance interpolation (SPEC §3). The remaining fields are the network's sizes with
    the networks' own defaults; :data:`NETWORK_FIELDS` says which apply to which ``kind``.
    ``attn_resolutions: null`` puts self-attention at the lowest resolution only, ``[]`` nowhere.
    ``prompt: true`` (a unet) conditions on the prompt of each class (``"3"``; ``"3 then 7"`` on the two-digit
    canvas) through a text encoder of width ``text_dim`` and ``text_depth`` layers and the U-Net's cross-attention,
    instead of a class embedding (:mod:`difflab.prompts`).
    """

    kind: str = field(default="mlp", metadata=_choices("mlp", "unet", "matryoshka"))
    conditional: bool = False
    learned_variance: bool = False
    # mlp
    hidden: int = 256
    depth: int = 4
    time_dim: int = 128
    # unet
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 2
    attn_resolutions: Optional[list[int]] = None
    num_heads: int = 4
    dropout: float = 0.0
    context_dim: Optional[int] = None
    # prompts by cross-attention (unet; difflab.prompts)
    prompt: bool = False
    text_dim: int = 64
    text_depth: int = 2

    def validate(self) -> None:
        for name in ("hidden", "time_dim", "base_channels", "num_heads"):
            _in_range(f"model.{name}", getattr(self, name), 1, limits.MAX_WIDTH)
        _in_range("model.num_res_blocks", self.num_res_blocks, 1, limits.MAX_DEPTH)
        _in_range("model.depth", self.depth, 0, limits.MAX_DEPTH)
        if not self.channel_mults or any(m < 1 for m in self.channel_mults):
            raise ConfigError(f"model.channel_mults must be a non-empty list of positive integers, got {self.channel_mults}")
        _bounded_list("model.channel_mults", self.channel_mults, 1, MAX_CHANNEL_MULT, MAX_LEVELS)
        if self.attn_resolutions is not None and any(r < 1 for r in self.attn_resolutions):
            raise ConfigError(f"model.attn_resolutions must hold positive side lengths, got {self.attn_resolutions}")
        if self.attn_resolutions is not None:
            _bounded_list("model.attn_resolutions", self.attn_resolutions, 1, limits.MAX_SIDE, MAX_LEVELS)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"model.dropout must lie in [0, 1), got {self.dropout}")
        if self.time_dim % 2:
            raise ConfigError(f"model.time_dim must be even (sin/cos pairs), got {self.time_dim}")
        if self.context_dim is not None:
            _in_range("model.context_dim", self.context_dim, 1, limits.MAX_WIDTH)
        _in_range("model.text_dim", self.text_dim, 1, limits.MAX_WIDTH)
        _in_range("model.text_depth", self.text_depth, 1, limits.MAX_DEPTH)
        if self.prompt:
            if self.kind != "unet" or not self.conditional:
                raise ConfigError("model.prompt needs model.kind unet and model.conditional: true (the classes' "
                                  "prompts are the condition)")
            if self.context_dim is not None or self.text_dim % self.num_heads:
                raise ConfigError("model.prompt sets the cross-attention width to model.text_dim: leave "
                                  "model.context_dim null, and make text_dim divisible by model.num_heads")

    def network_kwargs(self) -> dict:
        """The keyword arguments of ``build_network`` for this ``kind``."""
        return {name: getattr(self, name) for name in NETWORK_FIELDS[self.kind]}


CONTINUOUS_PATHS = ("linear", "vp", "trig")
"""Continuous-time paths by name (SPEC §6); see :func:`build_path`."""


@dataclass
class DiffusionConfig:
    """The forward process and the training target (SPEC §2–§4, §6).

    ``path: discrete`` is DDPM time ``t ∈ {0..T}`` on the named β ``schedule`` (optionally rescaled to
    zero terminal SNR); ``linear`` (rectified flow), ``vp`` and ``trig`` are continuous paths on
    ``[0, 1]``. ``target`` is what the network regresses (SPEC §4); ``weighting`` the loss weight
    ``w(t)`` (SPEC §3, :mod:`difflab.losses`). ``coupling`` pairs data with noise for flow matching
    (SPEC §6): ``none`` draws them independently, ``ot`` re-pairs each minibatch by exact optimal transport
    (:func:`difflab.flows.flow_matching_loss`; needs ``target: velocity``). ``objective`` chooses what
    ``difflab train`` fits: the diffusion loss, or ``ddgan`` — a generator of ``x̂0`` learned adversarially for the
    ``T`` steps of the path (SPEC §5; the ``ddgan`` section; ``target`` and ``weighting`` do not apply), or
    ``matryoshka`` — an image and its half-size version denoised jointly by the nested U-Net (``model.kind:
    matryoshka``; SPEC §5, :mod:`difflab.matryoshka`; the ``matryoshka`` section).
    """

    path: str = field(default="discrete", metadata=_choices("discrete", *CONTINUOUS_PATHS))
    schedule: str = field(default="linear", metadata=_choices(*SCHEDULES))
    T: int = 1000
    zero_terminal_snr: bool = False
    target: str = field(default="eps", metadata=_choices("eps", "x0", "v", "velocity"))
    weighting: str = field(default="none", metadata=_choices(*WEIGHTINGS))
    min_snr_gamma: float = 5.0
    coupling: str = field(default="none", metadata=_choices("none", "ot"))
    objective: str = field(default="diffusion", metadata=_choices("diffusion", "ddgan", "matryoshka"))

    def validate(self) -> None:
        _in_range("diffusion.T", self.T, 1, limits.MAX_T)
        if self.objective == "ddgan" and (self.path != "discrete" or self.coupling != "none"):
            raise ConfigError("diffusion.objective 'ddgan' trains a few-step chain on a discrete path "
                              "(path: discrete, schedule: vp, coupling: none)")
        if self.coupling == "ot" and (self.target != "velocity" or self.weighting != "none"):
            raise ConfigError("diffusion.coupling 'ot' is a flow-matching coupling: it needs target velocity "
                              "(on a continuous path) and weighting none")
        if not self.min_snr_gamma > 0:
            raise ConfigError(f"diffusion.min_snr_gamma must be > 0, got {self.min_snr_gamma}")
        discrete = self.path == "discrete"
        if self.target == "velocity" and discrete:
            raise ConfigError("diffusion.target 'velocity' needs a continuous path (linear, vp or trig): "
                              "a discrete path has no time derivative")
        if self.zero_terminal_snr and not discrete:
            raise ConfigError("diffusion.zero_terminal_snr applies to the discrete path only")
        # Where a(t_max) = 0 (zero terminal SNR, the linear path, trig up to rounding) ε-prediction
        # cannot give x̂0 = (x − s ε̂)/a at the first sampling step (Lin et al. 2024, §3.2).
        signal_vanishes = self.zero_terminal_snr or self.path in ("linear", "trig")
        if signal_vanishes and self.target == "eps":
            where = "zero terminal SNR" if discrete else f"the {self.path} path"
            raise ConfigError(f"diffusion.target 'eps' is singular at t_max on {where} (a = 0): "
                              f"use target v, x0{'' if discrete else ' or velocity'}")
        if self.zero_terminal_snr and self.weighting in ("min_snr", "truncated_snr"):
            raise ConfigError(f"diffusion.weighting {self.weighting!r} divides by SNR, which is 0 at t = T "
                              "with zero terminal SNR: use weighting none or snr")
        if discrete:
            try:
                build_path(self)
            except ValueError as err:
                raise ConfigError(f"diffusion: the {self.schedule} schedule with T={self.T}: {err}") from None


@dataclass
class TrainConfig:
    """The optimisation (:func:`difflab.training.train`).

    ``batch_size`` is the *global* batch: under ``torchrun`` each of the N ranks takes
    ``batch_size / N`` examples of it (it must divide). ``lr`` rises linearly over ``warmup_steps``
    and is constant after. ``grad_clip = 0`` and ``sample_every = 0`` switch those off;
    ``checkpoint_every = 0`` saves only at the end. ``p_uncond`` is the classifier-free-guidance
    label dropout (SPEC §7). ``mixed_precision: auto`` is bf16 autocast on CUDA and fp32 elsewhere.
    ``num_threads > 0`` sets torch's intra-op CPU threads (0 keeps torch's default). ``log_to`` lists the
    metric sinks (``jsonl`` always; ``tensorboard`` needs the optional extra); ``compile: true`` runs the
    networks through ``torch.compile``; ``divergence_factor`` stops a run whose loss exceeds that multiple of
    its running level (0: never; :mod:`difflab.engine.loop`).
    """

    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    ema_start: int = 0
    seed: int = 0
    p_uncond: float = 0.0
    log_every: int = 10
    sample_every: int = 0
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2
    num_sample_images: int = 64
    sample_steps: int = 50
    mixed_precision: str = field(default="auto", metadata=_choices("auto", "bf16", "no"))
    device: str = field(default="auto", metadata=_choices("auto", "cpu", "cuda"))
    num_threads: int = 0
    log_to: list[str] = field(default_factory=lambda: ["jsonl"])
    compile: bool = False
    divergence_factor: float = 1000.0

    def validate(self) -> None:
        bad = [s for s in self.log_to if s not in ("jsonl", "tensorboard")]
        if bad:
            raise ConfigError(f"train.log_to may hold jsonl and tensorboard, got {bad[0]!r}")
        if not (self.divergence_factor >= 0 and math.isfinite(self.divergence_factor)):
            raise ConfigError(f"train.divergence_factor must be a finite number >= 0, got {self.divergence_factor}")
        for name in ("steps", "log_every", "keep_checkpoints"):
            _in_range(f"train.{name}", getattr(self, name), 1, limits.MAX_STEPS)
        for name in ("warmup_steps", "ema_start", "sample_every", "checkpoint_every"):
            _in_range(f"train.{name}", getattr(self, name), 0, limits.MAX_STEPS)
        _in_range("train.batch_size", self.batch_size, 1, limits.MAX_BATCH)
        _in_range("train.num_sample_images", self.num_sample_images, 1, MAX_SAMPLE_IMAGES)
        _in_range("train.sample_steps", self.sample_steps, 1, limits.MAX_NFE)
        _in_range("train.num_threads", self.num_threads, 0, limits.MAX_THREADS)
        _in_range("train.seed", self.seed, 0, limits.MAX_SEED)
        for name in ("lr",):
            if not (self.lr > 0 and math.isfinite(self.lr)):
                raise ConfigError(f"train.lr must be a positive number, got {self.lr}")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                raise ConfigError(f"train.{name} must be a finite number >= 0, got {value}")
        for name in ("p_uncond", "ema_decay"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"train.{name} must lie in [0, 1), got {value}")


@dataclass
class ClassifierConfig:
    """The noise-conditional classifier ``p_φ(y | x_t, t)`` of classifier guidance (SPEC §7), trained by
    ``difflab train-classifier CONFIG`` on the config's data and path (:mod:`difflab.classifier_training`).

    ``width``, ``depth`` and ``time_dim`` size :class:`~difflab.networks.classifier.NoisyClassifier`;
    ``steps`` of AdamW on batches of ``batch_size`` (seed ``train.seed``; checkpoints, log sinks and the
    divergence stop as ``train.*`` says); a random ``held_out`` fraction of the data is kept aside to report the
    accuracy at several noise levels.
    """

    width: int = 64
    depth: int = 2
    time_dim: int = 64
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    held_out: float = 0.1
    log_every: int = 50

    def validate(self) -> None:
        for name in ("width", "time_dim"):
            _in_range(f"classifier.{name}", getattr(self, name), 1, limits.MAX_WIDTH)
        _in_range("classifier.depth", self.depth, 1, limits.MAX_DEPTH)
        for name in ("steps", "log_every"):
            _in_range(f"classifier.{name}", getattr(self, name), 1, limits.MAX_STEPS)
        _in_range("classifier.batch_size", self.batch_size, 1, limits.MAX_BATCH)
        if self.time_dim % 2:
            raise ConfigError(f"classifier.time_dim must be even (sin/cos pairs), got {self.time_dim}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"classifier.lr must be a positive number, got {self.lr}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            raise ConfigError(f"classifier.weight_decay must be a finite number >= 0, got {self.weight_decay}")
        if not 0.0 <= self.held_out < 1.0:
            raise ConfigError(f"classifier.held_out must lie in [0, 1), got {self.held_out}")


@dataclass
class AutoencoderConfig:
    """The KL autoencoder of latent diffusion (SPEC §5; :mod:`difflab.networks.autoencoder`), trained by
    ``difflab train-autoencoder CONFIG`` on ``data`` with ``train.*`` (steps, batch, lr, seed, checkpoints).

    Sizes: ``latent_channels`` and a downsampling factor ``2^(len(channel_mults) − 1)``. Loss per example
    (:mod:`difflab.objectives.autoencoder`): ``Σ|x − x̂| + perceptual_weight · CHW · perceptual + kl_weight · KL``
    (sums over pixels and latent entries, Stable Diffusion's scale, so ``kl_weight`` 1e-6 is its value), plus,
    with ``disc_weight > 0``, ``disc_weight · λ · L_adv`` after ``disc_start`` steps, ``λ`` adaptive. A random
    ``held_out`` fraction of the data is kept aside for ``difflab eval-autoencoder``.
    """

    latent_channels: int = 4
    base_channels: int = 32
    channel_mults: list[int] = field(default_factory=lambda: [1, 2])
    kl_weight: float = 1e-6
    perceptual_weight: float = 0.0
    disc_weight: float = 0.0
    disc_start: int = 0
    held_out: float = 0.1

    def validate(self) -> None:
        for name in ("latent_channels", "base_channels"):
            _in_range(f"autoencoder.{name}", getattr(self, name), 1, limits.MAX_WIDTH)
        _in_range("autoencoder.disc_start", self.disc_start, 0, limits.MAX_STEPS)
        if not self.channel_mults or len(self.channel_mults) > 4 or any(m < 1 for m in self.channel_mults):
            raise ConfigError("autoencoder.channel_mults must be 1 to 4 positive integers (3 halvings at most), "
                              f"got {self.channel_mults}")
        _bounded_list("autoencoder.channel_mults", self.channel_mults, 1, MAX_CHANNEL_MULT, 4)
        for name, high in (("kl_weight", 1.0), ("perceptual_weight", 1e4), ("disc_weight", 1e4)):
            value = getattr(self, name)
            if not 0.0 <= value <= high:
                raise ConfigError(f"autoencoder.{name} must lie in [0, {high:g}], got {value}")
        if not 0.0 <= self.held_out < 1.0:
            raise ConfigError(f"autoencoder.held_out must lie in [0, 1), got {self.held_out}")



@dataclass
class DDGANConfig:
    """DDGAN (SPEC §5; Xiao, Kreis, Vahdat 2022), used when ``diffusion.objective: ddgan``
    (:mod:`difflab.objectives.ddgan`).

    The generator is ``cfg.model`` with a latent ``z ∈ R^nz`` injected by modulation; the discriminator is an MLP
    (points) or a small conv net (images) of width ``d_width`` and ``d_depth`` blocks (levels for images). Adam with
    ``betas`` and learning rates ``lr_g`` / ``lr_d`` (``train.lr`` is not used); ``train.ema_decay`` is the EMA of
    the generator, ``train.grad_clip`` clips both modules (0: off). The R1 penalty ``r1_gamma/2 · E||∇_x D||²`` on
    real ``x_{t−1}`` is added every ``lazy_reg`` discriminator steps (1: every step), not rescaled by the interval,
    as the reference does. ``d_fourier > 0`` gives the point discriminator that many random Fourier features of std
    ``d_fourier_scale`` of each input (:class:`~difflab.networks.discriminator.FourierFeatures`; 0: raw coordinates).
    """

    nz: int = 32
    lr_g: float = 1.6e-4
    lr_d: float = 1.25e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.9])
    r1_gamma: float = 0.05
    lazy_reg: int = 1
    d_width: int = 128
    d_depth: int = 3
    d_fourier: int = 0
    d_fourier_scale: float = 1.0

    def validate(self) -> None:
        _in_range("ddgan.d_fourier", self.d_fourier, 0, limits.MAX_WIDTH)
        if not (self.d_fourier_scale > 0 and math.isfinite(self.d_fourier_scale)):
            raise ConfigError(f"ddgan.d_fourier_scale must be a positive number, got {self.d_fourier_scale}")
        for name in ("nz", "d_width"):
            _in_range(f"ddgan.{name}", getattr(self, name), 1, limits.MAX_WIDTH)
        _in_range("ddgan.lazy_reg", self.lazy_reg, 1, limits.MAX_STEPS)
        _in_range("ddgan.d_depth", self.d_depth, 1, limits.MAX_DEPTH)
        for name in ("lr_g", "lr_d"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"ddgan.{name} must be a positive number, got {value}")
        if not (self.r1_gamma >= 0 and math.isfinite(self.r1_gamma)):
            raise ConfigError(f"ddgan.r1_gamma must be a finite number >= 0, got {self.r1_gamma}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"ddgan.betas must be two numbers in [0, 1) (Adam's β1, β2), got {self.betas}")


@dataclass
class MatryoshkaConfig:
    """Multi-scale (Matryoshka) diffusion (SPEC §5; Gu et al. 2023), used when ``diffusion.objective: matryoshka``
    (:mod:`difflab.objectives.matryoshka`): progressive training fits the inner (half-size) network alone for the
    first ``inner_steps`` steps, then both resolutions jointly (0: jointly from the start)."""

    inner_steps: int = 0

    def validate(self) -> None:
        _in_range("matryoshka.inner_steps", self.inner_steps, 0, limits.MAX_STEPS)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "diffusion": DiffusionConfig, "train": TrainConfig,
            "classifier": ClassifierConfig, "autoencoder": AutoencoderConfig, "ddgan": DDGANConfig,
            "matryoshka": MatryoshkaConfig}


@dataclass
class RunConfig:
    """Everything that defines a run; ``to_dict``/``from_dict`` round-trip exactly."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    ddgan: DDGANConfig = field(default_factory=DDGANConfig)
    matryoshka: MatryoshkaConfig = field(default_factory=MatryoshkaConfig)

    def validate(self) -> "RunConfig":
        for name in SECTIONS:
            getattr(self, name).validate()
        if self.diffusion.objective == "ddgan" and (self.model.learned_variance or self.train.p_uncond > 0):
            raise ConfigError("diffusion.objective 'ddgan' draws x̂0 from its generator: it takes no "
                              "model.learned_variance and no train.p_uncond (label dropout)")
        if (self.diffusion.objective == "matryoshka") != (self.model.kind == "matryoshka"):
            raise ConfigError("diffusion.objective 'matryoshka' and model.kind 'matryoshka' go together (the nested "
                              "U-Net denoises both resolutions; the objective trains them)")
        if self.diffusion.objective == "matryoshka" and (
                self.diffusion.weighting != "none" or self.diffusion.target == "velocity" or self.model.learned_variance
                or self.data.autoencoder is not None):
            raise ConfigError("diffusion.objective 'matryoshka' sums plain per-resolution MSEs of pixel images: it takes "
                              "target eps, x0 or v, weighting none, no model.learned_variance and no data.autoencoder")
        if self.train.p_uncond > 0 and not self.model.conditional:
            raise ConfigError("train.p_uncond > 0 (label dropout) needs model.conditional: true")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> "RunConfig":
        """Build and validate a config from nested dicts (missing keys take their defaults)."""
        raw = {} if raw is None else raw
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a mapping of sections {list(SECTIONS)}, got {type(raw).__name__}")
        sections = {}
        for key, value in raw.items():
            if key not in SECTIONS:
                raise ConfigError(f"unknown config section {key!r}{_suggest(str(key), SECTIONS)}")
            sections[key] = _build_section(key, SECTIONS[key], {} if value is None else value)
        return cls(**sections).validate()


# --- loading and overrides -------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads exponent floats without a dot (``1e-3``) as floats."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_value(text: str) -> Any:
    """A YAML scalar or flow value (``3``, ``1e-3``, ``true``, ``[1, 2]``, ``{a: 1}``, ``null``)."""
    return _load_yaml(text, f"cannot parse value {text!r}")


def _load_yaml(text: str, where: str) -> Any:
    """Parse YAML with difflab's loader, then refuse documents whose aliases expand past
    :data:`difflab.limits.MAX_CONFIG_VALUES` values or refer to themselves (measured without expanding them)."""
    try:
        value = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: invalid YAML: {_first_line(err)}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None
    try:
        limits.expanded_size(value, where)
    except limits.LimitError as err:
        raise ConfigError(str(err)) from None
    return value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``key=value`` strings with dotted keys (``train.lr=1e-3``) to a raw config dict (copied)."""
    raw = _deep_copy(raw or {})
    for item in overrides or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value with a dotted key such as train.lr=1e-3, got {item!r}")
        parts = key.split(".")
        section = parts[0]
        if section not in SECTIONS:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, all_keys())}")
        if len(parts) < 2:
            raise ConfigError(f"--set needs a key inside a section, e.g. {section}.{_field_names(SECTIONS[section])[0]}")
        name = parts[1]
        fields = {f.name: f for f in dataclasses.fields(SECTIONS[section])}
        if name not in fields:
            raise ConfigError(f"unknown config key {key!r}{_suggest(key, all_keys())}")
        if len(parts) > 2 and _type_of(SECTIONS[section], name) is not dict:
            raise ConfigError(f"config key {section}.{name} has no sub-keys (got {key!r})")
        node = raw.setdefault(section, {})
        if node is None:
            node = raw[section] = {}
        for part in parts[1:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[parts[-1]] = parse_value(text)
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file (or start from the defaults when ``path`` is None), apply overrides, validate."""
    raw: Any = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} not found")
        if path.stat().st_size > limits.MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes is too large for a config "
                              f"(limit {limits.MAX_CONFIG_BYTES})")
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a text file (UTF-8)") from None
        raw = _load_yaml(text, str(path))
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"{path}: a config must be a mapping of sections {list(SECTIONS)}")
    try:
        return RunConfig.from_dict(apply_overrides(raw or {}, overrides or []))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}" if path is not None else str(err)) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the config as YAML (block style, sections in order)."""
    Path(path).write_text(dump_config(cfg))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def all_keys() -> list[str]:
    """Every valid dotted key, e.g. ``train.lr``."""
    return [f"{section}.{name}" for section, cls in SECTIONS.items() for name in _field_names(cls)]


def build_path(diffusion: DiffusionConfig):
    """The :class:`~difflab.paths.GaussianPath` a :class:`DiffusionConfig` describes (SPEC §2, §6)."""
    from difflab import paths

    if diffusion.path == "discrete":
        return paths.DiscretePath.from_schedule(diffusion.schedule, diffusion.T,
                                                zero_terminal_snr=diffusion.zero_terminal_snr)
    continuous = {"linear": paths.LinearPath, "vp": paths.VPPath, "trig": paths.TrigPath}
    return continuous[diffusion.path]()


# --- field checking -------------------------------------------------------------------------------------
def _build_section(section: str, cls, raw: Any):
    if not isinstance(raw, dict):
        raise ConfigError(f"config section {section!r} must be a mapping, got {_describe(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in raw.items():
        dotted = f"{section}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r}{_suggest(dotted, all_keys())}")
        values[key] = _check_value(dotted, value, _type_of(cls, key), fields[key].metadata.get("choices"))
    return cls(**values)


def _check_value(dotted: str, value: Any, annotation, choices=None) -> Any:
    """Check ``value`` against a field's type (and enum choices); returns it normalised."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)][0]
        return _check_value(dotted, value, inner, choices)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{dotted} must be true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{dotted} must be an integer, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{dotted} must be a number, got {_describe(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"{dotted} must be a finite number, got an integer of {value.bit_length()} bits") from None
        if not math.isfinite(value):
            raise ConfigError(f"{dotted} must be a finite number, got {value}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{dotted} must be a string, got {_describe(value)}")
        if choices is not None and value not in choices:
            raise ConfigError(f"{dotted} must be one of {', '.join(choices)}; got {value!r}{_suggest(value, choices)}")
        return value
    if annotation is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} must be a mapping, got {_describe(value)}")
        _check_finite(dotted, value)
        return dict(value)
    if origin is list:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{dotted} must be a list, got {_describe(value)}")
        return [_check_value(f"{dotted}[{i}]", v, args[0]) for i, v in enumerate(value)]
    raise TypeError(f"unsupported config annotation {annotation!r} for {dotted}")  # a bug here, not user input


def _type_of(cls, name: str):
    hints = typing.get_type_hints(cls)
    annotation = hints[name]
    return dict if annotation is dict or typing.get_origin(annotation) is dict else annotation


def _field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _in_range(dotted: str, value: int, low: int, high: int) -> None:
    if value < low:
        raise ConfigError(f"{dotted} must be >= {low}, got {value}")
    if value > high:
        raise ConfigError(f"{dotted} must be <= {high}, got {value}")


def _bounded_list(dotted: str, values: list, low: int, high: int, max_len: int) -> None:
    if len(values) > max_len:
        raise ConfigError(f"{dotted} may hold at most {max_len} entries, got {len(values)}")
    for i, v in enumerate(values):
        _in_range(f"{dotted}[{i}]", v, low, high)


def _check_finite(dotted: str, value: Any) -> None:
    """Refuse NaN and ±inf anywhere in a free-form value (``data.options``), naming the key."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{dotted} must be a finite number, got {value}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(f"{dotted}.{k}", v)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_finite(f"{dotted}[{i}]", v)


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _first_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _deep_copy(raw):
    if isinstance(raw, dict):
        return {k: _deep_copy(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_deep_copy(v) for v in raw]
    return raw
