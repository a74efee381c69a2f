"""The KL autoencoder of latent diffusion (SPEC §5): its networks and loss terms against their formulas, and
``difflab train-autoencoder`` / ``difflab eval-autoencoder`` end to end on 8×8 digits. (Resume, SIGKILL and the
divergence stop of its training run in tests/test_engine.py, parametrised over every objective.)"""

import json
import math
from pathlib import Path

import pytest
import torch

from difflab.cli import main
from difflab.config import ConfigError, load_config
from difflab.networks.autoencoder import (LOGVAR_RANGE, KLAutoencoder, PatchDiscriminator, hinge_d_loss,
                                          kl_to_standard_normal)
from difflab.objectives.autoencoder import ADAPTIVE_DELTA, Perceptual, adaptive_weight

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny2d.yaml"
TINY_AE = ["data.name=digits8", "data.n=120", "autoencoder.latent_channels=2", "autoencoder.base_channels=8",
           "autoencoder.held_out=0.25", "train.steps=4", "train.batch_size=16", "train.log_every=2",
           "train.checkpoint_every=4", "train.num_threads=1", "train.device=cpu"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_features(tmp_path_factory):
    """A feature network for digits8 trained for about a second into a private cache (the FD / perceptual classifier)."""
    from difflab.data import load_dataset
    from difflab.evaluation.features import feature_network

    root = tmp_path_factory.mktemp("cache")
    ds = load_dataset("digits8")
    feature_network("digits8", ds.x[:300], ds.y[:300], ds.num_classes, root=root, max_seconds=1.0)
    return root


def test_shapes_and_the_log_variance_clamp():
    ae = KLAutoencoder((1, 8, 8), latent_channels=3, base_channels=8, channel_mults=(1, 2, 2))
    assert ae.latent_shape == (3, 2, 2)
    x = torch.randn(5, 1, 8, 8)
    x_hat, mu, logvar = ae(x, torch.randn(5, 3, 2, 2))
    assert x_hat.shape == x.shape and mu.shape == logvar.shape == (5, 3, 2, 2)
    with torch.no_grad():
        ae.encoder.net[-1].bias[3:] = 1e4  # log σ² channels far above the clamp
    assert float(ae.encode(x)[1].detach().max()) == LOGVAR_RANGE[1]
    assert torch.isfinite(ae(x, torch.randn(5, 3, 2, 2))[0]).all()
    with pytest.raises(ValueError, match="not divisible"):
        KLAutoencoder((1, 6, 6), channel_mults=(1, 2, 2))
    assert PatchDiscriminator(1, 8)(torch.randn(2, 1, 28, 28)).shape == (2, 1, 7, 7)


def test_kl_matches_the_gaussian_kl_of_spec_1():
    mu, logvar = torch.randn(4, 2, 3, 3, dtype=torch.float64), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mu), torch.ones_like(mu))
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    assert torch.allclose(kl_to_standard_normal(mu, logvar), expected)


def test_hinge_loss_and_the_adaptive_weight_formula():
    assert torch.allclose(hinge_d_loss(torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), -3.0)), torch.zeros(1))
    assert torch.allclose(hinge_d_loss(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)), torch.ones(1))
    w = torch.randn(3, 3, requires_grad=True)
    rec, adv = (w ** 2).sum(), (3.0 * w).sum()  # ∇rec = 2w, ∇adv = 3·1
    lam = adaptive_weight(rec, adv, w)
    expected = (2 * w).norm() / (torch.full((3, 3), 3.0).norm() + ADAPTIVE_DELTA)
    assert torch.allclose(lam, expected.detach()) and not lam.requires_grad


def test_perceptual_distance_is_zero_on_itself_and_trains_only_the_decoder(tiny_features):
    from difflab.evaluation.features import feature_network

    net, _ = feature_network("digits8", root=tiny_features)
    perceptual = Perceptual(net)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    x_hat = (x + 0.3 * torch.randn_like(x)).requires_grad_(True)
    assert torch.allclose(perceptual(x, x), torch.zeros(3))
    d = perceptual(x, x_hat)
    assert d.shape == (3,) and (d > 0).all()
    d.sum().backward()
    assert x_hat.grad is not None and all(p.grad is None for p in net.parameters())


def test_config_bounds():
    with pytest.raises(ConfigError, match="autoencoder.kl_weight"):
        load_config(None, ["autoencoder.kl_weight=2"])
    with pytest.raises(ConfigError, match="autoencoder.channel_mults"):
        load_config(None, ["autoencoder.channel_mults=[]"])
    with pytest.raises(ConfigError, match="autoencoder.held_out"):
        load_config(None, ["autoencoder.held_out=1"])


def test_train_and_eval_autoencoder_commands(tmp_path, capsys, monkeypatch, tiny_features):
    """A 4-step run with the perceptual term and the discriminator (on from step 3) writes the weights, the
    latents and the scale; eval-autoencoder reports MSE/PSNR, accuracies and FD with its floor, and the picture."""
    monkeypatch.setenv("DIFFLAB_CACHE", str(tiny_features))
    ae_dir = tmp_path / "ae"
    code, out, err = cli(capsys, "train-autoencoder", TINY, "--out", ae_dir, "--quiet", "--set",
                         *TINY_AE, "autoencoder.perceptual_weight=1", "autoencoder.disc_weight=0.5",
                         "autoencoder.disc_start=2")
    assert code == 0, err
    record = json.loads((ae_dir / "autoencoder.json").read_text())
    assert record["meta"]["latent_shape"] == [2, 4, 4] and record["meta"]["n_held_out"] == 30
    last = json.loads((ae_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"rec", "kl", "perceptual", "adv", "adaptive_weight", "d_loss"} <= set(last)
    code, out, err = cli(capsys, "eval-autoencoder", ae_dir, "--out", tmp_path / "ae.json")
    assert code == 0, err
    result = json.loads((tmp_path / "ae.json").read_text())
    assert result["n_held_out"] == 30 and result["fd_counts"] == [15, 15]
    assert math.isclose(result["psnr_db"], 10 * math.log10(4 / result["mse"]))
    assert 0 <= result["class_accuracy_reconstructions"] <= 1 and result["fd"] > 0 and result["fd_floor"] > 0
    assert (ae_dir / "reconstructions.png").is_file() and "PSNR" in out
    code, _, err = cli(capsys, "train-autoencoder", TINY, "--out", ae_dir, "--quiet", "--set", *TINY_AE)
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1


def test_points_are_refused_in_one_line(tmp_path, capsys):
    code, _, err = cli(capsys, "train-autoencoder", TINY, "--out", tmp_path / "ae", "--quiet")
    assert code == 2 and "needs images" in err and len(err.strip().splitlines()) == 1
