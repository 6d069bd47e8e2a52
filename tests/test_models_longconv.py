"""models/longconv.py: LongConv shapes, causality, Squash/Smooth formulas, gradients, compile, errors."""

import pytest
import torch
import torch.nn.functional as F

from lcconv_compile.models import LongConv
from lcconv_compile.models.longconv import smooth_kernel, squash_kernel
from oracles import direct_causal_conv


def changed_after(module, x, t):
    """Max |change| of the outputs at positions <= t and > t when inputs after t are redrawn."""
    y = module(x)
    x2 = x.clone()
    x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])
    y2 = module(x2)
    return (y2 - y)[:, : t + 1].abs().max().item(), (y2 - y)[:, t + 1 :].abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_shapes_and_dtypes(dtype, bidirectional):
    layer = LongConv(12, 40, bidirectional=bidirectional, dtype=dtype)
    x = torch.randn(3, 33, 12, dtype=dtype)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert torch.isfinite(y).all()


def test_bfloat16_autocast():
    layer = LongConv(8, 32)
    x = torch.randn(2, 32, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    assert (y.float() - layer(x)).abs().max() < 0.1 * layer(x).abs().max()


@pytest.mark.parametrize("options", [{}, {"smooth_radius": 2}, {"out_proj": "linear", "in_proj": False}])
def test_causal(options):
    layer = LongConv(8, 50, **options).double()
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    before, after = changed_after(layer, x, t=21)
    assert before < 1e-12 and after > 1e-3
    assert layer.is_causal


def test_bidirectional_sees_the_future_and_matches_the_formula():
    layer = LongConv(6, 30, bidirectional=True, in_proj=False, out_proj="none", activation="identity",
                     squash_lambda=0.0).double()
    assert not layer.is_causal
    x = torch.randn(2, 30, 6, dtype=torch.float64)
    before, _ = changed_after(layer, x, t=10)
    assert before > 1e-3  # non-causal, as documented
    # y[t] = sum_{s<=t} k0[t-s] u[s] + sum_{s>=t} k1[s-t] u[s] + D u[t]
    u = x.transpose(1, 2)
    k0, k1 = layer.kernel_weight.detach()
    expected = direct_causal_conv(u, k0, layer.D.detach())
    expected += direct_causal_conv(u.flip(-1), k1).flip(-1)
    torch.testing.assert_close(layer(x), expected.transpose(1, 2), rtol=1e-10, atol=1e-12)


def test_forward_is_the_paper_block():
    """in_proj -> conv + D (fused GELU) -> GLU out_proj, against a direct O(L^2) computation."""
    layer = LongConv(5, 24, smooth_radius=1, squash_lambda=0.01).double()
    x = torch.randn(2, 24, 5, dtype=torch.float64)
    u = layer.in_proj(x).transpose(1, 2)
    k = squash_kernel(smooth_kernel(layer.kernel_weight, 1), 0.01)[0]
    c = F.gelu(direct_causal_conv(u, k, layer.D))
    expected = layer.out_proj(c.transpose(1, 2))
    torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("radius", [1, 3])
def test_smooth_is_a_centred_average(radius):
    kernel = torch.randn(2, 3, 17, dtype=torch.float64)
    padded = F.pad(kernel, (radius, radius))
    expected = torch.stack(
        [padded[..., t : t + 2 * radius + 1].sum(-1) for t in range(17)], dim=-1
    ) / (2 * radius + 1)
    torch.testing.assert_close(smooth_kernel(kernel, radius), expected)
    assert smooth_kernel(kernel, 0) is kernel


def test_squash_is_a_soft_threshold():
    kernel = torch.randn(4, 50, dtype=torch.float64)
    lam = 0.5
    out = squash_kernel(kernel, lam)
    for value, got in zip(kernel.flatten().tolist(), out.flatten().tolist()):
        expected = 0.0 if abs(value) <= lam else value - lam * (1 if value > 0 else -1)
        assert got == pytest.approx(expected, abs=1e-15)
    assert (out == 0).any() and (out != 0).any()


def test_layer_applies_smooth_then_squash_and_cuts_to_the_sequence():
    layer = LongConv(4, 20, smooth_radius=2, squash_lambda=0.01, kernel_std=0.05).double()
    expected = squash_kernel(smooth_kernel(layer.kernel_weight, 2), 0.01)[0, :, :13]
    torch.testing.assert_close(layer.kernel(13), expected)
    plain = LongConv(4, 20, smooth_radius=0, squash_lambda=0.0).double()
    torch.testing.assert_close(plain.kernel(20), plain.kernel_weight[0])


def test_kernel_dropout_only_in_training():
    layer = LongConv(8, 64, kernel_dropout=0.5, squash_lambda=0.0)
    layer.train()
    k = layer.kernel(64)
    zeroed = (k == 0).float().mean().item()
    assert 0.3 < zeroed < 0.7
    torch.testing.assert_close(k[k != 0], 2 * layer.kernel_weight[0][k != 0])
    layer.eval()
    torch.testing.assert_close(layer.kernel(64), layer.kernel_weight[0])


def test_channel_dropout_is_one_mask_per_batch_and_channel():
    layer = LongConv(16, 32, dropout=0.5, in_proj=False, out_proj="none", activation="identity").train()
    x = torch.randn(4, 32, 16)
    y = layer(x)
    dropped = (y == 0).all(dim=1)  # (B, H): whole channels zeroed
    assert dropped.any() and not dropped.all()
    assert ((y == 0).any(dim=1) == dropped).all()


def test_initialisations():
    torch.manual_seed(0)
    random = LongConv(16, 256, kernel_init="random", kernel_std=0.1).kernel_weight[0]
    geometric = LongConv(16, 256, kernel_init="geometric", kernel_std=0.1).kernel_weight[0]
    assert random.std().item() == pytest.approx(0.1, rel=0.1)
    # Geometric decay: late taps are much smaller than early ones, more so for later channels.
    head, tail = geometric[:, :32].abs().mean(1), geometric[:, -32:].abs().mean(1)
    assert (tail < head).all()
    assert tail[-1] / head[-1] < 1e-2 and tail[0] / head[0] > 0.1


def test_gradients_reach_every_parameter():
    layer = LongConv(8, 32, bidirectional=True, smooth_radius=1, squash_lambda=1e-4, dropout=0.1)
    layer(torch.randn(2, 32, 8)).square().mean().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("bidirectional", [False, True])
def test_compiled_equals_eager(bidirectional):
    layer = LongConv(8, 32, bidirectional=bidirectional, smooth_radius=1)
    x = torch.randn(2, 29, 8, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True)
    y_c = compiled(x)
    (g_c,) = torch.autograd.grad(y_c.square().sum(), x)
    y_e = layer(x)
    (g_e,) = torch.autograd.grad(y_e.square().sum(), x)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_c, g_e, rtol=1e-5, atol=1e-5)


