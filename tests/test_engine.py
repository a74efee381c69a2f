"""The training engine's contract, run for every objective: bit-exact resume, survival of SIGKILL, the run
directory's lock, overwrite-after-validation, repairs of cut-off writes, the divergence stop, and log sinks."""

import json
import os
import random
import signal
import sys
import time

import pytest
import torch

from difflab.checkpoint import list_checkpoints, load_checkpoint
from difflab.cli import main
from difflab.engine import Engine, Settings, TrainingError
from difflab.engine.rundir import LOCK_FILE, RunDir
from tests.engine_objectives import (KINDS, ROOT, TINY, TwoModule, command, config, final_state, run,
                                     start_until_checkpoint)

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}


def assert_same_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["metrics"] == b["metrics"]
    assert set(a["tensors"]) == set(b["tensors"])
    for name, t in a["tensors"].items():
        assert torch.equal(t, b["tensors"][name]), name


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def one_line_error(code, err, *fragments):
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, err


# --- every objective -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_resume_is_bit_exact(tmp_path, kind):
    """6 steps in one go = 3 steps, then --resume to 6: every tensor of the checkpoint (modules, EMAs, optimisers)
    and every logged metric."""
    run(kind, tmp_path / "full", 6, "train.checkpoint_every=3")
    run(kind, tmp_path / "part", 3, "train.checkpoint_every=3")
    run(kind, tmp_path / "part", 6, "train.checkpoint_every=3", resume=True)
    assert_same_state(final_state(tmp_path / "full"), final_state(tmp_path / "part"))


def test_wall_and_cpu_time_are_logged_and_carried_over_a_resume(tmp_path):
    """Every metrics record has the wall ``elapsed`` and the process ``cpu_seconds`` of training so far (the
    latter unaffected by other jobs on a shared machine); both keep growing across a resume."""
    run("diffusion", tmp_path / "run", 4, "train.checkpoint_every=2", "train.log_every=1")
    run("diffusion", tmp_path / "run", 8, "train.checkpoint_every=2", "train.log_every=1", resume=True)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 9))
    for key in ("elapsed", "cpu_seconds"):
        values = [r[key] for r in records]
        assert values[0] > 0 and all(b > a for a, b in zip(values, values[1:])), (key, values)


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_at_a_random_moment_then_resume_is_bit_exact(tmp_path, kind):
    """A process checkpointing every step is SIGKILLed at a random moment after its first checkpoint; the run
    resumes from what is on disk and ends where an uninterrupted run of the same length ends, bit for bit."""
    killed = tmp_path / "killed"
    proc = start_until_checkpoint(command(kind, killed, 100000), killed, ENV)
    time.sleep(random.uniform(0.0, 0.3))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    step = load_checkpoint(killed).step
    run(kind, killed, step + 2, resume=True)
    run(kind, tmp_path / "straight", step + 2)
    assert_same_state(final_state(tmp_path / "straight"), final_state(killed))
    assert not list(killed.rglob(".*.tmp")), "temp files of the killed write are gone"


# --- c. one process per run ------------------------------------------------------------------------------------------
def test_a_second_process_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = start_until_checkpoint(command("diffusion", run_dir, 100000, "train.checkpoint_every=5"), run_dir, ENV)
    try:
        lines_before = (run_dir / "metrics.jsonl").read_text().count("\n")
        for flag in ("--resume", "--overwrite"):
            code, err = cli(capsys, "train", TINY, "--out", run_dir, flag, "--quiet", "--set", "train.steps=100000")
            one_line_error(code, err, "in use by process", str(holder.pid))
        assert holder.poll() is None, "the holder runs on"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    records = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    assert len(records) >= lines_before and records == list(range(1, len(records) + 1)), "one writer only"
    step = load_checkpoint(run_dir).step
    run("diffusion", run_dir, step + 1, "train.checkpoint_every=5", resume=True)
    assert f"left by process {holder.pid}, which is no longer running" in capsys.readouterr().err
    assert (run_dir / LOCK_FILE).read_text() == "", "released cleanly"


