"""Multi-scale (Matryoshka) vs pixel diffusion on MNIST-5k at equal training wall time (issue 17's Matryoshka
targets; SPEC §5; difflab.matryoshka).

    python -m benchmarks.matryoshka --mdm RUN --pixel PIXEL_RUN --out benchmarks/results/matryoshka \\
        [--num 1000] [--steps 50] [--clock elapsed|cpu_seconds] [--agreement-num 500] [--threads 1]

``RUN`` is a trained ``configs/mdm_mnist5k.yaml`` run, ``PIXEL_RUN`` a ``configs/mnist5k.yaml`` run with checkpoints
kept along the way (``train.checkpoint_every``). Nothing is trained here:

1. the Matryoshka run is scored at its final checkpoint, the pixel run at the checkpoint whose training time
   (``--clock``: the wall clock ``elapsed`` of ``metrics.jsonl``, as the issue asks, or the process CPU time
   ``cpu_seconds``, which other jobs on a shared machine do not inflate) is closest to it. Both by ``difflab eval``'s
   :func:`~difflab.evaluation.evaluate_run` (DDIM with ``--steps``, ``--num`` class-cycling samples, EMA weights):
   FD-mnist5k with its real-vs-real noise floor and the feature classifier's accuracy on the samples;
2. the two resolutions' agreement (:func:`difflab.matryoshka.agreement`): ``||avgpool(x̂28) − x̂14||`` of
   ``--agreement-num`` joint samples beside the same distance between random pairs.

Writes ``results.json`` and ``report.md`` (the command, both runs' training times on both clocks, the numbers, the
machine and its load) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine_info, training_records, write_json

CLOCKS = ("elapsed", "cpu_seconds")


def closest_checkpoint(run_dir: Path, seconds: float, clock: str) -> tuple[int, dict]:
    """The checkpoint step of ``run_dir`` whose training time on ``clock`` is closest to ``seconds``, and its record."""
    from difflab.checkpoint import list_checkpoints

    records = training_records(run_dir)
    candidates = [(abs(records[s][clock] - seconds), s) for s in list_checkpoints(run_dir)
                  if records.get(s, {}).get(clock) is not None]
    if not candidates:
        raise SystemExit(f"{run_dir} has no checkpoint with a metrics record holding {clock!r} (log_every must divide "
                         "checkpoint_every)")
    step = min(candidates)[1]
    return step, records[step]


def score(run_dir: Path, step: int, num: int, steps: int, seed: int) -> dict:
    """``difflab eval``'s scores of ``run_dir`` at checkpoint ``step``."""
    from difflab.evaluation import evaluate_run

    result = evaluate_run(run_dir, num_samples=num, sampler="ddim", steps=steps, seed=seed, which=step)
    metrics = result["metrics"]
    fd_name = next(k for k in metrics if k.startswith("FD-"))
    return {"step": result["run"]["step"], "fd_name": fd_name, "fd": metrics[fd_name]["value"],
            "fd_floor": metrics[fd_name].get("noise_floor"), "class_accuracy": metrics["class_accuracy"]["value"],
            "reference_accuracy": metrics["class_accuracy"].get("reference_accuracy"),
            "nfe": result["run"]["nfe"], "sample_seconds": result["run"]["sample_seconds"]}


def resolution_agreement(run_dir: Path, num: int, steps: int, seed: int) -> dict:
    """Joint DDIM samples of the Matryoshka run, both resolutions of each, and their agreement."""
    from difflab.matryoshka import agreement
    from difflab.pipeline import load_run

    pipe = load_run(run_dir)
    layout = getattr(pipe.decoder, "layout", None)
    if layout is None:
        raise SystemExit(f"{run_dir} is not a multi-resolution (matryoshka) run")
    joint = pipe.sample(num, sampler="ddim", steps=steps, seed=seed, progress=False, decode=False).x
    high, low = layout.unpack(joint)
    return {"num": num, "sides": [layout.height, layout.low_shape[1]],
            **agreement(high, low / layout.ratio, torch.Generator().manual_seed(seed))}


