"""DDGAN (SPEC §5): the schedule, the generator's latent, the discriminator, the losses and R1, the sampler driven by
the exact posterior draw (oracle tests, every T), and the run through ``difflab train / sample / eval``."""

import math

import pytest
import torch

from difflab.cli import main
from difflab.config import ConfigError, load_config
from difflab.ddgan import DDGANGenerator, posterior_draw, r1_penalty, real_pair, sample_ddgan
from difflab.exact_kernels import oracle_x0_sampler, sample_marginal
from difflab.metrics import sliced_wasserstein2
from difflab.networks import build_network
from difflab.networks.discriminator import FourierFeatures, build_discriminator
from difflab.paths import DiscretePath, VPPath
from difflab.pipeline import generate
from difflab.testbeds import fit_gaussian, gaussian_bed, mixture_bed_2d

STEPS = (1, 2, 4, 8)


def vp_path(T: int) -> DiscretePath:
    return DiscretePath.from_schedule("vp", T)


# --- the schedule -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("T", STEPS)
def test_vp_schedule_samples_the_vp_sde_at_T_points(T):
    """ᾱ_t = a(τ_t)²/a(τ_0)² of the VP SDE (β 0.1..20) at τ_t = 1e-3 + (t/T)(1 − 1e-3); the end is the same for every
    T (ᾱ_T = exp(−10.05)/ᾱ(1e-3)), so T = 1 is one jump from (almost) pure noise to data."""
    path, vp = vp_path(T), VPPath(0.1, 20.0)
    tau = 1e-3 + torch.arange(T + 1, dtype=torch.float64) / T * (1 - 1e-3)
    assert torch.allclose(path.alpha_bar, vp.a(tau) ** 2 / vp.a(tau[0]) ** 2, rtol=1e-12, atol=0)
    assert path.T == T and float(path.a(torch.tensor(T))) < 0.007


# --- networks ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, shape", [("mlp", (2,)), ("unet", (1, 8, 8))])
def test_generator_takes_a_latent_and_discriminator_gives_one_logit(kind, shape):
    extra = {"channel_mults": [1, 2], "base_channels": 8, "num_res_blocks": 1} if kind == "unet" else {"hidden": 16}
    net = build_network(kind, shape, num_classes=3, latent_dim=5, **extra)
    x, t, y = torch.randn(4, *shape), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 0])
    z1, z2 = torch.randn(4, 5), torch.randn(4, 5)
    assert net(x, t, y=y, z=z1).shape == (4, *shape)
    # z enters the conditioning vector that modulates every block (scale/shift of the U-Net's norms)
    assert not torch.allclose(net.embed(t, y, z1), net.embed(t, y, z2))
    with pytest.raises(ValueError, match="latent z"):
        net(x, t, y=y)
    disc = build_discriminator(shape, num_classes=3, width=16, depth=2)
    assert disc(x, torch.randn_like(x), t, y=y).shape == (4,)


def test_fourier_features_are_x_then_sines_and_cosines_of_fixed_frequencies():
    """φ(x) = [x, sin(2π x W), cos(2π x W)] with W a saved buffer; the point discriminator applies the same φ to both
    members of the pair, so its logit depends on x_{t−1} through the features (and its weights carry W)."""
    torch.manual_seed(0)
    feats = FourierFeatures(2, 3, scale=2.0)
    x = torch.tensor([[0.25, 0.0], [0.1, -0.3]])
    W = feats.freqs
    assert W.shape == (2, 3) and "freqs" in feats.state_dict()
    phase = 2 * math.pi * (x[:, :1] * W[0] + x[:, 1:] * W[1])
    assert torch.allclose(feats(x), torch.cat([x, torch.sin(phase), torch.cos(phase)], 1), atol=1e-6)
    disc = build_discriminator((2,), width=8, depth=2, fourier=5, fourier_scale=1.5)
    assert disc.inp.in_features == 2 * (2 + 2 * 5) and "features.freqs" in disc.state_dict()
    assert float(disc.features.freqs.std()) > 0.5  # the scale reaches the frequencies
    t = torch.tensor([1, 1])
    assert not torch.allclose(disc(x, x, t), disc(x + 0.05, x, t))
    with pytest.raises(ValueError, match="Fourier"):
        build_discriminator((1, 8, 8), fourier=4)


