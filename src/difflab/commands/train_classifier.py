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
    from difflab.commands import add_run_arguments

    add_run_arguments(p, "the diffusion model's YAML run config (data and path)", "CLS_DIR", "classifier",
                      "classifier.steps=500 classifier.width=128")


def run(args: argparse.Namespace) -> int:
    from difflab.classifier_training import train_classifier
    from difflab.commands import run_training

    return run_training(train_classifier, args)


EXAMPLES = """
examples:
  difflab train-classifier configs/digits8.yaml --out runs/digits8-classifier
  difflab train-classifier configs/digits8.yaml --out runs/digits8-classifier --resume --set classifier.steps=4000
  difflab train-classifier configs/digits8.yaml --out runs/digits8-classifier --overwrite --set classifier.steps=500
  difflab sample runs/digits8 --class 3 --classifier runs/digits8-classifier --classifier-scale 2 --out threes.png
"""
