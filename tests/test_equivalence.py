"""SPEC §6 last bullet: deterministic DDIM is Euler on the linear (rectified-flow) path up to a time change.

With ``x̄ = x/a``, ``σ̄ = s/a`` a DDIM step is Euler on ``dx̄/dσ̄ = ε̂``; the linear path has ``x/(1−t)`` and
``t/(1−t)`` in the same roles. :func:`difflab.equivalence.ddim_to_linear` maps a DDIM grid to linear-path
times ``t_lin = s/(a+s)`` and states ``x_lin = x/(a+s)``; on the exact test-bed model (SPEC §8) the two
samplers then agree to float64 rounding.
"""

import pytest
import torch

from difflab import DiscretePath, LinearPath, VPPath, gaussian_bed, mixture_bed_2d
from difflab.equivalence import change_path, ddim_to_linear, matching_time
from difflab.paths import EDMPath
from difflab.samplers import discrete_timesteps, sample_ddim
from difflab.samplers.ode import sample_euler, sample_heun
from difflab.samplers.time_grids import uniform_t


@pytest.mark.parametrize("kind", ["discrete", "vp"])
def test_ddim_equals_linear_path_euler(kind):
    """DDIM (η = 0) on the discrete DDPM path (T = 1000, 10 trailing steps) or on continuous VP (12 uniform
    steps) equals Euler on the linear path over the mapped grid, for the exact model of a 2-D mixture and a
    16-D Gaussian: final samples agree to 1e-10 (float64; measured ≤ 5.5e-14), and so does every intermediate
    state after rescaling by ``scale``."""
    for bed in (mixture_bed_2d(), gaussian_bed(16, condition=100.0)):
        if kind == "discrete":
            path = DiscretePath.from_schedule("linear", T=1000)
            grid = discrete_timesteps(1000, 10, "trailing")
        else:
            path = VPPath()
            grid = uniform_t(path, 12)
        x = path.prior_sample((64, bed.D), torch.Generator().manual_seed(0), dtype=torch.float64)
        ddim_states = []
        ddim = sample_ddim(bed.denoiser(path), x, timesteps=grid, callback=ddim_states.append)
        t_lin, scale = ddim_to_linear(path, grid)
        euler_states = []
        euler = sample_euler(bed.denoiser(LinearPath()), x * scale[0], t_lin, callback=euler_states.append)
        assert float(t_lin[-1]) == 0.0 and float(scale[-1]) == 1.0
        assert torch.allclose(ddim.x, euler.x, atol=1e-10, rtol=0), float((ddim.x - euler.x).abs().max())
        for i, (d, e) in enumerate(zip(ddim_states, euler_states)):
            assert torch.allclose(d["x"] * scale[i + 1], e["x"], atol=1e-10, rtol=0)
        assert ddim.nfe == euler.nfe == len(grid) - 1


def test_the_map_is_not_the_identity():
    """Control: Euler on the linear path over the *unmapped* uniform grid differs from DDIM (by > 1e-3)."""
    bed = gaussian_bed(16, condition=100.0)
    path = VPPath()
    grid = uniform_t(path, 12)
    x = path.prior_sample((16, bed.D), torch.Generator().manual_seed(0), dtype=torch.float64)
    ddim = sample_ddim(bed.denoiser(path), x, timesteps=grid)
    naive = sample_euler(bed.denoiser(LinearPath()), x, uniform_t(LinearPath(), 12))
    assert float((ddim.x - naive.x).abs().max()) > 1e-3


def test_change_path_is_exact():
    """:func:`change_path` re-times the VP model onto EDM's path (``a = 1, s = σ``) and the linear path: the
    predictions equal the exact model of that path (1e-10), and Heun on EDM's path is one more solver for VP."""
    bed = mixture_bed_2d()
    vp = bed.denoiser(VPPath())
    x = torch.randn(32, 2, dtype=torch.float64)
    for target in (EDMPath(), LinearPath()):
        moved = change_path(vp, target)
        for tau in (0.3, 0.7):
            t = torch.full((32,), tau * float(target.t_max), dtype=torch.float64)
            got, want = moved(x, t), bed.denoiser(target)(x, t)
            assert torch.allclose(got.x0, want.x0, atol=1e-10) and torch.allclose(got.eps, want.eps, atol=1e-10)
    t = torch.tensor([0.4], dtype=torch.float64)
    assert torch.allclose(matching_time(VPPath(), t, EDMPath()), VPPath().sigma_bar(t))
    edm = EDMPath(sigma_min=0.01, sigma_max=float(VPPath().sigma_bar(torch.tensor(1.0, dtype=torch.float64))))
    out = sample_heun(change_path(vp, edm), x, torch.cat([torch.linspace(edm.t_max, 0.01, 20, dtype=torch.float64),
                                                          torch.zeros(1, dtype=torch.float64)]))
    assert torch.isfinite(out.x).all() and out.nfe == 2 * 19 + 1
