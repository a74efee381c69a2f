"""difflab's default sampler and its per-model calibration against reference solves (SPEC §6).

**The default sampler** (:func:`sample_default`, ``difflab sample`` without ``--sampler``) is DEIS's log-ρ
Adams–Bashforth of order :data:`DEFAULT_ORDER` (:func:`~difflab.samplers.ode.sample_deis`) on
:func:`default_sampler_grid`: Karras et al.'s ρ = 7 noise levels (2022, eq. 5) between the least noise the model
was trained on, ``σ̄(t_min)``, and ``min(σ̄(t_max), SIGMA_CAP)``, with one head step from ``t_max`` where the path
starts above the cap, and the final ``x̂0`` step onto the clean end. ρ = 7 and the cap ``σ_max = 80`` are EDM's
(Table 1), choices from the literature rather than fits: on a cosine schedule ``σ̄(t_max) ≈ 2·10⁴``, and a grid
that reaches it spends steps where the sample barely moves. Measured before choosing (RMSE per sample to a
reference solve at 10 / 20 evaluations): trained two-moons 0.037 / 0.0043 and digits8 0.025 / 0.0035 with this
grid, against 0.053 / 0.0071 and 0.029 / 0.0066 evenly in log-SNR under the same cap, and 0.075 / 0.012 and
0.042 / 0.013 for the previous default (order 4 on grids fit to 1-D Gaussians).

**Calibration** (:func:`calibrate`, ``difflab calibrate RUN --nfe N``) fits the ``N − 1`` noise levels of the
grid of the *calibrated* default, the same DEIS with UniC's corrector (``sample_deis(..., corrector=True)``, Zhao et
al. 2023: each step re-integrated through the next evaluation, at no extra evaluation; :data:`CALIBRATED_CORRECTOR`),
to one trained model: it draws a calibration batch ``x_T``, solves the probability-flow ODE tightly for it
(adaptive Dormand–Prince, :data:`REFERENCE_RTOL`; the reference's own error is measured by re-solving at half the
tolerance), and minimises the log of the RMSE per sample (:func:`rmse_per_sample`) of the calibrated sampler's
output to the reference (:func:`fit_grid`): first over the cap of the default grid's family (where the first step,
from pure noise, lands: it depends on the data's scale, which the model knows), then over the knots (L-BFGS-B with
finite-difference gradients, the parameterisation of :func:`~difflab.samplers.time_grids.optimize_sigmas`, within a
wall-clock budget), keeping the grid best on a quarter of the batch held back from the fit (early stopping). A
held-out noise batch scores the fitted grid on noise it was not fit to. The result is stored in the run directory
(:data:`CALIBRATION_FILE`, written atomically) and :func:`read_calibration` validates it as untrusted input.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from difflab.samplers.chain import Samples

DEFAULT_ORDER = 3
CALIBRATED_CORRECTOR = True
"""Whether the calibrated default runs DEIS with the UniC corrector. On its own grid the corrector is a wash on
trained networks (digits8, 64 samples: 0.0285 → 0.0321 at 10 evaluations, 0.0042 → 0.0036 at 20), so the
uncalibrated default runs without it; on a grid fitted to the model it pays (0.0151 → 0.0108 held out at 10,
grids fitted for each on the same 64-sample batch for 60 s)."""
"""The default sampler's DEIS order (on the trained two-moons and digits8 models orders 3 and 4 are close on the
capped grids at 10–50 evaluations, order 3 ahead on the Karras one; order 3 is the one DEIS's paper recommends)."""
SIGMA_CAP = 80.0
"""The largest noise level ``σ̄`` the default grid spaces knots from: EDM's ``σ_max`` (Karras et al. 2022)."""
KARRAS_RHO = 7.0
"""The default grid's spacing exponent: EDM's ρ (Karras et al. 2022, eq. 5)."""
REFERENCE_RTOL = 1e-5
"""The reference solve's ``rtol = atol`` (adaptive Dormand–Prince)."""
CALIBRATION_FILE = "calibration.json"
FORMAT = "difflab-calibration"
VERSION = 1
MAX_CALIBRATION_BYTES = 1 << 20
"""A calibration file; one with grids for every budget up to :data:`MAX_CALIBRATED_NFE` is under 100 KiB."""
MAX_CALIBRATED_NFE = 200
"""The largest budget a calibration may be fit for or stored with (a grid of at most 201 times)."""
MAX_ENTRIES = 64
"""Budgets one calibration file may hold."""


