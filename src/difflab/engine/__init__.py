"""One training engine for every objective (:mod:`difflab.engine.loop`), its data stream and process context
(:mod:`~difflab.engine.stream`), run directories (:mod:`~difflab.engine.rundir`) and log sinks
(:mod:`~difflab.engine.sinks`). The objectives that plug into it live in :mod:`difflab.objectives`."""

from difflab.engine.errors import TrainingError
from difflab.engine.loop import (Engine, FitResult, Objective, Settings, StepContext, Trainable, constant,
                                 cosine_decay, linear_warmup, require_same)
from difflab.engine.rundir import RunDir
from difflab.engine.stream import Dist, batch_indices, epoch_permutation, step_seed

__all__ = ["Engine", "FitResult", "Objective", "Settings", "StepContext", "Trainable", "TrainingError", "RunDir",
           "Dist", "batch_indices", "epoch_permutation", "step_seed", "constant", "cosine_decay", "linear_warmup",
           "require_same"]
