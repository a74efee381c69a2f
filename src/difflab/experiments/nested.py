"""Experiment ``nested``: nested diffusion's anytime quality against NFE for several outer × inner splits, beside the
plain x̂0 of DDIM / DEIS at the same NFE and full runs of equal NFE; then the split chosen per budget (SPEC §5
nested diffusion, §8 metrics; Elata et al. 2023).

Subjects, each scored by one metric next to its noise floor:

1. **Exact 16-D Gaussian bed** (condition number 100, linear schedule, T = 1000): KL of a Gaussian fitted to the
   samples against the data (the outputs of every sampler here are Gaussian: affine in Gaussian draws), with its
   floor (the same estimate for as many exact data samples). Also the *oracle* inner sampler (exact posterior draws
   ``q(x0 | x_t)``, :func:`difflab.exact_kernels.oracle_x0_sampler`): its anytime outputs are exactly distributed, so they sit at the floor.
2. **Exact 2-D mixture bed** (four classes on a circle): sliced W2 to exact samples, floor real vs real.
3. **A trained model** (``run_dir``, or the built-in two-moons run): the data kind's headline metric (FD-<dataset> for
   images) against the data set.

The nested sampler is :func:`difflab.pipeline.run_nested` (outer DDIM η = 0; inner DDIM with the default inner η,
:data:`difflab.pipeline.NESTED_INNER_ETA`, plus one deterministic-inner split, inner η = 0, for contrast). The plain
x̂0 curves are the denoiser's one-evaluation ``x̂0`` along one DDIM / DEIS run of the full budget. The split per budget
is chosen on a *different* Gaussian bed (covariance seed 1, sampling seed 1), never on the numbers reported here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from difflab.exact_kernels import oracle_x0_sampler
from difflab.experiments.common import Reference, line_plot, provenance, quality, reference_for, trained_or_built_in
from difflab.experiments.report import Report

SPLITS = ((10, 10), (20, 5), (5, 20), (4, 25))  # outer × inner, 100 NFE each (the splits)
QUICK_SPLITS = ((5, 4), (2, 10))
DETERMINISTIC_SPLIT = (10, 10)  # run again with inner η = 0: a deterministic inner run is not a posterior draw
FULL_RUN_NFE = (10, 20, 50, 100)
QUICK_FULL_RUN_NFE = (10, 20)
BUDGET_CANDIDATES = {20: ((2, 10), (4, 5), (5, 4), (10, 2)),
                     50: ((2, 25), (5, 10), (10, 5), (25, 2)),
                     100: ((2, 50), (4, 25), (5, 20), (10, 10), (20, 5))}
QUICK_BUDGET_CANDIDATES = {20: ((2, 10), (4, 5))}
BED_T = 1000


@dataclass
class Subject:
    """What the experiment samples from and how it scores: ``draw(sampler, steps, **options) -> Samples`` (the same
    ``x_T`` for every call), ``x_T``, the ``denoiser`` and ``cond`` behind it, and ``score(x) -> (value, floor)``."""

    name: str
    draw: Callable
    x_T: torch.Tensor
    denoiser: object
    cond: dict
    score: Callable
    metric: str


def gaussian_kl_score(bed, n: int, seed: int):
    """``score(x) -> (KL of a Gaussian fitted to x ‖ data, the same for n exact data samples)`` on a Gaussian bed."""
    from difflab.testbeds import fit_gaussian

    floor = float(bed.kl_from_gaussian(*fit_gaussian(bed.sample(n, torch.Generator().manual_seed(seed + 10_000),
                                                                dtype=torch.float64))))
    return lambda x: (float(bed.kl_from_gaussian(*fit_gaussian(x.double()))), floor)


def reference_score(ref: Reference, seed: int):
    def score(x):
        q = quality(x, ref, seed)
        return q["value"], q["noise_floor"]

    return score


def bed_subject(name: str, bed, n: int, seed: int, score, metric: str) -> Subject:
    from difflab.paths import DiscretePath
    from difflab.pipeline import generate

    path = DiscretePath.from_schedule("linear", T=BED_T)
    den = bed.denoiser(path)
    x_T = path.prior_sample((n, bed.D), torch.Generator().manual_seed(seed)).double()  # generate's x_T for this seed

    def draw(sampler, steps, **options):
        return generate(den, (bed.D,), n, sampler, steps, torch.Generator().manual_seed(seed), **options)

    return Subject(name, draw, x_T, den, {}, score, metric)


def pipeline_subject(pipe, num: int, seed: int) -> Subject:
    ref = reference_for(pipe.config)
    num = min(num, ref.max_samples())
    x_T = pipe.path.prior_sample((num, *pipe.data_shape), torch.Generator().manual_seed(seed), device=pipe.device)
    y = pipe.labels(num)

    def draw(sampler, steps, **options):
        return pipe.sample(num, sampler=sampler, steps=steps, seed=seed, progress=False, **options)

    return Subject(pipe.config.data.name, draw, x_T, pipe.denoiser, {} if y is None else {"y": y},
                   reference_score(ref, seed), ref.metric)


# --- the measurements -------------------------------------------------------------------------------------------
def anytime_rows(subject: Subject, splits, inner_eta: Optional[float] = None) -> list:
    """The anytime output after every outer step of each split, scored."""
    from difflab.samplers.nested import AnytimeOutputs

    rows = []
    for outer, inner in splits:
        anytime = AnytimeOutputs()
        options = {} if inner_eta is None else {"inner_eta": inner_eta}
        start = time.perf_counter()
        subject.draw("nested", outer, inner=inner, anytime=anytime, **options)
        wall = time.perf_counter() - start
        method = f"nested {outer}×{inner}" + ("" if inner_eta is None else f", inner η = {inner_eta:g}")
        for i, nfe, x in anytime.outputs():
            value, floor = subject.score(x)
            rows.append({"subject": subject.name, "method": method, "outer step": i + 1, "NFE": nfe,
                         subject.metric: value, "noise floor": floor, "wall [s]": wall if i == outer - 1 else ""})
    return rows


def plain_x0_rows(subject: Subject, nfe: int, every: int) -> list:
    """The denoiser's ``x̂0`` after each ``every``-th evaluation of one DDIM and one DEIS run of ``nfe`` evaluations."""
    from difflab.pipeline import continuous_view, solver_grid
    from difflab.samplers import sample_ddim, time_grids
    from difflab.samplers.ode import sample_deis

    rows = []
    for label in ("DDIM", "DEIS"):
        trace = []
        record = lambda info: trace.append(info["x0_hat"].detach().float().cpu())  # noqa: E731 - NFE = step + 1 for both
        if label == "DDIM":
            sample_ddim(subject.denoiser, subject.x_T, steps=nfe, callback=record, **subject.cond)
        else:
            den = continuous_view(subject.denoiser)
            sample_deis(den, subject.x_T.double(), solver_grid(den.path, nfe, "deis"),
                        order=getattr(time_grids, "DEIS_ORDER", 3), callback=record, **subject.cond)
        for k in range(every, nfe + 1, every):
            value, floor = subject.score(trace[k - 1])
            rows.append({"subject": subject.name, "method": f"{label} x̂0 (one {nfe}-NFE run)", "outer step": "",
                         "NFE": k, subject.metric: value, "noise floor": floor, "wall [s]": ""})
    return rows


