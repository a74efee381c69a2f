"""`difflab demo --quick`: the whole main job's plumbing — forward process, two trainings, DDPM and DDIM
sampling, metrics, the guided grid and the report — runs and writes every file it links."""

import json
import math
import re

from difflab.cli import main


def test_quick_demo_writes_a_complete_report(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--quiet", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    linked = re.findall(r"\]\(([^)]+)\)", report)
    assert len(linked) >= 10
    for name in linked:
        assert (out / name).is_file(), name
    results = json.loads((out / "results.json").read_text())
    for key, metric in (("two_moons", "sliced W2"), ("digits8", "FD-digits8")):
        rows = results[key]
        assert {r["sampler"] for r in rows} == {"ddpm", "ddim"}
        assert all(math.isfinite(r[metric]) and r[metric] >= 0 for r in rows)
    assert all(0.0 <= r["class accuracy"] <= 1.0 for r in results["digits8"])
