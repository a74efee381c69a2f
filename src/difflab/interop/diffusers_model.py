"""A diffusers model and its scheduler config as a difflab denoiser (SPEC §2, §4).

diffusers stores what difflab calls the path and the parameterisation in the scheduler's config; this module
reads them and wraps the network, so every difflab sampler, the ODE likelihood and guidance run on it::

    from difflab.interop import diffusers_denoiser
    denoiser = diffusers_denoiser(pipe.unet, pipe.scheduler.config)   # an ordinary NetworkDenoiser
    samples = generate(denoiser, (3, 32, 32), 16, sampler="deis", steps=10)

Notation map (diffusers → SPEC):

==============================  ===========================================================================
diffusers                       difflab
==============================  ===========================================================================
``betas[τ]``, ``τ = 0..T−1``    ``β_t``, ``t = τ + 1 ∈ 1..T`` (SPEC §2; ``DiscretePath.betas[t]``)
``alphas_cumprod[τ]``           ``ᾱ_{τ+1}``; ``ᾱ_0 = 1`` has no diffusers index
model timestep ``τ``            DDPM step ``t = τ + 1`` (fractional in continuous time: ``u = tT``, ``τ = u − 1``)
``prediction_type``             target (SPEC §4): ``epsilon`` → ``eps``, ``v_prediction`` → ``v``
                                (``v = √ᾱ ε − √(1−ᾱ) x0``, the same definition), ``sample`` → ``x0``
``variance_type="learned_range"``  ``learned_variance`` (``log σ² = v log β_t + (1−v) log β̃_t``, ``v = (out+1)/2``)
==============================  ===========================================================================

The off-by-one: diffusers' ``add_noise(x0, ε, τ)`` draws ``√ᾱ_cumprod[τ] x0 + …``, the marginal after ``τ + 1``
forward steps, so a network trained by it at label ``τ`` is difflab's model at DDPM step ``t = τ + 1``.
:class:`DiffusersNet` subtracts the one, so the denoiser works on difflab's own :class:`~difflab.paths.DiscretePath`
(integer ``t``) and, through :func:`~difflab.pipeline.continuous_view`, on its continuation (fractional ``u``, as
diffusers' Karras-grid schedulers also feed fractional timesteps).

Config keys that only choose the *pipeline's* inference grid (``timestep_spacing``, ``steps_offset``,
``set_alpha_to_one``, ``use_karras_sigmas``, …) do not change the model and are ignored here. This module does not
import diffusers: it reads configs (any mapping) and calls the model.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import nn

from difflab import schedules
from difflab.networks.embeddings import NULL_LABEL
from difflab.parameterization import NetworkDenoiser
from difflab.paths import DiscretePath

TIMESTEP_OFFSET = 1.0
"""diffusers' model timestep ``τ`` is difflab's DDPM step ``t = τ + 1`` (module docstring)."""

PREDICTION_TARGETS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
"""diffusers ``prediction_type`` → difflab target (SPEC §4)."""

SIGMOID_BETA_RANGE = 6.0
"""diffusers' ``beta_schedule="sigmoid"`` is ``β = sigmoid(linspace(−6, 6, T))·(β_end − β_start) + β_start``."""

CONFIG_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                   "trained_betas": None, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
                   "variance_type": "fixed_small"}
"""The values diffusers' DDPM-family schedulers take for keys a config leaves out."""


def _config(config) -> dict:
    """A scheduler, its ``.config`` or any mapping, as a dict with :data:`CONFIG_DEFAULTS` filled in."""
    config = getattr(config, "config", config)
    if not isinstance(config, Mapping):
        raise TypeError(f"expected a diffusers scheduler or its config (a mapping), got {type(config).__name__}")
    return {**CONFIG_DEFAULTS, **dict(config)}


