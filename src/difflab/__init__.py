"""difflab: diffusion and flow generative models, correct to the equation.

The package is organised one module per concept (see the README's "the math in code" table):
:mod:`gaussian` (SPEC §1), :mod:`schedules` and :mod:`paths` (§2, §6), :mod:`parameterization` (§4),
:mod:`losses` and :mod:`elbo` (§3), :mod:`samplers` (§5–§6), :mod:`testbeds` (§8).
Importing ``difflab`` loads only the light core modules.
"""

__version__ = "0.1.0"

from difflab.parameterization import NetworkDenoiser, Prediction, convert  # noqa: E402
from difflab.paths import DiscretePath, GaussianPath, LinearPath, TrigPath, VPPath  # noqa: E402
from difflab.samplers import Samples, sample_ddim, sample_ddpm  # noqa: E402
from difflab.testbeds import GaussianMixtureBed, gaussian_bed, mixture_bed_2d  # noqa: E402

__all__ = [
    "NetworkDenoiser", "Prediction", "convert", "DiscretePath", "GaussianPath", "LinearPath", "TrigPath",
    "VPPath", "Samples", "sample_ddim", "sample_ddpm", "GaussianMixtureBed", "gaussian_bed", "mixture_bed_2d",
]
