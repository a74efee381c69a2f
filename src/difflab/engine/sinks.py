"""Where the engine's metrics go: ``train.log_to`` names the sinks (``jsonl``, ``tensorboard``).

Every sink receives the same records — ``{"step": k, name: value, ...}`` once per log window — and the
sample pictures. ``jsonl`` is ``metrics.jsonl`` of the run directory (always written: ``--resume`` and the
loss curve read it). ``tensorboard`` writes event files under ``tensorboard/`` (scalars, and the sample
grids as images); TensorBoard is the optional extra ``pip install difflab[tensorboard]`` and is imported only
when asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from difflab.engine.errors import TrainingError
from difflab.engine.rundir import TENSORBOARD_DIR, RunDir

SINKS = ("jsonl", "tensorboard")


class JsonlSink:
    """Appends each record to ``metrics.jsonl`` as one JSON line."""

    def __init__(self, run: RunDir):
        self.run = run

    def log(self, record: dict) -> None:
        self.run.append_metrics(record)

    def image(self, tag: str, png: Path, step: int) -> None:
        """The picture is already a file of the run directory."""

    def close(self) -> None:
        pass


class TensorBoardSink:
    """The same scalars as ``metrics.jsonl`` (tag = metric name) and the sample pictures, in ``tensorboard/``."""

    def __init__(self, run: RunDir):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainingError("train.log_to asks for tensorboard, which is not installed: "
                                "pip install 'difflab[tensorboard]' (or tensorboard)") from None
        self.writer = SummaryWriter(log_dir=str(run.path / TENSORBOARD_DIR))

    def log(self, record: dict) -> None:
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def image(self, tag: str, png: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(png) as im:
            pixels = np.asarray(im.convert("RGB"))  # (H, W, 3) uint8
        self.writer.add_image(tag, pixels, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def open_sinks(names: Sequence[str], run: RunDir) -> list:
    """The sinks ``names`` asks for (``jsonl`` is always among them)."""
    unknown = [n for n in names if n not in SINKS]
    if unknown:
        raise TrainingError(f"train.log_to: unknown sink {unknown[0]!r}; choose from {', '.join(SINKS)}")
    sinks: list = [JsonlSink(run)]
    if "tensorboard" in names:
        sinks.append(TensorBoardSink(run))
    return sinks
