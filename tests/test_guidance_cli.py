"""Guidance from the command line (SPEC §7): ``difflab train-classifier``, and ``difflab sample`` with
``--guidance-scale`` / ``--classifier`` under every sampler of ``pipeline.SAMPLERS``, with honest NFE."""

import inspect
import json

import numpy as np
import pytest
import torch

from difflab.checkpoint import CheckpointError
from difflab.classifier_training import RECORD_FILE, WEIGHTS_FILE, load_classifier
from difflab.cli import main
from difflab.config import load_config
from difflab.networks.mlp import MLPDenoiser
from difflab.pipeline import SAMPLERS, load_run
from difflab.training import train
from tests.test_cli import TINY, assert_one_line_error, run_cli

TINY_RUN = ["train.steps=4", "train.checkpoint_every=0", "train.log_every=2"]
TINY_CLASSIFIER = ["classifier.steps=6", "classifier.width=16", "classifier.depth=1", "classifier.time_dim=8",
                   "classifier.batch_size=32", "classifier.log_every=3"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A class-conditional and an unconditional tiny two-moons run (2 classes), and a classifier for their path."""
    root = tmp_path_factory.mktemp("guidance_cli")
    conditional = load_config(TINY, TINY_RUN + ["model.conditional=true", "train.p_uncond=0.2"])
    train(conditional, root / "cond", progress=False)
    train(load_config(TINY, TINY_RUN), root / "uncond", progress=False)
    assert main(["train-classifier", str(TINY), "--out", str(root / "cls"), "--quiet", "--set", *TINY_CLASSIFIER]) == 0
    return root


class RowCounter:
    """Counts the rows the denoiser network evaluates (patched onto MLPDenoiser.forward): the ground truth
    that a sampler's reported NFE must match, whatever the sampler or solver."""

    def __init__(self, monkeypatch):
        self.rows = 0
        forward = MLPDenoiser.forward

        def counting(net, x, *args, **kwargs):
            self.rows += x.shape[0]
            return forward(net, x, *args, **kwargs)

        monkeypatch.setattr(MLPDenoiser, "forward", counting)


def sample_npz(capsys, counter, run, out, *options, num=6):
    """``difflab sample`` into ``out``; returns (x, y, reported NFE, network rows per sample actually evaluated)."""
    counter.rows = 0
    code, _, err = run_cli(capsys, "sample", run, "--steps", 4, "--num", num, "--out", out, "--quiet", *options)
    assert code == 0, err
    data = np.load(out)
    return data["x"], data.get("y"), int(data["nfe"]), counter.rows / num


def test_train_classifier_writes_a_checked_checkpoint_and_refuses_to_overwrite(capsys, runs, tmp_path):
    cls = runs / "cls"
    record = json.loads((cls / RECORD_FILE).read_text())
    assert record["format"] == "difflab-classifier" and record["step"] == 6
    assert record["meta"]["num_classes"] == 2 and record["meta"]["data_shape"] == [2]
    assert set(record["meta"]["accuracy_by_time"]) == {"1", "25", "50", "75"}
    loaded = load_classifier(cls, device="cpu")
    assert loaded(torch.zeros(3, 2), torch.tensor([1, 50, 100])).shape == (3, 2)

    code, _, err = run_cli(capsys, "train-classifier", TINY, "--out", cls, "--set", *TINY_CLASSIFIER)
    assert_one_line_error(code, err, "already holds a classifier", "--overwrite")
    copy = tmp_path / "cls"
    code, _, err = run_cli(capsys, "train-classifier", TINY, "--out", copy, "--quiet", "--set", *TINY_CLASSIFIER)
    assert code == 0, err
    code, _, err = run_cli(capsys, "train-classifier", TINY, "--out", copy, "--overwrite", "--quiet",
                           "--set", *TINY_CLASSIFIER)
    assert code == 0, err
    weights = bytearray((copy / WEIGHTS_FILE).read_bytes())
    weights[-1] ^= 0xFF
    (copy / WEIGHTS_FILE).write_bytes(bytes(weights))
    with pytest.raises(CheckpointError, match="hash"):
        load_classifier(copy)
    code, _, err = run_cli(capsys, "train-classifier", TINY, "--out", tmp_path / "x", "--set", "classifier.held_out=1")
    assert_one_line_error(code, err, "classifier.held_out must lie in [0, 1)")


def sampler_options(sampler):
    """Loose tolerances for adaptive solvers (their cost is set by the tolerance, not by ``steps``)."""
    accepted = inspect.signature(SAMPLERS[sampler]).parameters
    return {name: 1e-2 for name in ("rtol", "atol") if name in accepted}


@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_guided_sampling_with_every_sampler_counts_every_network_row(monkeypatch, runs, sampler):
    """CFG evaluates conditional and unconditional halves in one 2B batch: the reported NFE per sample must be
    exactly the network rows evaluated per sample (2 per step inside the guidance interval, 1 outside);
    classifier guidance adds classifier passes, which are not denoiser evaluations."""
    counter = RowCounter(monkeypatch)
    cond, uncond = load_run(runs / "cond", device="cpu"), load_run(runs / "uncond", device="cpu")
    classifier = load_classifier(runs / "cls", device="cpu")
    opts = dict(sampler=sampler, steps=4, num=6, progress=False, **sampler_options(sampler))

    def sample(pipe, **kwargs):
        counter.rows = 0
        out = pipe.sample(**opts, **kwargs)
        assert out.x.shape == (6, 2) and torch.isfinite(out.x).all()
        assert out.nfe == counter.rows / 6, (out.nfe, counter.rows / 6)
        return out.nfe

    plain = sample(cond, y=1)
    guided = sample(cond, y=1, guidance_scale=3.0)
    if sampler in ("ddpm", "ddim"):  # fixed grids: every step is guided
        assert guided == 2 * plain
    sample(cond, guidance_scale=3.0, guidance_interval=(0.0, 50.0), guidance_rescale=0.7)
    sample(cond, y=0, guidance_scale=2.0, classifier=classifier, classifier_scale=2.0)
    seen = TimeRecorder(classifier)
    sample(uncond, y=seen.labels(6), classifier=seen, classifier_scale=2.0)
    # the classifier was trained on DDPM steps 1..T (T = 100): a continuous-time sampler must still feed it steps
    assert 0.0 <= min(seen.times) and 50.0 < max(seen.times) <= 100.0, (min(seen.times), max(seen.times))


class TimeRecorder:
    """A classifier that records the times it is asked about (and otherwise is ``classifier``)."""

    def __init__(self, classifier):
        self.classifier, self.times = classifier, []
        self.labels = classifier.labels

    def __call__(self, x, t):
        self.times += torch.as_tensor(t, dtype=torch.float64).reshape(-1).tolist()
        return self.classifier(x, t)


def test_sample_command_passes_the_guidance_options(capsys, monkeypatch, runs, tmp_path):
    """``difflab sample`` wires --guidance-* and --classifier through to Pipeline.sample (NFE in the .npz)."""
    counter = RowCounter(monkeypatch)
    x, y, nfe, rows = sample_npz(capsys, counter, runs / "cond", tmp_path / "cfg.npz", "--class", 1,
                                 "--guidance-scale", 3)
    assert nfe == rows == 8 and (y == 1).all()  # DDIM-4, two rows per step
    x, y, nfe, rows = sample_npz(capsys, counter, runs / "cond", tmp_path / "window.npz", "--guidance-scale", 3,
                                 "--guidance-interval", 0, 50, "--guidance-rescale", 0.7)
    assert nfe == rows and 4 < nfe < 8 and y.tolist() == [0, 1] * 3  # guided only for t <= 50
    x, y, nfe, rows = sample_npz(capsys, counter, runs / "uncond", tmp_path / "cls.npz",
                                 "--classifier", runs / "cls", "--classifier-scale", 2)
    assert nfe == rows == 4 and y.tolist() == [0, 1] * 3 and np.isfinite(x).all()


def test_guidance_errors_are_one_line(capsys, runs, tmp_path):
    out = tmp_path / "x.npz"
    code, _, err = run_cli(capsys, "sample", runs / "uncond", "--guidance-scale", 2, "--out", out)
    assert_one_line_error(code, err, "class-conditional model")
    code, _, err = run_cli(capsys, "sample", runs / "cond", "--classifier-scale", 2, "--out", out)
    assert_one_line_error(code, err, "--classifier-scale needs --classifier")
    code, _, err = run_cli(capsys, "sample", runs / "cond", "--classifier", tmp_path, "--out", out)
    assert_one_line_error(code, err, "no classifier in")
    code, _, err = run_cli(capsys, "sample", runs / "cond", "--guidance-scale", 2, "--guidance-rescale", 2, "--out", out)
    assert_one_line_error(code, err, "rescale must lie in [0, 1]")
    code, _, err = run_cli(capsys, "sample", runs / "cond", "--guidance-scale", 2, "--guidance-interval", 60, 10,
                           "--out", out)
    assert_one_line_error(code, err, "t_lo <= t_hi")
    code, _, err = run_cli(capsys, "sample", runs / "cond", "--class", -1, "--classifier", runs / "cls", "--out", out)
    assert_one_line_error(code, err, "not -1")
    other = tmp_path / "cls_T50"
    assert main(["train-classifier", str(TINY), "--out", str(other), "--quiet",
                 "--set", *TINY_CLASSIFIER, "diffusion.T=50"]) == 0
    code, _, err = run_cli(capsys, "sample", runs / "cond", "--classifier", other, "--out", out)
    assert_one_line_error(code, err, "forward process")
