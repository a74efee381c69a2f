"""The engine's error type: what stops a training run for a reason the user can fix."""


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, divergence, a run directory in the way or in use, nothing to
    resume, ...); the message is one line that says what to do."""
