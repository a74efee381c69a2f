"""difflab's samplers behind diffusers' scheduler protocol (SPEC §5, §6), so a diffusers pipeline switches with::

    from difflab.interop import DifflabScheduler
    pipe.scheduler = DifflabScheduler.from_config(pipe.scheduler.config)          # difflab's default sampler
    pipe.scheduler = DifflabScheduler.from_config(pipe.scheduler.config, solver="dpmpp2m")

How it works. ``step`` does not re-implement a solver: :meth:`DifflabScheduler.set_timesteps` fixes the budget, and
the first ``step`` starts the very sampler function of :data:`difflab.pipeline.SAMPLERS` (on
:func:`~difflab.interop.diffusers_model.diffusers_denoiser`'s path and target, so the pipeline's samples are those
of ``SAMPLERS[solver](diffusers_denoiser(unet, config), x_T, steps)``) in a worker thread whose network is the
pipeline itself: each time the solver asks for a network evaluation at a state ``x``, the worker hands ``x`` back
as ``prev_sample`` and waits for the pipeline's next ``step(model_output, ...)``. So a multistep solver's history,
a Runge–Kutta method's stages and the float64 state (``precise_dtype``, as :func:`~difflab.pipeline.generate`
keeps it) all live inside this object, as diffusers' own schedulers keep theirs, and the solver's code is
difflab's, unchanged. Only one thread runs at a time (the pipeline waits for ``step``, the worker for the model).

The order of calls it relies on (diffusers' own loop)::

    scheduler.set_timesteps(num_inference_steps)     # num_inference_steps = network evaluations (the NFE budget)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:                     # each entry once, in order
        out = model(scheduler.scale_model_input(x, t), t)
        x = scheduler.step(out, t, x).prev_sample     # x: the prev_sample the previous step returned

``timesteps`` lists every evaluation (a Heun step is two entries, as in diffusers' ``HeunDiscreteScheduler``), in
diffusers' timestep convention ``τ = u − 1`` for the fractional DDPM step ``u = tT`` (float32; see
:mod:`difflab.interop.diffusers_model`); its length is the NFE, at most ``num_inference_steps``.
``scale_model_input`` is the identity (difflab's state on a discrete path's continuation is the VP state the model
was trained on). Violations raise at once: ``step`` before ``set_timesteps``; a ``timestep`` other than the next
entry of ``timesteps``; a ``sample`` that is not the ``prev_sample`` returned by the previous step (latents edited
between steps — the solver's state is kept here, so such a pipeline needs a diffusers scheduler); a step after the
last. ``set_timesteps`` again abandons a solve in progress and starts afresh.

Stochastic samplers (``ddpm``, ``sde``, ``ancestral``, ``pc``) draw their noise from the ``generator`` passed to the
first ``step`` (as ``DDPMPipeline`` passes it), else from torch's global generator. ``rk45`` is not offered: its
evaluation times depend on the model's outputs, and a pipeline must know ``timesteps`` in advance.
"""

from __future__ import annotations

import queue
import threading
from typing import Optional, Union

import torch
from diffusers import ConfigMixin, SchedulerMixin
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerOutput

from difflab.interop.diffusers_model import (TIMESTEP_OFFSET, learned_variance_from_config, path_from_config,
                                             target_from_config)
from difflab.parameterization import NetworkDenoiser
from difflab.pipeline import DISCRETE_SAMPLERS, SAMPLERS
from difflab.samplers.ode import precise_dtype

SOLVERS = tuple(name for name in SAMPLERS if name != "rk45")
"""The samplers a scheduler can run: every fixed-grid sampler of :data:`difflab.pipeline.SAMPLERS`."""

DEFAULT_SOLVER = "default"
"""difflab's default sampler, the one ``difflab sample`` runs without ``--sampler``
(:mod:`difflab.samplers.calibration`): DEIS of order 3 on EDM's ρ = 7 grid capped at σ̄ = 80. A scheduler has no
run directory, so no calibration applies. ``"deis"`` is the earlier default (order 4 on grids fit to 1-D
Gaussians); on a trained diffusers UNet ``"dpmpp2m"`` measured more accurate than it (README, "Using difflab with
diffusers")."""


