"""difflab for users of other libraries (install the extra: ``pip install 'difflab[diffusers]'``).

- :mod:`difflab.interop.diffusers_model`: a diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` and its scheduler
  config as a difflab denoiser (:func:`diffusers_denoiser`), so every difflab sampler, guidance and the ODE
  likelihood run on it. Needs no diffusers import.
- :mod:`difflab.interop.diffusers_scheduler`: :class:`DifflabScheduler`, a diffusers scheduler running difflab's
  samplers, so a diffusers pipeline switches with ``pipe.scheduler = DifflabScheduler.from_config(pipe.scheduler.config)``.
  Imports diffusers (loaded on first use of the name).

The core package never imports diffusers; only this subpackage does.
"""

from difflab.interop.diffusers_model import (DiffusersNet, betas_from_config, diffusers_denoiser,  # noqa: F401
                                             path_from_config, target_from_config)

__all__ = ["DiffusersNet", "betas_from_config", "diffusers_denoiser", "path_from_config", "target_from_config",
           "DifflabScheduler"]


def __getattr__(name):
    if name == "DifflabScheduler":
        from difflab.interop.diffusers_scheduler import DifflabScheduler

        return DifflabScheduler
    raise AttributeError(f"module 'difflab.interop' has no attribute {name!r}")
