"""From a config or a trained run to samples: network + path + parameterisation -> denoiser -> sampler.

- :func:`build_model` and :func:`build_denoiser` turn a :class:`~difflab.config.RunConfig` into the
  network and the sampler-ready :class:`~difflab.parameterization.NetworkDenoiser` (SPEC §4).
- :func:`load_run` restores a trained run (EMA weights by default) as a :class:`Pipeline`.
- :data:`SAMPLERS` maps sampler names to functions ``fn(denoiser, x_T, steps, generator=, progress=,
  **options, **cond) -> Samples``; adding a sampler is one entry.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from difflab.compilation import maybe_compile
from difflab.config import RunConfig, build_path
from difflab.parameterization import NetworkDenoiser
from difflab.paths import GaussianPath
from difflab.samplers import Samples, ddpm_step, discrete_timesteps, sample_chain, sample_ddim, sample_ddpm
from difflab.samplers.ode import precise_dtype
from difflab.utils import default_device


# --- building ---------------------------------------------------------------------------------------------
def build_model(cfg: RunConfig, data_shape: Sequence[int], num_classes: int = 0) -> nn.Module:
    """The network ``cfg.model`` describes for per-sample data of shape ``data_shape``.

    ``num_classes`` is used only when ``cfg.model.conditional`` (otherwise the network is unconditional); with
    ``cfg.model.prompt`` the classes' prompts reach the U-Net by cross-attention (:class:`~difflab.prompts.PromptUNet`). A DDGAN
    run's network is its generator: the same network with a latent of ``ddgan.nz`` (SPEC §5).
    """
    return build_model_sized(cfg, data_shape, num_classes)[0]


def build_model_sized(cfg: RunConfig, data_shape: Sequence[int], num_classes: int = 0) -> tuple[nn.Module, int]:
    """:func:`build_model` and the bytes of its parameters and buffers, counted on the ``meta`` device before
    the network is built, so an absurd size is refused before anything is allocated
    (:func:`difflab.limits.build_within_limits`)."""
    from difflab.limits import build_within_limits, check_data_shape, check_int, MAX_CLASSES
    from difflab.networks import build_network

    data_shape = check_data_shape(data_shape, "data")
    num_classes = check_int("num_classes", num_classes, 0, MAX_CLASSES)
    m = cfg.model

    def build() -> nn.Module:
        if m.prompt:  # classes as prompts, read by cross-attention (SPEC §5; difflab.prompts)
            from difflab.prompts import PromptUNet, class_prompts

            unet = build_network("unet", data_shape, 0, learned_variance=m.learned_variance,
                                 **{**m.network_kwargs(), "context_dim": m.text_dim})
            return PromptUNet(unet, class_prompts(cfg.data.name, num_classes), m.text_dim, m.text_depth, m.num_heads)
        latent = {"latent_dim": cfg.ddgan.nz} if is_ddgan(cfg) else {}
        return build_network(m.kind, data_shape, num_classes if m.conditional else 0,
                             learned_variance=m.learned_variance, **m.network_kwargs(), **latent)

    return build_within_limits(build, f"the {m.kind} network")


def is_ddgan(cfg: RunConfig) -> bool:
    """Whether the run trains a DDGAN generator (``diffusion.objective: ddgan``) rather than a denoiser."""
    return cfg.diffusion.objective == "ddgan"


def build_denoiser(cfg: RunConfig, net: Callable, path: Optional[GaussianPath] = None) -> NetworkDenoiser:
    """Wrap ``net`` as a denoiser on the run's path with its target (SPEC §4) and the networks' time map."""
    from difflab.networks import network_time_fn

    path = path if path is not None else build_path(cfg.diffusion)
    return NetworkDenoiser(net, path, cfg.diffusion.target, learned_variance=cfg.model.learned_variance,
                           time_fn=network_time_fn(path))


# --- samplers by name ---------------------------------------------------------------------------------------
def continuous_grid(path: GaussianPath, steps: int) -> torch.Tensor:
    """``steps + 1`` equally spaced times from ``t_max`` down to ``t_min`` in float64 (a continuous path)."""
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    return torch.linspace(float(path.t_max), float(path.t_min), steps + 1, dtype=torch.float64)


def run_ddim(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, eta: float = 0.0,
             **cond) -> Samples:
    """DDIM (SPEC §5) with ``steps`` evaluations: trailing-spaced integer grid on a discrete path,
    :func:`continuous_grid` on a continuous one."""
    path = denoiser.path
    grid = None if getattr(path, "discrete", False) else continuous_grid(path, steps)
    return sample_ddim(denoiser, x, steps=steps, eta=eta, timesteps=grid, generator=generator,
                       progress=progress, **cond)


def run_ddpm(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False,
             variance: Optional[str] = None, **cond) -> Samples:
    """Ancestral sampling (SPEC §3): draws from ``q(x_{t'} | x_t, x̂0)`` with variance ``β̃`` (or the learned
    interpolation when the network learned it). On a continuous path it runs on :func:`continuous_grid`."""
    variance = variance or ("learned" if getattr(denoiser, "learned_variance", False) else "beta_tilde")
    path = denoiser.path
    if getattr(path, "discrete", False):
        return sample_ddpm(denoiser, x, steps=steps, variance=variance, generator=generator, progress=progress, **cond)
    step = partial(ddpm_step, variance=variance)
    return sample_chain(denoiser, x, continuous_grid(path, steps), step, generator, None, progress, **cond)


# --- continuous-time samplers (SPEC §6) ----------------------------------------------------------------------
def continuous_view(denoiser):
    """``denoiser`` on a continuous path: itself, or a DDPM-time model seen exactly in continuous time.

    A network trained on discrete steps is re-wrapped on :class:`~difflab.paths.SplineTimeContinuation` (a
    cubic spline of ``log ᾱ`` through every integer step: smooth, so high-order and adaptive solvers reach their
    order, and exact at integer steps) with ``network_time`` (the fractional DDPM step ``u = tT``) as its time
    input, so integer grid times give exactly the discrete model. A wrapper with an inner ``.denoiser`` (guidance) is copied around the
    converted inner model; an exact test-bed model is rebuilt on the continuation.
    """
    from difflab.paths import smooth_continuation

    path = denoiser.path
    if not getattr(path, "discrete", False):
        return denoiser
    cont = smooth_continuation(path)
    if isinstance(denoiser, NetworkDenoiser):
        return NetworkDenoiser(denoiser.net, cont, denoiser.target, learned_variance=denoiser.learned_variance,
                               time_fn=cont.network_time)
    if hasattr(denoiser, "bed"):
        return denoiser.bed.denoiser(cont)
    inner = getattr(denoiser, "denoiser", None)
    if inner is None:
        raise ValueError(f"{type(denoiser).__name__} runs in discrete time only; the continuous samplers need a "
                         "NetworkDenoiser (or a wrapper of one)")
    view = copy.copy(denoiser)
    view.denoiser = continuous_view(inner)
    view.path = view.denoiser.path
    if getattr(view, "interval", None) is not None:  # DDPM steps k -> continuous t = k/T
        view.interval = tuple(float(v) / cont.T for v in view.interval)
    if getattr(view, "classifier", None) is not None:  # a classifier of DDPM steps reads u = tT, as the network does
        view.classifier = _InDiscreteTime(view.classifier, cont)
    return view


class _InDiscreteTime:
    """``classifier(x, t)`` for continuous ``t`` of a :class:`~difflab.paths.DiscreteTimeContinuation`, fed to a
    classifier trained on that path's DDPM steps as the fractional step ``u = tT``."""

    def __init__(self, classifier, cont):
        self.classifier, self.cont = classifier, cont

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.classifier(x, self.cont.network_time(t))


def solver_grid(path, nfe: int, solver: str) -> torch.Tensor:
    """The time grid for an ODE ``solver`` with a budget of ``nfe`` network evaluations.

    :func:`difflab.samplers.time_grids.default_grid` (difflab's measured best grid per solver and budget) once
    its tables are present; until then Karras ρ = 7 for the Runge–Kutta methods and uniform log-SNR for the
    multistep ones, with the most steps the budget buys (the clean step costs 1; a budget of one or two steps
    is uniform in ``t``, the rectified-flow few-step grid), and ``[t_max, t_min, clean
    end]`` (``t_min`` at ``σ̄_min``, see :func:`~difflab.samplers.time_grids.noise_range`) for the adaptive solver.
    """
    from difflab.samplers import time_grids
    from difflab.samplers.ode import EVALS_PER_STEP

    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"steps must be a positive integer, got {nfe!r}")
    steps = 1 + (nfe - 1) // EVALS_PER_STEP.get(solver, 1)
    if solver != "rk45" and steps < 3:  # one or two steps: t_max → (midpoint →) clean end, as rectified flow samples
        return time_grids.uniform_t(path, steps)
    if hasattr(time_grids, "DEFAULT_GRIDS"):
        return time_grids.default_grid(path, nfe, solver)
    if solver == "rk45":  # integrate down to the least noise σ̄_min, then the x̂0 step onto the clean end
        sigma_min, _ = time_grids.noise_range(path)
        ends = [float(path.t_max), float(path.t_from_sigma_bar(sigma_min))]
        return torch.tensor(ends + ([path.clean_time()] if path.clean_time() is not None else []), dtype=torch.float64)
    spacing = time_grids.uniform_log_snr if solver in ("dpmpp2m", "deis") else time_grids.karras
    return spacing(path, steps)