class DifflabScheduler(SchedulerMixin, ConfigMixin):
    """A diffusers scheduler that runs a difflab sampler (module docstring for the protocol and the order of calls).

    Args (saved in ``scheduler_config.json`` and read by ``from_config`` from any DDPM-family scheduler's config):
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr: the
            training schedule (:func:`~difflab.interop.diffusers_model.betas_from_config`; SPEC §2).
        prediction_type: what ``model_output`` is: ``epsilon`` | ``v_prediction`` | ``sample`` (SPEC §4).
        variance_type: ``learned_range`` when the model also outputs improved DDPM's variance (its channels are
            split off, as diffusers' DDPM scheduler does); any other value is a fixed variance.
        solver: a key of :data:`SOLVERS` (default :data:`DEFAULT_SOLVER`).
        solver_options: keyword options of that sampler (e.g. ``{"order": 2}`` for DEIS, ``{"eta": 1.0}`` for DDIM).
    """

    config_name = "scheduler_config.json"
    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 beta_schedule: str = "linear", trained_betas=None, prediction_type: str = "epsilon",
                 variance_type: str = "fixed_small", rescale_betas_zero_snr: bool = False,
                 solver: str = DEFAULT_SOLVER, solver_options: Optional[dict] = None):
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; choose one of {SOLVERS}")
        self.path = path_from_config(self.config)
        self.target = target_from_config(self.config)
        self.learned_variance = learned_variance_from_config(self.config)
        self.solver_options = dict(solver_options or {})
        self.init_noise_sigma = self.path.prior_std()
        self.num_inference_steps: Optional[int] = None
        self.timesteps: Optional[torch.Tensor] = None
        self._step_index = 0
        self._solve: Optional[_SolveInThread] = None
        self._last_sample: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    @property
    def step_index(self) -> int:
        """How many ``step`` calls of the current solve have been made."""
        return self._step_index

    def denoiser(self, net) -> NetworkDenoiser:
        """``net(x, u)`` (DDPM-step time ``u``) as the denoiser the sampler runs on: this config's path and target."""
        return NetworkDenoiser(net, self.path, self.target, learned_variance=self.learned_variance)

    def _run(self, net, x: torch.Tensor, steps: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """The sampler itself on ``net``: ``SAMPLERS[solver](denoiser, x, steps, …).x``."""
        return SAMPLERS[self.config.solver](self.denoiser(net), x, steps, generator=generator,
                                            **self.solver_options).x

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None) -> None:
        """Start a new solve with a budget of ``num_inference_steps`` network evaluations and list its evaluation
        times in ``timesteps`` (diffusers' convention ``τ = u − 1``, float32, on ``device``).

        The times are found by running the sampler once on a batch of one scalar with a network that records its
        time input and returns zeros: a fixed-grid sampler's evaluation times do not depend on the network's
        outputs, and recording them from the sampler's own run keeps them bit-identical to the real solve's.
        """
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        self._close()
        times = []

        def record(x, u, **_):
            times.append(u[0])
            return torch.zeros(x.shape[0], 2 if self.learned_variance else 1, dtype=x.dtype)

        x = torch.zeros(1, 1, dtype=torch.float64 if self.config.solver not in DISCRETE_SAMPLERS else torch.float32)
        self._run(record, x, num_inference_steps, torch.Generator().manual_seed(0))
        self.num_inference_steps = num_inference_steps
        self.timesteps = (torch.stack(times).to(torch.float32) - TIMESTEP_OFFSET).to(device)
        self._step_index = 0

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The model sees the solver's state itself: the VP state ``x_t = a x0 + s ε`` (SPEC §4)."""
        return sample

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor,
             generator: Optional[torch.Generator] = None, return_dict: bool = True):
        """Give the solver the model's output at ``timestep`` (an entry of ``timesteps``, in order) and return the
        state at which it wants the next evaluation, or, after the last entry, the sample — as ``prev_sample`` in
        ``sample``'s dtype. ``model_output`` is of the config's ``prediction_type``."""
        if self.timesteps is None:
            raise RuntimeError("DifflabScheduler: call set_timesteps(num_inference_steps) before step")
        i, n = self._step_index, len(self.timesteps)
        if i >= n:
            raise RuntimeError(f"DifflabScheduler: all {n} steps of this solve are done; call set_timesteps to start "
                               "another")
        expected = float(self.timesteps[i])
        if float(timestep) != expected:
            raise ValueError(f"DifflabScheduler: step called with timestep {float(timestep)!r} but expected "
                             f"{expected!r} (step {i} of {n}): iterate over scheduler.timesteps in order, once each")
        if i == 0:
            x = sample.to(precise_dtype(sample.device) if self.config.solver not in DISCRETE_SAMPLERS
                          else torch.promote_types(sample.dtype, torch.float32))
            self._solve = _SolveInThread(lambda net: self._run(net, x, self.num_inference_steps, generator))
        elif sample is not self._last_sample and not torch.equal(sample, self._last_sample):
            raise ValueError("DifflabScheduler: sample is not the prev_sample of the previous step. The solver keeps "
                             "its state (and a multistep history) itself, so the latents must not be changed between "
                             "steps; use a diffusers scheduler for pipelines that edit them")
        kind, x_next = self._solve.send(model_output)
        self._step_index += 1
        if (kind == "done") != (self._step_index == n):  # the recorded times and the solve disagree: a bug
            raise RuntimeError(f"DifflabScheduler: the solve and its {n} recorded timesteps disagree at step {i}")
        if kind == "done":
            self._close()
        prev = x_next.to(sample.dtype)
        self._last_sample = prev
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``x = a x0 + s ε`` at diffusers' integer timesteps ``τ`` (``[B]``), i.e. at DDPM step ``τ + 1`` (SPEC §2)."""
        t = torch.as_tensor(timesteps, device=original_samples.device).long() + int(TIMESTEP_OFFSET)
        return self.path.sample(original_samples, t, eps=noise)[0].to(original_samples.dtype)

    def _close(self) -> None:
        if getattr(self, "_solve", None) is not None:
            self._solve.close()
            self._solve = None

    def __del__(self):
        self._close()


