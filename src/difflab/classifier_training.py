"""Training and loading the noise-conditional classifier ``p_φ(y | x_t, t)`` of classifier guidance (SPEC §7).

:func:`train_classifier` fits a :class:`~difflab.networks.classifier.NoisyClassifier` with the cross-entropy
``−log p_φ(y | x_t, t)`` on ``x_t = a_t x0 + s_t ε``, ``t`` uniform on the path
(:func:`difflab.guidance.classifier_loss`), on the data and the path of a run config — the same ones the
diffusion model it will guide was trained on. It writes a classifier directory::

    CLS_DIR/classifier.safetensors   the weights
    CLS_DIR/classifier.json          format, step, SHA-256 of the weights, the full run config, and meta:
                                     data shape, classes, the network's time scale, held-out accuracy by t
    CLS_DIR/metrics.jsonl            {"step", "loss", "elapsed"} every ``classifier.log_every`` steps

both files written atomically (:mod:`difflab.checkpoint`'s writers; the JSON last, so a directory with a
``classifier.json`` always has the weights it names). :func:`load_classifier` restores it as a
:class:`TrainedClassifier`, a callable ``(x_t, t) -> logits`` in the path's time units, which
:class:`~difflab.guidance.ClassifierGuidance` (and ``Pipeline.sample(classifier=…)``) takes as it is.

Per step ``k`` the batch, ``t`` and ``ε`` come from generators seeded by ``(train.seed, k, stream)``
(:func:`difflab.training.step_seed`), so a run is reproducible on the CPU.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from difflab.checkpoint import CheckpointError, atomic_write_bytes, atomic_write_json, read_record, read_verified
from difflab.limits import (MAX_CLASSES, MAX_DEPTH, MAX_WIDTH, LimitError, build_within_limits, check_data_shape,
                            check_int, checkpoint_byte_budget)
from difflab.config import DiffusionConfig, RunConfig, build_path
from difflab.networks.classifier import NoisyClassifier
from difflab.networks.embeddings import CONTINUOUS_TIME_SCALE, NULL_LABEL, check_labels
from difflab.optim import adamw
from difflab.paths import GaussianPath

WEIGHTS_FILE = "classifier.safetensors"
RECORD_FILE = "classifier.json"
METRICS_FILE = "metrics.jsonl"
FORMAT = "difflab-classifier"
FORMAT_VERSION = 1
EVAL_TIME_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
"""Where the held-out accuracy is reported: ``t = t_min + f (t_max − t_min)`` (step 1 for f = 0 on a discrete path)."""


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


# --- training -------------------------------------------------------------------------------------------------
def _split(n: int, held_out: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out indices (a random ``held_out`` fraction, at least one example when > 0)."""
    from difflab.training import step_seed

    perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, -1, "classifier/split")))
    n_test = max(1, int(held_out * n)) if held_out > 0 else 0
    return perm[n_test:], perm[:n_test]


def eval_times(path: GaussianPath) -> list:
    """The times of :data:`EVAL_TIME_FRACTIONS` on ``path`` (integers on a discrete path)."""
    if getattr(path, "discrete", False):
        return [max(1, round(f * path.T)) for f in EVAL_TIME_FRACTIONS]
    return [float(path.t_min + f * (path.t_max - path.t_min)) for f in EVAL_TIME_FRACTIONS]


@torch.no_grad()
def accuracy_by_time(classifier, path: GaussianPath, x0: torch.Tensor, y: torch.Tensor, times: Sequence,
                     seed: int = 0, batch_size: int = 1024) -> dict:
    """``{t: fraction of argmax p_φ(· | x_t, t) == y}`` on ``x_t ~ q(x_t | x0)`` with fixed noise (seed)."""
    out = {}
    for t in times:
        g = torch.Generator().manual_seed(seed)
        hits = 0
        for i in range(0, x0.shape[0], batch_size):
            xb = x0[i:i + batch_size]
            tb = torch.full((xb.shape[0],), t, dtype=torch.long if isinstance(t, int) else torch.float64)
            x_t, _ = path.sample(xb, tb, generator=g)
            hits += int((classifier(x_t, tb).argmax(-1) == y[i:i + batch_size]).sum())
        out[str(t)] = hits / max(1, x0.shape[0])
    return out


