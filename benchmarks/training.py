"""Training throughput and memory: difflab's networks vs diffusers' ``UNet2DModel`` at a matched size.

A training step is one forward + backward + AdamW step of the ε-MSE (``L_simple``, SPEC §3) on one batch,
with the trainer's optimiser (:func:`difflab.optim.adamw`, fused AdamW) on both sides. Each measurement runs
in its own subprocess (``python -m benchmarks.training --worker JSON``) so that its peak RSS is its own;
difflab and diffusers workers alternate, and the best of the repeats is kept (the machine is shared, so the
least-disturbed run is the fairest estimate). Everything is measured at one torch thread and again at every
core the process may use (how ``difflab train`` runs), since the two libraries scale differently. Measured:

- difflab's 2-D MLP (the ``configs/moons.yaml`` size) and the U-Nets of ``configs/digits8.yaml`` (8×8, batch 128)
  and ``configs/mnist5k.yaml`` (28×28, batch 64), unconditional in both libraries;
- diffusers' ``UNet2DModel`` with the same levels, residual blocks per level and attention at the lowest
  resolution, its width chosen so its parameter count is the closest to the difflab U-Net's;
- the peak RSS of a short ``difflab train`` on the digits config (target ≤ 1.5 GiB).

On CUDA the step runs under bf16 autocast and the peak GPU memory is reported too.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _find_config(*names: str):
    for name in names:
        path = REPO / "configs" / name
        if path.exists():
            return path
    return None


DIGITS_CONFIGS = {"unet": "digits8.yaml", "unet_mnist": "mnist5k.yaml"}  # result key -> config in configs/


def unet_spec(config_name: str) -> dict:
    """The difflab U-Net of a digits config: its model section, image size and batch size."""
    from difflab.config import load_config

    cfg_path = REPO / "configs" / config_name
    cfg = load_config(cfg_path)
    size = 8 if cfg.data.name == "digits8" else 28
    return {"kind": "unet", "data_shape": [1, size, size], "kwargs": cfg.model.network_kwargs(),
            "batch": cfg.train.batch_size, "source": str(cfg_path.relative_to(REPO))}


def mlp_spec() -> dict:
    from difflab.config import load_config

    cfg_path = _find_config("moons.yaml")
    model = load_config(cfg_path).model if cfg_path else None
    kwargs = model.network_kwargs() if model is not None else {"hidden": 128, "depth": 3, "time_dim": 64}
    return {"kind": "mlp", "data_shape": [2], "kwargs": kwargs, "batch": 256,
            "source": str(cfg_path.relative_to(REPO)) if cfg_path else "defaults"}


# --- the diffusers U-Net of matched size ---------------------------------------------------------------------
def diffusers_unet(width: int, levels: int, layers_per_block: int, image_size: int, attention_lowest: bool = True,
                   **extra):
    from diffusers import UNet2DModel

    down = ["DownBlock2D"] * levels
    up = ["UpBlock2D"] * levels
    if attention_lowest:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    mults = [1] + [2] * (levels - 1)
    return UNet2DModel(sample_size=image_size, in_channels=1, out_channels=1, layers_per_block=layers_per_block,
                       block_out_channels=tuple(width * m for m in mults), down_block_types=tuple(down),
                       up_block_types=tuple(up), norm_num_groups=8, attention_head_dim=8, **extra)


def matched_diffusers_width(target_params: int, levels: int, layers_per_block: int, image_size: int, **extra) -> int:
    """The base width (a multiple of 8, for GroupNorm(8)) whose UNet2DModel size is closest to ``target_params``."""
    best, best_gap = 8, None
    for width in range(8, 257, 8):
        n = sum(p.numel() for p in diffusers_unet(width, levels, layers_per_block, image_size, **extra).parameters())
        gap = abs(n - target_params)
        if best_gap is None or gap < best_gap:
            best, best_gap = width, gap
        if n > target_params:
            break
    return best


# --- the worker -------------------------------------------------------------------------------------------
def _worker(job: dict) -> dict:
    """Time ``job["steps"]`` training steps after warm-up; return samples/s and peak memory."""
    import resource

    torch.set_num_threads(job["threads"])
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape, batch = tuple(job["data_shape"]), job["batch"]
    x0 = torch.randn(batch, *shape, device=device)
    if job["library"] == "difflab":
        from difflab.losses import diffusion_loss
        from difflab.networks import build_network
        from difflab.parameterization import NetworkDenoiser
        from difflab.paths import DiscretePath

        net = build_network(job["kind"], shape, **job["kwargs"]).to(device)
        denoiser = NetworkDenoiser(net, DiscretePath.from_schedule("linear", T=1000), "eps")

        def loss_fn():
            return diffusion_loss(denoiser, x0).mean()
    else:
        net = diffusers_unet(job["width"], job["levels"], job["layers_per_block"], shape[-1]).to(device)
        alpha_bar = torch.cumprod(1.0 - torch.linspace(1e-4, 0.02, 1000), 0).to(device)

        def loss_fn():
            t = torch.randint(0, 1000, (batch,), device=device)
            eps = torch.randn_like(x0)
            ab = alpha_bar[t].view(-1, 1, 1, 1)
            x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            return torch.nn.functional.mse_loss(net(x_t, t).sample, eps)

    from difflab.optim import adamw

    params = sum(p.numel() for p in net.parameters())
    opt = adamw(net.parameters(), lr=1e-4)  # the trainer's optimiser, the same on both sides
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(job["warmup"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(job["steps"]):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    out = {"params": params, "samples_per_s": batch * job["steps"] / elapsed, "s_per_step": elapsed / job["steps"],
           "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, "device": str(device)}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
        out["dtype"] = "bf16 autocast"
    return out


def _spawn(job: dict) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS=str(job["threads"]))
    proc = subprocess.run([sys.executable, "-m", "benchmarks.training", "--worker", json.dumps(job)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["worker failed"])[-1][:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _best_of(jobs: list[dict], repeats: int) -> list[dict]:
    """Run each job ``repeats`` times, alternating between jobs; keep each job's fastest run."""
    best: list = [None] * len(jobs)
    for _ in range(repeats):
        for i, job in enumerate(jobs):
            r = _spawn(job)
            if "error" in r:
                best[i] = best[i] or r
            elif best[i] is None or "error" in best[i] or r["samples_per_s"] > best[i]["samples_per_s"]:
                best[i] = r
    return best


