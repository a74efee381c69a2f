"""``difflab nll RUN_DIR``: negative log-likelihood in bits/dim on held-out data (SPEC §3, §6).

Two estimates of the same model, side by side:

- ``--method elbo``: the discrete variational bound summed over all ``T`` terms (:func:`difflab.elbo.elbo_terms`,
  SPEC §3): an upper bound on ``−log p``; it needs a run in discrete DDPM time.
- ``--method ode``: the probability-flow ODE's exact log-likelihood (:func:`difflab.likelihood.ode_log_likelihood`,
  SPEC §6), for any run (a DDPM-time model through :class:`~difflab.paths.DiscreteTimeContinuation`).
  Divergence exact (default for ``D ≤ 16``) or Hutchinson with ``--probes K``.

Bits/dim: for 8-bit images scaled to ``[−1, 1]`` the ELBO uses the discretised decoder on 256 bins and the
ODE the uniformly dequantised density ``y = x + u``, ``u ~ U[−1/255, 1/255)`` (:func:`difflab.likelihood.ode_bits_per_dim`),
both upper bounds on the discrete model's bits/dim. For 2-D points both are the continuous density in bits
(no bins): ``−log p / (D ln 2)``. The ± is the standard error of the mean over the examples.

Held-out data: for a generated 2-D set, fresh draws from a seed the run never used; for any other set, the
examples outside the run's training subset (or the training data itself when the run used every example —
the output says so).
"""

from __future__ import annotations

import argparse
import math
from typing import Optional

from difflab.commands import arguments

GENERATED_SETS = ("two_moons", "swiss_roll", "eight_gaussians", "checkerboard", "mixture")
"""Data sets drawn by a seeded generator (:mod:`difflab.data.toy2d`): held-out data is a fresh draw."""
EXACT_DIVERGENCE_MAX_DIM = 16
"""Above this many dimensions the default divergence is Hutchinson with :data:`DEFAULT_PROBES` probes."""
DEFAULT_PROBES = 4
MAX_PROBES = 1024
HELD_OUT_SEED_OFFSET = 1_000_003
"""Added to the run's seed for fresh 2-D draws, so held-out points never coincide with the training draw."""

