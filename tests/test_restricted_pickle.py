"""The restricted reader of data pickles (CIFAR-10 batches): plain data in, nothing called out."""

import os
import pickle

import numpy as np
import pytest

from difflab.data import load_dataset, restricted_pickle
from difflab.data.dataset import DataError
from difflab.limits import LimitError, expanded_size


class _Payload:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.makedirs, (self.path,))


def _batch(m=4):
    rng = np.random.default_rng(0)
    return {b"batch_label": b"training batch 1 of 5", b"labels": list(rng.integers(0, 10, m)),
            b"data": rng.integers(0, 256, (m, 3072), dtype=np.uint8), b"filenames": [b"a.png"] * m}


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_plain_batches_read_back_exactly(protocol):
    batch = _batch()
    out = restricted_pickle.loads(pickle.dumps(batch, protocol=protocol))
    assert out[b"labels"] == batch[b"labels"] and out[b"filenames"] == batch[b"filenames"]
    np.testing.assert_array_equal(out[b"data"], batch[b"data"])


@pytest.mark.parametrize("protocol", [0, 2, 5])
@pytest.mark.parametrize("make", [lambda p: _Payload(p), lambda p: np.array([_Payload(p)], dtype=object),
                                  lambda p: {b"data": [_Payload(p)]}])
def test_anything_callable_is_refused_and_never_called(tmp_path, protocol, make):
    marker = tmp_path / "ran"
    with pytest.raises(restricted_pickle.RestrictedPickleError):
        restricted_pickle.loads(pickle.dumps(make(str(marker)), protocol=protocol))
    assert not marker.exists()


def test_object_and_structured_dtypes_are_refused():
    for arr in (np.array([1, "a"], dtype=object), np.zeros(2, dtype=[("a", "i4")])):
        with pytest.raises(restricted_pickle.RestrictedPickleError):
            restricted_pickle.loads(pickle.dumps(arr, protocol=2))


def test_cifar10_loader_reads_plain_batches_and_refuses_payloads(tmp_path):
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        (tmp_path / name).write_bytes(pickle.dumps(_batch(), protocol=2))
    ds = load_dataset("cifar10", str(tmp_path))
    assert ds.x.shape == (20, 3, 32, 32) and ds.num_classes == 10
    (tmp_path / "data_batch_3").write_bytes(pickle.dumps({b"data": _Payload(str(tmp_path / "ran")), b"labels": []}))
    with pytest.raises(DataError, match="data_batch_3.*plain data"):
        load_dataset("cifar10", str(tmp_path))
    assert not (tmp_path / "ran").exists()


def test_expanded_size_counts_shared_objects_per_use_and_refuses_cycles():
    a = [1] * 10
    b = [a] * 10  # 1 + 10 * 11
    assert expanded_size(b, "x") == 111
    bomb = [1] * 10
    for _ in range(8):
        bomb = [bomb] * 10
    with pytest.raises(LimitError, match="aliases"):
        expanded_size(bomb, "x")
    loop: list = []
    loop.append(loop)
    with pytest.raises(LimitError, match="itself"):
        expanded_size(loop, "x")
