"""difflab vs diffusers on the same exact model: exact KL at matched NFE, best configuration of each.

For each Gaussian bed (:mod:`benchmarks.beds`) and each headline NFE (10 and 20), every configuration in
:data:`benchmarks.diffusers_bed.FAMILIES` is run at the largest step count whose *counted* model calls fit
the NFE, and scored by the exact KL of its output (Monte Carlo for DDPM). The best configuration of each
scheduler at each NFE is then swept over a range of NFE, as are the scheduler's out-of-the-box defaults, and
every difflab sampler of :data:`benchmarks.samplers.DIFFLAB_SAMPLERS` runs at the headline NFEs on the same
model (its own NFE sweep is :mod:`benchmarks.accuracy`'s). Reported: KL and wall time per entry, and the ratio ``best difflab KL / best diffusers KL`` per NFE
(below 1 means difflab is more accurate). The best configurations are also run on the 2-D mixture bed
(sliced W2 with its data-vs-data floor).
"""

from __future__ import annotations

import time

import torch

from benchmarks import beds
from benchmarks import diffusers_bed as dz
from benchmarks.samplers import DIFFLAB_SAMPLERS, run_spec

HEADLINE_NFE = (10, 20)
SWEEP_NFE = (5, 6, 8, 10, 12, 15, 20, 30, 50)
QUICK_SWEEP_NFE = (10, 20)


def _diffusers_score(bed, fam, cfg, nfe, n_mc, generator, noise="sigma") -> dict:
    """Score one diffusers configuration at a budget of ``nfe`` model calls on a Gaussian bed."""
    try:
        scheduler = dz.make_scheduler(fam, cfg)
        steps = dz.steps_for_nfe(scheduler, nfe)
        if steps is None:
            return {"error": f"no step count fits {nfe} model calls"}
        model = dz.ExactEpsModel(bed, scheduler, noise)
        calls = []

        def run(z):
            x, n = dz.sample(scheduler, model, steps, z, cfg, None if fam.deterministic else generator)
            calls.append(n)
            return x

        score = beds.score_on_gaussian_bed(bed, run, fam.deterministic, 1.0, n_mc, generator)
        score.update(steps=steps, nfe=calls[-1])
        return score
    except (ValueError, IndexError, RuntimeError, ImportError, TypeError) as err:
        return {"error": f"{type(err).__name__}: {err}".splitlines()[0][:200]}


def _difflab_score(bed, spec, nfe, n_mc, generator) -> dict:
    path = beds.ddpm_path()
    prior_std = path.prior_std()
    nfe_used = []

    def run(x_T):
        out = run_spec(spec, bed, path, x_T, nfe, generator)
        nfe_used.append(out.nfe)
        return out.x

    score = beds.score_on_gaussian_bed(bed, run, spec.deterministic, prior_std, n_mc, generator)
    score["nfe"] = nfe_used[-1]
    return score


def _best(entries: list[dict]):
    ok = [e for e in entries if "kl" in e and e["kl"] == e["kl"]]
    return min(ok, key=lambda e: e["kl"]) if ok else None


def _mixture_sw2(bed, run_batch, n, generator) -> dict:
    start = time.perf_counter()
    x = run_batch(n)
    wall = time.perf_counter() - start
    out = beds.sliced_w2_with_floor(bed, x, generator)
    out["wall_s"] = wall
    return out


