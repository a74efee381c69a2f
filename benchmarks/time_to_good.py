"""Time to a good model on MNIST-5k: ``difflab train configs/mnist5k.yaml`` against a recipe built from diffusers
parts, both sides in the same run on the same machine.

    python -m benchmarks.time_to_good --out benchmarks/results/time_to_good [--every 400] [--num 500]
        [--steps 2800] [--cap-ratio 2] [--quick]

The diffusers recipe is the one of diffusers' unconditional training example, made class-conditional so that class
accuracy applies to both sides: a ``UNet2DModel`` (same levels, one residual block per level, attention at 7×7,
``num_class_embeds=10``) whose width gives the parameter count closest to difflab's U-Net, ``DDPMScheduler`` with
linear β (T = 1000) and ε-prediction, AdamW at lr 1e-4 (β = (0.95, 0.999), weight decay 1e-6) with 500 warm-up
steps and cosine decay, diffusers' ``EMAModel`` (inverse γ 1, power 3/4), batch 64 like difflab's config, sampled
with ``DDIMScheduler`` (50 steps) in diffusers' own loop. difflab's side is ``configs/mnist5k.yaml`` as it ships
(class-conditional U-Net, cosine schedule, v-target, lr 1e-3), sampled with its DDIM-50.

1. **Train, side by side**: the two trainings run at the same time in two processes of one torch thread each (so
   the machine's other load falls on both alike), each saving its EMA weights every ``--every`` steps with the
   wall time and process CPU time of training so far. difflab runs its configured ``--steps``; the diffusers
   recipe runs until ``--cap-ratio`` × difflab's total training wall time (it continues alone after difflab is
   done, which only helps it).
2. **Score every checkpoint** (not counted in training time): ``--num`` samples, classes in turn, scored in the
   feature space of difflab's own mnist5k classifier (no Inception here): FD-mnist5k beside its real-vs-real floor
   at the same n, and the classifier's accuracy on the samples' intended classes.
3. **Time to a good model**: the training wall time of each side's first checkpoint with class accuracy ≥ 0.95
   and FD ≤ 2 × its floor. A side that never gets there is reported as "not within its training time".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "mnist5k.yaml"
ACCURACY_TARGET, FD_FLOOR_MULTIPLE = 0.95, 2.0
LR, WARMUP, BATCH, SEED = 1e-4, 500, 64, 0


# --- the diffusers recipe -----------------------------------------------------------------------------------------
def recipe_unet():
    """The class-conditional ``UNet2DModel`` at difflab's mnist5k U-Net's parameter count."""
    from benchmarks.training import diffusers_unet, matched_diffusers_width
    from difflab.config import load_config
    from difflab.pipeline import build_model

    cfg = load_config(CONFIG)
    target = sum(p.numel() for p in build_model(cfg, (1, 28, 28), 10).parameters())
    levels, blocks = len(cfg.model.channel_mults), cfg.model.num_res_blocks
    width = matched_diffusers_width(target, levels, blocks, 28, num_class_embeds=10)
    return diffusers_unet(width, levels, blocks, 28, num_class_embeds=10), target


def diffusers_worker(spec: dict) -> None:
    """Train the recipe, writing ``ema_<step>.safetensors`` and a line of ``progress.jsonl`` every ``every`` steps."""
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_cosine_schedule_with_warmup
    from diffusers.training_utils import EMAModel
    from safetensors.torch import save_file

    from difflab.data import load_dataset

    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    ds = load_dataset("mnist5k")
    unet, _ = recipe_unet()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon")
    opt = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.95, 0.999), weight_decay=1e-6, eps=1e-8)
    lr_schedule = get_cosine_schedule_with_warmup(opt, WARMUP, spec["max_steps"])
    ema = EMAModel(unet.parameters(), decay=0.9999, use_ema_warmup=True, inv_gamma=1.0, power=0.75)
    gen = torch.Generator().manual_seed(SEED)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    unet.train()
    for step in range(1, spec["max_steps"] + 1):
        idx = torch.randint(0, ds.x.shape[0], (BATCH,), generator=gen)
        x0, y = ds.x[idx], ds.y[idx]
        noise = torch.randn(x0.shape, generator=gen)
        tau = torch.randint(0, 1000, (BATCH,), generator=gen)
        loss = torch.nn.functional.mse_loss(unet(scheduler.add_noise(x0, noise, tau), tau, class_labels=y).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_schedule.step()
        ema.step(unet.parameters())
        wall = time.perf_counter() - start_wall
        if step % spec["every"] == 0 or wall > spec["max_seconds"]:
            shadow = {name: p.detach().clone() for (name, _), p in zip(unet.named_parameters(), ema.shadow_params)}
            save_file({**{k: v.contiguous() for k, v in unet.state_dict().items()}, **shadow}, str(out / f"ema_{step}.safetensors"))
            with open(out / "progress.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "elapsed": wall, "cpu_seconds": time.process_time() - start_cpu,
                                    "loss": float(loss.detach())}) + "\n")
        if wall > spec["max_seconds"]:
            break


def diffusers_samples(weights: Path, num: int, steps: int, labels: torch.Tensor) -> torch.Tensor:
    """DDIM-``steps`` in diffusers' own loop (the ``DDIMPipeline`` steps, with class labels)."""
    from diffusers import DDIMScheduler
    from safetensors.torch import load_file

    unet, _ = recipe_unet()
    unet.load_state_dict(load_file(str(weights)))
    unet.eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="epsilon",
                              clip_sample=False)
    scheduler.set_timesteps(steps)
    x = torch.randn((num, 1, 28, 28), generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps = torch.cat([unet(x[i:i + 256], t, class_labels=labels[i:i + 256]).sample for i in range(0, num, 256)])
            x = scheduler.step(eps, t, x).prev_sample
    return x


# --- scoring ------------------------------------------------------------------------------------------------------
def scorer(num: int):
    from difflab.data import load_dataset
    from difflab.evaluation.evaluate import evaluate_samples
    from difflab.evaluation.features import feature_network

    ds = load_dataset("mnist5k")
    net, info = feature_network("mnist5k", ds.x, ds.y, 10)
    labels = torch.arange(num) % 10

    def score(x: torch.Tensor) -> dict:
        m = evaluate_samples(x.clamp(-1, 1), ds.x, "image", dataset="mnist5k", feature_net=net, sample_labels=labels,
                             reference_labels=ds.y)["metrics"]
        fd = next(v for k, v in m.items() if k.startswith("FD"))
        return {"fd": fd["value"], "fd_floor": fd["noise_floor"], "class_accuracy": m["class_accuracy"]["value"]}

    return score, labels, info


def good(row: dict) -> bool:
    return row["class_accuracy"] >= ACCURACY_TARGET and row["fd"] <= FD_FLOOR_MULTIPLE * row["fd_floor"]


def first_good(rows: list) -> dict | None:
    return next((r for r in rows if good(r)), None)


def run(out: Path, every: int, num: int, steps: int, cap_ratio: float, quick: bool, log=print) -> dict:
    from difflab.checkpoint import list_checkpoints
    from difflab.pipeline import load_run

    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    difflab_dir, diffusers_dir = runs / "difflab", runs / "diffusers"
    env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": f"{REPO / 'src'}:{REPO}",
           "PATH": "/usr/bin:/bin"}
    started = time.perf_counter()
    difflab_cmd = [sys.executable, "-m", "difflab.cli", "train", str(CONFIG), "--out", str(difflab_dir), "--overwrite",
                   "--quiet", "--set", "train.num_threads=1", f"train.checkpoint_every={every}",
                   "train.keep_checkpoints=1000", "train.sample_every=0", f"train.steps={steps}",
                   f"train.log_every={every}"]
    a = subprocess.Popen(difflab_cmd, cwd=REPO, env=env)
    if diffusers_dir.exists():
        for f in diffusers_dir.iterdir():
            f.unlink()
    spec = {"out": str(diffusers_dir), "every": every, "max_steps": 10 ** 6, "max_seconds": 10 ** 9}
    # the diffusers side's cap is known once difflab is done: until then it runs open-ended and is told via a file
    b = subprocess.Popen([sys.executable, "-m", "benchmarks.time_to_good", "--worker", json.dumps(spec)], cwd=REPO, env=env)
    if a.wait() != 0:
        b.kill()
        raise RuntimeError("difflab's training failed")
    records = [json.loads(l) for l in (difflab_dir / "metrics.jsonl").read_text().splitlines() if l.strip()]
    difflab_total = records[-1]["elapsed"]
    cap = cap_ratio * difflab_total
    log(f"difflab trained {steps} steps in {difflab_total:.0f} s; diffusers recipe runs to {cap:.0f} s")
    while b.poll() is None:
        progress = diffusers_dir / "progress.jsonl"
        last = json.loads(progress.read_text().splitlines()[-1]) if progress.exists() and progress.read_text().strip() else None
        if last and last["elapsed"] >= cap:
            b.kill()
            break
        time.sleep(5)
    b.wait()
    train_seconds = time.perf_counter() - started

    score, labels, feature_info = scorer(num)
    by_step = {r["step"]: r for r in records}
    rows = {"difflab": [], "diffusers": []}
    for step in list_checkpoints(difflab_dir):
        pipe = load_run(difflab_dir, which=step)
        x = pipe.sample(num, sampler="ddim", steps=50, seed=SEED, y=labels, progress=False).x
        rows["difflab"].append({"step": step, "elapsed": by_step[step]["elapsed"],
                                "cpu_seconds": by_step[step].get("cpu_seconds"), **score(x)})
        log(f"  difflab step {step}: {rows['difflab'][-1]}")
    for line in (diffusers_dir / "progress.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["elapsed"] > cap:
            continue
        x = diffusers_samples(diffusers_dir / f"ema_{r['step']}.safetensors", num, 50, labels)
        rows["diffusers"].append({"step": r["step"], "elapsed": r["elapsed"], "cpu_seconds": r["cpu_seconds"], **score(x)})
        log(f"  diffusers step {r['step']}: {rows['diffusers'][-1]}")
    unet, params = recipe_unet()
    return {"rows": rows, "difflab_total_seconds": difflab_total, "cap_seconds": cap, "every": every, "num": num,
            "steps": steps, "train_and_wait_seconds": train_seconds, "difflab_parameters": params,
            "diffusers_parameters": sum(p.numel() for p in unet.parameters()),
            "feature_net": {k: feature_info[k] for k in ("held_out_accuracy", "epochs") if k in feature_info},
            "first_good": {side: first_good(r) for side, r in rows.items()}}


def report(res: dict, machine: dict, command: str) -> str:
    lines = ["# Time to a good model on MNIST-5k: difflab vs a diffusers recipe (benchmarks/time_to_good.py)", "",
             __doc__.split("\n\n", 1)[1].split("\n1. ")[0].strip(), "",
             f"Good = class accuracy ≥ {ACCURACY_TARGET} and FD-mnist5k ≤ {FD_FLOOR_MULTIPLE:g} × its floor, "
             f"{res['num']} samples (DDIM-50) per checkpoint. Parameters: difflab {res['difflab_parameters']:,}, "
             f"UNet2DModel {res['diffusers_parameters']:,}. Feature network: {res['feature_net']}.", ""]
    for side, rows in res["rows"].items():
        lines += [f"## {side}", "", "| step | training wall s | training CPU s | FD | floor | FD / floor | class accuracy | good |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['step']} | {r['elapsed']:.0f} | {r['cpu_seconds'] or float('nan'):.0f} | {r['fd']:.4g} | "
                  f"{r['fd_floor']:.4g} | {r['fd'] / r['fd_floor']:.2f} | {r['class_accuracy']:.3f} | "
                  f"{'yes' if good(r) else 'no'} |" for r in rows]
        lines.append("")
    a, b = res["first_good"]["difflab"], res["first_good"]["diffusers"]
    lines += ["## Time to a good model", ""]
    lines.append(f"- difflab: {'step %d, %.0f s' % (a['step'], a['elapsed']) if a else 'not within its %d steps' % res['steps']}")
    lines.append(f"- diffusers recipe: {'step %d, %.0f s' % (b['step'], b['elapsed']) if b else 'not within %.0f s (%g × difflab’s whole run)' % (res['cap_seconds'], res['cap_seconds'] / res['difflab_total_seconds'])}")
    if a and b:
        lines.append(f"- ratio difflab / diffusers: **{a['elapsed'] / b['elapsed']:.2f}** (target ≤ 0.5)")
    elif a:
        lines.append(f"- ratio difflab / diffusers: **< {a['elapsed'] / res['cap_seconds']:.2f}** (target ≤ 0.5)")
    lines += ["", f"Command: `{command}`; machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, 1-min load "
              f"{machine['load_average_1min']:.1f} at the start; both trainings at one torch thread, side by side."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "time_to_good")
    p.add_argument("--every", type=int, default=400, help="checkpoint and score every N steps (default 400)")
    p.add_argument("--num", type=int, default=500, help="samples per checkpoint (default 500)")
    p.add_argument("--steps", type=int, default=2800, help="difflab's training steps (default: the config's 2800)")
    p.add_argument("--cap-ratio", type=float, default=2.0, help="the diffusers side trains to this × difflab's time")
    p.add_argument("--quick", action="store_true", help="a smoke test: 20 steps, 16 samples")
    args = p.parse_args(argv)
    if args.worker:
        diffusers_worker(json.loads(args.worker))
        return 0
    from benchmarks.common import machine_info, write_json

    if args.quick:
        args.every, args.num, args.steps = 10, 20, 20
    machine = machine_info()
    res = run(args.out, args.every, args.num, args.steps, args.cap_ratio, args.quick)
    write_json(args.out / "results.json", {"machine": machine, "quick": args.quick, "result": res})
    command = "python -m benchmarks.time_to_good " + " ".join(argv if argv is not None else sys.argv[1:])
    (args.out / "report.md").write_text(report(res, machine, command))
    print(report(res, machine, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
