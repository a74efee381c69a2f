"""Run directories that cannot be corrupted: a lock, difflab's own artefacts, repair of cut-off writes.

A run directory holds (:class:`RunDir`)::

    config.yaml           the config (written only once the run's data and model are built)
    metrics.jsonl         one JSON record per log window
    samples/step_*.png    sample grids or scatter plots
    checkpoints/          safetensors + JSON (:mod:`difflab.checkpoint`)
    tensorboard/          event files, when ``train.log_to`` asks for them
    loss.png              the loss curve, at the end
    .difflab.lock         the lock: the PID and host of the process using the run

Guarantees:

- **one process per run**: :meth:`RunDir.lock` takes an exclusive ``fcntl.flock`` on ``.difflab.lock`` and writes
  its PID there; a second process is refused in one line that names the holder's PID. The kernel drops the lock
  of a process that dies (SIGKILL included), so a lock left by a killed process is taken over, with a warning;
- **only difflab's files are removed**: ``--overwrite`` (:meth:`RunDir.clear`) deletes the paths of
  :data:`ARTIFACTS` (and the caller's extra ones) and then the folders they leave empty, nothing else;
- **cut-off writes are repaired**: temp files of a killed atomic write are removed at the next start
  (:meth:`RunDir.remove_temps`) and a partial last line of ``metrics.jsonl`` is truncated with a warning
  (:meth:`RunDir.repair_metrics`);
- **only verified checkpoints survive a divergence**: :meth:`RunDir.rollback` drops a checkpoint whose weights
  gave a divergent loss and points ``latest.json`` at the one before.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

from difflab.checkpoint import (CHECKPOINT_DIR, LATEST, atomic_write_bytes, atomic_write_json, checkpoint_name,
                                has_checkpoint, list_checkpoints)
from difflab.engine.errors import TrainingError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_DIR = "samples"
LOSS_CURVE = "loss.png"
TENSORBOARD_DIR = "tensorboard"
LOCK_FILE = ".difflab.lock"
ARTIFACTS = (CONFIG_FILE, METRICS_FILE, LOSS_CURVE, f"{CHECKPOINT_DIR}/step_*.json",
             f"{CHECKPOINT_DIR}/step_*.safetensors", f"{CHECKPOINT_DIR}/{LATEST}", f"{SAMPLES_DIR}/step_*.png",
             f"{TENSORBOARD_DIR}/events.out.tfevents.*")
"""Glob patterns (relative to the run directory) of every file difflab writes there; ``--overwrite`` removes
these and their temp files, then :data:`ARTIFACT_DIRS` if they are left empty, and nothing else."""
ARTIFACT_DIRS = (CHECKPOINT_DIR, SAMPLES_DIR, TENSORBOARD_DIR)


def temp_pattern(name: str) -> str:
    """The temp files :func:`difflab.checkpoint.atomic_write_bytes` writes on its way to ``name``."""
    directory, _, base = name.rpartition("/")
    return f"{directory}/" * bool(directory) + f".{base}.*.tmp"


def warn(message: str) -> None:
    """One line ``difflab: warning: ...`` on stderr."""
    print(f"difflab: warning: {message}", file=sys.stderr, flush=True)


class RunDir:
    """The run directory ``path``; ``extra_artifacts`` are further file names the objective writes there; ``noun``
    names what the directory holds in messages ("run", "classifier")."""

    def __init__(self, path, extra_artifacts: Sequence[str] = (), noun: str = "run"):
        self.path = Path(path)
        self.extra = tuple(extra_artifacts)
        self.artifacts = (*ARTIFACTS, *self.extra)
        self.noun = noun
        self._lock_fd: Optional[int] = None
        self._created = False

    def __str__(self) -> str:
        return str(self.path)

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    # --- what is there ------------------------------------------------------------------------------------
    def holds_run(self) -> bool:
        """Whether difflab has written a run here (a config, metrics or a checkpoint)."""
        return any((self.path / name).exists() for name in (CONFIG_FILE, METRICS_FILE, CHECKPOINT_DIR, *self.extra))

    def check(self, resume: bool, overwrite: bool) -> None:
        """Refuse flag combinations that cannot work here, each with advice that leads somewhere."""
        where = repr(str(self.path))
        if resume and overwrite:
            raise TrainingError("choose --resume or --overwrite, not both")
        checkpointed = has_checkpoint(self.path)
        if resume and not checkpointed:
            if self.holds_run():
                raise TrainingError(f"nothing to resume in {where}: its {self.noun} has no checkpoint (it stopped "
                                    "before the first one, or predates checkpoints); start it again with --overwrite")
            raise TrainingError(f"nothing to resume in {where}: it holds no {self.noun} (start one without --resume)")
        if not resume and not overwrite and self.holds_run():
            if checkpointed:
                raise TrainingError(f"{where} already holds a {self.noun}: pass --resume to continue it "
                                    "or --overwrite to replace it")
            raise TrainingError(f"{where} already holds a {self.noun} with no checkpoint to resume: "
                                "pass --overwrite to start it again")

    # --- the lock -------------------------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the run for this process (creating the directory), or refuse: one line naming the holder's PID."""
        import fcntl

        if not self.path.exists():
            self.path.mkdir(parents=True)
            self._created = True
        lock_file = self.path / LOCK_FILE
        fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_holder(fd)
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            who = f"process {holder[0]}" + (f" on {holder[1]}" if holder[1] else "") if holder else "another process"
            raise TrainingError(f"{str(self.path)!r} is in use by {who} (lock {LOCK_FILE}): "
                                "wait for it to finish or stop it") from None
        holder = _read_holder(fd)
        if holder and holder[0] != os.getpid():
            alive = holder[1] != socket.gethostname() or _pid_alive(holder[0])
            if not alive:
                warn(f"took over the lock of {str(self.path)!r} left by process {holder[0]}, which is no longer running")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock (the file is emptied, not removed: a waiting process may hold it open). A directory
        this process created and left empty is removed with it."""
        if self._lock_fd is None:
            return
        fd, self._lock_fd = self._lock_fd, None
        os.ftruncate(fd, 0)
        if self._created and [p.name for p in self.path.iterdir()] == [LOCK_FILE]:
            (self.path / LOCK_FILE).unlink(missing_ok=True)
            os.close(fd)
            self.path.rmdir()
            return
        os.close(fd)

    # --- cleaning ----------------------------------------------------------------------------------------
    def clear(self) -> list[Path]:
        """Remove what difflab wrote here (:data:`ARTIFACTS`), then those of its folders left empty; returns
        the removed files. The user's own files, even inside ``samples/``, stay."""
        removed = []
        for pattern in (*self.artifacts, *map(temp_pattern, self.artifacts)):
            for p in sorted(self.path.glob(pattern)):
                if p.is_file() or p.is_symlink():
                    p.unlink()
                    removed.append(p)
        for name in ARTIFACT_DIRS:
            d = self.path / name
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        return removed

    def remove_temps(self) -> None:
        """Temp files left by a write that was killed are never referenced: remove them."""
        for pattern in self.artifacts:
            for p in self.path.glob(temp_pattern(pattern)):
                p.unlink(missing_ok=True)

    # --- metrics.jsonl --------------------------------------------------------------------------------------
    def repair_metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl``. A partial last line (a write cut off by a kill or a full disk) is
        truncated away with a warning naming the file; a bad line elsewhere is an error naming file and line."""
        if not self.metrics.exists():
            return []
        lines = self.metrics.read_bytes().decode("utf-8", errors="replace").split("\n")
        tail = lines.pop()  # "" when the last write finished with its newline
        records, cut = [], None
        for number, line in enumerate([*lines, tail], start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise TrainingError(f"{self.metrics} line {number} is not a JSON record: repair or remove it") from None
                cut = line
        if cut is not None or tail:
            if cut is not None:
                warn(f"{self.metrics}: removed a partial last line ({len(cut)} characters of a write that was cut off)")
            atomic_write_bytes(self.metrics, "".join(json.dumps(r) + "\n" for r in records).encode())
        return records

    def truncate_metrics(self, step: int, log_every: int) -> None:
        """Drop the records a resumed run will write again (atomic rewrite): those after the checkpoint, and the
        checkpoint step's own record when it closed a run mid-window (the resumed run continues that window and
        logs it at the next multiple of ``log_every``)."""
        records = self.repair_metrics()
        keep = [r for r in records if r["step"] < step or (r["step"] == step and step % log_every == 0)]
        if len(keep) != len(records):
            atomic_write_bytes(self.metrics, "".join(json.dumps(r) + "\n" for r in keep).encode())

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    # --- checkpoints ------------------------------------------------------------------------------------------
    def prune(self, keep: int, protect: Iterable[int]) -> None:
        """Keep the newest ``keep`` checkpoints and the steps in ``protect``; remove the others (JSON first, so
        a half-removed pair is never listed)."""
        steps = list_checkpoints(self.path)
        saved = set(steps[-keep:]) | set(protect)
        for step in steps:
            if step not in saved:
                self._remove_checkpoint(step)

    def rollback(self, step: int) -> Optional[int]:
        """Remove the checkpoint of ``step`` (if any) and point ``latest.json`` at the newest one before it;
        returns that step, or None when no checkpoint is left."""
        remaining = [s for s in list_checkpoints(self.path) if s < step]
        pointer = self.path / CHECKPOINT_DIR / LATEST
        if remaining:  # the pointer moves first: a kill in between leaves it at a complete checkpoint
            atomic_write_json(pointer, {"step": remaining[-1], "name": checkpoint_name(remaining[-1])})
        else:
            pointer.unlink(missing_ok=True)
        for s in list_checkpoints(self.path):
            if s >= step:
                self._remove_checkpoint(s)
        return remaining[-1] if remaining else None

    def _remove_checkpoint(self, step: int) -> None:
        for suffix in (".json", ".safetensors"):
            (self.path / CHECKPOINT_DIR / f"{checkpoint_name(step)}{suffix}").unlink(missing_ok=True)


def _read_holder(fd: int) -> Optional[tuple[int, str]]:
    """``(pid, host)`` written in a lock file, or None when it is empty (released cleanly) or unreadable."""
    try:
        text = os.pread(fd, 256, 0).decode(errors="replace").split()
        return (int(text[0]), text[1] if len(text) > 1 else "") if text else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
