"""difflab.optim.adamw: the fused kernel gives the AdamW update; the foreach form is the fallback."""

import pytest
import torch

from difflab import optim


def _run(opt_factory, steps=5):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
    opt = opt_factory(net.parameters())
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(x), y).backward()
        opt.step()
    return opt, torch.cat([p.detach().flatten() for p in net.parameters()])


def test_fused_on_cpu_equals_reference_adamw():
    opt, fused = _run(lambda p: optim.adamw(p, lr=1e-2, weight_decay=0.1))
    assert opt.defaults["fused"] is True
    _, reference = _run(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1, foreach=False))
    torch.testing.assert_close(fused, reference, rtol=0, atol=1e-6)  # same update, summation order aside


def test_falls_back_to_foreach_where_fused_is_refused(monkeypatch):
    real = torch.optim.AdamW

    def no_fused(params, **kwargs):
        if kwargs.get("fused"):
            raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported devices")
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", no_fused)
    opt = optim.adamw(torch.nn.Linear(2, 2).parameters(), lr=1e-3)
    assert opt.defaults["foreach"] is True and not opt.defaults.get("fused")
