"""A trained noise-conditional classifier ``p_φ(y | x_t, t)`` of classifier guidance (SPEC §7) on disk and in memory.

A classifier directory (written by :func:`difflab.classifier_training.train_classifier`) holds::

    CLS_DIR/classifier.safetensors   the weights
    CLS_DIR/classifier.json          format, step, SHA-256 of the weights, the full run config, and meta:
                                     data shape, classes, the network's time scale, held-out accuracy by t

both written atomically (:mod:`difflab.checkpoint`'s writers; the JSON last, so a directory with a
``classifier.json`` always has the weights it names), next to the training run's own files (checkpoints,
``metrics.jsonl``, ``config.yaml``). :func:`load_classifier` restores it as a :class:`TrainedClassifier`, a callable
``(x_t, t) -> logits`` in the path's time units, which :class:`~difflab.guidance.ClassifierGuidance` (and
``Pipeline.sample(classifier=…)``) takes as it is.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from difflab.checkpoint import atomic_write_bytes, atomic_write_json, load_saved_module
from difflab.limits import MAX_CLASSES, MAX_DEPTH, MAX_WIDTH, LimitError, check_data_shape, check_int
from difflab.config import DiffusionConfig, RunConfig
from difflab.networks.classifier import NoisyClassifier
from difflab.networks.embeddings import CONTINUOUS_TIME_SCALE, NULL_LABEL, check_labels
from difflab.paths import GaussianPath
from difflab.utils import default_device

WEIGHTS_FILE = "classifier.safetensors"
RECORD_FILE = "classifier.json"
FORMAT = "difflab-classifier"
FORMAT_VERSION = 1


def path_key(diffusion: DiffusionConfig) -> dict:
    """What fixes the forward process ``q(x_t | x0)`` (SPEC §2, §6): a classifier and a denoiser must agree on it.

    The target and the loss weighting are the denoiser's business and do not enter."""
    if diffusion.path == "discrete":
        return {"path": "discrete", "schedule": diffusion.schedule, "T": diffusion.T,
                "zero_terminal_snr": diffusion.zero_terminal_snr}
    return {"path": diffusion.path}


def network_time_scale(path: GaussianPath) -> float:
    """The classifier sees ``time_scale · t``: 1 on a discrete path (integer steps), ``1000 / t_max`` on a
    continuous one — the networks' time convention (:func:`difflab.networks.embeddings.network_time_fn`)."""
    return 1.0 if getattr(path, "discrete", False) else CONTINUOUS_TIME_SCALE / float(path.t_max)


@dataclass
class TrainedClassifier:
    """A trained ``p_φ(y | x_t, t)``: ``classifier(x_t (B, …), t) -> logits (B, num_classes)``, ``t`` in path units."""

    net: NoisyClassifier
    config: RunConfig
    meta: dict
    directory: Optional[Path] = None

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        return self.net(x, t)

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    @property
    def data_shape(self) -> tuple:
        return self.net.data_shape

    def labels(self, num: int, y=None) -> torch.Tensor:
        """Labels to guide towards: ``y`` (one class for all, or ``[num]``), or ``0, 1, …, C−1, 0, …`` in turn."""
        if y is None:
            return torch.arange(num) % self.num_classes
        y = check_labels(y, num, self.num_classes).clone()
        if (y == NULL_LABEL).any():
            raise ValueError(f"classifier guidance needs a class in 0..{self.num_classes - 1}, not {NULL_LABEL} "
                             "(unconditional)")
        return y

    def check_matches(self, config: RunConfig, data_shape: Sequence[int], num_classes: int) -> None:
        """Refuse a denoiser this classifier cannot guide: another forward process, data shape or class count."""
        mine, theirs = path_key(self.config.diffusion), path_key(config.diffusion)
        if mine != theirs:
            raise ValueError(f"the classifier was trained on the forward process {mine}, the model on {theirs}: "
                             "train the classifier with the model's config")
        if tuple(data_shape) != self.data_shape:
            raise ValueError(f"the classifier takes data of shape {self.data_shape}, the model makes {tuple(data_shape)}")
        if num_classes and num_classes != self.num_classes:
            raise ValueError(f"the classifier has {self.num_classes} classes, the model {num_classes}")


# --- saving and loading -------------------------------------------------------------------------------------------
def save_classifier(out_dir: Union[str, Path], net: NoisyClassifier, cfg: RunConfig, step: int, meta: dict) -> Path:
    """Write ``classifier.safetensors`` then ``classifier.json`` atomically; returns the JSON file."""
    from safetensors.torch import save as safetensors_save

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    weights = safetensors_save(state, metadata={"format": FORMAT, "step": str(step)})
    atomic_write_bytes(out_dir / WEIGHTS_FILE, weights)
    record = {"format": FORMAT, "version": FORMAT_VERSION, "step": int(step), "weights": WEIGHTS_FILE,
              "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights), "saved_at": time.time(), "torch": torch.__version__,
              "config": cfg.to_dict(), "meta": meta}
    atomic_write_json(out_dir / RECORD_FILE, record)
    return out_dir / RECORD_FILE


def load_classifier(cls_dir: Union[str, Path], device=None) -> TrainedClassifier:
    """Restore a classifier directory written by :func:`train_classifier` (eval mode, on ``device``).

    Raises ``FileNotFoundError`` when there is none and :class:`~difflab.checkpoint.CheckpointError` when it
    is corrupt (the weights do not match the recorded hash) or of another format.
    """
    def build(record: dict) -> NoisyClassifier:
        meta = record["meta"]
        shape = check_data_shape(meta.get("data_shape"), "meta")
        sizes = [check_int(f"meta.{k}", meta.get(k), 1, high) for k, high in
                 (("num_classes", MAX_CLASSES), ("width", MAX_WIDTH), ("depth", MAX_DEPTH), ("time_dim", MAX_WIDTH))]
        time_scale = meta.get("time_scale")
        if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not math.isfinite(time_scale):
            raise LimitError(f"meta.time_scale must be a finite number, got {time_scale!r:.40}")
        return NoisyClassifier(shape, *sizes, time_scale)

    cls_dir = Path(cls_dir)
    record, net = load_saved_module(cls_dir, RECORD_FILE, FORMAT, "classifier",
                                    "write one with 'difflab train-classifier CONFIG --out CLS_DIR'", build)
    net.to(default_device(device)).eval()
    return TrainedClassifier(net, record["run_config"], record["meta"], cls_dir)
