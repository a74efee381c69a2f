"""Latent diffusion (SPEC §5): the latent scale, scaling as a log-SNR shift of the path, the exact PCA check, and
latent runs through every sampler, guidance, ``difflab sample`` and ``difflab eval``."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab.cli import main
from difflab.config import ConfigError, load_config
from difflab.equivalence import change_path
from difflab.latent import PCAAutoencoder, ScaledLatentPath, load_autoencoder, scale_factor, training_data
from difflab.paths import DiscretePath, LinearPath, VPPath
from difflab.pipeline import generate, load_run, run_ddim
from difflab.testbeds import GaussianMixtureBed, affine_pushforward, gaussian_bed

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny2d.yaml"
DATA = ["data.name=digits8", "data.n=120", "train.num_threads=1", "train.device=cpu"]
AE = [*DATA, "autoencoder.latent_channels=2", "autoencoder.base_channels=8", "autoencoder.held_out=0.25",
      "train.steps=8", "train.batch_size=16", "train.checkpoint_every=8"]
LDM = ["model.kind=unet", "model.conditional=true", "model.base_channels=8", "model.channel_mults=[1]",
       "model.num_res_blocks=1", "model.attn_resolutions=[4]", "model.num_heads=2", "train.p_uncond=0.2",
       "train.steps=4", "train.batch_size=16", "train.checkpoint_every=4", "train.sample_every=4",
       "train.num_sample_images=10", "train.sample_steps=3"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny autoencoder of 120 8×8 digits (latents 2×4×4) and a class-conditional latent U-Net on it."""
    from difflab.commands.autoencoder import train_autoencoder
    from difflab.training import train

    root = tmp_path_factory.mktemp("latent")
    ae_dir, ldm_dir = root / "ae", root / "ldm"
    train_autoencoder(load_config(TINY, AE), ae_dir, progress=False)
    ldm_cfg = load_config(TINY, [*DATA, *LDM, f"data.autoencoder={ae_dir}"])
    train(ldm_cfg, ldm_dir, progress=False)
    return ae_dir, ldm_dir, ldm_cfg


# --- 2. the latent scale -----------------------------------------------------------------------------------------------
def test_scaled_latents_have_unit_std(runs):
    """The scale is 1/std of the training split's latents; every example's scaled latent (held-out ones included)
    has std in [0.9, 1.1]."""
    ae_dir, _, ldm_cfg = runs
    ae = load_autoencoder(ae_dir)
    data = training_data(ldm_cfg)
    assert data.x.shape == (120, 2, 4, 4) and data.num_classes == 10
    assert 0.9 <= float(data.x.std()) <= 1.1
    assert math.isclose(scale_factor(torch.full((3,), 2.0) + torch.tensor([-1.0, 0.0, 1.0])), 1.0)
    assert ae.scale_factor == json.loads((ae_dir / "autoencoder.json").read_text())["meta"]["scale_factor"]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "ancestral", "sde"])
def test_sampling_scaled_latents_is_sampling_unscaled_latents_on_the_shifted_path(sampler):
    """Latents z ~ N(μ, Σ) with std ≈ 5.5 (scale c ≈ 0.18): the exact model of z' = c z on the VP path, sampled and
    divided by c, equals the exact model of z (here on the linear path, whose log-SNR covers every value) re-timed by
    change_path onto the shifted path (a, s/c), λ → λ + 2 log c, sampled from the same noise — deterministic or not."""
    bed = gaussian_bed(6, condition=30.0, seed=1)
    z_bed = GaussianMixtureBed(5.0 * bed.means, 30.0 * bed.covs)
    c = scale_factor(z_bed.sample(20000, torch.Generator().manual_seed(0)))
    scaled_bed = GaussianMixtureBed(c * z_bed.means, c**2 * z_bed.covs)
    vp = VPPath()
    shifted = ScaledLatentPath(vp, c)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    assert torch.allclose(shifted.log_snr(t), vp.log_snr(t) + 2 * math.log(c))
    assert torch.allclose(shifted.t_from_log_snr(shifted.log_snr(t)), t)

    def draw(denoiser):
        out = generate(denoiser, (6,), 64, sampler, 12, torch.Generator().manual_seed(3), device="cpu")
        return out.x.double() if out.x.dtype == torch.float64 else out.x

    scaled = draw(scaled_bed.denoiser(vp))
    unscaled = draw(change_path(z_bed.denoiser(LinearPath()), shifted))
    assert torch.allclose(scaled / c, unscaled, rtol=1e-4, atol=1e-4 * float(unscaled.abs().max()))


