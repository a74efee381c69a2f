"""Latent diffusion (SPEC §5; Rombach et al. 2022): the same pipeline between an encoder and a decoder.

An autoencoder run (``difflab train-autoencoder``, :mod:`difflab.objectives.autoencoder`) ends by writing::

    AE_RUN/autoencoder.safetensors   the KL autoencoder's weights (encoder and decoder)
    AE_RUN/latents.safetensors       μ = E(x) of every example of the data set (``mu``; labels ``y``)
    AE_RUN/autoencoder.json          format, step, SHA-256 of both files, the run config, and meta: image and
                                     latent shapes, sizes, ``scale_factor``, the held-out split

**Latent scale.** ``scale_factor = 1 / std(μ)`` over every entry of the training split's latents (the famous
``0.18215`` is this number for Stable Diffusion's autoencoder); the denoiser learns ``z' = scale_factor · z``,
whose std is 1, so the path's prior ``N(0, s_max² I)`` and its log-SNR mean what they say. Scaling is a
log-SNR shift: ``x = a z' + s ε = c (a z + (s/c) ε)`` with ``c = scale_factor``, so diffusing scaled latents on
a path ``(a, s)`` is diffusing unscaled latents on ``(a, s/c)`` (:class:`ScaledLatentPath`, ``λ → λ + 2 log c``);
the test suite checks the two samplers agree through :func:`difflab.equivalence.change_path`.

**Latent runs.** A config with ``data.autoencoder: AE_RUN`` trains on the cached latents (encoded once, at the
end of the autoencoder run) times the scale: :func:`training_data` returns them as the data set (its shape is the
latent's), for ``difflab train`` and ``difflab train-classifier`` alike. The run reads ``AE_RUN`` because the user
named it in the config. At the start of training the autoencoder's weights and record are *copied into the latent
run* (:class:`~difflab.objectives.latent.LatentDiffusionObjective`), and :func:`difflab.pipeline.load_run` reads that copy only (checked
against the SHA-256 the checkpoints record) — a run directory never makes difflab read another path it names.
Every sampler, classifier-free and classifier guidance run on the latents unchanged; :class:`LatentDecoder` maps
the result ``z'`` to images ``D(z' / c)``, so ``difflab sample`` and ``difflab eval`` see images.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch

from difflab.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json, load_saved_module, read_json
from difflab.limits import LimitError, check_data_shape
from difflab.config import ConfigError, RunConfig
from difflab.networks.autoencoder import KLAutoencoder
from difflab.paths import ContinuousPath
from difflab.utils import default_device

WEIGHTS_FILE = "autoencoder.safetensors"
LATENTS_FILE = "latents.safetensors"
RECORD_FILE = "autoencoder.json"
FORMAT = "difflab-autoencoder"
MAX_LATENTS_BYTES = 4 << 30
"""Cached latents of a data set (10 million 4×8×8 latents in float32 would be 10 GB: far beyond the built-in sets)."""
FORMAT_VERSION = 1
DATA_KEYS = ("name", "path", "n", "options")
"""The ``data.*`` entries a latent run must share with its autoencoder's run (``data.autoencoder`` aside)."""