def test_two_overwrites_cannot_mix_their_metrics(tmp_path):
    run_dir = tmp_path / "run"
    RunDir(run_dir).lock()  # another holder: this process itself, through its own open lock file
    with pytest.raises(TrainingError, match=f"in use by process {os.getpid()}"):
        run("diffusion", run_dir, 2, overwrite=True)
    assert not (run_dir / "metrics.jsonl").exists()


# --- a, b. --overwrite ------------------------------------------------------------------------------------------------
def test_overwrite_with_a_bad_data_path_keeps_the_old_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run("diffusion", run_dir, 3)
    before = final_state(run_dir)
    config_text = (run_dir / "config.yaml").read_text()
    code, err = cli(capsys, "train", TINY, "--out", run_dir, "--overwrite", "--quiet",
                    "--set", "data.name=npz", f"data.path={tmp_path / 'typo.npz'}")
    one_line_error(code, err, "typo.npz")
    assert (run_dir / "config.yaml").read_text() == config_text
    assert_same_state(before, final_state(run_dir))


def test_overwrite_removes_only_what_difflab_wrote(tmp_path):
    folder = tmp_path / "mine"
    (folder / "samples").mkdir(parents=True)
    (folder / "samples" / "holiday.png").write_bytes(b"my picture")
    (folder / "notes.txt").write_text("mine")
    run("diffusion", folder, 4, "train.sample_every=2", "train.num_sample_images=8", "train.sample_steps=2",
        overwrite=True)
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["holiday.png", "step_00000002.png",
                                                                      "step_00000004.png"]
    run("diffusion", folder, 2, overwrite=True)
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["holiday.png"]
    assert (folder / "notes.txt").read_text() == "mine" and list_checkpoints(folder) == [1, 2]


