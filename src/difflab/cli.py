"""The ``difflab`` command line: ``difflab train CONFIG``, ``difflab sample RUN_DIR``, ...

Each subcommand is one :class:`Command` — a name, a help line, examples, a function that adds its
arguments and a function that runs it — listed in :data:`COMMANDS`; adding a subcommand is appending
one entry. Errors a user can cause (bad config, missing data or run, a run directory in the way, a
non-finite loss, bad arguments) print one line ``difflab: error: ...`` to stderr and exit with
status 2, without a traceback (set ``DIFFLAB_DEBUG=1`` to see it).
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from difflab.commands import evaluate, experiment
from difflab.commands import demo, train_classifier
from difflab.commands import autoencoder, calibrate, nll, reflow
from difflab.commands import arguments
from difflab.limits import MAX_CLASSES, MAX_SIDE

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line (``difflab: error: ... (see --help)``)."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"difflab: error: {message} (see '{self.prog} --help')\n")


@dataclass
class Command:
    """One subcommand: ``add_arguments(parser)`` declares its arguments, ``run(args) -> exit code`` runs it."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    examples: str = ""


# --- train -------------------------------------------------------------------------------------------------
def add_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="YAML run config (see configs/)")
    p.add_argument("--out", metavar="RUN_DIR", help="run directory (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the run in RUN_DIR")
    p.add_argument("--set", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="override config values with dotted keys, e.g. train.lr=1e-3 model.hidden=128")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run_train(args: argparse.Namespace) -> int:
    from difflab.config import load_config
    from difflab.training import train

    cfg = load_config(args.config, args.set)
    run_dir = Path(args.out) if args.out else Path("runs") / Path(args.config).stem
    train(cfg, run_dir, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    return 0


TRAIN_EXAMPLES = """
examples:
  difflab train configs/moons.yaml --out runs/moons
  difflab train configs/digits8.yaml --set train.steps=2000 train.lr=1e-3
  difflab train configs/digits8.yaml --out runs/digits8 --resume --set train.steps=8000
  torchrun --nproc_per_node 2 $(which difflab) train configs/moons.yaml --out runs/moons-ddp
"""


# --- sample ------------------------------------------------------------------------------------------------
def add_sample_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.pipeline import RUN_SAMPLERS

    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'difflab train'")
    p.add_argument("--sampler", choices=list(RUN_SAMPLERS), default=None,
                   help="sampler (default: 'default', DEIS order 3 on a Karras ρ = 7 grid capped at σ̄ = 80, or the grid "
                        "'difflab calibrate' fitted to this run for --steps; ddgan, the only one, for a DDGAN run)")
    p.add_argument("--steps", type=arguments.steps, default=None,
                   help="network evaluations per sample (default: 50; T for a DDGAN run, which takes no other)")
    p.add_argument("--num", type=arguments.count, default=64, help="number of samples (default: 64)")
    p.add_argument("--eta", type=arguments.finite_float, default=0.0, help="DDIM stochasticity, 0 = deterministic (default: 0)")
    p.add_argument("--seed", type=arguments.seed, default=0, help="random seed (default: 0)")
    p.add_argument("--class", dest="label", type=arguments.bounded_int(-1, MAX_CLASSES), default=None,
                   help="class label for a class-conditional model (-1: unconditional; default: every class in turn)")
    p.add_argument("--prompt", default=None, metavar="TEXT",
                   help='the prompt of a run trained with model.prompt, e.g. "3 then 7" ("": unconditional)')
    p.add_argument("--out", required=True, metavar="FILE", help="FILE.png (grid or scatter plot) or FILE.npz (arrays)")
    p.add_argument("--resolution", type=arguments.bounded_int(1, MAX_SIDE), default=None, metavar="SIDE",
                   help="a multi-resolution (matryoshka) run: the side of the images to write, either of the two it "
                        "samples jointly (default: the larger)")
    p.add_argument("--batch-size", type=arguments.count, default=256, help="samples per network batch (default: 256)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", type=arguments.device, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--compile", action="store_true",
                   help="run the network through torch.compile (pays off for many samples; falls back with a warning)")
    g = p.add_argument_group("guidance (SPEC §7)")
    g.add_argument("--guidance-scale", type=arguments.finite_float, default=1.0, metavar="λ",
                   help="classifier-free guidance scale of a class-conditional model: 0 unconditional, "
                        "1 conditional (default), > 1 sharper; λ ≠ 1 costs 2 network evaluations per step")
    g.add_argument("--guidance-interval", type=arguments.finite_float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="apply λ only for T_LO <= t <= T_HI, in the path's time units (0..T steps or 0..1)")
    g.add_argument("--guidance-rescale", type=arguments.finite_float, default=0.0, metavar="φ",
                   help="rescale the guided prediction's std towards the conditional one's, φ in [0, 1] (default: 0)")
    g.add_argument("--classifier", metavar="CLS_DIR", default=None,
                   help="a noise-conditional classifier written by 'difflab train-classifier' for classifier guidance")
    g.add_argument("--classifier-scale", type=arguments.finite_float, default=None, metavar="W",
                   help="classifier-guidance weight w (default with --classifier: 1)")
    add_nested_arguments(p)


def add_nested_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.pipeline import NESTED_INNER, NESTED_INNER_ETA

    g = p.add_argument_group("nested diffusion, anytime sampling (--sampler nested; SPEC §5)")
    g.add_argument("--outer", type=arguments.steps, default=None, metavar="N",
                   help="outer DDIM steps (η = --eta), each giving a finished sample; NFE = N × M (default: the "
                        "measured split of the budget --steps, or --steps // M)")
    g.add_argument("--inner", type=arguments.steps, default=None, metavar="M",
                   help="network evaluations of each inner run to the clean end (default: the measured split of "
                        "--steps, or --steps // N)")
    g.add_argument("--inner-sampler", choices=list(NESTED_INNER), default=None,
                   help="the inner sampler (default: ddim)")
    g.add_argument("--inner-eta", type=arguments.finite_float, default=None, metavar="η",
                   help=f"stochasticity of the ddim inner sampler (default: {NESTED_INNER_ETA}, Elata et al.'s)")
    g.add_argument("--anytime-out", metavar="DIR", default=None,
                   help="also save the anytime output after every outer step into DIR (PNGs, or .npz with --out *.npz)")


def nested_options(args: argparse.Namespace) -> dict:
    """``pipe.sample`` options of ``--sampler nested`` (``steps`` = the outer steps; without ``--outer``/``--inner`` the
    budget ``--steps`` is split by :func:`~difflab.samplers.nested.default_split`); the nested flags are refused with
    any other sampler."""
    flags = {"--outer": args.outer, "--inner": args.inner, "--inner-sampler": args.inner_sampler,
             "--inner-eta": args.inner_eta, "--anytime-out": args.anytime_out}
    given = [flag for flag, value in flags.items() if value is not None]
    if args.sampler != "nested":
        if given:
            raise ValueError(f"{given[0]} applies to --sampler nested only")
        return {}
    from difflab.samplers.nested import default_split

    outer, inner = args.outer, args.inner
    if (outer is not None and outer < 1) or (inner is not None and inner < 1):
        raise ValueError("--outer and --inner must be >= 1")
    if outer is None and inner is None:
        outer, inner = default_split(args.steps)
    elif outer is None:
        outer = max(1, args.steps // inner)
    elif inner is None:
        inner = max(1, args.steps // outer)
    options = {"steps": outer, "inner": inner, "inner_sampler": args.inner_sampler or "ddim"}
    if args.inner_eta is not None:
        options["inner_eta"] = args.inner_eta
    if args.anytime_out is not None:
        from difflab.samplers.nested import AnytimeOutputs

        options["anytime"] = AnytimeOutputs()
    return options


def run_sample(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from difflab.pipeline import load_run
    from difflab.plotting import save_image_grid, save_scatter

    out = Path(args.out)
    if out.suffix not in (".png", ".npz"):
        raise ValueError(f"--out must end in .png or .npz, got {str(out)!r}")
    if args.num < 1 or (args.steps is not None and args.steps < 1):
        raise ValueError("--num and --steps must be >= 1")
    if args.classifier_scale is not None and args.classifier is None:
        raise ValueError("--classifier-scale needs --classifier CLS_DIR")
    pipe = load_run(args.run_dir, ema=not args.no_ema, device=args.device, compile=args.compile)
    if args.resolution is not None:
        from difflab.matryoshka import at_resolution

        pipe = at_resolution(pipe, args.resolution)
    if args.prompt is not None:
        if args.label is not None or not hasattr(pipe.net, "label_of"):
            raise ValueError("--prompt needs a run trained with model.prompt: true, and no --class")
        args.label = pipe.net.label_of(args.prompt)
    if args.sampler is None and not pipe.ddgan:
        args.sampler = "default"  # the measured best sampler, on this run's calibrated grid if it has one
    args.sampler, args.steps = pipe.resolve_sampler(args.sampler, args.steps)
    image = len(pipe.output_shape) == 3
    if out.suffix == ".png" and not image and pipe.output_shape != (2,):
        raise ValueError(f"a .png needs images or 2-D points; this run's data has shape {pipe.output_shape}: use .npz")
    classifier = None
    if args.classifier is not None:
        from difflab.classifier_training import load_classifier

        classifier = load_classifier(args.classifier, device=pipe.device)
    if classifier is not None and not pipe.num_classes:  # an unconditional model takes its labels from the classifier
        y = classifier.labels(args.num, args.label)
    else:
        y = pipe.labels(args.num, args.label)
    guidance = {"guidance_scale": args.guidance_scale, "guidance_rescale": args.guidance_rescale,
                "guidance_interval": None if args.guidance_interval is None else tuple(args.guidance_interval),
                "classifier": classifier,
                "classifier_scale": 1.0 if args.classifier_scale is None else args.classifier_scale}
    nested = nested_options(args)
    samples = pipe.sample(args.num, sampler=args.sampler, steps=nested.pop("steps", args.steps), eta=args.eta,
                          seed=args.seed, y=y, batch_size=args.batch_size, progress=not args.quiet, **nested, **guidance)
    bad = int((~torch.isfinite(samples.x.reshape(args.num, -1))).any(dim=1).sum())
    if bad:
        raise ValueError(f"{bad} of {args.num} samples hold NaN or Inf ({args.sampler}, {samples.nfe} evaluations): "
                         f"the sampler diverged on this model; nothing written to {out}")
    if "anytime" in nested:
        kind = "npz" if out.suffix == ".npz" else ("grid" if image else "scatter")
        saved = nested["anytime"].save(args.anytime_out, kind)
        print(f"difflab: wrote {len(saved)} anytime outputs (one per outer step) to {args.anytime_out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npz":
        arrays = {"x": samples.x.numpy(), "nfe": np.array(samples.nfe)}
        if y is not None:
            arrays["y"] = y.numpy()
        np.savez(out, **arrays)
    elif image:
        classes = pipe.num_classes or (classifier.num_classes if classifier is not None else 0)
        nrow = classes if (classes and args.label is None) else None
        save_image_grid(samples.x, out, nrow=nrow)
    else:
        save_scatter(samples.x, out, title=f"{args.sampler}, {samples.nfe} NFE", labels=y)
    print(f"difflab: wrote {args.num} samples ({args.sampler}, {samples.nfe} network evaluations each) to {out}")
    return 0


SAMPLE_EXAMPLES = """
examples:
  difflab sample runs/digits8 --steps 10 --num 100 --out digits.png      # the default sampler (calibrated if the run is)
  difflab sample runs/digits8 --sampler ddim --steps 50 --num 100 --out digits.png
  difflab sample runs/digits8 --sampler ddpm --steps 1000 --num 64 --class 3 --out threes.png
  difflab sample runs/moons --sampler ddim --steps 20 --eta 1 --num 5000 --out moons.npz
  difflab sample runs/digits8 --class 7 --guidance-scale 3 --num 64 --out sevens.png
  difflab sample runs/ldm_mnist_pairs --prompt "3 then 7" --guidance-scale 3 --out pairs.png
  difflab sample runs/digits8 --guidance-scale 3 --guidance-interval 0 600 --guidance-rescale 0.7 --out cfg.png
  difflab sample runs/digits8 --class 7 --classifier runs/digits8-classifier --classifier-scale 2 --out sevens.png
  difflab sample runs/digits8 --sampler nested --outer 10 --inner 10 --inner-sampler deis --anytime-out anytime/ --out nested.png
  difflab sample runs/ddgan_digits8 --class 3 --num 64 --out threes.png     # a DDGAN run: its T steps
"""


COMMANDS: list[Command] = [
    Command("train", "train a model from a YAML config", add_train_arguments, run_train, TRAIN_EXAMPLES),
    Command("sample", "draw samples from a trained run", add_sample_arguments, run_sample, SAMPLE_EXAMPLES),
    Command("demo", "train and sample on built-in data; write a report with pictures and numbers",
            demo.add_arguments, demo.run, demo.EXAMPLES),
    Command("eval", "score a trained run's samples against its data (table + JSON)", evaluate.add_arguments,
            evaluate.run, evaluate.EXAMPLES),
    Command("experiment", "run one of the paper's experiments (report.md + figures)", experiment.add_arguments,
            experiment.run, experiment.EXAMPLES),
    Command("train-classifier", "train a noise-conditional classifier for classifier guidance",
            train_classifier.add_arguments, train_classifier.run, train_classifier.EXAMPLES),
    Command("nll", "bits/dim of a trained run on held-out data: discrete ELBO or probability-flow ODE",
            nll.add_arguments, nll.run, nll.EXAMPLES),
    Command("reflow", "straighten a rectified-flow run: retrain on its own (noise, sample) pairs",
            reflow.add_arguments, reflow.run, reflow.EXAMPLES),
    Command("train-autoencoder", "train the KL autoencoder of latent diffusion; cache its latents and scale",
            autoencoder.add_train_arguments, autoencoder.run_train, autoencoder.TRAIN_EXAMPLES),
    Command("eval-autoencoder", "held-out reconstruction error, class accuracy and FD of an autoencoder",
            autoencoder.add_eval_arguments, autoencoder.run_eval, autoencoder.EVAL_EXAMPLES),
    Command("calibrate", "fit the default sampler's time grid to a trained run against reference ODE solves",
            calibrate.add_arguments, calibrate.run, calibrate.EXAMPLES),
]
"""The subcommands, in the order ``difflab --help`` lists them."""


# --- the program -------------------------------------------------------------------------------------------
def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="difflab", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="difflab: diffusion and flow generative models, exactly as the math derives them.",
        epilog=textwrap.dedent("""
            examples:
              difflab train configs/moons.yaml --out runs/moons
              difflab sample runs/moons --sampler ddim --steps 50 --num 2000 --out moons.png
              difflab COMMAND --help
        """))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for command in commands:
        p = sub.add_parser(command.name, help=command.help, description=command.help, epilog=command.examples,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        p.set_defaults(run=command.run)
    return parser


def _user_errors() -> tuple:
    """The exception types that are the user's to fix: reported in one line, no traceback."""
    from difflab.checkpoint import CheckpointError
    from difflab.training import TrainingError

    return (ValueError, OSError, TrainingError, CheckpointError)  # ConfigError and DataError are ValueErrors


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``difflab`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a usage error (2), already printed
        return int(exit_.code or 0)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("difflab: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except _user_errors() as err:
        if os.environ.get("DIFFLAB_DEBUG"):
            raise
        print(f"difflab: error: {_one_line(err)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
