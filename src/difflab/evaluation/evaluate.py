"""Evaluate samples against reference data, and a trained run end to end (SPEC §8).

Every metric entry reports its sample counts and, where cheap, a **noise floor**: the same metric between two
disjoint halves of the reference set. With ``noise_floor=True`` (default) the reference is split at random
into halves A and B, the value is ``metric(samples[:|A|], B)`` and the floor ``metric(A, B)``, so value and
floor use exactly the same counts and a perfect sampler scores the floor (up to noise). With
``noise_floor=False`` the value uses all samples against the whole reference.

Metrics by ``kind``:

- ``"points"`` (vectors of any shape): sliced W2, MMD² (RBF, unbiased), FD-raw (Fréchet distance of the raw
  vectors), k-NN precision/recall — :mod:`difflab.metrics`.
- ``"image"``: in the feature space of a classifier trained on the data set (:mod:`.features`; *not*
  Inception): FD-<dataset>, KID-<dataset>, precision/recall; and, when sample labels are given
  (class-conditional models), the classifier's accuracy on the samples next to its accuracy on the
  reference images (the ceiling).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import torch

from difflab import metrics
from difflab.evaluation.features import FeatureNet, feature_network

KINDS = ("points", "image")


def _split(n: int, generator: torch.Generator):
    perm = torch.randperm(n, generator=generator)
    return perm[: n // 2], perm[n // 2:]


def _entry(value, n_samples: int, n_reference: int, floor=None, **extra) -> dict:
    out = {"value": value, "n_samples": n_samples, "n_reference": n_reference}
    if floor is not None:
        out["noise_floor"] = floor
    out.update(extra)
    return out


def _vector_metrics(fake: torch.Tensor, real: torch.Tensor, names: dict, noise_floor: bool, seed: int,
                    include_sliced: bool) -> dict:
    """Distances between vector sets ``fake`` and ``real`` under ``names`` (metric label -> key)."""
    g = torch.Generator().manual_seed(seed)
    if noise_floor:
        if real.shape[0] < 4:
            raise ValueError(f"a noise floor needs at least 4 reference samples, got {real.shape[0]}")
        ia, ib = _split(real.shape[0], g)
        half_a, ref = real[ia], real[ib]
        fake = fake[: half_a.shape[0]]
    else:
        half_a, ref = None, real
    n, m = fake.shape[0], ref.shape[0]

    def both(fn):
        return fn(fake, ref), (fn(half_a, ref) if half_a is not None else None)

    out = {}
    fd, fd_floor = both(metrics.frechet_distance)
    out[names["fd"]] = _entry(fd, n, m, fd_floor)
    if include_sliced:
        sw, sw_floor = both(lambda a, b: metrics.sliced_wasserstein2(a, b, 256, torch.Generator().manual_seed(seed)))
        out["sliced_w2"] = _entry(sw, n, m, sw_floor)
        mmd, mmd_floor = both(metrics.mmd_rbf)
        out["mmd_rbf"] = _entry(mmd, n, m, mmd_floor)
    else:
        # subsets of half the smaller set, so that the 50 subsets differ and their std means something
        subset = max(2, min(1000, min(n, m) // 2))
        kid, kid_floor = both(lambda a, b: metrics.kernel_distance(a, b, subset, 50, torch.Generator().manual_seed(seed)))
        out[names["kid"]] = _entry(kid.mean, n, m, kid_floor.mean if kid_floor else None, std=kid.std,
                                   subset_size=kid.subset_size, num_subsets=kid.num_subsets)
    k = min(3, n - 1, m - 1)
    pr, pr_floor = both(lambda a, b: metrics.precision_recall(b, a, k=k))
    out["precision"] = _entry(pr.precision, n, m, pr_floor.precision if pr_floor else None, k=k)
    out["recall"] = _entry(pr.recall, n, m, pr_floor.recall if pr_floor else None, k=k)
    return out


def evaluate_samples(samples: torch.Tensor, reference: torch.Tensor, kind: str, *, dataset: Optional[str] = None,
                     feature_net: Optional[FeatureNet] = None, sample_labels: Optional[torch.Tensor] = None,
                     reference_labels: Optional[torch.Tensor] = None, noise_floor: bool = True, seed: int = 0) -> dict:
    """Score ``samples: (N, ...)`` against ``reference: (M, ...)``; returns ``{"kind", "metrics": {name: entry}}``.

    Each entry has ``value``, ``n_samples``, ``n_reference`` and (with ``noise_floor``) ``noise_floor``.
    For images a ``feature_net`` is required (see :func:`difflab.evaluation.features.feature_network`);
    ``dataset`` names the feature-space metrics (``FD-<dataset>``); ``sample_labels`` (the classes the
    samples were generated for) adds ``class_accuracy``.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    samples, reference = torch.as_tensor(samples), torch.as_tensor(reference)
    if samples.shape[1:] != reference.shape[1:]:
        raise ValueError(f"samples of shape {tuple(samples.shape[1:])} vs reference of shape {tuple(reference.shape[1:])}")
    if samples.shape[0] < 2:
        raise ValueError(f"need at least 2 samples, got {samples.shape[0]}")
    result = {"kind": kind, "n_samples": samples.shape[0], "n_reference": reference.shape[0],
              "noise_floor": "metric between two random halves of the reference, at the same counts" if noise_floor else None}
    if kind == "points":
        flat_s, flat_r = samples.reshape(samples.shape[0], -1), reference.reshape(reference.shape[0], -1)
        result["metrics"] = _vector_metrics(flat_s, flat_r, {"fd": "FD-raw"}, noise_floor, seed, include_sliced=True)
        return result
    if feature_net is None:
        raise ValueError("image metrics need a feature network (difflab.evaluation.feature_network)")
    name = dataset or "features"
    fs, fr = feature_net.embed(samples), feature_net.embed(reference)
    result["feature_space"] = f"penultimate layer ({feature_net.feature_dim} values) of a classifier trained on {name}; not Inception"
    result["metrics"] = _vector_metrics(fs, fr, {"fd": f"FD-{name}", "kid": f"KID-{name}"}, noise_floor, seed,
                                        include_sliced=False)
    if sample_labels is not None:
        sample_labels = torch.as_tensor(sample_labels, dtype=torch.long)
        if sample_labels.shape != (samples.shape[0],):
            raise ValueError(f"need one label per sample: {samples.shape[0]} samples, labels {tuple(sample_labels.shape)}")
        acc = float((feature_net.predict(samples) == sample_labels).double().mean())
        extra = {}
        if reference_labels is not None:
            extra["reference_accuracy"] = float((feature_net.predict(reference) == reference_labels).double().mean())
        result["metrics"]["class_accuracy"] = _entry(acc, samples.shape[0], reference.shape[0], **extra)
    return result


