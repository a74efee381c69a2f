"""Multi-scale (Matryoshka) diffusion (SPEC §5, the multi-scale reading of "nested"; Gu et al. 2023, "Matryoshka
Diffusion Models"): an image ``x`` (``H×W``, 28×28 for MNIST) and its down-sampled version ``D(x) = avgpool_r(x)``
(``h×w = H/r × W/r``, 14×14, ``r = 2``) are diffused *jointly*: one time ``t`` for both, independent noise
``ε_H``, ``ε_h`` per resolution, and one network (:class:`~difflab.networks.matryoshka.MatryoshkaUNet`) that
denoises both.

**Noise schedule per resolution.** The lower resolution's log-SNR is the higher one's shifted up by the squared
side ratio (Gu et al. 2023, after Hoogeboom et al. 2023):

    λ_h(t) = λ_H(t) + 2 log(H/h)            (28 over 14: λ_14 = λ_28 + 2 log 2, SNR × 4)

so at the same ``t`` the small image is *less* noisy, by exactly the factor by which average pooling lowers white
noise: ``avgpool_r(a x + s ε) = a D(x) + (s/r) ε'`` with ``ε' ~ N(0, I)``. The two resolutions of one state thus
carry the same noise level per unit of image content, and the high resolution's path is the run's own
(``diffusion.*``, as a pixel model's).

**One sampler state.** A shift of log-SNR by ``2 log c`` is a data scale (the latent-scale identity of
:class:`difflab.latent.ScaledLatentPath`): ``a (c z) + s ε`` has log-SNR ``λ + 2 log c`` for ``z``. So the joint data
is ``x0 = (x, c·D(x))`` with ``c = r`` (:func:`joint_data`), packed into one tensor
(:class:`~difflab.networks.matryoshka.NestedLayout`), diffused on the run's one path with one ``ε`` of independent
entries: ``x_t = a(t) x0 + s(t) ε`` is, for the small image, the shifted-schedule state ``a_h D(x) + s_h ε_h`` times
the positive factor ``s(t)/s_h(t)`` — the same information at the same ``t``. Every sampler, classifier-free
guidance and the run's :class:`~difflab.parameterization.NetworkDenoiser` therefore see an ordinary denoiser on the
run's path; sampling advances both resolutions from shared times by construction. A run's
:class:`~difflab.pipeline.Pipeline` decodes the joint sample at the chosen resolution
(:class:`ResolutionDecoder`, :func:`at_resolution`; ``difflab sample RUN --resolution 14``): the high part, or the
low part divided by ``c``.

**The low resolution's own path.** :class:`LowResolutionPath` is the shifted schedule itself, ``a_h = r a n``,
``s_h = s n`` with ``n = √((a² + s²)/(r² a² + s²))`` (so ``a_h² + s_h² = a² + s²``: variance-preserving when the run's
path is); the joint state's low part is ``(a_h D(x) + s_h ε_h) / n``.

**Loss.** The multi-resolution loss is the sum of the per-resolution losses, each the mean squared error of the run's
target *in that resolution's own coordinates* (Gu et al. 2023, with unit weights per resolution; :func:`multiresolution_loss`,
named terms ``[B]``, STYLE rule 6). The high resolution's is the pixel model's loss. For the low one the joint state's
error (target of ``c·D(x)`` on the run's path) is converted exactly by :func:`low_resolution_weight` — at fixed
``x_t`` every target error is a multiple of the ε error (SPEC §4, :func:`difflab.losses.target_eps_factor`), so the
factor is the ratio of those multiples on :class:`LowResolutionPath` and on the run's path. Progressive training
takes the low resolution's term alone (the inner network alone) for ``matryoshka.inner_steps`` steps, then the sum
(:mod:`difflab.objectives.matryoshka`).

Notation: ``H``/``h`` the high/low side, ``r = H/h`` the ratio, ``c`` the low resolution's data scale (``= r``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.nn.functional as F

from difflab.losses import target_error
from difflab.networks.matryoshka import RATIO, NestedLayout
from difflab.paths import GaussianPath
from difflab.utils import mean_except_batch

TARGETS = ("eps", "x0", "v")
"""The targets a multi-resolution run regresses (:func:`low_resolution_weight` is closed-form for these)."""

__all__ = ["RATIO", "NestedLayout", "log_snr_shift", "low_resolution_log_snr", "downsample", "joint_data",
           "LowResolutionPath", "low_resolution_weight",
           "multiresolution_loss", "ResolutionDecoder", "at_resolution", "agreement"]


def log_snr_shift(ratio: float = RATIO) -> float:
    """``λ_h − λ_H = 2 log r``: the lower resolution's log-SNR above the higher one's at the same ``t``."""
    return 2.0 * math.log(ratio)


def low_resolution_log_snr(path, t, ratio: float = RATIO) -> torch.Tensor:
    """``λ_h(t) = λ_H(t) + 2 log r`` on the run's ``path`` (the high resolution's), float64 like ``path.log_snr``."""
    return path.log_snr(t) + log_snr_shift(ratio)


class LowResolutionPath(GaussianPath):
    """The low resolution's own path on the run's ``base`` path: ``a_h = r a n``, ``s_h = s n``,
    ``n = √((a² + s²)/(r² a² + s²))``, so ``λ_h = λ + 2 log r`` and ``a_h² + s_h² = a² + s²`` (module docstring)."""

    def __init__(self, base: GaussianPath, ratio: float = RATIO):
        self.base, self.ratio = base, float(ratio)
        self.t_min, self.t_max, self.discrete = base.t_min, base.t_max, getattr(base, "discrete", False)
        if self.discrete:
            self.T = base.T

    def _scale(self, t):
        a, s = self.base.a(t), self.base.s(t)
        return a, s, torch.sqrt((a**2 + s**2) / ((self.ratio * a) ** 2 + s**2))

    def a(self, t):
        a, _, n = self._scale(t)
        return self.ratio * a * n

    def s(self, t):
        _, s, n = self._scale(t)
        return s * n


def low_resolution_weight(path: GaussianPath, t, target: str, ratio: float = RATIO) -> torch.Tensor:
    """``||target_h − target̂_h||² / ||target − target̂||²`` for the low part of the joint state at ``t``: its squared
    error in the low resolution's own coordinates (data ``D(x)`` on :class:`LowResolutionPath`) over the same error in
    the joint ones (data ``r·D(x)`` on ``path``), float64 ``[B]``. Both are ``target_eps_factor · ||ε − ε̂||²``
    (:func:`difflab.losses.target_eps_factor`) with the same ``ε̂``; in closed form (finite where ``a = 0``)::

        eps: 1        x0: 1/r²        v: (r² a² + s²) / (r² (a² + s²))
    """
    if target == "eps":
        return torch.ones_like(torch.as_tensor(t, dtype=torch.float64))
    if target == "x0":
        return torch.full_like(torch.as_tensor(t, dtype=torch.float64), 1.0 / ratio**2)
    if target == "v":
        a, s = path.a(t).double(), path.s(t).double()
        return ((ratio * a) ** 2 + s**2) / (ratio**2 * (a**2 + s**2))
    raise ValueError(f"a multi-resolution run regresses one of {TARGETS}, not {target!r}")


def downsample(x: torch.Tensor, ratio: int = RATIO) -> torch.Tensor:
    """``D(x) = avgpool_r(x)``: ``(B, C, H, W) -> (B, C, H/r, W/r)``."""
    return F.avg_pool2d(x, ratio)


def joint_data(images: torch.Tensor, layout: NestedLayout) -> torch.Tensor:
    """The joint clean data ``x0 = (x, c·D(x))`` packed by ``layout`` (``c = r``, the log-SNR shift as a data
    scale; module docstring): ``(N, C, H, W) -> (N, C, H·W + h·w)``."""
    return layout.pack(images, layout.ratio * downsample(images, layout.ratio))


def multiresolution_loss(denoiser, layout: NestedLayout, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor,
                         inner_only: bool = False, **cond) -> dict:
    """Per-example, per-resolution ``mean ||target − target̂||²`` on the joint state ``x_t = a_t x0 + s_t ε`` (shared
    ``t``, independent noise per entry of ``ε``), each in its resolution's own coordinates (the low one through
    :func:`low_resolution_weight`): ``{"high": [B], "low": [B]}``.

    ``x0``, ``eps``: packed ``(B, C, H·W + h·w)``; the multi-resolution loss is the sum of the two terms.
    ``inner_only``: the inner network alone (progressive training's first phase): only ``"low"`` is returned."""
    extra = {"inner_only": True} if inner_only else {}
    err_high, err_low = layout.unpack(target_error(denoiser, x0, t, eps, **extra, **cond))
    weight = low_resolution_weight(denoiser.path, t, denoiser.target, layout.ratio).to(err_low.dtype)
    terms = {"low": weight * mean_except_batch(err_low)}
    if not inner_only:
        terms["high"] = mean_except_batch(err_high)
    return terms


@dataclasses.dataclass(frozen=True)
class ResolutionDecoder:
    """A joint sample ``(B, C, H·W + h·w)`` -> its image at ``resolution`` (``H``: the high part; ``h``: the low part
    divided by its data scale ``c``), float32 on the CPU: what a Matryoshka run's :class:`~difflab.pipeline.Pipeline`
    shows after any sampler."""

    layout: NestedLayout
    resolution: int

    def __post_init__(self):
        sides = (self.layout.height, self.layout.low_shape[1])
        if self.resolution not in sides:
            raise ValueError(f"this multi-resolution model samples at {sides[0]} or {sides[1]} pixels, "
                             f"not {self.resolution}")

    @property
    def image_shape(self) -> tuple:
        return self.layout.high_shape if self.resolution == self.layout.height else self.layout.low_shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        high, low = self.layout.unpack(x)
        out = high if self.resolution == self.layout.height else low / self.layout.ratio
        return out.float().cpu().contiguous()


def at_resolution(pipe, resolution: int):
    """``pipe`` (a Matryoshka run's :class:`~difflab.pipeline.Pipeline`) decoding its joint samples at
    ``resolution`` (one of the two sides); the sampling itself is unchanged."""
    layout = getattr(pipe.decoder, "layout", None)
    if layout is None:
        raise ValueError("--resolution applies to a multi-resolution (matryoshka) run only")
    return dataclasses.replace(pipe, decoder=ResolutionDecoder(layout, int(resolution)))


def agreement(x_high: torch.Tensor, x_low: torch.Tensor, generator: Optional[torch.Generator] = None) -> dict:
    """How well the two resolutions of joint samples agree: the mean ``||D(x̂_H) − x̂_h||`` over samples, beside the
    same distance between random pairs (``x̂_H`` of one sample, ``x̂_h`` of another, never itself).

    ``x_high (N, C, H, W)``, ``x_low (N, C, h, w)``, ``N >= 2``. Returns ``{"distance", "random_pairs", "ratio"}``
    (floats; ``ratio = distance / random_pairs``, far below 1 when the resolutions agree)."""
    n = x_high.shape[0]
    if n < 2 or x_low.shape[0] != n:
        raise ValueError(f"need the same number (>= 2) of samples at both resolutions, got {n} and {x_low.shape[0]}")
    pooled = downsample(x_high.double(), x_high.shape[-1] // x_low.shape[-1])  # (N, C, h, w)
    low = x_low.double()
    # a random pairing with no fixed point: i -> perm[(rank(i) + 1) mod n] (a random cyclic derangement)
    perm = torch.randperm(n, generator=generator)
    partner = torch.empty_like(perm)
    partner[perm] = perm.roll(-1)
    distance = float((pooled - low).flatten(1).norm(dim=1).mean())
    random_pairs = float((pooled - low[partner]).flatten(1).norm(dim=1).mean())
    return {"distance": distance, "random_pairs": random_pairs, "ratio": distance / random_pairs}
