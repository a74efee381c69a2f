"""Run difflab's benchmarks and write ``OUT/*.json`` and the summary ``OUT/README.md`` (with plots).

    python -m benchmarks.run [--quick] [--only accuracy side_by_side ...] --out benchmarks/results

(``make bench`` / ``make bench-quick``.) Each module's ``run(quick, log)`` returns a dict written to
``OUT/<module>.json`` with the machine record; :mod:`benchmarks.report` then renders every JSON present in
``OUT`` (so ``--only`` refreshes part of the results and keeps the rest). ``--quick`` runs fewer NFEs, fewer
configurations and shorter timings, in about two minutes on two cores; its JSONs are marked ``"quick": true``.
Benchmarks are not tests: nothing here asserts on a time.
"""

from __future__ import annotations

import argparse
import importlib
import time
from pathlib import Path

from benchmarks import report
from benchmarks.common import machine_info, write_json

MODULES = ("accuracy", "exact_stochastic", "side_by_side", "overhead", "training", "interop", "trained")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="difflab benchmarks (sampler accuracy, diffusers side by side, "
                                                 "overhead, training throughput, difflab in diffusers' loop)")
    parser.add_argument("--quick", action="store_true", help="the ~2-minute version")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--only", nargs="+", choices=MODULES, default=list(MODULES))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    total = time.perf_counter()
    for name in args.only:
        start = time.perf_counter()
        print(f"[{name}]", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        try:
            result = module.run(quick=args.quick, log=lambda msg: print(msg, flush=True))
        except ImportError as err:  # the optional diffusers extra
            result = {"skipped": f"{err} (install the bench extra: pip install -e '.[bench]')"}
            print(f"  skipped: {result['skipped']}", flush=True)
        seconds = time.perf_counter() - start
        write_json(args.out / f"{name}.json", {"machine": machine_info(), "quick": args.quick, "seconds": seconds,
                                               "result": result})
        print(f"  done in {seconds:.0f}s", flush=True)
    report.write(args.out)
    print(f"wrote {args.out / 'README.md'} in {time.perf_counter() - total:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
