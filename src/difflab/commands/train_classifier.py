"""``difflab train-classifier CONFIG --out CLS_DIR``: train the noise-conditional classifier ``p_φ(y | x_t, t)``
of classifier guidance (SPEC §7) on the config's data and path.

Pass the diffusion model's own config, so that the classifier sees the same data and forward process as the
denoiser it will guide (``difflab sample RUN_DIR --classifier CLS_DIR`` checks this). The classifier's sizes
and budget are the config's ``classifier:`` section (:class:`~difflab.config.ClassifierConfig`; defaults
apply when the file has none), overridable with ``--set classifier.steps=500``; it checkpoints every
``train.checkpoint_every`` steps, and ``--resume`` continues from the latest checkpoint.
"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", metavar="CONFIG", help="the diffusion model's YAML run config (data and path)")
    p.add_argument("--out", required=True, metavar="CLS_DIR", help="directory for the classifier's weights and JSON")
    p.add_argument("--resume", action="store_true", help="continue the classifier in CLS_DIR from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the classifier in CLS_DIR")
    p.add_argument("--set", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                   help="override config values, e.g. classifier.steps=500 classifier.width=128")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def run(args: argparse.Namespace) -> int:
    from difflab.classifier_training import train_classifier
    from difflab.config import load_config

    cfg = load_config(args.config, args.set)
    train_classifier(cfg, args.out, overwrite=args.overwrite, resume=args.resume, progress=not args.quiet,
                     device=args.device)
    return 0


EXAMPLES = """
examples:
  difflab train-classifier configs/digits8.yaml --out runs/digits8-classifier
  difflab train-classifier configs/digits8.yaml --out runs/digits8-classifier --resume --set classifier.steps=4000
  difflab train-classifier configs/digits8.yaml --out runs/digits8-classifier --overwrite --set classifier.steps=500
  difflab sample runs/digits8 --class 3 --classifier runs/digits8-classifier --classifier-scale 2 --out threes.png
"""
