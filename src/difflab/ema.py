"""Exponential moving average of a network's weights, for sampling.

After every optimiser step ``θ_ema ← δ_n θ_ema + (1 − δ_n) θ`` with the warm-up decay

    δ_n = min(decay, (1 + n) / (10 + n)),   n = number of averaging updates so far,

(the num_updates rule of TensorFlow's ExponentialMovingAverage), so early averages are not dominated
by the random initialisation. Before ``start`` optimiser steps the average simply copies the weights
(``θ_ema = θ``) and ``n`` stays 0. Buffers (e.g. normalisation statistics) are copied, not averaged.
The average is kept in float32 whatever the network's dtype.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

WARMUP_OFFSET = 10
"""The ``10`` of ``(1 + n) / (10 + n)``: the first average step keeps 10 % of the old weights."""


class EMA:
    """The averaged weights ``θ_ema`` of ``model`` (a copy; ``model`` itself is never changed except
    inside :meth:`swapped_in`).

    Args:
        model: the network being trained (unwrapped, not the DDP wrapper).
        decay: the asymptotic decay ``δ`` in ``[0, 1)``.
        start: optimiser steps before averaging begins.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, start: int = 0):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must lie in [0, 1), got {decay}")
        if start < 0:
            raise ValueError(f"EMA start must be >= 0, got {start}")
        self.decay, self.start = float(decay), int(start)
        self.num_updates = 0
        self.shadow = {name: t.detach().float().clone() for name, t in _tensors(model).items()}

    def decay_at(self, n: int) -> float:
        """``δ_n = min(decay, (1 + n)/(10 + n))``."""
        return min(self.decay, (1.0 + n) / (WARMUP_OFFSET + n))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Average in the weights after optimiser step ``step`` (1-based)."""
        params = dict(model.named_parameters())
        if step <= self.start:
            for name, t in _tensors(model).items():
                self.shadow[name].copy_(t.detach())
            return
        delta = self.decay_at(self.num_updates)
        averaged, current = [], []
        for name, t in _tensors(model).items():
            if name in params and t.dtype.is_floating_point:
                averaged.append(self.shadow[name])
                current.append(t.detach().float())
            else:
                self.shadow[name].copy_(t.detach())
        if averaged:
            torch._foreach_lerp_(averaged, current, 1.0 - delta)  # θ_ema + (1−δ)(θ − θ_ema) = δ θ_ema + (1−δ) θ
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the averaged weights into ``model``."""
        for name, t in _tensors(model).items():
            t.copy_(self.shadow[name].to(t.dtype))

    @contextmanager
    def swapped_in(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the averaged weights into ``model`` (e.g. to sample), restoring them after."""
        saved = {name: t.detach().clone() for name, t in _tensors(model).items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, t in _tensors(model).items():
                    t.copy_(saved[name])

    def state_dict(self) -> dict:
        """``{"shadow": {name: tensor}, "num_updates": int, "decay": float, "start": int}``."""
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates, "decay": self.decay, "start": self.start}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) ^ set(state["shadow"])
        if missing:
            raise ValueError(f"EMA state does not match the model: differing tensors {sorted(missing)[:3]}")
        for name, t in state["shadow"].items():
            self.shadow[name].copy_(t)
        self.num_updates = int(state["num_updates"])


def _tensors(model: nn.Module) -> dict:
    """Parameters and persistent buffers by name (the same keys as ``model.state_dict()``)."""
    return dict(model.state_dict(keep_vars=True))
