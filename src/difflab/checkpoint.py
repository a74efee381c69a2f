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
from typing import Any, Callable, Optional, Union

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save

from difflab import limits
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
        "weights": f"{name}.safetensors", "sha256": hashlib.sha256(weights).hexdigest(), "bytes": len(weights),
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
                    map_location: Union[str, torch.device] = "cpu",
                    max_weight_bytes: Optional[int] = None) -> Checkpoint:
    """Load a checkpoint of ``run_dir``: ``which`` is ``"latest"``, a step number or ``"step_00000100"``.

    A run directory is data from anywhere, so every field is checked before it is used (see
    :func:`read_record` and :func:`read_verified`); ``max_weight_bytes`` bounds the weights file (the
    caller knows the network's size: :func:`difflab.limits.checkpoint_byte_budget`).

    Raises ``FileNotFoundError`` when the run or the checkpoint does not exist and
    :class:`CheckpointError` (one line naming the file) when it exists but cannot be used.
    """
    json_file = checkpoint_record_file(run_dir, which)
    record, tensors = read_verified(json_file, FORMAT, "checkpoint", max_weight_bytes=max_weight_bytes)
    tensors = {k: v.to(map_location) for k, v in tensors.items()}
    try:
        state = {part: unflatten_state(skeleton, tensors) for part, skeleton in record["index"].items()}
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{json_file}: its index does not match its weights ({type(err).__name__}: {err})") from None
    if "model" not in state:
        raise CheckpointError(f"{json_file}: holds no model weights")
    return Checkpoint(step=record["step"], config=record["run_config"], model=state["model"], ema=state.get("ema"),
                      optimizer=state.get("optimizer"), meta=record["meta"], file=json_file,
                      parts={k: v for k, v in state.items() if k not in ("model", "ema", "optimizer")})


