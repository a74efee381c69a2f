"""Evaluation: sample-quality metrics with sample counts and noise floors (SPEC §8).

- :func:`evaluate_samples` scores samples against reference data (points or images);
- :func:`evaluate_run` samples a trained run and scores it (``difflab eval RUN_DIR``);
- :func:`feature_network` gives the data set's own classifier whose features define FD-<dataset> and
  KID-<dataset> (not Inception FID; see :mod:`difflab.evaluation.features`).

Vector metrics themselves live in :mod:`difflab.metrics`; exact KL and log-likelihood on the test beds in
:mod:`difflab.testbeds`.
"""

from difflab.evaluation.evaluate import KINDS, evaluate_run, evaluate_samples
from difflab.evaluation.features import FeatureNet, feature_network, train_feature_net

__all__ = ["KINDS", "FeatureNet", "evaluate_run", "evaluate_samples", "feature_network", "train_feature_net"]