# --- the autoencoder on disk ---------------------------------------------------------------------------------------
@dataclass
class TrainedAutoencoder:
    """A trained KL autoencoder with its record: ``encode``/``decode`` in eval mode, ``scale_factor`` from ``meta``."""

    net: KLAutoencoder
    config: RunConfig
    meta: dict
    sha256: str
    directory: Optional[Path] = None

    @property
    def scale_factor(self) -> float:
        return float(self.meta["scale_factor"])

    @torch.no_grad()
    def encode(self, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """``μ = E(x)`` in batches, float32 on the CPU."""
        return batched(lambda b: self.net.encode(b)[0], self.net, x, batch_size)

    @torch.no_grad()
    def decode(self, z: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        """``x̂ = D(z)`` in batches, float32 on the CPU."""
        return batched(self.net.decode, self.net, z, batch_size)


def batched(fn, net: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``fn`` over ``x`` in batches on ``net``'s device, in eval mode (restored after), float32 on the CPU."""
    device, was_training = next(net.parameters()).device, net.training
    net.eval()
    try:
        return torch.cat([fn(x[i:i + batch_size].to(device, torch.float32)).float().cpu()
                          for i in range(0, x.shape[0], batch_size)])
    finally:
        net.train(was_training)


def build_autoencoder(cfg: RunConfig, image_shape) -> KLAutoencoder:
    """The :class:`KLAutoencoder` ``cfg.autoencoder`` describes for images of ``image_shape``."""
    ac = cfg.autoencoder
    return KLAutoencoder(image_shape, ac.latent_channels, ac.base_channels, ac.channel_mults)


def scale_factor(latents: torch.Tensor) -> float:
    """``1 / std`` of every entry of ``latents`` (Rombach et al. 2022, §4.3.2; module docstring)."""
    std = float(latents.double().std())
    if not (std > 0 and math.isfinite(std)):
        raise ValueError(f"the latents have std {std}: cannot scale them to unit variance")
    return 1.0 / std


def save_autoencoder(out_dir: Union[str, Path], net: KLAutoencoder, cfg: RunConfig, step: int, meta: dict,
                     latents: Optional[dict] = None) -> Path:
    """Write the weights, the latents (``{"mu": (N, ...), "y": (N,)}``, if given) and then the JSON record,
    each atomically; returns the record."""
    from safetensors.torch import save as safetensors_save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = safetensors_save({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()},
                               metadata={"format": FORMAT, "step": str(step)})
    atomic_write_bytes(out_dir / WEIGHTS_FILE, weights)
    record = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), "weights": WEIGHTS_FILE,
              "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights), "saved_at": time.time(), "torch": torch.__version__,
              "config": cfg.to_dict(), "meta": meta}
    if latents is not None:
        data = safetensors_save({k: v.detach().cpu().contiguous() for k, v in latents.items()})
        atomic_write_bytes(out_dir / LATENTS_FILE, data)
        record.update(latents=LATENTS_FILE, latents_sha256=hashlib.sha256(data).hexdigest())
    atomic_write_json(out_dir / RECORD_FILE, record)
    return out_dir / RECORD_FILE


def load_autoencoder(ae_dir: Union[str, Path], device=None) -> TrainedAutoencoder:
    """Restore an autoencoder record (an autoencoder run, or a latent run's copy), checked against its hash."""
    def build(record: dict) -> KLAutoencoder:
        image_shape = check_data_shape(record["meta"].get("image_shape"), "meta.image_shape")
        scale = record["meta"].get("scale_factor", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (0 < scale < math.inf):
            raise LimitError(f"meta.scale_factor must be a positive finite number, got {scale!r:.40}")
        return build_autoencoder(record["run_config"], image_shape)

    ae_dir = Path(ae_dir)
    record, net = load_saved_module(ae_dir, RECORD_FILE, FORMAT, "autoencoder",
                                    "train one with 'difflab train-autoencoder CONFIG --out AE_RUN'", build)
    net.to(default_device(device)).eval()
    return TrainedAutoencoder(net, record["run_config"], record["meta"], record["sha256"], ae_dir)


def load_latents(ae_dir: Union[str, Path]) -> dict:
    """The cached latents of an autoencoder run, ``{"mu": (N, c, h, w), "y": (N,) if labelled}``, hash-checked."""
    from safetensors.torch import load as safetensors_load

    ae_dir = Path(ae_dir)
    record = read_json(ae_dir / RECORD_FILE) if (ae_dir / RECORD_FILE).is_file() else {}
    if record.get("format") != FORMAT or "latents" not in record:
        raise CheckpointError(f"{str(ae_dir)!r} holds no finished autoencoder run with cached latents "
                              "(train it with 'difflab train-autoencoder' to the end)")
    if record["latents"] != LATENTS_FILE or not isinstance(record.get("latents_sha256"), str):
        raise CheckpointError(f"{ae_dir / RECORD_FILE}: its latents must be {LATENTS_FILE} beside it, with a hash")
    file = ae_dir / LATENTS_FILE
    size = file.stat().st_size if file.is_file() else 0
    if size > MAX_LATENTS_BYTES:
        raise CheckpointError(f"{file}: {size:,} bytes is more than cached latents may hold ({MAX_LATENTS_BYTES:,})")
    data = file.read_bytes() if file.is_file() else b""
    if hashlib.sha256(data).hexdigest() != record["latents_sha256"]:
        raise CheckpointError(f"{file} is missing or does not match the hash recorded in {RECORD_FILE}")
    try:
        return safetensors_load(data)
    except Exception as err:  # safetensors' own error type
        raise CheckpointError(f"{file}: unreadable safetensors file ({type(err).__name__})") from None


# --- latent runs -----------------------------------------------------------------------------------------------------
def training_data(cfg: RunConfig):
    """The data set a run config trains on: ``cfg.data`` itself, or with ``data.autoencoder`` the scaled cached
    latents ``scale_factor · E(x)`` of that autoencoder run (shape ``(N, c, h, w)``, the same labels)."""
    from difflab.data import ArrayDataset, load_dataset

    d = cfg.data
    if d.autoencoder is None:
        return load_dataset(d.name, path=d.path, n=d.n, seed=cfg.train.seed, **d.options)
    ae = load_autoencoder(d.autoencoder, device="cpu")
    mine, theirs = {k: getattr(d, k) for k in DATA_KEYS}, {k: getattr(ae.config.data, k) for k in DATA_KEYS}
    if mine != theirs or cfg.train.seed != ae.config.train.seed:
        raise ConfigError(f"data.autoencoder {d.autoencoder!r} was trained on data {theirs} (seed "
                          f"{ae.config.train.seed}), this config asks for {mine} (seed {cfg.train.seed})")
    latents = load_latents(d.autoencoder)
    y = latents.get("y")
    return ArrayDataset(latents["mu"] * ae.scale_factor, y, int(ae.meta["num_classes"]) if y is not None else 0,
                        kind="image", name=f"latents of {d.name} by {d.autoencoder}")


class LatentDecoder:
    """``z' -> D(z' / scale_factor)``: the images of scaled latents (module docstring)."""

    def __init__(self, autoencoder: TrainedAutoencoder, batch_size: int = 256):
        self.autoencoder, self.batch_size = autoencoder, batch_size

    @property
    def image_shape(self) -> tuple:
        return tuple(self.autoencoder.meta["image_shape"])

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z / self.autoencoder.scale_factor, self.batch_size)


def load_latent_decoder(run_dir: Union[str, Path], latent_meta: dict, device=None) -> LatentDecoder:
    """The decoder of a latent run, from the run's own copy of its autoencoder (hash-checked against the checkpoint)."""
    ae = load_autoencoder(run_dir, device=device)
    if not isinstance(latent_meta, dict) or ae.sha256 != latent_meta.get("sha256") or "scale_factor" not in ae.meta:
        raise CheckpointError(f"the autoencoder in {str(run_dir)!r} is not the one this run was trained with")
    return LatentDecoder(ae)


# --- scaling is a log-SNR shift ------------------------------------------------------------------------------------
class ScaledLatentPath(ContinuousPath):
    """The path of *unscaled* latents ``z`` equivalent to ``base`` on scaled latents ``z' = c z``:
    ``a(t) = a_base(t)``, ``s(t) = s_base(t) / c``, so ``x = a z + s ε = x' / c`` and ``λ(t) = λ_base(t) + 2 log c``
    (module docstring; SPEC §5, §6)."""

    def __init__(self, base: ContinuousPath, scale: float):
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"the latent scale must be a positive number, got {scale}")
        self.base, self.scale = base, float(scale)
        self.t_min, self.t_max = base.t_min, base.t_max

    def a(self, t):
        return self.base.a(t)

    def s(self, t):
        return self.base.s(t) / self.scale

    def a_dot(self, t):
        return self.base.a_dot(t)

    def s_dot(self, t):
        return self.base.s_dot(t) / self.scale

    def t_from_log_snr(self, lam):
        return self.base.t_from_log_snr(torch.as_tensor(lam, dtype=torch.float64) - 2.0 * math.log(self.scale))