def betas_from_config(config) -> torch.Tensor:
    """``β_1..β_T`` (float64 ``[T]``) of a diffusers scheduler config, computed as diffusers does (SPEC §2).

    ``trained_betas`` (any array) wins; else ``beta_schedule``: ``linear`` (``linspace(β_start, β_end, T)``, no
    rescaling with ``T``), ``scaled_linear`` (``linspace(√β_start, √β_end, T)²``, Stable Diffusion's),
    ``squaredcos_cap_v2`` (the cosine schedule, :func:`difflab.schedules.cosine`) or ``sigmoid``. With
    ``rescale_betas_zero_snr`` the schedule is rescaled to zero terminal SNR
    (:func:`difflab.schedules.rescale_zero_terminal_snr`, the same algorithm as diffusers').
    """
    cfg = _config(config)
    T = int(cfg["num_train_timesteps"])
    lo, hi = float(cfg["beta_start"]), float(cfg["beta_end"])
    name = cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = torch.as_tensor(cfg["trained_betas"], dtype=torch.float64).flatten()
    elif name == "linear":
        betas = torch.linspace(lo, hi, T, dtype=torch.float64)
    elif name == "scaled_linear":
        betas = torch.linspace(lo**0.5, hi**0.5, T, dtype=torch.float64) ** 2
    elif name == "squaredcos_cap_v2":
        betas = schedules.cosine(T)
    elif name == "sigmoid":
        grid = torch.linspace(-SIGMOID_BETA_RANGE, SIGMOID_BETA_RANGE, T, dtype=torch.float64)
        betas = torch.sigmoid(grid) * (hi - lo) + lo
    else:
        raise ValueError(f"unsupported beta_schedule {name!r}: use linear, scaled_linear, squaredcos_cap_v2, "
                         "sigmoid or pass trained_betas")
    if cfg["rescale_betas_zero_snr"]:
        betas = schedules.rescale_zero_terminal_snr(betas)
    return schedules.custom(betas)


def path_from_config(config) -> DiscretePath:
    """The difflab :class:`~difflab.paths.DiscretePath` of a diffusers scheduler config (:func:`betas_from_config`)."""
    return DiscretePath(betas_from_config(config))


def target_from_config(config) -> str:
    """The difflab target (SPEC §4) of the config's ``prediction_type``."""
    kind = _config(config)["prediction_type"]
    if kind not in PREDICTION_TARGETS:
        raise ValueError(f"unsupported prediction_type {kind!r}; choose one of {tuple(PREDICTION_TARGETS)}")
    return PREDICTION_TARGETS[kind]


def learned_variance_from_config(config) -> bool:
    """Whether the model outputs improved DDPM's variance interpolation too (``variance_type="learned_range"``)."""
    kind = _config(config)["variance_type"]
    if kind == "learned":
        raise ValueError("variance_type='learned' (a raw log-variance output) has no difflab counterpart; "
                         "'learned_range' is improved DDPM's interpolation, which difflab supports")
    return kind == "learned_range"