def train_peak_memory(steps: int, config_name: str = DIGITS_CONFIGS["unet"]) -> dict:
    """Peak RSS of ``difflab train`` on a digits config for ``steps`` steps (the child's own ``ru_maxrss``)."""
    cfg = REPO / "configs" / config_name
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "difflab.cli", "train", str(cfg.relative_to(REPO)), "--out", str(Path(tmp) / "run"),
               "--set", f"train.steps={steps}"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err = proc.stderr.read().decode(errors="replace").strip().splitlines() if proc.stderr else []
        wall = time.perf_counter() - start
    out = {"config": str(cfg.relative_to(REPO)), "steps": steps, "command": " ".join(["difflab"] + cmd[3:5] + ["--out", "RUN"] + cmd[7:]),
           "peak_rss_mib": usage.ru_maxrss / 1024.0, "wall_s": wall, "exit_code": proc.returncode,
           "target_mib": 1.5 * 1024}
    if proc.returncode != 0:
        out["error"] = (err or ["failed"])[-1][:300]
    return out


def thread_counts() -> list:
    """One torch thread, and every core this process may use (how ``difflab train`` runs) when that is more."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return sorted({1, cores})


def _measure(threads: int, quick: bool, steps: int, warmup: int, repeats: int, log) -> dict:
    """Every model at one torch thread count: samples/s, peak RSS and the difflab/diffusers ratios."""
    from difflab.networks import build_network, count_parameters

    out = {"threads": threads}
    common = {"threads": threads, "steps": steps, "warmup": warmup}
    mlp = mlp_spec()
    jobs, keys = ([], []) if quick else ([dict(common, library="difflab", **mlp)], ["mlp"])  # --quick: U-Nets only
    for key, config_name in DIGITS_CONFIGS.items():
        if quick and key != "unet":
            continue
        unet = unet_spec(config_name)
        levels = len(unet["kwargs"]["channel_mults"])
        difflab_params = count_parameters(build_network("unet", unet["data_shape"], **unet["kwargs"]))
        width = matched_diffusers_width(difflab_params, levels, unet["kwargs"]["num_res_blocks"], unet["data_shape"][-1])
        jobs += [dict(common, library="difflab", **unet),
                 dict(common, library="diffusers", kind="UNet2DModel", data_shape=unet["data_shape"], batch=unet["batch"],
                      width=width, levels=levels, layers_per_block=unet["kwargs"]["num_res_blocks"],
                      source=f"UNet2DModel, base width {width}, {levels} levels, attention at the lowest resolution")]
        keys += [key, key.replace("unet", "diffusers_unet")]
    results = dict(zip(keys, _best_of(jobs, repeats)))
    for key, job in zip(keys, jobs):
        spec = {k: job[k] for k in ("source", "kwargs", "width") if k in job}
        out[key] = dict(spec=spec, data_shape=job["data_shape"], batch=job["batch"], **results[key])
    for key in DIGITS_CONFIGS:
        dz_key = key.replace("unet", "diffusers_unet")
        if key in out and "error" not in out[key] and "error" not in out[dz_key]:
            ratio = out[key]["samples_per_s"] / out[dz_key]["samples_per_s"]
            out[f"{key}_throughput_ratio_difflab_over_diffusers"] = ratio
            out[f"{key}_param_ratio_difflab_over_diffusers"] = out[key]["params"] / out[dz_key]["params"]
            log(f"  {threads} thread(s), {key} {out[key]['data_shape']} batch {out[key]['batch']}: difflab "
                f"{out[key]['samples_per_s']:.0f} samples/s ({out[key]['params']} params), diffusers "
                f"{out[dz_key]['samples_per_s']:.0f} samples/s ({out[dz_key]['params']} params): ratio {ratio:.2f}")
    if "mlp" in out and "error" not in out["mlp"]:
        log(f"  {threads} thread(s), MLP batch {mlp['batch']}: {out['mlp']['samples_per_s']:.0f} samples/s, "
            f"peak RSS {out['mlp']['peak_rss_mib']:.0f} MiB")
    return out


def run(quick: bool = False, log=print) -> dict:
    steps, warmup, repeats = (3, 1, 1) if quick else (10, 2, 4)
    out = {"steps_timed": steps, "warmup": warmup, "repeats": repeats, "cuda": torch.cuda.is_available(),
           "optimizer": "difflab.optim.adamw (fused AdamW) on both sides",
           "by_threads": {str(n): _measure(n, quick, steps, warmup, repeats, log) for n in thread_counts()}}
    out["train_peak_memory"] = train_peak_memory(2 if quick else 30)
    pm = out["train_peak_memory"]
    log(f"  {pm['command']}: peak RSS {pm['peak_rss_mib']:.0f} MiB, exit {pm['exit_code']}")
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="training-throughput worker (used by benchmarks.run)")
    parser.add_argument("--worker", required=True, help="the job as JSON")
    print(json.dumps(_worker(json.loads(parser.parse_args().worker))))
