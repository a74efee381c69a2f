"""Subcommands of ``difflab`` beyond train and sample, one module each.

Each module defines ``add_arguments(parser)``, ``run(args) -> exit code`` and ``EXAMPLES``; ``difflab.cli``
lists them in its ``COMMANDS``. Modules import heavy dependencies inside ``run`` so ``difflab --help`` stays fast.
"""


def add_run_arguments(p, config_help: str, out_metavar: str, what: str, set_example: str) -> None:
    """The arguments every training subcommand shares: CONFIG, ``--out`` (required), ``--resume``, ``--overwrite``,
    ``--set``, ``--device`` and ``--quiet``; ``what`` names the thing trained in the help lines."""
    p.add_argument("config", metavar="CONFIG", help=config_help)
    p.add_argument("--out", required=True, metavar=out_metavar, help=f"directory for the {what}")
    p.add_argument("--resume", action="store_true", help=f"continue the {what} in {out_metavar} from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help=f"replace the {what} in {out_metavar}")
    p.add_argument("--set", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help=f"override config values, e.g. {set_example}")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run_training(train_fn, args) -> int:
    """Load CONFIG with ``--set`` and call ``train_fn(cfg, out, resume=, overwrite=, progress=, device=)``."""
    from difflab.config import load_config

    cfg = load_config(args.config, args.set)
    train_fn(cfg, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet, device=args.device)
    return 0