# --- the default sampler ------------------------------------------------------------------------------------
def capped_grid(path, nfe: int, cap: float) -> torch.Tensor:
    """:func:`default_sampler_grid`'s family: Karras ρ = 7 knots in ``[σ̄(t_min), min(σ̄(t_max), cap)]``, a head step
    from ``t_max`` where the path starts above ``cap``, and the clean step; ``nfe ≥ 4``."""
    from difflab.samplers import time_grids

    lo, hi = time_grids.noise_range(path)
    return time_grids.sigma_grid(path, nfe, lambda a, b, n: time_grids.karras_sigmas(a, b, n, KARRAS_RHO),
                                 sigma_max=min(hi, max(cap, 2 * lo)))


def default_sampler_grid(path, nfe: int) -> torch.Tensor:
    """``[t_max, (head), t(σ̄_1), …, t(σ̄_min), clean end]`` with ``nfe`` steps: Karras ρ = 7 knots in
    ``[σ̄(t_min), min(σ̄(t_max), SIGMA_CAP)]`` (module docstring); :func:`~difflab.samplers.time_grids.uniform_t`
    below 4 steps (too few for a head step, the knots and the clean step)."""
    from difflab.samplers import time_grids

    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be a positive integer, got {nfe!r}")
    if nfe < 4 or path.clean_time() is None:
        return time_grids.uniform_t(path, nfe)
    lo, hi = time_grids.noise_range(path)
    return time_grids.sigma_grid(path, nfe, lambda a, b, n: time_grids.karras_sigmas(a, b, n, KARRAS_RHO),
                                 sigma_max=min(hi, max(SIGMA_CAP, 2 * lo)), key="default_sampler")


def sample_default(denoiser, x: torch.Tensor, timesteps, generator=None, callback=None, progress: bool = False,
                   corrector: bool = False, **cond) -> Samples:
    """The default sampler on a given grid: :func:`~difflab.samplers.ode.sample_deis` of order
    :data:`DEFAULT_ORDER` (its first step from pure noise), with UniC's corrector where ``corrector`` (the
    calibrated default, :data:`CALIBRATED_CORRECTOR`). ``denoiser`` is on a continuous path."""
    from difflab.samplers.ode import sample_deis

    return sample_deis(denoiser, x, timesteps, order=DEFAULT_ORDER, corrector=corrector, generator=generator,
                       callback=callback, progress=progress, **cond)


def sample_calibrated(denoiser, x: torch.Tensor, timesteps, **kwargs) -> Samples:
    """The calibrated default on a given (calibrated) grid: :func:`sample_default` with :data:`CALIBRATED_CORRECTOR`."""
    return sample_default(denoiser, x, timesteps, corrector=CALIBRATED_CORRECTOR, **kwargs)