# --- the losses -------------------------------------------------------------------------------------------------------
def test_r1_penalty_matches_the_closed_form():
    """D(x) = wᵀx + ½ xᵀAx has ∇D = w + Ax, so R1 = ||w + Ax||² per example, and d/dw of its mean is 2 E[w + Ax]."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    M = torch.randn(3, 3, generator=g, dtype=torch.float64)
    A = M + M.T
    x = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    d = x @ w + 0.5 * ((x @ A) * x).sum(-1)
    r1 = r1_penalty(d, x)
    grad = w + x @ A
    assert torch.allclose(r1, (grad**2).sum(-1), atol=1e-12)
    (dw,) = torch.autograd.grad(r1.mean(), w)
    assert torch.allclose(dw, 2 * grad.mean(0).detach(), atol=1e-12)


def test_real_pairs_and_posterior_draws_have_the_paths_laws():
    """x0 = 0.7 (a point mass), T = 4, t = 3: x_{t−1} ~ N(a_{t−1} x0, s²_{t−1}), x_t ~ N(a_t x0, s_t²) (SPEC §2);
    and the posterior draw from (x_t, x̂0 = x0) has the posterior's mean and variance. 200k draws: 5 standard errors."""
    path, n, t = vp_path(4), 200_000, 3
    g = torch.Generator().manual_seed(1)
    x0, tt = torch.full((n, 1), 0.7, dtype=torch.float64), torch.full((n,), t)
    noise = [torch.randn(n, 1, generator=g, dtype=torch.float64) for _ in range(3)]
    x_prev, x_t = real_pair(path, x0, tt, noise[0], noise[1])
    for x, s in ((x_prev, t - 1), (x_t, t)):
        a, sd = float(path.a(torch.tensor(s))), float(path.s(torch.tensor(s)))
        assert abs(float(x.mean()) - 0.7 * a) < 5 * sd / math.sqrt(n)
        assert abs(float(x.var()) / sd**2 - 1) < 5 * math.sqrt(2 / n)
    x = posterior_draw(path, x_t, x0, tt, noise[2])
    mean, var = path.posterior(x_t, x0, tt, tt - 1)
    assert torch.allclose((x - mean).var(), var[0, 0], rtol=5 * math.sqrt(2 / n))
    assert torch.equal(posterior_draw(path, x_t, x0, torch.ones(n, dtype=torch.long), noise[2]), x0)  # t = 1: x̂0


# --- the sampler driven by the exact posterior draw (oracle tests) ------------------------------------------------
@pytest.mark.parametrize("T", STEPS)
def test_oracle_ddgan_sampler_is_exact_on_a_gaussian_bed(T):
    """With x̂0 ~ q(x0 | x_t) in place of G, the chain from x_T ~ p_T draws from the data for every T. The KL from the
    data to the Gaussian fitted to n = 20,000 samples of a 4-D Gaussian (condition 10, mean 3/√D·N(0, I)) is what sampling noise alone
    gives: 2n·KL ~ χ² with D(D+3)/2 = 14 degrees of freedom, mean 3.5e-4 nats, sd 1.3e-4 (measured for data samples
    and for this sampler over seeds: 2.1e-4 – 4.1e-4); the bound is 4× the mean. Feeding the generator the time of
    the step above (the reference's t vs t + 1 trap) gives 0.06–0.08 nats at T = 4 and 8, above 10× the bound
    (at T ≤ 2 the shifted posterior is q(x0 | x_T) ≈ p_0 and the mistake is invisible on a Gaussian)."""
    bed, path, n = gaussian_bed(dim=4, condition=10.0, seed=T, mean_scale=3.0), vp_path(T), 20_000
    bound = 4 * 4 * 7 / (4 * n)
    g = torch.Generator().manual_seed(T)
    x_T = sample_marginal(bed, path, n, T, g)
    oracle = oracle_x0_sampler(bed, path)
    out = sample_ddgan(oracle, path, x_T, g)
    assert out.nfe == T
    assert float(bed.kl_from_gaussian(*fit_gaussian(out.x))) < bound
    if T >= 4:
        def off_by_one(x_t, t, generator=None, **cond):  # the x̂0 of the step above
            return oracle(x_t, (t + 1).clamp(max=T), generator, **cond)

        wrong = sample_ddgan(off_by_one, path, x_T, g)
        assert float(bed.kl_from_gaussian(*fit_gaussian(wrong.x))) > 10 * bound


@pytest.mark.parametrize("T", STEPS)
def test_oracle_ddgan_sampler_reaches_the_floor_on_the_mixture_through_the_pipeline(T):
    """The ``ddgan`` sampler of the pipeline (prior N(0, s_T²) for x_T, as ``difflab sample`` does) with the oracle
    generator on four 2-D blobs: sliced W2 of 2000 samples to fresh data below twice the data-vs-data floor (the mean
    of three pairs; see test_exact_kernels for the spread), and every step sees its own time, T down to 1."""
    bed, path, n = mixture_bed_2d(), vp_path(T), 2000
    g = torch.Generator().manual_seed(10 + T)
    seen = []
    oracle = oracle_x0_sampler(bed, path)

    class Oracle:
        def __init__(self):
            self.path, self.x0_draw = path, self

        def __call__(self, x_t, t, generator=None, **cond):
            seen.append((int(t[0]), float(x_t.var(0).sum())))
            return oracle(x_t, t, generator, **cond)

    out = generate(Oracle(), (2,), n, "ddgan", T, g, batch_size=n)
    assert out.nfe == T and [s for s, _ in seen] == list(range(T, 0, -1))
    for s, var in seen:  # the state handed over at time s has p_s's total variance, a_s² E|x0|² + 2 s_s² (± 10 %)
        a, sd = float(path.a(torch.tensor(s))), float(path.s(torch.tensor(s)))
        assert abs(var / (a**2 * (4 + 2 * 0.09) + 2 * sd**2) - 1) < 0.1
    sw = lambda x, y: sliced_wasserstein2(x.double(), y, 128, torch.Generator().manual_seed(7))  # noqa: E731
    ref = bed.sample(n, g, dtype=torch.float64)
    floor = sum(sw(bed.sample(n, g, dtype=torch.float64), ref) for _ in range(3)) / 3
    assert sw(out.x, ref) < 2 * floor


