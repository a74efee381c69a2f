"""Two-dimensional toy distributions, drawn with an explicit ``torch.Generator``.

Scale convention: every generator maps its *noise-free* distribution by a fixed affine map (its
closed-form mean and second moment, computed below) to **mean 0 and per-coordinate RMS 1**
(``E|x|² = 2``); Gaussian noise of standard deviation ``noise`` is then added in those units. So
the sets are comparable with each other and with the unit-variance diffusion prior.
:func:`mixture` and :func:`gaussian_grid` are the exceptions: they sample labelled test beds (SPEC §8) in the bed's own
coordinates, so the bed's exact densities and posteriors apply to the samples unchanged.

Each ``f(n, generator=None, noise=…) -> (n, 2)`` float32; ``generator`` is a ``torch.Generator``,
an integer seed, or ``None`` (torch's global generator). Where a set has natural classes
(:func:`two_moons`: which moon; :func:`eight_gaussians`: which blob) ``return_labels=True`` also
returns them as a long ``(n,)`` tensor.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import torch

from difflab.testbeds import grid_bed_2d, mixture_bed_2d
from difflab.utils import randn

GeneratorLike = Union[torch.Generator, int, None]


def as_generator(generator: GeneratorLike) -> Optional[torch.Generator]:
    """A ``torch.Generator`` from a generator, an integer seed, or ``None`` (global RNG)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    return torch.Generator().manual_seed(int(generator))


def _check_n(n: int) -> int:
    if int(n) < 1:
        raise ValueError(f"number of points must be >= 1, got {n}")
    return int(n)


def _standardise(x: torch.Tensor, mean: tuple, second_moment: float) -> torch.Tensor:
    """``(x − μ)/σ`` with ``σ² = (E|x|² − |μ|²)/2``: mean 0 and per-coordinate RMS 1 for the noise-free law."""
    mu = torch.tensor(mean, dtype=x.dtype)
    sigma = math.sqrt((second_moment - float(mu.square().sum())) / 2.0)
    return (x - mu) / sigma


def _add_noise(x: torch.Tensor, noise: float, g) -> torch.Tensor:
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    return x + noise * randn(x.shape, g, dtype=x.dtype) if noise > 0 else x


def _uniform(n: int, g) -> torch.Tensor:
    return torch.rand(n, generator=g, dtype=torch.float64)


def two_moons(n: int, generator: GeneratorLike = None, noise: float = 0.05, return_labels: bool = False):
    """Two interleaved half circles (scikit-learn's ``make_moons`` curve), class = moon.

    With ``θ ~ U[0, π]``: moon 0 is ``(cos θ, sin θ)``, moon 1 is ``(1 − cos θ, ½ − sin θ)``, half the
    points each (the first ``⌈n/2⌉`` belong to moon 0 before shuffling). Noise-free moments:
    ``μ = (½, ¼)``, ``E|x|² = E x₁² + E x₂² = 1 + (5/8 − 1/π)``.
    """
    n, g = _check_n(n), as_generator(generator)
    label = (torch.arange(n) >= (n + 1) // 2).long()[torch.randperm(n, generator=g)]
    theta = math.pi * _uniform(n, g)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], -1)
    lower = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], -1)
    x = torch.where(label.unsqueeze(-1) == 0, upper, lower)
    x = _standardise(x, (0.5, 0.25), 1.0 + 5.0 / 8.0 - 1.0 / math.pi)
    x = _add_noise(x, noise, g).float()
    return (x, label) if return_labels else x


SWISS_ROLL_TURNS = (1.5 * math.pi, 4.5 * math.pi)
"""The angle range ``φ ∈ [3π/2, 9π/2]`` of scikit-learn's ``make_swiss_roll`` (one and a half turns)."""


