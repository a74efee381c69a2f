"""Checked argument types for the command line: numbers within bounds, finite floats, a usable device.

argparse calls these on the text of an option; a ``ValueError``/``ArgumentTypeError`` they raise becomes
the one-line usage error ``difflab: error: argument --num: ...``. Bounds come from :mod:`difflab.limits`.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from difflab import limits


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``[low, high]`` (``1e3``-style text is refused: counts are written as integers)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in {low}..{high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(text: str) -> float:
    """A finite number (NaN and ±inf are refused: they would silently turn every sample into NaN)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


count = bounded_int(1, limits.MAX_SAMPLES)
"""``--num``, ``--batch-size``, ``--pairs``: at least one, at most :data:`difflab.limits.MAX_SAMPLES`."""
steps = bounded_int(1, limits.MAX_NFE)
"""``--steps``: sampler steps or network evaluations."""
training_steps = bounded_int(1, limits.MAX_STEPS)
seed = bounded_int(0, limits.MAX_SEED)


def device(text: str) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:1``, ``mps``; one line otherwise."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r} (use cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this torch build or machine has no CUDA device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available here")
    elif dev.type != "cpu":
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (use cpu, cuda, cuda:N or mps)")
    return text
