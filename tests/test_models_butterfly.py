"""models/butterfly.py: the kernels' split, init equals LongConv, learned factors (gradcheck through
the op), old checkpoints refused clearly, compile."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from lcconv_compile.models import ButterflyLongConv, LongConv
from lcconv_compile.reference import butterfly_split


@pytest.mark.parametrize("l_max,shape", [(1, (1, 1, 1, 2)), (64, (16, 8, 8, 2)), (300, (64, 16, 16, 2)),
                                         (5000, (1024, 16, 16, 2))])
def test_factors_have_the_kernels_split(l_max, shape):
    layer = ButterflyLongConv(2, l_max)
    assert layer.in_factor.shape == layer.out_factor.shape == shape
    n1, n2 = butterfly_split(layer.fft_size)
    assert shape == (n2, n1, n1, 2)
    assert f"({n1}x{n2})" in repr(layer)


def test_split_at_64k_is_16_by_8192():
    """l_max = 64K: N = 128K = 16 x 8192, a 16 MB factor (the old sqrt(N) split made it 268 MB)."""
    layer = ButterflyLongConv(1, 1 << 16, learn_butterfly=False)
    assert layer.in_factor.shape == (8192, 16, 16, 2)


def test_forward_is_one_butterfly_conv_op():
    layer = ButterflyLongConv(4, 16)
    gm = make_fx(layer)(torch.randn(2, 16, 4))
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert "lcconv.butterfly_conv.default" in targets
    assert not any(t.startswith("aten._fft") for t in targets), targets


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


def test_gradcheck_of_learned_factors_through_the_model():
    """float64, small N (l_max 12: N = 32 = 4 x 8), factors moved off the exact FFT."""
    layer = ButterflyLongConv(3, 12, dtype=torch.float64, activation="gelu").eval()
    with torch.no_grad():
        layer.in_factor.add_(0.1 * torch.randn_like(layer.in_factor))
        layer.out_factor.add_(0.1 * torch.randn_like(layer.out_factor))
    x = torch.randn(2, 10, 3, dtype=torch.float64)
    in_f, out_f = (layer.in_factor.detach().clone().requires_grad_(), layer.out_factor.detach().clone().requires_grad_())

    def f(in_factor, out_factor):
        return torch.func.functional_call(layer, {"in_factor": in_factor, "out_factor": out_factor}, (x,))

    assert torch.autograd.gradcheck(f, (in_f, out_f))


def test_old_split_checkpoint_is_refused_clearly():
    layer = ButterflyLongConv(4, 300)  # N = 1024: now 16 x 64; the old split was 32 x 32
    state = layer.state_dict()
    state["in_factor"] = torch.zeros(32, 32, 32, 2)
    with pytest.raises(ValueError, match=r"checkpoint `in_factor` has shape \(32, 32, 32, 2\) but this layer's is "
                                         r"\(64, 16, 16, 2\).*butterfly_split\(1024\).*reset_butterfly"):
        layer.load_state_dict(state)
    layer.load_state_dict(layer.state_dict())  # same split: loads