# --- 6. the exact check ------------------------------------------------------------------------------------------------
def test_pca_autoencoder_kl_splits_into_truncation_and_latent_sampler_errors():
    """On the 8-D bed, a PCA autoencoder keeping 3 directions, the scaled latents' exact denoiser and 4-step DDIM:
    the output law is Gaussian in closed form (affine pushforward, then the decoder), and its KL to the data is the
    truncation KL plus the latent sampler's KL, exactly. (This KL's truncation term is smallest at the harmonic mean
    of Λ_⊥; probabilistic PCA's σ² = mean(Λ_⊥) minimises the other direction, KL(data || output).)"""
    bed = gaussian_bed(8, condition=100.0, seed=0)
    pca = PCAAutoencoder.fit(bed.means[0], bed.covs[0], k=3)
    c = 1.0 / float(pca.variances.mean().sqrt())  # 1/std of every latent entry
    latent_bed = GaussianMixtureBed(torch.zeros(1, 3), (c**2 * pca.variances).unsqueeze(0))
    path = DiscretePath.from_schedule("linear", T=1000)
    den = latent_bed.denoiser(path)
    m, C = affine_pushforward(lambda x: run_ddim(den, x, 4).x, 3, prior_std=path.prior_std())
    sampler_kl = latent_bed.kl_from_gaussian(m, C)
    out_mean, out_cov = pca.output_law(m / c, C / c**2)
    total = bed.kl_from_gaussian(out_mean, out_cov)
    truncation = pca.truncation_kl()
    assert sampler_kl > 1e-4 and truncation > 1e-2
    assert torch.allclose(total, truncation + sampler_kl, rtol=1e-10, atol=1e-12)
    exact_latents = bed.kl_from_gaussian(*pca.output_law(torch.zeros(3, dtype=torch.float64), torch.diag(pca.variances)))
    assert torch.allclose(exact_latents, truncation, rtol=1e-10)
    harmonic = 1.0 / float((1.0 / pca.dropped).mean())  # d/dσ² of the truncation KL vanishes here
    best = PCAAutoencoder.fit(bed.means[0], bed.covs[0], k=3, noise_var=harmonic).truncation_kl()
    for factor in (0.9, 1.1):
        assert PCAAutoencoder.fit(bed.means[0], bed.covs[0], k=3, noise_var=factor * harmonic).truncation_kl() > best
    x = bed.sample(4, torch.Generator().manual_seed(0))
    assert torch.allclose(pca.encode(x), (x.double() - bed.means[0]) @ pca.basis)


# --- 3. latent runs ------------------------------------------------------------------------------------------------------
def test_a_latent_run_samples_images_with_every_sampler_and_cfg(runs, tmp_path, capsys):
    _, ldm_dir, _ = runs
    pipe = load_run(ldm_dir)
    assert pipe.data_shape == (2, 4, 4) and pipe.output_shape == (1, 8, 8)
    assert (ldm_dir / "samples" / "step_00000004.png").is_file()
    for sampler in ("ddim", "ddpm", "heun", "dpmpp2m"):
        x = pipe.sample(4, sampler=sampler, steps=3, progress=False, guidance_scale=3.0).x
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all(), sampler
    latents = pipe.sample(4, steps=3, progress=False, decode=False).x
    assert latents.shape == (4, 2, 4, 4)
    code, out, err = cli(capsys, "sample", ldm_dir, "--steps", 3, "--num", 6, "--class", 7, "--guidance-scale", 3,
                         "--out", tmp_path / "s.npz", "--quiet")
    assert code == 0, err
    assert np.load(tmp_path / "s.npz")["x"].shape == (6, 1, 8, 8)
    code, out, err = cli(capsys, "sample", ldm_dir, "--steps", 3, "--num", 10, "--out", tmp_path / "s.png", "--quiet")
    assert code == 0 and (tmp_path / "s.png").is_file(), err


