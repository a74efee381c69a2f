"""``difflab experiment NAME [RUN_DIR] --out DIR [--quick] [--seed S]``: run one of the paper's experiments.

The experiments are those registered in :data:`difflab.experiments.EXPERIMENTS` (name -> module); each
module's ``run(out_dir, **options) -> Path`` writes ``report.md``, ``results.json`` and figures into
``out_dir``. The command passes the options a module's ``run`` accepts: ``run_dir`` (the positional
``RUN_DIR``), ``quick`` and ``seed``; an option the experiment does not take is refused (``RUN_DIR``) or
noted (``--quick``, ``--seed``), never silently dropped.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
from pathlib import Path

from difflab.commands import arguments


def experiment_summary(name: str) -> str:
    """The first paragraph of an experiment module's docstring, without its ``Experiment ``name``:`` prefix and
    closing parenthesis."""
    from difflab.experiments import EXPERIMENTS

    try:
        module = importlib.import_module(f"difflab.experiments.{EXPERIMENTS[name]}")
    except ImportError as err:
        return f"(cannot be loaded: {err})"
    paragraph = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
    if paragraph.startswith("Experiment") and ":" in paragraph:
        paragraph = paragraph.split(":", 1)[1].strip()
    return re.sub(r"\s*\([^()]*\)\.?$", "", paragraph)  # without the closing "(SPEC ...)" reference


def add_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.experiments import EXPERIMENTS

    p.add_argument("name", metavar="NAME", nargs="?", choices=list(EXPERIMENTS),
                   help=f"the experiment: {', '.join(EXPERIMENTS)} (see --list)")
    p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None,
                   help="a trained run to experiment on, for experiments that use one (default: train a small one)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where to write report.md, results.json and the figures (default: experiments/NAME)")
    p.add_argument("--quick", action="store_true", help="small sizes: seconds instead of minutes (a smoke test)")
    p.add_argument("--seed", type=arguments.seed, default=None, help="random seed (default: the experiment's own, 0)")
    p.add_argument("--num-samples", type=arguments.count, default=None, metavar="N",
                   help="samples drawn from RUN_DIR's model per measurement, for experiments that take it")
    p.add_argument("--model-only", action="store_true",
                   help="measure only RUN_DIR's model, not the exact beds, for experiments that take it (a costly "
                        "model gets its own report)")
    p.add_argument("--list", action="store_true", help="list the experiments and exit")


def list_experiments() -> str:
    from difflab.experiments import EXPERIMENTS

    width = max(len(name) for name in EXPERIMENTS)
    return "\n".join(f"  {name:<{width}}  {experiment_summary(name)}" for name in EXPERIMENTS)


def experiment_options(run_fn, run_dir, quick: bool, seed, num_samples=None, model_only: bool = False) -> tuple[dict, list]:
    """The keyword arguments of ``run_fn`` for the command's options, and notes on options it does not take."""
    accepted = inspect.signature(run_fn).parameters
    options, notes = {}, []
    if run_dir is not None:
        if "run_dir" not in accepted:
            raise ValueError("this experiment takes no RUN_DIR (it trains or builds what it needs)")
        if not Path(run_dir).is_dir():
            raise ValueError(f"no run directory {str(run_dir)!r}")
        options["run_dir"] = run_dir
    if model_only and run_dir is None:
        raise ValueError("--model-only needs a RUN_DIR to measure")
    for name, value in (("quick", quick), ("seed", seed), ("num_samples", num_samples), ("model_only", model_only)):
        if value is None or value is False:  # not given
            continue
        if name in accepted:
            options[name] = value
        else:
            notes.append(f"--{name.replace('_', '-')} does not apply to this experiment: ignored")
    return options, notes


def run(args: argparse.Namespace) -> int:
    from difflab.experiments import EXPERIMENTS

    if args.list:
        print("experiments (difflab experiment NAME):\n" + list_experiments())
        return 0
    if args.name is None:
        raise ValueError("name an experiment (one of " + ", ".join(EXPERIMENTS) + "; see --list)")
    module = importlib.import_module(f"difflab.experiments.{EXPERIMENTS[args.name]}")
    options, notes = experiment_options(module.run, args.run_dir, args.quick, args.seed, args.num_samples,
                                        args.model_only)
    for note in notes:
        print(f"difflab: note: {note}")
    out_dir = Path(args.out) if args.out else Path("experiments") / args.name
    report = module.run(out_dir, **options)
    print(f"difflab: experiment {args.name!r} wrote {report} (with results.json and figures in {out_dir})")
    return 0


EXAMPLES = """
examples:
  difflab experiment --list
  difflab experiment ddim-steps --out experiments/ddim-steps
  difflab experiment ddim-steps runs/digits8 --out experiments/ddim-steps-digits8
  difflab experiment ode-solvers --quick --out /tmp/ode-solvers
  difflab experiment schedules --seed 1 --out experiments/schedules-seed1
  difflab experiment nested runs/mnist5k --model-only --num-samples 500 --out experiments/nested-mnist5k
"""
