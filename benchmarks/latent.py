"""Latent vs pixel diffusion on MNIST-5k, side by side in one run (issue 16's targets; SPEC §5).

    python -m benchmarks.latent --out benchmarks/results/latent [--threads 1] [--kl-steps 300]
        [--ae-steps N] [--ldm-steps N] [--pixel-steps N] [--num 1000] [--sample-steps 50]

Stages, each timed on the wall clock (the machine's load is recorded: it is shared):

1. the KL-weight sweep: ``configs/ae_mnist5k.yaml`` for ``--kl-steps`` steps at each of 1e-6, 1e-4, 1e-3, 1e-2
   (perceptual term off, to keep it short), each scored by ``eval-autoencoder``;
2. the autoencoder ``configs/ae_mnist5k.yaml`` and its held-out evaluation (reconstruction MSE/PSNR, class
   accuracy of reconstructions vs originals, FD of reconstructions vs its floor);
3. the latent model ``configs/ldm_mnist5k.yaml`` on it, then the pixel model ``configs/mnist5k.yaml``, each
   scored by ``difflab eval``'s :func:`~difflab.evaluation.evaluate_run` (DDIM, ``--sample-steps``; the latent
   model's sampling time includes the decoder).

``--*-steps`` shorten the configs' budgets (a shortened run is labelled so in the table); the pixel model's
training time at its full budget is then also given as the measured seconds per step times its configured steps.
Writes ``results.json``, ``report.md`` and the pictures into ``--out``; runs go to ``--out/runs``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Optional

import torch

from benchmarks.common import machine_info, training_records, write_json

ROOT = Path(__file__).resolve().parents[1]
KL_WEIGHTS = ("1e-6", "1e-4", "1e-3", "1e-2")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _steps(override, key="train.steps"):
    return [f"{key}={override}"] if override else []


def autoencoder_stage(out: Path, name: str, overrides: list) -> dict:
    from difflab.commands.autoencoder import evaluate_autoencoder, train_autoencoder
    from difflab.config import load_config

    cfg = load_config(ROOT / "configs" / "ae_mnist5k.yaml", overrides)
    run_dir = out / "runs" / name
    objective, seconds = _timed(lambda: train_autoencoder(cfg, run_dir, overwrite=True, progress=False))
    result = evaluate_autoencoder(run_dir, out / f"{name}_reconstructions.png")
    return {**result, "train_seconds": seconds, "steps": cfg.train.steps, "kl_weight": cfg.autoencoder.kl_weight,
            "final_kl": objective.final_meta["final"].get("kl"), "run_dir": str(run_dir)}


def diffusion_stage(out: Path, name: str, config: str, overrides: list, num: int, sample_steps: int) -> dict:
    """Train ``configs/<config>`` (with ``overrides``) into ``out/runs/<name>``, then :func:`score_diffusion_run`."""
    from difflab.config import load_config
    from difflab.training import train

    cfg = load_config(ROOT / "configs" / config, [*overrides, "train.sample_every=0"])
    run_dir = out / "runs" / name
    _, seconds = _timed(lambda: train(cfg, run_dir, overwrite=True, progress=False))
    configured = load_config(ROOT / "configs" / config).train.steps
    return score_diffusion_run(out, name, run_dir, num, sample_steps, {"train_seconds": seconds}, configured)


def _logged_times(run_dir: Path) -> dict:
    """A run's training wall and process-CPU seconds at its last record (:func:`benchmarks.common.training_records`)."""
    records = training_records(run_dir)
    last = records[max(records)]
    return {"train_seconds": last["elapsed"], "cpu_seconds": last.get("cpu_seconds"),
            "cpu_seconds_estimated": bool(last.get("cpu_estimated"))}


def existing_diffusion_stage(out: Path, name: str, run_dir: Path, num: int, sample_steps: int) -> dict:
    """A diffusion run already trained (``--pixel-run``/``--ldm-run``): its logged training times, then scored
    exactly as :func:`diffusion_stage` scores the runs it trains."""
    return {**score_diffusion_run(out, name, run_dir, num, sample_steps, _logged_times(run_dir)),
            "trained_elsewhere": True}