def test_classifier_guidance_and_eval_on_a_latent_run(runs, tmp_path, capsys, monkeypatch):
    """train-classifier on the latent config reads the scaled latents; sample --classifier guides in latent space;
    difflab eval scores the decoded samples against the pixel data set."""
    from difflab.evaluation.features import feature_network

    _, ldm_dir, ldm_cfg = runs
    config = tmp_path / "ldm.yaml"
    config.write_text((ldm_dir / "config.yaml").read_text())
    cls_dir = tmp_path / "cls"
    code, _, err = cli(capsys, "train-classifier", config, "--out", cls_dir, "--quiet", "--set", "classifier.steps=3",
                       "classifier.width=8", "classifier.time_dim=8", "classifier.batch_size=16")
    assert code == 0, err
    code, _, err = cli(capsys, "sample", ldm_dir, "--steps", 3, "--num", 4, "--class", 2, "--classifier", cls_dir,
                       "--classifier-scale", 2, "--out", tmp_path / "g.npz", "--quiet")
    assert code == 0, err
    assert np.load(tmp_path / "g.npz")["x"].shape == (4, 1, 8, 8)
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    ds = training_data(load_config(TINY, DATA))
    feature_network("digits8", ds.x, ds.y, 10, max_seconds=1.0)  # a quick feature net in a private cache
    code, out, err = cli(capsys, "eval", ldm_dir, "--steps", 3, "--num", 20, "--out", tmp_path / "e.json", "--quiet")
    assert code == 0, err
    metrics = json.loads((tmp_path / "e.json").read_text())["metrics"]
    assert {"FD-digits8", "precision", "recall", "class_accuracy"} <= set(metrics)


def test_a_latent_run_reads_only_its_own_copy_of_the_autoencoder(runs, tmp_path, capsys):
    """Sampling needs nothing outside the latent run (the autoencoder run may be gone); a tampered copy is refused."""
    _, ldm_dir, _ = runs
    copy = tmp_path / "ldm"
    shutil.copytree(ldm_dir, copy)
    assert load_run(copy).sample(2, steps=2, progress=False).x.shape == (2, 1, 8, 8)
    weights = copy / "autoencoder.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    code, _, err = cli(capsys, "sample", copy, "--steps", 2, "--num", 2, "--out", tmp_path / "x.png", "--quiet")
    assert code == 2 and "hash" in err and len(err.strip().splitlines()) == 1


def test_a_latent_config_must_match_its_autoencoders_data(runs, tmp_path):
    ae_dir, _, _ = runs
    with pytest.raises(ConfigError, match="was trained on data"):
        training_data(load_config(TINY, [*DATA, "data.n=100", f"data.autoencoder={ae_dir}"]))
    with pytest.raises(FileNotFoundError, match="no autoencoder"):
        training_data(load_config(TINY, [*DATA, f"data.autoencoder={tmp_path}"]))


def test_cross_attention_to_a_single_token_is_an_additive_bias():
    """With one context token the softmax over one key is 1: every query position receives the same vector
    proj(V c), whatever the feature map — cross-attention degenerates to an additive bias (so class prompts of one
    token add no more than the class embedding does; binding words to positions needs L > 1 tokens)."""
    from difflab.networks.attention import MultiHeadAttention

    torch.manual_seed(0)
    attn = MultiHeadAttention(8, num_heads=2, context_dim=5)
    x, c = torch.randn(3, 10, 8), torch.randn(3, 1, 5)  # (B, N, dim) queries, (B, L = 1, context_dim)
    out = attn(x, c)
    v = attn.to_kv(c)[..., 8:]  # the value half of the key/value projection
    bias = attn.proj(v)  # (B, 1, dim)
    assert torch.allclose(out, bias.expand_as(out), atol=1e-6)
    assert torch.allclose(attn(torch.randn(3, 10, 8), c), out, atol=1e-6)  # the queries do not matter
    two = torch.cat([c, torch.randn(3, 1, 5)], dim=1)  # two tokens: the queries choose between them
    assert not torch.allclose(attn(x, two)[:, 0], attn(x, two)[:, 1], atol=1e-4)


def test_a_latent_run_resumes_only_with_its_own_autoencoder_and_nll_refuses_it(runs, tmp_path, capsys):
    """--resume continues from the checkpoint; another autoencoder run, or the same one retrained in place, is
    refused in one line; difflab nll says it does not apply to latents."""
    from difflab.commands.autoencoder import train_autoencoder

    ae_dir, ldm_dir, _ = runs
    copy = tmp_path / "ldm"
    shutil.copytree(ldm_dir, copy)
    config = tmp_path / "ldm.yaml"
    config.write_text((ldm_dir / "config.yaml").read_text())
    code, _, err = cli(capsys, "train", config, "--out", copy, "--resume", "--quiet", "--set", "train.steps=5")
    assert code == 0, err
    other = tmp_path / "ae"
    train_autoencoder(load_config(TINY, [*AE, "train.steps=2"]), other, progress=False)
    code, _, err = cli(capsys, "train", config, "--out", copy, "--resume", "--quiet", "--set", "train.steps=6",
                       f"data.autoencoder={other}")
    assert code == 2 and "cannot resume with a different data.autoencoder" in err
    code, _, err = cli(capsys, "nll", copy)
    assert code == 2 and "latent run" in err
    record = json.loads((copy / "autoencoder.json").read_text())  # as if AE_RUN had been retrained in place
    (copy / "autoencoder.json").write_text(json.dumps({**record, "sha256": "0" * 64}))
    code, _, err = cli(capsys, "train", config, "--out", copy, "--resume", "--quiet", "--set", "train.steps=6")
    assert code == 2 and "not the one this run started with" in err and len(err.strip().splitlines()) == 1


