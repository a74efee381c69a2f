"""Hostile and malformed input: the real CLI, in a subprocess under a memory limit, on crafted configs, options,
run directories, checkpoints, classifiers and data files.

Every case must end with a non-zero exit (not a signal), exactly one line on stderr that starts with
``difflab: error:`` (no traceback), within the time limit (no hang), with no marker file created by a payload
and nothing written outside the case's own folder (a canary folder beside it is compared before and after).

The cases run two at a time (the reference machine has two cores) in one session fixture; each parametrised
test then checks its own case's outcome.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import pickle
import resource
import shutil
import struct
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import save as safetensors_save

from difflab.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny2d.yaml"
MEMORY_LIMIT = 3 << 30
"""Address-space limit of each subprocess: far above what any case needs, far below an absurd allocation."""
TIME_LIMIT = 90
"""Seconds before a case counts as a hang (a case takes 1–5 s)."""
MARKER = "PAYLOAD_RAN"
"""A payload's proof of execution: it creates a file of this name in the case's folder."""


# --- payloads ------------------------------------------------------------------------------------------------
class _Payload:
    """Pickled, creates ``path`` when unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def pickle_payload(marker: Path, protocol: int = 2) -> bytes:
    return pickle.dumps({b"data": _Payload(str(marker)), b"labels": [0]}, protocol=protocol)


def yaml_payloads(marker: Path) -> dict:
    return {
        "python/object/apply": f'train: !!python/object/apply:builtins.open ["{marker}", "w"]\n',
        "python/name": "train:\n  steps: !!python/name:os.system\n",
        "python/object/new": f'x: !!python/object/new:builtins.open ["{marker}", "w"]\n',
        "python/module": "train: !!python/module:os\n",
    }


# --- a trained run to mutate ---------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def base_runs(tmp_path_factory) -> dict:
    """A tiny unconditional 2-D run, a class-conditional one and a classifier, trained once per session."""
    root = tmp_path_factory.mktemp("hostile-base")
    fast = ["train.steps=4", "train.checkpoint_every=2", "train.num_threads=1"]
    assert main(["train", str(TINY), "--out", str(root / "run"), "--quiet", "--set", *fast]) == 0
    assert main(["train", str(TINY), "--out", str(root / "cond"), "--quiet", "--set", *fast,
                 "model.conditional=true", "train.p_uncond=0.2"]) == 0
    assert main(["train-classifier", str(TINY), "--out", str(root / "cls"), "--quiet",
                 "--set", "classifier.steps=3", "classifier.width=8", "classifier.depth=1",
                 "classifier.time_dim=8"]) == 0
    latent = ["data.name=digits8", "data.n=64", "train.num_threads=1", "train.steps=2", "train.batch_size=16",
              "train.checkpoint_every=2"]
    assert main(["train-autoencoder", str(TINY), "--out", str(root / "ae"), "--quiet", "--set", *latent,
                 "autoencoder.latent_channels=2", "autoencoder.base_channels=8", "autoencoder.held_out=0.25"]) == 0
    assert main(["train", str(TINY), "--out", str(root / "ldm"), "--quiet", "--set", *latent,
                 f"data.autoencoder={root / 'ae'}", "model.kind=unet", "model.base_channels=8",
                 "model.channel_mults=[1]", "model.num_res_blocks=1", "model.attn_resolutions=[]"]) == 0
    return {"run": root / "run", "cond": root / "cond", "cls": root / "cls", "ae": root / "ae", "ldm": root / "ldm"}


def copy_run(base: Path, dest: Path) -> Path:
    shutil.copytree(base, dest)
    return dest


def step_json(run: Path) -> Path:
    return run / "checkpoints" / (json.loads((run / "checkpoints" / "latest.json").read_text())["name"] + ".json")


def edit_json(path: Path, fn: Callable[[dict], object]) -> None:
    record = json.loads(path.read_text())
    out = fn(record)
    path.write_text(json.dumps(record if out is None else out))


def write_weights(json_file: Path, data: bytes, fix_hash: bool = True) -> None:
    """Replace the weights beside ``json_file`` by ``data`` and (``fix_hash``) record its hash and size, so the
    checks behind the hash are reached."""
    record = json.loads(json_file.read_text())
    (json_file.parent / record["weights"]).write_bytes(data)
    if fix_hash:
        record["sha256"] = hashlib.sha256(data).hexdigest()
        record["bytes"] = len(data)
    json_file.write_text(json.dumps(record))


def stored_tensors(json_file: Path) -> dict:
    from safetensors.torch import load

    record = json.loads(json_file.read_text())
    return load((json_file.parent / record["weights"]).read_bytes())


