"""The ``difflab`` command line: help texts, one-line errors with exit status 2, train and sample."""

from pathlib import Path

import numpy as np
import pytest

from difflab.cli import COMMANDS, main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny2d.yaml"
FAST = ["train.steps=4", "train.checkpoint_every=2"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("difflab: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("argv", [[], *[[c.name] for c in COMMANDS]], ids=["difflab", *[c.name for c in COMMANDS]])
def test_every_command_has_help_with_examples(capsys, argv):
    code, out, _ = run_cli(capsys, *argv, "--help")
    assert code == 0
    assert "examples:" in out and "difflab" in out


def test_usage_errors_are_one_line(capsys):
    code, _, err = run_cli(capsys, "train")
    assert_one_line_error(code, err, "CONFIG", "--help")
    code, _, err = run_cli(capsys, "sample", "somewhere", "--out", "x.png", "--sampler", "euler-maruyama-9000")
    assert_one_line_error(code, err, "invalid choice")


MALFORMED = {
    "unknown key": ("train:\n  lrr: 0.001\n", [], "unknown config key 'train.lrr' (did you mean 'train.lr'?)"),
    "unknown section": ("optimiser:\n  lr: 0.1\n", [], "unknown config section 'optimiser'"),
    "wrong type": ("train:\n  steps: lots\n", [], "train.steps must be an integer"),
    "float for int": ("train:\n  batch_size: 12.5\n", [], "train.batch_size must be an integer"),
    "negative steps": ("train:\n  steps: -3\n", [], "train.steps must be >= 1"),
    "zero lr": ("train:\n  lr: 0\n", [], "train.lr must be a positive number"),
    "missing data path": ("data:\n  name: npz\n", [], "set data.path"),
    "bad enum": ("diffusion:\n  weighting: p2\n", [], "diffusion.weighting must be one of none, snr, min_snr, truncated_snr"),
    "bad path": ("diffusion:\n  path: ve\n", [], "diffusion.path must be one of discrete, linear, vp, trig"),
    "p_uncond out of range": ("model:\n  conditional: true\ntrain:\n  p_uncond: 1.5\n", [], "train.p_uncond must lie in [0, 1)"),
    "ema decay out of range": ("train:\n  ema_decay: -0.1\n", [], "train.ema_decay must lie in [0, 1)"),
    "singular target": ("diffusion:\n  path: linear\n", [], "singular at t_max"),
    "not a mapping": ("- just\n- a list\n", [], "a config must be a mapping"),
    "invalid yaml": ("train: {steps: 3\n", [], "invalid YAML"),
    "bad override key": ("", ["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
    "bad override value": ("", ["model.hidden=wide"], "model.hidden must be an integer"),
    "override without =": ("", ["train.lr"], "--set expects key=value"),
    "unknown data set": ("data:\n  name: two_moon\n", ["train.steps=1"], "two_moon"),
    "missing data file": ("data:\n  name: npz\n  path: /nonexistent/data.npz\n", ["train.steps=1"], "/nonexistent/data.npz"),
}


@pytest.mark.parametrize("text, overrides, fragment", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_configs_give_one_line_errors(capsys, tmp_path, text, overrides, fragment):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    code, _, err = run_cli(capsys, "train", cfg, "--out", tmp_path / "run", "--quiet",
                           *(["--set", *overrides] if overrides else []))
    assert_one_line_error(code, err, fragment)


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", tmp_path / "nope.yaml", "--out", tmp_path / "run")
    assert_one_line_error(code, err, "nope.yaml", "not found")


def test_train_then_sample_png_and_npz_then_refuse_to_overwrite(capsys, tmp_path):
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", TINY, "--out", run, "--set", *FAST)
    assert code == 0, err
    assert "parameters" in out and "trained to step 4" in out
    assert (run / "config.yaml").exists() and (run / "loss.png").exists()

    code, out, err = run_cli(capsys, "sample", run, "--sampler", "ddim", "--steps", 5, "--num", 300,
                             "--out", tmp_path / "s.npz", "--quiet")
    assert code == 0, err
    data = np.load(tmp_path / "s.npz")
    assert data["x"].shape == (300, 2) and int(data["nfe"]) == 5 and np.isfinite(data["x"]).all()
    code, _, err = run_cli(capsys, "sample", run, "--sampler", "ddpm", "--steps", 5, "--num", 300,
                           "--out", tmp_path / "s.png", "--quiet")
    assert code == 0, err
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, _, err = run_cli(capsys, "train", TINY, "--out", run, "--set", *FAST)
    assert_one_line_error(code, err, "already holds a run", "--overwrite")
    code, _, err = run_cli(capsys, "train", TINY, "--out", run, "--overwrite", "--quiet", "--set", *FAST)
    assert code == 0, err
    code, _, err = run_cli(capsys, "train", TINY, "--out", run, "--resume", "--quiet", "--set", "train.steps=6")
    assert code == 0, err

    # sampling errors are one line too
    code, _, err = run_cli(capsys, "sample", run, "--sampler", "ddim", "--num", 4, "--steps", 500, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "steps (500) cannot exceed")
    code, _, err = run_cli(capsys, "sample", run, "--num", 4, "--out", tmp_path / "x.jpg")
    assert_one_line_error(code, err, ".png or .npz")
    code, _, err = run_cli(capsys, "sample", run, "--num", 4, "--class", 3, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "unconditional")


def test_sampling_a_missing_run(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sample", tmp_path / "nothing", "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "no checkpoint")


def test_class_conditional_sampling(capsys, tmp_path):
    run = tmp_path / "run"
    code, _, err = run_cli(capsys, "train", TINY, "--out", run, "--quiet", "--set", *FAST, "model.conditional=true",
                           "train.p_uncond=0.2")
    assert code == 0, err
    code, _, err = run_cli(capsys, "sample", run, "--steps", 5, "--num", 10, "--class", 1, "--out", tmp_path / "c.npz",
                           "--quiet")
    assert code == 0, err
    assert (np.load(tmp_path / "c.npz")["y"] == 1).all()
    code, _, err = run_cli(capsys, "sample", run, "--steps", 5, "--num", 10, "--out", tmp_path / "all.npz", "--quiet")
    assert code == 0, err
    assert np.load(tmp_path / "all.npz")["y"].tolist() == [0, 1] * 5
    code, _, err = run_cli(capsys, "sample", run, "--steps", 5, "--num", 4, "--class", 7, "--out", tmp_path / "x.png")
    assert_one_line_error(code, err, "class 7 is out of range")