def test_class_conditional_generator_draws_pass_the_labels(mix2d):
    """``y`` reaches the generator at every step: the oracle conditioned on y lands every draw on y's blob."""
    path, g = vp_path(4), torch.Generator().manual_seed(0)
    y = torch.arange(400) % 4
    out = sample_ddgan(oracle_x0_sampler(mix2d, path), path, sample_marginal(mix2d, path, 400, 4, g), g, y=y)
    assert ((out.x - mix2d.means[y]).norm(dim=-1) < 1.4).all()


def test_generator_wrapper_draws_a_fresh_latent_per_sample():
    net = build_network("mlp", (2,), hidden=8, depth=1, time_dim=8, latent_dim=3)
    torch.nn.init.normal_(net.out.weight)
    gen = DDGANGenerator(net, vp_path(2), 3)
    x = torch.zeros(2, 2)
    out = gen.x0_draw(x, torch.tensor([2, 2]), torch.Generator().manual_seed(0))
    assert out.shape == (2, 2) and not torch.allclose(out[0], out[1])


# --- configs ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, fragment", [
    (["diffusion.path=vp"], "discrete path"),
    (["ddgan.betas=[0.5]"], "ddgan.betas"),
    (["ddgan.lazy_reg=0"], "ddgan.lazy_reg"),
    (["ddgan.d_fourier=-1"], "ddgan.d_fourier"),
    (["ddgan.d_fourier_scale=0"], "ddgan.d_fourier_scale"),
    (["model.learned_variance=true"], "learned_variance"),
])
def test_ddgan_config_errors_name_the_key(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, ["diffusion.objective=ddgan", "diffusion.schedule=vp", "diffusion.T=4", *overrides])


# --- the command line ---------------------------------------------------------------------------------------------------
TINY = ["data.name=mixture", "data.n=512", "model.kind=mlp", "model.hidden=32", "model.depth=1", "model.time_dim=16",
        "model.conditional=true", "diffusion.objective=ddgan", "diffusion.schedule=vp", "diffusion.T=2", "ddgan.nz=4",
        "ddgan.d_width=16", "ddgan.d_depth=1", "ddgan.lazy_reg=2", "train.steps=4", "train.batch_size=32",
        "train.checkpoint_every=2", "train.num_threads=1", "train.sample_every=4", "train.num_sample_images=16"]


def test_train_sample_eval_a_class_conditional_ddgan_run(tmp_path, capsys):
    """A few steps through ``difflab train``; ``difflab sample`` uses the generator chain with NFE = T (and --class),
    refuses other step counts and samplers in one line; ``difflab eval`` scores it like any run."""
    from difflab.config import save_config

    run = tmp_path / "run"
    cfg = tmp_path / "ddgan.yaml"
    save_config(load_config(None, TINY), cfg)
    assert main(["train", str(cfg), "--out", str(run), "--quiet"]) == 0
    assert (run / "samples" / "step_00000004.png").exists()
    assert main(["sample", str(run), "--num", "40", "--class", "2", "--out", str(tmp_path / "s.npz"), "--quiet"]) == 0
    import numpy as np

    saved = np.load(tmp_path / "s.npz")
    assert int(saved["nfe"]) == 2 and saved["x"].shape == (40, 2) and (saved["y"] == 2).all()
    capsys.readouterr()
    assert main(["sample", str(run), "--steps", "50", "--out", str(tmp_path / "s.png")]) == 2
    assert main(["sample", str(run), "--sampler", "ddim", "--out", str(tmp_path / "s.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "T = 2" in err[0] and "sampler ddgan" in err[1]
    assert main(["eval", str(run), "--num", "100", "--quiet", "--out", str(tmp_path / "e.json")]) == 0
    import json

    result = json.loads((tmp_path / "e.json").read_text())
    assert result["run"]["sampler"] == "ddgan" and result["run"]["nfe"] == 2
    assert math.isfinite(result["metrics"]["sliced_w2"]["value"])
