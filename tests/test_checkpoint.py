"""Checkpoints: exact round trips without pickles and atomic writes (tests/test_engine.py kills training with
SIGKILL for every objective)."""

import json
import os

import pytest
import torch
from torch import nn

from difflab import checkpoint as ckpt_mod
from difflab.checkpoint import (CheckpointError, atomic_write_bytes, flatten_state, list_checkpoints,
                                load_checkpoint, save_checkpoint, unflatten_state)
from difflab.config import RunConfig
from difflab.ema import EMA

def _trained(steps=3, seed=0):
    """A small net, its AdamW (with state) and EMA after a few steps on a fixed regression."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    ema = EMA(net, decay=0.9)
    x, y = torch.randn(16, 3), torch.randn(16, 2)
    for k in range(1, steps + 1):
        opt.zero_grad()
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        ema.update(net, k)
    return net, opt, ema, (x, y)


def _step(net, opt, data):
    x, y = data
    opt.zero_grad()
    ((net(x) - y) ** 2).mean().backward()
    opt.step()
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def test_flatten_round_trip_keeps_types_exactly():
    state = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(2)}},
             "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": [0], "__weird": None}]}
    tensors = {}
    skeleton = flatten_state(state, "opt", tensors)
    json.dumps(skeleton)  # the skeleton is plain JSON
    back = unflatten_state(json.loads(json.dumps(skeleton)), tensors)
    assert back["param_groups"][0]["betas"] == (0.9, 0.999) and isinstance(back["param_groups"][0]["betas"], tuple)
    assert list(back["state"]) == [0]
    assert torch.equal(back["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    with pytest.raises(TypeError, match="cannot store"):
        flatten_state({"f": object()}, "x", {})


def test_save_load_round_trip_resumes_the_optimizer_bit_for_bit(tmp_path):
    net, opt, ema, data = _trained()
    cfg = RunConfig()
    save_checkpoint(tmp_path, 3, cfg, net.state_dict(), ema.state_dict(), opt.state_dict(),
                    meta={"data_shape": [3], "bookkeeping": {"loss": 0.5}})
    ck = load_checkpoint(tmp_path)
    assert ck.step == 3 and ck.config == cfg and ck.meta["bookkeeping"] == {"loss": 0.5}
    for name, t in net.state_dict().items():
        assert torch.equal(ck.model[name], t)
        assert torch.equal(ck.ema["shadow"][name], ema.shadow[name])
    assert ck.ema["num_updates"] == ema.num_updates
    # A fresh net + optimiser restored from the checkpoint takes exactly the same next step.
    net2 = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1.0)
    net2.load_state_dict(ck.model)
    opt2.load_state_dict(ck.optimizer)
    assert torch.equal(_step(net, opt, data), _step(net2, opt2, data))


def test_files_are_safetensors_and_json_only(tmp_path):
    net, opt, ema, _ = _trained()
    save_checkpoint(tmp_path, 1, RunConfig(), net.state_dict(), ema.state_dict(), opt.state_dict())
    files = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert files == ["latest.json", "step_00000001.json", "step_00000001.safetensors"]
    weights = (tmp_path / "checkpoints" / "step_00000001.safetensors").read_bytes()
    header_len = int.from_bytes(weights[:8], "little")  # safetensors: u64 header length + JSON header
    header = json.loads(weights[8:8 + header_len])
    assert any(k.startswith("optimizer.state.") for k in header) and any(k.startswith("ema.shadow.") for k in header)
    for f in ("latest.json", "step_00000001.json"):
        json.loads((tmp_path / "checkpoints" / f).read_text())


def test_keep_prunes_old_checkpoints_and_latest_moves(tmp_path):
    net, _, _, _ = _trained(steps=1)
    for step in (1, 2, 3, 4):
        save_checkpoint(tmp_path, step, RunConfig(), net.state_dict(), keep=2)
    assert list_checkpoints(tmp_path) == [3, 4]
    assert load_checkpoint(tmp_path).step == 4
    assert load_checkpoint(tmp_path, 3).step == 3
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path, 1)


def test_corrupt_weights_are_detected(tmp_path):
    net, _, _, _ = _trained(steps=1)
    save_checkpoint(tmp_path, 1, RunConfig(), net.state_dict())
    f = tmp_path / "checkpoints" / "step_00000001.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the hash"):
        load_checkpoint(tmp_path)


def test_missing_run_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope")


def test_a_write_interrupted_before_the_pointer_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """Crash inside the second checkpoint's JSON write: latest.json still names step 1, which loads."""
    net, _, _, _ = _trained(steps=1)
    save_checkpoint(tmp_path, 1, RunConfig(), net.state_dict())
    real_replace = os.replace

    def crash_on_json(src, dst):
        if str(dst).endswith("step_00000002.json"):
            raise OSError("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(ckpt_mod.os, "replace", crash_on_json)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(tmp_path, 2, RunConfig(), net.state_dict())
    monkeypatch.undo()
    assert load_checkpoint(tmp_path).step == 1
    assert not list((tmp_path / "checkpoints").glob(".*.tmp")), "the temp file is cleaned up"


def test_atomic_write_replaces_whole_files(tmp_path):
    f = tmp_path / "a.bin"
    atomic_write_bytes(f, b"old")
    atomic_write_bytes(f, b"new contents")
    assert f.read_bytes() == b"new contents"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]