def score_diffusion_run(out: Path, name: str, run_dir: Path, num: int, sample_steps: int, times: dict,
                        configured_steps: Optional[int] = None) -> dict:
    """``difflab eval``'s scores of ``run_dir`` (``num`` samples, ``sample_steps`` NFE), a grid of 100 samples in
    ``out/<name>_samples.png``, and the training ``times`` with the estimate at the configured budget."""
    from difflab.evaluation import evaluate_run
    from difflab.pipeline import load_run
    from difflab.plotting import save_image_grid

    pipe = load_run(run_dir)
    configured = configured_steps or pipe.config.train.steps
    result = evaluate_run(run_dir, num_samples=num, steps=sample_steps, seed=0)
    save_image_grid(pipe.sample(100, steps=sample_steps, progress=False).x, out / f"{name}_samples.png", nrow=10)
    return {**times, "steps": pipe.step, "configured_steps": configured,
            "full_budget_seconds_estimate": times["train_seconds"] / pipe.step * configured,
            "sample_seconds": result["run"]["sample_seconds"], "num_samples": num, "nfe": result["run"]["nfe"],
            "metrics": {k: {"value": v["value"], "noise_floor": v.get("noise_floor")} for k, v in result["metrics"].items()},
            "reference_accuracy": result["metrics"].get("class_accuracy", {}).get("reference_accuracy"),
            "run_dir": str(run_dir)}


def existing_autoencoder_stage(out: Path, run_dir: Path) -> dict:
    """An autoencoder run already trained (``--ae-run``): its logged times and ``eval-autoencoder``'s measurements."""
    from difflab.commands.autoencoder import evaluate_autoencoder
    from difflab.latent import load_autoencoder

    ae = load_autoencoder(run_dir)
    result = evaluate_autoencoder(run_dir, out / "ae_mnist5k_reconstructions.png")
    return {**result, **_logged_times(run_dir), "steps": ae.config.train.steps,
            "kl_weight": ae.config.autoencoder.kl_weight, "run_dir": str(run_dir), "trained_elsewhere": True}


def within_noise(lat: dict, pix: dict) -> list:
    """Latent vs pixel per metric: FD-like (lower is better) is within noise when ``latent ≤ pixel + floor`` (the
    real-vs-real value at the same n); a fraction (higher is better) when ``latent ≥ pixel − 2·SE``, SE the binomial
    standard error of the pixel model's value at its n."""
    rows = []
    for name, e in lat["metrics"].items():
        p = pix["metrics"].get(name)
        if p is None or e["value"] is None or p["value"] is None:
            continue
        if name.startswith(("FD", "KID")):
            floor = abs(p["noise_floor"] or 0.0)
            rows.append((name, e["value"], p["value"], f"≤ pixel + {floor:.3g}", e["value"] <= p["value"] + floor))
        elif name in ("class_accuracy", "precision", "recall"):
            se = (max(p["value"] * (1 - p["value"]), 0.0) / pix["num_samples"]) ** 0.5
            rows.append((name, e["value"], p["value"], f"≥ pixel − {2 * se:.3f} (2 SE)", e["value"] >= p["value"] - 2 * se))
    return rows