def safetensors_bytes(header: dict, data: bytes = b"") -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def npz_bomb(path: Path) -> None:
    """A few kilobytes of zip whose array header declares 80 GB."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<f8", "fortran_order": False, "shape": (100000, 100000)})
            f.write(b"\0" * 4096)


# --- the cases -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """``setup(folder, runs) -> argv`` builds the input inside ``folder`` and returns the CLI arguments."""

    name: str
    setup: Callable[[Path, dict], list]
    expect: str = ""
    """A fragment the error line must contain (case-insensitive), when the problem has one obvious name."""
    tags: tuple = field(default_factory=tuple)


CASES: list[Case] = []


def case(name: str, expect: str = ""):
    def register(fn):
        CASES.append(Case(name, fn, expect))
        return fn
    return register


def config_case(name: str, text: str, expect: str = "", extra: tuple = ()):
    """``difflab train`` on a config file holding ``text`` (``{folder}``/``{marker}`` substituted)."""
    def setup(folder: Path, runs: dict) -> list:
        cfg = folder / "cfg.yaml"
        cfg.write_text(text.replace("{folder}", str(folder)).replace("{marker}", str(folder / MARKER)))
        return ["train", cfg, "--out", folder / "out", "--quiet", *extra]
    CASES.append(Case(f"config: {name}", setup, expect))


def override_case(name: str, *overrides: str, expect: str = ""):
    def setup(folder: Path, runs: dict) -> list:
        return ["train", TINY, "--out", folder / "out", "--quiet", "--set",
                *(o.replace("{folder}", str(folder)) for o in overrides)]
    CASES.append(Case(f"--set: {name}", setup, expect))


BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(9))

config_case("billion laughs", BILLION_LAUGHS, "aliases")
config_case("recursive alias", "data: &d\n  options: {x: *d}\n", "itself")
config_case("deeply nested", "train: " + "[" * 20000 + "]" * 20000 + "\n", "")
config_case("binary file", "\x00\x01\x02\udcff".encode("utf-8", "surrogateescape").decode("latin-1"), "")
config_case("oversized file", "# " + "x" * (2 << 20) + "\n", "too large")
config_case("top-level list", "- 1\n- 2\n", "mapping")
config_case("top-level scalar", "hello\n", "mapping")
config_case("unknown section", "optimiser: {lr: 1}\n", "unknown config section")
config_case("unknown key", "train: {lrr: 1}\n", "train.lrr")
config_case("section not a mapping", "train: 3\n", "must be a mapping")
config_case("string for int", "train: {steps: many}\n", "train.steps")
config_case("nan lr", "train: {lr: .nan}\n", "train.lr")
config_case("inf lr", "train: {lr: .inf}\n", "train.lr")
config_case("overflowing float", "train: {lr: 1e400}\n", "train.lr")
config_case("huge int for float", f"train: {{lr: {10**400}}}\n", "train.lr")
config_case("seed 2**70", f"train: {{seed: {2**70}}}\n", "train.seed")
config_case("negative seed", "train: {seed: -1}\n", "train.seed")
config_case("negative batch", "train: {batch_size: -8}\n", "train.batch_size")
config_case("huge batch", f"train: {{batch_size: {10**12}}}\n", "train.batch_size")
config_case("100000 threads", "train: {num_threads: 100000}\n", "train.num_threads")
config_case("huge steps", f"train: {{steps: {10**15}}}\n", "train.steps")
config_case("huge T", f"diffusion: {{T: {10**9}}}\n", "diffusion.T")
config_case("huge width", f"model: {{hidden: {10**9}}}\n", "model.hidden")
config_case("huge depth", f"model: {{depth: {10**7}}}\n", "model.depth")
config_case("parameters over the limit", "model: {hidden: 65536, depth: 1000}\n", "parameters")
config_case("unet channels", f"model: {{kind: unet, base_channels: {10**8}}}\n", "model.base_channels")
config_case("unet mults", "model: {kind: unet, channel_mults: [1000, 1000]}\n", "channel_mults")
config_case("unet many levels", "model: {kind: unet, channel_mults: [" + ", ".join(["2"] * 100) + "]}\n", "channel_mults")
config_case("negative attention", "model: {kind: unet, attn_resolutions: [-4]}\n", "attn_resolutions")
config_case("odd time_dim", "model: {time_dim: 33}\n", "time_dim")
config_case("bad model kind", "model: {kind: transformer}\n", "model.kind")
config_case("huge data.n", f"data: {{n: {10**12}}}\n", "data.n")
config_case("data option nan", "data: {options: {noise: .nan}}\n", "noise")
config_case("data option string", "data: {options: {noise: loud}}\n", "noise")
config_case("data option unknown", "data: {options: {volume: 3}}\n", "volume")
config_case("mixture classes 10**9", f"data: {{name: mixture, options: {{num_classes: {10**9}}}}}\n", "num_classes")
config_case("mixture zero classes", "data: {name: mixture, options: {num_classes: 0}}\n", "")
config_case("data name unknown", "data: {name: imagenet}\n", "data.name")
config_case("classifier huge width", f"classifier: {{width: {10**9}}}\n", "classifier.width")
config_case("cuda device", "train: {device: cuda}\n", "cuda")
for tag, text in yaml_payloads(Path("{marker}")).items():
    config_case(f"yaml tag {tag}", text, "")


@case("config is a folder", "not found")
def _(folder, runs):
    return ["train", folder, "--out", folder / "out", "--quiet"]


@case("config missing", "not found")
def _(folder, runs):
    return ["train", folder / "nope.yaml", "--out", folder / "out", "--quiet"]


override_case("no equals sign", "train.lr", expect="key=value")
override_case("unknown key", "optim.lr=1", expect="unknown config key")
override_case("unparsable", "train.lr=[1, 2", expect="cannot parse")
override_case("noise abc", "data.options.noise=abc", expect="noise")
override_case("noise nan", "data.options.noise=.nan", expect="noise")
override_case("threads 100000", "train.num_threads=100000", expect="train.num_threads")
override_case("seed 2**70", "train.seed=2**70", expect="train.seed")
override_case("seed 2**70 as integer", f"train.seed={2**70}", expect="train.seed")
override_case("alias bomb", "data.options=" + "{a: &a [1,1,1,1,1,1,1,1,1,1], b: &b [" + ",".join(["*a"] * 10) + "], c: &c ["
              + ",".join(["*b"] * 10) + "], d: &d [" + ",".join(["*c"] * 10) + "], e: [" + ",".join(["*d"] * 10) + "]}",
              expect="aliases")
override_case("python tag", "train.steps=!!python/object/apply:os.system [true]", expect="")


# --- data files named by a config (difflab train) -------------------------------------------------------------
def data_case(name: str, make: Callable[[Path], tuple], expect: str = ""):
    """``make(folder) -> (data name, path)``; the config trains on it."""
    def setup(folder: Path, runs: dict) -> list:
        dname, path = make(folder)
        cfg = folder / "cfg.yaml"
        cfg.write_text(json.dumps({"data": {"name": dname, "path": str(path)}, "model": {"kind": "mlp"},
                                   "train": {"steps": 2, "batch_size": 8, "num_threads": 1}}))
        return ["train", cfg, "--out", folder / "out", "--quiet"]
    CASES.append(Case(f"data: {name}", setup, expect))


def _cifar_payload(folder: Path, protocol: int = 2):
    d = folder / "cifar"
    d.mkdir()
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(pickle_payload(folder / MARKER, protocol))
    return "cifar10", d


def _cifar_object_array(folder: Path):
    d = folder / "cifar"
    d.mkdir()
    blob = pickle.dumps({b"data": np.array([_Payload(str(folder / MARKER))], dtype=object), b"labels": [0]}, protocol=2)
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(blob)
    return "cifar10", d


def _npy_pickle(folder: Path):
    p = folder / "x.npy"
    np.save(p, np.array([_Payload(str(folder / MARKER))], dtype=object), allow_pickle=True)
    return "npy", p


def _npz_pickle(folder: Path):
    p = folder / "x.npz"
    np.savez(p, x=np.array([_Payload(str(folder / MARKER))], dtype=object))
    return "npz", p


def _raw_pickle_as_npy(folder: Path):
    p = folder / "x.npy"
    p.write_bytes(pickle.dumps(_Payload(str(folder / MARKER))))
    return "npy", p


def _npz_bomb(folder: Path):
    npz_bomb(folder / "bomb.npz")
    return "npz", folder / "bomb.npz"


def _npz_nan(folder: Path):
    x = np.random.default_rng(0).normal(size=(50, 2))
    x[3, 1] = np.inf
    np.savez(folder / "nan.npz", x=x)
    return "npz", folder / "nan.npz"


def _npz_huge_labels(folder: Path):
    np.savez(folder / "y.npz", x=np.zeros((10, 2)), y=np.full(10, 10**12))
    return "npz", folder / "y.npz"


def _fake_png(folder: Path):
    d = folder / "imgs"
    d.mkdir()
    (d / "a.png").write_text("not an image")
    return "folder", d


def _fifo(folder: Path):
    os.mkfifo(folder / "pipe.npy")
    return "npy", folder / "pipe.npy"


def _truncated_npy(folder: Path):
    np.save(folder / "t.npy", np.zeros((1000, 2)))
    data = (folder / "t.npy").read_bytes()
    (folder / "t.npy").write_bytes(data[:300])
    return "npy", folder / "t.npy"


data_case("cifar pickle payload", _cifar_payload, "plain data")
data_case("cifar pickle payload, protocol 0", lambda f: _cifar_payload(f, 0), "plain data")
data_case("cifar object array", _cifar_object_array, "")
data_case("npy object array", _npy_pickle, "")
data_case("npz object array", _npz_pickle, "")
data_case("pickle named .npy", _raw_pickle_as_npy, "")
data_case("npz zip bomb", _npz_bomb, "bytes")
data_case("npz with inf points", _npz_nan, "NaN")
data_case("npz labels 10**12", _npz_huge_labels, "labels")
data_case("text named .png", _fake_png, "")
data_case("fifo", _fifo, "")
data_case("truncated npy", _truncated_npy, "")
data_case("missing path", lambda f: ("npz", f / "missing.npz"), "no such file")
data_case("path traversal into nothing", lambda f: ("npz", f / ".." / ".." / "nonexistent" / "x.npz"), "no such file")


# --- difflab sample options on a good run ---------------------------------------------------------------------
def sample_case(name: str, *options: str, run: str = "run", expect: str = ""):
    def setup(folder: Path, runs: dict) -> list:
        return ["sample", runs[run], "--out", folder / "s.png", "--quiet", "--num", "4", "--steps", "2",
                *(o.replace("{folder}", str(folder)) for o in options)]
    CASES.append(Case(f"sample: {name}", setup, expect))


sample_case("--num 0", "--num", "0", expect="--num")
sample_case("--num -5", "--num", "-5", expect="--num")
sample_case("--num 1e12", "--num", "1e12", expect="--num")
sample_case("--num 10**12", "--num", str(10**12), expect="--num")
sample_case("--steps 0", "--steps", "0", expect="--steps")
sample_case("--steps 1e9", "--steps", "1e9", expect="--steps")
sample_case("--steps 10**9", "--steps", str(10**9), expect="--steps")
sample_case("--eta nan", "--eta", "nan", expect="--eta")
sample_case("--eta inf", "--eta", "inf", expect="--eta")
sample_case("--eta -inf", "--eta=-inf", expect="--eta")
sample_case("--seed -1", "--seed=-1", expect="--seed")
sample_case("--seed 2**70", "--seed", str(2**70), expect="--seed")
sample_case("--batch-size 0", "--batch-size", "0", expect="--batch-size")
sample_case("--device bogus", "--device", "bogus", expect="device")
sample_case("--device cuda", "--device", "cuda", expect="cuda")
sample_case("--device cuda:7", "--device", "cuda:7", expect="cuda")
sample_case("--out .txt", "--out", "{folder}/s.txt", expect="--out")
sample_case("--class on unconditional", "--class", "1", expect="unconditional")
sample_case("--guidance-scale nan", "--guidance-scale", "nan", run="cond", expect="--guidance-scale")
sample_case("--guidance-scale inf", "--guidance-scale", "inf", run="cond", expect="--guidance-scale")
sample_case("--guidance-rescale nan", "--guidance-rescale", "nan", run="cond", expect="--guidance-rescale")
sample_case("--guidance-interval nan", "--guidance-interval", "nan", "1", run="cond", expect="--guidance-interval")
sample_case("--classifier-scale nan", "--classifier-scale", "nan", run="cond", expect="--classifier-scale")
sample_case("--class 99", "--class", "99", run="cond", expect="class")
sample_case("--class -2", "--class=-2", run="cond", expect="class")
sample_case("--class 10**12", "--class", str(10**12), run="cond", expect="--class")
sample_case("nested --inner-eta nan", "--sampler", "nested", "--inner-eta", "nan", expect="--inner-eta")
sample_case("nested --outer 0", "--sampler", "nested", "--outer", "0", expect="--outer")
sample_case("nested --inner 10**9", "--sampler", "nested", "--inner", str(10**9), expect="--inner")
sample_case("--classifier missing", "--classifier", "{folder}/nope", run="cond", expect="no classifier")


@case("sample: run dir missing", "no checkpoint")
def _(folder, runs):
    return ["sample", folder / "nope", "--out", folder / "s.png", "--quiet"]


@case("sample: run dir is a file", "no checkpoint")
def _(folder, runs):
    (folder / "f").write_text("x")
    return ["sample", folder / "f", "--out", folder / "s.png", "--quiet"]


# --- crafted run directories (sample, eval, nll, experiment) --------------------------------------------------
def run_case(name: str, mutate: Callable[[Path, Path], None], expect: str = "", command: str = "sample",
             base: str = "run"):
    """Copy the base run into the case folder, ``mutate(run, folder)``, then run ``command`` on it."""
    def setup(folder: Path, runs: dict) -> list:
        run = copy_run(runs[base], folder / "run")
        mutate(run, folder)
        if command == "sample":
            return ["sample", run, "--out", folder / "s.png", "--quiet", "--num", "4", "--steps", "2"]
        if command == "eval":
            return ["eval", run, "--num", "8", "--steps", "2", "--quiet"]
        if command == "nll":
            return ["nll", run, "--method", "elbo", "--num", "4", "--quiet"]
        if command == "reflow":
            return ["reflow", run, "--out", folder / "new", "--pairs", "8", "--steps", "1", "--eval-num", "4"]
        if command == "experiment":
            return ["experiment", "ddim-steps", run, "--quick", "--out", folder / "exp"]
        raise AssertionError(command)
    CASES.append(Case(f"{command}: {name}", setup, expect))


def _latest(text: str):
    def mutate(run: Path, folder: Path) -> None:
        (run / "checkpoints" / "latest.json").write_text(text)
    return mutate


def _record(fn: Callable[[dict], object]):
    def mutate(run: Path, folder: Path) -> None:
        edit_json(step_json(run), fn)
    return mutate


def _set(path: tuple, value):
    def fn(record: dict):
        node = record
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return fn


def _drop(key: str):
    def fn(record: dict) -> None:
        del record[key]
    return fn


def _other_run_pointer(run: Path, folder: Path) -> None:
    other = copy_run(run, folder / "other")
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "name": "../../other/checkpoints/step_00000004"}))


def _weights(make: Callable[[Path], bytes], fix_hash: bool = True):
    def mutate(run: Path, folder: Path) -> None:
        js = step_json(run)
        write_weights(js, make(js), fix_hash)
    return mutate


def _tensors(fn: Callable[[dict], dict]):
    return _weights(lambda js: safetensors_save(fn(dict(stored_tensors(js)))))


def _sparse_8gib(run: Path, folder: Path) -> None:
    js = step_json(run)
    record = json.loads(js.read_text())
    w = js.parent / record["weights"]
    with open(w, "r+b") as f:
        f.truncate(8 << 30)
    record["bytes"] = 8 << 30
    js.write_text(json.dumps(record))


def _nan_weights(tensors: dict) -> dict:
    for k, v in tensors.items():
        if v.is_floating_point():
            tensors[k] = torch.full_like(v, float("nan"))
    return tensors


def _misshapen(tensors: dict) -> dict:
    key = next(k for k in tensors if k.startswith("ema.") and k.endswith("weight"))  # sampling reads the EMA
    tensors[key] = torch.zeros(3, 3)
    return tensors


def _drop_tensor(tensors: dict) -> dict:
    key = next(k for k in tensors if k.startswith("ema."))
    del tensors[key]
    return tensors


def _symlink_weights(run: Path, folder: Path) -> None:
    js = step_json(run)
    w = js.parent / json.loads(js.read_text())["weights"]
    w.unlink()
    w.symlink_to("/dev/zero")


def _checkpoints_is_file(run: Path, folder: Path) -> None:
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("x")


def _deep_index(run: Path, folder: Path) -> None:
    """An index nested 100,000 lists deep (written as text: Python's own JSON writer cannot)."""
    js = step_json(run)
    edit_json(js, _set(("index", "extra"), "DEEP"))
    depth = 100000
    js.write_text(js.read_text().replace('"DEEP"', "[" * depth + '{"__tensor__": "model.x"}' + "]" * depth))


def _cifar_run(run: Path, folder: Path) -> None:
    """The run's stored config names crafted CIFAR-10 batches on 'this' machine."""
    _, path = _cifar_payload(folder)
    edit_json(step_json(run), _set(("config", "data"), {"name": "cifar10", "path": str(path)}))


run_case("latest not JSON", _latest("{"), "not valid JSON")
run_case("latest a list", _latest("[1, 2]"), "step_<digits>")
run_case("latest names another run", _other_run_pointer, "step_<digits>")
run_case("latest names an absolute path", _latest(json.dumps({"name": "/etc/passwd"})), "step_<digits>")
run_case("latest name not a string", _latest(json.dumps({"name": 5})), "step_<digits>")
run_case("latest empty object", _latest("{}"), "step_<digits>")
run_case("latest oversized", _latest(json.dumps({"name": "step_00000004", "pad": "x" * 100000})), "too large")
run_case("latest names a missing step", _latest(json.dumps({"name": "step_00000099"})), "no checkpoint")
run_case("record not JSON", lambda r, f: step_json(r).write_text("{nope"), "not valid JSON")
run_case("record a list", _record(lambda rec: [rec]), "not a difflab checkpoint")
run_case("record other format", _record(_set(("format",), "pickle")), "not a difflab checkpoint")
run_case("record missing sha256", _record(_drop("sha256")), "sha256")
run_case("record missing index", _record(_drop("index")), "index")
run_case("record missing meta", _record(_drop("meta")), "meta")
run_case("record missing config", _record(_drop("config")), "config")
run_case("record missing weights", _record(_drop("weights")), "weights")
run_case("record meta a list", _record(_set(("meta",), [1])), "meta")
run_case("record index a list", _record(_set(("index",), [1])), "index")
run_case("record step a string", _record(_set(("step",), "four")), "step")
run_case("record step negative", _record(_set(("step",), -4)), "step")
run_case("record sha256 not hex", _record(_set(("sha256",), "zz")), "sha256")
run_case("record sha256 wrong", _record(_set(("sha256",), "0" * 64)), "hash")
run_case("record bytes wrong", _record(_set(("bytes",), 12)), "bytes")
run_case("weights path traversal", _record(_set(("weights",), "../../../../etc/passwd")), "weights")
run_case("weights absolute path", _record(_set(("weights",), "/etc/passwd")), "weights")
run_case("weights in another file", _record(_set(("weights",), "step_00000002.safetensors")), "weights")
run_case("config unknown key", _record(_set(("config", "train", "lrr"), 1)), "train.lrr")
run_case("config not a mapping", _record(_set(("config",), "x")), "config")
run_case("config huge model", _record(_set(("config", "model", "hidden"), 10**9)), "model.hidden")
run_case("config parameters over the limit", _record(lambda rec: rec["config"]["model"].update(hidden=65536, depth=1000)),
         "parameters")
run_case("config nan", _record(_set(("config", "train", "lr"), "NaN")), "train.lr")
run_case("meta data_shape huge", _record(_set(("meta", "data_shape"), [10**6, 10**6])), "data_shape")
run_case("meta data_shape string", _record(_set(("meta", "data_shape"), "abc")), "data_shape")
run_case("meta data_shape 4-D", _record(_set(("meta", "data_shape"), [1, 1, 1, 1])), "data_shape")
run_case("meta data_shape missing", _record(lambda rec: rec["meta"].__delitem__("data_shape")), "data_shape")
run_case("meta num_classes 10**9", _record(_set(("meta", "num_classes"), 10**9)), "num_classes")
run_case("meta num_classes negative", _record(_set(("meta", "num_classes"), -1)), "num_classes")
run_case("meta data_kind unknown", _record(_set(("meta", "data_kind"), "evil")), "data_kind")
run_case("index names a missing tensor", _record(_set(("index", "model", "net.0.weight"), {"__tensor__": "nope"})), "index")
run_case("index nested 100000 deep", _deep_index, "")
run_case("record oversized", _record(_set(("meta", "pad"), "x" * (65 << 20))), "too large")
run_case("weights truncated", _weights(lambda js: (js.parent / json.loads(js.read_text())["weights"]).read_bytes()[:100]), "")
run_case("weights a pickle", _weights(lambda js: pickle.dumps(_Payload("/nonexistent/never"))), "")
run_case("weights header length 2**63", _weights(lambda js: struct.pack("<Q", 2**63) + b"{}"), "header")
run_case("weights header not JSON", _weights(lambda js: struct.pack("<Q", 4) + b"{{{{"), "header")
run_case("weights header a list", _weights(lambda js: safetensors_bytes([1, 2])), "header")  # type: ignore[arg-type]
run_case("weights offsets beyond the file",
         _weights(lambda js: safetensors_bytes({"model.a": {"dtype": "F32", "shape": [10**9], "data_offsets": [0, 4 * 10**9]}})),
         "")
run_case("weights unknown dtype",
         _weights(lambda js: safetensors_bytes({"model.a": {"dtype": "EVIL", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4)),
         "")
run_case("weights 8 GiB sparse file", _sparse_8gib, "bytes")
run_case("weights NaN", _tensors(_nan_weights), "NaN")
run_case("weights misshapen", _tensors(_misshapen), "do not fit")
run_case("weights missing a tensor", _tensors(_drop_tensor), "")
run_case("weights missing", lambda r, f: (step_json(r).parent / "step_00000004.safetensors").unlink(), "missing weights")
run_case("weights a symlink to /dev/zero", _symlink_weights, "")
run_case("checkpoints is a file", _checkpoints_is_file, "no checkpoint")
run_case("stored data path (nll)", _cifar_run, "--data", command="nll")
run_case("stored data path (eval)", _cifar_run, "--data", command="eval")
run_case("stored data path (reflow)", _cifar_run, "", command="reflow")
run_case("record missing sha256 (eval)", _record(_drop("sha256")), "sha256", command="eval")
run_case("latest names another run (nll)", _other_run_pointer, "step_<digits>", command="nll")
run_case("weights NaN (experiment)", _tensors(_nan_weights), "NaN", command="experiment")
run_case("config huge model (eval)", _record(_set(("config", "model", "hidden"), 10**9)), "model.hidden", command="eval")



# --- crafted calibration files (difflab calibrate's RUN/calibration.json, read by the default sampler) ----------
def _calibration(content):
    """Write ``RUN/calibration.json``: ``content`` as text if a str, else as JSON."""
    def mutate(run: Path, folder: Path) -> None:
        text = content if isinstance(content, str) else json.dumps(content)
        (run / "calibration.json").write_text(text)
    return mutate


def _calibrated(grid, key: str = "2", **extra) -> dict:
    entry = {"nfe": 2, "solver": "deis", "order": 3, "corrector": True, "grid": grid, **extra}
    return {"format": "difflab-calibration", "version": 1, "entries": {key: entry}}


def _calibration_is_a_folder(run: Path, folder: Path) -> None:
    (run / "calibration.json").mkdir()


run_case("calibration not JSON", _calibration("{"), "calibration")
run_case("calibration a list", _calibration([1, 2]), "difflab-calibration")
run_case("calibration other format", _calibration({"format": "pickle", "version": 1, "entries": {}}), "difflab-calibration")
run_case("calibration NaN in grid", _calibration('{"format": "difflab-calibration", "version": 1, "entries": {"2": '
                                                '{"solver": "deis", "order": 3, "grid": [1.0, NaN, 0.0]}}}'), "NaN")
run_case("calibration grid not decreasing", _calibration(_calibrated([1.0, 0.2, 0.5])), "decreasing")
run_case("calibration grid below t_min", _calibration(_calibrated([1.0, 1e-9, 0.0])), "range")
run_case("calibration grid not from t_max", _calibration(_calibrated([0.9, 0.5, 0.0])), "t_max")
run_case("calibration grid wrong length", _calibration(_calibrated([1.0, 0.9, 0.5, 0.1, 0.0])), "3 times")
run_case("calibration grid of strings", _calibration(_calibrated(["1.0", "0.5", "0.0"])), "not a number")
run_case("calibration grid a mapping", _calibration(_calibrated({"a": 1})), "list")
run_case("calibration grid 10**6 long", _calibration(_calibrated([1.0] * 10**6)), "")
run_case("calibration budget 10**9", _calibration(_calibrated([1.0, 0.5, 0.0], key=str(10**9))), "budget")
run_case("calibration budget not a number", _calibration(_calibrated([1.0, 0.5, 0.0], key="../x")), "budget")
run_case("calibration other solver", _calibration({"format": "difflab-calibration", "version": 1, "entries": {
    "2": {"solver": "rk45", "order": 3, "grid": [1.0, 0.5, 0.0]}}}), "default sampler")
run_case("calibration fitted without the corrector", _calibration(_calibrated([1.0, 0.5, 0.0], corrector=False)),
         "difflab calibrate")
run_case("calibration corrector not a bool", _calibration(_calibrated([1.0, 0.5, 0.0], corrector="yes")),
         "difflab calibrate")
run_case("calibration 10**4 entries", _calibration({"format": "difflab-calibration", "version": 1,
                                                    "entries": {str(k): {} for k in range(10**4)}}), "budgets")
run_case("calibration oversized", _calibration(_calibrated([1.0, 0.5, 0.0], pad="x" * (2 << 20))), "bytes")
run_case("calibration nested 100000 deep", _calibration("[" * 100000 + "]" * 100000), "calibration")
run_case("calibration is a folder", _calibration_is_a_folder, "not a file")

@case("nll: --data to crafted CIFAR batches", "plain data")
def _(folder, runs):
    run = copy_run(runs["run"], folder / "run")
    _cifar_run(run, folder)
    return ["nll", run, "--method", "elbo", "--num", "4", "--quiet", "--data", folder / "cifar"]


@case("eval: --data to crafted CIFAR batches", "plain data")
def _(folder, runs):
    run = copy_run(runs["run"], folder / "run")
    _cifar_run(run, folder)
    return ["eval", run, "--num", "8", "--quiet", "--data", folder / "cifar"]


# --- crafted latent runs and autoencoders ------------------------------------------------------------------------
def _ae_record(fn):
    return lambda run, folder: edit_json(run / "autoencoder.json", fn)


run_case("latent: autoencoder image_shape huge", _ae_record(_set(("meta", "image_shape"), [4096, 4096, 4096])),
         "image_shape", base="ldm")
run_case("latent: autoencoder scale_factor NaN", _ae_record(_set(("meta", "scale_factor"), float("nan"))),
         "scale_factor", base="ldm")
run_case("latent: autoencoder weights traversal", _ae_record(_set(("weights",), "../../run/x.safetensors")), "weights",
         base="ldm")
run_case("latent: autoencoder weights a pickle",
         lambda run, folder: write_weights(run / "autoencoder.json", pickle.dumps(_Payload("/nonexistent/never"))), "",
         base="ldm")
run_case("latent: meta.latent not a mapping", _record(_set(("meta", "latent"), [1])), "autoencoder", base="ldm")
run_case("latent: autoencoder config huge", _ae_record(_set(("config", "autoencoder", "base_channels"), 10**9)),
         "autoencoder.base_channels", base="ldm")


@case("train: crafted autoencoder latents path", "latents")
def _(folder, runs):
    ae = copy_run(runs["ae"], folder / "ae")
    edit_json(ae / "autoencoder.json", _set(("latents",), "../../../../dev/zero"))
    return ["train", TINY, "--out", folder / "out", "--quiet", "--set", "data.name=digits8", "data.n=64", f"data.autoencoder={ae}",
            "model.kind=unet", "model.base_channels=8", "model.channel_mults=[1]", "train.steps=1"]


# --- crafted classifiers ------------------------------------------------------------------------------------
def classifier_case(name: str, mutate: Callable[[Path, Path], None], expect: str = ""):
    def setup(folder: Path, runs: dict) -> list:
        cls = copy_run(runs["cls"], folder / "cls")
        mutate(cls, folder)
        return ["sample", runs["run"], "--classifier", cls, "--class", "1", "--out", folder / "s.png", "--quiet",
                "--num", "4", "--steps", "2"]
    CASES.append(Case(f"classifier: {name}", setup, expect))


def _cls_record(fn):
    return lambda cls, folder: edit_json(cls / "classifier.json", fn)


def _cls_weights(make):
    return lambda cls, folder: write_weights(cls / "classifier.json", make(cls))


classifier_case("record not JSON", lambda c, f: (c / "classifier.json").write_text("]"), "not valid JSON")
classifier_case("weights path traversal", _cls_record(_set(("weights",), "../../x.safetensors")), "weights")
classifier_case("meta width huge", _cls_record(_set(("meta", "width"), 10**9)), "width")
classifier_case("meta width string", _cls_record(_set(("meta", "width"), "wide")), "width")
classifier_case("meta data_shape huge", _cls_record(_set(("meta", "data_shape"), [4096, 4096, 4096])), "data_shape")
classifier_case("meta time_scale nan", _cls_record(_set(("meta", "time_scale"), "NaN")), "time_scale")
classifier_case("meta missing", _cls_record(_drop("meta")), "meta")
classifier_case("weights a pickle", _cls_weights(lambda c: pickle.dumps(_Payload("/nonexistent/never"))), "")
classifier_case("weights misshapen", _cls_weights(lambda c: safetensors_save({"x": torch.zeros(2)})), "do not fit")
classifier_case("sha256 wrong", _cls_record(_set(("sha256",), "1" * 64)), "hash")


# --- running them --------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    argv: list
    returncode: int
    stderr: str
    seconds: float
    marker: bool
    canary_changed: bool
    timed_out: bool


def _limit_memory() -> None:  # runs in the child before exec
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def _snapshot(folder: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def _run_case(c: Case, folder: Path, runs: dict, canary: Path) -> Outcome:
    import time

    folder.mkdir(parents=True)
    argv = [str(a) for a in c.setup(folder, runs)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFLAB_")}
    env.update(HOME=str(folder / "home"), OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    before = _snapshot(canary)
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "difflab.cli", *argv], cwd=folder, env=env, capture_output=True,
                              text=True, timeout=TIME_LIMIT, preexec_fn=_limit_memory, stdin=subprocess.DEVNULL)
        rc, err, timed_out = proc.returncode, proc.stderr, False
    except subprocess.TimeoutExpired as e:
        rc, err, timed_out = -1, (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""), True
    marker = any(p.name == MARKER for p in folder.rglob(MARKER))
    return Outcome(argv, rc, err, time.perf_counter() - start, marker, _snapshot(canary) != before, timed_out)


@pytest.fixture(scope="session")
def outcomes(base_runs, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hostile")
    canary = root / "canary"
    canary.mkdir()
    (canary / "keep.txt").write_text("the user's own file")
    runs = dict(base_runs)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.name: pool.submit(_run_case, c, root / "cases" / f"{i:03d}", runs, canary)
                   for i, c in enumerate(CASES)}
        results = {name: f.result() for name, f in futures.items()}
    summary = {"cases": len(results),
               "one_line_errors": sum(_is_one_line_error(o) for o in results.values()),
               "tracebacks": sum("Traceback" in o.stderr for o in results.values()),
               "hangs": sum(o.timed_out for o in results.values()),
               "silent_acceptances": sum(o.returncode == 0 for o in results.values()),
               "payloads_executed": sum(o.marker for o in results.values())}
    print("\nhostile-input summary:", json.dumps(summary))
    return results


def _is_one_line_error(o: Outcome) -> bool:
    lines = [line for line in o.stderr.splitlines() if line.strip()]
    return (o.returncode > 0 and not o.timed_out and len(lines) == 1 and lines[0].startswith("difflab: error: ")
            and "Traceback" not in o.stderr)


def test_at_least_a_hundred_cases():
    assert len(CASES) >= 100
    assert len({c.name for c in CASES}) == len(CASES), "case names must be unique"


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_hostile_input(outcomes, c):
    o = outcomes[c.name]
    shown = f"argv={o.argv[:3]} rc={o.returncode} ({o.seconds:.1f}s) stderr={o.stderr[-1500:]!r}"
    assert not o.timed_out, f"hang: {shown}"
    assert not o.marker, f"a payload ran: {shown}"
    assert not o.canary_changed, f"a file outside the case folder changed: {shown}"
    assert o.returncode > 0, f"not refused: {shown}"
    assert _is_one_line_error(o), f"not one line: {shown}"
    assert c.expect.lower() in o.stderr.lower(), f"the error does not name {c.expect!r}: {shown}"
