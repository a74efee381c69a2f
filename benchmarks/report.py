"""The markdown summary ``README.md`` and its plots, from the JSON files :mod:`benchmarks.run` wrote.

Every number in the summary is read from those JSON files; the plots are matplotlib on the Agg canvas
(object API, no pyplot). Ratios are ``difflab / diffusers`` measured in the same run (below 1: difflab is
more accurate or faster), so the shared machine's load cancels to first order.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

from benchmarks.common import read_json

KL_TARGET_RATIO = 0.5  # issue 4: best difflab KL at most half the best diffusers KL at 10 and 20 NFE
OVERHEAD_TARGET_RATIO = 0.5  # issue 4: per-step overhead at most half of diffusers'
THROUGHPUT_TARGET_RATIO = 1.3  # digits U-Net training throughput at least 1.3x UNet2DModel's
RSS_TARGET_MIB = 1.5 * 1024  # peak RSS of `difflab train` on the digits config
INTEROP_TARGET_RATIO = 0.5  # issue 19: difflab's default at 10 NFE at most half the RMSE of the pipeline's default


def _num(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, str):
        return v
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}" if 1e-3 <= abs(v) < 1e5 else f"{v:.{max(digits - 1, 1)}e}"


def _table(header: list, rows: list) -> list:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out + [""]


def _figure(width=6.4, height=4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path)
    return path.name


def _load(out: Path, name: str) -> Optional[dict]:
    path = out / f"{name}.json"
    return read_json(path) if path.exists() else None


# --- sections ---------------------------------------------------------------------------------------------
def _machine(records: dict) -> list:
    any_record = next(r for r in records.values() if r is not None)
    m = any_record["machine"]
    v = m["versions"]
    lines = ["## Machine and versions", ""]
    lines += [f"- CPU: {m['cpu']} ({m['logical_cpus']} logical CPUs; torch uses {m['torch_threads']} threads); "
              f"memory {m['memory_gib']} GiB; GPU: {m['cuda'] or 'none'}",
              f"- {m['platform']}; " + ", ".join(f"{k} {val}" for k, val in v.items() if val),
              f"- measured {m['time_utc']} UTC; 1-minute load average at the start of the last module "
              f"{_num(m['load_average_1min'])}. The machine is shared: absolute times are noisy, the ratios are "
              "taken in the same run (interleaved, best or median of repeats) so contention cancels to first order.",
              "- per module: " + ", ".join(f"{k} {r['seconds']:.0f} s{' (quick)' if r['quick'] else ''}"
                                          for k, r in records.items() if r is not None), ""]
    return lines


def _headline(sbs: dict, out: Path) -> list:
    res = sbs["result"]
    if "skipped" in res:
        return ["## Side by side with diffusers", "", f"Skipped: {res['skipped']}", ""]
    lines = ["## Side by side with diffusers (issue 4 target)", "",
             f"diffusers {res['diffusers_version']}. The same exact ε-model of each 16-D Gaussian bed (random rotation, "
             "eigenvalues log-spread over the stated condition number) on the DDPM linear schedule (T = 1000) drives "
             "every diffusers scheduler over its documented options (timestep spacing, Karras / exponential / β sigmas, "
             "`use_lu_lambdas`, final sigmas type, solver order and type, lower-order final, ...; "
             "`benchmarks/diffusers_bed.py`) and every difflab sampler. NFE is matched on counted model calls. "
             "KL is the exact KL of the output distribution in nats (deterministic samplers; Monte Carlo for DDPM). "
             "The *prior floor* is the KL left by the exact flow started from N(0, I) at t = T instead of p_T; a "
             "sampler that starts its first step from λ = −∞ (difflab's DEIS) is not bound by it: the fitted grids balance "
             "that first step's error, the discretisation error and the final x̂0 step's error against each other. On "
             "Gaussian data a deterministic sampler acts per eigen-direction, so a grid fit on a family covering the "
             "eigenvalue range carries to any bed inside it; the 2-D mixture table below shows the non-Gaussian case, "
             "where such sub-floor numbers do not apply.",
             "", "difflab's default for a budget of NFE evaluations is DEIS (order "
             "`time_grids.DEIS_ORDER`) on `default_grid(path, nfe, 'deis')`: noise levels fit by "
             "`python -m benchmarks.fit_grids` on a family of 1-D Gaussians (variances over 10^±2.2, means 0 and 0.5) "
             "— not on these beds.", ""]
    for bed_name, bed in res["beds"].items():
        lines += [f"### {bed_name} (prior floor {_num(bed['prior_floor_kl'])} nats)", ""]
        rows = []
        for row in bed["headline"]:
            met = row["kl_ratio_difflab_over_diffusers"] <= KL_TARGET_RATIO
            rows.append([row["nfe"], f"{row['difflab_best']} ({row['difflab_nfe']})", _num(row["difflab_kl"]),
                         f"{row['diffusers_best']}: {row['diffusers_best_label']} ({row['diffusers_nfe']})",
                         _num(row["diffusers_kl"]), _num(row["kl_ratio_difflab_over_diffusers"]),
                         "yes" if met else "**no**", _num(row["difflab_wall_s"] / max(row["diffusers_wall_s"], 1e-12))])
        lines += _table(["NFE", "best difflab (NFE used)", "KL", "best diffusers configuration (NFE used)", "KL",
                         "KL ratio", "≤ ½?", "wall-time ratio"], rows)
        default_rows = []
        for row in bed["headline"]:
            d = bed["difflab"].get("deis optimised (default)")
            if d:
                p = next(p for p in d["points"] if p["target_nfe"] == row["nfe"])
                default_rows.append(f"NFE {row['nfe']}: default KL {_num(p['kl'])} "
                                    f"({'the winner' if row['difflab_best'] == 'deis optimised (default)' else 'not the winner'})")
        lines += ["difflab's default: " + "; ".join(default_rows) + ".", ""]
        fam_rows = []
        for name, fam in bed["families"].items():
            cells = [name, fam["configs_tried"], fam["errors"]]
            for nfe in res["headline_nfe"]:
                b = fam["best"].get(str(nfe))
                d = fam["curves"]["defaults"]["points"]
                dflt = next((p for p in d if p["target_nfe"] == nfe), {})
                cells += [_num(dflt.get("kl")), (f"{_num(b['kl'])} ({b['label']})" if b else "—")]
            fam_rows.append(cells)
        header = ["scheduler", "configs", "errors"]
        for nfe in res["headline_nfe"]:
            header += [f"defaults KL @{nfe}", f"best KL @{nfe} (options)"]
        lines += ["Every diffusers scheduler, its out-of-the-box defaults and its best options:", ""]
        lines += _table(header, fam_rows)
        name = _plot_side_by_side(bed_name, bed, res, out)
        lines += [f"![KL vs NFE on {bed_name}]({name})", ""]
    mixture = res.get("mixture", {})
    for bed_name, mix in mixture.items():
        lines += [f"### {bed_name}: sliced W2 (n = {mix['n']}) of the best configurations", ""]
        rows = [[r["library"], r["name"], r["label"] or "", r["nfe"], _num(r["sw2"]), _num(r["floor"]),
                 _num(r["wall_s"])] for r in mix["rows"] if r["library"] == "diffusers" or r["name"].startswith("deis")
                or "default" in r["name"]]
        lines += _table(["library", "sampler", "options", "NFE", "sliced W2", "data-vs-data floor", "wall s"], rows)
    return lines


def _plot_side_by_side(bed_name: str, bed: dict, res: dict, out: Path) -> str:
    fig = _figure(9.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    for name, fam in bed["families"].items():
        if not fam["deterministic"]:
            continue
        curve = fam["curves"].get("best@20") or fam["curves"].get("best@10")
        if curve is None:
            continue
        pts = [p for p in curve["points"] if "kl" in p]
        ax.plot([p["nfe"] for p in pts], [p["kl"] for p in pts], "--", marker=".", alpha=0.7,
                label=f"diffusers {name} (best@20)")
    acc = _load(out, "accuracy")
    dl = acc["result"]["gaussian"].get(bed_name, {}).get("samplers", {}) if acc and "gaussian" in acc["result"] else {}
    for name in ("deis optimised (default)", "deis logSNR", "dpmpp2m logSNR", "heun logSNR"):
        if name in dl:
            pts = [p for p in dl[name]["points"] if "kl" in p]
            ax.plot([p["nfe"] for p in pts], [p["kl"] for p in pts], "-", marker="o", lw=2 if "default" in name else 1.2,
                    label=f"difflab {name}")
    ax.axhline(bed["prior_floor_kl"], color="grey", lw=0.8, ls=":", label="prior floor (N(0, I) at t = T)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("network evaluations (NFE)")
    ax.set_ylabel("exact KL(output ‖ data) [nats]")
    ax.set_title(f"{bed_name}: difflab vs diffusers on the exact model")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, out / f"kl_vs_nfe_{bed_name}.png")


def _accuracy(acc: dict, out: Path) -> list:
    res = acc["result"]
    lines = ["## Sampler accuracy per NFE (every difflab sampler)", "",
             "Exact beds, exact ε-model on the DDPM linear schedule (T = 1000). Gaussian beds: exact KL for deterministic "
             f"samplers, Monte-Carlo KL of a Gaussian fit to {res['n_monte_carlo']} samples for stochastic ones (its "
             "noise floor: the same estimate on as many data samples). `(pipeline)` samplers run as `difflab sample "
             "--sampler NAME` runs them. NFE columns are budgets; each cell is the KL at the NFE the sampler counted "
             "(≤ budget).", ""]
    for bed_name, bed in res["gaussian"].items():
        lines += [f"### {bed_name}: eigenvalues {_num(bed['eigenvalues'][0])}–{_num(bed['eigenvalues'][1])}; prior floor "
                  f"{_num(bed['prior_floor_kl'])}; Monte-Carlo floor {_num(bed['monte_carlo_floor_kl'])}", ""]
        rows = []
        for name, s in bed["samplers"].items():
            rows.append([name + ("" if s["deterministic"] else " (MC)")] + [_num(p["kl"]) for p in s["points"]])
        lines += _table(["sampler"] + [str(n) for n in res["nfe"]], rows)
        fig = _figure(9.5, 4.8)
        ax = fig.add_subplot(1, 1, 1)
        for name, s in bed["samplers"].items():
            if not s["deterministic"] or "uniform-t" in name:
                continue
            ax.plot([p["nfe"] for p in s["points"]], [p["kl"] for p in s["points"]], marker=".",
                    lw=2.2 if "default" in name else 1.0, label=name)
        ax.axhline(bed["prior_floor_kl"], color="grey", lw=0.8, ls=":", label="prior floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("network evaluations (NFE)")
        ax.set_ylabel("exact KL(output ‖ data) [nats]")
        ax.set_title(f"difflab deterministic samplers on {bed_name}")
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        lines += [f"![difflab samplers on {bed_name}]({_save(fig, out / f'accuracy_{bed_name}.png')})", ""]
    for bed_name, mix in res["mixture"].items():
        nfes = [p["target_nfe"] for p in next(iter(mix["samplers"].values()))["points"]]
        floor = next(iter(mix["samplers"].values()))["points"][0]["floor"]
        lines += [f"### {bed_name}: sliced W2 of n = {mix['n']} samples (data-vs-data floor ≈ {_num(floor)})", ""]
        rows = [[name] + [_num(p["sw2"]) for p in s["points"]] for name, s in mix["samplers"].items()]
        lines += _table(["sampler"] + [str(n) for n in nfes], rows)
    return lines


def _exact_stochastic(ex: dict, acc: Optional[dict]) -> list:
    """Exact KL of the stochastic samplers (:mod:`benchmarks.exact_stochastic`), beside the accuracy benchmark's
    Monte-Carlo estimate at the same NFE where it has one."""
    res = ex["result"]
    mc = acc["result"]["gaussian"] if acc and "gaussian" in acc["result"] else {}
    lines = ["## Stochastic samplers: exact KL (no sampling noise)", "",
             "Every DDPM, DDIM (η = 1), Euler–Maruyama and ancestral step on a Gaussian bed is affine in the state plus "
             "independent Gaussian noise, so the output law is Gaussian and `difflab.testbeds.chain_pushforward` "
             "propagates it exactly from N(0, s_T² I). Cells: exact KL(output ‖ data) in nats; in brackets the "
             "Monte-Carlo KL that the accuracy section reports at the same NFE (a Gaussian fit to "
             f"{acc['result']['n_monte_carlo'] if acc else '—'} samples, whose own floor is given there).", ""]
    for bed_name, bed in res["gaussian"].items():
        lines += [f"### {bed_name}: prior floor {_num(bed['prior_floor_kl'])}"
                  + (f"; Monte-Carlo floor {_num(mc[bed_name]['monte_carlo_floor_kl'])}" if bed_name in mc else ""), ""]
        rows = []
        for name, s in bed["samplers"].items():
            mc_points = {p["target_nfe"]: p["kl"] for p in mc.get(bed_name, {}).get("samplers", {}).get(name, {})
                         .get("points", [])}
            rows.append([name] + [_num(p["kl"]) + (f" ({_num(mc_points[p['steps']])})" if p["steps"] in mc_points else "")
                                  for p in s["points"]])
        lines += _table(["sampler (steps →)"] + [str(n) for n in res["steps"]], rows)
    return lines


def _overhead(ov: dict, out: Path) -> list:
    res = ov["result"]
    lines = ["## Sampler overhead (time outside the network)", "",
             f"Zero network, batch {res['batch']} × {res['dim']}, {res['nfe']} evaluations, {res['threads']} torch "
             "thread(s); whole sampling call (grid / `set_timesteps` included) divided by the counted NFE; difflab and "
             "diffusers alternate round by round, fastest round of each (the least-disturbed on a shared machine).", ""]
    rows = [[r["sampler"], r["diffusers_class"], _num(r["difflab_s_per_eval"] * 1e6), _num(r["diffusers_s_per_eval"] * 1e6),
             _num(r["ratio_difflab_over_diffusers"]), "yes" if r["ratio_difflab_over_diffusers"] <= OVERHEAD_TARGET_RATIO
             else "**no**"] for r in res["per_eval"]]
    lines += _table(["sampler", "diffusers class", "difflab µs/eval", "diffusers µs/eval", "ratio", "≤ ½?"], rows)
    bd = res.get("breakdown")
    if bd:
        lines += ["Where difflab's overhead goes (zero network, float32 state, continuous DDPM path, best of "
                  "repeats). Samplers call the denoiser at one time shared by the batch: the path's coefficients are "
                  "memoised scalars and the prediction stays in its linear form `x̂0 = p x + q u`, `ε̂ = p' x + q' u` "
                  "(SPEC §4), so an update `c_x x + c_0 x̂0 + c_ε ε̂` is two tensor operations; a per-sample time "
                  "takes the elementwise path. Grids are memoised per path and arguments, like the coefficients "
                  "(`tabulate`), so a repeated solve pays neither again.", ""]
        lines += _table(["part", "µs"], [[k.removesuffix("_s").replace("_", " "), _num(v * 1e6)] for k, v in bd.items()])
    tvn = res.get("total_vs_network", {})
    if "rows" in tvn:
        lines += [f"Total DDIM sampling time vs NFE × one forward pass of {tvn['network']} ({tvn['parameters']} "
                  f"parameters, batch {tvn['batch']}, forward {_num(tvn['forward_s'] * 1e3)} ms):", ""]
        lines += _table(["NFE", "total s", "NFE × forward s", "ratio"],
                        [[r["nfe"], _num(r["total_s"]), _num(r["nfe_x_forward_s"]), _num(r["ratio_total_over_nfe_x_forward"])]
                         for r in tvn["rows"]])
    return lines


def _interop(rec: dict) -> list:
    res = rec["result"]
    if "skipped" in res:
        return ["## difflab in diffusers' pipeline loop", "", f"Skipped: {res['skipped']}", ""]
    m, ref, tr = res["model"], res["reference"], res["training"]
    lines = ["## difflab in diffusers' pipeline loop (issue 19 target)", "",
             f"diffusers {res['diffusers_version']}. A `UNet2DModel` ({m['parameters']} parameters, "
             f"{m['prediction_type']}, {m['beta_schedule']} β, T = {m['num_train_timesteps']}) trained the diffusers way "
             f"for {tr['steps']} steps on {m['data']} (final loss {_num(tr['final_loss_mean_last_100'])}); {res['batch']} "
             "samples from the same noise through diffusers' own loop with each scheduler "
             "(`benchmarks/interop.py`). RMSE to a reference solve: difflab's adaptive Dormand–Prince at "
             f"rtol = atol = {ref['rtol']:g} ({ref['nfe']} NFE; at 10× the tolerance it moves by "
             f"{_num(ref['rmse_of_10x_tolerance'])}; DDIM with all 1000 integer timesteps is "
             f"{_num(ref['rmse_of_ddim_1000_integer_steps'])} from it).", ""]
    lines += _table(["NFE", "scheduler", "model calls", "RMSE to reference"],
                    [[r["nfe"], r["label"] + ("" if r["deterministic"] else " (stochastic: not an ODE solver)"),
                      r["calls"], _num(r["rmse"])] for r in res["rows"]])
    lines += ["difflab's default (`DifflabScheduler()`, DEIS on its optimised grid) against each deterministic pipeline "
              "default:", ""]
    lines += _table(["NFE", "diffusers scheduler", "diffusers RMSE", "difflab RMSE", "ratio", f"≤ {INTEROP_TARGET_RATIO}?"],
                    [[h["nfe"], h["diffusers"], _num(h["diffusers_rmse"]), _num(h["difflab_rmse"]),
                      _num(h["ratio_difflab_over_diffusers"]),
                      "yes" if h["ratio_difflab_over_diffusers"] <= INTEROP_TARGET_RATIO else "**no**"]
                     for h in res["headline"]])
    same = max(r["max_abs_diff_to_difflab_sampler"] for r in res["rows"] if r["library"] == "difflab")
    lines += [f"In the loop, `DifflabScheduler` returns difflab's own sampler's samples (largest difference {_num(same)}: "
              "the loop hands back float32 latents, the sampler keeps float64).", ""]
    return lines


def _thread_runs(res: dict) -> list:
    """The per-thread-count measurements (older results hold a single one at the top level)."""
    return list(res["by_threads"].values()) if "by_threads" in res else [res]


def _training(tr: dict) -> list:
    res = tr["result"]
    lines = ["## Training throughput and memory", "",
             f"One step = forward + backward + AdamW ({res.get('optimizer', 'torch AdamW')}) on the ε-MSE; each "
             f"measurement in its own process (its own peak RSS), {res['steps_timed']} timed steps, best of "
             f"{res['repeats']} interleaved repeats; every model at 1 torch thread and at every core of the machine.", ""]
    if tr.get("quick"):
        lines += ["*Quick run: so few timed steps that the ratios below swing by ±20 % between runs; the full "
                  "`make bench` measurement is the one to quote.*", ""]
    rows = []
    for run in _thread_runs(res):
        for key in ("mlp", "unet", "unet_mnist", "diffusers_unet", "diffusers_unet_mnist"):
            r = run.get(key)
            if not r:
                continue
            if "error" in r:
                rows.append([key, run["threads"], "", "", r["error"], "", ""])
                continue
            spec = r.get("spec", {})
            rows.append([key, run["threads"], spec.get("source", "UNet2DModel " + str({k: v for k, v in spec.items()})),
                         r.get("data_shape", spec.get("data_shape")), r.get("batch", spec.get("batch")), r["params"],
                         _num(r["samples_per_s"]), _num(r["peak_rss_mib"])])
    lines += _table(["model", "threads", "config", "data shape", "batch", "parameters", "samples/s", "peak RSS MiB"], rows)
    for run in _thread_runs(res):
        for key in ("unet_throughput_ratio_difflab_over_diffusers", "unet_mnist_throughput_ratio_difflab_over_diffusers"):
            if key in run:
                model = run[key.split("_throughput")[0]]["spec"].get("source", key)
                lines += [f"- {run['threads']} thread(s), {model} U-Net / UNet2DModel training throughput: "
                          f"**{run[key]:.3f}** (target ≥ {THROUGHPUT_TARGET_RATIO}; parameter ratio "
                          f"{_num(run.get(key.replace('throughput', 'param')))})"]
    pm = res.get("train_peak_memory", {})
    if pm and "peak_rss_mib" in pm:
        lines += [f"- `{pm['command']}`: peak RSS **{_num(pm['peak_rss_mib'])} MiB** (target ≤ {RSS_TARGET_MIB:.0f} MiB), "
                  f"{pm['steps']} steps in {_num(pm['wall_s'])} s, exit code {pm['exit_code']}"]
    for gpu in res.get("gpu", []):
        lines += [f"- {gpu}"]
    if not res.get("gpu") and not res.get("cuda"):
        lines += ["- GPU: none was available to this run, so bf16 GPU throughput is not measured here (the worker "
                  "runs under bf16 autocast and reports peak CUDA memory when CUDA is present)."]
    return lines + [""]


def _targets(records: dict) -> list:
    """One line per target of issues 4 and 6, met or not, from the numbers below it."""
    lines = ["## Targets at a glance", ""]
    sbs = records.get("side_by_side")
    if sbs and "beds" in sbs["result"]:
        for bed_name, bed in sbs["result"]["beds"].items():
            for row in bed["headline"]:
                ok = row["kl_ratio_difflab_over_diffusers"] <= KL_TARGET_RATIO
                winner = row["difflab_best"] == "deis optimised (default)"
                lines.append(f"- {bed_name}, NFE {row['nfe']}: difflab {row['difflab_best']} KL {_num(row['difflab_kl'])} vs "
                             f"diffusers {row['diffusers_best']} ({row['diffusers_best_label']}) KL {_num(row['diffusers_kl'])}: "
                             f"ratio {_num(row['kl_ratio_difflab_over_diffusers'])} — {'met' if ok else '**not met**'} "
                             f"(≤ {KL_TARGET_RATIO}); default grid {'is' if winner else '**is not**'} the winner")
    ov = records.get("overhead")
    if ov and "per_eval" in ov["result"]:
        for r in ov["result"]["per_eval"]:
            ok = r["ratio_difflab_over_diffusers"] <= OVERHEAD_TARGET_RATIO
            lines.append(f"- per-step overhead, {r['sampler']}: ratio {_num(r['ratio_difflab_over_diffusers'])} — "
                         f"{'met' if ok else '**not met**'} (≤ {OVERHEAD_TARGET_RATIO})")
    tr = records.get("training")
    if tr:
        res = tr["result"]
        for run in _thread_runs(res):
            for key in ("unet", "unet_mnist"):
                ratio = run.get(f"{key}_throughput_ratio_difflab_over_diffusers")
                if ratio is not None:
                    lines.append(f"- training throughput, {run['threads']} thread(s), {run[key]['spec'].get('source', key)} "
                                 f"U-Net vs UNet2DModel: ratio {ratio:.3f} — "
                                 f"{'met' if ratio >= THROUGHPUT_TARGET_RATIO else '**not met**'} (≥ {THROUGHPUT_TARGET_RATIO})")
        pm = res.get("train_peak_memory", {})
        if "peak_rss_mib" in pm:
            lines.append(f"- peak RSS of `{pm['command']}`: {_num(pm['peak_rss_mib'])} MiB — "
                         f"{'met' if pm['peak_rss_mib'] <= RSS_TARGET_MIB and pm['exit_code'] == 0 else '**not met**'} "
                         f"(≤ {RSS_TARGET_MIB:.0f} MiB)")
    inter = records.get("interop")
    if inter and "headline" in inter["result"]:
        for h in inter["result"]["headline"]:
            if h["nfe"] == 10:
                ok = h["ratio_difflab_over_diffusers"] <= INTEROP_TARGET_RATIO
                lines.append(f"- diffusers UNet at 10 NFE, difflab default vs {h['diffusers']}: RMSE ratio "
                             f"{_num(h['ratio_difflab_over_diffusers'])} — {'met' if ok else '**not met**'} "
                             f"(≤ {INTEROP_TARGET_RATIO})")
    return lines + [""]


def write(out: Path) -> Path:
    out = Path(out)
    records = {name: _load(out, name) for name in ("accuracy", "exact_stochastic", "side_by_side", "overhead",
                                                   "training", "interop")}
    lines = ["# difflab benchmarks", "",
             "Written by `python -m benchmarks.run` (`make bench`; `make bench-quick` for the two-minute version). "
             "JSON files beside this one hold every number.", ""]
    if any(r and r["quick"] for r in records.values()):
        lines += ["**Some sections below come from `--quick` runs (fewer NFEs, configurations and repeats).**", ""]
    lines += _targets(records)
    if records["side_by_side"]:
        lines += _headline(records["side_by_side"], out)
    if records["overhead"]:
        lines += _overhead(records["overhead"], out)
    if records["training"]:
        lines += _training(records["training"])
    if records["interop"]:
        lines += _interop(records["interop"])
    if records["accuracy"]:
        lines += _accuracy(records["accuracy"], out)
    if records["exact_stochastic"]:
        lines += _exact_stochastic(records["exact_stochastic"], records["accuracy"])
    if any(records.values()):
        lines += _machine({k: v for k, v in records.items() if v is not None})
    path = out / "README.md"
    path.write_text("\n".join(lines))
    from benchmarks.trained import write_markdown

    write_markdown(out)  # trained.md, from trained.json (samplers on trained networks)
    return path