# --- measuring against a reference solve ------------------------------------------------------------------------
def rmse_per_sample(x: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of each sample's root-mean-square difference to its reference, ``(N, ...)`` each."""
    diff = (x.double() - reference.double()).flatten(1)
    return float(diff.pow(2).mean(1).sqrt().mean())


def reference_solve(denoiser, x_T: torch.Tensor, rtol: float = REFERENCE_RTOL, **cond) -> Samples:
    """The probability-flow ODE solved tightly from ``x_T`` (float64): adaptive Dormand–Prince with
    ``rtol = atol`` down to ``σ̄(t_min)``, then the ``x̂0`` step (SPEC §6). ``denoiser`` is on a continuous path."""
    from difflab.samplers.ode import sample_rk45
    from difflab.samplers.time_grids import default_grid

    return sample_rk45(denoiser, x_T.double(), default_grid(denoiser.path, 1, "rk45"), rtol=rtol, atol=rtol, **cond)


# --- fitting the grid -----------------------------------------------------------------------------------------
class _OutOfTime(Exception):
    pass


VALIDATION_FRACTION = 0.25
"""The share of the calibration batch :func:`fit_grid` holds back to choose among the fit's iterates (early stopping)."""


def fit_grid(denoiser, x_T: torch.Tensor, reference: torch.Tensor, nfe: int, max_seconds: float = 240.0,
             min_gap: float = 0.05, log: Optional[Callable[[str], None]] = None, **cond) -> tuple[torch.Tensor, float]:
    """A grid of ``nfe`` steps for :func:`sample_calibrated`, fitted to minimise :func:`rmse_per_sample` to
    ``reference`` and chosen on a validation share of the batch.

    The last :data:`VALIDATION_FRACTION` of the batch is not fitted to: every candidate grid runs on the whole batch
    (one sampler call), the optimiser sees the RMSE on the first part, and the grid kept is the one with the least
    RMSE on the validation part (early stopping; with 19 free noise levels the fit otherwise follows the batch's
    heavy-tailed samples). Two stages. First the cap of :func:`default_sampler_grid`'s family (:func:`capped_grid`)
    is searched over :func:`cap_candidates`: where the first step, the exact step from pure noise with the model's
    ``x̂0`` held, may land depends on the data's scale (its error grows as ``(σ_data/σ̄_1)²``), which the model
    knows and a fixed cap cannot (Align-Your-Steps' point: the schedule belongs to the model). Then, from the best
    of those grids, its ``nfe − 1`` noise levels are parameterised as partial sums of ``nfe`` gaps of ``log σ̄``
    between ``σ̄(t_min)`` and ``σ̄(t_max)`` (each gap at least ``min_gap/nfe`` of the range) and fitted by
    L-BFGS-B within ``max_seconds``. Returns ``(grid, rmse on the whole batch)``; the grid is never worse on the
    validation part than the default one.
    """
    import numpy as np
    from scipy.optimize import minimize

    from difflab.samplers import time_grids

    path = denoiser.path
    if not isinstance(nfe, int) or not 4 <= nfe <= MAX_CALIBRATED_NFE:
        raise ValueError(f"calibration needs 4 <= nfe <= {MAX_CALIBRATED_NFE}, got {nfe!r}")
    lo, hi = time_grids.noise_range(path)
    log_lo, log_hi = math.log(lo) - 1e-9, math.log(hi)
    head = torch.tensor([float(path.t_max)], dtype=torch.float64)
    tail = torch.tensor([path.clean_time()], dtype=torch.float64)
    n_fit = x_T.shape[0] - int(VALIDATION_FRACTION * x_T.shape[0]) if x_T.shape[0] >= 4 else x_T.shape[0]
    best = {"validation": math.inf, "grid": None, "rmse": math.inf}

    def score(grid) -> float:
        """RMSE on the fitted part; records the grid if it is the best on the validation part so far."""
        x = sample_calibrated(denoiser, x_T, grid, **cond).x
        fit = rmse_per_sample(x[:n_fit], reference[:n_fit])
        held = rmse_per_sample(x[n_fit:], reference[n_fit:]) if n_fit < x.shape[0] else fit
        if math.isfinite(fit) and math.isfinite(held) and held < best["validation"]:
            best.update(validation=held, grid=grid, rmse=rmse_per_sample(x, reference))
        return fit

    score(default_sampler_grid(path, nfe))
    start, start_fit = default_sampler_grid(path, nfe), math.inf
    for cap in cap_candidates(lo, hi):  # stage 1: the family's one parameter, the head step's landing σ̄
        grid = capped_grid(path, nfe, cap)
        fit = score(grid)
        if math.isfinite(fit) and fit < start_fit:
            start, start_fit = grid, fit
    if log is not None:
        log(f"  RMSE {start_fit:.5f} on the best capped grid, head step to σ̄ = "
            f"{float(path.sigma_bar(start[1:2])):.3g}")
    knots0 = path.sigma_bar(start[1:-1]).clamp(min=lo, max=hi * (1 - 1e-9))
    theta0 = time_grids._params_from_knots(np.log(knots0.numpy()), log_hi, log_lo, min_gap)
    began = time.perf_counter()
    penalty = math.log(start_fit) + 10.0 if math.isfinite(start_fit) else 10.0

    def grid_of(theta) -> torch.Tensor:
        log_sigma = time_grids._knots_from_params(np.asarray(theta), nfe - 1, log_hi, log_lo, min_gap)
        knots = path.t_from_sigma_bar(torch.exp(torch.from_numpy(log_sigma)))
        return torch.cat([head, knots.clamp(float(path.t_min), float(path.t_max)), tail])

    def objective(theta) -> float:
        if time.perf_counter() - began > max_seconds:
            raise _OutOfTime
        grid = grid_of(theta)
        if not bool((grid[:-1] > grid[1:]).all()):
            return penalty
        before = best["validation"]
        err = score(grid)
        if not math.isfinite(err):
            return penalty
        if log is not None and best["validation"] < before:
            log(f"  RMSE {err:.5f} fitted, {best['validation']:.5f} validation  [{time.perf_counter() - began:.0f}s]")
        return math.log(err)

    try:
        minimize(objective, theta0, method="L-BFGS-B", options={"maxiter": 100, "eps": 1e-3})
    except _OutOfTime:
        pass
    return best["grid"], best["rmse"]


def cap_candidates(lo: float, hi: float) -> list:
    """The caps :func:`fit_grid` tries: ``σ̄ = 2^k`` from 1 up to the path's ``σ̄(t_max)`` (one octave apart: at most
    ~15 sampler runs), above the least noise ``lo``."""
    return [2.0 ** k for k in range(0, 64) if 4 * lo < 2.0 ** k < hi]


def draw_batch(path, shape, num: int, seed: int, num_classes: int = 0) -> tuple[torch.Tensor, dict]:
    """``num`` prior draws ``x_T`` (float64, seeded) and their conditioning (classes ``0, 1, …`` in turn)."""
    generator = torch.Generator().manual_seed(int(seed))
    x_T = path.prior_sample((num, *shape), generator, dtype=torch.float64)
    return x_T, ({"y": torch.arange(num) % num_classes} if num_classes else {})


def calibrate(denoiser, data_shape, nfe: int, num: int = 256, seed: int = 0, heldout_seed: int = 1,
              num_classes: int = 0, max_seconds: float = 150.0, log: Optional[Callable[[str], None]] = None) -> dict:
    """Fit :func:`fit_grid` (within ``max_seconds``, after the reference solves) for a model (``denoiser`` on a
    continuous path) on ``num`` draws of seed ``seed`` and
    score it on ``num`` held-out draws of seed ``heldout_seed``. Returns the entry :func:`write_calibration` stores:
    ``grid`` (times), RMSE of the calibrated and the default grid on both batches, the reference's NFE and its own
    error (vs a solve at half the tolerance, on the first 32 samples), and the wall time."""
    began = time.perf_counter()
    say = log or (lambda msg: None)
    path = denoiser.path
    x_cal, cond_cal = draw_batch(path, data_shape, num, seed, num_classes)
    x_hold, cond_hold = draw_batch(path, data_shape, num, heldout_seed, num_classes)
    ref_cal = reference_solve(denoiser, x_cal, **cond_cal)
    ref_hold = reference_solve(denoiser, x_hold, **cond_hold)
    few = min(32, num)
    cond_few = {k: v[:few] for k, v in cond_cal.items()}
    ref_half = reference_solve(denoiser, x_cal[:few], rtol=REFERENCE_RTOL / 2, **cond_few)
    reference_error = rmse_per_sample(ref_half.x, ref_cal.x[:few])
    say(f"reference solves: {ref_cal.nfe} evaluations (own error {reference_error:.2g})  "
        f"[{time.perf_counter() - began:.0f}s]")
    grid, rmse_cal = fit_grid(denoiser, x_cal, ref_cal.x, nfe, max_seconds=max_seconds, log=log, **cond_cal)
    default = default_sampler_grid(path, nfe)

    def score(sampler, g, x, ref, cond):
        return rmse_per_sample(sampler(denoiser, x, g, **cond).x, ref)

    return {"nfe": nfe, "solver": "deis", "order": DEFAULT_ORDER, "corrector": CALIBRATED_CORRECTOR,
            "grid": grid.tolist(), "num": num, "seed": seed, "heldout_seed": heldout_seed, "rmse": rmse_cal,
            "heldout_rmse": score(sample_calibrated, grid, x_hold, ref_hold.x, cond_hold),
            "default_rmse": score(sample_default, default, x_cal, ref_cal.x, cond_cal),
            "default_heldout_rmse": score(sample_default, default, x_hold, ref_hold.x, cond_hold),
            "reference": {"rtol": REFERENCE_RTOL, "nfe": ref_cal.nfe, "error_vs_half_tolerance": reference_error},
            "seconds": time.perf_counter() - began}


# --- storing it in the run ------------------------------------------------------------------------------------
def write_calibration(run_dir: Union[str, Path], entry: dict) -> Path:
    """Add (or replace) ``entry`` for its NFE in ``RUN_DIR/calibration.json``, written atomically. An unreadable
    existing file is replaced rather than merged."""
    from difflab.checkpoint import atomic_write_json

    target = Path(run_dir) / CALIBRATION_FILE
    entries = {}
    if target.is_file():
        try:
            old = json.loads(target.read_text())
            if isinstance(old, dict) and old.get("format") == FORMAT and isinstance(old.get("entries"), dict):
                entries = dict(old["entries"])
        except (OSError, ValueError):
            entries = {}
    entries[str(entry["nfe"])] = entry
    atomic_write_json(target, {"format": FORMAT, "version": VERSION, "entries": entries})
    return target


class CalibrationError(ValueError):
    """A calibration file that is not a valid difflab calibration for this run (one-line message)."""


def check_grid(grid, path, nfe: int, source: str = "calibration") -> torch.Tensor:
    """``grid`` as a float64 tensor if it is a valid grid of ``nfe`` steps for ``path``: ``nfe + 1`` finite numbers,
    strictly decreasing, starting at ``t_max``, ending at the clean end, the rest within ``[t_min, t_max]``;
    otherwise :class:`CalibrationError`."""
    if not isinstance(grid, list) or len(grid) != nfe + 1 or len(grid) > MAX_CALIBRATED_NFE + 1:
        raise CalibrationError(f"{source}: the grid for {nfe} evaluations must be a list of {nfe + 1} times")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in grid):
        raise CalibrationError(f"{source}: the grid holds a value that is not a number")
    g = torch.tensor(grid, dtype=torch.float64)
    if not torch.isfinite(g).all():
        raise CalibrationError(f"{source}: the grid holds NaN or Inf")
    if not bool((g[:-1] > g[1:]).all()):
        raise CalibrationError(f"{source}: the grid is not strictly decreasing")
    t_max, clean = float(path.t_max), path.clean_time()
    tol = 1e-9 * max(1.0, abs(t_max))
    if abs(float(g[0]) - t_max) > tol or clean is None or abs(float(g[-1]) - clean) > tol:
        raise CalibrationError(f"{source}: the grid must run from t_max = {t_max:g} to the clean end")
    inner = g[1:-1]
    if inner.numel() and (float(inner.min()) < float(path.t_min) - tol or float(inner.max()) > t_max + tol):
        raise CalibrationError(f"{source}: grid times outside the path's range [{float(path.t_min):g}, {t_max:g}]")
    g[0], g[-1] = t_max, clean
    return g


