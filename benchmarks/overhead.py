"""Sampler overhead: time per network evaluation spent *outside* the network, difflab vs diffusers.

The network is near-free (it returns zeros), the batch is 1024 vectors of dimension 16, and both libraries
run the same sampler on the same DDPM linear schedule with the same number of model calls. What is timed is
the whole sampling call (grid / ``set_timesteps`` included), divided by the NFE, as the fastest of
``repeats`` rounds that alternate between the two libraries (:func:`interleaved`); the zero network's own
cost per call is measured and reported beside it. Then, with a real network (difflab's MLP), the total
sampling time is compared with ``NFE × (one forward pass)``: a ratio of 1 means the sampler costs nothing.
"""

from __future__ import annotations

from typing import Callable

import torch

from benchmarks import beds
from benchmarks.common import timeit
from difflab.parameterization import NetworkDenoiser
from difflab.samplers import sample_ddim, sample_ddpm

BATCH, DIM = 1024, 16


def zero_net(x, t, **cond):
    return torch.zeros_like(x)


def _difflab_ode(solver_name: str) -> Callable:
    from difflab.samplers import ode, time_grids

    solver, per_step = ode.ODE_SOLVERS[solver_name], ode.EVALS_PER_STEP[solver_name]

    def run(denoiser, x, nfe, generator):
        steps = max(1, (nfe - 1) // per_step + 1)
        return solver(denoiser, x, time_grids.uniform_log_snr(denoiser.path, steps))

    return run


def _pairs() -> list[dict]:
    """(difflab sampler, diffusers scheduler) pairs that implement the same method."""
    pairs = [
        {"name": "DDIM", "difflab": lambda d, x, n, g: sample_ddim(d, x, steps=n), "path": "discrete",
         "diffusers": ("DDIMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}), "stochastic": False},
        {"name": "DDPM", "difflab": lambda d, x, n, g: sample_ddpm(d, x, steps=n, generator=g), "path": "discrete",
         "diffusers": ("DDPMScheduler", {"clip_sample": False, "timestep_spacing": "trailing"}), "stochastic": True},
    ]
    try:
        from difflab.samplers import ode  # noqa: F401
    except ImportError:
        return pairs
    pairs += [
        {"name": "Euler", "difflab": _difflab_ode("euler"), "path": "continuous",
         "diffusers": ("EulerDiscreteScheduler", {}), "stochastic": False},
        {"name": "Heun", "difflab": _difflab_ode("heun"), "path": "continuous",
         "diffusers": ("HeunDiscreteScheduler", {}), "stochastic": False},
        {"name": "DPM-Solver++ 2M", "difflab": _difflab_ode("dpmpp2m"), "path": "continuous",
         "diffusers": ("DPMSolverMultistepScheduler", {}), "stochastic": False},
        {"name": "DEIS (order 3)", "difflab": _difflab_ode("deis"), "path": "continuous",
         "diffusers": ("DEISMultistepScheduler", {"solver_order": 3}), "stochastic": False},
    ]
    return pairs


def _diffusers_runner(cls_name: str, options: dict, stochastic: bool, nfe: int):
    import diffusers

    from benchmarks.diffusers_bed import SCHEDULE, steps_for_nfe

    scheduler = getattr(diffusers, cls_name)(**SCHEDULE, **options)
    steps = steps_for_nfe(scheduler, nfe)

    def run(z, generator):
        scheduler.set_timesteps(steps)
        x = z * scheduler.init_noise_sigma
        calls = 0
        kwargs = {"generator": generator} if stochastic else {}
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            eps = zero_net(x_in, t)
            calls += 1
            x = scheduler.step(eps, t, x, **kwargs).prev_sample
        return x, calls

    return run


def interleaved(fn_a: Callable, fn_b: Callable, repeats: int, min_time: float = 0.05) -> tuple:
    """Time two calls in alternation, ``repeats`` rounds of at least ``min_time`` each; on a shared machine
    the least-disturbed round (``min_s``) of each is the fair estimate, and alternating exposes both to the
    same background load."""
    runs = {"a": [], "b": []}
    for fn in (fn_a, fn_b):  # warm-up
        fn()
    for _ in range(repeats):
        for key, fn in (("a", fn_a), ("b", fn_b)):
            runs[key].append(timeit(fn, repeats=1, warmup=0, min_time=min_time)["min_s"])
    return tuple({"min_s": min(v), "median_s": sorted(v)[len(v) // 2], "repeats": repeats} for v in runs.values())


@torch.no_grad()
def per_step_overhead(nfe: int, repeats: int) -> list[dict]:
    from difflab.paths import DiscreteTimeContinuation

    path = beds.ddpm_path()
    denoisers = {"discrete": NetworkDenoiser(zero_net, path, "eps"),
                 "continuous": NetworkDenoiser(zero_net, DiscreteTimeContinuation(path), "eps")}
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(BATCH, DIM, generator=gen)
    x_T = path.prior_std() * z
    net_time = timeit(lambda: zero_net(z, None), repeats=repeats, min_time=0.02)["median_s"]
    rows = []
    for pair in _pairs():
        den = denoisers[pair["path"]]
        dl_nfe = pair["difflab"](den, x_T, nfe, gen).nfe
        dz_run = _diffusers_runner(*pair["diffusers"], pair["stochastic"], nfe)
        dz_nfe = dz_run(z, gen)[1]
        dl, dz = interleaved(lambda: pair["difflab"](den, x_T, nfe, gen), lambda: dz_run(z, gen), repeats)
        dl_step, dz_step = dl["min_s"] / dl_nfe, dz["min_s"] / dz_nfe
        rows.append({"sampler": pair["name"], "diffusers_class": pair["diffusers"][0], "nfe_difflab": dl_nfe,
                     "nfe_diffusers": dz_nfe, "difflab_s_per_eval": dl_step, "diffusers_s_per_eval": dz_step,
                     "zero_net_s_per_call": net_time, "ratio_difflab_over_diffusers": dl_step / dz_step,
                     "difflab_total_s": dl["min_s"], "diffusers_total_s": dz["min_s"]})
    return rows


@torch.no_grad()
def breakdown(repeats: int) -> dict:
    """Where one difflab ODE evaluation's overhead goes (zero network, batch ``BATCH × DIM``, float32 state, the
    continuous DDPM path): the denoiser wrapper at a batch-shared time (the samplers' case: scalar coefficients,
    the prediction kept in linear form) and at a per-sample time ``[B]`` (elementwise coefficients, ``x̂0`` and
    ``ε̂`` formed); an Euler update from the linear form (:meth:`Prediction.combine`) and from formed ``x̂0, ε̂``;
    a log-SNR grid built afresh and from the path's memo."""
    from difflab.paths import DiscreteTimeContinuation
    from difflab.samplers import time_grids
    from difflab.samplers.chain import time_tensor

    path = DiscreteTimeContinuation(beds.ddpm_path())
    den = NetworkDenoiser(zero_net, path, "eps")
    x = torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(0))
    t_shared, t_batch = time_tensor(0.5, BATCH, x.device), torch.full((BATCH,), 0.5, dtype=torch.float64)
    path.tabulate([0.5], derivatives=True)
    lazy, formed = den(x, t_shared), den(x, t_batch)
    a_dot, s_dot = path.derivatives_at(0.5)

    def measure(fn):
        return timeit(fn, repeats=repeats, min_time=0.02)["min_s"]

    def fresh_grid():
        path.__dict__.pop("_scalar_memo", None)
        return time_grids.uniform_log_snr(path, 50)

    return {
        "denoiser_call_shared_time_s": measure(lambda: den(x, t_shared)),
        "denoiser_call_per_sample_time_s": measure(lambda: den(x, t_batch)),
        "euler_update_linear_form_s": measure(lambda: lazy.combine(-0.01 * a_dot, -0.01 * s_dot, x=x, c_x=1.0)),
        "euler_update_formed_s": measure(lambda: formed.combine(-0.01 * a_dot, -0.01 * s_dot, x=x, c_x=1.0)),
        "log_snr_grid_50_fresh_s": measure(fresh_grid),
        "log_snr_grid_50_memoised_s": measure(lambda: time_grids.uniform_log_snr(path, 50)),
    }


@torch.no_grad()
def total_vs_network(nfes, repeats: int) -> dict:
    """DDIM with difflab's MLP (the 2-D config's size, batch 1024): total sampling time vs NFE × forward."""
    from difflab.networks import build_network, count_parameters

    path = beds.ddpm_path()
    net = build_network("mlp", (2,), hidden=256, depth=4).eval()
    den = NetworkDenoiser(net, path, "eps")
    x = torch.randn(BATCH, 2, generator=torch.Generator().manual_seed(0))
    t = torch.full((BATCH,), 500, dtype=torch.long)
    forward = timeit(lambda: net(x, t), repeats=repeats, min_time=0.05)["median_s"]
    rows = []
    for nfe in nfes:
        total = timeit(lambda: sample_ddim(den, x, steps=nfe), repeats=repeats)["median_s"]
        rows.append({"nfe": nfe, "total_s": total, "nfe_x_forward_s": nfe * forward,
                     "ratio_total_over_nfe_x_forward": total / (nfe * forward)})
    return {"network": "difflab MLP hidden=256 depth=4", "parameters": count_parameters(net), "batch": BATCH,
            "forward_s": forward, "rows": rows}


def run(quick: bool = False, log=print) -> dict:
    nfe = 10 if quick else 50
    repeats = 3 if quick else 9
    rows = per_step_overhead(nfe, repeats)
    for r in rows:
        log(f"  {r['sampler']}: difflab {r['difflab_s_per_eval'] * 1e6:.0f} µs/eval, diffusers "
            f"{r['diffusers_s_per_eval'] * 1e6:.0f} µs/eval, ratio {r['ratio_difflab_over_diffusers']:.2f}")
    out = {"batch": BATCH, "dim": DIM, "nfe": nfe, "threads": torch.get_num_threads(), "per_eval": rows,
           "breakdown": breakdown(repeats)}
    try:
        out["total_vs_network"] = total_vs_network((10, 50) if quick else (10, 50, 100), repeats)
    except ImportError as err:  # difflab.networks not in this checkout
        out["total_vs_network"] = {"skipped": str(err)}
    return out
