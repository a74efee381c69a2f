"""Nested diffusion, anytime sampling (SPEC §5; Elata et al. 2023): exact reductions, exactly distributed anytime
outputs with an oracle inner sampler, the exact KL of each anytime output on the Gaussian bed, guidance, the CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch

from difflab import DiscretePath, LinearPath, VPPath, gaussian_bed
from difflab.cli import main
from difflab.exact_kernels import oracle_x0_sampler, sample_marginal
from difflab.guidance import exact_cfg
from difflab.pipeline import NESTED_INNER, generate
from difflab.samplers import discrete_timesteps, sample_ddim
from difflab.samplers.nested import DEFAULT_SPLITS, AnytimeOutputs, default_split, inner_sampler, oracle_inner, \
    sample_nested, sub_grid
from difflab.samplers.ode import sample_deis, sample_dpmpp_2m, sample_euler, sample_heun
from difflab.samplers.time_grids import uniform_t
from difflab.testbeds import affine_pushforward, fit_gaussian

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny2d.yaml"
FAST = ["train.steps=4", "train.checkpoint_every=2"]


def prior(path, n, dim, seed=0):
    return path.prior_sample((n, dim), torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_inner_one_ddim_step_is_ddim_on_the_outer_grid(bed16, linear_path, eta):
    """One inner DDIM step returns the denoiser's x̂0, whose implied ε is ε̂: the outer chain is DDIM (any η)."""
    den = bed16.denoiser(linear_path)
    x = prior(linear_path, 64, bed16.D)
    ddim = sample_ddim(den, x, steps=10, eta=eta, generator=torch.Generator().manual_seed(1))
    nested = sample_nested(den, x, discrete_timesteps(linear_path.T, 10), inner_sampler(sample_ddim, 1), eta=eta,
                           generator=torch.Generator().manual_seed(1))
    assert nested.nfe == ddim.nfe == 10
    torch.testing.assert_close(nested.x, ddim.x, rtol=0, atol=1e-10)