def swiss_roll(n: int, generator: GeneratorLike = None, noise: float = 0.05):
    """The 2-D Swiss roll ``(φ cos φ, φ sin φ)`` with ``φ ~ U[3π/2, 9π/2]``.

    Noise-free moments in closed form (``L = b − a``): ``E[φ cos φ] = [φ sin φ + cos φ]_a^b / L``,
    ``E[φ sin φ] = [sin φ − φ cos φ]_a^b / L``, ``E|x|² = E φ² = (b³ − a³)/(3L)``.
    """
    n, g = _check_n(n), as_generator(generator)
    a, b = SWISS_ROLL_TURNS
    phi = a + (b - a) * _uniform(n, g)
    x = torch.stack([phi * torch.cos(phi), phi * torch.sin(phi)], -1)
    L = b - a
    mean = ((b * math.sin(b) + math.cos(b) - a * math.sin(a) - math.cos(a)) / L,
            (math.sin(b) - b * math.cos(b) - math.sin(a) + a * math.cos(a)) / L)
    x = _standardise(x, mean, (b**3 - a**3) / (3 * L))
    return _add_noise(x, noise, g).float()


def eight_gaussians(n: int, generator: GeneratorLike = None, noise: float = 0.1, return_labels: bool = False):
    """Eight isotropic blobs of std ``noise`` centred on a circle of radius √2, class = blob.

    The centres ``√2 (cos 2πk/8, sin 2πk/8)`` have mean 0 and ``E|c|² = 2`` (per-coordinate RMS 1).
    """
    n, g = _check_n(n), as_generator(generator)
    k = torch.randint(0, 8, (n,), generator=g)
    angle = 2 * math.pi * k.double() / 8
    x = math.sqrt(2.0) * torch.stack([torch.cos(angle), torch.sin(angle)], -1)
    x = _add_noise(x, noise, g).float()
    return (x, k) if return_labels else x


def checkerboard(n: int, generator: GeneratorLike = None, noise: float = 0.0):
    """Uniform on the 8 dark squares of a 4×4 board of unit squares on ``[−2, 2]²``, scaled by √3/2.

    Each coordinate is marginally ``U[−2, 2]`` (mean 0, variance 4/3), so the scale ``√(3/4)`` gives
    per-coordinate RMS 1 (the board then spans ``[−√3, √3]²``).
    """
    n, g = _check_n(n), as_generator(generator)
    x1 = 4.0 * _uniform(n, g) - 2.0
    row = _uniform(n, g) - 2.0 * torch.randint(0, 2, (n,), generator=g).double()  # [0,1) or [−2,−1)
    x2 = row + torch.remainder(torch.floor(x1), 2.0)  # shift odd columns up one square
    x = _standardise(torch.stack([x1, x2], -1), (0.0, 0.0), 2 * 4.0 / 3.0)
    return _add_noise(x, noise, g).float()


MIXTURE_CLASSES = 4
"""Default number of classes (blobs) of :func:`mixture`."""


def mixture(n: int, generator: GeneratorLike = None, num_classes: int = MIXTURE_CLASSES, radius: float = 2.0,
            std: float = 0.3, components_per_class: int = 1, return_labels: bool = False):
    """Samples of the labelled test bed :func:`difflab.testbeds.mixture_bed_2d` (SPEC §8), with its options.

    ``num_classes × components_per_class`` blobs of std ``std`` on a circle of radius ``radius``,
    in the bed's own coordinates (not rescaled); ``return_labels`` also returns the classes ``(n,)``.
    """
    n, g = _check_n(n), as_generator(generator)
    bed = mixture_bed_2d(num_classes=num_classes, radius=radius, std=std, components_per_class=components_per_class)
    x, y = bed.sample(n, g, return_labels=True)
    return (x, y) if return_labels else x


def gaussian_grid(n: int, generator: GeneratorLike = None, side: int = 5, spacing: float = 1.0, std: float = 0.05,
                  return_labels: bool = False):
    """Samples of :func:`difflab.testbeds.grid_bed_2d` (``side²`` blobs of std ``std`` on a grid ``spacing`` apart, in
    the bed's coordinates); ``return_labels`` also returns each point's blob ``(n,)``."""
    n, g = _check_n(n), as_generator(generator)
    x, y = grid_bed_2d(side, spacing, std).sample(n, g, return_labels=True)
    return (x, y) if return_labels else x
