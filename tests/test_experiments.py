"""The paper's experiments in their ``quick`` mode (``difflab experiment NAME --quick``): each writes
report.md, results.json and its figures, and the numbers are finite and behave as the math says.

The exact-bed checks are oracle checks (SPEC §8: exact KL of a deterministic sampler's affine push-forward);
the trained-model numbers come from seconds-long runs, so only their finiteness and counts are asserted.
"""

import json
import math

import pytest

from difflab.cli import main
from difflab.experiments import EXPERIMENTS, common, ddim_steps, forward_process, ode_solvers, parameterization, \
    reverse_kernel, schedules, ddgan_steps


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The quick built-in run (two moons, T = 100, 60 steps), trained once for the experiments that take a run."""
    run_dir = tmp_path_factory.mktemp("run") / "moons"
    common.train_quietly(common.small_config(quick=True), run_dir)
    return run_dir


def written(out_dir, figures):
    """The report, its figures and results.json exist; returns the parsed results."""
    report = (out_dir / "report.md").read_text()
    for name in figures:
        assert (out_dir / name).stat().st_size > 1000, name
        assert f"]({name})" in report, name
    results = json.loads((out_dir / "results.json").read_text())
    assert results
    return results


def finite(rows, *keys):
    return all(isinstance(r[k], (int, float)) and math.isfinite(r[k]) for r in rows for k in keys)


@pytest.mark.parametrize("name", ["forward-process", "ddim-steps", "schedules", "ode-solvers", "parameterization",
                                  "reverse-kernel", "ddgan-steps"])
def test_experiment_is_registered_with_a_run_function(name):
    """The name the CLI takes resolves to a module with ``run(out_dir, ...)``."""
    import importlib
    import inspect

    run = importlib.import_module(f"difflab.experiments.{EXPERIMENTS[name]}").run
    assert list(inspect.signature(run).parameters)[0] == "out_dir", name


def test_experiment_list_names_every_registered_experiment(capsys):
    assert main(["experiment", "--list"]) == 0
    out = capsys.readouterr().out
    for name in EXPERIMENTS:
        assert f"  {name}  " in out or f"  {name} " in out, name


@pytest.mark.parametrize("argv, fragment", [
    (["experiment"], "name an experiment"),
    (["experiment", "forward-process", "some_run"], "takes no RUN_DIR"),
    (["experiment", "ddim-steps", "no/such/run"], "no run directory"),
    (["experiment", "no-such-experiment"], "invalid choice"),
])
def test_experiment_user_errors_are_one_line(capsys, argv, fragment):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and fragment in err and "Traceback" not in err


def test_forward_process(tmp_path):
    forward_process.run(tmp_path, dataset="digits8", num_images=2)
    results = written(tmp_path, ["log_snr.png", "forward_linear.png"])
    assert len(results["alpha_bar"]) == 4


def test_ddim_steps_quick(tmp_path, tiny_run):
    """SPEC §5, §8. DDIM on the exact 16-D bed: exact KL falls with steps (measured 10 → 0.82, 100 → 0.0094 nats;
    asserted: strictly decreasing and KL(10) > 10·KL(100)). Trained part: NFE equals the steps of each sampler."""
    code = main(["experiment", "ddim-steps", str(tiny_run), "--out", str(tmp_path), "--quick"])  # through the CLI
    assert code == 0
    results = written(tmp_path, ["quality_vs_nfe.png", "time_vs_nfe.png", "bed_kl_vs_nfe.png", "samples.png"])
    trained = results["trained_model"]
    assert [(r["sampler"], r["NFE"]) for r in trained] == [("DDPM", 100), ("DDIM", 100), ("DDIM", 50), ("DDIM", 20),
                                                           ("DDIM", 10)]
    assert finite(trained, "sliced_w2", "noise floor", "wall [s]") and all(r["sliced_w2"] > 0 for r in trained)
    ddim = {r["steps"]: r["KL [nats]"] for r in results["exact_bed"] if r["sampler"] == "DDIM"}
    assert ddim[10] > ddim[20] > ddim[50] > ddim[100] > 0 and ddim[10] > 10 * ddim[100]


def test_ode_solvers_quick(tmp_path, tiny_run):
    """SPEC §6. Exact bed: every fixed-step solver's exact KL falls from 10 to 20 NFE, and DPM-Solver++(2M) beats
    Euler at 20 NFE (measured 0.0033 vs 0.058 nats; asserted with a factor 3 margin)."""
    ode_solvers.run(tmp_path, run_dir=tiny_run, quick=True)
    results = written(tmp_path, ["bed_kl_vs_nfe.png", "quality_vs_nfe.png"])
    bed = results["exact_bed"]
    assert finite(bed, "KL [nats]", "NFE")
    kl = {(r["solver"], r["budget"]): r["KL [nats]"] for r in bed}
    from difflab.samplers.ode import ODE_SOLVERS

    assert {r["solver"] for r in bed} == {"ddim", *ODE_SOLVERS}, "a solver was skipped: see the report's notes"
    for solver in ("ddim", *ode_solvers.SOLVERS):
        if (solver, 10) in kl:
            assert kl[(solver, 20)] < kl[(solver, 10)], solver
    if ("dpmpp2m", 20) in kl:
        assert 3 * kl[("dpmpp2m", 20)] < kl[("euler", 20)]
    assert all(r["NFE"] <= r["steps"] * 4 + 1 for r in results["trained_model"] if isinstance(r["steps"], int))


def test_schedules_quick(tmp_path):
    """SPEC §2, §8. Four schedules trained at the same budget; exact-bed DDIM KL falls with steps for each."""
    schedules.run(tmp_path, quick=True)
    results = written(tmp_path, ["log_snr.png", "samples.png", "bed_kl_vs_steps.png"])
    assert [r["schedule"] for r in results["trained"]] == list(forward_process.SCHEDULES)
    assert finite(results["trained"], "sliced W2", "noise floor")
    for row in results["exact_bed"]:
        kls = [row[f"KL, DDIM {s} [nats]"] for s in schedules.BED_STEPS]
        assert all(a > b > 0 for a, b in zip(kls, kls[1:])), row
    assert results["log_snr"][-1]["log SNR at t=1000 [nats]"] == -math.inf  # zero terminal SNR


def test_parameterization_quick(tmp_path):
    """SPEC §4. The common units are consistent: at each t, x0-MSE = ε-MSE / SNR exactly (x̂0 = (x − s ε̂)/a),
    checked to 1e-3 relative (float32 network outputs at log-SNR down to −15); each target's own error falls
    during training (ε for ε, x0 for x0)."""
    parameterization.run(tmp_path, quick=True)
    results = written(tmp_path, ["eps_mse_vs_step.png", "x0_mse_vs_step.png", "eps_mse_vs_log_snr.png", "samples.png"])
    for row in results["per_t"]:
        for target in parameterization.TARGETS:
            ratio = row[f"x0-MSE {target}"] / row[f"ε-MSE {target}"]
            assert math.isclose(ratio, math.exp(-row["log SNR [nats]"]), rel_tol=1e-3), (row, target)
    curves = results["curves"]
    assert finite(curves, "ε-MSE", "x0-MSE")
    own = {"eps": "ε-MSE", "x0": "x0-MSE"}
    for target, key in own.items():
        values = [c[key] for c in curves if c["target"] == target]
        assert values[-1] < values[0], (target, values)
    assert [r["target"] for r in results["final"]] == list(parameterization.TARGETS)


def test_nested_quick(tmp_path, tiny_run):
    """SPEC §5, §8. Nested diffusion's anytime outputs: NFE is outer step × inner; on the Gaussian bed the oracle inner
    sampler (exact posterior draws) sits at the Monte-Carlo floor at every outer step (measured within 0.01 nats of it
    at n = 2000; asserted within 0.03), every anytime output of the first split beats the plain DDIM x̂0 at the same
    NFE (measured 4.9 vs 51 nats at 4 NFE), and a split is chosen for every budget."""
    from difflab.experiments import nested

    nested.run(tmp_path, run_dir=tiny_run, quick=True)
    results = written(tmp_path, ["anytime_gaussian_bed.png", "anytime_mixture_bed.png", "anytime_trained_model.png"])
    bed = results["gaussian_bed"]
    outer, inner = nested.QUICK_SPLITS[0]
    first = [r for r in bed if r["method"] == f"nested {outer}×{inner}"]
    assert [r["NFE"] for r in first] == [inner * (i + 1) for i in range(outer)]
    oracle = [r for r in bed if "oracle" in r["method"]]
    assert len(oracle) == outer and all(r["KL [nats]"] < r["noise floor"] + 0.03 for r in oracle), oracle
    plain = {r["NFE"]: r["KL [nats]"] for r in bed if r["method"].startswith("DDIM x̂0")}
    assert all(r["KL [nats]"] < plain[r["NFE"]] for r in first if r["NFE"] in plain and r["NFE"] < outer * inner)
    assert finite(results["trained_model"], "sliced_w2", "noise floor", "NFE")
    assert set(results["chosen_split"]) == {str(b) for b in nested.QUICK_BUDGET_CANDIDATES}


def test_nested_model_only_measures_just_the_run(capsys, tmp_path, tiny_run):
    """``difflab experiment nested RUN --model-only --num-samples N``: the trained model alone (no beds, no split
    selection), N samples; --model-only without a run is a one-line error; an experiment that does not take an
    option gets a note, not a failure."""
    from difflab import cli

    out = tmp_path / "nested"
    assert cli.main(["experiment", "nested", str(tiny_run), "--quick", "--model-only", "--num-samples", "64",
                     "--out", str(out)]) == 0
    results = written(out, ["anytime_trained_model.png"])
    assert set(results) >= {"trained_model"} and "gaussian_bed" not in results and "chosen_split" not in results
    assert all(r.get("n", 64) == 64 for r in results["trained_model"] if isinstance(r, dict))
    assert cli.main(["experiment", "nested", "--model-only", "--quick", "--out", str(out)]) == 2
    assert "--model-only needs a RUN_DIR" in capsys.readouterr().err
    assert cli.main(["experiment", "forward-process", "--quick", "--num-samples", "10", "--out", str(tmp_path / "fp")]) == 0
    assert "--num-samples does not apply to this experiment: ignored" in capsys.readouterr().out


def test_reverse_kernel_quick(tmp_path):
    """SPEC §5, §8. The least KL of Gaussian reverse steps falls with the number of steps (measured 1.76 nats at
    T = 1 → 0.11 at T = 16; asserted > 1 and a fall by 3×); the quadrature's mass is 1 to 1e-10; DDPM with one
    step is far off (sliced W2 1.45 vs a floor of 0.15; asserted 4× the floor) while the exact-kernel sampler is
    within 2.5× the floor at every T (measured at most 1.7×, n = 500)."""
    reverse_kernel.run(tmp_path, quick=True)
    rows = written(tmp_path, ["kernel_kl_vs_steps.png", "end_to_end_vs_steps.png"])["reverse_kernel"]
    assert [r["steps T"] for r in rows] == list(reverse_kernel.QUICK_STEPS)
    kl = [r["Σ KL(kernel ‖ best Gaussian) [nats]"] for r in rows]
    assert kl[0] > 1.0 and 3 * kl[-1] < kl[0] and all(k >= 0 for k in kl)
    assert all(r["quadrature mass error"] < 1e-10 for r in rows)
    assert rows[0]["DDPM sliced W2"] > 4 * rows[0]["floor sliced W2"]
    assert all(r["exact-kernel sliced W2"] < 2.5 * r["floor sliced W2"] for r in rows)


def test_ddgan_steps_quick(tmp_path):
    """SPEC §5. The quick mode trains a tiny DDGAN and DDPM with T = 2 and a DDPM with T = 20 on both beds (20 steps:
    a smoke test, not a measurement): every row is finite, NFE = T, the mode scores are in range; exact data covers
    all 25 grid modes with weights within 30 % (5000 samples: about 7 % per mode; measured 11 % at most) and leaves
    exp(−9/2) = 1.1 % of its samples beyond 3σ of a 2-D mode (measured 1.2 %)."""
    import torch

    from difflab.testbeds import grid_bed_2d

    ddgan_steps.run(tmp_path, quick=True)
    results = written(tmp_path, ["samples_T2.png", "samples_ddpm_full.png"])
    for bed, modes in (("grid", 25), ("mixture", 4)):
        rows = results[bed]
        assert [(r["model"], r["T"]) for r in rows] == [("DDGAN", 2), ("DDPM", 2), ("DDPM", 20)]
        assert all(r["NFE"] == r["T"] and r["finite"] and 0 <= r["modes covered"] <= modes for r in rows)
        assert finite(rows, "sliced W2", "sW2 / floor", "train [s]", "sample [s]")
    scores = ddgan_steps.mode_scores(grid_bed_2d(), grid_bed_2d().sample(5000, torch.Generator().manual_seed(0)))
    assert scores["modes covered"] == 25 and scores["max weight error"] < 0.3 and scores["off-mode fraction"] < 0.02
