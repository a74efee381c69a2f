"""Checkpoints: safetensors weights + a JSON description, written atomically. Never pickles.

Layout inside a run directory::

    checkpoints/step_00000100.safetensors   model.*, ema.*, optimizer.* tensors (and any further parts)
    checkpoints/step_00000100.json          config, path, parameterisation, step, data shape,
                                            bookkeeping, the JSON index of the non-tensor state
                                            and the SHA-256 of the weights file
    checkpoints/latest.json                 {"step": 100, "name": "step_00000100"}

Every file is written to a temporary file in the same directory, flushed, ``fsync``-ed and moved
into place with ``os.replace`` (atomic on POSIX); ``latest.json`` is replaced last. A process killed
at any moment (SIGKILL included) therefore leaves ``latest.json`` naming a complete, earlier
checkpoint, and :func:`load_checkpoint` checks the weights against the recorded hash.

Nested state (an optimiser's ``state_dict``, the EMA's) is split into tensors, stored in the
safetensors file under dotted keys, and a JSON skeleton that refers to them by key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from difflab.config import RunConfig

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
FORMAT = "difflab-checkpoint"
FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8,})$")


class CheckpointError(RuntimeError):
    """A checkpoint that exists but cannot be used (corrupt, mismatched, or of another format)."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. ``model``/``ema`` are ``{name: tensor}``; ``optimizer`` a ``state_dict``; ``parts``
    holds any further saved state by part name (the engine's other modules, see :mod:`difflab.engine.loop`)."""

    step: int
    config: RunConfig
    model: dict
    ema: Optional[dict] = None
    optimizer: Optional[dict] = None
    meta: dict = field(default_factory=dict)
    file: Optional[Path] = None
    parts: dict = field(default_factory=dict)


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


# --- atomic file writes -----------------------------------------------------------------------------
def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the complete new one.

    Temp file in the same directory -> write -> flush -> fsync -> ``os.replace`` -> fsync the directory. The file
    gets the mode of an ordinary new file (``0o666`` less the umask; ``mkstemp`` alone would leave ``0o600``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def atomic_write_json(path: Union[str, Path], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms cannot open a directory; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --- nested state <-> (JSON skeleton, flat tensors) ---------------------------------------------------
def flatten_state(obj: Any, prefix: str, tensors: dict) -> Any:
    """Replace every tensor in a nested dict/list/tuple by ``{"__tensor__": key}`` and store it in ``tensors``.

    Non-string dict keys (an optimiser's integer parameter ids) and tuples are kept exact with
    ``{"__dict__": [[key, value], ...]}`` and ``{"__tuple__": [...]}``.
    """
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: flatten_state(v, f"{prefix}.{k}", tensors) for k, v in obj.items()}
        return {"__dict__": [[k, flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {prefix!r} in a checkpoint (tensors and JSON values only)")


def unflatten_state(skeleton: Any, tensors: dict) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            return tensors[skeleton["__tensor__"]]
        if set(skeleton) == {"__dict__"}:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if set(skeleton) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


# --- save / load ------------------------------------------------------------------------------------------
def save_checkpoint(run_dir: Union[str, Path], step: int, config: RunConfig, model: dict,
                    ema: Optional[dict] = None, optimizer: Optional[dict] = None,
                    meta: Optional[dict] = None, keep: int = 2, parts: Optional[dict] = None) -> Path:
    """Write the checkpoint of ``step`` atomically, point ``latest.json`` at it, keep the newest ``keep``.

    Args:
        run_dir: the run directory (``checkpoints/`` is created inside).
        step: optimiser steps taken.
        config: the run's :class:`~difflab.config.RunConfig` (stored in full).
        model: the network's ``state_dict``.
        ema: :meth:`difflab.ema.EMA.state_dict` (optional).
        optimizer: the optimiser's ``state_dict`` (optional).
        meta: JSON-serialisable extras (path, parameterisation, data shape, bookkeeping).
        keep: how many checkpoints to keep (0: all).
        parts: further nested state by part name (stored like the optimiser's; loaded as ``Checkpoint.parts``).
    Returns: the JSON file written.
    """
    directory = Path(run_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(directory)
    name = checkpoint_name(step)
    tensors: dict = {}
    index = {part: flatten_state(state, part, tensors)
             for part, state in (("model", model), ("ema", ema), ("optimizer", optimizer), *(parts or {}).items())
             if state is not None}
    weights = safetensors_save(tensors, metadata={"format": FORMAT, "step": str(step)})
    atomic_write_bytes(directory / f"{name}.safetensors", weights)
    record = {
        "format": FORMAT, "version": FORMAT_VERSION, "step": int(step),
        "weights": f"{name}.safetensors", "sha256": hashlib.sha256(weights).hexdigest(),
        "saved_at": time.time(), "torch": torch.__version__,
        "config": config.to_dict(), "meta": meta or {}, "index": index,
    }
    atomic_write_json(directory / f"{name}.json", record)
    atomic_write_json(directory / LATEST, {"step": int(step), "name": name})
    _prune(directory, keep, protect=name)
    return directory / f"{name}.json"


def list_checkpoints(run_dir: Union[str, Path]) -> list[int]:
    """Steps of the complete checkpoints (JSON + weights present) in ``run_dir``, ascending."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if not directory.is_dir():
        return []
    steps = []
    for p in directory.glob("step_*.json"):
        m = _NAME.match(p.stem)
        if m and p.with_suffix(".safetensors").exists():
            steps.append(int(m.group(1)))
    return sorted(steps)


def has_checkpoint(run_dir: Union[str, Path]) -> bool:
    return (Path(run_dir) / CHECKPOINT_DIR / LATEST).is_file()


def load_checkpoint(run_dir: Union[str, Path], which: Union[str, int] = "latest",
                    map_location: Union[str, torch.device] = "cpu") -> Checkpoint:
    """Load a checkpoint of ``run_dir``: ``which`` is ``"latest"``, a step number or ``"step_00000100"``.

    Raises ``FileNotFoundError`` when the run or the checkpoint does not exist and
    :class:`CheckpointError` when it exists but is corrupt or of another format.
    """
    directory = Path(run_dir) / CHECKPOINT_DIR
    if which == "latest":
        pointer = directory / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"no checkpoint in {str(run_dir)!r} (missing {CHECKPOINT_DIR}/{LATEST})")
        name = _read_json(pointer)["name"]
    elif isinstance(which, int) or str(which).isdigit():
        name = checkpoint_name(int(which))
    else:
        name = str(which)
    json_file = directory / f"{name}.json"
    if not json_file.is_file():
        raise FileNotFoundError(f"no checkpoint {name!r} in {str(run_dir)!r}")
    record, tensors = read_verified(json_file, FORMAT, "checkpoint")
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    state = {part: unflatten_state(skeleton, tensors) for part, skeleton in record["index"].items()}
    return Checkpoint(step=int(record["step"]), config=RunConfig.from_dict(record["config"]),
                      model=state["model"], ema=state.get("ema"), optimizer=state.get("optimizer"),
                      meta=record.get("meta", {}), file=json_file,
                      parts={k: v for k, v in state.items() if k not in ("model", "ema", "optimizer")})


def read_verified(json_file: Path, fmt: str, kind: str) -> tuple:
    """The JSON record of a saved artefact and its safetensors weights, checked: the record must be valid JSON
    of format ``fmt`` and the weights file it names must exist and match its recorded SHA-256. Returns
    ``(record, tensors)``; raises :class:`CheckpointError` naming the file otherwise (``kind`` for the message)."""
    record = _read_json(json_file)
    if record.get("format") != fmt:
        raise CheckpointError(f"{json_file} is not a difflab {kind}")
    weights_file = json_file.parent / record["weights"]
    if not weights_file.is_file():
        raise CheckpointError(f"{json_file} refers to a missing weights file {weights_file.name}")
    data = weights_file.read_bytes()
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{weights_file} does not match the hash recorded in {json_file.name}")
    return record, safetensors_load(data)


def read_record(directory: Union[str, Path], record_name: str, fmt: str, kind: str, how: str) -> tuple:
    """:func:`read_verified` of ``directory/record_name``; ``FileNotFoundError`` (saying ``how`` to write one) when
    the directory has no such record."""
    record_file = Path(directory) / record_name
    if not record_file.is_file():
        raise FileNotFoundError(f"no {kind} in {str(directory)!r} (missing {record_name}; {how})")
    return read_verified(record_file, fmt, kind)


def read_json(path: Path) -> dict:
    """A JSON file as a dict; :class:`CheckpointError` naming the file when it is not valid JSON."""
    return _read_json(path)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None


def _prune(directory: Path, keep: int, protect: str) -> None:
    steps = list_checkpoints(directory.parent)
    for step in steps[:-keep] if keep > 0 else []:
        name = checkpoint_name(step)
        if name == protect:
            continue
        for suffix in (".json", ".safetensors"):  # the JSON first: a half-pruned pair is never listed
            (directory / f"{name}{suffix}").unlink(missing_ok=True)


def _remove_stale_temps(directory: Path) -> None:
    """Temp files left by a process killed mid-write are never referenced; remove them."""
    for p in directory.glob(".*.tmp"):
        p.unlink(missing_ok=True)
