"""``difflab eval RUN_DIR``: sample a trained run and score the samples against its data (SPEC §8).

Prints one table row per metric — value, real-vs-real noise floor, sample and reference counts — and,
with ``--out FILE.json``, writes the whole result of :func:`difflab.evaluation.evaluate_run` (the metrics,
the run and sampler, the feature network behind image metrics).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from difflab.commands import arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.pipeline import RUN_SAMPLERS

    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'difflab train'")
    p.add_argument("--sampler", choices=list(RUN_SAMPLERS), default=None,
                   help="sampler (default: ddim; ddgan, the only one, for a DDGAN run)")
    p.add_argument("--steps", type=arguments.steps, default=None, help="sampler steps (default: 50; T for a DDGAN run)")
    p.add_argument("--num", type=arguments.count, default=1000,
                   help="samples to draw (default: 1000); with the noise floor at most half the reference set is used")
    p.add_argument("--eta", type=arguments.finite_float, default=0.0, help="DDIM stochasticity, 0 = deterministic (default: 0)")
    p.add_argument("--seed", type=arguments.seed, default=0, help="random seed for sampling and the metrics (default: 0)")
    p.add_argument("--batch-size", type=arguments.count, default=256, help="samples per network batch (default: 256)")
    p.add_argument("--data", "--data-path", dest="data_path", metavar="PATH", default=None,
                   help="your copy of the run's data, for runs trained on your own files (a run's stored path is never read)")
    p.add_argument("--no-floor", action="store_true",
                   help="score all samples against the whole reference, without the real-vs-real noise floor")
    p.add_argument("--out", metavar="FILE.json", default=None, help="write the full result as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def format_value(v) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if v == 0 or (1e-3 <= abs(v) < 1e5) or not math.isfinite(v) else f"{v:.3e}"
    return str(v)


def metrics_table(result: dict) -> str:
    """A plain-text table of ``result["metrics"]``: metric, value, noise floor, samples, reference."""
    header = ("metric", "value", "noise floor", "samples", "reference")
    rows = [header] + [(name, format_value(e["value"]), format_value(e.get("noise_floor")), str(e["n_samples"]),
                        str(e["n_reference"])) for name, e in result["metrics"].items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from difflab.evaluation import evaluate_run

    if args.num < 2 or (args.steps is not None and args.steps < 1):
        raise ValueError("--num must be >= 2 and --steps >= 1")
    out = Path(args.out) if args.out else None
    if out is not None and out.suffix != ".json":
        raise ValueError(f"--out must end in .json, got {str(out)!r}")
    options = {"eta": args.eta} if args.eta else {}
    result = evaluate_run(args.run_dir, num_samples=args.num, sampler=args.sampler, steps=args.steps, seed=args.seed,
                          batch_size=args.batch_size, data_path=args.data_path, noise_floor=not args.no_floor,
                          progress=not args.quiet, **options)
    r = result["run"]
    print(f"difflab eval: {r['run_dir']} (step {r['step']}), {r['sampler']} with {r['nfe']} network evaluations, "
          f"{result['n_samples']} samples in {r['sample_seconds']:.1f} s; reference: {r['reference']} "
          f"({result['n_reference']} examples)")
    if "feature_space" in result:
        print(f"image metrics in the feature space of the {result['feature_space']}")
    print(metrics_table(result))
    if result.get("noise_floor"):
        print(f"noise floor: {result['noise_floor']}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, default=float))
        print(f"difflab: wrote {out}")
    return 0


EXAMPLES = """
examples:
  difflab eval runs/moons --sampler ddim --steps 50 --num 2000
  difflab eval runs/digits8 --sampler ddpm --steps 1000 --num 1000 --out digits8-ddpm.json
  difflab eval runs/moons --steps 20 --eta 1 --no-floor
"""