def train_classifier(cfg: RunConfig, out_dir: Union[str, Path], overwrite: bool = False, progress: bool = True,
                     device=None, dataset=None) -> TrainedClassifier:
    """Train ``p_φ(y | x_t, t)`` on ``cfg.data`` and the path of ``cfg.diffusion`` as ``cfg.classifier`` says.

    Args:
        cfg: a run config (the model's own, so that data and path match the denoiser to be guided).
        out_dir: the classifier directory; one that already holds a classifier is refused unless ``overwrite``.
        progress: show a progress bar and a one-line summary.
        device: force a device (default: CUDA when available).
        dataset: an ``ArrayDataset`` to use instead of loading ``cfg.data``.
    Returns: the trained classifier (eval mode), also written to ``out_dir`` (see the module docstring).
    Raises: :class:`~difflab.training.TrainingError` (a classifier in the way, a non-finite loss),
        ``ConfigError``, ``DataError``.
    """
    from tqdm.auto import tqdm

    from difflab.guidance import classifier_loss
    from difflab.losses import sample_time
    from difflab.pipeline import default_device, load_weights
    from difflab.training import TrainingError, batch_indices, step_seed

    cfg.validate()
    cc, seed = cfg.classifier, cfg.train.seed
    out_dir = Path(out_dir)
    if (out_dir / RECORD_FILE).exists() and not overwrite:
        raise TrainingError(f"{str(out_dir)!r} already holds a classifier: pass --overwrite to replace it")
    if cfg.train.num_threads > 0:
        torch.set_num_threads(cfg.train.num_threads)
    device = default_device(device)
    if dataset is None:
        from difflab.data import load_dataset

        dataset = load_dataset(cfg.data.name, path=cfg.data.path, n=cfg.data.n, seed=seed, **cfg.data.options)
    if dataset.y is None or not dataset.num_classes or dataset.num_classes < 2:
        raise ValueError(f"a classifier needs class labels, and data set {cfg.data.name!r} has none")
    x_all, y_all = dataset.x.float(), dataset.y.long()
    data_shape, num_classes = tuple(x_all.shape[1:]), int(dataset.num_classes)
    train_idx, test_idx = _split(x_all.shape[0], cc.held_out, seed)
    x_train, y_train = x_all[train_idx].to(device), y_all[train_idx].to(device)

    path = build_path(cfg.diffusion)
    torch.manual_seed(step_seed(seed, -1, "classifier/init"))
    net = NoisyClassifier(data_shape, num_classes, cc.width, cc.depth, cc.time_dim, network_time_scale(path)).to(device)
    optimizer = adamw(net.parameters(), lr=cc.lr, weight_decay=cc.weight_decay)

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    if progress:
        print(f"difflab: noise-conditional classifier with {sum(p.numel() for p in net.parameters()):,} parameters; "
              f"{len(train_idx)} training examples of shape {data_shape}, {num_classes} classes; "
              f"{cfg.diffusion.path} path; device {device}", flush=True)
    bar = tqdm(total=cc.steps, disable=not progress, desc="classifier", dynamic_ncols=True)
    start, window, loss_value = time.perf_counter(), [], float("nan")
    net.train()
    for index in range(cc.steps):
        gen = torch.Generator().manual_seed(step_seed(seed, index, "classifier/batch"))
        idx = batch_indices(x_train.shape[0], cc.batch_size, seed, index).to(device)
        x0, y = x_train[idx], y_train[idx]
        t = sample_time(path, x0.shape[0], gen).to(device)
        loss = classifier_loss(net, path, x0, y, t=t, generator=gen).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            bar.close()
            raise TrainingError(f"non-finite classifier loss ({loss_value}) at step {index + 1}: nothing was saved")
        optimizer.step()
        window.append(loss_value)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)
        k = index + 1
        if k % cc.log_every == 0 or k == cc.steps:
            record = {"step": k, "loss": sum(window) / len(window), "elapsed": time.perf_counter() - start}
            with open(out_dir / METRICS_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            window = []
    bar.close()
    net.eval()
    elapsed = time.perf_counter() - start
    eval_idx, eval_on = (test_idx, "held-out") if len(test_idx) else (train_idx, "training")
    accuracy = accuracy_by_time(net, path, x_all[eval_idx].to(device), y_all[eval_idx].to(device), eval_times(path),
                                seed=step_seed(seed, -1, "classifier/eval"))
    meta = {"data_shape": list(data_shape), "num_classes": num_classes, "time_scale": net.time_scale,
            "width": cc.width, "depth": cc.depth, "time_dim": cc.time_dim, "path": path_key(cfg.diffusion),
            "n_train": len(train_idx), "n_held_out": len(test_idx), "accuracy_on": eval_on,
            "accuracy_by_time": accuracy, "train_seconds": elapsed, "final_loss": loss_value}
    save_classifier(out_dir, net, cfg, cc.steps, meta)
    if progress:
        acc = ", ".join(f"t={t}: {a:.3f}" for t, a in accuracy.items())
        print(f"difflab: trained the classifier for {cc.steps} steps ({elapsed:.0f} s); {eval_on} accuracy {acc}; "
              f"wrote {out_dir}", flush=True)
    return TrainedClassifier(net, cfg, meta, out_dir)


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
    from difflab.pipeline import default_device, load_weights

    cls_dir = Path(cls_dir)
    record_file = cls_dir / RECORD_FILE
    if not record_file.is_file():
        raise FileNotFoundError(f"no classifier in {str(cls_dir)!r} (missing {RECORD_FILE}; "
                                "write one with 'difflab train-classifier CONFIG --out CLS_DIR')")
    record = read_record(record_file, FORMAT, "classifier")
    meta = record["meta"]
    try:
        shape = check_data_shape(meta.get("data_shape"), "meta")
        sizes = [check_int(f"meta.{k}", meta.get(k), 1, high) for k, high in
                 (("num_classes", MAX_CLASSES), ("width", MAX_WIDTH), ("depth", MAX_DEPTH), ("time_dim", MAX_WIDTH))]
        time_scale = meta.get("time_scale")
        if isinstance(time_scale, bool) or not isinstance(time_scale, (int, float)) or not math.isfinite(time_scale):
            raise LimitError(f"meta.time_scale must be a finite number, got {time_scale!r:.40}")
        net, nbytes = build_within_limits(lambda: NoisyClassifier(shape, *sizes, time_scale), "the classifier")
    except (LimitError, ValueError) as err:
        raise CheckpointError(f"{record_file}: {err}") from None
    record, tensors = read_verified(record_file, FORMAT, "classifier", max_weight_bytes=checkpoint_byte_budget(nbytes))
    load_weights(net, tensors, record_file)
    net.to(default_device(device)).eval()
    return TrainedClassifier(net, record["run_config"], meta, cls_dir)
