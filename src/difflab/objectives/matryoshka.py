"""The multi-scale (Matryoshka) objective (SPEC §5; Gu et al. 2023; :mod:`difflab.matryoshka`): the diffusion
objective on the joint data ``x0 = (x, r·avgpool_r(x))`` of an image data set, with the nested U-Net
(``model.kind: matryoshka``) and the multi-resolution loss, trained progressively.

Per step ``k`` the draws are the diffusion objective's (:meth:`DiffusionObjective.draw`: one ``t`` per example for
both resolutions, ``ε`` with independent entries for both, label dropout for classifier-free guidance), then

- ``k <= matryoshka.inner_steps``: the inner network alone, ``loss = loss_low`` (the outer level is not run);
- after: both jointly, ``loss = loss_high + loss_low`` (:func:`~difflab.matryoshka.multiresolution_loss`).

The metrics are ``loss`` (what is optimised: it steps up where the high resolution joins) and ``loss_low``, both
defined at every step, so every logged window mean is exact; the high resolution's term is ``loss − loss_low``.

The phase is a function of ``k`` alone, so ``--resume`` continues in the right phase bit for bit, and divergence
checks, checkpoints and kills behave as for every objective of the engine. A run's checkpoints record the layout
(``meta.matryoshka``); :func:`difflab.pipeline.load_run` decodes its samples at the high resolution (or the low one,
:func:`difflab.matryoshka.at_resolution`).
"""

from __future__ import annotations

import torch

from difflab.config import ConfigError, RunConfig
from difflab.engine.loop import require_same
from difflab.matryoshka import NestedLayout, ResolutionDecoder, joint_data, multiresolution_loss
from difflab.objectives.diffusion import RESUME_MUST_MATCH, DiffusionObjective


class MatryoshkaObjective(DiffusionObjective):
    """Train the nested U-Net on ``dataset``'s images and their half-size versions (module docstring)."""

    def setup_data(self, cfg: RunConfig, dataset, device: torch.device) -> None:
        """The diffusion objective's data, then the images replaced by the packed joint data (``data_shape`` is the
        packed ``(C, H·W + h·w)``, which the nested U-Net is built for)."""
        super().setup_data(cfg, dataset, device)
        if len(self.data_shape) != 3 or self.data_shape[1] != self.data_shape[2]:
            raise ConfigError(f"diffusion.objective 'matryoshka' needs square images, and data set {cfg.data.name!r} "
                              f"has examples of shape {self.data_shape}")
        self.layout = NestedLayout.of_image(self.data_shape)
        self.x_data = joint_data(self.x_data, self.layout)  # (N, C, H·W + h·w)
        self.data_shape = self.layout.packed_shape

    def inner_only(self, step: int) -> bool:
        """Whether step ``step`` (1-based) belongs to the first phase of progressive training."""
        return step <= self.config.matryoshka.inner_steps

    def step(self, ctx) -> dict:
        x0, t, eps, cond = self.draw(ctx)
        inner_only = self.inner_only(ctx.step)
        with ctx.autocast():
            terms = multiresolution_loss(self.denoiser(ctx), self.layout, x0, t, eps, inner_only, **cond)
            loss_low = terms["low"].mean()
            loss = loss_low if inner_only else loss_low + terms["high"].mean()
        ctx.optimize("net", loss)
        return {"loss": loss.detach(), "loss_low": loss_low.detach()}

    def check_resumable(self, saved_config: RunConfig) -> None:
        require_same(self.config, saved_config, (*RESUME_MUST_MATCH, "matryoshka"))

    def meta(self) -> dict:
        layout = self.layout
        return {**super().meta(), "data_kind": "image",
                "matryoshka": {"image_shape": list(layout.high_shape), "ratio": layout.ratio}}

    def describe(self) -> str:
        lo = self.layout.low_shape
        return (f"Matryoshka diffusion of {self.layout.height}×{self.layout.width} and {lo[1]}×{lo[2]} jointly "
                f"(inner network alone for {self.config.matryoshka.inner_steps} steps): {super().describe()}")

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The high-resolution images of joint samples."""
        return ResolutionDecoder(self.layout, self.layout.height)(x)

    def shows_images(self) -> bool:
        return True
