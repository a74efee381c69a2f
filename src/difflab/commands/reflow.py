"""``difflab reflow RUN_DIR --out NEW_RUN_DIR``: one round of reflow on a trained rectified flow (SPEC §6).

The run's probability-flow ODE (Heun, ``--pair-steps`` steps) maps ``--pairs`` standard-normal draws ``ε`` to
``x̂0``; a copy of the run's network is retrained for ``--steps`` AdamW steps as a velocity model on the linear
path with those fixed pairs (:func:`difflab.reflow.reflow`). The new run directory holds a checkpoint and
``config.yaml`` (``diffusion.path: linear``, ``target: velocity``, the same network) that ``difflab sample``
loads like any trained run; its metadata records the source run and the measurements.

Printed before/after: Liu et al.'s straightness ``S`` (0 for straight paths at constant speed) and the sliced W2
to held-out data of 1- and 2-step Euler samples (:func:`difflab.flows.few_step_sw2`).
"""

from __future__ import annotations

import argparse

from difflab.commands import arguments

EXAMPLES = """
examples:
  difflab reflow runs/moons-flow --out runs/moons-reflow
  difflab reflow runs/moons-flow --out runs/moons-reflow --pairs 20000 --steps 3000
  difflab sample runs/moons-reflow --sampler euler --steps 1 --num 2000 --out one-step.png
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a trained run on the linear path (difflab train)")
    p.add_argument("--out", required=True, metavar="NEW_RUN_DIR", help="where the reflowed run is written")
    p.add_argument("--pairs", type=arguments.count, default=10000, help="(noise, sample) pairs from the run's ODE (default: 10000)")
    p.add_argument("--steps", type=arguments.training_steps, default=2000, help="training steps on the pairs (default: 2000)")
    p.add_argument("--pair-steps", type=arguments.steps, default=50, help="Heun steps of the ODE making the pairs (default: 50)")
    p.add_argument("--lr", type=arguments.positive_float, default=1e-3, help="AdamW learning rate (default: 1e-3)")
    p.add_argument("--batch-size", type=arguments.count, default=256, help="training batch size (default: 256)")
    p.add_argument("--eval-num", type=arguments.count, default=1000, help="noise draws for the measurements (default: 1000)")
    p.add_argument("--seed", type=arguments.seed, default=0, help="random seed (default: 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in NEW_RUN_DIR")
    p.add_argument("--no-ema", action="store_true", help="start from the raw weights instead of the EMA weights")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="your copy of the run's data, for runs trained on your own files (a run's stored path is never read)")
    p.add_argument("--device", type=arguments.device, default=None, help="cpu, cuda, ... (default: cuda if available)")


def run(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    import torch

    from difflab.checkpoint import load_checkpoint, save_checkpoint
    from difflab.commands.nll import held_out_data
    from difflab.config import RunConfig, save_config
    from difflab.pipeline import load_run
    from difflab.reflow import reflow
    from difflab.samplers.ode import sample_heun
    from difflab.engine.rundir import CONFIG_FILE, RunDir

    for name in ("pairs", "steps", "pair_steps", "batch_size", "eval_num"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_num > args.pairs:
        raise ValueError(f"--eval-num ({args.eval_num}) cannot exceed --pairs ({args.pairs})")
    out = Path(args.out)
    if Path(args.run_dir).resolve() == out.resolve():
        raise ValueError("--out must be a new run directory, not RUN_DIR itself")
    out_dir = RunDir(out)
    if out_dir.holds_run() and not args.overwrite:
        raise ValueError(f"{str(out)!r} already holds a run: pass --overwrite to replace it")
    pipe = load_run(args.run_dir, ema=not args.no_ema, device=args.device)
    cfg = pipe.config
    if cfg.diffusion.path != "linear":
        raise ValueError(f"reflow straightens a rectified flow: RUN_DIR must be trained on the linear path "
                         f"(diffusion.path: linear), not {cfg.diffusion.path!r}")
    source_meta = load_checkpoint(args.run_dir, map_location="cpu").meta
    reference, _, _ = held_out_data(cfg, args.eval_num, args.seed, args.data)
    generator = torch.Generator().manual_seed(args.seed)
    cond = {} if not pipe.num_classes else {"y": pipe.labels(args.pairs).to(pipe.device)}
    result = reflow(pipe.net, pipe.denoiser, pipe.data_shape, args.pairs, args.steps, pair_steps=args.pair_steps,
                    sampler=sample_heun, lr=args.lr, batch_size=args.batch_size, reference=reference,
                    eval_num=args.eval_num, generator=generator, **cond)

    new_cfg = RunConfig.from_dict(cfg.to_dict())
    new_cfg.diffusion = dataclasses.replace(new_cfg.diffusion, target="velocity", coupling="none", weighting="none")
    new_cfg.validate()
    meta = {key: source_meta[key] for key in ("data_shape", "num_classes", "data_kind") if key in source_meta}
    meta["reflow"] = {"source": str(args.run_dir), "pairs": args.pairs, "steps": args.steps,
                      "pair_steps": args.pair_steps, "seed": args.seed, "measurements": result.measurements}
    out_dir.lock()  # the new run is complete before the old one (only what difflab wrote) is removed
    try:
        if args.overwrite:
            out_dir.clear()
        save_config(new_cfg, out / CONFIG_FILE)
        save_checkpoint(out, args.steps, new_cfg, result.net.state_dict(), meta=meta)
    finally:
        out_dir.unlock()

    print(f"difflab: reflow of {args.run_dir} on {args.pairs} pairs, {args.steps} steps -> {out}")
    m = result.measurements
    few = sorted(m["before"]["sw2"])
    print("           straightness  " + "  ".join(f"sW2 {k}-step" for k in few))
    for name in ("before", "after"):
        print(f"  {name:<7}  {m[name]['straightness']:12.4f}  "
              + "  ".join(f"{m[name]['sw2'][k]:10.4f}" for k in few))
    return 0