class _Abandoned(BaseException):
    """Raised inside the worker's network call to unwind a solve that ``set_timesteps`` abandoned."""


class _SolveInThread:
    """A sampler ``run(net) -> x`` suspended at each network evaluation (a coroutine on a worker thread).

    The worker runs ``run`` with :meth:`_net`, which posts ``("eval", x)`` and waits for the output; :meth:`send`
    hands an output to the waiting worker and returns its next message: ``("eval", x)`` or ``("done", x)``.
    The two threads alternate strictly through two one-slot queues. Grad and inference mode (thread-local)
    are copied from the thread that starts the solve.
    """

    def __init__(self, run):
        self._to_worker: queue.Queue = queue.Queue(maxsize=1)
        self._to_main: queue.Queue = queue.Queue(maxsize=1)
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())
        self._thread = threading.Thread(target=self._work, args=(run, modes), daemon=True,
                                        name="difflab-scheduler-solve")
        self._thread.start()
        self._expect_eval(self._receive())

    def _work(self, run, modes) -> None:
        grad, inference = modes
        try:
            with torch.set_grad_enabled(grad), torch.inference_mode(inference):
                self._to_main.put(("done", run(self._net)))
        except _Abandoned:
            pass
        except BaseException as err:  # handed to the pipeline's thread, raised there
            self._to_main.put(("error", err))

    def _net(self, x: torch.Tensor, u: torch.Tensor, **cond) -> torch.Tensor:
        self._to_main.put(("eval", x))
        message = self._to_worker.get()
        if message is None:
            raise _Abandoned
        return message

    def _receive(self) -> tuple:
        kind, value = self._to_main.get()
        if kind == "error":
            raise value
        return kind, value

    @staticmethod
    def _expect_eval(message: tuple) -> None:
        if message[0] != "eval":
            raise RuntimeError("the sampler finished without evaluating the model")

    def send(self, output: torch.Tensor) -> tuple:
        self._to_worker.put(output)
        return self._receive()

    def close(self) -> None:
        """Unwind a worker still waiting for an output (no-op once the solve is done)."""
        if self._thread.is_alive():
            self._to_worker.put(None)
            self._thread.join()
