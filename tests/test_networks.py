"""Denoiser networks: the call contract (shapes, labels, context, time), parameter counts, errors."""

import math

import pytest
import torch

from difflab import DiscretePath, LinearPath, NetworkDenoiser
from difflab.networks import (NULL_LABEL, MLPDenoiser, UNet, build_network, count_parameters, network_options,
                              network_time_fn, timestep_embedding)

# Small enough that the whole file runs in a few seconds on one core.
TINY_UNET = dict(base_channels=8, num_res_blocks=1, num_heads=2)


def randomise_output_layer(net: torch.nn.Module, gen: torch.Generator) -> None:
    """Replace the zero-initialised last layer by random weights, so the output depends on the input."""
    last = net.conv_out if isinstance(net, UNet) else net.out
    with torch.no_grad():
        last.weight.copy_(0.1 * torch.randn(last.weight.shape, generator=gen))
        last.bias.copy_(0.1 * torch.randn(last.bias.shape, generator=gen))


def tiny_net(shape, **kwargs):
    if len(shape) == 3:
        return build_network("unet", shape, **TINY_UNET, **kwargs)
    return build_network("mlp", shape, hidden=32, depth=2, time_dim=16, **kwargs)


SHAPES = [(2,), (3, 4), (1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("learned_variance", [False, True])
def test_output_shape_and_zero_initialisation(shape, learned_variance, gen):
    net = tiny_net(shape, learned_variance=learned_variance)
    x = torch.randn(3, *shape, generator=gen)
    out = net(x, torch.tensor([0.0, 500.0, 1000.0]))
    expected = (3, 2 * shape[0], *shape[1:]) if learned_variance else (3, *shape)
    assert out.shape == expected
    # the last layer is zero-initialised, so the untrained network predicts exactly 0
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=str)
def test_null_label_matches_no_label_and_labels_matter(shape, gen):
    net = tiny_net(shape, num_classes=3).eval()
    randomise_output_layer(net, gen)
    x, t = torch.randn(4, *shape, generator=gen), torch.tensor([10.0, 200.0, 600.0, 999.0])
    with torch.no_grad():
        none = net(x, t)
        null = net(x, t, y=torch.full((4,), NULL_LABEL))
        mixed = net(x, t, y=torch.tensor([NULL_LABEL, 2, NULL_LABEL, 2]))
        two = net(x, t, y=torch.full((4,), 2))
    # float32 round-off only: the same computation per sample (no cross-sample ops in eval mode)
    torch.testing.assert_close(null, none, rtol=0, atol=1e-6)
    torch.testing.assert_close(mixed[[0, 2]], none[[0, 2]], rtol=0, atol=1e-5)
    torch.testing.assert_close(mixed[[1, 3]], two[[1, 3]], rtol=0, atol=1e-5)
    assert (two - none).abs().max() > 1e-3


def test_label_errors(gen):
    x, t = torch.randn(2, 2, generator=gen), torch.zeros(2)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_net((2,))(x, t, y=torch.tensor([0, 1]))
    tiny_net((2,))(x, t, y=torch.tensor([NULL_LABEL, NULL_LABEL]))  # all-null is fine without classes
    with pytest.raises(ValueError, match="0..2"):
        tiny_net((2,), num_classes=3)(x, t, y=torch.tensor([0, 3]))


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=str)
def test_output_depends_on_time(shape, gen):
    net = tiny_net(shape)
    randomise_output_layer(net, gen)
    x = torch.randn(2, *shape, generator=gen)
    with torch.no_grad():
        assert (net(x, torch.full((2,), 100.0)) - net(x, torch.full((2,), 900.0))).abs().max() > 1e-3
        # a scalar time is broadcast to the batch
        torch.testing.assert_close(net(x, torch.tensor(100.0)), net(x, torch.full((2,), 100.0)))


def test_cross_attention_context(gen):
    net = build_network("unet", (1, 8, 8), context_dim=6, attn_resolutions=(4, 2), **TINY_UNET)
    randomise_output_layer(net, gen)
    x, t = torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([5.0, 700.0])
    c1, c2 = torch.randn(2, 5, 6, generator=gen), torch.randn(2, 5, 6, generator=gen)
    with torch.no_grad():
        out1, out2, out_none = net(x, t, context=c1), net(x, t, context=c2), net(x, t)
        out_short = net(x, t, context=c1[:, :1])  # any context length L works
    assert out1.shape == out2.shape == out_short.shape == x.shape
    assert (out1 - out2).abs().max() > 1e-3 and (out1 - out_none).abs().max() > 1e-3
    with pytest.raises(ValueError, match="context must have shape"):
        net(x, t, context=torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="without context_dim"):
        build_network("unet", (1, 8, 8), **TINY_UNET)(x, t, context=c1)
    with pytest.raises(ValueError, match="attention resolution"):
        build_network("unet", (1, 8, 8), context_dim=6, attn_resolutions=(), **TINY_UNET)


