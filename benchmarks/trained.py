"""Samplers on trained networks: every difflab sampler and diffusers' schedulers on the same network and noise,
measured against a tight reference solve (SPEC §6).

For each trained run (:data:`MODELS`; trained here with the repository's configs when ``runs/bench/<name>`` holds
no checkpoint) a fixed batch ``x_T`` (seed 1; classes ``0, 1, …`` in turn for a class-conditional model) is
solved by adaptive Dormand–Prince at ``rtol = atol = 1e-5`` (:func:`difflab.samplers.calibration.reference_solve`);
the reference's own error is its RMSE to a solve at half the tolerance on the first 64 samples. Every sampler's
error is the RMSE per sample to the reference (:func:`~difflab.samplers.calibration.rmse_per_sample`), and the
samples' Fréchet distance to the data (FD-<dataset>: in a held-out classifier's features for images,
:mod:`difflab.evaluation.features`; in raw coordinates for 2-D points) is reported next to the reference's own.

- difflab: the pipeline's samplers by name (``difflab sample --sampler NAME``), the old DEIS default (order 4 on
  the grids fit to 1-D Gaussians), Heun in path time on a log-SNR grid, and the default sampler on a grid
  calibrated to the model (``difflab calibrate``, on a separate calibration batch of seed 0).
- diffusers: :class:`NetworkModel` drives the *same* network from diffusers' loop: the scheduler gets the run's
  betas (``trained_betas``) and ``prediction_type`` (difflab ``eps``/``x0``/``v`` → ``epsilon``/``sample``/
  ``v_prediction``; SPEC §4's ``v = a ε − s x0`` is diffusers' too), and the network gets diffusers' timestep
  ``t`` as difflab's DDPM step ``t + 1`` (fractional where the scheduler's is). :func:`ddim_equality` proves
  the mapping: diffusers' DDIM (trailing spacing, ``set_alpha_to_one``) and difflab's DDIM agree to float
  tolerance. Every deterministic scheduler family of :mod:`benchmarks.diffusers_bed` is searched over its
  ``quick`` option grid at 10 and 20 model calls; each family's best configuration is then swept over NFE.

    python -m benchmarks.run --only trained --out benchmarks/results
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import torch

NFE = (5, 10, 15, 20, 30, 50)
QUICK_NFE = (10, 20)
HEADLINE_NFE = (10, 20)
RUNS_DIR = Path("runs/bench")
MODELS = {
    "two_moons": ("configs/moons.yaml", ["train.num_threads=1"], 1000),
    "digits8": ("configs/digits8.yaml", ["train.steps=2000", "train.batch_size=64", "train.lr=2e-3",
                                         "train.warmup_steps=100", "train.ema_decay=0.995", "train.num_threads=1"], 256),
}
"""name -> (config, ``--set`` overrides, benchmark batch size). digits8 is ``make demo``'s run (same settings).
MNIST-5k (``configs/mnist5k.yaml``) is not here: its training (~40 min alone on two cores) and the reference solves
did not fit the benchmark's budget on the shared two-core machine."""
SEED = 1
CALIBRATION_SEED = 0
CALIBRATION_NUM = {"two_moons": 1000, "digits8": 256}
"""Calibration (and held-out) batch per model. Two moons' per-sample errors are heavy-tailed: at 256 draws the mean
RMSE of the *uncalibrated* grid differed by 16 % between two batches (0.0335 / 0.0388), more than the 10 % the
held-out check allows; its 2-D network is cheap enough for the benchmark's 1000."""
CALIBRATION_SECONDS = 150.0
"""The fit's budget: ``difflab calibrate``'s default."""
PREDICTION_TYPE = {"eps": "epsilon", "x0": "sample", "v": "v_prediction"}
DIFFUSERS_ERRORS = (ValueError, IndexError, RuntimeError, TypeError, AssertionError, ZeroDivisionError)
"""What a diffusers configuration may raise at some step counts (e.g. UniPC's ``assert self.this_order > 0``): the
configuration is recorded as failing there, not the benchmark."""


