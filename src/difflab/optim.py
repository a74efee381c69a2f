"""The optimiser every difflab training loop uses: AdamW on torch's fused kernel where it has one.

The fused kernel updates every parameter tensor in one pass; the ``foreach`` and per-tensor
implementations launch about ten small operations per tensor. On the digits U-Net (730k parameters
in 384 tensors, one CPU thread) a step takes about 1.1 ms fused, 4.8 ms foreach and 7.1 ms per
tensor. The update is the same AdamW (decoupled weight decay, bias-corrected moments); only the
floating-point summation order differs.
"""

from __future__ import annotations

from typing import Iterable

import torch


def adamw(params: Iterable[torch.nn.Parameter], lr: float, weight_decay: float = 0.0,
          betas: tuple = (0.9, 0.999)) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with ``fused=True`` when torch supports it for these parameters, else ``foreach=True``.

    Fused AdamW needs floating-point parameters on a device with the kernel (CPU and CUDA in torch ≥ 2.4);
    torch refuses other cases when the optimiser is built, and then the ``foreach`` form is used.
    """
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, foreach=True)
