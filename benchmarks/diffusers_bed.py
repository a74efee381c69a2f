"""diffusers' schedulers driven by a test bed's exact ε-model, for the side-by-side benchmark.

The model. Every diffusers scheduler here works on the DDPM linear schedule (β from 1e-4 to 0.02, T = 1000)
and calls ``model(x_in, t)`` with ``x_in = scheduler.scale_model_input(x, t)``, which is always a VP state
``x_in = a x0 + s ε`` with ``a = 1/√(1+σ²)``, ``s = σ a`` for the noise level ``σ = s/a`` the scheduler
*believes* it is at. :class:`ExactEpsModel` returns the bed's exact ``E[ε | x_in]`` at that σ, found as follows:

- ``noise="sigma"`` (default, used for every reported number): schedulers that keep a ``sigmas`` table and a
  step counter (Euler, Heun, LMS, DPM-Solver, UniPC, DEIS) use ``σ = sigmas[step_index]`` in their update for
  the model output of this call, so the model is given that σ directly. This matters for grids such as
  Karras / exponential / β / log-SNR (``use_lu_lambdas``) ones: DPM-Solver, UniPC and DEIS round the
  timestep they pass to the model to an integer while their update uses the unrounded σ, and Euler with
  ``interpolation_type="linear"`` interpolates σ (not log σ) at fractional timesteps. A real network sees
  only ``t``; the exact model at the scheduler's own σ is the most favourable model diffusers could get, so
  the comparison isolates the solver.
- Schedulers without a ``sigmas`` table (DDPM, DDIM, PNDM) call the model at integer ``t`` and use
  ``alphas_cumprod[t]`` themselves, so the model uses that exact entry.
- ``noise="timestep"``: σ from ``t`` alone — diffusers' index ``t`` is difflab's DDPM step ``t + 1``
  (``alphas_cumprod[0] = ᾱ_1``), and fractional ``t`` maps through the piecewise log-σ interpolation that
  diffusers' ``_sigma_to_t`` inverts (:class:`difflab.paths.DiscreteTimeContinuation` is the same rule). This is
  what a network that interpolated perfectly between its training steps would see; reported for the best
  configurations as a check.

Model calls are counted by the wrapper (Heun and PNDM's Runge–Kutta warm-up call the model more than once per
``step``), so NFE is matched on actual calls, never assumed. Sampler state is float64 where the scheduler
keeps it (DPM-Solver upcasts to float32 inside ``step``); the exact KL comes from ``D + 1`` probe runs
(:func:`benchmarks.beds.exact_kl`) for deterministic schedulers and from Monte Carlo for DDPM.

``clip_sample`` (on by default in DDPM/DDIM, clamping x̂0 to [−1, 1]) is wrong for data that is not an image
in [−1, 1] and is switched off; every other documented option is searched (:data:`FAMILIES`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from benchmarks.beds import T_TRAIN, ddpm_path

SCHEDULE = dict(num_train_timesteps=T_TRAIN, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")

SPACING = [{"timestep_spacing": s} for s in ("linspace", "leading", "trailing")]
SIGMAS = [{}, {"use_karras_sigmas": True}, {"use_exponential_sigmas": True}, {"use_beta_sigmas": True}]
SIGMAS_LU = SIGMAS + [{"use_lu_lambdas": True}]
FINAL = [{"final_sigmas_type": "zero"}, {"final_sigmas_type": "sigma_min"}]
LOWER_ORDER_FINAL = [{"lower_order_final": True}, {"lower_order_final": False}]
STEP_ORDER = "step:order"  # an option of LMS's ``step(order=...)`` call rather than of its config


@dataclass(frozen=True)
class SchedulerFamily:
    """One diffusers scheduler class, its fixed settings and the axes of documented options searched.

    The searched configurations are the Cartesian product of ``axes`` (each axis a list of alternative
    option dicts); ``quick_axes`` is the reduced product used by ``--quick``.
    """

    name: str
    cls_name: str
    fixed: dict = field(default_factory=dict)
    axes: tuple = ()
    quick_axes: tuple = ()
    deterministic: bool = True

    def scheduler_class(self):
        import diffusers

        return getattr(diffusers, self.cls_name)

    def configs(self, quick: bool = False) -> list[dict]:
        axes = self.quick_axes if quick else self.axes
        out = []
        for combo in itertools.product(*axes):
            cfg = {}
            for part in combo:
                cfg.update(part)
            out.append(cfg)
        return out or [{}]


def _opts(key, *values):
    return [{key: v} for v in values]


def _dpm_solver_family(name: str, order: int) -> SchedulerFamily:
    """DPMSolverMultistepScheduler at ``solver_order=order`` over its documented options."""
    return SchedulerFamily(
        name, "DPMSolverMultistepScheduler", {"solver_order": order},
        (_opts("algorithm_type", "dpmsolver++", "dpmsolver"), _opts("solver_type", "midpoint", "heun"),
         SPACING, SIGMAS_LU, FINAL, LOWER_ORDER_FINAL, _opts("euler_at_final", False, True)),
        (_opts("algorithm_type", "dpmsolver++"), _opts("solver_type", "midpoint", "heun"),
         [SPACING[0], SPACING[2]], [SIGMAS_LU[0], SIGMAS_LU[1], SIGMAS_LU[4]], FINAL[:1], LOWER_ORDER_FINAL))


FAMILIES: list[SchedulerFamily] = [
    SchedulerFamily("DDPM", "DDPMScheduler", {"clip_sample": False},
                    (SPACING, _opts("variance_type", "fixed_small", "fixed_large")),
                    ([{"timestep_spacing": "trailing"}], _opts("variance_type", "fixed_small")), deterministic=False),
    SchedulerFamily("DDIM", "DDIMScheduler", {"clip_sample": False},
                    (SPACING, _opts("set_alpha_to_one", True, False), _opts("steps_offset", 0, 1)),
                    (SPACING[1:], _opts("set_alpha_to_one", True))),
    SchedulerFamily("PNDM", "PNDMScheduler", {},
                    (SPACING, _opts("skip_prk_steps", True, False), _opts("set_alpha_to_one", True, False),
                     _opts("steps_offset", 0, 1)),
                    (SPACING[1:], _opts("skip_prk_steps", True), _opts("set_alpha_to_one", True, False))),
    SchedulerFamily("LMS", "LMSDiscreteScheduler", {},
                    (SPACING, SIGMAS, _opts(STEP_ORDER, 1, 2, 3, 4)),
                    ([SPACING[0], SPACING[2]], SIGMAS[:2], _opts(STEP_ORDER, 4))),
    SchedulerFamily("Euler", "EulerDiscreteScheduler", {},
                    (SPACING, SIGMAS, FINAL, _opts("interpolation_type", "linear", "log_linear")),
                    ([SPACING[0], SPACING[2]], SIGMAS[:2], FINAL[:1])),
    SchedulerFamily("Heun", "HeunDiscreteScheduler", {},
                    (SPACING, SIGMAS),
                    ([SPACING[0], SPACING[2]], SIGMAS[:2])),
    _dpm_solver_family("DPM-Solver++ 2M", 2),
    _dpm_solver_family("DPM-Solver++ 3M", 3),
    SchedulerFamily("UniPC", "UniPCMultistepScheduler", {},
                    (_opts("solver_order", 1, 2, 3), _opts("solver_type", "bh1", "bh2"), _opts("predict_x0", True, False),
                     SPACING, SIGMAS, FINAL, LOWER_ORDER_FINAL),
                    (_opts("solver_order", 2, 3), _opts("solver_type", "bh1", "bh2"), [SPACING[0], SPACING[2]],
                     SIGMAS[:2], FINAL[:1])),
    SchedulerFamily("DEIS", "DEISMultistepScheduler", {},
                    (_opts("solver_order", 1, 2, 3), SPACING, SIGMAS, LOWER_ORDER_FINAL),
                    (_opts("solver_order", 2, 3), [SPACING[0], SPACING[2]], SIGMAS[:2])),
]


def family(name: str) -> SchedulerFamily:
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ValueError(f"unknown scheduler family {name!r}")


# --- the exact model ------------------------------------------------------------------------------------
class ExactEpsModel:
    """``model(x_in, t) -> E[ε | x_in]`` of a bed at the noise level the scheduler is at (see module docstring).

    ``calls`` counts model evaluations (rows of a batch are one evaluation).
    """

    def __init__(self, bed, scheduler, noise: str = "sigma"):
        if noise not in ("sigma", "timestep"):
            raise ValueError(f"noise must be 'sigma' or 'timestep', got {noise!r}")
        from difflab.paths import DiscreteTimeContinuation

        self.bed, self.scheduler, self.noise = bed, scheduler, noise
        self.continuation = DiscreteTimeContinuation(ddpm_path())
        self.calls = 0

    def sigma(self, t) -> float:
        sigmas = getattr(self.scheduler, "sigmas", None)
        if self.noise == "sigma" and sigmas is not None and hasattr(self.scheduler, "step_index"):
            i = self.scheduler.step_index
            return float(sigmas[0 if i is None else i])
        # diffusers' timestep t is difflab's DDPM step t + 1; fractional steps by log-σ interpolation
        u = torch.tensor((float(t) + 1.0) / T_TRAIN, dtype=torch.float64)
        return math.exp(-0.5 * float(self.continuation.log_snr(u)))

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        sigma = self.sigma(t)
        a = 1.0 / math.sqrt(1.0 + sigma**2)
        return self.bed.posterior_means(x, a, sigma * a)[1]


# --- driving a scheduler --------------------------------------------------------------------------------
def make_scheduler(fam: SchedulerFamily, cfg: dict):
    options = {k: v for k, v in cfg.items() if not k.startswith("step:")}
    return fam.scheduler_class()(**SCHEDULE, **fam.fixed, **options)


def nfe_of(scheduler, steps: int) -> int:
    """Model calls of a run with ``steps`` inference steps: one per entry of ``scheduler.timesteps``."""
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def steps_for_nfe(scheduler, nfe: int) -> Optional[int]:
    """The most inference steps whose run costs at most ``nfe`` model calls (``None`` if none fits)."""
    for steps in range(nfe, 0, -1):
        try:
            if nfe_of(scheduler, steps) <= nfe:
                return steps
        except (ValueError, IndexError, RuntimeError):
            continue
    return None


@torch.no_grad()
def sample(scheduler, model: ExactEpsModel, steps: int, z: torch.Tensor, cfg: dict,
           generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, int]:
    """The standard diffusers loop from the unit-normal latent ``z``; returns ``(x_0, model calls)``."""
    scheduler.set_timesteps(steps)
    step_kwargs = {k.split(":", 1)[1]: v for k, v in cfg.items() if k.startswith("step:")}
    if generator is not None:
        step_kwargs["generator"] = generator
    model.calls = 0
    x = z * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        eps = model(x_in, t)
        x = scheduler.step(eps, t, x, **step_kwargs).prev_sample
    return x, model.calls


def describe(fam: SchedulerFamily, cfg: dict) -> str:
    """A short label of the options in ``cfg`` that differ from the scheduler's own defaults."""
    defaults = dict(make_scheduler(fam, {}).config)
    defaults["step:order"] = 4  # LMSDiscreteScheduler.step's default order
    changed = [f"{k.replace('step:', 'step ')}={v}" for k, v in cfg.items() if defaults.get(k) != v]
    return ", ".join(changed) or "defaults"
