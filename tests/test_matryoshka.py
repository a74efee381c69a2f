"""Multi-scale (Matryoshka) diffusion (SPEC §5; Gu et al. 2023; difflab.matryoshka): the packed layout and the nested
U-Net's shapes and nesting, the log-SNR shift (sign, exact form, the per-resolution loss conversion), joint sampling
from shared times, the agreement measure, and a tiny progressive run on the engine sampled at both resolutions."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab import DiscretePath, VPPath
from difflab.cli import main
from difflab.config import ConfigError, load_config
from difflab.losses import target_eps_factor
from difflab.matryoshka import (LowResolutionPath, ResolutionDecoder, agreement, at_resolution, downsample, joint_data,
                                log_snr_shift, low_resolution_log_snr, low_resolution_weight)
from difflab.networks import MatryoshkaUNet, NestedLayout
from difflab.parameterization import NetworkDenoiser
from difflab.pipeline import generate, load_run

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mdm_mnist5k.yaml"
TINY = ["data.name=digits8", "data.n=64", "model.base_channels=8", "model.channel_mults=[1,1]",
        "model.num_res_blocks=1", "model.attn_resolutions=[]", "diffusion.T=100", "matryoshka.inner_steps=2",
        "train.steps=4", "train.batch_size=8", "train.log_every=1", "train.checkpoint_every=2", "train.sample_every=0",
        "train.warmup_steps=0", "train.num_threads=1", "train.device=cpu"]
"""8×8 digits and their 4×4 versions: a nested U-Net of a few thousand parameters, the inner network alone for 2 steps."""
PATHS = {"cosine": DiscretePath.from_schedule("cosine", T=1000), "vp": VPPath()}


def tiny_net() -> MatryoshkaUNet:
    """A nested U-Net for 8×8 and 4×4 whose output convolutions are random (zero-initialised ones would make every
    output 0 and the comparisons below empty); the adapters stay zero, as initialised."""
    torch.manual_seed(0)
    net = MatryoshkaUNet(1, base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_resolutions=(),
                         num_classes=3, image_size=8)
    for conv in (net.conv_out, net.inner.conv_out):
        torch.nn.init.normal_(conv.weight, std=0.1)
    return net


# --- the layout and the network ------------------------------------------------------------------------------------
def test_layout_packs_and_unpacks_both_resolutions():
    layout = NestedLayout(1, 28, 28)
    assert layout.packed_shape == (1, 28 * 28 + 14 * 14) and layout.low_shape == (1, 14, 14)
    assert NestedLayout.of_packed((1, 980)) == layout
    high, low = torch.randn(3, 1, 28, 28), torch.randn(3, 1, 14, 14)
    back_high, back_low = layout.unpack(layout.pack(high, low))
    assert torch.equal(back_high, high) and torch.equal(back_low, low)
    for bad in [(1, 981), (1, 28, 28), (1, 5 * 13 * 13 // 4)]:
        with pytest.raises(ValueError):
            NestedLayout.of_packed(bad)


def test_nested_unet_shapes_and_the_inner_network_alone():
    net = tiny_net()
    x, t, y = torch.randn(5, 1, 80), torch.randint(1, 100, (5,)), torch.tensor([0, 1, 2, -1, 0])
    joint = net(x, t, y)
    alone = net(x, t, y, inner_only=True)
    assert joint.shape == alone.shape == (5, 1, 80)
    high_alone, low_alone = net.layout.unpack(alone)
    assert torch.equal(high_alone, torch.zeros_like(high_alone)) and low_alone.abs().min() > 0
    torch.testing.assert_close(low_alone, net.inner(net.layout.unpack(x)[1], t, y))  # the inner U-Net itself
    # zero-initialised adapters: at the start of the joint phase the inner network is exactly as trained alone
    torch.testing.assert_close(net.layout.unpack(joint)[1], low_alone)


def test_the_outer_level_feeds_the_inner_network_through_the_adapters():
    """With the adapters trained (non-zero), the low-resolution output depends on the high-resolution input."""
    net = tiny_net()
    assert torch.count_nonzero(net.in_adapter.weight) == 0
    x0, t0 = torch.randn(2, 1, 80), torch.tensor([10, 50])
    x0_changed = x0.clone()
    x0_changed[:, :, :64] += 1.0
    torch.testing.assert_close(net.layout.unpack(net(x0, t0))[1], net.layout.unpack(net(x0_changed, t0))[1])  # at init
    torch.nn.init.normal_(net.in_adapter.weight, std=0.1)
    x, t = torch.randn(2, 1, 80), torch.tensor([10, 50])
    x2 = x.clone()
    x2[:, :, :64] += 1.0  # change the high resolution only
    assert not torch.allclose(net.layout.unpack(net(x, t))[1], net.layout.unpack(net(x2, t))[1])


# --- the log-SNR shift ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PATHS))
def test_low_resolution_is_less_noisy_by_twice_the_log_ratio(name):
    """λ_14(t) = λ_28(t) + 2 log(28/14): the joint state's low part has signal 2a for D(x) and noise s (read off
    exactly with ε = 0 and x0 = 0), and LowResolutionPath is that schedule with a² + s² kept."""
    path = PATHS[name]
    t = torch.tensor([1, 100, 500, 900]) if name == "cosine" else torch.tensor([0.05, 0.3, 0.6, 0.9], dtype=torch.float64)
    layout = NestedLayout(1, 28, 28)
    images = torch.rand(4, 1, 28, 28, dtype=torch.float64) * 2 - 1
    x0 = joint_data(images, layout)
    low_signal = layout.unpack(path.sample(x0, t, torch.zeros_like(x0))[0])[1]
    low_noise = layout.unpack(path.sample(torch.zeros_like(x0), t, torch.ones_like(x0))[0])[1]
    a_eff = (low_signal / downsample(images)).flatten(1)[:, 0]
    s_eff = low_noise.flatten(1)[:, 0]
    lam = path.log_snr(t).double()
    torch.testing.assert_close(2 * torch.log(a_eff / s_eff), lam + 2 * math.log(2))
    torch.testing.assert_close(low_resolution_log_snr(path, t), lam + 2 * math.log(2))
    assert log_snr_shift(2) == pytest.approx(2 * math.log(2)) and log_snr_shift(2) > 0  # the sign: less noise
    low = LowResolutionPath(path, 2)
    torch.testing.assert_close(low.log_snr(t).double(), lam + 2 * math.log(2))
    torch.testing.assert_close((low.a(t) ** 2 + low.s(t) ** 2).double(), (path.a(t) ** 2 + path.s(t) ** 2).double())


def test_the_shift_is_the_noise_level_of_the_pooled_high_resolution():
    """Why +2 log r: avgpool_2 of white noise has variance 1/4, so avgpool(a x + s ε) has log-SNR λ + 2 log 2 for
    D(x) — the low resolution at t carries the pooled high resolution's noise level (Monte Carlo, 10⁶ values)."""
    eps = torch.randn(2500, 1, 40, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    var = float(downsample(eps).var())
    assert var == pytest.approx(math.exp(-log_snr_shift(2)), rel=0.01)


@pytest.mark.parametrize("name", sorted(PATHS))
@pytest.mark.parametrize("target", ["eps", "x0", "v"])
def test_low_resolution_weight_is_the_ratio_of_eps_factors(name, target):
    """Oracle: the closed form equals target_eps_factor on the low resolution's own path over the run's path."""
    path = PATHS[name]
    t = torch.tensor([1, 10, 300, 700, 999]) if name == "cosine" else torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99],
                                                                                  dtype=torch.float64)
    expected = target_eps_factor(LowResolutionPath(path, 2), t, target) / target_eps_factor(path, t, target)
    torch.testing.assert_close(low_resolution_weight(path, t, target).double(), expected.double())


