"""The paper's experiments as commands (``difflab experiment NAME``), each writing figures and a
markdown report into a run folder.

``EXPERIMENTS`` maps a command name to the module (under ``difflab.experiments``) whose
``run(out_dir, **options) -> Path`` writes ``out_dir/report.md``; modules are imported only when run.
"""

EXPERIMENTS: dict[str, str] = {
    "forward-process": "forward_process",
    "ddim-steps": "ddim_steps",
    "schedules": "schedules",
    "ode-solvers": "ode_solvers",
    "parameterization": "parameterization",
    "guidance-scale": "guidance_scale",
    "guidance-tilted": "guidance_tilted",
    "nested": "nested",
    "reverse-kernel": "reverse_kernel",
    "ddgan-steps": "ddgan_steps",
}
