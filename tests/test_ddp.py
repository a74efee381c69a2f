"""Distributed training: 2 CPU processes on loopback (gloo), launched as torchrun would (env RANK/WORLD_SIZE)."""

import json
import os
import socket
from pathlib import Path

import torch
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
OVERRIDES = ["train.device=cpu", "train.steps=6", "train.batch_size=32", "train.log_every=1", "train.checkpoint_every=3", "train.lr=1e-2",
             "train.ema_decay=0.5", "model.hidden=32", "model.depth=1"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, run_dir: str, out_dir: str) -> None:
    """One rank: the environment torchrun sets, then the ordinary train() entry point."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from safetensors.torch import save_file

    from difflab.config import load_config
    from difflab.training import train

    result = train(load_config(ROOT / "configs" / "tiny2d.yaml", OVERRIDES), run_dir, progress=False)
    tensors = {f"net.{k}": v.contiguous() for k, v in result.net.state_dict().items()}
    tensors.update({f"ema.{k}": v.contiguous() for k, v in result.ema.shadow.items()})
    save_file(tensors, os.path.join(out_dir, f"rank{rank}.safetensors"))


def test_two_cpu_ranks_keep_identical_weights_and_match_one_process(tmp_path):
    from safetensors.torch import load_file

    from difflab.checkpoint import load_checkpoint
    from difflab.config import load_config
    from difflab.training import train

    run = tmp_path / "ddp"
    mp.spawn(_rank_main, args=(2, _free_port(), str(run), str(tmp_path)), nprocs=2, join=True)
    rank0, rank1 = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    for name in rank0:  # DDP all-reduces gradients, so every rank takes the identical AdamW step
        assert torch.equal(rank0[name], rank1[name]), name

    # Rank 0 alone wrote: one line per step, and the checkpoint holds rank 0's weights.
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    ck = load_checkpoint(run)
    assert ck.step == 6 and ck.meta["world_size"] == 2
    for name, t in ck.model.items():
        assert torch.equal(t, rank0[f"net.{name}"])

    # The same results contract as one process with the same global batch: each rank takes every
    # 2nd row of the global batch and gradients are averaged, so only the summation order differs.
    # 1e-5 is ~100 float32 ulps of weights of order 0.1-1 after 6 steps at lr 1e-2.
    single = train(load_config(ROOT / "configs" / "tiny2d.yaml", OVERRIDES), tmp_path / "single", progress=False)
    for name, t in single.net.state_dict().items():
        torch.testing.assert_close(t, rank0[f"net.{name}"], rtol=0, atol=1e-5)
    single_losses = [json.loads(line)["loss"] for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    torch.testing.assert_close(torch.tensor([r["loss"] for r in records]), torch.tensor(single_losses), rtol=1e-5, atol=0)