# --- joint sampling --------------------------------------------------------------------------------------------------
class SpyX0:
    """A network predicting a fixed packed ``x*`` (target x0) that records the time and state of every call."""

    def __init__(self, x_star):
        self.x_star, self.calls = x_star, []

    def __call__(self, x, t, y=None):
        self.calls.append((t.clone(), x.clone()))
        return self.x_star.expand_as(x).to(x.dtype)


def test_joint_sampler_advances_both_resolutions_from_shared_times():
    """Deterministic DDIM with x̂0 = x* keeps (x_t − a_t x*)/s_t = ε_T, so at every network call both resolutions
    must sit at the call's one time t (in joint coordinates: the low one at λ(t) + 2 log 2): one evaluation per step
    for both, one t per call, and the two decoded resolutions are the two parts of the same joint sample."""
    path = DiscretePath.from_schedule("cosine", T=100)
    layout = NestedLayout(1, 8, 8)
    x_star = joint_data(torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, layout)
    spy = SpyX0(x_star)
    out = generate(NetworkDenoiser(spy, path, "x0"), layout.packed_shape, 4, "ddim", 10, torch.Generator().manual_seed(1))
    x_T = path.prior_sample((4, *layout.packed_shape), torch.Generator().manual_seed(1))
    T = torch.tensor(path.T)
    eps_T = (x_T - float(path.a(T)) * x_star) / float(path.s(T))  # ε̂ at the first step, kept along the chain
    assert len(spy.calls) == out.nfe == 10
    for t, x in spy.calls:
        assert torch.all(t == t[0]), "one time per call for the whole joint state"
        a, s = float(path.a(t[0])), float(path.s(t[0]))
        high, low = layout.unpack(x.double())
        high_star, low_star = layout.unpack(x_star.double())
        high_eps, low_eps = layout.unpack(eps_T.double())
        torch.testing.assert_close(high, a * high_star + s * high_eps, atol=1e-5, rtol=0)
        torch.testing.assert_close(low, a * low_star + s * low_eps, atol=1e-5, rtol=0)
    for side, part in ((8, 0), (4, 1)):
        decoded = ResolutionDecoder(layout, side)(out.x)
        scale = 1.0 if part == 0 else 2.0
        torch.testing.assert_close(decoded, (layout.unpack(out.x)[part] / scale).float())
        torch.testing.assert_close(decoded[0], (layout.unpack(x_star)[part][0] / scale).float(), atol=1e-4, rtol=0)


