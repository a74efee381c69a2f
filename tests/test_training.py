"""The trainer: exact resume, NaN stop, run-directory safety, EMA, batching, and a 2-D quality bound."""

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from difflab.checkpoint import list_checkpoints, load_checkpoint
from difflab.config import load_config
from difflab.ema import EMA
from difflab.pipeline import load_run
from difflab.training import TrainingError, batch_indices, learning_rate, step_seed, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny2d.yaml"


def tiny(*overrides):
    return load_config(TINY, list(overrides))


def losses(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- exact resume ---------------------------------------------------------------------------------------------
RESUME_CASES = {
    "eps-discrete-log1": [],
    # a log window that straddles the checkpoint, label dropout, a continuous path, bf16 autocast on the CPU
    "velocity-linear-cfg-log3": ["train.log_every=3", "diffusion.path=linear", "diffusion.target=velocity",
                                 "model.conditional=true", "train.p_uncond=0.3", "train.warmup_steps=5",
                                 "train.mixed_precision=bf16"],
    "v-zero-snr-ema-start": ["diffusion.zero_terminal_snr=true", "diffusion.target=v", "train.ema_start=6",
                             "diffusion.weighting=snr", "diffusion.T=200"],
}


@pytest.mark.parametrize("extra", RESUME_CASES.values(), ids=RESUME_CASES.keys())
def test_resumed_run_repeats_the_uninterrupted_run_bit_for_bit(tmp_path, extra):
    full = train(tiny("train.steps=16", "train.checkpoint_every=8", *extra), tmp_path / "full", progress=False)
    train(tiny("train.steps=8", "train.checkpoint_every=8", *extra), tmp_path / "part", progress=False)
    resumed = train(tiny("train.steps=16", "train.checkpoint_every=8", *extra), tmp_path / "part", resume=True,
                    progress=False)
    a, b = losses(tmp_path / "full"), losses(tmp_path / "part")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    assert [(r["loss"], r["grad_norm"], r["lr"]) for r in a] == [(r["loss"], r["grad_norm"], r["lr"]) for r in b]
    assert resumed.loss == full.loss
    ck_a, ck_b = load_checkpoint(tmp_path / "full"), load_checkpoint(tmp_path / "part")
    for part in ("model",):
        for name, t in getattr(ck_a, part).items():
            assert torch.equal(t, getattr(ck_b, part)[name]), name
    for name, t in ck_a.ema["shadow"].items():
        assert torch.equal(t, ck_b.ema["shadow"][name]), name


def test_resume_then_sample(tmp_path):
    train(tiny("train.steps=6", "train.checkpoint_every=3"), tmp_path / "run", progress=False)
    pipe = load_run(tmp_path / "run")
    assert pipe.step == 6 and pipe.data_shape == (2,) and pipe.num_classes == 0
    for sampler in ("ddim", "ddpm"):
        s = pipe.sample(50, sampler=sampler, steps=10, seed=3, progress=False)
        assert s.x.shape == (50, 2) and s.nfe == 10 and torch.isfinite(s.x).all()
        again = pipe.sample(50, sampler=sampler, steps=10, seed=3, batch_size=7, progress=False)
        if sampler == "ddim":  # deterministic: the batch split does not matter
            torch.testing.assert_close(s.x, again.x)
    with pytest.raises(ValueError, match="takes no option 'eta'"):
        pipe.sample(4, sampler="ddpm", steps=5, eta=1.0, progress=False)
    with pytest.raises(ValueError, match="unconditional"):
        pipe.sample(4, steps=5, y=1, progress=False)


def test_resume_refuses_a_different_model(tmp_path):
    train(tiny("train.steps=2"), tmp_path / "run", progress=False)
    with pytest.raises(TrainingError, match="different model.hidden"):
        train(tiny("train.steps=4", "model.hidden=32"), tmp_path / "run", resume=True, progress=False)
    with pytest.raises(TrainingError, match="nothing to resume"):
        train(tiny(), tmp_path / "empty", resume=True, progress=False)


# --- run-directory safety -----------------------------------------------------------------------------------------
def test_a_run_directory_is_not_overwritten_without_permission(tmp_path):
    run = tmp_path / "run"
    train(tiny("train.steps=2"), run, progress=False)
    (run / "notes.txt").write_text("mine")
    with pytest.raises(TrainingError, match="already holds a run"):
        train(tiny("train.steps=2"), run, progress=False)
    assert load_checkpoint(run).step == 2
    train(tiny("train.steps=3", "train.checkpoint_every=0"), run, overwrite=True, progress=False)
    assert list_checkpoints(run) == [3], "overwrite removed the old checkpoints"
    assert (run / "notes.txt").read_text() == "mine", "overwrite removes only difflab's own files"
    with pytest.raises(TrainingError, match="not both"):
        train(tiny(), run, overwrite=True, resume=True, progress=False)


# --- non-finite loss ---------------------------------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_only_the_checkpoint_from_before_it(tmp_path):
    """The loss of step 5 is computed with the weights of step 4: its checkpoint is dropped, step 2's stays."""
    from difflab.data import load_dataset

    cfg = tiny("train.steps=4", "train.checkpoint_every=2")
    good = load_dataset(cfg.data.name, n=cfg.data.n, seed=cfg.train.seed)
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    before = load_checkpoint(run)
    bad = SimpleNamespace(x=torch.full_like(good.x, float("nan")), y=None, num_classes=0, kind="points")
    with pytest.raises(TrainingError) as info:
        train(tiny("train.steps=8", "train.checkpoint_every=1"), run, resume=True, dataset=bad, progress=False)
    message = str(info.value)
    assert "non-finite training loss (nan)" in message and "at step 5" in message
    assert "removed the checkpoint of step 4" in message and "\n" not in message
    assert "last good checkpoint (step 2) is intact" in message
    after = load_checkpoint(run)
    assert after.step == 2 and list_checkpoints(run) == [2]
    assert before.step == 4
    assert [r["step"] for r in losses(run)] == [1, 2, 3, 4]


# --- pieces -----------------------------------------------------------------------------------------------------
def test_batch_indices_visit_every_example_once_per_epoch_and_are_pure():
    n, B = 10, 4
    seq = torch.cat([batch_indices(n, B, seed=7, index=i) for i in range(5)])  # 20 = two epochs
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(n, B, 7, 3), batch_indices(n, B, 7, 3))
    assert not torch.equal(batch_indices(100, B, 7, 0), batch_indices(100, B, 8, 0))
    assert step_seed(0, 1, "a") != step_seed(0, 2, "a") != step_seed(0, 1, "b")


