"""``difflab demo [--out DIR]``: train and sample on built-in data and write a report (see :mod:`difflab.demo`)."""

from __future__ import annotations

import argparse

from difflab.commands import arguments

EXAMPLES = """
examples:
  difflab demo                       # writes demo_out/report.md (about ten minutes on two CPU cores)
  difflab demo --out /tmp/demo --seed 1
  difflab demo --quick --out /tmp/smoke   # a smoke run in well under a minute; the pictures are noise
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", metavar="DIR", help="report folder (default: demo_out)")
    p.add_argument("--seed", type=arguments.seed, default=0, help="seed of every training run and sample (default: 0)")
    p.add_argument("--quick", action="store_true", help="a few training steps only: checks the plumbing, not the model")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    from difflab.demo import run as run_demo

    report = run_demo(args.out, quick=args.quick, seed=args.seed, progress=not args.quiet)
    print(f"difflab: wrote {report}")
    return 0