@pytest.mark.parametrize("shape", [(2,), (1, 8, 8)], ids=str)
def test_gradient_reaches_every_parameter_and_the_input(shape, gen):
    kwargs = dict(num_classes=3) | (dict(context_dim=4) if len(shape) == 3 else {})
    net = tiny_net(shape, **kwargs)
    randomise_output_layer(net, gen)
    x = torch.randn(4, *shape, generator=gen, requires_grad=True)
    cond = dict(y=torch.tensor([0, 1, 2, NULL_LABEL]))
    if len(shape) == 3:
        cond["context"] = torch.randn(4, 3, 4, generator=gen)
    net(x, torch.tensor([1.0, 50.0, 400.0, 900.0]), **cond).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_mlp_parameter_count_closed_form():
    D, h, depth, f, K = 6, 32, 3, 16, 4
    net = MLPDenoiser((2, 3), hidden=h, depth=depth, time_dim=f, num_classes=K, learned_variance=True)
    time_mlp = (f * h + h) + (h * h + h)
    blocks = depth * (2 * h + 3 * (h * h + h))  # LayerNorm + fc1, emb_proj, fc2
    expected = time_mlp + (K + 1) * h + (D * h + h) + blocks + 2 * h + (h * 2 * D + 2 * D)
    assert count_parameters(net) == expected


def test_unet_parameter_count_differences():
    """Conditioning and learned variance add exactly their own layers' parameters."""
    base = count_parameters(UNet(**TINY_UNET))
    emb_dim, last_width = 4 * TINY_UNET["base_channels"], TINY_UNET["base_channels"]
    assert count_parameters(UNet(num_classes=10, **TINY_UNET)) - base == 11 * emb_dim  # 10 classes + null row
    assert count_parameters(UNet(learned_variance=True, **TINY_UNET)) - base == 1 * (9 * last_width + 1)


def test_default_digits_unet_size():
    """The default 28×28 U-Net is the 1–3 M parameter "digits" size (1,718,209 when this was written)."""
    assert 1_000_000 <= count_parameters(build_network("unet", (1, 28, 28))) <= 3_000_000


def test_bad_sizes_and_options_raise():
    with pytest.raises(ValueError, match="divisible by 2"):
        UNet(image_size=30, channel_mults=(1, 2, 2))
    with pytest.raises(ValueError, match="attn_resolutions"):
        UNet(image_size=32, attn_resolutions=(7,))
    with pytest.raises(ValueError, match="divisible by 2"):
        build_network("unet", (1, 8, 6))  # a rectangle whose width does not halve twice
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        build_network("unet", (8, 8))
    with pytest.raises(ValueError, match="choose one of"):
        build_network("transformer", (2,))
    with pytest.raises(ValueError, match="allowed"):
        build_network("mlp", (2,), base_channels=8)
    with pytest.raises(ValueError, match="expects input"):
        UNet(**TINY_UNET)(torch.zeros(1, 1, 8, 8), torch.zeros(1))
    assert "base_channels" in network_options("unet") and "image_size" not in network_options("unet")


def test_time_embedding_and_time_convention():
    t = torch.tensor([0.0, 3.0])
    e = timestep_embedding(t, 8)
    omega = 10000.0 ** (-torch.arange(4) / 4)  # ω_k = P^(−k/(d/2))
    torch.testing.assert_close(e[1], torch.cat([torch.cos(3 * omega), torch.sin(3 * omega)]))
    torch.testing.assert_close(e[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    assert network_time_fn(DiscretePath.from_schedule("linear", T=100)) is None
    fn = network_time_fn(LinearPath())
    assert math.isclose(float(fn(torch.tensor(LinearPath().t_max))), 1000.0)


def test_network_denoiser_splits_learned_variance(gen):
    path = DiscretePath.from_schedule("linear", T=100)
    net = build_network("unet", (1, 8, 8), learned_variance=True, **TINY_UNET)
    pred = NetworkDenoiser(net, path, "eps", learned_variance=True)(torch.randn(2, 1, 8, 8, generator=gen), 50)
    assert pred.eps.shape == pred.var_interp.shape == (2, 1, 8, 8)


def test_a_rectangular_unet_keeps_its_shape():
    """(H, W) = (8, 16), as the 28×56 two-digit canvas: two levels, attention by height at 4."""
    net = build_network("unet", (1, 8, 16), base_channels=8, channel_mults=(1, 2), num_res_blocks=1,
                        attn_resolutions=(4,), num_heads=2, context_dim=6)
    x = torch.randn(2, 1, 8, 16)
    assert net(x, torch.tensor([3.0, 7.0]), context=torch.randn(2, 3, 6)).shape == x.shape