def _ode_runner(solver: str) -> Callable[..., Samples]:
    def run(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, **cond) -> Samples:
        from difflab.samplers.ode import ODE_SOLVERS

        den = continuous_view(denoiser)
        return ODE_SOLVERS[solver](den, x, solver_grid(den.path, steps, solver), generator=generator,
                                   progress=progress, **cond)

    run.__name__ = f"run_{solver}"
    run.__doc__ = (f"Probability-flow ODE, ``{solver}`` (:mod:`difflab.samplers.ode`, SPEC §6), within ``steps`` "
                   "network evaluations on :func:`solver_grid`; a DDPM-time model runs through :func:`continuous_view`.")
    return run


def run_heun(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, **cond) -> Samples:
    """Heun's trapezoid within ``steps`` evaluations (SPEC §6). A model on a continuous path: Heun in its time
    (:func:`~difflab.samplers.ode.sample_heun`, EDM's Algorithm 1) on :func:`solver_grid`. A DDPM-time model: the
    exponential-integrator Heun (:func:`~difflab.samplers.ode.sample_heun_exp`, whose first stage is DDIM) on a grid
    uniform in time, ``1 + (steps − 1) // 2`` steps. Measured on trained DDPM-time models
    (benchmarks/results/trained.md): Heun in path time on a log-SNR grid is stiff near ``t_max`` of a cosine schedule
    (``ȧ/a`` is huge there) and spends its steps at ``σ̄ ≫ 1``, which left it behind DDIM at 20 evaluations."""
    from difflab.samplers.ode import sample_heun_exp
    from difflab.samplers.time_grids import uniform_t

    if not getattr(denoiser.path, "discrete", False):
        return _ode_runner("heun")(denoiser, x, steps, generator=generator, progress=progress, **cond)
    den = continuous_view(denoiser)
    return sample_heun_exp(den, x, uniform_t(den.path, 1 + (steps - 1) // 2), generator=generator, progress=progress,
                           **cond)


def run_deis(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False,
             order: Optional[int] = None, **cond) -> Samples:
    """DEIS log-ρ Adams–Bashforth of ``order`` (SPEC §6) with ``steps`` evaluations on :func:`solver_grid`; the
    default order is the one the optimised grids are fit for (``time_grids.DEIS_ORDER``, else 3)."""
    from difflab.samplers import time_grids
    from difflab.samplers.ode import sample_deis

    order = getattr(time_grids, "DEIS_ORDER", 3) if order is None else order
    den = continuous_view(denoiser)
    return sample_deis(den, x, solver_grid(den.path, steps, "deis"), order=order, generator=generator,
                       progress=progress, **cond)


def run_rk45(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, rtol: float = 1e-5,
             atol: float = 1e-5, **cond) -> Samples:
    """Adaptive Dormand–Prince (SPEC §6): ``steps`` is ignored (the tolerances set the cost; the NFE is reported)."""
    from difflab.samplers.ode import sample_rk45

    den = continuous_view(denoiser)
    return sample_rk45(den, x, solver_grid(den.path, 1, "rk45"), rtol=rtol, atol=atol, generator=generator,
                       progress=progress, **cond)


def run_sde(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, **cond) -> Samples:
    """Reverse-SDE Euler–Maruyama (SPEC §6) with ``steps`` evaluations, uniform in the path's time."""
    from difflab.samplers.sde import sample_euler_maruyama
    from difflab.samplers.time_grids import uniform_t

    den = continuous_view(denoiser)
    return sample_euler_maruyama(den, x, uniform_t(den.path, steps), generator=generator, progress=progress, **cond)


def run_pc(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, snr: float = 0.16,
           corrector_steps: int = 1, **cond) -> Samples:
    """Predictor–corrector (SPEC §6) within ``steps`` evaluations: ``steps // (1 + corrector_steps)`` grid steps."""
    from difflab.samplers.sde import sample_pc
    from difflab.samplers.time_grids import uniform_t

    den = continuous_view(denoiser)
    grid = uniform_t(den.path, max(1, steps // (1 + corrector_steps)))
    return sample_pc(den, x, grid, snr=snr, corrector_steps=corrector_steps, generator=generator, progress=progress,
                     **cond)


def run_ancestral(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, **cond) -> Samples:
    """Ancestral steps ``x_{t'} ~ q(x_{t'} | x_t, x̂0)`` in continuous time (SPEC §6), uniform in the path's time."""
    from difflab.samplers.sde import sample_ancestral
    from difflab.samplers.time_grids import uniform_t

    den = continuous_view(denoiser)
    return sample_ancestral(den, x, uniform_t(den.path, steps), generator=generator, progress=progress, **cond)


def run_default(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False,
                grid: Optional[torch.Tensor] = None, **cond) -> Samples:
    """difflab's default sampler (:mod:`difflab.samplers.calibration`, SPEC §6): DEIS of order ``DEFAULT_ORDER`` with
    ``steps`` evaluations on ``grid`` — a calibrated grid of the run (:meth:`Pipeline.sample` passes it when the run
    has one for this budget, checked by :func:`~difflab.samplers.calibration.check_grid`) or else
    :func:`~difflab.samplers.calibration.default_sampler_grid`; a DDPM-time model runs through :func:`continuous_view`."""
    from difflab.samplers.calibration import check_grid, default_sampler_grid, sample_default

    den = continuous_view(denoiser)
    if grid is None:
        grid = default_sampler_grid(den.path, steps)
    else:
        grid = check_grid([float(v) for v in grid], den.path, steps, "grid")
    return sample_default(den, x, grid, generator=generator, progress=progress, **cond)


MAX_OUTPUT_VALUES = 1 << 28
"""Values one :func:`generate` call may return (1 GiB in float32; x_T is drawn in float64 for the ODE solvers)."""


NESTED_INNER = ("ddim", "sde", "euler", "heun", "rk4", "dpmpp2m", "deis")
"""Inner samplers :func:`run_nested` takes by name (any sampler function plugs into
:func:`difflab.samplers.nested.sample_nested` directly)."""

NESTED_INNER_ETA = 0.85
"""The inner DDIM's default η: Elata et al.'s (their code's ``inner_eta``). The inner run should be a draw from
``q(x0 | x_t)``; a deterministic one (η = 0, the ODE solvers) returns a point, and the outer states drift away from
``p_t`` (exact KL on the Gaussian bed: :mod:`difflab.samplers.nested`)."""


def run_nested(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, inner: int = 10,
               inner_sampler: str = "ddim", inner_eta: Optional[float] = None, eta: float = 0.0,
               anytime: Optional[Callable] = None, **cond) -> Samples:
    """Nested diffusion (SPEC §5; :mod:`difflab.samplers.nested`): ``steps`` outer DDIM steps (stochasticity
    ``eta``) whose ``x̂0`` is ``inner_sampler`` (a name of :data:`NESTED_INNER`) run with ``inner`` evaluations from
    the current state to the clean end; NFE ≈ ``steps × inner``, counted.

    The outer grid is DDIM's (trailing integer steps on a discrete path, :func:`~difflab.samplers.time_grids.uniform_t`
    on a continuous one). The DDIM inner run (η = ``inner_eta``, default :data:`NESTED_INNER_ETA`) stays on the
    denoiser's own path; Euler–Maruyama (``sde``) and the ODE solvers run on :func:`continuous_view`, at the same
    outer times ``t = k/T``, with ``inner`` evaluations as in :func:`solver_grid` (steps of Heun and RK4 cost 2 and 4)
    on :func:`~difflab.samplers.nested.sub_grid`. DEIS starts from pure noise (its ``from_pure_noise`` first step)
    only on the first outer step, at ``t_max``. ``anytime`` is the outer callback, e.g.
    :class:`~difflab.samplers.nested.AnytimeOutputs`.
    """
    from difflab.samplers import nested
    from difflab.samplers.ode import EVALS_PER_STEP, ODE_SOLVERS
    from difflab.samplers.sde import sample_euler_maruyama
    from difflab.samplers.time_grids import uniform_t

    if inner_sampler not in NESTED_INNER:
        raise ValueError(f"unknown inner sampler {inner_sampler!r}; choose one of {', '.join(NESTED_INNER)}")
    if not isinstance(inner, int) or inner < 1:
        raise ValueError(f"inner must be a positive integer, got {inner!r}")
    if inner_eta is not None and inner_sampler != "ddim":
        raise ValueError(f"inner_eta applies to the ddim inner sampler only, not {inner_sampler!r}")
    discrete = getattr(denoiser.path, "discrete", False)
    den = denoiser if inner_sampler == "ddim" else continuous_view(denoiser)
    if discrete:
        outer_grid = discrete_timesteps(denoiser.path.T, steps)
        outer_grid = outer_grid if den is denoiser else outer_grid.double() / denoiser.path.T
    else:
        outer_grid = uniform_t(den.path, steps)
    options = {}
    if inner_sampler == "ddim":
        fn, inner_steps = sample_ddim, inner
        options["eta"] = NESTED_INNER_ETA if inner_eta is None else inner_eta
    elif inner_sampler == "sde":
        fn, inner_steps = sample_euler_maruyama, inner
    else:
        fn = _deis_from_state if inner_sampler == "deis" else ODE_SOLVERS[inner_sampler]
        inner_steps = 1 + (inner - 1) // EVALS_PER_STEP[inner_sampler]
    return nested.sample_nested(den, x, outer_grid, nested.inner_sampler(fn, inner_steps, **options), eta=eta,
                                generator=generator, callback=anytime, progress=progress, **cond)


def _deis_from_state(denoiser, x: torch.Tensor, timesteps, **options) -> Samples:
    """DEIS (SPEC §6) on ``timesteps``, with its first-order step from pure noise only where they start at ``t_max``."""
    from difflab.samplers.ode import sample_deis

    at_prior = float(timesteps[0]) >= float(denoiser.path.t_max)
    return sample_deis(denoiser, x, timesteps, from_pure_noise=at_prior, **options)


def run_ddgan(denoiser, x: torch.Tensor, steps: int, generator=None, progress: bool = False, **cond) -> Samples:
    """DDGAN's chain (SPEC §5): ``x̂0 = G(x_t, z, t)`` then ``x_{t−1} ~ q(x_{t−1} | x_t, x̂0)`` for each of the path's
    ``T`` steps (:func:`difflab.ddgan.sample_ddgan`); ``denoiser`` is a :class:`~difflab.ddgan.DDGANGenerator`, and
    ``steps`` must be ``T``: the generator was trained at those times only."""
    from difflab.ddgan import sample_ddgan

    if not hasattr(denoiser, "x0_draw"):
        raise ValueError("the ddgan sampler needs a DDGAN generator (a run trained with diffusion.objective: ddgan)")
    T = denoiser.path.T
    if steps != T:
        raise ValueError(f"a DDGAN run samples in exactly its T = {T} steps (its generator is trained at those "
                         f"times), not {steps}: drop --steps or pass --steps {T}")
    return sample_ddgan(denoiser.x0_draw, denoiser.path, x, generator, None, progress, **cond)


DISCRETE_SAMPLERS = ("ddpm", "ddim", "ddgan")  # chains in the state's own dtype; every other sampler is a continuous-time solver
SAMPLERS: dict[str, Callable[..., Samples]] = {
    "ddpm": run_ddpm, "ddim": run_ddim,
    **{name: _ode_runner(name) for name in ("euler", "rk4", "dpmpp2m")}, "heun": run_heun,
    "deis": run_deis, "rk45": run_rk45, "sde": run_sde, "pc": run_pc, "ancestral": run_ancestral,
    "nested": run_nested, "default": run_default,
}
"""Sampler name -> ``fn(denoiser, x_T, steps, generator=, progress=, **options, **cond) -> Samples``: the samplers of
any denoiser (guidance wraps them all)."""
RUN_SAMPLERS: dict[str, Callable[..., Samples]] = {**SAMPLERS, "ddgan": run_ddgan}
"""What :func:`generate` and ``difflab sample`` take: :data:`SAMPLERS` and the DDGAN generator chain, which samples a
DDGAN run only (a :class:`~difflab.ddgan.DDGANGenerator` is not a denoiser)."""


@torch.no_grad()
def generate(denoiser, data_shape: Sequence[int], num: int, sampler: str = "ddim", steps: int = 50,
             generator: Optional[torch.Generator] = None, y: Optional[torch.Tensor] = None,
             batch_size: int = 256, progress: bool = False, device=None, **options) -> Samples:
    """Draw ``num`` samples of shape ``data_shape``: ``x_T`` from the path's prior, then ``sampler``.

    All ``x_T`` are drawn first from ``generator`` (so deterministic samplers give the same samples for
    any ``batch_size``); ``y`` (long ``[num]``) is split with them. Returns ``Samples(x (num, ...) on the
    CPU, nfe per sample)``.
    """
    if sampler not in RUN_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(RUN_SAMPLERS)}")
    if num < 1 or batch_size < 1:
        raise ValueError(f"num and batch_size must be >= 1, got num={num}, batch_size={batch_size}")
    values = num * math.prod(data_shape)
    if values > MAX_OUTPUT_VALUES:
        raise ValueError(f"{num} samples of shape {tuple(data_shape)} are {values:,} values, more than the "
                         f"{MAX_OUTPUT_VALUES:,} one call may hold: draw them in several calls")
    fn = RUN_SAMPLERS[sampler]
    accepted = inspect.signature(fn).parameters
    for name in options:
        if name not in accepted:
            raise ValueError(f"sampler {sampler!r} takes no option {name!r}")
    x_T = denoiser.path.prior_sample((num, *data_shape), generator, device=device)
    if sampler not in DISCRETE_SAMPLERS:  # continuous-time solvers integrate in float64 (samplers.ode.precise_dtype)
        x_T = x_T.to(precise_dtype(x_T.device))
    outputs, nfe = [], 0
    for start in range(0, num, batch_size):
        cond = {} if y is None else {"y": y[start:start + batch_size].to(device)}
        out = fn(denoiser, x_T[start:start + batch_size], steps, generator=generator, progress=progress,
                 **options, **cond)
        outputs.append(out.x.float().cpu())
        nfe = max(nfe, out.nfe)
    return Samples(torch.cat(outputs), nfe)


DEFAULT_STEPS = 50
"""Network evaluations of ``difflab sample`` / ``difflab eval`` when ``--steps`` is not given (DDGAN: its ``T``)."""


# --- a trained run ---------------------------------------------------------------------------------------------
@dataclass
class Pipeline:
    """A trained model ready to sample: ``denoiser(x, t, y=) -> Prediction`` on ``path``, or for a DDGAN run the
    :class:`~difflab.ddgan.DDGANGenerator` (sampled only by ``ddgan`` in its ``T`` steps)."""

    net: nn.Module
    denoiser: Union[NetworkDenoiser, "DDGANGenerator"]
    config: RunConfig
    data_shape: tuple
    num_classes: int
    data_kind: str
    step: int
    device: torch.device
    decoder: Optional[Callable] = None
    """Latent runs (SPEC §5): ``z' -> images`` (:class:`~difflab.latent.LatentDecoder`); multi-resolution runs: the
    joint sample at one resolution (:class:`~difflab.matryoshka.ResolutionDecoder`); applied after any sampler."""
    run_dir: Optional[Path] = None

    @property
    def path(self) -> GaussianPath:
        return self.denoiser.path

    @property
    def output_shape(self) -> tuple:
        """The shape of one sample :meth:`sample` returns: the decoder's images, else ``data_shape``."""
        return tuple(self.decoder.image_shape) if self.decoder is not None else self.data_shape

    @property
    def ddgan(self) -> bool:
        return is_ddgan(self.config)

    def resolve_sampler(self, sampler: Optional[str], steps: Optional[int]) -> tuple:
        """``(sampler, steps)`` with the run's defaults for the ones not given: ``ddgan`` in ``T`` steps for a DDGAN
        run (which takes no other sampler), else DDIM with 50 steps (at most ``T`` on a discrete path)."""
        if self.ddgan:
            if sampler not in (None, "ddgan"):
                raise ValueError(f"a DDGAN run samples with its generator chain (sampler ddgan), not {sampler!r}")
            return "ddgan", self.path.T if steps is None else steps
        default = min(DEFAULT_STEPS, self.path.T) if getattr(self.path, "discrete", False) else DEFAULT_STEPS
        return sampler or "ddim", default if steps is None else steps

    def labels(self, num: int, y=None) -> Optional[torch.Tensor]:
        """The labels to sample with: ``None`` for an unconditional model; for a class-conditional model
        ``y`` as given (an int for all samples, or ``[num]``; ``NULL_LABEL`` = -1 for the unconditional
        model learned with label dropout), or classes ``0, 1, …, K−1, 0, …`` in turn when ``y`` is None."""
        if self.num_classes == 0:
            if y is not None:
                raise ValueError("this model is unconditional: it takes no class label")
            return None
        if y is None:
            return torch.arange(num) % self.num_classes
        y = torch.as_tensor(y, dtype=torch.long)
        y = y.expand(num).clone() if y.ndim == 0 else y
        if y.shape != (num,):
            raise ValueError(f"labels must be one class or {num} of them, got shape {tuple(y.shape)}")
        bad = (y < -1) | (y >= self.num_classes)
        if bad.any():
            raise ValueError(f"class {int(y[bad][0])} is out of range: this model has classes 0..{self.num_classes - 1}"
                             " (and -1 for unconditional)")
        return y

    def sample(self, num: int, sampler: Optional[str] = None, steps: Optional[int] = None, eta: float = 0.0, seed: int = 0,
               y=None, batch_size: int = 256, progress: bool = True, guidance_scale: float = 1.0,
               guidance_interval: Optional[tuple] = None, guidance_rescale: float = 0.0, classifier=None,
               classifier_scale: float = 0.0, decode: bool = True, **options) -> Samples:
        """``num`` samples with ``sampler`` (a key of :data:`RUN_SAMPLERS`) in ``steps`` network evaluations (defaults:
        :meth:`resolve_sampler`).

        ``eta`` is DDIM's stochasticity (SPEC §5); ``seed`` fixes every random draw; ``y`` see :meth:`labels`.

        Guidance (SPEC §7) wraps the denoiser before any sampler sees it:

        - ``guidance_scale`` λ ≠ 1: classifier-free guidance of a class-conditional model
          (:class:`~difflab.guidance.ClassifierFreeGuidance`, one batched call on ``2B`` inputs per step, so
          each step counts 2 evaluations), with ``guidance_interval`` ``(t_lo, t_hi)`` in the path's time
          units and the φ-rescale ``guidance_rescale``. λ = 1 is the conditional model itself (no wrapper).
        - ``classifier`` (a :func:`~difflab.classifier_store.load_classifier` result, a classifier
          directory, or any ``(x_t, t) -> logits`` callable) and ``classifier_scale`` w ≠ 0:
          classifier guidance ``ε̂ = ε − w s_t ∇log p_φ(y | x_t, t)`` on top of the (guided) conditional model,
          or of the unconditional model when the run has no classes (labels then come from the classifier).

        A latent run's samples are decoded to images unless ``decode=False`` (then they are the scaled latents).

        Returns ``Samples(x (num, *output_shape) on the CPU, nfe per sample)``.
        """
        from difflab.guidance import ClassifierFreeGuidance, ClassifierGuidance

        sampler, steps = self.resolve_sampler(sampler, steps)
        if self.ddgan and (guidance_scale != 1.0 or classifier is not None):
            raise ValueError("a DDGAN run draws x̂0 from its generator: guidance (SPEC §7) does not apply; "
                             "sample a class with --class")
        if eta:
            options["eta"] = eta
        denoiser = self.denoiser
        if guidance_scale != 1.0:
            if not self.num_classes:
                raise ValueError("classifier-free guidance needs a class-conditional model (model.conditional: true "
                                 "with train.p_uncond > 0); this run is unconditional")
            denoiser = ClassifierFreeGuidance(denoiser, guidance_scale, interval=guidance_interval,
                                              rescale=guidance_rescale)
        by_classifier = classifier is not None and classifier_scale != 0.0
        if by_classifier:
            if isinstance(classifier, (str, Path)):
                from difflab.classifier_store import load_classifier

                classifier = load_classifier(classifier, device=self.device)
            if hasattr(classifier, "check_matches"):
                classifier.check_matches(self.config, self.data_shape, self.num_classes)
            denoiser = ClassifierGuidance(denoiser, classifier, classifier_scale,
                                          condition_denoiser=bool(self.num_classes))
        if not by_classifier or self.num_classes:
            labels = self.labels(num, y)
        elif hasattr(classifier, "labels"):
            labels = classifier.labels(num, y)
        elif y is None:
            raise ValueError("classifier guidance of an unconditional model needs the labels: pass y=")
        else:
            labels = torch.as_tensor(y, dtype=torch.long).expand(num).clone()
        if by_classifier and (labels < 0).any():
            raise ValueError("classifier guidance needs a class to guide towards, not -1 (unconditional)")
        if sampler == "default" and "grid" not in options:
            calibrated = self.calibrated_grids()
            if steps in calibrated:
                options["grid"] = calibrated[steps]
        generator = torch.Generator().manual_seed(int(seed))
        out = generate(denoiser, self.data_shape, num, sampler, steps, generator, labels,
                       batch_size, progress, self.device, **options)
        if decode and self.decoder is not None:
            out = Samples(self.decoder(out.x), out.nfe)
        return out

    def calibrated_grids(self) -> dict:
        """``{nfe: grid}`` of the default sampler fitted to this model by ``difflab calibrate``
        (:func:`~difflab.samplers.calibration.read_calibration`; empty without a run directory or calibration)."""
        from difflab.samplers.calibration import read_calibration

        if self.run_dir is None:
            return {}
        return read_calibration(self.run_dir, continuous_view(self.denoiser).path)


def load_run(run_dir: Union[str, Path], ema: bool = True, device=None, which: Union[str, int] = "latest",
             compile: bool = False) -> Pipeline:
    """Restore a trained run (the EMA weights unless ``ema=False``) for sampling, in eval mode; a latent run
    (SPEC §5) gets the decoder of its own copy of the autoencoder (:func:`difflab.latent.load_latent_decoder`).
    ``compile=True`` runs the network through ``torch.compile`` (:mod:`difflab.compilation`; eager, with one
    warning, where it is unavailable); ``Pipeline.net`` stays the uncompiled module.

    The run is read as untrusted data: its config and metadata are checked and the network's size counted
    (on the ``meta`` device) before the weights file is read, whose size must fit that network
    (:func:`difflab.limits.checkpoint_byte_budget`); weights that do not fit the network, or hold NaN or
    Inf, raise :class:`~difflab.checkpoint.CheckpointError` naming the file.
    """
    from difflab.checkpoint import FORMAT, CheckpointError, checkpoint_record_file, load_checkpoint, load_weights, read_record
    from difflab.limits import LimitError, checkpoint_byte_budget

    device = default_device(device)
    json_file = checkpoint_record_file(run_dir, which)
    record = read_record(json_file, FORMAT, "checkpoint")
    cfg, meta = record["run_config"], record["meta"]
    try:
        net, nbytes = build_model_sized(cfg, meta.get("data_shape"), meta.get("num_classes"))
    except (LimitError, ValueError, TypeError) as err:
        raise CheckpointError(f"{json_file}: {err}") from None
    ckpt = load_checkpoint(run_dir, json_file.stem, map_location="cpu", max_weight_bytes=checkpoint_byte_budget(nbytes))
    state = ckpt.ema["shadow"] if ema and isinstance(ckpt.ema, dict) and "shadow" in ckpt.ema else ckpt.model
    load_weights(net, state, json_file)
    net.to(device).eval()
    data_shape, num_classes = tuple(meta["data_shape"]), int(meta["num_classes"])
    data_kind = meta.get("data_kind", "points" if len(data_shape) == 1 else "image")
    if data_kind not in ("points", "image"):
        raise CheckpointError(f"{json_file}: meta.data_kind must be 'points' or 'image', got {data_kind!r:.40}")
    decoder = None
    if "latent" in meta:
        from difflab.latent import load_latent_decoder

        decoder = load_latent_decoder(run_dir, meta["latent"], device)
    if "matryoshka" in meta:  # the joint samples of both resolutions, shown at the high one (SPEC §5)
        from difflab.matryoshka import NestedLayout, ResolutionDecoder

        try:
            layout = NestedLayout.of_packed(data_shape)
        except ValueError as err:
            raise CheckpointError(f"{json_file}: {err}") from None
        decoder = ResolutionDecoder(layout, layout.height)
    forward = maybe_compile(net, compile, f"the network of {run_dir}")
    if is_ddgan(cfg):
        from difflab.ddgan import DDGANGenerator

        denoiser = DDGANGenerator(forward, build_path(cfg.diffusion), cfg.ddgan.nz)
    else:
        denoiser = build_denoiser(cfg, forward)
    return Pipeline(net=net, denoiser=denoiser, config=cfg, data_shape=data_shape,
                    num_classes=num_classes, data_kind=data_kind, step=ckpt.step, device=device, decoder=decoder,
                    run_dir=Path(run_dir))