def test_one_outer_step_is_the_inner_sampler_discrete(bed16, linear_path):
    """Grid [T, 0]: the anytime output is the inner DDIM run itself, also through the pipeline by name."""
    den = bed16.denoiser(linear_path)
    x = prior(linear_path, 32, bed16.D)
    nested = sample_nested(den, x, discrete_timesteps(linear_path.T, 1), inner_sampler(sample_ddim, 7))
    ddim = sample_ddim(den, x, steps=7)
    assert nested.nfe == ddim.nfe == 7
    assert torch.equal(nested.x, ddim.x)
    by_name = [generate(den, (bed16.D,), 32, s, n, torch.Generator().manual_seed(0), **o).x
               for s, n, o in (("nested", 1, {"inner": 7, "inner_eta": 0.0}), ("ddim", 7, {}))]
    torch.testing.assert_close(by_name[0], by_name[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("solver", [sample_euler, sample_heun, sample_dpmpp_2m, sample_deis],
                         ids=["euler", "heun", "dpmpp2m", "deis"])
def test_one_outer_step_is_the_inner_sampler_continuous(bed16, solver):
    """Any ODE solver plugs in as the inner sampler; with one outer step the output is that solver's, NFE its own."""
    path = VPPath()
    den = bed16.denoiser(path)
    x = prior(path, 32, bed16.D)
    nested = sample_nested(den, x, uniform_t(path, 1), inner_sampler(solver, 6))
    direct = solver(den, x, sub_grid(path, path.t_max, 6))
    assert nested.nfe == direct.nfe
    assert torch.equal(nested.x, direct.x)


def test_a_nested_sampler_nests(bed16, linear_path):
    """A nested sampler is itself an inner sampler: NFE multiply, and nested(1 outer, 1 DDIM step) is one DDIM step."""
    den = bed16.denoiser(linear_path)
    x = prior(linear_path, 16, bed16.D)
    grid = discrete_timesteps(linear_path.T, 5)
    one_step = inner_sampler(sample_nested, 1, inner=inner_sampler(sample_ddim, 1))
    torch.testing.assert_close(sample_nested(den, x, grid, one_step).x, sample_ddim(den, x, steps=5).x,
                               rtol=0, atol=1e-10)
    deep = inner_sampler(sample_nested, 3, inner=inner_sampler(sample_ddim, 2))
    out = sample_nested(den, x, grid, deep)
    assert out.nfe == 5 * 3 * 2 and torch.isfinite(out.x).all()


def anytime_kls(bed, den, x, outer: int, inner, eta: float = 0.0, generator=None, exact: bool = False) -> list:
    """KL(anytime output after each outer step ‖ data) on a single-Gaussian bed: exact (affine push-forward of the
    probe points ``x``) for a deterministic chain, else of a Gaussian fitted to the samples."""
    anytime = AnytimeOutputs()
    sample_nested(den, x, discrete_timesteps(den.path.T, outer), inner, eta=eta, generator=generator, callback=anytime)
    if exact:
        laws = [affine_pushforward(lambda _: x0.double(), bed.D, den.path.prior_std()) for _, _, x0 in anytime.outputs()]
    else:
        laws = [fit_gaussian(x0.double()) for _, _, x0 in anytime.outputs()]
    return [float(bed.kl_from_gaussian(*law)) for law in laws]


def test_a_deterministic_inner_run_drifts_exact_kl(bed16, linear_path):
    """16-D Gaussian bed, exact denoiser, outer and inner η = 0: the chain is affine in x_T, so every anytime output's
    KL is exact (affine push-forward). The first is DDIM with the inner steps; then, because a deterministic inner run
    is not a draw from q(x0 | x_t), the outer states drift from p_t (module docstring). Measured, 10 outer × 10 inner:
    0.815, 0.623, 0.422, 0.261, 0.292, 0.697, …, 5.005 nats; asserted: the first equals DDIM-10 (0.815), the curve falls
    at first, bottoms out inside, and ends above where it started."""
    den = bed16.denoiser(linear_path)
    probes = torch.cat([torch.zeros(1, bed16.D), torch.eye(bed16.D)]).double()  # affine_pushforward's probe points
    kls = anytime_kls(bed16, den, probes, 10, inner_sampler(sample_ddim, 10), exact=True)
    ddim10 = float(bed16.kl_from_gaussian(*affine_pushforward(lambda x: sample_ddim(den, x, steps=10).x, bed16.D,
                                                              linear_path.prior_std())))
    assert kls[0] == pytest.approx(ddim10, rel=1e-9)
    lowest = kls.index(min(kls))
    assert 0 < lowest < 9 and kls[1] < kls[0] and kls[-1] > kls[0], kls


def test_a_stochastic_inner_run_improves_every_anytime_output(bed16, linear_path):
    """Outer η = 0, inner DDIM η = 1 (the DDPM posterior, a sampler of q(x0 | x_t)): the anytime KL falls at every
    outer step. Monte Carlo, n = 20000 (fitted-Gaussian KL; its floor for exact data ≈ 0.003 nats). Measured, 4 outer
    × 25 inner: 0.407, 0.266, 0.141, 0.054 nats; asserted: each below the one before, the last below 0.1."""
    den = bed16.denoiser(linear_path)
    x = prior(linear_path, 20_000, bed16.D)
    kls = anytime_kls(bed16, den, x, 4, inner_sampler(sample_ddim, 25, eta=1.0), generator=torch.Generator().manual_seed(0))
    assert all(later < earlier for earlier, later in zip(kls, kls[1:])) and kls[-1] < 0.1, kls


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_oracle_inner_gives_exactly_distributed_anytime_outputs(bed16, eta):
    """With exact posterior draws as the inner sampler every outer state has the exact marginal p_t, for any η (the
    DDIM family keeps q(x_t | x0); η = 1 is the posterior draw, η = 0 reuses the exact noise implied by (x_t, x0)),
    so every anytime output is distributed as the data. Zero terminal SNR makes the prior p_T itself. Monte Carlo at
    n = 20000: the fitted-Gaussian KL sits at its estimator floor (≈ 0.004 nats, measured 0.003–0.005), against
    0.8 nats for plain DDIM with as many steps; asserted < 0.01 at every outer step."""
    path = DiscretePath.from_schedule("linear", T=1000, zero_terminal_snr=True)
    n = 20_000
    anytime = AnytimeOutputs()
    g = torch.Generator().manual_seed(0)
    out = sample_nested(bed16.denoiser(path), prior(path, n, bed16.D), discrete_timesteps(path.T, 10),
                        oracle_inner(oracle_x0_sampler(bed16, path)), eta=eta, generator=g, callback=anytime)
    assert out.nfe == 0 and len(anytime.outputs()) == 10
    kls = [float(bed16.kl_from_gaussian(*fit_gaussian(x.double()))) for _, _, x in anytime.outputs()]
    floor = float(bed16.kl_from_gaussian(*fit_gaussian(bed16.sample(n, g, dtype=torch.float64))))
    assert max(kls) < 0.01 and floor < 0.01, (kls, floor)


def test_oracle_inner_on_a_mixture_reaches_the_floor_at_every_outer_step(mix2d, linear_path):
    """The same on the 2-D mixture bed (SPEC §8) with :func:`difflab.exact_kernels.oracle_x0_sampler`: every anytime
    output of 5 outer DDIM steps (η = 0) is an exact draw, so its sliced W2 to fresh data sits at the data-vs-data
    floor (n = 4000; asserted below 2.5× the mean of three floors, the mixture's blob counts vary between draws),
    while plain DDIM with 5 steps is far off (asserted 4× the floor)."""
    from difflab.metrics import sliced_wasserstein2

    n, g = 4000, torch.Generator().manual_seed(3)
    x_T = sample_marginal(mix2d, linear_path, n, linear_path.T, g)
    grid = discrete_timesteps(linear_path.T, 5)
    anytime = AnytimeOutputs()
    sample_nested(mix2d.denoiser(linear_path), x_T, grid, oracle_inner(oracle_x0_sampler(mix2d, linear_path)),
                  generator=g, callback=anytime)
    floor = sum(sliced_wasserstein2(mix2d.sample(n, g), mix2d.sample(n, g), generator=g) for _ in range(3)) / 3
    sw2 = [sliced_wasserstein2(x, mix2d.sample(n, g), generator=g) for _, _, x in anytime.outputs()]
    plain = sample_ddim(mix2d.denoiser(linear_path), x_T, timesteps=grid).x
    assert len(sw2) == 5 and max(sw2) < 2.5 * floor, (sw2, floor)
    assert sliced_wasserstein2(plain, mix2d.sample(n, g), generator=g) > 2 * floor


def test_guidance_travels_through_every_inner_call(mix2d, linear_path):
    """CFG (SPEC §7) on the exact mixture: the guided denoiser is the one the inner sampler calls, so nested with one
    inner DDIM step is guided DDIM, and each guided evaluation counts 2."""
    cfg = exact_cfg(mix2d, linear_path, 3.0)
    x = prior(linear_path, 40, 2)
    y = torch.arange(40) % 4
    nested = sample_nested(cfg, x, discrete_timesteps(linear_path.T, 6), inner_sampler(sample_ddim, 1), y=y)
    ddim = sample_ddim(cfg, x, steps=6, y=y)
    assert nested.nfe == ddim.nfe == 12
    torch.testing.assert_close(nested.x, ddim.x, rtol=0, atol=1e-10)
    deep = sample_nested(cfg, x, discrete_timesteps(linear_path.T, 3), inner_sampler(sample_ddim, 4), y=y)
    assert deep.nfe == 2 * 3 * 4


def test_bad_outer_grids_are_refused(bed16, linear_path):
    den = bed16.denoiser(linear_path)
    x = prior(linear_path, 2, bed16.D)
    with pytest.raises(ValueError, match="clean end"):
        sample_nested(den, x, torch.tensor([1000, 500]), inner_sampler(sample_ddim, 2))
    with pytest.raises(ValueError, match="strictly decreasing"):
        sample_nested(den, x, torch.tensor([500, 1000, 0]), inner_sampler(sample_ddim, 2))
    with pytest.raises(ValueError, match="inner steps"):
        inner_sampler(sample_ddim, 0)


def test_sub_grids_run_from_the_outer_time_to_the_clean_end(linear_path):
    assert sub_grid(linear_path, 37, 10).tolist() == discrete_timesteps(37, 10).tolist()
    assert sub_grid(linear_path, 3, 10).tolist() == [3, 2, 1, 0]  # at most t integer steps
    path = VPPath()
    grid = sub_grid(path, 0.5, 5)
    assert grid.numel() == 6 and grid[0] == 0.5 and grid[-2] == path.t_min and grid[-1] == 0.0
    assert (grid[:-1] > grid[1:]).all()
    assert sub_grid(path, 0.5, 1).tolist() == [0.5, 0.0]
    grid = sub_grid(LinearPath(), 1.0, 4)  # a = 0 at t_max (σ̄ = ∞), and the clean end is t_min itself
    assert grid.numel() == 5 and grid[0] == 1.0 and grid[-1] == 0.0 and (grid[:-1] > grid[1:]).all()


@pytest.mark.parametrize("path", [DiscretePath.from_schedule("cosine", T=100), VPPath(), LinearPath()],
                         ids=["discrete", "vp", "linear"])
@pytest.mark.parametrize("inner", NESTED_INNER)
def test_every_named_inner_sampler_runs_on_every_path(path, inner):
    """The pipeline's nested sampler by name: finite samples, NFE at most outer × inner (Heun/RK4 steps cost 2/4)."""
    den = gaussian_bed(4, 10.0, seed=0).denoiser(path)
    out = generate(den, (4,), 50, "nested", 3, torch.Generator().manual_seed(0), inner=5, inner_sampler=inner)
    assert torch.isfinite(out.x).all() and 3 <= out.nfe <= 15


def test_default_split_follows_the_measured_table():
    for budget, (outer, inner) in DEFAULT_SPLITS.items():
        assert default_split(budget) == (outer, inner) and outer * inner == budget
    for budget in (1, 7, 33, 1000):
        outer, inner = default_split(budget)
        assert 1 <= outer <= budget and outer * inner <= budget and inner >= 1


def test_cli_nested_with_anytime_outputs_and_guidance(capsys, tmp_path):
    """``difflab sample --sampler nested``: NFE = outer × inner (× 2 guided), one anytime file per outer step."""
    run = tmp_path / "run"
    assert main(["train", str(TINY), "--out", str(run), "--quiet", "--set", *FAST, "model.conditional=true",
                 "train.p_uncond=0.2"]) == 0
    any_dir = tmp_path / "anytime"
    code = main(["sample", str(run), "--sampler", "nested", "--outer", "3", "--inner", "2", "--num", "20",
                 "--anytime-out", str(any_dir), "--out", str(tmp_path / "s.npz"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert int(np.load(tmp_path / "s.npz")["nfe"]) == 6
    files = sorted(p.name for p in any_dir.iterdir())
    assert files == ["step_000_nfe_2.npz", "step_001_nfe_4.npz", "step_002_nfe_6.npz"]
    last = np.load(any_dir / files[-1])
    np.testing.assert_allclose(last["x"], np.load(tmp_path / "s.npz")["x"], rtol=0, atol=1e-6)
    code = main(["sample", str(run), "--sampler", "nested", "--outer", "2", "--inner", "3", "--inner-sampler", "deis",
                 "--guidance-scale", "2", "--num", "8", "--anytime-out", str(tmp_path / "png"),
                 "--out", str(tmp_path / "g.png"), "--quiet"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "12 network evaluations" in out
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["step_000_nfe_6.png", "step_001_nfe_12.png"]
    code = main(["sample", str(run), "--sampler", "nested", "--steps", "20", "--num", "4", "--out",
                 str(tmp_path / "budget.npz"), "--quiet"])
    assert code == 0 and int(np.load(tmp_path / "budget.npz")["nfe"]) == np.prod(default_split(20))
    capsys.readouterr()
    code = main(["sample", str(run), "--outer", "3", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "--outer applies to --sampler nested only" in err and err.count("\n") == 1
