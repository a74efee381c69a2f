"""SPEC §6: difflab's default sampler, its per-model calibration (``difflab calibrate``) and the exponential Heun.

Oracles: the exact Gaussian bed (tests/test_ode.py's flow map) on the DDPM linear schedule's smooth
continuation; on the command line a tiny trained run, where ``difflab sample`` must reproduce the stored grid.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.paths import DiscretePath, VPPath, smooth_continuation
from difflab.samplers import ode
from difflab.samplers import calibration as cal
from difflab.samplers.time_grids import uniform_log_snr
from difflab.testbeds import affine_pushforward, gaussian_bed

from test_ode import BED, fitted_order, global_error

ROOT = Path(__file__).resolve().parents[1]
LINEAR = smooth_continuation(DiscretePath.from_schedule("linear", T=1000))
COSINE = smooth_continuation(DiscretePath.from_schedule("cosine", T=1000))


@pytest.mark.parametrize("path", [LINEAR, COSINE], ids=["linear", "cosine"])
@pytest.mark.parametrize("nfe", [1, 3, 4, 10, 50])
def test_default_grid_shape(path, nfe):
    """``nfe + 1`` strictly decreasing times from ``t_max`` to the clean end; from 4 steps on, every knot after the
    head step lies at ``σ̄ ≤ SIGMA_CAP`` and the last knot before the clean end at ``t_min``."""
    grid = cal.default_sampler_grid(path, nfe)
    assert grid.shape == (nfe + 1,) and bool((grid[:-1] > grid[1:]).all())
    assert float(grid[0]) == path.t_max and float(grid[-1]) == 0.0
    cal.check_grid(grid.tolist(), path, nfe)
    if nfe >= 4:
        assert float(path.sigma_bar(grid[1])) <= cal.SIGMA_CAP * (1 + 1e-9)
        assert float(grid[-2]) == pytest.approx(path.t_min, abs=1e-12)


def test_default_keeps_converging_on_an_ill_conditioned_bed():
    """Exact KL on a 16-D Gaussian with eigenvalues 1e-3..1e3 (outside any family a grid was fit on) falls with
    NFE and ends within 1.5× of the tight adaptive solve's (both stop at the x̂0 step from σ̄_min). Measured:
    10: 7.9e-2, 20: 3.3e-3, 50: 2.5e-3, 100: 2.6e-3; rk45 at 1e-9: 3.1e-3."""
    bed = gaussian_bed(16, condition=1e6, seed=3)
    den = bed.denoiser(LINEAR)

    def kl(run):
        mean, cov = affine_pushforward(run, bed.D, prior_std=1.0)
        return float(bed.kl_from_gaussian(mean, cov))

    kls = [kl(lambda x, n=n: cal.sample_default(den, x, cal.default_sampler_grid(LINEAR, n)).x) for n in (10, 20, 100)]
    floor = kl(lambda x: cal.reference_solve(den, x, rtol=1e-9).x)
    assert kls[0] > kls[1] > kls[2] and kls[2] < 1.5 * floor, (kls, floor)


def test_exponential_heun_is_second_order():
    """:func:`~difflab.samplers.ode.sample_heun_exp` on VP, log-SNR grids of 16/32/64 steps on ``[1, 0.02]``:
    fitted order within 0.3 of 2 (measured 2.0)."""
    path = VPPath()

    def grid(n):
        lam = path.log_snr(torch.tensor([1.0, 0.02], dtype=torch.float64))
        g = path.t_from_log_snr(torch.linspace(float(lam[0]), float(lam[1]), n + 1, dtype=torch.float64))
        g[0], g[-1] = 1.0, 0.02
        return g

    errors = [global_error(ode.sample_heun_exp, path, grid(n)) for n in (16, 32, 64)]
    assert abs(fitted_order(errors) - 2.0) < 0.3, errors


def test_exponential_heun_counts_two_evaluations_per_step():
    out = ode.sample_heun_exp(BED.denoiser(VPPath()), torch.randn(3, BED.D, dtype=torch.float64),
                              uniform_log_snr(VPPath(), 5))
    assert out.nfe == 2 * 4 + 1


def test_fit_grid_never_loses_to_the_default_and_round_trips(tmp_path):
    """On the exact bed, a 3-second fit at 6 evaluations is at least as close to the reference as the default grid on
    the validation quarter of the batch (the part it is chosen on, not fitted to); the stored entry reads back as the
    same grid."""
    den = BED.denoiser(LINEAR)
    x_T, _ = cal.draw_batch(LINEAR, (BED.D,), 32, seed=0)
    ref = cal.reference_solve(den, x_T).x
    held = slice(32 - int(cal.VALIDATION_FRACTION * 32), None)

    def validation_rmse(grid):
        return cal.rmse_per_sample(cal.sample_calibrated(den, x_T, grid).x[held], ref[held])

    grid, rmse = cal.fit_grid(den, x_T, ref, 6, max_seconds=3.0)
    assert validation_rmse(grid) <= validation_rmse(cal.default_sampler_grid(LINEAR, 6))
    assert rmse == pytest.approx(cal.rmse_per_sample(cal.sample_calibrated(den, x_T, grid).x, ref), rel=1e-12)
    cal.write_calibration(tmp_path, {"nfe": 6, "solver": "deis", "order": cal.DEFAULT_ORDER,
                                     "corrector": cal.CALIBRATED_CORRECTOR, "grid": grid.tolist()})
    torch.testing.assert_close(cal.read_calibration(tmp_path, LINEAR)[6], grid, rtol=0, atol=0)


def test_cap_search_finds_the_head_step_a_bed_of_large_scale_needs():
    """The first stage of :func:`~difflab.samplers.calibration.fit_grid` searches the cap of the default grid's
    family. On a bed whose data spread reaches σ ≈ 30 (eigenvalues up to 10³) the first step — the exact step from
    pure noise with ``x̂0`` held — must land well above the data's scale, so a 0-second fit (the cap search alone)
    keeps a cap above 30: a fixed small cap would make that step's error independent of NFE."""
    from difflab.testbeds import gaussian_bed as bed_of

    bed = bed_of(16, condition=1e6, seed=3)
    den = bed.denoiser(LINEAR)
    x_T, _ = cal.draw_batch(LINEAR, (bed.D,), 32, seed=0)
    ref = cal.reference_solve(den, x_T).x
    grid, _ = cal.fit_grid(den, x_T, ref, 10, max_seconds=0.0)
    assert float(LINEAR.sigma_bar(grid[1:2])) > 30.0