def run(mdm: Path, pixel: Path, num: int, steps: int, clock: str, agreement_num: int, seed: int = 0, log=print) -> dict:
    mdm_records = training_records(mdm)
    from difflab.checkpoint import load_checkpoint

    mdm_step = load_checkpoint(mdm).step
    mdm_time = mdm_records[mdm_step]
    pixel_step, pixel_time = closest_checkpoint(pixel, mdm_time[clock], clock)
    log(f"matryoshka: step {mdm_step} ({_seconds(mdm_time['elapsed'])} wall, {_seconds(mdm_time.get('cpu_seconds'))} CPU); "
        f"pixel: checkpoint {pixel_step} ({_seconds(pixel_time['elapsed'])} wall, {_seconds(pixel_time.get('cpu_seconds'))} CPU)")
    rows = {}
    for name, run_dir, step, times in (("matryoshka", mdm, mdm_step, mdm_time), ("pixel", pixel, pixel_step, pixel_time)):
        start = time.perf_counter()
        rows[name] = {"run_dir": str(run_dir), "train_elapsed": times["elapsed"], "train_cpu_seconds": times.get("cpu_seconds"),
                      **score(run_dir, step, num, steps, seed)}
        rows[name]["eval_seconds"] = time.perf_counter() - start
        log(f"  {name}: {rows[name]}")
    agree = resolution_agreement(mdm, agreement_num, steps, seed)
    log(f"  agreement: {agree}")
    return {"rows": rows, "agreement": agree, "clock": clock, "num": num, "steps": steps, "seed": seed}


def _seconds(value, unit: str = " s") -> str:
    """``value`` seconds rounded, or "–" where a run's log has no such record (runs from before ``cpu_seconds``)."""
    return "–" if value is None else f"{value:.0f}{unit}"


def report(res: dict, machine: dict, command: str) -> str:
    rows, agree = res["rows"], res["agreement"]
    fd_name = rows["matryoshka"]["fd_name"]
    lines = [
        "# Matryoshka vs pixel diffusion on MNIST-5k at equal training time",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine.get('cpu')}, {machine.get('logical_cpus')} logical CPUs, torch threads "
        f"{machine.get('torch_threads')}, 1-min load {machine.get('load_average_1min')}, {machine.get('time_utc')} UTC.",
        "",
        f"The pixel run's checkpoint is the one closest in training time to the Matryoshka run's final checkpoint on "
        f"the `{res['clock']}` clock (`elapsed`: wall seconds, inflated by other jobs on a shared machine; "
        f"`cpu_seconds`: the training process's CPU time). Scores: `difflab eval` (DDIM, {res['steps']} steps, "
        f"{res['num']} class-cycling samples, EMA weights, seed {res['seed']}); the Matryoshka run is scored at 28×28.",
        "",
        f"| run | checkpoint step | training wall s | training CPU s | {fd_name} | noise floor | class accuracy "
        "| sampling s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} (`{r['run_dir']}`) | {r['step']} | {r['train_elapsed']:.0f} | {_seconds(r['train_cpu_seconds'], '')} "
                     f"| {r['fd']:.4g} | {r['fd_floor']:.4g} | {r['class_accuracy']:.3f} | {r['sample_seconds']:.1f} |")
    reference = rows["matryoshka"].get("reference_accuracy")
    if reference is not None:
        lines += ["", f"The feature classifier's accuracy on the real images (the ceiling): {reference:.3f}."]
    m, p = rows["matryoshka"], rows["pixel"]
    verdict = "at or below" if m["fd"] <= p["fd"] else "above"
    lines += [
        "",
        f"Target (issue 17): the Matryoshka {fd_name} at 28×28 ≤ the pixel model's at equal training time — measured "
        f"{m['fd']:.4g} vs {p['fd']:.4g}: {verdict}.",
        "",
        f"## Agreement of the two resolutions ({agree['num']} joint samples)",
        "",
        f"mean ‖avgpool(x̂{agree['sides'][0]}) − x̂{agree['sides'][1]}‖ = {agree['distance']:.4g}; the same between "
        f"random pairs of samples = {agree['random_pairs']:.4g}; ratio {agree['ratio']:.3g} (1 would mean the two "
        "resolutions of a joint sample agree no better than unrelated samples; the target is far below 1).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mdm", required=True, type=Path, help="a trained configs/mdm_mnist5k.yaml run")
    parser.add_argument("--pixel", required=True, type=Path, help="a configs/mnist5k.yaml run with kept checkpoints")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/matryoshka"))
    parser.add_argument("--num", type=int, default=1000, help="samples per evaluation (default: 1000, as difflab eval)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (default: 50)")
    parser.add_argument("--clock", choices=CLOCKS, default="elapsed", help="training time to match (default: elapsed)")
    parser.add_argument("--agreement-num", type=int, default=500, help="joint samples for the agreement (default: 500)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    command = "python -m benchmarks.matryoshka " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    res = run(args.mdm, args.pixel, args.num, args.steps, args.clock, args.agreement_num)
    machine = machine_info()
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {"machine": machine, "command": command, **res})
    (args.out / "report.md").write_text(report(res, machine, command))
    print(f"wrote {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