# --- agreement -----------------------------------------------------------------------------------------------------
def test_agreement_is_zero_for_consistent_pairs_and_about_one_for_independent_images():
    g = torch.Generator().manual_seed(0)
    high = torch.rand(200, 1, 28, 28, generator=g)
    same = agreement(high, downsample(high), torch.Generator().manual_seed(1))
    assert same["distance"] < 1e-5 and same["random_pairs"] > 1.0 and same["ratio"] < 1e-5  # float32 pooling
    other = agreement(high, downsample(torch.rand(200, 1, 28, 28, generator=g)), torch.Generator().manual_seed(1))
    assert 0.9 < other["ratio"] < 1.1
    two = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])  # the random pairing never pairs a sample with itself
    assert agreement(two, downsample(two))["random_pairs"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        agreement(high[:1], downsample(high[:1]))


# --- config -------------------------------------------------------------------------------------------------------
def test_config_ties_the_objective_to_the_nested_network():
    cfg = load_config(CONFIG, [])
    assert cfg.model.kind == cfg.diffusion.objective == "matryoshka" and cfg.data.name == "mnist5k"
    for bad in (["model.kind=unet"], ["diffusion.objective=diffusion"], ["diffusion.weighting=snr"]):
        with pytest.raises(ConfigError, match="matryoshka"):
            load_config(CONFIG, bad)


# --- a tiny progressive run on the engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from difflab.training import train

    run_dir = tmp_path_factory.mktemp("mdm") / "run"
    train(load_config(CONFIG, TINY), run_dir, progress=False)
    return run_dir


def test_progressive_training_trains_the_inner_network_first(tiny_run):
    """Steps 1–2 optimise the low resolution's loss alone and leave the outer level's weights as initialised; steps
    3–4 optimise the sum and move them."""
    import json

    from difflab.checkpoint import load_checkpoint
    from difflab.data import load_dataset
    from difflab.engine import Engine, Settings
    from difflab.objectives.matryoshka import MatryoshkaObjective

    records = [json.loads(line) for line in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records[:2]:
        assert r["loss"] == r["loss_low"]  # the low resolution alone
    for r in records[2:]:
        assert r["loss"] > r["loss_low"] > 0  # both resolutions

    cfg = load_config(CONFIG, TINY + ["train.steps=2"])
    objective = MatryoshkaObjective(cfg, load_dataset("digits8", n=64, seed=0), torch.device("cpu"))
    before = {k: v.clone() for k, v in objective.net.state_dict().items()}
    Engine(objective, Settings.from_train(cfg.train), None, progress=False).fit()
    after = objective.net.state_dict()
    outer = [k for k in before if not k.startswith("inner.")]
    assert outer and all(torch.equal(before[k], after[k]) for k in outer), "the outer level waits"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("inner.")), "the inner one trains"
    step2, step4 = load_checkpoint(tiny_run, "step_00000002").model, load_checkpoint(tiny_run, "step_00000004").model
    assert any(not torch.equal(step2[k], step4[k]) for k in outer), "the outer level trains in the joint phase"


def test_a_trained_run_samples_at_either_resolution_with_guidance(tiny_run):
    pipe = load_run(tiny_run)
    assert pipe.output_shape == (1, 8, 8)
    for sampler in ("ddim", "ddpm", "dpmpp2m", "heun", "deis", "default"):
        x = pipe.sample(6, sampler=sampler, steps=4, progress=False).x
        assert x.shape == (6, 1, 8, 8) and torch.isfinite(x).all(), sampler
    guided = pipe.sample(6, steps=4, guidance_scale=3.0, progress=False)
    assert guided.nfe == 8 and guided.x.shape == (6, 1, 8, 8)
    small = at_resolution(pipe, 4)
    low = small.sample(6, steps=4, guidance_scale=3.0, progress=False).x
    assert low.shape == (6, 1, 4, 4)
    joint = pipe.sample(6, steps=4, guidance_scale=3.0, progress=False, decode=False).x
    torch.testing.assert_close(low, pipe.decoder.layout.unpack(joint)[1] / 2)  # the same joint sample
    with pytest.raises(ValueError, match="8 or 4"):
        at_resolution(pipe, 2)


def test_sample_cli_writes_either_resolution(tiny_run, tmp_path, capsys):
    for side in (4, 8):
        out = tmp_path / f"s{side}.npz"
        assert main(["sample", str(tiny_run), "--num", "10", "--steps", "3", "--resolution", str(side), "--quiet",
                     "--guidance-scale", "2", "--out", str(out)]) == 0
        assert np.load(out)["x"].shape == (10, 1, side, side)
    assert main(["sample", str(tiny_run), "--num", "10", "--steps", "3", "--quiet", "--out", str(tmp_path / "g.png")]) == 0


def test_resolution_is_refused_for_a_single_resolution_run(tmp_path, capsys):
    from difflab.training import train

    run_dir = tmp_path / "plain"
    train(load_config(ROOT / "configs" / "tiny2d.yaml", ["train.steps=2", "train.checkpoint_every=2"]), run_dir,
          progress=False)
    code = main(["sample", str(run_dir), "--num", "4", "--steps", "2", "--resolution", "14", "--quiet",
                 "--out", str(tmp_path / "x.npz")])
    err = capsys.readouterr().err
    assert code == 2 and "matryoshka" in err and len(err.strip().splitlines()) == 1
