"""Bounds on every size difflab reads from a file or a command line, checked before anything is allocated.

Run directories, checkpoints and configs are things people download and share, so they are read as
untrusted data: a number in them (a width, a data shape, a step count) is compared with these bounds
before a network is built or a tensor allocated, and a file's size before it is read. Each bound is
far above anything the project's own configs use and far below what would exhaust a machine.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

MIB = 1 << 20

MAX_CONFIG_BYTES = 1 * MIB
"""A YAML config file; the project's largest is under 2 KiB."""
MAX_CONFIG_VALUES = 10_000
"""Values (scalars, lists and mappings) in a config after YAML aliases are expanded (billion-laughs guard)."""
MAX_RECORD_BYTES = 64 * MIB
"""The JSON record of a checkpoint or classifier (config, metadata and the optimiser-state skeleton)."""
MAX_SAFETENSORS_HEADER = 100_000_000
"""The JSON header of a ``.safetensors`` file (the safetensors library's own limit)."""
MAX_PARAMETERS = 1 << 30
"""Parameters of one network (4 GiB in float32)."""
CHECKPOINT_COPIES = 4
"""A checkpoint holds at most four copies of the parameters: weights, EMA, and AdamW's two moments."""
CHECKPOINT_SLACK_BYTES = 16 * MIB
"""What a checkpoint holds besides those copies (step counters, the safetensors header)."""
MAX_SIDE = 4096
"""Each axis of one example (image side, channel count, point dimension)."""
MAX_EXAMPLE_VALUES = 1 << 24
"""Values in one example (a 4096×4096 single-channel image)."""
MAX_CLASSES = 100_000
MAX_T = 100_000
"""Discrete diffusion steps."""
MAX_WIDTH = 1 << 16
"""Any hidden width, embedding size or channel count of a network."""
MAX_DEPTH = 1024
"""Layers, blocks per level, levels."""
MAX_STEPS = 10**9
"""Training steps."""
MAX_BATCH = 1 << 20
MAX_SAMPLES = 1_000_000
"""Samples one command may draw (``--num``)."""
MAX_NFE = 100_000
"""Sampler steps (``--steps``)."""
MAX_THREADS = 1024
MAX_SEED = 2**63 - 1
"""torch generators take seeds in ``0 .. 2**64 − 1``; difflab adds small offsets, so it stays below ``2**63``."""


class LimitError(ValueError):
    """A size beyond its bound (one-line message naming what and where)."""


def check_int(name: str, value: Any, low: int, high: int) -> int:
    """``value`` as an ``int`` in ``[low, high]``; otherwise :class:`LimitError` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise LimitError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise LimitError(f"{name} must lie in {low}..{high}, got {value}")
    return value


def check_data_shape(shape: Any, source: str) -> tuple:
    """A data shape ``(D,)`` or ``(C, H, W)`` with every axis and the total within bounds."""
    if not isinstance(shape, (list, tuple)) or len(shape) not in (1, 2, 3):
        raise LimitError(f"{source}: data_shape must be a list of 1 to 3 integers, got {shape!r}")
    dims = tuple(check_int(f"{source}: data_shape[{i}]", d, 1, MAX_SIDE) for i, d in enumerate(shape))
    if math.prod(dims) > MAX_EXAMPLE_VALUES:
        raise LimitError(f"{source}: data_shape {list(dims)} has {math.prod(dims)} values per example, "
                         f"more than {MAX_EXAMPLE_VALUES}")
    return dims


def check_parameter_count(count: int, what: str) -> int:
    if count > MAX_PARAMETERS:
        raise LimitError(f"{what} would have {count:,} parameters, more than the limit of {MAX_PARAMETERS:,}")
    return count


def checkpoint_byte_budget(parameter_bytes: int) -> int:
    """The most bytes a checkpoint of a network of ``parameter_bytes`` can hold (:data:`CHECKPOINT_COPIES`)."""
    return CHECKPOINT_COPIES * parameter_bytes + CHECKPOINT_SLACK_BYTES


def expanded_size(value: Any, where: str, limit: int = MAX_CONFIG_VALUES) -> int:
    """The number of values in ``value`` with shared sub-objects counted once per use (as a copy would make
    them), refusing self-referencing structures and more than ``limit`` values. Linear in the number of
    distinct objects, so a billion-laughs document is measured without being expanded."""
    sizes: dict = {}
    active: set = set()

    def size(v: Any) -> int:
        if not isinstance(v, (dict, list, tuple)):
            return 1
        key = id(v)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise LimitError(f"{where}: refers to itself (a recursive YAML alias)")
        active.add(key)
        children = v.values() if isinstance(v, dict) else v
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                raise LimitError(f"{where}: holds more than {limit} values once its aliases are expanded")
        active.discard(key)
        sizes[key] = total
        return total

    return size(value)


def sequence_of_ints(name: str, values: Sequence, low: int, high: int, max_len: int) -> list:
    if len(values) > max_len:
        raise LimitError(f"{name} may hold at most {max_len} entries, got {len(values)}")
    return [check_int(f"{name}[{i}]", v, low, high) for i, v in enumerate(values)]


def build_within_limits(factory, what: str):
    """``factory()`` (a network constructor), first built on the ``meta`` device — no memory — to count its
    parameters against :data:`MAX_PARAMETERS`. Returns ``(module, parameter_bytes)``."""
    import torch

    with torch.device("meta"):
        probe = factory()
    count = sum(p.numel() for p in probe.parameters())
    check_parameter_count(count, what)
    nbytes = sum(p.numel() * p.element_size() for p in probe.parameters()) + \
        sum(b.numel() * b.element_size() for b in probe.buffers())
    del probe
    return factory(), nbytes
