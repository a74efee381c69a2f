"""difflab's benchmarks: sampler accuracy on exact test beds, side by side with diffusers, overhead, training.

Entry point: ``python -m benchmarks.run [--quick] --out benchmarks/results`` (``make bench`` /
``make bench-quick``). Each module exposes ``run(quick: bool) -> dict``; :mod:`benchmarks.run` writes one
JSON file per module and :mod:`benchmarks.report` the markdown summary with its plots. Benchmarks are not
tests: nothing here asserts on a time.
"""
