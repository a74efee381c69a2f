"""The in-memory data set every loader returns, and the error every loader raises."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from difflab.networks.embeddings import NULL_LABEL

KINDS = ("image", "points")


class DataError(ValueError):
    """A data set that cannot be read: bad path, unreadable file, wrong shape or values (one-line message)."""


@dataclass(repr=False, eq=False)
class ArrayDataset(torch.utils.data.Dataset):
    """Examples held in memory as one tensor.

    Attributes:
        x: ``float32 (N, ...)``: images ``(N, C, H, W)`` scaled to ``[-1, 1]``, or points ``(N, D)``.
        y: ``long (N,)`` class labels in ``0..num_classes−1``, or ``None`` for unlabelled data.
        num_classes: number of classes (0 when unlabelled).
        kind: ``"image"`` or ``"points"``.
        name: where the data came from (for messages and run metadata).

    ``ds[i]`` is ``(x_i, y_i)`` with ``y_i = NULL_LABEL`` (−1, "no class") for unlabelled data, so a
    ``DataLoader`` sees one layout whatever the data set.
    """

    x: torch.Tensor
    y: Optional[torch.Tensor] = None
    num_classes: int = 0
    kind: str = "points"
    name: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"{self.name or 'data set'}: kind must be one of {KINDS}, got {self.kind!r}")
        self.x = torch.as_tensor(self.x, dtype=torch.float32)
        if self.x.ndim < 2 or self.x.shape[0] == 0:
            raise DataError(f"{self.name or 'data set'}: need a non-empty (N, ...) array, got shape {tuple(self.x.shape)}")
        if self.kind == "image" and self.x.ndim != 4:
            raise DataError(f"{self.name or 'data set'}: images must be (N, C, H, W), got shape {tuple(self.x.shape)}")
        if self.y is not None:
            self.y = torch.as_tensor(self.y, dtype=torch.long)
            if self.y.shape != (self.x.shape[0],):
                raise DataError(f"{self.name or 'data set'}: {self.x.shape[0]} examples but labels of shape "
                                f"{tuple(self.y.shape)}")
            if self.y.min() < 0 or self.y.max() >= max(self.num_classes, 1):
                raise DataError(f"{self.name or 'data set'}: labels must lie in 0..{self.num_classes - 1}")
        elif self.num_classes:
            raise DataError(f"{self.name or 'data set'}: num_classes={self.num_classes} but no labels")

    def __repr__(self) -> str:
        return (f"ArrayDataset({self.name!r}, kind={self.kind!r}, n={len(self)}, shape={self.shape}, "
                f"num_classes={self.num_classes})")

    @property
    def shape(self) -> tuple:
        """Per-example shape, e.g. ``(1, 28, 28)`` or ``(2,)``."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i):
        return self.x[i], (self.y[i] if self.y is not None else torch.tensor(NULL_LABEL))

    def subset(self, n: Optional[int], seed: int = 0) -> "ArrayDataset":
        """``n`` examples drawn without replacement by a seeded permutation (all of them, in order, if ``n`` is None)."""
        if n is None:
            return self
        if not 1 <= n <= len(self):
            raise DataError(f"{self.name or 'data set'}: asked for n={n} examples, it has {len(self)}")
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n]
        return ArrayDataset(self.x[idx], None if self.y is None else self.y[idx], self.num_classes, self.kind, self.name)
