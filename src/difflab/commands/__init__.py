"""Subcommands of ``difflab`` beyond train and sample, one module each.

Each module defines ``add_arguments(parser)``, ``run(args) -> exit code`` and ``EXAMPLES``; ``difflab.cli``
lists them in its ``COMMANDS``. Modules import heavy dependencies inside ``run`` so ``difflab --help`` stays fast.
"""
