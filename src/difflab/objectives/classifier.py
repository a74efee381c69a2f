"""The noise-conditional classifier objective: the cross-entropy ``−log p_φ(y | x_t, t)`` on
``x_t = a_t x0 + s_t ε`` with ``t`` uniform on the path (:func:`difflab.guidance.classifier_loss`, SPEC §7).

It trains a :class:`~difflab.networks.classifier.NoisyClassifier` (module ``classifier``, AdamW at ``classifier.lr``,
no clipping, no EMA) on the data and path of a run config — the ones the diffusion model it will guide was trained
on — with a random ``classifier.held_out`` fraction kept aside. At the end (:meth:`ClassifierObjective.finish`) it
measures the held-out accuracy at several noise levels and writes ``classifier.json`` + ``classifier.safetensors``
(:func:`difflab.classifier_store.save_classifier`).
"""

from __future__ import annotations

import time
from typing import Sequence

import torch

from difflab.classifier_store import RECORD_FILE, WEIGHTS_FILE, network_time_scale, path_key, save_classifier
from difflab.config import RunConfig, build_path
from difflab.engine.loop import Objective, Trainable, require_same
from difflab.engine.stream import step_seed
from difflab.guidance import classifier_loss
from difflab.losses import sample_time
from difflab.networks.classifier import NoisyClassifier
from difflab.paths import GaussianPath

EVAL_TIME_FRACTIONS = (0.0, 0.25, 0.5, 0.75)
"""Where the held-out accuracy is reported: ``t = t_min + f (t_max − t_min)`` (step 1 for f = 0 on a discrete path)."""
RESUME_MUST_MATCH = ("data", "diffusion.path", "diffusion.schedule", "diffusion.T", "diffusion.zero_terminal_snr",
                     "classifier.width", "classifier.depth", "classifier.time_dim", "classifier.batch_size",
                     "classifier.held_out", "train.seed")
"""Config entries a resumed classifier must share with its checkpoint."""


def split(n: int, held_out: float, seed: int, stream: str = "classifier/split") -> tuple[torch.Tensor, torch.Tensor]:
    """Training and held-out indices (a random ``held_out`` fraction, at least one example when > 0)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, -1, stream)))
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


class ClassifierObjective(Objective):
    """Train ``p_φ(y | x_t, t)`` on ``dataset`` and the path of ``cfg.diffusion`` as ``cfg.classifier`` says."""

    stream = "classifier/batch"
    artifacts = (RECORD_FILE, WEIGHTS_FILE)

    def __init__(self, cfg: RunConfig, dataset, device: torch.device):
        cc, seed = cfg.classifier, cfg.train.seed
        if dataset.y is None or not dataset.num_classes or dataset.num_classes < 2:
            raise ValueError(f"a classifier needs class labels, and data set {cfg.data.name!r} has none")
        self.config, self.device = cfg, device
        self.x_all, self.y_all = dataset.x.float(), dataset.y.long()
        self.data_shape, self.num_classes = tuple(self.x_all.shape[1:]), int(dataset.num_classes)
        self.train_idx, self.test_idx = split(self.x_all.shape[0], cc.held_out, seed)
        self.x_train, self.y_train = self.x_all[self.train_idx].to(device), self.y_all[self.train_idx].to(device)
        self.path = build_path(cfg.diffusion)
        torch.manual_seed(step_seed(seed, -1, "classifier/init"))
        self.net = NoisyClassifier(self.data_shape, self.num_classes, cc.width, cc.depth, cc.time_dim,
                                   network_time_scale(self.path)).to(device)
        self.trainables = {"classifier": Trainable(self.net, lr=cc.lr, weight_decay=cc.weight_decay)}
        self.final_meta: dict = {}
        self._started = time.perf_counter()

    def step(self, ctx) -> dict:
        gen = ctx.generator
        idx = ctx.indices(self.x_train.shape[0])
        x0, y = self.x_train[idx], self.y_train[idx]
        t = ctx.shard(sample_time(self.path, self.config.classifier.batch_size, gen))
        with ctx.autocast():
            loss = classifier_loss(ctx.net("classifier"), self.path, x0, y, t=t, generator=gen).mean()
        ctx.optimize("classifier", loss)
        return {"loss": loss.detach()}

    def check_resumable(self, saved_config: RunConfig) -> None:
        require_same(self.config, saved_config, RESUME_MUST_MATCH)

    def meta(self) -> dict:
        cc = self.config.classifier
        return {"data_shape": list(self.data_shape), "num_classes": self.num_classes,
                "time_scale": self.net.time_scale, "width": cc.width, "depth": cc.depth, "time_dim": cc.time_dim,
                "path": path_key(self.config.diffusion), "n_train": len(self.train_idx),
                "n_held_out": len(self.test_idx)}

    def describe(self) -> str:
        return (f"noise-conditional classifier with {sum(p.numel() for p in self.net.parameters()):,} parameters; "
                f"{len(self.train_idx)} training examples of shape {self.data_shape}, {self.num_classes} classes; "
                f"{self.config.diffusion.path} path")

    def finish(self, engine, step: int) -> None:
        """Measure the accuracy by noise level (held-out examples, else training ones) and write the classifier."""
        self.net.eval()
        eval_idx, eval_on = (self.test_idx, "held-out") if len(self.test_idx) else (self.train_idx, "training")
        seed = self.config.train.seed
        accuracy = accuracy_by_time(self.net, self.path, self.x_all[eval_idx].to(self.device),
                                    self.y_all[eval_idx].to(self.device), eval_times(self.path),
                                    seed=step_seed(seed, -1, "classifier/eval"))
        self.final_meta = {**self.meta(), "accuracy_on": eval_on, "accuracy_by_time": accuracy,
                           "train_seconds": time.perf_counter() - self._started,
                           "final_loss": engine.book["last"].get("loss", float("nan"))}
        if engine.run is not None and engine.dist.main:
            save_classifier(engine.run.path, self.net, self.config, step, self.final_meta)