def test_key_padding_positions_feed_no_one():
    layer = LongConv(8, 32, bidirectional=True).double()
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[0, :4] = True  # left padding
    pad[1, 15:] = True  # right padding
    x2 = x.clone()
    x2[pad] = torch.randn_like(x2[pad])
    y, y2 = layer(x, key_padding_mask=pad), layer(x2, key_padding_mask=pad)
    torch.testing.assert_close(y[~pad], y2[~pad])
    assert (layer(x) - y)[~pad].abs().max() > 1e-3  # the mask does act


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=0, l_max=8), "d_model must be a positive integer, got 0"),
        (dict(d_model=8, l_max=8, kernel_init="zeros"), "unknown kernel_init 'zeros'"),
        (dict(d_model=8, l_max=8, out_proj="mlp"), "unknown out_proj 'mlp'"),
        (dict(d_model=8, l_max=8, smooth_radius=4), "smooth_radius .* l_max = 8, got p = 4"),
        (dict(d_model=8, l_max=8, squash_lambda=-1.0), "squash_lambda must be >= 0, got -1.0"),
        (dict(d_model=8, l_max=8, dropout=1.0), "dropout must be in \\[0, 1\\), got 1.0"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LongConv(**kwargs)


def test_sequence_longer_than_l_max():
    layer = LongConv(8, 16)
    with pytest.raises(ValueError, match="L = 17 exceeds l_max = 16"):
        layer(torch.randn(1, 17, 8))
    with pytest.raises(ValueError, match="d_model=8"):
        layer(torch.randn(1, 16, 9))


@pytest.mark.parametrize("bidirectional", [False, True])
def test_export_with_a_dynamic_length_up_to_l_max(bidirectional):
    # Dim("L", max=l_max) works, L = l_max included (no hidden l_max - 1 bound); longer inputs
    # are refused by the exported program as they are by the layer.
    from torch.export import Dim, export

    layer = LongConv(8, 24, smooth_radius=1, bidirectional=bidirectional).double().eval()
    program = export(layer, (torch.randn(2, 10, 8, dtype=torch.float64),),
                     dynamic_shapes={"x": {1: Dim("L", max=24)}})
    for seqlen in (1, 2, 17, 24):
        x = torch.randn(2, seqlen, 8, dtype=torch.float64)
        torch.testing.assert_close(program.module()(x), layer(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(AssertionError, match=r"Guard failed: x.size\(\)\[1\] <= 24"):
        program.module()(torch.randn(2, 25, 8, dtype=torch.float64))
