"""Shared benchmark plumbing: the machine record, timers, peak memory, JSON output."""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch


def library_versions() -> dict:
    versions = {"python": platform.python_version()}
    for name in ("torch", "numpy", "scipy", "diffusers", "difflab"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the numbers were measured on: CPU, cores, threads torch uses, memory, GPU, library versions."""
    info = {
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
        if hasattr(os, "sysconf") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": library_versions(),
        "time_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    return info


def timeit(fn: Callable[[], object], repeats: int = 5, warmup: int = 1, min_time: float = 0.0) -> dict:
    """Wall time of ``fn()`` in seconds: median and min over ``repeats`` runs after ``warmup`` runs.

    With ``min_time`` each run loops ``fn`` until at least that long has passed and reports the per-call
    time, so very short calls are not dominated by timer resolution. CUDA work is synchronised.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            sync()
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        times.append(elapsed / calls)
    return {"median_s": statistics.median(times), "min_s": min(times), "repeats": repeats}


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident set size of this process (or of its finished children) in MiB (Linux reports KiB)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    kib = resource.getrusage(who).ru_maxrss
    return kib / 1024.0 if sys.platform != "darwin" else kib / 2**20


def _clean(obj):
    """JSON-safe copy: non-finite floats become strings, tensors become lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _clean(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    return obj


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(obj), indent=1))
    tmp.replace(path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def training_records(run_dir: Path) -> dict:
    """``{step: metrics record}`` of a run's ``metrics.jsonl``, every record with the engine's ``elapsed`` (wall) and
    ``cpu_seconds`` (process CPU time) of training so far.

    A run resumed at step ``r0`` from an engine that did not yet log CPU time counts CPU from the resume on; its
    records then get ``r0 × (CPU per step after the resume)`` added (and records up to ``r0`` that much per step),
    marked ``cpu_estimated``."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = {r["step"]: r for r in (json.loads(line) for line in lines if line.strip())}
    missing = [s for s, r in records.items() if "cpu_seconds" not in r]
    logged = [s for s, r in records.items() if "cpu_seconds" in r]
    if missing and logged:
        r0, last = max(missing), max(logged)
        rate = records[last]["cpu_seconds"] / (last - r0)
        for s, r in records.items():
            r["cpu_seconds"] = r["cpu_seconds"] + r0 * rate if s > r0 else s * rate
            r["cpu_estimated"] = True
    return records
