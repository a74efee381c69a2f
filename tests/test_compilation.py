"""Opt-in torch.compile (difflab.compilation): same outputs as eager, same parameters, a one-line fallback."""

import warnings

import pytest
import torch
from torch import nn

from difflab import cli
from difflab.compilation import CompiledModule, maybe_compile


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 3))


def test_disabled_is_the_module_itself():
    net = small_net()
    assert maybe_compile(net, False) is net


def test_parameters_and_state_dict_are_the_original_modules():
    net = small_net()
    wrapped = CompiledModule(net, backend="eager")
    assert [p is q for p, q in zip(wrapped.parameters(), net.parameters())] == [True] * 4
    assert sorted(wrapped.state_dict()) == sorted(f"module.{k}" for k in net.state_dict())


def test_compiled_forward_matches_eager():
    """The default backend (inductor, a C++ build on CPU) where the machine has it; otherwise the fallback."""
    net, x = small_net(), torch.randn(5, 3)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        wrapped = CompiledModule(net)
        out = wrapped(x)
    torch.testing.assert_close(out, net(x), rtol=1e-5, atol=1e-6)


def test_a_compiler_failure_on_first_call_falls_back_with_one_warning(monkeypatch):
    def broken_compile(module, **options):
        def call(*args, **kwargs):
            raise RuntimeError("inductor: C++ compile failed: no compiler\nlong traceback line")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    net, x = small_net(), torch.randn(4, 3)
    wrapped = CompiledModule(net, "the test network")
    assert wrapped.compiled
    with pytest.warns(RuntimeWarning, match=r"unavailable for the test network \(RuntimeError: inductor: C\+\+ compile failed: no compiler\)"):
        out = wrapped(x)
    assert not wrapped.compiled
    torch.testing.assert_close(out, net(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        wrapped(x)


def test_an_error_of_the_model_itself_is_not_swallowed(monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda module, **options: module)
    wrapped = CompiledModule(small_net())
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        wrapped(torch.randn(4, 5))
    assert wrapped.compiled


def test_no_torch_compile_at_all(monkeypatch):
    monkeypatch.delattr(torch, "compile")
    with pytest.warns(RuntimeWarning, match="this torch has no torch.compile"):
        wrapped = CompiledModule(small_net())
    x = torch.randn(2, 3)
    torch.testing.assert_close(wrapped(x), wrapped.module(x))


def test_sample_compile_gives_the_same_samples(capsys, tmp_path, monkeypatch):
    """``difflab sample --compile`` goes through the compiled network (here a recording stand-in for
    torch.compile, so the test is fast) and writes the same samples as without."""
    import numpy as np

    run = tmp_path / "run"
    assert cli.main(["train", "configs/tiny2d.yaml", "--out", str(run), "--quiet",
                     "--set", "train.steps=4", "train.batch_size=16"]) == 0
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module, **options: compiled.append(module) or module)
    for flag, out in (([], "plain.npz"), (["--compile"], "compiled.npz")):
        assert cli.main(["sample", str(run), "--num", "8", "--steps", "5", "--sampler", "ddim", "--quiet",
                         "--out", str(tmp_path / out), *flag]) == 0
    assert len(compiled) == 1
    a, b = (np.load(tmp_path / name)["x"] for name in ("plain.npz", "compiled.npz"))
    np.testing.assert_array_equal(a, b)