def full_run_rows(subject: Subject, budgets) -> list:
    rows = []
    for sampler in ("ddim", "deis"):
        for nfe in budgets:
            start = time.perf_counter()
            out = subject.draw(sampler, nfe)
            wall = time.perf_counter() - start
            value, floor = subject.score(out.x)
            rows.append({"subject": subject.name, "method": f"{sampler.upper()} full run", "outer step": "",
                         "NFE": out.nfe, subject.metric: value, "noise floor": floor, "wall [s]": wall})
    return rows


def oracle_rows(subject: Subject, bed, outer: int, seed: int) -> list:
    from difflab.samplers import discrete_timesteps
    from difflab.samplers.nested import AnytimeOutputs, oracle_inner, sample_nested

    anytime = AnytimeOutputs()
    path = subject.denoiser.path
    sample_nested(subject.denoiser, subject.x_T, discrete_timesteps(path.T, outer),
                  oracle_inner(oracle_x0_sampler(bed, path)), generator=torch.Generator().manual_seed(seed),
                  callback=anytime)
    rows = []
    for i, nfe, x in anytime.outputs():
        value, floor = subject.score(x)
        rows.append({"subject": subject.name, "method": f"nested {outer}×oracle (exact posterior draws)",
                     "outer step": i + 1, "NFE": nfe, subject.metric: value, "noise floor": floor, "wall [s]": ""})
    return rows