# --- the difflab side ------------------------------------------------------------------------------------------
def difflab_samplers(pipe, calibrated: dict) -> dict:
    """name -> ``fn(x_T, nfe, cond) -> Samples`` for the samplers measured."""
    from difflab.pipeline import SAMPLERS, continuous_view
    from difflab.samplers import ode, time_grids
    from difflab.samplers.calibration import default_sampler_grid, sample_calibrated, sample_default

    den = continuous_view(pipe.denoiser)
    path = den.path

    def by_name(name):
        return lambda x, nfe, cond: SAMPLERS[name](pipe.denoiser, x, nfe, **cond)

    out = {f"{name}": by_name(name) for name in ("default", "ddim", "heun", "dpmpp2m", "deis", "euler", "rk4")}
    out["deis (old default: order 4, 1-D Gaussian grids)"] = lambda x, nfe, cond: ode.sample_deis(
        den, x, time_grids.default_grid(path, nfe, "deis"), order=4, **cond)
    out["heun (path time, log-SNR grid)"] = lambda x, nfe, cond: ode.sample_heun(
        den, x, time_grids.uniform_log_snr(path, 1 + (nfe - 1) // 2), **cond)
    if calibrated:
        out["default, calibrated"] = lambda x, nfe, cond: (
            sample_calibrated(den, x, calibrated[nfe], **cond) if nfe in calibrated else None)
        out["default, corrector off, calibrated grid (the previous calibrated default)"] = lambda x, nfe, cond: (
            sample_default(den, x, calibrated[nfe], **cond) if nfe in calibrated else None)
    out["default with the corrector (default grid)"] = lambda x, nfe, cond: sample_default(
        den, x, default_sampler_grid(path, nfe), corrector=True, **cond)
    return out


# --- the diffusers side --------------------------------------------------------------------------------------------
class NetworkModel:
    """``model(x_in, t)`` for diffusers' loop: the trained network's own output (the run's target) at diffusers'
    timestep ``t`` = difflab's DDPM step ``t + 1``; counts calls. ``cond`` is passed through (class labels)."""

    def __init__(self, denoiser, cond: dict):
        self.denoiser, self.cond, self.calls = denoiser, cond, 0

    def __call__(self, x: torch.Tensor, t) -> torch.Tensor:
        self.calls += 1
        u = torch.full((x.shape[0],), float(t) + 1.0, dtype=torch.float64)
        net_dtype = next(self.denoiser.net.parameters()).dtype
        return self.denoiser.net(x.to(net_dtype), u.to(torch.float32), **self.cond).to(x.dtype)


def scheduler_for(fam, cfg: dict, path, target: str):
    """A diffusers scheduler of family ``fam`` with options ``cfg`` on the run's discrete schedule and target."""
    options = {k: v for k, v in cfg.items() if not k.startswith("step:")}
    return fam.scheduler_class()(num_train_timesteps=path.T, trained_betas=path.betas[1:].numpy().tolist(),
                                 prediction_type=PREDICTION_TYPE[target], **fam.fixed, **options)


def diffusers_run(fam, cfg: dict, pipe, x_T: torch.Tensor, nfe: int, cond: dict) -> Optional[tuple]:
    """``(samples, model calls, steps)`` of the best step count within ``nfe`` calls, or ``None`` if none fits."""
    from benchmarks import diffusers_bed as dz

    scheduler = scheduler_for(fam, cfg, pipe.denoiser.path, pipe.denoiser.target)
    steps = dz.steps_for_nfe(scheduler, nfe)
    if steps is None:
        return None
    model = NetworkModel(pipe.denoiser, cond)
    x, calls = dz.sample(scheduler, model, steps, x_T, cfg)  # diffusers scales the unit-variance x_T itself
    return x, calls, steps


def ddim_equality(pipe, x_T: torch.Tensor, cond: dict, steps: int = 10) -> float:
    """Max |difference| of diffusers' DDIM (trailing, ``set_alpha_to_one``, no clipping) and difflab's DDIM
    (trailing integer grid, SPEC §5) from the same ``x_T`` on the same network, ``steps`` steps."""
    from benchmarks import diffusers_bed as dz
    from difflab.pipeline import SAMPLERS

    fam = dz.family("DDIM")
    scheduler = scheduler_for(fam, {"timestep_spacing": "trailing", "set_alpha_to_one": True}, pipe.denoiser.path,
                              pipe.denoiser.target)
    x_dz, _ = dz.sample(scheduler, NetworkModel(pipe.denoiser, cond), steps, x_T, {})
    x_dl = SAMPLERS["ddim"](pipe.denoiser, x_T, steps, **cond).x
    return float((x_dz - x_dl).abs().max())


# --- scoring ------------------------------------------------------------------------------------------------------
def fd_scorer(pipe) -> tuple[str, Callable[[torch.Tensor], float]]:
    """``(name, fd(samples))``: FD-<dataset> of samples to the run's data (module docstring)."""
    from difflab.data import load_dataset
    from difflab.metrics import frechet_distance

    cfg = pipe.config
    ds = load_dataset(cfg.data.name, None, 10000 if pipe.data_kind == "points" else cfg.data.n,
                      seed=cfg.train.seed + 1, **cfg.data.options)
    if pipe.data_kind == "points":
        return f"FD-{cfg.data.name} (raw)", lambda x: frechet_distance(x.double(), ds.x.double())
    from difflab.evaluation.features import feature_network

    net, _ = feature_network(cfg.data.name, ds.x, ds.y, pipe.num_classes or None)
    real = net.embed(ds.x)
    return f"FD-{cfg.data.name}", lambda x: frechet_distance(net.embed(x.float()), real)


def ensure_run(name: str, log, run: Optional[Path] = None) -> Path:
    """``run`` (default ``runs/bench/<name>``), trained with :data:`MODELS`'s config when it holds no checkpoint."""
    from difflab.cli import main

    run = RUNS_DIR / name if run is None else Path(run)
    if not (run / "checkpoints" / "latest.json").exists():
        config, overrides, _ = MODELS[name]
        log(f"  training {name} ({config})")
        if main(["train", config, "--out", str(run), "--quiet", "--overwrite", "--set", *overrides,
                 "train.sample_every=0"]) != 0:
            raise RuntimeError(f"training {name} failed")
    return run


def run_model(name: str, quick: bool, log, run_dir: Optional[Path] = None, nfes: Optional[tuple] = None,
              diffusers_too: bool = True) -> dict:
    from benchmarks import diffusers_bed as dz
    from difflab.pipeline import continuous_view, load_run
    from difflab.samplers import calibration as cal

    began = time.perf_counter()
    pipe = load_run(ensure_run(name, log, run_dir), device="cpu")
    den = continuous_view(pipe.denoiser)
    num = 64 if quick else MODELS[name][2]
    nfes = nfes or (QUICK_NFE if quick else NFE)
    headline_nfe = [n for n in HEADLINE_NFE if n in nfes]
    x_T, cond = cal.draw_batch(den.path, pipe.data_shape, num, SEED, pipe.num_classes)
    ref = cal.reference_solve(den, x_T, **cond)
    few = min(64, num)
    ref_half = cal.reference_solve(den, x_T[:few], rtol=cal.REFERENCE_RTOL / 2, **{k: v[:few] for k, v in cond.items()})
    fd_name, fd = fd_scorer(pipe)
    out = {"num": num, "seed": SEED, "data_shape": list(pipe.data_shape), "target": pipe.denoiser.target,
           "schedule": pipe.config.diffusion.schedule, "fd_name": fd_name,
           "reference": {"rtol": cal.REFERENCE_RTOL, "nfe": ref.nfe, "fd": fd(ref.x),
                         "rmse_vs_half_tolerance": cal.rmse_per_sample(ref_half.x, ref.x[:few])},
           "ddim_equality_max_abs": ddim_equality(pipe, x_T, cond)}
    log(f"  [{name}] reference {ref.nfe} NFE, own error {out['reference']['rmse_vs_half_tolerance']:.2g}; "
        f"DDIM difflab vs diffusers max |Δ| {out['ddim_equality_max_abs']:.2g}  [{time.perf_counter() - began:.0f}s]")

    calibrated, calibration = {}, {}
    for nfe in headline_nfe:
        entry = cal.calibrate(den, pipe.data_shape, nfe, num=64 if quick else CALIBRATION_NUM[name], seed=CALIBRATION_SEED,
                              heldout_seed=SEED, num_classes=pipe.num_classes,
                              max_seconds=20.0 if quick else CALIBRATION_SECONDS)
        calibrated[nfe] = torch.tensor(entry["grid"], dtype=torch.float64)
        calibration[str(nfe)] = {k: v for k, v in entry.items() if k != "grid"}
        log(f"  [{name}] calibrated {nfe} NFE: RMSE {entry['rmse']:.4f} (calibration batch), "
            f"{entry['heldout_rmse']:.4f} (held out); default grid {entry['default_rmse']:.4f} / "
            f"{entry['default_heldout_rmse']:.4f}  [{entry['seconds']:.0f}s]")
    out["calibration"] = calibration

    difflab = {}
    for label, fn in difflab_samplers(pipe, calibrated).items():
        points = []
        for nfe in nfes:
            start = time.perf_counter()
            result = fn(x_T, nfe, cond)
            if result is None:
                continue
            points.append({"target_nfe": nfe, "nfe": result.nfe, "rmse": cal.rmse_per_sample(result.x, ref.x),
                           "fd": fd(result.x), "wall_s": time.perf_counter() - start})
        difflab[label] = points
        log(f"  [{name}] difflab {label}: " + " ".join(f"{p['target_nfe']}:{p['rmse']:.4f}" for p in points))
    out["difflab"] = difflab

    families = {}
    for fam in dz.FAMILIES if diffusers_too else ():
        if not fam.deterministic:
            continue
        t0 = time.perf_counter()
        search = []
        for cfg in fam.configs(quick=True):
            for nfe in headline_nfe:
                entry = {"config": cfg, "label": dz.describe(fam, cfg), "target_nfe": nfe}
                try:
                    res = diffusers_run(fam, cfg, pipe, x_T, nfe, cond)
                except DIFFUSERS_ERRORS as err:
                    res, entry["error"] = None, f"{type(err).__name__}: {err}".splitlines()[0][:200]
                if res is not None:
                    entry.update(nfe=res[1], steps=res[2], rmse=cal.rmse_per_sample(res[0], ref.x))
                search.append(entry)
        best = {}
        for nfe in headline_nfe:
            ok = [e for e in search if e["target_nfe"] == nfe and "rmse" in e and math.isfinite(e["rmse"])]
            best[str(nfe)] = min(ok, key=lambda e: e["rmse"]) if ok else None
        sweep = {}
        for key, b in best.items():
            if b is None:
                continue
            points = []
            for nfe in nfes:
                try:
                    res = diffusers_run(fam, b["config"], pipe, x_T, nfe, cond)
                except DIFFUSERS_ERRORS:
                    res = None
                if res is not None:
                    points.append({"target_nfe": nfe, "nfe": res[1], "steps": res[2],
                                   "rmse": cal.rmse_per_sample(res[0], ref.x), "fd": fd(res[0])})
            sweep[f"best@{key}"] = {"config": b["config"], "label": b["label"], "points": points}
        families[fam.name] = {"configs_tried": len(fam.configs(quick=True)), "search": search, "best": best,
                              "sweep": sweep, "seconds": time.perf_counter() - t0}
        log(f"  [{name}] diffusers {fam.name}: best " + ", ".join(
            f"{n}: {b['rmse']:.4f} ({b['label']})" for n, b in best.items() if b) + f"  [{time.perf_counter() - t0:.0f}s]")
    out["diffusers"] = families
    out["headline"] = headline(out)
    out["seconds"] = time.perf_counter() - began
    return out


def headline(out: dict) -> list:
    """Per headline NFE: difflab's default (calibrated, and uncalibrated) vs diffusers' best configuration."""
    rows = []
    for nfe in HEADLINE_NFE:
        def at(points):
            return next((p for p in points if p["target_nfe"] == nfe), None)

        cands = [(fam, key, at(s["points"]), s["label"]) for fam, f in out["diffusers"].items()
                 for key, s in f["sweep"].items() if at(s["points"])]
        if not cands:
            continue
        fam, key, best, label = min(cands, key=lambda c: c[2]["rmse"])
        row = {"nfe": nfe, "diffusers_best": f"{fam} ({label})", "diffusers_rmse": best["rmse"],
               "diffusers_fd": best["fd"]}
        for name in ("default", "default, calibrated", "ddim", "heun"):
            p = at(out["difflab"].get(name, []))
            if p:
                row[f"{name}_rmse"], row[f"{name}_fd"] = p["rmse"], p["fd"]
                row[f"{name}_over_diffusers"] = p["rmse"] / best["rmse"]
        rows.append(row)
    return rows


def run(quick: bool = False, log=print, models=None, run_dir: Optional[Path] = None, nfes: Optional[tuple] = None,
        diffusers_too: bool = True) -> dict:
    import diffusers

    torch.set_num_threads(1)
    nfes = tuple(nfes or (QUICK_NFE if quick else NFE))
    result = {"diffusers_version": diffusers.__version__, "nfe": list(nfes), "quick": quick,
              "command": "python -m benchmarks.run --only trained --out benchmarks/results", "models": {}}
    for name in models or MODELS:
        result["models"][name] = run_model(name, quick, log, run_dir, nfes, diffusers_too)
    return result


def main(argv=None) -> int:
    """``python -m benchmarks.trained --model NAME --out DIR``: one model into ``DIR/trained-NAME.json`` (models can
    run in parallel; :func:`write_markdown` merges ``trained.json`` and every ``trained-*.json``)."""
    import argparse

    from benchmarks.common import machine_info, write_json

    parser = argparse.ArgumentParser(description="samplers on trained networks, one model")
    parser.add_argument("--model", choices=list(MODELS), required=True)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--quick", action="store_true", help="64 samples, NFE 10 and 20, short calibrations")
    parser.add_argument("--run", type=Path, default=None,
                        help=f"a trained run of the model's config to measure (default: {RUNS_DIR}/MODEL, trained "
                             "here with MODELS' settings when it holds no checkpoint)")
    parser.add_argument("--nfe", type=int, nargs="+", default=None, help=f"budgets to measure (default: {NFE})")
    parser.add_argument("--no-diffusers", action="store_true", help="difflab's samplers only (a quick check)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.quick, lambda msg: print(msg, flush=True), models=[args.model], run_dir=args.run,
                 nfes=args.nfe, diffusers_too=not args.no_diffusers)
    result["command"] = " ".join(["python -m benchmarks.trained", f"--model {args.model}", f"--out {args.out}"]
                                 + ([f"--run {args.run}"] if args.run else [])
                                 + (["--nfe", *map(str, args.nfe)] if args.nfe else [])
                                 + (["--quick"] if args.quick else []) + (["--no-diffusers"] if args.no_diffusers else []))
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / f"trained-{args.model}.json", {"machine": machine_info(), "quick": args.quick,
                                                         "seconds": time.perf_counter() - start, "result": result})
    write_markdown(args.out)
    return 0



# --- the report ------------------------------------------------------------------------------------------------------
def write_markdown(out: Path) -> Optional[Path]:
    """``OUT/trained.md`` from ``OUT/trained.json`` (if present): per model, the NFE × sampler table of RMSE to the
    reference (FD in brackets), difflab and each diffusers family's best configuration side by side."""
    import json

    records = [json.loads(p.read_text()) for p in sorted(Path(out).glob("trained*.json"))]
    records = [r for r in records if "models" in r.get("result", {})]
    if not records:
        return None
    lines = ["# Samplers on trained networks", "",
             "Every entry: RMSE per sample to the reference solve, and in brackets the samples' FD to the data. Same "
             "network, same x_T for every row. See benchmarks/trained.py.", ""]
    models = [(name, m, r) for r in records for name, m in r["result"]["models"].items()]
    for name, m, record in models:
        result = record["result"]
        ref = m["reference"]
        nfes = result["nfe"]
        lines += [f"## {name}", "",
                  f"Made by `{result['command']}` ({record['seconds']:.0f} s on the shared two-core machine; diffusers "
                  f"{result['diffusers_version']})."
                  + (f" The run was trained with the full config: `difflab train {MODELS[name][0]} --out RUN --set "
                     f"train.num_threads=1`." if " --run " in result["command"] else ""), "",
                  f"{m['num']} samples (x_T seed {m['seed']}), {m['schedule']} schedule, target `{m['target']}`. "
                  f"Reference: adaptive RK45 at rtol = atol = {ref['rtol']:g}, {ref['nfe']} NFE; its own RMSE to a "
                  f"solve at half the tolerance {ref['rmse_vs_half_tolerance']:.2g}; its {m['fd_name']} "
                  f"{ref['fd']:.4g}. DDIM, difflab vs diffusers on this network (the adapter's proof): max |Δ| = "
                  f"{m['ddim_equality_max_abs']:.2g}.", ""]
        lines += ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "| --- | " + " | ".join("---" for _ in nfes) + " |"]

        def cells(points):
            by = {p["target_nfe"]: p for p in points}
            return " | ".join(f"{by[n]['rmse']:.4f} ({by[n]['fd']:.3g})" if n in by and "fd" in by[n] else
                              (f"{by[n]['rmse']:.4f}" if n in by else "—") for n in nfes)

        for label, points in m["difflab"].items():
            lines.append(f"| difflab {label} | {cells(points)} |")
        for fam, f in m["diffusers"].items():
            for key, s in f["sweep"].items():
                lines.append(f"| diffusers {fam} {key} ({s['label']}) | {cells(s['points'])} |")
        lines += ["", "Calibration (`difflab calibrate`, calibration batch seed 0, held-out batch = the x_T above):", "",
                  "| NFE | calibrated: calibration batch | calibrated: held out | default grid: calibration | "
                  "default grid: held out | reference NFE | seconds |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for nfe, c in m["calibration"].items():
            lines.append(f"| {nfe} | {c['rmse']:.4f} | {c['heldout_rmse']:.4f} | {c['default_rmse']:.4f} | "
                         f"{c['default_heldout_rmse']:.4f} | {c['reference']['nfe']} | {c['seconds']:.0f} |")
        lines += ["", "Headline (difflab's default, calibrated and not, vs diffusers' best configuration at that NFE):",
                  "", "| NFE | diffusers best | its RMSE (FD) | default (FD) | ratio | calibrated default (FD) | ratio |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for row in m["headline"]:
            lines.append(
                f"| {row['nfe']} | {row['diffusers_best']} | {row['diffusers_rmse']:.4f} ({row['diffusers_fd']:.3g}) | "
                f"{row.get('default_rmse', float('nan')):.4f} ({row.get('default_fd', float('nan')):.3g}) | "
                f"{row.get('default_over_diffusers', float('nan')):.2f} | "
                f"{row.get('default, calibrated_rmse', float('nan')):.4f} "
                f"({row.get('default, calibrated_fd', float('nan')):.3g}) | "
                f"{row.get('default, calibrated_over_diffusers', float('nan')):.2f} |")
        lines.append("")
    path = Path(out) / "trained.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    raise SystemExit(main())
