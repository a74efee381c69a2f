"""Samplers: each is a function ``sample_*(denoiser, x, …) -> Samples(x, nfe)``."""

from difflab.samplers.ancestral import ddpm_step, sample_ddpm
from difflab.samplers.chain import Samples, sample_chain
from difflab.samplers.ddim import ddim_step, sample_ddim
from difflab.samplers.grids import discrete_timesteps

__all__ = ["Samples", "sample_chain", "sample_ddpm", "ddpm_step", "sample_ddim", "ddim_step", "discrete_timesteps"]