def test_learning_rate_warms_up_linearly():
    tc = tiny("train.lr=1e-3", "train.warmup_steps=4").train
    assert [learning_rate(tc, k) for k in (1, 2, 4, 9)] == [2.5e-4, 5e-4, 1e-3, 1e-3]


def test_ema_matches_its_closed_form_and_swaps_back():
    net = nn.Linear(1, 1, bias=False)
    ema = EMA(net, decay=0.5, start=1)
    values, expected = [1.0, 2.0, 3.0, 4.0], None
    for k, w in enumerate(values, start=1):
        with torch.no_grad():
            net.weight.fill_(w)
        ema.update(net, k)
        if k == 1:  # up to `start` the average copies the weights
            expected = w
        else:  # δ_n = min(0.5, (1+n)/(10+n)) with n = updates so far: 0.1, 0.1667, 0.25
            n = k - 2
            delta = min(0.5, (1 + n) / (10 + n))
            expected = delta * expected + (1 - delta) * w
        assert math.isclose(float(ema.shadow["weight"]), expected, rel_tol=1e-6)
    with ema.swapped_in(net):
        assert math.isclose(float(net.weight.detach()), expected, rel_tol=1e-6)
    assert float(net.weight.detach()) == 4.0


def test_label_dropout_rate(tmp_path, monkeypatch):
    """A fraction p_uncond of the training labels reaches the network as NULL_LABEL (binomial check)."""
    import difflab.objectives.diffusion as training
    from difflab.networks import NULL_LABEL

    seen = []
    real_build = training.build_model

    def recording_build(cfg, data_shape, num_classes):
        net = real_build(cfg, data_shape, num_classes)
        net.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["y"].clone()), with_kwargs=True)
        return net

    monkeypatch.setattr(training, "build_model", recording_build)
    train(tiny("train.steps=20", "train.batch_size=100", "model.conditional=true", "train.p_uncond=0.25",
               "train.checkpoint_every=0"), tmp_path / "run", progress=False)
    y = torch.cat(seen)
    frac = (y == NULL_LABEL).float().mean().item()
    # 2000 Bernoulli(0.25) draws: std = sqrt(0.25*0.75/2000) ≈ 0.0097; 5 std ≈ 0.05.
    assert abs(frac - 0.25) < 0.05
    assert set(y[y != NULL_LABEL].tolist()) <= {0, 1}


# --- quality -------------------------------------------------------------------------------------------------------
N_EVAL = 2000
QUALITY_OVERRIDES = ["train.steps=1500", "train.sample_every=0", "train.checkpoint_every=0", "train.log_every=100"]
GAP_FRACTION = 0.2


def test_short_2d_run_reaches_a_sliced_wasserstein_bound(tmp_path):
    """1500 steps of configs/moons.yaml (MLP, cosine schedule, v target) then DDIM-50 on the EMA model.

    The bound is stated relative to two measured distances (sliced W2, 256 projections, N_EVAL points):
    the *floor* between two independent draws of the data (sampling noise alone; measured 0.062) and the
    *start* between N(0, I) noise and the data (an untrained model; measured 0.342). The model must close
    80 % of that gap: bound = floor + 0.2 (start − floor) ≈ 0.118. Measured after training: 0.065, 0.066,
    0.074 for train.seed 0, 1, 2.
    """
    from difflab.data import load_dataset
    from difflab.metrics import sliced_wasserstein2

    def sw(x, y):
        return sliced_wasserstein2(x, y, num_projections=256, generator=torch.Generator().manual_seed(0))

    cfg = load_config(ROOT / "configs" / "moons.yaml", QUALITY_OVERRIDES)
    held_out = load_dataset(cfg.data.name, n=N_EVAL, seed=12345).x  # training used seed 0
    floor = sw(load_dataset(cfg.data.name, n=N_EVAL, seed=999).x, held_out)
    start = sw(torch.randn(N_EVAL, 2, generator=torch.Generator().manual_seed(5)), held_out)
    bound = floor + GAP_FRACTION * (start - floor)
    assert start > 2 * bound, "the bound must separate a trained model from noise"

    train(cfg, tmp_path / "run", progress=False)
    samples = load_run(tmp_path / "run").sample(N_EVAL, steps=50, seed=1, progress=False).x
    distance = sw(samples, held_out)
    assert distance < bound, f"sliced W2 {distance:.4f} >= bound {bound:.4f} (floor {floor:.4f}, start {start:.4f})"