def test_calibrate_then_sample_uses_the_stored_grid(tmp_path, capsys):
    """``difflab calibrate RUN --nfe 4`` writes RUN/calibration.json; ``difflab sample RUN --steps 4`` (default sampler)
    then equals the default sampler on that grid, and differs from the uncalibrated default grid's output."""
    from difflab.pipeline import continuous_view, load_run

    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "tiny2d.yaml"), "--out", str(run), "--quiet", "--set",
                 "train.steps=20", "train.checkpoint_every=0"]) == 0
    assert main(["calibrate", str(run), "--nfe", "4", "--num", "16", "--max-seconds", "2", "--quiet"]) == 0
    assert "calibrated 4 evaluations" in capsys.readouterr().out
    assert main(["sample", str(run), "--steps", "4", "--num", "16", "--seed", "3", "--quiet",
                 "--out", str(tmp_path / "s.npz")]) == 0
    pipe = load_run(run, device="cpu")
    grid = pipe.calibrated_grids()[4]
    got = np.load(tmp_path / "s.npz")
    calibrated = pipe.sample(16, sampler="default", steps=4, seed=3, progress=False, grid=grid,
                             corrector=cal.CALIBRATED_CORRECTOR).x.numpy()
    default = pipe.sample(16, sampler="default", steps=4, seed=3, progress=False,
                          grid=cal.default_sampler_grid(continuous_view(pipe.denoiser).path, 4)).x.numpy()
    np.testing.assert_array_equal(got["x"], calibrated)
    assert int(got["nfe"]) == 4 and not np.array_equal(calibrated, default)


def test_a_calibration_fitted_without_the_corrector_is_refused(tmp_path):
    """A grid fitted for the earlier calibrated default (DEIS without the corrector; no ``corrector`` key) is refused
    in one line that says to calibrate again, rather than run under a sampler it was not fitted for."""
    grid = cal.default_sampler_grid(LINEAR, 6)
    cal.write_calibration(tmp_path, {"nfe": 6, "solver": "deis", "order": cal.DEFAULT_ORDER, "grid": grid.tolist()})
    with pytest.raises(cal.CalibrationError, match="difflab calibrate"):
        cal.read_calibration(tmp_path, LINEAR)


def test_the_calibrated_default_is_deis_with_the_corrector():
    """``sample_calibrated`` is ``sample_deis(order=DEFAULT_ORDER, corrector=True)`` on the grid it is given, and the
    uncalibrated default is the same DEIS without the corrector (SPEC §6)."""
    den = BED.denoiser(LINEAR)
    x = torch.randn(8, BED.D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grid = cal.default_sampler_grid(LINEAR, 8)
    torch.testing.assert_close(cal.sample_calibrated(den, x, grid).x,
                               ode.sample_deis(den, x, grid, order=cal.DEFAULT_ORDER, corrector=True).x, rtol=0, atol=0)
    torch.testing.assert_close(cal.sample_default(den, x, grid).x,
                               ode.sample_deis(den, x, grid, order=cal.DEFAULT_ORDER).x, rtol=0, atol=0)
