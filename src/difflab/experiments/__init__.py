"""The paper's experiments as commands (``difflab experiment NAME``), each writing figures and a
markdown report into a run folder. ``EXPERIMENTS`` maps a command name to its module's ``run``."""