# --- the exact check: a linear-Gaussian (PCA) autoencoder on a Gaussian bed -----------------------------------------
@dataclass
class PCAAutoencoder:
    """The linear-Gaussian autoencoder of data ``N(μ, Σ)``, ``Σ = U Λ Uᵀ``, keeping the ``k`` largest directions:

    ``E(x) = U_kᵀ (x − μ)`` (latents ``N(0, Λ_k)``), ``D(z) = μ + U_k z + U_⊥ η`` with ``η ~ N(0, σ² I)`` and
    ``σ² = mean(Λ_⊥)`` (probabilistic PCA's maximum-likelihood noise, Tipping & Bishop 1999). Its output law for
    latents ``N(m, C)`` is the Gaussian ``N(μ + U_k m, U_k C U_kᵀ + σ² U_⊥ U_⊥ᵀ)`` (:meth:`output_law`). In the
    eigenbasis both it and the data are block-diagonal, so (SPEC §1's KL)

        KL(output || data) = KL(N(m, C) || N(0, Λ_k)) + KL(N(0, σ² I) || N(0, Λ_⊥)),

    the latent sampler's error plus the autoencoder's truncation error (:meth:`truncation_kl`), exactly; a
    latent scale ``c`` multiplies ``m, C^{½}`` and the latent law alike and changes neither term.
    """

    mean: torch.Tensor       # μ (D,)
    basis: torch.Tensor      # U_k (D, k)
    rest: torch.Tensor       # U_⊥ (D, D − k)
    variances: torch.Tensor  # Λ_k (k,)
    dropped: torch.Tensor    # Λ_⊥ (D − k,)
    noise_var: float         # σ²

    @classmethod
    def fit(cls, mean: torch.Tensor, cov: torch.Tensor, k: int, noise_var: Optional[float] = None) -> "PCAAutoencoder":
        """From the data's mean and covariance (float64), with ``σ² = mean(Λ_⊥)`` unless ``noise_var`` is given."""
        eigvals, eigvecs = torch.linalg.eigh(torch.as_tensor(cov, dtype=torch.float64))  # ascending
        D = eigvals.shape[0]
        if not 1 <= k < D:
            raise ValueError(f"keep 1 <= k < D = {D} directions, got k={k}")
        order = torch.argsort(eigvals, descending=True)
        eigvals, eigvecs = eigvals[order], eigvecs[:, order]
        dropped = eigvals[k:]
        return cls(torch.as_tensor(mean, dtype=torch.float64), eigvecs[:, :k], eigvecs[:, k:], eigvals[:k], dropped,
                   float(dropped.mean()) if noise_var is None else float(noise_var))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``U_kᵀ (x − μ)``, ``(B, D) -> (B, k)``."""
        return (x.double() - self.mean) @ self.basis

    def output_law(self, m: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean ``(D,)`` and covariance ``(D, D)`` of ``D(z)`` for ``z ~ N(m, C)``."""
        U, R = self.basis, self.rest
        return self.mean + U @ m, U @ C @ U.T + self.noise_var * R @ R.T

    def truncation_kl(self) -> torch.Tensor:
        """``KL(N(0, σ² I) || N(0, Λ_⊥))``: the output law's KL to the data with exact latents (SPEC §1)."""
        from difflab.gaussian import kl_normal

        n = self.dropped.shape[0]
        return kl_normal(torch.zeros(n, dtype=torch.float64), self.noise_var * torch.eye(n, dtype=torch.float64),
                         torch.zeros(n, dtype=torch.float64), torch.diag(self.dropped))