def pairs_stage(out: Path, threads: list, ae_steps: int, ldm_steps: int, num: int, sample_steps: int,
                scale: float = 3.0) -> dict:
    """The two-digit canvas: an autoencoder and a prompt LDM (configs/ldm_mnist_pairs.yaml) on ``mnist_pairs``; then
    ``num`` samples at CFG λ = ``scale`` for random prompts "a then b", each half classified by the mnist5k feature
    network, and the same noise with the prompt swapped ("b then a")."""
    from difflab.commands.autoencoder import train_autoencoder
    from difflab.config import load_config
    from difflab.data import load_dataset
    from difflab.evaluation.features import feature_network
    from difflab.pipeline import load_run
    from difflab.plotting import save_image_grid
    from difflab.training import train

    ae_dir, ldm_dir = out / "runs" / "ae_mnist_pairs", out / "runs" / "ldm_mnist_pairs"
    ae_cfg = load_config(ROOT / "configs" / "ae_mnist5k.yaml", [*threads, "data.name=mnist_pairs", *_steps(ae_steps)])
    _, ae_seconds = _timed(lambda: train_autoencoder(ae_cfg, ae_dir, overwrite=True, progress=False))
    cfg = load_config(ROOT / "configs" / "ldm_mnist_pairs.yaml",
                      [*threads, f"data.autoencoder={ae_dir}", "train.sample_every=0", *_steps(ldm_steps)])
    _, ldm_seconds = _timed(lambda: train(cfg, ldm_dir, overwrite=True, progress=False))
    digits = load_dataset("mnist5k")
    net, _ = feature_network("mnist5k", digits.x, digits.y, 10)
    pipe = load_run(ldm_dir)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 10, (num,), generator=g), torch.randint(0, 10, (num,), generator=g)
    start = time.perf_counter()
    x = pipe.sample(num, steps=sample_steps, y=10 * a + b, guidance_scale=scale, progress=False).x
    swapped = pipe.sample(num, steps=sample_steps, y=10 * b + a, guidance_scale=scale, progress=False).x
    sample_seconds = time.perf_counter() - start
    left, right = net.predict(x[..., :28]), net.predict(x[..., 28:])
    s_left, s_right = net.predict(swapped[..., :28]), net.predict(swapped[..., 28:])
    save_image_grid(torch.cat([x[:10], swapped[:10]]), out / "pairs_prompt_and_swapped.png", nrow=10)
    differ = a != b
    return {"ae_steps": ae_cfg.train.steps, "ae_seconds": ae_seconds, "ldm_steps": cfg.train.steps,
            "ldm_seconds": ldm_seconds, "num": num, "guidance_scale": scale, "sample_steps": sample_steps,
            "sample_seconds": sample_seconds,
            "left_accuracy": float((left == a).double().mean()), "right_accuracy": float((right == b).double().mean()),
            "both_accuracy": float(((left == a) & (right == b)).double().mean()),
            "swapped_left_accuracy": float((s_left == b).double().mean()),
            "swapped_right_accuracy": float((s_right == a).double().mean()),
            "swap_swaps_digits": float(((s_left == right) & (s_right == left))[differ].double().mean())}