class DiffusersNet(nn.Module):
    """``net(x, u, y=None, **cond)``: a diffusers model called at its timestep ``τ = u − 1`` (module docstring).

    ``u`` is the DDPM step (``[B]``, fractional in continuous time). Conditioning:

    - ``y`` (long ``[B]``) picks a context: row ``context[y]`` as ``encoder_hidden_states`` when a ``context``
      (``(K, L, C)``, e.g. K prompt embeddings of a ``UNet2DConditionModel``) is given, with ``null_context``
      (``(L, C)``, e.g. the empty or negative prompt's embedding) for ``y = NULL_LABEL``; so difflab's
      :class:`~difflab.guidance.ClassifierFreeGuidance` drives a text-conditioned model with labels. Without a
      context ``y`` is passed as the model's ``class_labels``.
    - any other keyword (``encoder_hidden_states``, ``class_labels``, ``added_cond_kwargs``, …) goes to the model as is.

    The model's ``parameters()`` are this module's, so :class:`~difflab.parameterization.NetworkDenoiser` casts
    the state to the model's dtype at the boundary (SPEC §4; STYLE rule 8).
    """

    def __init__(self, model: nn.Module, context: Optional[torch.Tensor] = None,
                 null_context: Optional[torch.Tensor] = None):
        super().__init__()
        if null_context is not None and context is None:
            raise ValueError("null_context needs a context for the labels y >= 0")
        self.model = model
        self.context, self.null_context = context, null_context

    def forward(self, x: torch.Tensor, u: torch.Tensor, y: Optional[torch.Tensor] = None, **cond) -> torch.Tensor:
        if y is not None:
            if self.context is None:
                cond["class_labels"] = y
            else:
                cond["encoder_hidden_states"] = self._context_rows(y, x)
        return self.model(x, u - TIMESTEP_OFFSET, return_dict=False, **cond)[0]

    def _context_rows(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``context[y]`` with ``null_context`` at ``y = NULL_LABEL``, in ``x``'s dtype: ``(B, L, C)``."""
        y = torch.as_tensor(y, device=x.device).long()
        null = y == NULL_LABEL
        if null.any() and self.null_context is None:
            raise ValueError("the null label (unconditional rows, as classifier-free guidance sends) needs a null_context")
        context = self.context.to(x.device, x.dtype)
        rows = context[y.clamp(min=0)]  # (B, L, C)
        if null.any():
            rows = torch.where(null.view(-1, 1, 1), self.null_context.to(x.device, x.dtype), rows)
        return rows


def diffusers_denoiser(model: nn.Module, config, context: Optional[torch.Tensor] = None,
                       null_context: Optional[torch.Tensor] = None) -> NetworkDenoiser:
    """A diffusers ``UNet2DModel`` / ``UNet2DConditionModel`` (any model ``model(x, τ, return_dict=False, **cond)``)
    with its scheduler (or the scheduler's config) as a difflab denoiser on DDPM time (SPEC §2, §4).

    The result is an ordinary :class:`~difflab.parameterization.NetworkDenoiser` on
    :func:`path_from_config`'s :class:`~difflab.paths.DiscretePath`, so DDPM/DDIM run on integer steps and every
    continuous-time sampler through :func:`~difflab.pipeline.continuous_view`. ``context``/``null_context``: see
    :class:`DiffusersNet`.
    """
    return NetworkDenoiser(DiffusersNet(model, context, null_context), path_from_config(config),
                           target_from_config(config), learned_variance=learned_variance_from_config(config))


class BedAsDiffusersModel:
    """A test bed's exact model in diffusers' calling convention (SPEC §8): ``model(x, τ, return_dict=False)`` returns
    ``(E[target | x],)`` at diffusers timestep ``τ``, i.e. at the DDPM step ``u = τ + 1`` of ``path`` (fractional ``u``
    through :func:`~difflab.paths.smooth_continuation`, the continuous view every difflab solver runs a DDPM-time model
    on, where integer ``u`` is exactly the discrete path).

    Driven by a diffusers pipeline loop or wrapped by :func:`diffusers_denoiser`, it is a model with no learning
    error, so the samples' exact KL (:func:`~difflab.testbeds.affine_pushforward`) isolates the sampler.
    ``prediction_type`` as in diffusers' configs. ``calls`` counts evaluations (a batch is one).
    """

    def __init__(self, bed, path: DiscretePath, prediction_type: str = "epsilon"):
        from difflab.paths import smooth_continuation

        if prediction_type not in PREDICTION_TARGETS:
            raise ValueError(f"unsupported prediction_type {prediction_type!r}; choose one of {tuple(PREDICTION_TARGETS)}")
        self.bed, self.continuation = bed, smooth_continuation(path)
        self.target = PREDICTION_TARGETS[prediction_type]
        self.calls = 0

    def __call__(self, x: torch.Tensor, timestep, return_dict: bool = False, **_ignored):
        from difflab.parameterization import from_x0_eps

        self.calls += 1
        t = (torch.as_tensor(timestep, dtype=torch.float64).expand(x.shape[0]) + TIMESTEP_OFFSET) / self.continuation.T
        x0, eps, _ = self.bed.posterior_means(x, self.continuation.a(t), self.continuation.s(t))
        return (from_x0_eps(x0, eps, x, t, self.continuation, self.target),)