def read_calibration(run_dir: Union[str, Path], path) -> dict:
    """``{nfe: grid}`` from ``RUN_DIR/calibration.json`` (empty if there is none), validated as untrusted input
    against ``path`` (the run's continuous view): size, format, budgets and every grid (:func:`check_grid`).
    A file that fails raises :class:`CalibrationError` in one line naming it."""
    source = Path(run_dir) / CALIBRATION_FILE
    if not source.exists():
        return {}
    if not source.is_file() or source.stat().st_size > MAX_CALIBRATION_BYTES:
        raise CalibrationError(f"{source}: not a file of at most {MAX_CALIBRATION_BYTES} bytes")
    try:
        doc = json.loads(source.read_text(encoding="utf-8"), parse_constant=_reject_constant)
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as err:
        if isinstance(err, CalibrationError):
            raise CalibrationError(f"{source}: {str(err).removeprefix('calibration file: ')}") from None
        raise CalibrationError(f"{source}: not a readable calibration file ({type(err).__name__})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CalibrationError(f"{source}: not a {FORMAT} file of version {VERSION}")
    entries = doc.get("entries")
    if not isinstance(entries, dict) or len(entries) > MAX_ENTRIES:
        raise CalibrationError(f"{source}: 'entries' must be a mapping of at most {MAX_ENTRIES} budgets")
    grids = {}
    for key, entry in entries.items():
        if not (isinstance(key, str) and key.isdigit() and len(key) <= 4 and 1 <= int(key) <= MAX_CALIBRATED_NFE):
            raise CalibrationError(f"{source}: budget {key[:20]!r} is not an integer in 1..{MAX_CALIBRATED_NFE}")
        if not isinstance(entry, dict) or entry.get("solver") != "deis" or entry.get("order") != DEFAULT_ORDER:
            raise CalibrationError(f"{source}: entry {key} is not a calibration of the default sampler")
        grids[int(key)] = check_grid(entry.get("grid"), path, int(key), f"{source} (entry {key})")
        if entry.get("corrector") is not CALIBRATED_CORRECTOR:
            raise CalibrationError(f"{source}: entry {key} was fitted for an earlier default sampler (without "
                                   f"the corrector); run 'difflab calibrate' again")
    return grids


def _reject_constant(name: str):
    raise CalibrationError(f"calibration file: {name} is not a number")
