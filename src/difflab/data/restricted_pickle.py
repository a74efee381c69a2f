"""A pickle reader that admits only plain data: for data sets distributed as Python pickles (CIFAR-10).

``pickle.load`` runs whatever callable a file names, so a crafted "data" file executes code. This
reader resolves no global except NumPy's array, scalar and dtype reconstructors, and those only build arrays
of plain numeric or byte-string dtypes, and the latin-1 encoder protocol-2 pickles use for bytes; dicts, lists, tuples, strings, bytes, numbers, booleans and
None come from pickle's own opcodes. Anything else is refused with :class:`RestrictedPickleError`
before it is called.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import numpy as np

PLAIN_DTYPE_KINDS = "biufcS"
"""bool, signed and unsigned integers, floats, complex, byte strings: no objects, no Python callables."""


class RestrictedPickleError(pickle.UnpicklingError):
    """A pickle that names something other than plain data."""


def _dtype(*args, **kwargs) -> np.dtype:
    dtype = np.dtype(*args, **kwargs)
    if dtype.kind not in PLAIN_DTYPE_KINDS or dtype.fields is not None:
        raise RestrictedPickleError(f"array dtype {dtype} is not a plain numeric dtype")
    return dtype


def _reconstruct(cls, shape, dtype_code):
    if cls is not np.ndarray:
        raise RestrictedPickleError("only plain NumPy arrays may be reconstructed")
    return np.ndarray.__new__(np.ndarray, shape, _dtype(dtype_code))


def _scalar(dtype, data=None):
    """NumPy's scalar reconstructor (an ``np.int64`` label), for plain dtypes only."""
    if not isinstance(dtype, np.dtype) or dtype.kind not in PLAIN_DTYPE_KINDS:
        raise RestrictedPickleError("only NumPy scalars of plain numeric dtypes may be reconstructed")
    if not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise RestrictedPickleError("a NumPy scalar needs exactly its dtype's bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _frombuffer(buf, dtype, shape, order):
    """NumPy's array reconstructor of pickle protocol 5, for plain dtypes only (copied out of ``buf``)."""
    dtype = _dtype(dtype)
    if not isinstance(buf, (bytes, bytearray, memoryview, pickle.PickleBuffer)) or order not in ("C", "F"):
        raise RestrictedPickleError("a protocol-5 array needs a byte buffer and order C or F")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


def _encode(text, encoding="utf-8"):
    """``_codecs.encode``, as protocol-2 pickles written by Python 3 use it for ``bytes``: str -> bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise RestrictedPickleError("_codecs.encode only turns a str into latin-1 bytes")
    return text.encode("latin1")


_ALLOWED = {
    ("_codecs", "encode"): _encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
}
"""The only globals a data pickle may name (what NumPy writes for an array), mapped to checked versions."""


class _Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RestrictedPickleError(f"refuses {module}.{name}: a data file may hold only plain data") from None

    def persistent_load(self, pid):
        raise RestrictedPickleError("refuses persistent references")


def _check(obj: Any) -> Any:
    """Arrays must end up with plain dtypes (``ndarray.__setstate__`` can set one); walk containers."""
    if isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.kind not in PLAIN_DTYPE_KINDS:
            raise RestrictedPickleError(f"array dtype {obj.dtype} is not a plain numeric dtype")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check(k), _check(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check(v)
    elif not (obj is None or isinstance(obj, (bool, int, float, complex, str, bytes))):
        raise RestrictedPickleError(f"holds a {type(obj).__name__}, not plain data")
    return obj


def loads(data: bytes, encoding: str = "bytes") -> Any:
    """Unpickle ``data`` admitting only plain data (module docstring); ``encoding`` as for ``pickle.load``
    (``"bytes"`` reads Python 2 strings as bytes, as the CIFAR-10 files need)."""
    return _check(_Unpickler(io.BytesIO(data), encoding=encoding).load())