def run(quick: bool = False, log=print) -> dict:
    import diffusers

    gen = torch.Generator().manual_seed(0)
    n_mc = 2000 if quick else 10000
    sweep = QUICK_SWEEP_NFE if quick else SWEEP_NFE
    results = {"diffusers_version": diffusers.__version__, "headline_nfe": list(HEADLINE_NFE), "sweep_nfe": list(sweep),
               "n_monte_carlo": n_mc, "quick": quick, "beds": {}}
    best_cfgs_for_mixture: dict = {}
    gaussian_beds = dict(list(beds.GAUSSIAN_BEDS.items())[:1]) if quick else beds.GAUSSIAN_BEDS
    for bed_name, make_bed in gaussian_beds.items():
        bed = make_bed()
        path = beds.ddpm_path()
        bed_out = {"prior_floor_kl": beds.prior_floor_kl(bed, path),
                   "monte_carlo_floor_kl": beds.monte_carlo_kl_floor(bed, n_mc, gen),
                   "families": {}, "difflab": {}}
        # --- diffusers: search every configuration at the headline NFEs -----------------------------
        for fam in dz.FAMILIES:
            t0 = time.perf_counter()
            configs = fam.configs(quick)
            search = []
            for cfg in configs:
                for nfe in HEADLINE_NFE:
                    entry = {"config": cfg, "label": dz.describe(fam, cfg), "target_nfe": nfe}
                    entry.update(_diffusers_score(bed, fam, cfg, nfe, n_mc, gen))
                    search.append(entry)
            best_at = {nfe: _best([e for e in search if e["target_nfe"] == nfe]) for nfe in HEADLINE_NFE}
            # --- sweep the best configurations and the defaults over NFE ---------------------------------
            curves = {}
            to_sweep = {"defaults": {}}
            for nfe, b in best_at.items():
                if b is not None:
                    to_sweep[f"best@{nfe}"] = b["config"]
            for key, cfg in to_sweep.items():
                curves[key] = {"config": cfg, "label": dz.describe(fam, cfg),
                               "points": [dict(target_nfe=n, **_diffusers_score(bed, fam, cfg, n, n_mc, gen)) for n in sweep]}
            # the model given σ from the timestep alone, for the best configurations (a consistency check)
            timestep_mode = {nfe: _diffusers_score(bed, fam, b["config"], nfe, n_mc, gen, noise="timestep")
                             for nfe, b in best_at.items() if b is not None}
            bed_out["families"][fam.name] = {
                "class": fam.cls_name, "configs_tried": len(configs), "deterministic": fam.deterministic,
                "errors": sum("error" in e for e in search), "search": search,
                "best": {str(n): b for n, b in best_at.items()}, "curves": curves,
                "best_with_timestep_noise": {str(n): v for n, v in timestep_mode.items()},
                "seconds": time.perf_counter() - t0,
            }
            if bed_name == "gauss16-cond1e2":
                best_cfgs_for_mixture[fam.name] = {n: b["config"] for n, b in best_at.items() if b is not None}
            msg = ", ".join(f"{n}: {b['kl']:.3g} ({b['label']})" for n, b in best_at.items() if b is not None)
            log(f"  [{bed_name}] {fam.name}: {len(configs)} configs, best KL {msg}  [{time.perf_counter() - t0:.0f}s]")
        # --- difflab at the same NFEs (its full NFE sweep is benchmarks.accuracy's) ---------------------
        for spec in DIFFLAB_SAMPLERS:
            bed_out["difflab"][spec.name] = {"deterministic": spec.deterministic, "points": [
                dict(target_nfe=n, **_difflab_score(bed, spec, n, n_mc, gen)) for n in HEADLINE_NFE]}
        # --- the headline comparison ------------------------------------------------------------------
        table = []
        for nfe in HEADLINE_NFE:
            dl = _best([dict(p, name=name) for name, d in bed_out["difflab"].items() for p in d["points"]
                        if p["target_nfe"] == nfe])
            fams = {name: f["best"][str(nfe)] for name, f in bed_out["families"].items() if f["best"][str(nfe)]}
            dz_best_name = min(fams, key=lambda k: fams[k]["kl"])
            row = {"nfe": nfe, "difflab_best": dl["name"], "difflab_kl": dl["kl"], "difflab_nfe": dl["nfe"],
                   "difflab_wall_s": dl["wall_s"], "diffusers_best": dz_best_name,
                   "diffusers_best_label": fams[dz_best_name]["label"], "diffusers_kl": fams[dz_best_name]["kl"],
                   "diffusers_nfe": fams[dz_best_name]["nfe"], "diffusers_wall_s": fams[dz_best_name]["wall_s"],
                   "kl_ratio_difflab_over_diffusers": dl["kl"] / fams[dz_best_name]["kl"],
                   "per_family": {k: {"kl": v["kl"], "nfe": v["nfe"], "label": v["label"],
                                      "ratio_difflab_over_family": dl["kl"] / v["kl"]} for k, v in fams.items()}}
            table.append(row)
            log(f"  [{bed_name}] NFE {nfe}: difflab {dl['name']} KL {dl['kl']:.3g} vs diffusers {dz_best_name} "
                f"({fams[dz_best_name]['label']}) KL {fams[dz_best_name]['kl']:.3g}: ratio {row['kl_ratio_difflab_over_diffusers']:.3g}")
        bed_out["headline"] = table
        results["beds"][bed_name] = bed_out
    results["mixture"] = _mixture_side_by_side(best_cfgs_for_mixture, quick, gen)
    return results


def _mixture_side_by_side(best_cfgs: dict, quick: bool, gen: torch.Generator) -> dict:
    """Sliced W2 on the 2-D mixture for the best diffusers configurations and every difflab sampler."""
    n = 500 if quick else 4000
    out = {}
    for bed_name, make_bed in beds.MIXTURE_BEDS.items():
        bed = make_bed()
        path = beds.ddpm_path()
        rows = []
        for fam in dz.FAMILIES:
            for nfe, cfg in best_cfgs.get(fam.name, {}).items():
                scheduler = dz.make_scheduler(fam, cfg)
                steps = dz.steps_for_nfe(scheduler, nfe)
                model = dz.ExactEpsModel(bed, scheduler)

                def batch(m, scheduler=scheduler, model=model, steps=steps, cfg=cfg, fam=fam):
                    z = torch.randn(m, bed.D, generator=gen, dtype=torch.float64)
                    return dz.sample(scheduler, model, steps, z, cfg, None if fam.deterministic else gen)[0]

                rows.append(dict(library="diffusers", name=fam.name, label=dz.describe(fam, cfg), nfe=nfe,
                                 **_mixture_sw2(bed, batch, n, gen)))
        for spec in DIFFLAB_SAMPLERS:
            for nfe in HEADLINE_NFE:
                def batch(m, spec=spec, nfe=nfe):
                    x_T = path.prior_sample((m, bed.D), gen, dtype=torch.float64)
                    return run_spec(spec, bed, path, x_T, nfe, gen).x

                rows.append(dict(library="difflab", name=spec.name, label="", nfe=nfe, **_mixture_sw2(bed, batch, n, gen)))
        out[bed_name] = {"n": n, "rows": rows}
    return out
