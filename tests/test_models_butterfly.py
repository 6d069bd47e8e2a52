"""models/butterfly.py: exact factors are the FFT, init equals LongConv, learned factors, compile."""

import pytest
import torch

from lcconv_compile import reference
from lcconv_compile.models import ButterflyLongConv, LongConv
from lcconv_compile.models.butterfly import butterfly_conv, exact_fft_factors, monarch_sizes
from oracles import direct_causal_conv


@pytest.mark.parametrize("n", [1, 2, 8, 32, 128])
def test_exact_in_factor_then_row_ffts_is_the_fft(n):
    """Step 1 (in_factor) followed by length-N2 FFTs along the rows is F_N, in the k1 + N1*k2 order."""
    n1, n2 = monarch_sizes(n)
    assert n1 * n2 == n and n1 <= n2
    in_factor, out_factor = exact_fft_factors(n)
    x = torch.randn(n, dtype=torch.complex128)
    z = torch.einsum("cki,ic->kc", in_factor, x.view(n1, n2))
    spectrum = torch.fft.fft(z, dim=-1)  # [k1, k2]
    torch.testing.assert_close(spectrum.transpose(0, 1).reshape(n), torch.fft.fft(x))
    # out_factor inverts in_factor column by column.
    eye = torch.eye(n1, dtype=torch.complex128).expand(n2, n1, n1)
    torch.testing.assert_close(out_factor @ in_factor, eye)


def test_butterfly_conv_with_exact_factors_is_the_causal_convolution():
    u, k = torch.randn(2, 3, 45, dtype=torch.float64), torch.randn(3, 30, dtype=torch.float64)
    factors = exact_fft_factors(reference.fft_size(45, 45))
    expected = direct_causal_conv(u, k)
    torch.testing.assert_close(butterfly_conv(u, k, *factors), expected, rtol=1e-10, atol=1e-12)


def test_monarch_sizes_rejects_non_powers_of_two():
    with pytest.raises(ValueError, match="power of two, got 12"):
        monarch_sizes(12)


@pytest.mark.parametrize("options", [{}, {"bidirectional": True}, {"smooth_radius": 2, "dropout": 0.2}])
@pytest.mark.parametrize("l_max,seqlen", [(64, 64), (50, 17), (1, 1)])
def test_at_init_equals_longconv(options, l_max, seqlen, fresh_seed):
    if "smooth_radius" in options:  # the smoothing window must fit in the kernel
        options = {**options, "smooth_radius": min(options["smooth_radius"], (l_max - 1) // 2)}
    seed = fresh_seed
    torch.manual_seed(seed)
    plain = LongConv(8, l_max, dtype=torch.float64, **options).eval()
    torch.manual_seed(seed)
    butterfly = ButterflyLongConv(8, l_max, dtype=torch.float64, **options).eval()
    for name, param in plain.named_parameters():
        torch.testing.assert_close(butterfly.get_parameter(name), param, rtol=0, atol=0)
    x = torch.randn(3, seqlen, 8, dtype=torch.float64)
    torch.testing.assert_close(butterfly(x), plain(x), rtol=1e-11, atol=1e-13)


def test_at_init_gradients_equal_longconv(fresh_seed):
    torch.manual_seed(fresh_seed)
    plain = LongConv(6, 32, dtype=torch.float64)
    torch.manual_seed(fresh_seed)
    butterfly = ButterflyLongConv(6, 32, dtype=torch.float64)
    x = torch.randn(2, 32, 6, dtype=torch.float64)
    plain(x).square().sum().backward()
    butterfly(x).square().sum().backward()
    for name, param in plain.named_parameters():
        torch.testing.assert_close(butterfly.get_parameter(name).grad, param.grad, rtol=1e-9, atol=1e-11)
    assert butterfly.in_factor.grad.abs().sum() > 0 and butterfly.out_factor.grad.abs().sum() > 0


def test_exact_factors_are_causal_learned_ones_are_not():
    layer = ButterflyLongConv(8, 40, dtype=torch.float64)
    assert not layer.is_causal  # learned factors: a general mixer, as documented
    x = torch.randn(2, 40, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, 20:] = torch.randn_like(x2[:, 20:])
    assert (layer(x2) - layer(x))[:, :20].abs().max() < 1e-12  # exact at init
    with torch.no_grad():
        layer.in_factor.add_(0.01 * torch.randn_like(layer.in_factor))
    assert (layer(x2) - layer(x))[:, :20].abs().max() > 1e-6  # trained factors see the future
    layer.reset_butterfly()
    assert (layer(x2) - layer(x))[:, :20].abs().max() < 1e-12


def test_fixed_factors_are_buffers_and_causal():
    layer = ButterflyLongConv(8, 16, learn_butterfly=False)
    assert layer.is_causal
    names = {name for name, _ in layer.named_parameters()}
    assert "in_factor" not in names and "in_factor" in dict(layer.named_buffers())
    assert not ButterflyLongConv(8, 16, learn_butterfly=False, bidirectional=True).is_causal


def test_float32_close_to_longconv(fresh_seed):
    torch.manual_seed(fresh_seed)
    plain = LongConv(16, 256)
    torch.manual_seed(fresh_seed)
    butterfly = ButterflyLongConv(16, 256)
    x = torch.randn(2, 256, 16)
    y_plain = plain(x)
    assert ((butterfly(x) - y_plain).norm() / y_plain.norm()).item() < 1e-5


def test_compiled_equals_eager():
    layer = ButterflyLongConv(8, 32)
    x = torch.randn(2, 30, 8, requires_grad=True)
    y_c = torch.compile(layer, fullgraph=True)(x)
    g_c = torch.autograd.grad(y_c.square().sum(), [x, layer.in_factor])
    y_e = layer(x)
    g_e = torch.autograd.grad(y_e.square().sum(), [x, layer.in_factor])
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_c, g_e):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
