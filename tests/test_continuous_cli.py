"""End to end on the command line (SPEC §6): train a tiny DDPM-time model and a tiny rectified flow, sample
them with the continuous-time solvers, report ELBO and ODE bits/dim side by side, and reflow the flow.

The models are trained for a few steps only: these tests check that every piece runs from the CLI and
reports honestly (NFE, sample counts, a loadable reflowed run), not sample quality (tests/test_sde.py,
tests/test_ode.py and tests/test_flows.py measure that on exact models and trained ones).
"""

import re
from pathlib import Path

import numpy as np
import pytest

from difflab.cli import main
from difflab.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.steps=20", "train.checkpoint_every=0", "train.sample_every=0", "train.batch_size=64",
        "model.hidden=32", "model.depth=1", "model.time_dim=16", "data.n=512"]


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A discrete-time (T = 50) two-moons model and a rectified flow, 20 training steps each."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", str(ROOT / "configs" / "moons.yaml"), "--out", str(root / "ddpm"), "--quiet", "--set",
                 *TINY, "diffusion.T=50"]) == 0
    assert main(["train", str(ROOT / "configs" / "moons_flow.yaml"), "--out", str(root / "flow"), "--quiet",
                 "--set", *TINY, "diffusion.coupling=ot"]) == 0
    return root


@pytest.mark.parametrize("sampler,nfe", [("heun", 9), ("dpmpp2m", 10), ("sde", 10)])
@pytest.mark.parametrize("run", ["ddpm", "flow"])
def test_sample_with_continuous_solvers(capsys, runs, tmp_path, run, sampler, nfe):
    """``difflab sample --sampler S --steps 10``: within the NFE budget (Heun: 4 two-evaluation steps and the
    one-evaluation clean step), finite samples of the data's shape, for a DDPM-time run and a flow run."""
    out = cli(capsys, "sample", runs / run, "--sampler", sampler, "--steps", 10, "--num", 32, "--quiet",
              "--out", tmp_path / "s.npz")
    data = np.load(tmp_path / "s.npz")
    assert data["x"].shape == (32, 2) and np.isfinite(data["x"]).all()
    assert int(data["nfe"]) == nfe and f"{nfe} network evaluations" in out


def test_nll_elbo_and_ode_side_by_side(capsys, runs):
    """``difflab nll``: ELBO and ODE bits/dim of the same run on the same 32 held-out points, each with its
    standard error; the ODE line reports its NFE (RK4, 5 steps: 4 evaluations per step = 20; Heun with
    Hutchinson probes, 4 steps = 8: the likelihood integrates to t_min and has no clean step)."""
    lines = {}
    for method, extra in (("elbo", []), ("ode", ["--solver", "rk4", "--steps", 5])):
        out = cli(capsys, "nll", runs / "ddpm", "--method", method, "--num", 32, "--quiet", *extra)
        m = re.search(r"(\S+) bits/dim ± (\S+) \(standard error, N=32 fresh held-out", out)
        assert m and np.isfinite(float(m.group(1))) and float(m.group(2)) > 0, out
        lines[method] = out
    assert "20 network evaluations" in lines["ode"]
    out = cli(capsys, "nll", runs / "flow", "--method", "ode", "--num", 16, "--probes", 2, "--solver", "heun",
              "--steps", 4)
    assert "Hutchinson 2 rademacher probes" in out and "8 network evaluations" in out


def test_nll_elbo_needs_discrete_time(capsys, runs):
    code = main(["nll", str(runs / "flow"), "--method", "elbo", "--num", "8"])
    err = capsys.readouterr().err
    assert code == 2 and "discrete DDPM time" in err and len(err.strip().splitlines()) == 1


def test_reflow_writes_a_loadable_run(capsys, runs, tmp_path):
    """``difflab reflow``: prints straightness and 1-/2-step sliced W2 before and after, and writes a run that
    ``difflab sample`` loads (velocity target on the linear path, same network)."""
    out = cli(capsys, "reflow", runs / "flow", "--out", tmp_path / "re", "--pairs", 64, "--steps", 10,
              "--pair-steps", 4, "--eval-num", 64)
    assert re.search(r"before\s+[\d.]+\s+[\d.]+\s+[\d.]+", out) and re.search(r"after\s+[\d.]+\s+[\d.]+\s+[\d.]+", out)
    cfg = load_config(tmp_path / "re" / "config.yaml")
    assert cfg.diffusion.path == "linear" and cfg.diffusion.target == "velocity"
    cli(capsys, "sample", tmp_path / "re", "--sampler", "euler", "--steps", 1, "--num", 8, "--quiet",
        "--out", tmp_path / "one.npz")
    assert np.isfinite(np.load(tmp_path / "one.npz")["x"]).all()
    code = main(["reflow", str(runs / "ddpm"), "--out", str(tmp_path / "bad")])
    assert code == 2 and "linear path" in capsys.readouterr().err


def test_ot_coupling_is_a_flow_matching_option():
    """``diffusion.coupling: ot`` is validated: it needs the velocity target (flow matching, SPEC §6)."""
    assert load_config(ROOT / "configs" / "moons_flow.yaml", ["diffusion.coupling=ot"]).diffusion.coupling == "ot"
    with pytest.raises(ConfigError, match="coupling"):
        load_config(ROOT / "configs" / "moons.yaml", ["diffusion.coupling=ot"])