def measure(report: Report, subject: Subject, splits, full_nfe, key: str, note: str = "", extra=(),
            trace_points: int = 20) -> list:
    nfe = splits[0][0] * splits[0][1]
    rows = anytime_rows(subject, splits)
    rows += anytime_rows(subject, [s for s in splits if s == DETERMINISTIC_SPLIT] or splits[:1], inner_eta=0.0)
    rows += list(extra)
    rows += plain_x0_rows(subject, nfe, every=max(1, nfe // trace_points))
    rows += full_run_rows(subject, full_nfe)
    report.heading(subject.name.replace("_", " "))
    if note:
        report.text(note)
    metric = subject.metric
    floor = rows[0]["noise floor"]
    series = {}
    for r in rows:
        if r["method"].endswith("full run"):
            continue
        xs, ys = series.setdefault(r["method"], ([], []))
        xs.append(r["NFE"])
        ys.append(r[metric])
    for label in ("DDIM full run", "DEIS full run"):
        full = [r for r in rows if r["method"] == label]
        series[label] = ([r["NFE"] for r in full], [r[metric] for r in full])
    figure = f"anytime_{key}.png"
    line_plot(report.path(figure), series, "network evaluations per sample (NFE)", f"{metric} (lower is better)",
              f"{subject.name}: anytime output vs NFE", logy=True, hlines={"noise floor": floor},
              legend={"fontsize": "x-small", "ncol": 2, "framealpha": 0.6})
    report.image(figure, f"{metric} of the anytime output after every outer step, the plain x̂0 along one run, and full "
                         f"runs of equal NFE; dashed: the noise floor")
    summary = [r for r in rows if r["outer step"] == "" and r["method"].endswith("full run")]
    finals = [r for r in rows if r["wall [s]"] != "" and r["method"].startswith("nested")]
    report.text("Final outputs of each split (the last anytime output) and the full runs:")
    report.table(finals + summary, ["method", "NFE", metric, "noise floor", "wall [s]"])
    report.text("Every measurement:")
    report.table(rows, ["method", "outer step", "NFE", metric, "noise floor"], key=key)
    return rows


def choose_splits(report: Report, candidates: dict, n: int) -> dict:
    """For each budget, the split whose final output has the least KL on a *selection* Gaussian bed (covariance seed 1,
    sampling seed 1): data the reported numbers do not come from."""
    from difflab.testbeds import gaussian_bed

    bed = gaussian_bed(16, condition=100.0, seed=1)
    subject = bed_subject("selection bed", bed, n, seed=1, score=gaussian_kl_score(bed, n, 1), metric="KL [nats]")
    rows, chosen = [], {}
    for budget, splits in candidates.items():
        for outer, inner in splits:
            value, floor = subject.score(subject.draw("nested", outer, inner=inner).x)
            rows.append({"budget [NFE]": budget, "split": f"{outer}×{inner}", "final KL [nats]": value,
                         "noise floor": floor})
        best = min((r for r in rows if r["budget [NFE]"] == budget), key=lambda r: r["final KL [nats]"])
        chosen[budget] = tuple(int(v) for v in best["split"].split("×"))
    report.heading("The split per budget")
    report.text(f"Chosen as the time grids are: measured on a known-truth bed that the reported numbers do not use — "
                f"a second 16-D Gaussian bed (covariance seed 1) sampled with seed 1, n = {n}, outer η = 0, inner DDIM "
                f"with the default inner η — by the final output's KL (the anytime curves above show what the earlier "
                f"outputs cost). Chosen: " + ", ".join(f"{b} NFE → {o}×{i}" for b, (o, i) in chosen.items()) + ".")
    report.table(rows, key="split_selection")
    report.results["chosen_split"] = {str(b): list(s) for b, s in chosen.items()}
    return chosen


def run(out_dir, run_dir: Optional[str] = None, quick: bool = False, seed: int = 0,
        num_samples: Optional[int] = None, model_only: bool = False) -> Path:
    """Write ``report.md``, ``results.json`` and the figures into ``out_dir``; returns the report's path.

    ``num_samples`` for the trained model defaults to 2000 (200 with ``quick``), capped at half the reference set;
    the Gaussian bed uses 20000 samples (2000 quick) and the mixture bed 4000 (500 quick). ``model_only`` measures
    the trained model alone (no beds, no split selection: a costly model's own report).
    """
    from difflab.testbeds import gaussian_bed, mixture_bed_2d

    started = time.perf_counter()
    report = Report(out_dir, "Nested diffusion: anytime quality vs NFE, and the split per budget")
    splits = QUICK_SPLITS if quick else SPLITS
    full_nfe = QUICK_FULL_RUN_NFE if quick else FULL_RUN_NFE
    report.text("Nested diffusion (SPEC §5; Elata et al. 2023): an outer DDIM (η = 0) whose x̂0 at every outer step "
                "is an inner sampler's output from the current state; after every outer step that output is a "
                "finished sample. Rows `nested N×M` are its anytime outputs (N outer steps of M inner network "
                "evaluations); `DDIM/DEIS x̂0` the denoiser's one-evaluation estimate along a plain run of the same "
                "total budget; `full run` a plain run with that many evaluations.")

    if model_only:
        report.heading("Trained model", level=2)
        pipe = trained_or_built_in(run_dir, Path(out_dir), quick, seed, report)
        measure(report, pipeline_subject(pipe, num_samples or (200 if quick else 2000), seed), splits, full_nfe,
                "trained_model", trace_points=5 if quick else 20)
        provenance(report, started)
        return report.write()

    n_bed = 2000 if quick else 20_000
    bed = gaussian_bed(16, condition=100.0, seed=0)
    subject = bed_subject("Gaussian bed (16-D)", bed, n_bed, seed, gaussian_kl_score(bed, n_bed, seed), "KL [nats]")
    points = 5 if quick else 20
    measure(report, subject, splits, full_nfe, "gaussian_bed", extra=oracle_rows(subject, bed, splits[0][0], seed),
            trace_points=points,
            note=f"The exact denoiser of a 16-D Gaussian (eigenvalues log-spread over a factor 100), linear schedule, "
                 f"T = {BED_T}; n = {n_bed} samples per method, KL of the fitted Gaussian (every output here is "
                 f"Gaussian); the floor is that estimate for {n_bed} exact data samples. The oracle row uses exact "
                 f"posterior draws as the inner sampler (no network evaluations).")

    n_mix = 500 if quick else 4000
    mix = mixture_bed_2d(num_classes=4)
    ref = Reference(mix.sample(2 * n_mix, torch.Generator().manual_seed(seed + 1)), "points",
                    f"{2 * n_mix} exact draws of the mixture")
    measure(report, bed_subject("Mixture bed (2-D)", mix, n_mix, seed, reference_score(ref, seed), ref.metric),
            splits, full_nfe, "mixture_bed", trace_points=points,
            note=f"Four isotropic Gaussians (std 0.3) on a circle of radius 2, exact denoiser, same schedule; "
                 f"{ref.metric} of {n_mix} samples to {n_mix} exact draws, floor real vs real.")

    report.heading("Trained model", level=2)
    pipe = trained_or_built_in(run_dir, Path(out_dir), quick, seed, report)
    measure(report, pipeline_subject(pipe, num_samples or (200 if quick else 2000), seed), splits, full_nfe,
            "trained_model", trace_points=points)

    choose_splits(report, QUICK_BUDGET_CANDIDATES if quick else BUDGET_CANDIDATES, 2000 if quick else 20_000)
    provenance(report, started)
    return report.write()
