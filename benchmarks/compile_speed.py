"""What ``torch.compile`` buys: ``train.compile: true`` and ``difflab sample --compile`` against eager.

    python -m benchmarks.compile_speed [--quick] [--repeats N] [--out benchmarks/results]

For the U-Nets of ``configs/digits8.yaml`` and ``configs/mnist5k.yaml`` (their own batch sizes, conditional as
configured), at 1 and 2 torch threads, each measurement in its own subprocess (a fresh compile cache, its own
thread setting): ``difflab train`` for ``steps`` steps through the engine — the throughput is the mean of the
``samples_per_s`` the engine logs after the first windows (which hold the compile) — then ``load_run`` of that
run and a timed ``Pipeline.sample`` (DDIM, ``nfe`` steps) after one warm-up call that compiles. Eager and
compiled runs alternate (eager, compiled, eager, compiled, …) and the best of the repeats is kept, since the
machine is shared; the compile time (first-call overhead) is reported separately. Nothing asserts on a time.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"digits8": "digits8.yaml", "mnist5k": "mnist5k.yaml"}


def worker(spec: dict) -> dict:
    """One measurement in this process: train ``spec['steps']`` steps, then sample; returns the timings."""
    import torch

    torch.set_num_threads(spec["threads"])
    from difflab.config import load_config
    from difflab.pipeline import load_run
    from difflab.training import train

    overrides = [f"train.steps={spec['steps']}", f"train.log_every={spec['log_every']}", "train.sample_every=0",
                 "train.checkpoint_every=0", f"train.num_threads={spec['threads']}",
                 f"train.compile={'true' if spec['compile'] else 'false'}"]
    cfg = load_config(REPO / "configs" / CONFIGS[spec["model"]], overrides)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        start = time.perf_counter()
        train(cfg, run_dir, overwrite=True, progress=False)
        train_seconds = time.perf_counter() - start
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rates = [r["samples_per_s"] for r in records if "samples_per_s" in r]
        first_window = records[0]["elapsed"] if records else float("nan")
        steady = rates[spec["skip_windows"]:]
        pipe = load_run(run_dir, compile=spec["compile"])
        num, nfe = spec["num"], spec["nfe"]
        start = time.perf_counter()
        pipe.sample(num, sampler="ddim", steps=nfe, seed=0, progress=False)
        first_sample = time.perf_counter() - start
        start = time.perf_counter()
        pipe.sample(num, sampler="ddim", steps=nfe, seed=1, progress=False)
        sample_seconds = time.perf_counter() - start
    return {"train_samples_per_s": sum(steady) / len(steady), "first_window_seconds": first_window,
            "train_seconds": train_seconds, "sample_seconds": sample_seconds,
            "sample_compile_overhead_seconds": first_sample - sample_seconds, "windows": rates}


def _measure(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.compile_speed", "--worker", json.dumps(spec)],
                          cwd=REPO, capture_output=True, text=True, env=_env(spec["threads"]))
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _env(threads: int) -> dict:
    import os

    env = dict(os.environ)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "src"))
    return env


def run(quick: bool = False, log=print, repeats: int = 0) -> dict:
    steps = {"digits8": 60 if quick else 150, "mnist5k": 30 if quick else 60}
    repeats = repeats or (1 if quick else 2)
    result = {"repeats": repeats, "kept": "best of the repeats (highest throughput, least sampling time)",
              "sampler": "ddim", "models": {}}
    for model in CONFIGS:
        for threads in (1, 2):
            rows = {False: [], True: []}
            for repeat in range(repeats):
                for compiled in (False, True):
                    spec = {"model": model, "threads": threads, "compile": compiled, "steps": steps[model],
                            "log_every": 10, "skip_windows": 2, "num": 256, "nfe": 10}
                    rows[compiled].append(_measure(spec))
                    log(f"  {model} threads={threads} compile={compiled} repeat {repeat}: "
                        f"{rows[compiled][-1]['train_samples_per_s']:.1f} samples/s, "
                        f"sampling {rows[compiled][-1]['sample_seconds']:.2f} s")
            best = {c: {"train_samples_per_s": max(r["train_samples_per_s"] for r in rows[c]),
                        "sample_seconds": min(r["sample_seconds"] for r in rows[c]),
                        "first_window_seconds": min(r["first_window_seconds"] for r in rows[c]),
                        "sample_compile_overhead_seconds": min(r["sample_compile_overhead_seconds"] for r in rows[c])}
                    for c in rows}
            result["models"].setdefault(model, {})[str(threads)] = {
                "eager": best[False], "compiled": best[True], "all": {str(c): rows[c] for c in rows},
                "train_speedup": best[True]["train_samples_per_s"] / best[False]["train_samples_per_s"],
                "sample_speedup": best[False]["sample_seconds"] / best[True]["sample_seconds"],
                "steps": steps[model]}
    return result


def markdown(result: dict) -> str:
    lines = ["| model | threads | train samples/s eager → compiled | speed-up | sampling s (256 × DDIM-10) eager → "
             "compiled | speed-up | first-window s eager / compiled | sampling compile overhead s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for model, by_threads in result["models"].items():
        for threads, row in by_threads.items():
            e, c = row["eager"], row["compiled"]
            lines.append(f"| {model} | {threads} | {e['train_samples_per_s']:.1f} → {c['train_samples_per_s']:.1f} | "
                         f"{row['train_speedup']:.2f}× | {e['sample_seconds']:.2f} → {c['sample_seconds']:.2f} | "
                         f"{row['sample_speedup']:.2f}× | {e['first_window_seconds']:.1f} / "
                         f"{c['first_window_seconds']:.1f} | {c['sample_compile_overhead_seconds']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=0, help="eager/compiled pairs per setting (default 2; 1 with --quick)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0
    from benchmarks.common import machine_info, write_json

    start = time.perf_counter()
    result = run(args.quick, repeats=args.repeats)
    write_json(args.out / "compile_speed.json", {"machine": machine_info(), "quick": args.quick,
                                                  "seconds": time.perf_counter() - start, "result": result})
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