def checkpoint_record_file(run_dir: Union[str, Path], which: Union[str, int] = "latest") -> Path:
    """The JSON record of checkpoint ``which`` of ``run_dir``. ``latest.json`` and ``which`` may name only
    ``step_<digits>`` inside the run's own ``checkpoints/`` folder."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    if which == "latest":
        pointer = directory / LATEST
        if not pointer.is_file():
            raise FileNotFoundError(f"no checkpoint in {str(run_dir)!r} (missing {CHECKPOINT_DIR}/{LATEST})")
        latest = _read_json(pointer, MAX_POINTER_BYTES)
        name = latest.get("name") if isinstance(latest, dict) else None
        if not isinstance(name, str) or not _NAME.match(name):
            raise CheckpointError(f"{pointer}: must name a checkpoint step_<digits> of this run, got {name!r}")
    elif isinstance(which, int) or str(which).isdigit():
        name = checkpoint_name(int(which))
    elif _NAME.match(str(which)):
        name = str(which)
    else:
        raise ValueError(f"a checkpoint is 'latest', a step number or step_<digits>, got {which!r}")
    json_file = directory / f"{name}.json"
    if not json_file.is_file():
        raise FileNotFoundError(f"no checkpoint {name!r} in {str(run_dir)!r}")
    return json_file


RECORD_FIELDS = {"format": str, "weights": str, "sha256": str, "step": int, "config": dict, "meta": dict}
"""What every saved record (checkpoint or classifier) holds, with its JSON type."""
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def read_record(json_file: Path, fmt: str, kind: str) -> dict:
    """The JSON record of a saved artefact, checked: at most :data:`~difflab.limits.MAX_RECORD_BYTES`, a
    mapping of format ``fmt`` with every :data:`RECORD_FIELDS` entry of its type, a weights file named
    ``<record stem>.safetensors`` beside it, and a valid config (parsed into ``record["run_config"]``).
    Raises :class:`CheckpointError` naming the file otherwise (``kind`` for the message)."""
    from difflab.config import ConfigError

    record = _read_json(json_file, limits.MAX_RECORD_BYTES)
    if not isinstance(record, dict) or record.get("format") != fmt:
        raise CheckpointError(f"{json_file} is not a difflab {kind}")
    for key, kind_of in RECORD_FIELDS.items():
        value = record.get(key)
        if not isinstance(value, kind_of) or isinstance(value, bool):
            raise CheckpointError(f"{json_file}: field {key!r} must be a JSON {kind_of.__name__}, got {value!r:.60}")
    if record["step"] < 0:
        raise CheckpointError(f"{json_file}: field 'step' must be >= 0, got {record['step']}")
    if record["weights"] != f"{json_file.stem}.safetensors":
        raise CheckpointError(f"{json_file}: its weights must be {json_file.stem}.safetensors beside it, "
                              f"not {record['weights']!r:.80}")
    if not _SHA256.match(record["sha256"]):
        raise CheckpointError(f"{json_file}: field 'sha256' is not a SHA-256 hex digest")
    if "bytes" in record and (not isinstance(record["bytes"], int) or isinstance(record["bytes"], bool)):
        raise CheckpointError(f"{json_file}: field 'bytes' must be an integer")
    if "index" in record and not isinstance(record["index"], dict):
        raise CheckpointError(f"{json_file}: field 'index' must be a JSON object")
    try:
        record["run_config"] = RunConfig.from_dict(record["config"])
    except ConfigError as err:
        raise CheckpointError(f"{json_file}: its config is invalid: {err}") from None
    return record


def read_verified(json_file: Path, fmt: str, kind: str, max_weight_bytes: Optional[int] = None) -> tuple:
    """The checked record (:func:`read_record`) and its safetensors weights. Before the weights are read:
    their size must match the record's ``bytes`` and stay within ``max_weight_bytes``, and the safetensors
    header must describe exactly the file (:func:`safetensors_header`); then the file is read once, its
    SHA-256 compared and its tensors parsed. Returns ``(record, tensors)``; raises :class:`CheckpointError` naming the file."""
    record = read_record(json_file, fmt, kind)
    weights_file = json_file.parent / record["weights"]
    if not weights_file.is_file():
        raise CheckpointError(f"{json_file} refers to a missing weights file {weights_file.name}")
    size = weights_file.stat().st_size
    if "bytes" in record and record["bytes"] != size:
        raise CheckpointError(f"{weights_file} has {size} bytes, but {json_file.name} records {record['bytes']}")
    if max_weight_bytes is not None and size > max_weight_bytes:
        raise CheckpointError(f"{weights_file} has {size:,} bytes, more than this model's checkpoint can hold "
                              f"({max_weight_bytes:,})")
    safetensors_header(weights_file, size)
    data = weights_file.read_bytes()  # read once: hashed, then parsed
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{weights_file} does not match the hash recorded in {json_file.name}")
    try:
        tensors = safetensors_load(data)
    except Exception as err:  # safetensors raises its own SafetensorError (not importable by a stable name)
        raise CheckpointError(f"{weights_file}: unreadable safetensors file ({type(err).__name__})") from None
    return record, tensors


def load_saved_module(directory: Union[str, Path], record_name: str, fmt: str, kind: str, how: str,
                      build: "Callable[[dict], torch.nn.Module]") -> tuple:
    """A module saved as ``directory/record_name`` + safetensors, read as untrusted input: the checked record
    (:func:`read_record`); ``build(record)`` — which validates the sizes it reads from the record — run first on the
    ``meta`` device to count the parameters (:func:`difflab.limits.build_within_limits`); the weights read within
    that network's byte budget (:func:`read_verified`) and loaded by :func:`load_weights`. Returns
    ``(record, module)``; ``FileNotFoundError`` (saying ``how`` to write one) when there is no record, and
    :class:`CheckpointError` naming the file for anything wrong in it."""
    record_file = Path(directory) / record_name
    if not record_file.is_file():
        raise FileNotFoundError(f"no {kind} in {str(directory)!r} (missing {record_name}; {how})")
    record = read_record(record_file, fmt, kind)
    try:
        net, nbytes = limits.build_within_limits(lambda: build(record), f"the {kind}")
    except (limits.LimitError, ValueError, TypeError) as err:
        raise CheckpointError(f"{record_file}: {err}") from None
    record, tensors = read_verified(record_file, fmt, kind, max_weight_bytes=limits.checkpoint_byte_budget(nbytes))
    load_weights(net, tensors, record_file)
    return record, net


def read_json(path: Path) -> Any:
    """A JSON file of at most :data:`~difflab.limits.MAX_RECORD_BYTES`; :class:`CheckpointError` naming the file
    when it is larger or not valid JSON."""
    return _read_json(path, limits.MAX_RECORD_BYTES)


def safetensors_header(weights_file: Path, size: int) -> dict:
    """Read and check the header of a ``.safetensors`` file without reading its tensors: an 8-byte
    little-endian length of at most :data:`~difflab.limits.MAX_SAFETENSORS_HEADER`, a JSON object whose
    entries have a known dtype, a shape and ``data_offsets`` that tile the data region exactly."""
    import math

    if size < 8:
        raise CheckpointError(f"{weights_file}: too short for a safetensors file ({size} bytes)")
    with open(weights_file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(limits.MAX_SAFETENSORS_HEADER, size - 8):
            raise CheckpointError(f"{weights_file}: safetensors header of {n} bytes does not fit the file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{weights_file}: the safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{weights_file}: the safetensors header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            width = SAFETENSORS_DTYPE_BYTES[entry["dtype"]]
            begin, stop = (int(v) for v in entry["data_offsets"])
            count = math.prod(int(d) for d in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{weights_file}: tensor {name!r:.60} has a malformed header entry") from None
        if not 0 <= begin <= stop or stop - begin != count * width:
            raise CheckpointError(f"{weights_file}: tensor {name!r:.60} has inconsistent offsets")
        end = max(end, stop)
    if 8 + n + end != size:
        raise CheckpointError(f"{weights_file}: the header describes {8 + n + end} bytes, the file has {size}")
    return header


SAFETENSORS_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_POINTER_BYTES = 4096
"""``latest.json`` is one short line."""


def _read_json(path: Path, max_bytes: int) -> Any:
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: {size:,} bytes is too large (limit {max_bytes:,})")
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err.msg if hasattr(err, 'msg') else err})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None


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


def load_weights(net: "torch.nn.Module", state, source: Path) -> None:
    """``net.load_state_dict(state)`` for weights read from ``source``: a missing, extra or misshapen tensor,
    or a NaN/Inf weight, raises :class:`~difflab.checkpoint.CheckpointError` in one line naming the file."""
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: the stored weights are not a mapping of tensors")
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"{source}: the weights do not fit the network its config describes ({first})") from None
    bad = [name for name, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{source}: the weights hold NaN or Inf (in {bad[0]}; a diverged run?) — "
                              "nothing to sample from")