# --- 4. prompts by cross-attention -------------------------------------------------------------------------------------
def test_tokenizer_and_prompt_unet_bind_words_in_order():
    from difflab.networks import build_network
    from difflab.networks.embeddings import NULL_LABEL
    from difflab.prompts import PAD, PromptUNet, Tokenizer, class_prompts

    prompts = class_prompts("mnist_pairs", 100)
    assert prompts[37] == "3 then 7" and class_prompts("mnist5k", 10)[3] == "3"
    tok = Tokenizer.for_prompts(prompts)
    ids = tok.encode(["3 then 7", "7 then 3", ""])
    assert ids.shape == (3, 3) and (ids[2] == PAD).all() and not torch.equal(ids[0], ids[1])
    with pytest.raises(ValueError, match="unknown word 'x'"):
        tok.encode(["3 then x"])
    torch.manual_seed(0)
    unet = build_network("unet", (1, 8, 16), 0, base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                         attn_resolutions=(4,), num_heads=2, context_dim=8)
    net = PromptUNet(unet, prompts, dim=8, depth=1, num_heads=2)
    assert net.label_of("3 then 7") == 37 and net.label_of("7 THEN 3") == 73 and net.label_of("") == NULL_LABEL
    ctx = net.context(torch.tensor([37, 73, NULL_LABEL]), 3, "cpu")
    assert ctx.shape == (3, 3, 8) and not torch.allclose(ctx[0], ctx[1])  # the same words, another order
    assert torch.allclose(ctx[2], net.context(None, 1, "cpu")[0])  # NULL_LABEL is the empty prompt
    with torch.no_grad():
        unet.conv_out.weight.normal_()  # the untrained U-Net's zero output layer would hide the context
        x = torch.randn(1, 1, 8, 16).expand(2, -1, -1, -1)
        out = net(x, torch.tensor([5.0, 5.0]), y=torch.tensor([37, 73]))
    assert not torch.allclose(out[0], out[1])


def test_prompt_runs_train_and_sample_from_the_command_line(tmp_path, capsys):
    """A 3-step prompt model on 32 two-digit canvases (28×56): --prompt with CFG writes the picture; an unknown
    prompt and --prompt on a run without prompts are one-line errors."""
    over = ["data.name=mnist_pairs", "data.n=32", "model.kind=unet", "model.conditional=true", "model.prompt=true",
            "model.text_dim=8", "model.text_depth=1", "model.base_channels=8", "model.channel_mults=[1,2]",
            "model.num_res_blocks=1", "model.attn_resolutions=[14]", "model.num_heads=2", "train.p_uncond=0.2",
            "train.steps=3", "train.batch_size=8", "train.checkpoint_every=3", "train.num_threads=1",
            "train.device=cpu"]
    run_dir = tmp_path / "pairs"
    code, _, err = cli(capsys, "train", TINY, "--out", run_dir, "--quiet", "--set", *over)
    assert code == 0, err
    code, out, err = cli(capsys, "sample", run_dir, "--prompt", "3 then 7", "--guidance-scale", 3, "--steps", 2,
                         "--num", 4, "--out", tmp_path / "pairs.npz", "--quiet")
    assert code == 0, err
    assert np.load(tmp_path / "pairs.npz")["y"].tolist() == [37] * 4
    assert np.load(tmp_path / "pairs.npz")["x"].shape == (4, 1, 28, 56)
    code, _, err = cli(capsys, "sample", run_dir, "--prompt", "3 and 7", "--steps", 2, "--out", tmp_path / "p.png")
    assert code == 2 and "unknown word 'and'" in err
    with pytest.raises(ConfigError, match="model.prompt needs"):
        load_config(TINY, ["model.prompt=true"])
