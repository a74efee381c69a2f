"""Ablation of difflab's default sampler on the interop benchmark's UNet (``benchmarks/interop.py``): DEIS order ×
grid × first step, RMSE to the same Dormand–Prince reference (rtol = atol = 1e-7).

    OMP_NUM_THREADS=1 PYTHONPATH=src:. python benchmarks/interop_ablation.py > benchmarks/results/interop_deis_ablation.txt

Training is seeded and single-threaded, so the model is the benchmark's (the same losses are logged). Each line:
``NFE grid order from_pure_noise RMSE`` (``opt``: the optimised grid of ``solver_grid(path, nfe, "deis")``;
``logsnr``: uniform log-SNR), and ``NFE grid dpmpp2m RMSE`` for DPM-Solver++ 2M on the same grid.
"""
import diffusers
import torch

torch.set_num_threads(1)
from benchmarks import interop
from difflab.interop import diffusers_denoiser, DifflabScheduler
from difflab.pipeline import SAMPLERS, continuous_view, solver_grid
from difflab.samplers.ode import sample_deis, sample_dpmpp_2m
from difflab.samplers import time_grids
unet = interop.tiny_unet(); ts = diffusers.DDPMScheduler()
with torch.enable_grad():
    interop.train(unet, ts, interop.TRAIN_STEPS, print)
with torch.no_grad():
    z = torch.randn((interop.BATCH, 1, 8, 8), generator=torch.Generator().manual_seed(interop.SEED + 1))
    den = diffusers_denoiser(unet, ts.config)
    x_T = (z * DifflabScheduler.from_config(ts.config).init_noise_sigma).double()
    ref = SAMPLERS["rk45"](den, x_T, 1, rtol=1e-7, atol=1e-7).x
    cden = continuous_view(den)
    for nfe in (10, 20):
        g_opt = solver_grid(cden.path, nfe, "deis")
        g_lsnr = time_grids.uniform_log_snr(cden.path, nfe)
        for name, grid in (("opt", g_opt), ("logsnr", g_lsnr)):
            for order in (1, 2, 3):
                for pure in (True, False):
                    x = sample_deis(cden, x_T, grid, order=order, from_pure_noise=pure).x
                    print(nfe, name, order, pure, interop.rmse(x, ref), flush=True)
            print(nfe, name, "dpmpp2m", interop.rmse(sample_dpmpp_2m(cden, x_T, grid).x, ref), flush=True)
