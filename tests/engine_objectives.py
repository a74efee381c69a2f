"""The objectives every engine contract test runs (tests/test_engine.py): diffusion, DDGAN, Matryoshka (its joint phase
from step 3), the classifier and the KL autoencoder (with its patch discriminator switched on after 2 steps) through
their commands, and a toy two-module objective (a generator and a critic with two optimisers, the shape of a GAN).

Run as ``python -m tests.engine_objectives KIND RUN_DIR STEPS [--resume] [KEY=VALUE ...]`` (from the repository
root) it trains one of them, so tests can SIGKILL a real process; :func:`run` does the same in this process.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from difflab.config import load_config
from difflab.engine import Engine, Objective, Settings, Trainable
from difflab.engine.rundir import METRICS_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny2d.yaml"
BASE = ["train.log_every=1", "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.num_threads=1"]
KINDS = ("diffusion", "ddgan", "matryoshka", "classifier", "autoencoder", "two-module")
AUTOENCODER = ["data.name=digits8", "data.n=64", "autoencoder.latent_channels=2", "autoencoder.base_channels=8",
               "autoencoder.disc_weight=0.5", "autoencoder.disc_start=2", "train.batch_size=8", "train.device=cpu"]
"""The engine tests' autoencoder: 64 8×8 digits, a few thousand parameters, the adversarial term from step 3."""
DDGAN = ["diffusion.objective=ddgan", "diffusion.schedule=vp", "diffusion.T=4", "ddgan.nz=4", "ddgan.d_width=16",
         "ddgan.d_depth=1", "ddgan.lazy_reg=2"]  # R1 on every other step: resumes must keep the phase
MATRYOSHKA = ["data.name=digits8", "data.n=64", "model.kind=matryoshka", "model.conditional=true",
              "model.base_channels=8", "model.channel_mults=[1,1]", "model.num_res_blocks=1", "model.attn_resolutions=[]",
              "diffusion.objective=matryoshka", "matryoshka.inner_steps=2", "train.p_uncond=0.1", "train.batch_size=8",
              "train.device=cpu"]
"""Multi-scale diffusion of 8×8 digits and their 4×4 versions: the inner network alone for 2 steps, then jointly
(resumes at step 3 must continue in the joint phase)."""


class TwoModule(Objective):
    """A linear generator ``G(z)`` against a linear critic ``D(x)`` on 2-D points: per step a critic update with the
    non-saturating logistic loss, then a generator update through the updated critic (two optimisers, EMA on G)."""

    monitor = ("loss_d",)

    def __init__(self, cfg):
        self.config = cfg
        torch.manual_seed(cfg.train.seed)
        self.data = torch.randn(256, 2) * 0.5 + 1.0
        self.trainables = {"gen": Trainable(nn.Linear(2, 2), lr=cfg.train.lr, ema_decay=0.9, grad_clip=1.0),
                           "critic": Trainable(nn.Sequential(nn.Linear(2, 16), nn.SiLU(), nn.Linear(16, 1)),
                                               lr=cfg.train.lr, betas=(0.5, 0.9))}

    def step(self, ctx):
        B = self.config.train.batch_size
        real = self.data[ctx.indices(self.data.shape[0])]
        z = ctx.shard(torch.randn(B, 2, generator=ctx.generator))
        gen, critic = ctx.net("gen"), ctx.net("critic")
        loss_d = (F.softplus(critic(gen(z).detach())) + F.softplus(-critic(real))).mean()
        ctx.optimize("critic", loss_d)
        loss_g = F.softplus(-critic(gen(z))).mean()
        ctx.optimize("gen", loss_g)
        return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach()}


def config(kind: str, steps: int, overrides=()):
    key = "classifier.steps" if kind == "classifier" else "train.steps"
    extra = {"classifier": ["classifier.width=16", "classifier.time_dim=16", "classifier.batch_size=32",
                            "classifier.log_every=1"], "autoencoder": AUTOENCODER, "ddgan": DDGAN, "matryoshka": MATRYOSHKA}.get(kind, [])
    return load_config(TINY, [*BASE, *extra, f"{key}={steps}", *overrides])


def run(kind: str, run_dir, steps: int, *overrides, resume: bool = False, overwrite: bool = False):
    """Train ``kind`` for ``steps`` into ``run_dir`` in this process."""
    cfg = config(kind, steps, overrides)
    if kind in ("diffusion", "ddgan", "matryoshka"):
        from difflab.training import train

        return train(cfg, run_dir, resume=resume, overwrite=overwrite, progress=False)
    if kind == "classifier":
        from difflab.classifier_training import train_classifier

        return train_classifier(cfg, run_dir, resume=resume, overwrite=overwrite, progress=False, device="cpu")
    if kind == "autoencoder":
        from difflab.commands.autoencoder import train_autoencoder

        return train_autoencoder(cfg, run_dir, resume=resume, overwrite=overwrite, progress=False, device="cpu")
    return Engine(TwoModule(cfg), Settings.from_train(cfg.train), run_dir).fit(resume, overwrite)


def command(kind: str, run_dir, steps: int, *overrides, resume: bool = False) -> list:
    """The command line that trains ``kind`` in a new process (``--quiet``; run from the repository root)."""
    return [sys.executable, "-m", "tests.engine_objectives", kind, str(run_dir), str(steps),
            *(["--resume"] if resume else []), *overrides]


def start_until_checkpoint(cmd: list, run_dir, env: dict, timeout: float = 120.0):
    """Start ``cmd`` (from the repository root) and return the process once ``run_dir`` has a checkpoint."""
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    while not (Path(run_dir) / "checkpoints" / "latest.json").exists():
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read().decode())
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint appeared within {timeout:.0f} s")
        time.sleep(0.01)
    return proc


def final_state(run_dir) -> dict:
    """Every tensor of the latest checkpoint (all modules, EMAs, optimisers) and the metrics without timings."""
    import json

    from difflab.checkpoint import load_checkpoint, read_verified

    ck = load_checkpoint(run_dir)
    _, tensors = read_verified(ck.file, "difflab-checkpoint", "checkpoint")
    records = [json.loads(line) for line in (Path(run_dir) / METRICS_FILE).read_text().splitlines()]
    timings = ("samples_per_s", "elapsed", "cpu_seconds")
    return {"step": ck.step, "tensors": tensors,
            "metrics": [{k: v for k, v in r.items() if k not in timings} for r in records]}


if __name__ == "__main__":
    args = sys.argv[1:]
    kind, run_dir, steps = args[0], args[1], int(args[2])
    resume = "--resume" in args
    run(kind, run_dir, steps, *[a for a in args[3:] if a != "--resume"], resume=resume)
