"""difflab inside diffusers' own sampling loop (issue 19 target): RMSE at a fixed NFE to a reference solve.

The model is a diffusers ``UNet2DModel`` (ε-prediction, the DDPM linear schedule with T = 1000 — the defaults of
``DDPMScheduler``) trained briefly the diffusers way (``add_noise`` at a uniform timestep, ε-MSE, AdamW) on
scikit-learn's 8×8 digits, so its probability-flow ODE is a real model's. Every scheduler runs diffusers'
documented loop (:func:`benchmarks.diffusers_bed.sample`: ``set_timesteps``, ``scale_model_input``, model,
``step``) from the same unit-normal noise ``z`` (times the scheduler's ``init_noise_sigma``); NFE is counted model
calls. difflab runs there as :class:`difflab.interop.DifflabScheduler` — the one-line switch — with its default
solver (DEIS on its optimised grid) and others.

Reference: difflab's adaptive Dormand–Prince (``rk45``) at a tight tolerance on the same UNet wrapped by
:func:`difflab.interop.diffusers_denoiser`, from ``z · init_noise_sigma`` of difflab's scheduler. Its own accuracy
is reported (the same solve at 10× the tolerance), and so is its distance to DDIM with all 1000 steps (a solve
that evaluates the model only at integer timesteps, as the diffusers pipelines' DDIM does), so the reference's
choice of time interpolation between training steps is visible. RMSE is over every pixel of every sample in the
data's [−1, 1] units.

The diffusers schedulers are the pipelines' defaults as shipped: ``DDIMScheduler()`` (``DDIMPipeline``; note
``clip_sample=True``, so also without it), ``PNDMScheduler`` as Stable Diffusion 1.x configures it
(``skip_prk_steps``, ``steps_offset=1``, ``set_alpha_to_one=False``), and the default configurations of the DPM-Solver
multistep, Euler and UniPC schedulers that recent pipelines ship with. ``DDPMPipeline``'s own default,
``DDPMScheduler``, is ancestral (it adds fresh noise), so its distance to an ODE solution is not a solver error; it
is listed for completeness and left out of the ratios.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch

NFES = (10, 20)
QUICK_NFES = (10,)
TRAIN_STEPS, QUICK_TRAIN_STEPS = 1500, 150
BATCH = 16  # samples compared per configuration
TRAIN_BATCH, LR, SEED = 128, 2e-3, 0
REF_RTOL, QUICK_REF_RTOL = 1e-7, 1e-5

PIPELINE_DEFAULTS: list = [  # (label, diffusers class, options, deterministic)
    ("DDIMScheduler() — DDIMPipeline default (clip_sample=True)", "DDIMScheduler", {}, True),
    ("DDIMScheduler(clip_sample=False)", "DDIMScheduler", {"clip_sample": False}, True),
    ("PNDMScheduler as Stable Diffusion 1.x ships it", "PNDMScheduler",
     {"skip_prk_steps": True, "steps_offset": 1, "set_alpha_to_one": False}, True),
    ("DPMSolverMultistepScheduler() (2M, dpmsolver++)", "DPMSolverMultistepScheduler", {}, True),
    ("EulerDiscreteScheduler()", "EulerDiscreteScheduler", {}, True),
    ("UniPCMultistepScheduler()", "UniPCMultistepScheduler", {}, True),
    ("DDPMScheduler() — DDPMPipeline default (ancestral)", "DDPMScheduler", {}, False),
]
DIFFLAB_SOLVERS = (("default", {}), ("deis", {}), ("deis", {"order": 2}), ("dpmpp2m", {}), ("heun", {}))
"""(solver, options) run through DifflabScheduler; the first is its default (difflab's default sampler: DEIS order 3
on a ρ = 7 grid capped at σ̄ = 80); ``deis`` is the earlier default (order 4 on grids fit to 1-D Gaussians)."""


class CountingUNet:
    """``model(x, t) -> ε`` of a diffusers UNet, counting calls (the interface :func:`benchmarks.diffusers_bed.sample`
    drives)."""

    def __init__(self, unet):
        self.unet, self.calls = unet, 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        return self.unet(x.to(torch.float32), t).sample


def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(SEED)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(32, 64),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8)


def train(unet, scheduler, steps: int, log: Callable) -> dict:
    """The diffusers training recipe on the 8×8 digits: ``x_t = add_noise(x0, ε, τ)``, τ uniform, ε-MSE, AdamW."""
    from difflab.data.images import digits8

    data = digits8().x
    gen = torch.Generator().manual_seed(SEED)
    opt = torch.optim.AdamW(unet.parameters(), lr=LR)
    unet.train()
    start, losses = time.perf_counter(), []
    for step in range(steps):
        x0 = data[torch.randint(0, data.shape[0], (TRAIN_BATCH,), generator=gen)]
        noise = torch.randn(x0.shape, generator=gen)
        tau = torch.randint(0, scheduler.config.num_train_timesteps, (TRAIN_BATCH,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, tau), tau).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 5) == 0:
            log(f"  train step {step + 1}/{steps}: loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    unet.eval()
    return {"steps": steps, "batch": TRAIN_BATCH, "lr": LR, "final_loss_mean_last_100": sum(losses[-100:]) / len(losses[-100:]),
            "seconds": time.perf_counter() - start}


def rmse(x: torch.Tensor, ref: torch.Tensor) -> float:
    return math.sqrt(float((x.double() - ref.double()).pow(2).mean()))


@torch.no_grad()
def run(quick: bool = False, log: Callable = print) -> dict:
    import diffusers

    from benchmarks.diffusers_bed import sample, steps_for_nfe
    from difflab.interop import DifflabScheduler, diffusers_denoiser
    from difflab.pipeline import SAMPLERS

    torch.set_num_threads(1)  # the tiny UNet is fastest on one thread, and the machine is shared
    unet = tiny_unet()
    train_scheduler = diffusers.DDPMScheduler()
    config = train_scheduler.config
    with torch.enable_grad():
        training = train(unet, train_scheduler, QUICK_TRAIN_STEPS if quick else TRAIN_STEPS, log)
    model = CountingUNet(unet)
    z = torch.randn((BATCH, 1, 8, 8), generator=torch.Generator().manual_seed(SEED + 1))
    den = diffusers_denoiser(unet, config)
    x_T = (z * DifflabScheduler.from_config(config).init_noise_sigma).double()

    rtol = QUICK_REF_RTOL if quick else REF_RTOL
    start = time.perf_counter()
    ref = SAMPLERS["rk45"](den, x_T, 1, rtol=rtol, atol=rtol)
    log(f"  reference: {ref.nfe} NFE in {time.perf_counter() - start:.0f} s")
    loose = SAMPLERS["rk45"](den, x_T, 1, rtol=10 * rtol, atol=10 * rtol)
    ddim_all, _ = sample(diffusers.DDIMScheduler(clip_sample=False, timestep_spacing="trailing"), model, 1000, z, {})
    reference = {"solver": "rk45", "rtol": rtol, "atol": rtol, "nfe": ref.nfe,
                 "rmse_of_10x_tolerance": rmse(loose.x, ref.x), "nfe_10x_tolerance": loose.nfe,
                 "rmse_of_ddim_1000_integer_steps": rmse(ddim_all, ref.x), "seconds": time.perf_counter() - start}
    log(f"  reference rk45 rtol {rtol}: {ref.nfe} NFE; 10x tolerance differs by {reference['rmse_of_10x_tolerance']:.2e}, "
        f"DDIM-1000 by {reference['rmse_of_ddim_1000_integer_steps']:.2e}")

    rows = []
    for nfe in (QUICK_NFES if quick else NFES):
        for i, (solver, options) in enumerate(DIFFLAB_SOLVERS):
            sched = DifflabScheduler.from_config(config, solver=solver, solver_options=options)
            x, calls = sample(sched, model, nfe, z, {})
            direct = SAMPLERS[solver](den, x_T, nfe, **options).x  # the same run outside the loop: must be identical
            label = f"DifflabScheduler(solver={solver!r}" + (f", solver_options={options}" if options else "") + ")"
            rows.append({"library": "difflab", "nfe": nfe, "calls": calls, "deterministic": True,
                         "label": label + (" — default" if i == 0 else ""),
                         "rmse": rmse(x, ref.x), "max_abs_diff_to_difflab_sampler": float((x.double() - direct).abs().max())})
        for label, cls_name, options, deterministic in PIPELINE_DEFAULTS:
            sched = getattr(diffusers, cls_name).from_config(config, **options)
            steps = steps_for_nfe(sched, nfe)
            gen = None if deterministic else torch.Generator().manual_seed(SEED + 2)
            x, calls = sample(sched, model, steps, z, {}, generator=gen)
            rows.append({"library": "diffusers", "nfe": nfe, "calls": calls, "deterministic": deterministic,
                         "label": label, "num_inference_steps": steps, "rmse": rmse(x, ref.x)})
        for r in rows[-len(DIFFLAB_SOLVERS) - len(PIPELINE_DEFAULTS):]:
            log(f"  NFE {nfe} ({r['calls']} calls) {r['label']}: RMSE {r['rmse']:.3e}")
    headline = []
    for nfe in (QUICK_NFES if quick else NFES):
        ours = next(r for r in rows if r["nfe"] == nfe and r["label"].endswith("default"))
        for r in rows:
            if r["nfe"] == nfe and r["library"] == "diffusers" and r["deterministic"]:
                headline.append({"nfe": nfe, "diffusers": r["label"], "diffusers_rmse": r["rmse"],
                                 "difflab_rmse": ours["rmse"], "ratio_difflab_over_diffusers": ours["rmse"] / r["rmse"]})
    return {"diffusers_version": diffusers.__version__, "model": {
        "class": "UNet2DModel", "parameters": sum(p.numel() for p in unet.parameters()), "data": "digits8 (1x8x8)",
        "prediction_type": config.prediction_type, "beta_schedule": config.beta_schedule,
        "num_train_timesteps": config.num_train_timesteps}, "training": training, "batch": BATCH,
        "reference": reference, "rows": rows, "headline": headline}
