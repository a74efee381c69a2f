"""``difflab calibrate RUN_DIR --nfe N``: fit the default sampler's time grid to one trained model (SPEC §6).

For a calibration batch of ``--num`` prior draws the probability-flow ODE is solved tightly (adaptive
Dormand–Prince), and the ``N − 1`` noise levels of the grid of the calibrated default sampler (DEIS-3 with UniC's
corrector) are fitted to minimise the RMSE per sample of its output to those reference solves — first the cap of the
default grid's family, then every noise level, keeping the grid best on a quarter of the batch held back from the
fit (:func:`difflab.samplers.calibration.calibrate`); a held-out batch of as many draws (another seed) scores the
fit. The grid is stored in ``RUN_DIR/calibration.json`` (one entry per
budget, written atomically), and ``difflab sample RUN_DIR --steps N`` (default sampler) then uses it.
"""

from __future__ import annotations

import argparse

from difflab.commands import arguments

EXAMPLES = """
examples:
  difflab calibrate runs/digits8 --nfe 10
  difflab calibrate runs/moons --nfe 20 --num 512 --max-seconds 120
  difflab sample runs/digits8 --steps 10 --out digits.png      # uses the calibrated grid
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from difflab.samplers.calibration import MAX_CALIBRATED_NFE

    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by 'difflab train'")
    p.add_argument("--nfe", type=arguments.bounded_int(4, MAX_CALIBRATED_NFE), required=True,
                   help=f"network evaluations per sample to calibrate for (4..{MAX_CALIBRATED_NFE})")
    p.add_argument("--num", type=arguments.bounded_int(1, 4096), default=256,
                   help="calibration batch, and held-out batch, size (default: 256)")
    p.add_argument("--seed", type=arguments.seed, default=0,
                   help="seed of the calibration batch; the held-out batch uses seed + 1 (default: 0)")
    p.add_argument("--max-seconds", type=arguments.positive_float, default=150.0,
                   help="wall-clock budget of the fit, after the reference solves (default: 150)")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--device", type=arguments.device, default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    import math

    from difflab.pipeline import continuous_view, load_run
    from difflab.samplers.calibration import calibrate, write_calibration

    pipe = load_run(args.run_dir, ema=not args.no_ema, device=args.device)
    log = None if args.quiet else (lambda msg: print(msg, flush=True))
    entry = calibrate(continuous_view(pipe.denoiser), pipe.data_shape, args.nfe, num=args.num, seed=args.seed,
                      heldout_seed=args.seed + 1, num_classes=pipe.num_classes, max_seconds=args.max_seconds, log=log)
    if not all(math.isfinite(entry[k]) for k in ("rmse", "heldout_rmse")):
        raise ValueError("the calibrated sampler's output holds NaN or Inf on this model; nothing written")
    target = write_calibration(args.run_dir, entry)
    print(f"difflab: calibrated {args.nfe} evaluations in {entry['seconds']:.0f}s: RMSE to the reference "
          f"{entry['rmse']:.4g} (default grid {entry['default_rmse']:.4g}); held out {entry['heldout_rmse']:.4g} "
          f"(default grid {entry['default_heldout_rmse']:.4g}); wrote {target}")
    return 0