def report(res: dict) -> str:
    lines = ["# Latent vs pixel diffusion on MNIST-5k (benchmarks/latent.py)", "",
             f"Machine: {res['machine']['cpu']}, {res['machine']['logical_cpus']} logical CPUs shared with other jobs "
             f"(1-min load average {res['machine']['load_average_1min']:.1f} at the start), torch threads "
             f"{res['threads']}. Wall times are on that shared machine."]
    if res["kl_sweep"]:
        lines += ["", "## KL weight sweep (autoencoder, perceptual term off, same steps each)", "",
                  "| kl_weight | steps | MSE | PSNR dB | acc(rec)/acc(orig) | FD / floor | scale factor | train s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in res["kl_sweep"]:
        lines.append(f"| {r['kl_weight']:g} | {r['steps']} | {r['mse']:.4f} | {r['psnr_db']:.2f} | "
                     f"{r['class_accuracy_ratio']:.4f} | {r['fd']:.3g} / {r['fd_floor']:.3g} | {r['scale_factor']:.4g} | "
                     f"{r['train_seconds']:.0f} |")
    ae = res.get("autoencoder")
    if ae:
        lines += ["", "## Autoencoder (configs/ae_mnist5k.yaml), held-out images", "",
                  "| metric | value | target |", "| --- | --- | --- |",
                  f"| reconstruction MSE | {ae['mse']:.5f} | — |", f"| PSNR | {ae['psnr_db']:.2f} dB | reported |",
                  f"| class accuracy, reconstructions / originals | {ae['class_accuracy_reconstructions']:.4f} / "
                  f"{ae['class_accuracy_originals']:.4f} = {ae['class_accuracy_ratio']:.4f} | ≥ 0.98 |",
                  f"| FD-mnist5k of reconstructions / floor | {ae['fd']:.4g} / {ae['fd_floor']:.4g} = "
                  f"{ae['fd_over_floor']:.2f} | ≤ 2 |",
                  f"| scale factor (1/std of latents) | {ae['scale_factor']:.5g} | — |",
                  f"| training | {ae['steps']} steps, {ae['train_seconds']:.0f} s | — |"]
    models = [(k, res[k]) for k in ("latent", "pixel") if k in res]
    if models:
        names = sorted({m for _, r in models for m in r["metrics"]})
        lines += ["", "## Latent vs pixel (DDIM, FD etc. in the mnist5k classifier's feature space)", "",
                  "| | " + " | ".join(k for k, _ in models) + " |", "| --- |" + " --- |" * len(models)]
        for m in names:
            cells = []
            for _, r in models:
                e = r["metrics"].get(m)
                cells.append("—" if e is None else f"{e['value']:.4g}" +
                             (f" (floor {e['noise_floor']:.4g})" if e.get("noise_floor") is not None else ""))
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
        rows = {"training steps (configured)": lambda r: f"{r['steps']} ({r['configured_steps']})",
                "training wall time, s": lambda r: f"{r['train_seconds']:.0f}",
                "training CPU time, s (one thread: unaffected by other jobs)":
                    lambda r: "—" if r.get("cpu_seconds") is None else f"{r['cpu_seconds']:.0f}"
                    + (" (partly estimated: the run logged CPU time from a resume on)" if r.get("cpu_seconds_estimated") else ""),
                "training wall time at the configured steps, s (measured s/step × steps)":
                    lambda r: f"{r['full_budget_seconds_estimate']:.0f}",
                "sampling wall time, s": lambda r: f"{r['sample_seconds']:.1f} ({r['num_samples']} samples, {r['nfe']} NFE)"}
        for label, fn in rows.items():
            lines.append(f"| {label} | " + " | ".join(fn(r) for _, r in models) + " |")
        if "latent" in res and "pixel" in res:
            lines += ["", "Within the pixel model's noise:", "", "| metric | latent | pixel | criterion | within |",
                      "| --- | --- | --- | --- | --- |"]
            lines += [f"| {n} | {a:.4g} | {b:.4g} | {c} | {'yes' if ok else 'no'} |"
                      for n, a, b, c, ok in within_noise(res["latent"], res["pixel"])]
        if "latent" in res and "pixel" in res and ae:
            lat, pix = res["latent"], res["pixel"]
            total = ae["train_seconds"] + lat["full_budget_seconds_estimate"]
            if all(r.get("cpu_seconds") for r in (lat, pix, ae)):
                cpu_total = ae["cpu_seconds"] + lat["cpu_seconds"]
                lines += ["", f"- training CPU time, pixel / (autoencoder + latent): {pix['cpu_seconds']:.0f} / "
                              f"{cpu_total:.0f} = **{pix['cpu_seconds'] / cpu_total:.2f}×** (target ≥ 3×; one thread "
                              "each, so CPU time is the training cost whatever else ran on the machine)"]
            lines += ["", f"- training time, pixel / (autoencoder + latent), at the configured budgets: "
                          f"{pix['full_budget_seconds_estimate']:.0f} / {total:.0f} = "
                          f"**{pix['full_budget_seconds_estimate'] / total:.2f}×** (target ≥ 3×)",
                      f"- sampling time, pixel / latent (decoder included): {pix['sample_seconds']:.1f} / "
                      f"{lat['sample_seconds']:.1f} = **{pix['sample_seconds'] / lat['sample_seconds']:.2f}×** "
                      "(target ≥ 3×)"]
    pr = res.get("pairs")
    if pr:
        lines += ["", "## Two-digit canvas, prompts by cross-attention (configs/ldm_mnist_pairs.yaml)", "",
                  f"Autoencoder {pr['ae_steps']} steps ({pr['ae_seconds']:.0f} s), prompt LDM {pr['ldm_steps']} steps "
                  f"({pr['ldm_seconds']:.0f} s); {pr['num']} random prompts \"a then b\" at λ = {pr['guidance_scale']:g}, "
                  f"DDIM {pr['sample_steps']} steps; halves classified by the mnist5k feature network.", "",
                  "| measure | value | target |", "| --- | --- | --- |",
                  f"| left half = a | {pr['left_accuracy']:.3f} | ≥ 0.90 |",
                  f"| right half = b | {pr['right_accuracy']:.3f} | ≥ 0.90 |",
                  f"| both halves | {pr['both_accuracy']:.3f} | — |",
                  f"| prompt \"b then a\", same noise: left = b / right = a | {pr['swapped_left_accuracy']:.3f} / "
                  f"{pr['swapped_right_accuracy']:.3f} | ≥ 0.90 |",
                  f"| swapping the prompt swaps the classified digits (a ≠ b) | {pr['swap_swaps_digits']:.3f} | — |"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "latent")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kl-steps", type=int, default=300, help="steps of each KL-sweep autoencoder (0: no sweep)")
    p.add_argument("--ae-steps", type=int, default=0, help="autoencoder steps (0: the config's)")
    p.add_argument("--ldm-steps", type=int, default=0, help="latent model steps (0: the config's)")
    p.add_argument("--pixel-steps", type=int, default=0, help="pixel model steps (0: the config's; -1: skip it)")
    p.add_argument("--pixel-run", type=Path, default=None,
                   help="score this run (trained with configs/mnist5k.yaml) as the pixel model instead of training one")
    p.add_argument("--ae-run", type=Path, default=None, help="use this autoencoder run (configs/ae_mnist5k.yaml)")
    p.add_argument("--ldm-run", type=Path, default=None,
                   help="score this latent run (configs/ldm_mnist5k.yaml on --ae-run) instead of training one")
    p.add_argument("--num", type=int, default=1000, help="samples per model for the metrics")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--only-pairs", action="store_true", help="run only the two-digit canvas stage")
    p.add_argument("--pairs-ae-steps", type=int, default=0, help="two-digit autoencoder steps (0: the config's)")
    p.add_argument("--pairs-steps", type=int, default=-1, help="prompt LDM steps (0: the config's; -1: skip the stage)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    threads = [f"train.num_threads={args.threads}", "train.device=cpu"]
    res = {"machine": machine_info(), "threads": args.threads, "args": {k: str(v) for k, v in vars(args).items()},
           "kl_sweep": []}

    def save():
        write_json(out / "results.json", res)
        (out / "report.md").write_text(report(res))

    if args.only_pairs:
        res["pairs"] = pairs_stage(out, threads, args.pairs_ae_steps, args.pairs_steps, args.num, args.sample_steps)
        save()
        print(report(res))
        return 0
    earlier = out / "results.json"
    if not args.kl_steps and earlier.exists():  # keep an earlier run's sweep (its rows say how many steps)
        res["kl_sweep"] = json.loads(earlier.read_text()).get("kl_sweep", [])
    if args.kl_steps:
        for kl in KL_WEIGHTS:
            res["kl_sweep"].append(autoencoder_stage(out, f"ae_kl{kl}", [*threads, f"train.steps={args.kl_steps}",
                                                                          f"autoencoder.kl_weight={kl}",
                                                                          "autoencoder.perceptual_weight=0"]))
            save()
    if args.ae_run is not None:
        res["autoencoder"] = existing_autoencoder_stage(out, args.ae_run)
    else:
        res["autoencoder"] = autoencoder_stage(out, "ae_mnist5k", [*threads, *_steps(args.ae_steps)])
    save()
    ae_dir = res["autoencoder"]["run_dir"]
    if args.ldm_run is not None:
        res["latent"] = existing_diffusion_stage(out, "ldm_mnist5k", args.ldm_run, args.num, args.sample_steps)
    else:
        res["latent"] = diffusion_stage(out, "ldm_mnist5k", "ldm_mnist5k.yaml",
                                        [*threads, f"data.autoencoder={ae_dir}", *_steps(args.ldm_steps)],
                                        args.num, args.sample_steps)
    save()
    if args.pixel_run is not None:
        res["pixel"] = existing_diffusion_stage(out, "pixel_mnist5k", args.pixel_run, args.num, args.sample_steps)
        save()
    elif args.pixel_steps >= 0:
        res["pixel"] = diffusion_stage(out, "pixel_mnist5k", "mnist5k.yaml", [*threads, *_steps(args.pixel_steps)],
                                       args.num, args.sample_steps)
        save()
    if args.pairs_steps >= 0:
        res["pairs"] = pairs_stage(out, threads, args.pairs_ae_steps, args.pairs_steps, args.num, args.sample_steps)
        save()
    print(report(res))
    print(json.dumps({"wrote": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