def _reference_data(cfg, data_path: Optional[str]):
    """The reference set for a run: fresh draws (the next seed) for generated point sets, else the data set itself."""
    from difflab.data import load_dataset

    path = cfg.data.path_for_run(data_path)
    ds = load_dataset(cfg.data.name, path, cfg.data.n, seed=cfg.train.seed, **cfg.data.options)
    if ds.kind == "points" and path is None:  # a generator: held-out points are one seed away
        return load_dataset(cfg.data.name, None, cfg.data.n, seed=cfg.train.seed + 1, **cfg.data.options), \
            "held-out draws (training seed + 1)"
    return ds, "the training data set"


def evaluate_run(run_dir, num_samples: int = 1000, sampler: Optional[str] = None, steps: Optional[int] = None, seed: int = 0,
                 batch_size: int = 256, data_path: Optional[str] = None, noise_floor: bool = True,
                 cache_root=None, progress: bool = False, which="latest", **sampler_options) -> dict:
    """Sample a trained run and score it against its data (the JSON behind ``difflab eval RUN_DIR``).

    Uses :func:`difflab.pipeline.load_run` (EMA weights), samples ``num_samples`` with ``sampler``/``steps``
    (default: the run's, :meth:`~difflab.pipeline.Pipeline.resolve_sampler` — DDIM-50, or a DDGAN run's own chain)
    (class-conditional models cycle through the classes and get ``class_accuracy``), and calls
    :func:`evaluate_samples` against the run's data set (``data_path`` overrides the config's path). Image
    runs use the cached feature network of the data set (trained on first use, about a minute). ``which`` picks the
    checkpoint (``"latest"``, or a step).
    """
    from difflab.pipeline import load_run

    pipe = load_run(run_dir, which=which)
    sampler, steps = pipe.resolve_sampler(sampler, steps)
    cfg = pipe.config
    ds, reference_desc = _reference_data(cfg, data_path)
    start = time.perf_counter()
    labels = pipe.labels(num_samples)
    out = pipe.sample(num_samples, sampler=sampler, steps=steps, seed=seed, batch_size=batch_size, progress=progress,
                      **sampler_options)
    sample_seconds = time.perf_counter() - start
    kind = "image" if ds.kind == "image" else "points"
    extra = {}
    if kind == "image":
        key = cfg.data.name if not data_path else f"{cfg.data.name}-{Path(data_path).name}"
        net, info = feature_network(key, ds.x, ds.y, ds.num_classes or None, root=cache_root)
        extra = {"dataset": key, "feature_net": net, "sample_labels": labels, "reference_labels": ds.y}
        feature_info = {k: info[k] for k in ("held_out_accuracy", "cache", "cached") if k in info}
    result = evaluate_samples(out.x, ds.x, kind, noise_floor=noise_floor, seed=seed, **extra)
    result["run"] = {"run_dir": str(run_dir), "step": pipe.step, "sampler": sampler, "steps": steps, "nfe": out.nfe,
                     "seed": seed, "sample_seconds": sample_seconds, "dataset": cfg.data.name, "reference": reference_desc}
    if kind == "image":
        result["feature_net"] = feature_info
    return result