# --- d, e, f, h. repairs and refusals -------------------------------------------------------------------------------
def test_a_partial_last_metrics_line_is_truncated_with_a_warning(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run("diffusion", run_dir, 4)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.12')  # a write cut off by a kill or a full disk
    run("diffusion", run_dir, 6, resume=True)
    err = capsys.readouterr().err
    assert "metrics.jsonl: removed a partial last line" in err and str(run_dir) in err
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_to_fewer_steps_is_refused_and_changes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run("diffusion", run_dir, 4)
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    code, err = cli(capsys, "train", TINY, "--out", run_dir, "--resume", "--quiet", "--set", "train.steps=2")
    one_line_error(code, err, "already at step 4", "to step 2")
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files


def test_a_run_killed_before_its_first_checkpoint_is_restarted_with_overwrite(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run("diffusion", run_dir, 2, "train.checkpoint_every=0")
    for p in (run_dir / "checkpoints").iterdir():  # as if killed before the first checkpoint
        p.unlink()
    (run_dir / "checkpoints").rmdir()
    for flags in (["--resume"], []):
        code, err = cli(capsys, "train", TINY, "--out", run_dir, *flags, "--quiet")
        one_line_error(code, err, "--overwrite")
    code, err = cli(capsys, "train", TINY, "--out", run_dir, "--overwrite", "--quiet", "--set", "train.steps=2")
    assert code == 0, err


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_temp_files_are_removed_at_the_next_start_and_files_get_the_umask_mode(tmp_path, umask):
    run_dir = tmp_path / "run"
    old = os.umask(umask)
    try:
        run("diffusion", run_dir, 2)
        leftovers = [run_dir / ".metrics.jsonl.x1.tmp", run_dir / "checkpoints" / ".step_00000003.json.x2.tmp"]
        for p in leftovers:
            p.write_bytes(b"half a write")
        run("diffusion", run_dir, 3, resume=True)
    finally:
        os.umask(old)
    assert not any(p.exists() for p in leftovers)
    for p in (run_dir / "checkpoints").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# --- g. divergence ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["diffusion", "matryoshka", "autoencoder"])
def test_divergence_keeps_only_checkpoints_from_before_it(tmp_path, kind):
    """With lr = 1e6 the loss of step 2 is ~1e14: the weights of step 1 gave it, so its checkpoint goes too."""
    from difflab.pipeline import load_run

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="diverged|non-finite") as info:
        run(kind, run_dir, 10, "train.lr=1e6")
    assert "\n" not in str(info.value) and "--overwrite" in str(info.value)
    for step in list_checkpoints(run_dir):
        if kind == "autoencoder":
            assert all(torch.isfinite(t).all() for t in load_checkpoint(run_dir, which=step).model.values())
            continue
        pipe = load_run(run_dir, which=step)
        assert all(torch.isfinite(p).all() for p in pipe.net.parameters())
        assert torch.isfinite(pipe.sample(16, steps=5, progress=False).x).all()


def test_ddgan_divergence_keeps_only_checkpoints_from_before_it(tmp_path):
    """DDGAN with lr_d = lr_g = 1e6: the discriminator's logits explode, the run stops in one line and every
    checkpoint left holds finite weights that sample finitely."""
    from difflab.pipeline import load_run

    run_dir = tmp_path / "run"
    with pytest.raises(TrainingError, match="diverged|non-finite|no longer finite") as info:
        run("ddgan", run_dir, 20, "ddgan.lr_d=1e6", "ddgan.lr_g=1e6")
    assert "\n" not in str(info.value)
    for step in list_checkpoints(run_dir):
        pipe = load_run(run_dir, which=step)
        assert all(torch.isfinite(p).all() for p in pipe.net.parameters())
        assert torch.isfinite(pipe.sample(16, progress=False).x).all()


def test_non_finite_weights_are_never_saved(tmp_path):
    """A step whose update leaves a non-finite weight stops the run before any save; the checkpoint of the step
    before (its loss was verified by this step) stays."""

    class Breaks(TwoModule):
        def step(self, ctx):
            metrics = super().step(ctx)
            if ctx.step == 3:
                with torch.no_grad():
                    self.trainables["critic"].module[0].weight[0, 0] = float("inf")
            return metrics

    cfg = config("two-module", 6)
    with pytest.raises(TrainingError, match="weights are no longer finite") as info:
        Engine(Breaks(cfg), Settings.from_train(cfg.train), tmp_path / "run").fit()
    assert "last good checkpoint (step 2)" in str(info.value)
    assert list_checkpoints(tmp_path / "run") == [1, 2]
    assert all(torch.isfinite(t).all() for t in load_checkpoint(tmp_path / "run").parts["module/critic"].values())


# --- 4. sinks ----------------------------------------------------------------------------------------------------------
def test_tensorboard_gets_the_scalars_and_the_sample_grids(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    run("diffusion", run_dir, 4, "train.log_to=[jsonl, tensorboard]", "train.sample_every=2",
        "train.num_sample_images=8", "train.sample_steps=2")
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(
        [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()])
    assert [e.step for e in events.Images("samples")] == [2, 4]


def test_tensorboard_missing_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    code, err = cli(capsys, "train", TINY, "--out", tmp_path / "run", "--quiet",
                    "--set", "train.steps=2", "train.log_to=[jsonl, tensorboard]")
    one_line_error(code, err, "pip install")


def test_compile_is_opt_in_and_checkpoints_hold_the_plain_weights(tmp_path, monkeypatch):
    """``train.compile: true`` runs the forward passes through ``torch.compile`` (replaced here by a recording
    identity: compiling takes ~40 s on the CPU); checkpoints keep the module's own parameter names."""
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or module)
    run("diffusion", tmp_path / "plain", 2)
    assert compiled == []
    run("two-module", tmp_path / "run", 2, "train.compile=true")
    assert len(compiled) == 2
    assert not any("_orig_mod" in k for k in final_state(tmp_path / "run")["tensors"])