EXAMPLES = """
examples:
  difflab nll runs/digits8 --method elbo --num 256
  difflab nll runs/digits8 --method ode --probes 4 --num 256
  difflab nll runs/moons --method ode --num 1000 --seed 1
  difflab nll runs/moons --method ode --solver rk4 --steps 50
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'difflab train'")
    p.add_argument("--method", choices=("elbo", "ode"), default="ode", help="estimator (default: ode)")
    p.add_argument("--num", type=arguments.count, default=256, help="held-out examples (default: 256)")
    p.add_argument("--seed", type=arguments.seed, default=0, help="which held-out examples, dequantisation and probes (default: 0)")
    p.add_argument("--probes", type=arguments.bounded_int(0, MAX_PROBES), default=None, metavar="K",
                   help=f"Hutchinson probes for the ODE divergence; 0 = exact (default: exact for D <= "
                        f"{EXACT_DIVERGENCE_MAX_DIM}, else {DEFAULT_PROBES})")
    p.add_argument("--probe", choices=("rademacher", "gaussian"), default="rademacher", help="Hutchinson probe kind")
    p.add_argument("--solver", choices=("rk45", "rk4", "heun", "euler"), default="rk45",
                   help="ODE solver (default: adaptive rk45)")
    p.add_argument("--steps", type=arguments.steps, default=100, help="steps of a fixed-step --solver (default: 100)")
    p.add_argument("--rtol", type=arguments.positive_float, default=1e-5, help="rk45 relative tolerance (default: 1e-5)")
    p.add_argument("--atol", type=arguments.positive_float, default=1e-5, help="rk45 absolute tolerance (default: 1e-5)")
    p.add_argument("--batch-size", type=arguments.count, default=256, help="examples per batch (default: 256)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--data", metavar="PATH", default=None,
                   help="your copy of the run's data, for runs trained on your own files (a run's stored path is never read)")
    p.add_argument("--device", type=arguments.device, default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def held_out_data(cfg, num: int, seed: int, data_path: Optional[str] = None):
    """``(x, y, note)``: ``num`` examples of the run's data set it did not train on (module docstring); data the
    run read from files comes from ``data_path`` (the user's ``--data``), never from the run's stored path."""
    import torch

    from difflab.data import load_dataset

    data = cfg.data
    path = data.path_for_run(data_path)
    if data.name in GENERATED_SETS:
        ds = load_dataset(data.name, path, num, seed=cfg.train.seed + HELD_OUT_SEED_OFFSET + seed, **data.options)
        return ds.x, ds.y, "fresh held-out draws"
    full = load_dataset(data.name, path, None, seed=cfg.train.seed, **data.options)
    if data.n is None or data.n >= len(full):
        pool, note = torch.arange(len(full)), "training examples (the run used every example)"
    else:  # the same permutation ArrayDataset.subset drew the training examples from
        pool = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.train.seed))[data.n:]
        note = "held-out examples"
    if num > len(pool):
        raise ValueError(f"--num {num} exceeds the {len(pool)} {note} of {data.name!r}")
    pick = pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))[:num]]
    return full.x[pick], (None if full.y is None else full.y[pick]), note


def run(args: argparse.Namespace) -> int:
    import torch

    from difflab.elbo import bits_per_dim, elbo_terms
    from difflab.likelihood import ode_bits_per_dim, ode_log_likelihood
    from difflab.pipeline import continuous_view, load_run
    from difflab.samplers.time_grids import uniform_t

    if args.num < 1 or args.batch_size < 1 or args.steps < 1:
        raise ValueError("--num, --batch-size and --steps must be >= 1")
    if args.probes is not None and args.probes < 0:
        raise ValueError(f"--probes must be >= 0, got {args.probes}")
    pipe = load_run(args.run_dir, ema=not args.no_ema, device=args.device)
    if pipe.decoder is not None:
        raise ValueError(f"{args.run_dir} is a latent run: bits/dim of its latents are not bits/dim of images, "
                         "and the decoder has no likelihood, so difflab nll does not apply")
    cfg = pipe.config
    x, y, note = held_out_data(cfg, args.num, args.seed, args.data)
    image = pipe.data_kind == "image"
    dim = math.prod(pipe.data_shape)
    generator = torch.Generator().manual_seed(args.seed)

    if args.method == "elbo":
        if not getattr(pipe.path, "discrete", False):
            raise ValueError(f"the ELBO (SPEC §3) needs a run in discrete DDPM time; this run's path is "
                             f"{cfg.diffusion.path!r}: use --method ode")
        variance = "learned" if cfg.model.learned_variance else "beta_tilde"
        how = f"ELBO, all {pipe.path.T} terms, {'discretised decoder' if image else 'Gaussian decoder'}"
    else:
        denoiser = continuous_view(pipe.denoiser)
        probes = args.probes if args.probes is not None else (0 if dim <= EXACT_DIVERGENCE_MAX_DIM else DEFAULT_PROBES)
        divergence = {"divergence": "exact"} if probes == 0 else \
            {"divergence": "hutchinson", "probes": probes, "probe": args.probe}
        solve = {"solver": "rk45", "rtol": args.rtol, "atol": args.atol} if args.solver == "rk45" else \
            {"solver": args.solver, "timesteps": uniform_t(denoiser.path, args.steps, clean_end=False)}
        how = (f"ODE, {args.solver}" + (f" rtol={args.rtol:g} atol={args.atol:g}" if args.solver == "rk45" else
                                         f" {args.steps} steps")
               + (", exact divergence" if probes == 0 else f", Hutchinson {probes} {args.probe} probes")
               + (", uniform dequantisation" if image else ""))

    bpd, nfe = [], 0
    for start in range(0, args.num, args.batch_size):
        xb = x[start:start + args.batch_size].to(pipe.device)
        cond = {} if (y is None or not pipe.num_classes) else {"y": y[start:start + args.batch_size].to(pipe.device)}
        if args.method == "elbo":
            terms = elbo_terms(pipe.denoiser, xb, variance, "discretized" if image else "gaussian", generator,
                               progress=not args.quiet, **cond)
            bpd.append(bits_per_dim(terms["total"], dim).cpu())
        elif image:
            out = ode_bits_per_dim(denoiser, xb, generator, **solve, **divergence, **cond)
            bpd.append(out["bpd"].cpu())
            nfe = max(nfe, out["nfe"])
        else:
            out = ode_log_likelihood(denoiser, xb.double(), generator=generator, **solve, **divergence, **cond)
            bpd.append(bits_per_dim(-out["logp"], dim).cpu())
            nfe = max(nfe, out["nfe"])
    bpd = torch.cat(bpd).double()
    stderr = float(bpd.std() / math.sqrt(len(bpd))) if len(bpd) > 1 else float("nan")
    cost = f"; {nfe} network evaluations per example" if args.method == "ode" else ""
    print(f"difflab: {args.method} {float(bpd.mean()):.4f} bits/dim ± {stderr:.4f} (standard error, N={len(bpd)} "
          f"{note} of {cfg.data.name}; {how}{cost})")
    return 0
