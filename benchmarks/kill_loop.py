"""Kill loop: SIGKILL ``difflab train`` (or ``train-classifier``) at random moments, resume, and check every state
left on disk against an uninterrupted run, bit for bit.

For each objective: an uninterrupted reference run of ``--steps`` steps keeps every checkpoint
(``checkpoint_every: 1``). Then one run directory is started, killed after a random delay (uniform on
``[0, --max-delay]`` seconds after the process starts, so some kills land during start-up), restarted with
``--resume`` (``--overwrite`` when it was killed before its first checkpoint), and so on ``--kills`` times, then
resumed to the end (a start-up takes seconds, so some kills land before the restarted process trains at all:
``kills_after_training_progress`` counts the others). After every kill it records the latest checkpoint's step, whether that checkpoint's tensors
(model, EMA, optimiser) equal the reference's at the same step, whether the ``metrics.jsonl`` records up to it
equal the reference's, and what else was left on disk (temp files, a stale lock, a partial metrics line). At the
end the finished run must equal the reference (every tensor and every logged value but the timings).

    python -m benchmarks.kill_loop --kind diffusion classifier --kills 20 --out /tmp/kill_loop

Writes ``OUT/kill_loop.json`` and prints a summary table.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny2d.yaml"
COMMON = ["train.checkpoint_every=1", "train.log_every=1", "train.num_threads=1"]
CLASSIFIER = ["classifier.width=16", "classifier.time_dim=16", "classifier.batch_size=32", "classifier.log_every=1"]
TIMINGS = ("samples_per_s", "elapsed")


def command(kind: str, run_dir: Path, steps: int, keep: int, flag: list) -> list:
    sub, extra, key = ("train", [], "train.steps") if kind == "diffusion" else \
        ("train-classifier", CLASSIFIER, "classifier.steps")
    return [sys.executable, "-m", "difflab.cli", sub, str(TINY), "--out", str(run_dir), "--quiet", *flag,
            "--set", *COMMON, *extra, f"{key}={steps}", f"train.keep_checkpoints={keep}"]


def tensors_at(run_dir: Path, step: int) -> dict:
    from difflab.checkpoint import load_checkpoint, read_verified

    _, tensors = read_verified(load_checkpoint(run_dir, step).file, "difflab-checkpoint", "checkpoint")
    return tensors


def metrics(run_dir: Path, upto: int) -> list:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n") if path.exists() else []
    records = [json.loads(line) for line in lines[:-1] if line.strip()]  # complete lines only
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records if r["step"] <= upto]


def same(a: dict, b: dict) -> bool:
    import torch

    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def leftovers(run_dir: Path) -> dict:
    lock = run_dir / ".difflab.lock"
    text = (run_dir / "metrics.jsonl").read_bytes() if (run_dir / "metrics.jsonl").exists() else b""
    return {"temp_files": len(list(run_dir.rglob(".*.tmp"))),
            "stale_lock": lock.exists() and lock.read_text().strip() != "",
            "partial_metrics_line": bool(text) and not text.endswith(b"\n"),
            "checkpoints": len(list((run_dir / "checkpoints").glob("step_*.json"))) if (run_dir / "checkpoints").exists() else 0}


def kill_loop(kind: str, out: Path, kills: int, steps: int, max_delay: float, seed: int) -> dict:
    from difflab.checkpoint import has_checkpoint, load_checkpoint

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    reference, run_dir = out / f"{kind}-reference", out / f"{kind}-killed"
    for d in (reference, run_dir):
        shutil.rmtree(d, ignore_errors=True)
    subprocess.run(command(kind, reference, steps, steps + 1, []), env=env, check=True)
    rng = random.Random(seed)
    events, previous = [], 0
    for i in range(kills):
        flag = ["--resume"] if has_checkpoint(run_dir) else (["--overwrite"] if run_dir.exists() else [])
        proc = subprocess.Popen(command(kind, run_dir, steps, 2, flag), env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE)
        delay = rng.uniform(0.0, max_delay)
        time.sleep(delay)
        finished = proc.poll() is not None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        error = proc.stderr.read().decode().strip()
        event = {"kill": i + 1, "delay_s": round(delay, 3), "started_with": " ".join(flag) or "(fresh)",
                 "finished_before_kill": finished, "error": error if proc.returncode not in (0, -9) else "",
                 **leftovers(run_dir)}
        if has_checkpoint(run_dir):
            step = load_checkpoint(run_dir).step
            event.update(step=step, steps_advanced=step - previous, checkpoint_bit_exact=same(tensors_at(run_dir, step), tensors_at(reference, step)),
                         metrics_match=metrics(run_dir, step) == metrics(reference, step))
            previous = step
        else:
            event.update(step=None, steps_advanced=0, checkpoint_bit_exact=None, metrics_match=None)
        events.append(event)
        print(f"{kind} kill {i + 1:2d} after {delay:4.2f} s: {event}", flush=True)
        if finished:
            break
    flag = ["--resume"] if has_checkpoint(run_dir) else (["--overwrite"] if run_dir.exists() else [])
    subprocess.run(command(kind, run_dir, steps, 2, flag), env=env, check=True)
    final = same(tensors_at(run_dir, steps), tensors_at(reference, steps)) and \
        metrics(run_dir, steps) == metrics(reference, steps)
    with_ckpt = [e for e in events if e["step"] is not None]
    return {"kind": kind, "steps": steps, "kills": len(events),
            "kills_with_a_checkpoint_on_disk": len(with_ckpt),
            "kills_after_training_progress": sum(e["steps_advanced"] > 0 for e in events),
            "checkpoints_bit_exact": sum(bool(e["checkpoint_bit_exact"]) for e in with_ckpt),
            "metrics_prefix_exact": sum(bool(e["metrics_match"]) for e in with_ckpt),
            "restarts_that_failed": sum(bool(e["error"]) for e in events),
            "temp_files_left_after_a_kill": sum(e["temp_files"] for e in events),
            "partial_metrics_lines_left": sum(e["partial_metrics_line"] for e in events),
            "stale_locks_left": sum(e["stale_lock"] for e in events),
            "final_run_bit_exact": final, "events": events}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", nargs="+", default=["diffusion", "classifier"], choices=["diffusion", "classifier"])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--steps", type=int, default=2000, help="training steps of each run (default: 2000)")
    p.add_argument("--max-delay", type=float, default=8.0, help="longest wait before a kill, seconds (default: 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("kill_loop"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results = [kill_loop(kind, args.out, args.kills, args.steps, args.max_delay, args.seed) for kind in args.kind]
    (args.out / "kill_loop.json").write_text(json.dumps(results, indent=1) + "\n")
    keys = [k for k in results[0] if k not in ("kind", "events")]
    print("\n| " + " | ".join(["objective", *keys]) + " |")
    print("|" + " --- |" * (len(keys) + 1))
    for r in results:
        print("| " + " | ".join([r["kind"], *(str(r[k]) for k in keys)]) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
