"""Training the noise-conditional classifier ``p_φ(y | x_t, t)`` of classifier guidance (SPEC §7):
:func:`train_classifier` runs :class:`~difflab.objectives.classifier.ClassifierObjective` on the engine
(:mod:`difflab.engine`) into a classifier directory, with checkpoints, ``--resume``, the lock and the divergence
stop of every run directory::

    CLS_DIR/classifier.safetensors   the weights             (difflab.classifier_store)
    CLS_DIR/classifier.json          format, step, hash, config, meta (accuracy by t)
    CLS_DIR/checkpoints/             the training state, every train.checkpoint_every steps
    CLS_DIR/metrics.jsonl            {"step", "loss", "grad_norm", "lr", ...} every classifier.log_every steps
    CLS_DIR/config.yaml

Per step ``k`` the batch, ``t`` and ``ε`` come from generators seeded by ``(train.seed, k − 1, "classifier/batch")``
(:func:`difflab.engine.stream.step_seed`), so a run is reproducible and resumes bit for bit on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

from difflab.classifier_store import (FORMAT, RECORD_FILE, WEIGHTS_FILE, TrainedClassifier, load_classifier,
                                      network_time_scale, path_key, save_classifier)
from difflab.config import RunConfig
from difflab.objectives.classifier import (EVAL_TIME_FRACTIONS, ClassifierObjective, accuracy_by_time, eval_times,
                                           split)

__all__ = ["train_classifier", "TrainedClassifier", "load_classifier", "save_classifier", "path_key",
           "network_time_scale", "accuracy_by_time", "eval_times", "split", "EVAL_TIME_FRACTIONS", "FORMAT",
           "RECORD_FILE", "WEIGHTS_FILE"]


def train_classifier(cfg: RunConfig, out_dir: Union[str, Path], overwrite: bool = False, progress: bool = True,
                     device=None, dataset=None, resume: bool = False) -> TrainedClassifier:
    """Train ``p_φ(y | x_t, t)`` on ``cfg.data`` and the path of ``cfg.diffusion`` as ``cfg.classifier`` says.

    Args:
        cfg: a run config (the model's own, so that data and path match the denoiser to be guided); the budget is
            ``classifier.steps`` of ``classifier.batch_size``, checkpoints every ``train.checkpoint_every`` steps.
        out_dir: the classifier directory; one that already holds a classifier is refused unless ``resume``
            (continue from its latest checkpoint) or ``overwrite`` (replace it).
        progress: show a progress bar and a one-line summary.
        device: force a device (default: ``cfg.train.device``).
        dataset: an ``ArrayDataset`` to use instead of loading ``cfg.data``.
    Returns: the trained classifier (eval mode), also written to ``out_dir`` (see the module docstring).
    Raises: :class:`~difflab.engine.TrainingError` (a run directory in the way or in use, divergence),
        ``ConfigError``, ``DataError``.
    """
    from difflab.training import train_objective

    cc = cfg.classifier

    def build(device):
        from difflab.latent import training_data

        data = dataset if dataset is not None else training_data(cfg)  # a latent run's classifier reads its latents
        return ClassifierObjective(cfg, data, device)

    objective, main = train_objective(cfg, out_dir, build, ClassifierObjective.artifacts, "classifier", resume,
                                      overwrite, progress, device, steps=cc.steps, batch_size=cc.batch_size,
                                      log_every=cc.log_every, sample_every=0, mixed_precision="no")
    if progress and main:
        acc = ", ".join(f"t={t}: {a:.3f}" for t, a in objective.final_meta["accuracy_by_time"].items())
        print(f"difflab: {objective.final_meta['accuracy_on']} accuracy {acc}; wrote {out_dir}", flush=True)
    return TrainedClassifier(objective.net, cfg, objective.final_meta, Path(out_dir))
