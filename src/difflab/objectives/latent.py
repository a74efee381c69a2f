"""The diffusion objective on an autoencoder's scaled latents (latent diffusion, SPEC §5; :mod:`difflab.latent`):
:class:`~difflab.objectives.diffusion.DiffusionObjective` on the cached latents, plus a copy of the autoencoder in
the run directory (what :func:`difflab.pipeline.load_run` decodes with) and decoded sample pictures."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from difflab.checkpoint import atomic_write_json, read_json
from difflab.config import RunConfig
from difflab.engine.errors import TrainingError
from difflab.latent import RECORD_FILE, WEIGHTS_FILE, LatentDecoder, load_autoencoder
from difflab.objectives.diffusion import DiffusionObjective


class LatentDiffusionObjective(DiffusionObjective):
    """The diffusion objective on an autoencoder's scaled latents: copies the autoencoder into the run when
    training begins, records its hash and scale in every checkpoint, and decodes its sample pictures."""

    artifacts = (RECORD_FILE, WEIGHTS_FILE)

    def __init__(self, cfg: RunConfig, dataset, device: torch.device):
        super().__init__(cfg, dataset, device)
        self.autoencoder = load_autoencoder(cfg.data.autoencoder, device=device)

    def begin(self, engine) -> None:
        """Copy the autoencoder's weights and record (without the latents) into the run directory; a resumed run
        must name the autoencoder it started with."""
        source, target = Path(self.config.data.autoencoder), engine.run.path
        record = read_json(source / RECORD_FILE)
        if (target / RECORD_FILE).is_file() and read_json(target / RECORD_FILE).get("sha256") != record["sha256"]:
            raise TrainingError(f"the autoencoder in {str(source)!r} is not the one this run started with (its copy "
                                f"in {str(target)!r}): resume with that one, or start again with --overwrite")
        for key in ("latents", "latents_sha256"):
            record.pop(key, None)
        shutil.copyfile(source / WEIGHTS_FILE, target / f".{WEIGHTS_FILE}.copy.tmp")
        (target / f".{WEIGHTS_FILE}.copy.tmp").replace(target / WEIGHTS_FILE)
        atomic_write_json(target / RECORD_FILE, record)
        load_autoencoder(target)  # the copy is whole

    def meta(self) -> dict:
        ae = self.autoencoder
        return {**super().meta(), "data_kind": "image",
                "latent": {"sha256": ae.sha256, "scale_factor": ae.scale_factor,
                           "image_shape": list(ae.meta["image_shape"]), "source": str(self.config.data.autoencoder)}}

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return LatentDecoder(self.autoencoder)(x)

    def describe(self) -> str:
        return f"latent diffusion (scale factor {self.autoencoder.scale_factor:.4g}): {super().describe()}"
