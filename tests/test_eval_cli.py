"""``difflab eval RUN_DIR``: the table, the JSON, and one-line errors (SPEC §8 metrics with sample counts and
noise floors)."""

import json
from pathlib import Path

import pytest

from difflab.cli import main
from difflab.commands.evaluate import metrics_table

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from difflab.config import load_config
    from difflab.training import train

    run_dir = tmp_path_factory.mktemp("eval") / "tiny"
    train(load_config(ROOT / "configs" / "tiny2d.yaml", ["train.steps=4"]), run_dir, progress=False)
    return run_dir


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_prints_a_table_and_writes_json(capsys, tmp_path, tiny_run):
    """Points run: every metric row has a value, a noise floor and the counts; the JSON holds the same numbers.
    With the noise floor, 200 samples are scored against half of the 2000 held-out points (n_reference 1000)."""
    out_file = tmp_path / "eval.json"
    code, out, err = run_cli(capsys, "eval", tiny_run, "--steps", 5, "--num", 200, "--out", out_file, "--quiet")
    assert code == 0, err
    result = json.loads(out_file.read_text())
    assert result["run"]["nfe"] == 5 and result["run"]["sampler"] == "ddim"
    sw = result["metrics"]["sliced_w2"]
    assert sw["n_samples"] == 200 and sw["n_reference"] == 1000 and sw["value"] > 0 and sw["noise_floor"] > 0
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "value", "noise", "floor", "samples", "reference"]
    row = next(line for line in out.splitlines() if line.startswith("sliced_w2")).split()
    assert row[-2:] == ["200", "1000"] and float(row[1]) == pytest.approx(sw["value"], rel=1e-3)
    for name in ("mmd_rbf", "FD-raw", "precision", "recall"):
        assert any(line.startswith(name) for line in out.splitlines()), name


def test_eval_without_floor_uses_every_sample(capsys, tiny_run):
    code, out, err = run_cli(capsys, "eval", tiny_run, "--sampler", "ddpm", "--steps", 10, "--num", 50, "--no-floor",
                             "--quiet")
    assert code == 0, err
    row = next(line for line in out.splitlines() if line.startswith("sliced_w2")).split()
    assert row[2] == "-" and row[-2:] == ["50", "2000"]


@pytest.mark.parametrize("argv, fragment", [
    (["--out", "x.txt"], "--out must end in .json"),
    (["--num", "1"], "--num must be >= 2"),
])
def test_eval_user_errors_are_one_line(capsys, tiny_run, argv, fragment):
    code, _, err = run_cli(capsys, "eval", tiny_run, *argv)
    assert code == 2 and err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_eval_of_a_missing_run_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "eval", tmp_path / "nowhere")
    assert code == 2 and err.startswith("difflab: error: ") and err.count("\n") == 1


def test_metrics_table_formats_missing_floors():
    table = metrics_table({"metrics": {"a": {"value": 0.5, "noise_floor": 0.25, "n_samples": 3, "n_reference": 4},
                                       "b": {"value": 1e-7, "n_samples": 3, "n_reference": 4}}})
    lines = table.splitlines()
    assert lines[2].split() == ["a", "0.5", "0.25", "3", "4"]
    assert lines[3].split() == ["b", "1.000e-07", "-", "3", "4"]
