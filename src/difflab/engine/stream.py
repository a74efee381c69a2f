"""The engine's data stream and process context: per-step seeds, batch positions, DDP ranks, devices.

Every random draw of optimiser step ``k`` (1-based; its 0-based ``index = k − 1`` names it) comes from a
generator seeded by :func:`step_seed` ``(seed, index, stream)``, and the global batch of step ``k`` is the
positions ``index·B … index·B + B − 1`` of an endless sequence of data-set permutations, one per epoch
(:func:`batch_indices`; sampling without replacement, as ``DistributedSampler`` does). A step is therefore a
pure function of the weights, the optimiser state and ``(seed, k)``, which makes ``--resume`` bit-exact.

Under ``torchrun`` (env ``WORLD_SIZE > 1``) rank ``r`` of ``N`` takes rows ``r, r + N, r + 2N, …`` of the
global batch (:attr:`Dist.rows`), so the batch size is the global batch and must be divisible by ``N``.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from difflab.engine.errors import TrainingError


# --- per-step randomness ----------------------------------------------------------------------------------
def step_seed(seed: int, index: int, stream: str) -> int:
    """A 63-bit seed that is a pure function of ``(seed, index, stream)`` (BLAKE2b; no process state)."""
    digest = hashlib.blake2b(f"{seed}/{index}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits the ``n`` examples (long ``[n]``)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(step_seed(seed, epoch, "epoch")))


def batch_indices(n: int, batch_size: int, seed: int, index: int) -> torch.Tensor:
    """Data indices of the global batch of step ``index`` (0-based): positions ``index·B … index·B + B − 1``
    of the concatenated epoch permutations (each example once per epoch), long ``[B]``."""
    position, remaining, parts = index * batch_size, batch_size, []
    while remaining:
        epoch, offset = divmod(position, n)
        take = min(n - offset, remaining)
        parts.append(epoch_permutation(n, seed, epoch)[offset:offset + take])
        position, remaining = position + take, remaining - take
    return torch.cat(parts)


def seed_global_rng(seed: int, device: torch.device) -> None:
    """Seed torch's default generators of the CPU and of ``device`` (not ``torch.manual_seed``, which
    also queues a lazy seeding of every accelerator type on each call)."""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index or 0].manual_seed(seed)


# --- processes and devices ------------------------------------------------------------------------------------
@dataclass
class Dist:
    """This process's place under ``torchrun``: ``rank`` of ``world``; ``created`` if we opened the group."""

    rank: int = 0
    world: int = 1
    created: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def rows(self) -> slice:
        """This rank's rows of a global batch."""
        return slice(self.rank, None, self.world)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_ok(self, ok: bool, device: torch.device) -> bool:
        """True on every rank iff ``ok`` on every rank (one all-reduce; ``ok`` itself when alone)."""
        if self.world == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() == 1.0)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the ranks (``values`` itself when alone)."""
        if self.world > 1:
            values = values.clone()
            dist.all_reduce(values)
            values /= self.world
        return values

    def close(self) -> None:
        if self.created:
            dist.destroy_process_group()


def resolve_device(preference: str, explicit=None) -> torch.device:
    """``explicit`` if given; else ``preference`` (``auto``: CUDA when available, ``cuda:LOCAL_RANK`` under torchrun)."""
    if explicit is not None:
        return torch.device(explicit)
    if preference == "cuda" and not torch.cuda.is_available():
        raise TrainingError("train.device is 'cuda' but no CUDA device is available")
    use_cuda = preference == "cuda" or (preference == "auto" and torch.cuda.is_available())
    if not use_cuda:
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def init_distributed(device: torch.device) -> Dist:
    """Join (or, with env ``WORLD_SIZE > 1``, open: gloo on CPU, NCCL on CUDA) the process group."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), created=False)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_available():
        raise TrainingError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), created=True)


def autocast_dtype(mode: str, device: torch.device) -> Optional[torch.dtype]:
    """``bf16`` → bfloat16; ``auto`` → bfloat16 on a CUDA device that supports it; else None (fp32)."""
    if mode == "bf16":
        return torch.bfloat16
    if mode == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def autocast(device: torch.device, dtype: Optional[torch.dtype]):
    """``torch.autocast`` to ``dtype`` on ``device``'s type, or a no-op when ``dtype`` is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
