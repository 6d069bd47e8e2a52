"""models/h3.py: the H3 mixer's math, causality, step == forward, gradients, compile, errors."""

import pytest
import torch

from lcconv_compile.models import H3
from oracles import direct_causal_conv


def make(d_model=8, l_max=40, **kw):
    return H3(d_model, l_max, **kw).double()


def test_ssm_kernel_is_the_zoh_vandermonde_product():
    layer = make(d_state=8)
    dt = layer.log_dt.exp()[:, None]
    A = torch.complex(-layer.log_A_real.exp(), layer.A_imag)
    B, C = torch.view_as_complex(layer.B), torch.view_as_complex(layer.C)
    A_bar, B_bar = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A * B
    expected = torch.stack([2 * (C * B_bar * A_bar**l).sum(-1).real for l in range(25)], dim=-1)
    torch.testing.assert_close(layer.ssm_kernel(25), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_dim", [1, 2, 4])
def test_forward_is_the_h3_formula(head_dim):
    """q * (diag_conv(shift(k) (outer) v) + D kv), with direct O(L^2) convolutions."""
    layer = make(head_dim=head_dim, shift_len=3)
    x = torch.randn(2, 21, 8, dtype=torch.float64)
    q, k, v = (proj(x).transpose(1, 2) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    k = direct_causal_conv(k, layer.shift_kernel, layer.shift_D)
    kernel = layer.ssm_kernel(21)
    heads, hd = layer.n_heads, head_dim
    y = torch.zeros(2, heads, hd, 21, dtype=torch.float64)
    for h in range(heads):
        for i in range(hd):
            for j in range(hd):
                kv = k[:, h * hd + i] * v[:, h * hd + j]
                s = direct_causal_conv(kv[:, None], kernel[h : h + 1], layer.D[h : h + 1])[:, 0]
                y[:, h, j] += q[:, h * hd + i] * s
    expected = layer.out_proj(y.reshape(2, 8, 21).transpose(1, 2))
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_causal(head_dim):
    layer = make(head_dim=head_dim)
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 12:] = torch.randn_like(x2[:, 12:])
    diff = layer(x2) - y
    assert diff[:, :12].abs().max() < 1e-12 and diff[:, 12:].abs().max() > 1e-3


@pytest.mark.parametrize("head_dim,shift_len,seqlen", [(1, 4, 37), (2, 5, 23), (4, 3, 16), (1, 8, 5)])
def test_step_equals_forward(head_dim, shift_len, seqlen):
    layer = make(head_dim=head_dim, shift_len=shift_len, d_state=6)
    x = torch.randn(3, seqlen, 8, dtype=torch.float64)
    y = layer(x)
    state = layer.allocate_state(3)
    assert state.ssm.dtype == torch.complex128 and state.shift.shape == (3, 8, shift_len - 1)
    outputs = []
    for t in range(seqlen):
        y_t, state = layer.step(x[:, t], state)
        outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs, 1), y, rtol=1e-10, atol=1e-12)


def test_step_state_is_constant_size_and_continues_past_l_max():
    layer = make(l_max=8)
    state = layer.allocate_state(2)
    sizes = {(state.shift.shape, state.ssm.shape)}
    for _ in range(12):  # beyond l_max: the recurrence has no length limit
        _, state = layer.step(torch.randn(2, 8, dtype=torch.float64), state)
        sizes.add((state.shift.shape, state.ssm.shape))
    assert len(sizes) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(dtype):
    layer = H3(16, 64, head_dim=4, dtype=dtype)
    x = torch.randn(2, 50, 16, dtype=dtype)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()


def test_float32_matches_float64():
    layer = make(d_model=16, l_max=512)
    x = torch.randn(2, 512, 16, dtype=torch.float64)
    y64 = layer(x)
    y32 = layer.float()(x.float())
    assert ((y32.double() - y64).norm() / y64.norm()).item() < 1e-4


@pytest.mark.parametrize("head_dim", [1, 2])
def test_gradients_reach_every_parameter(head_dim):
    layer = H3(8, 32, head_dim=head_dim)
    layer(torch.randn(2, 32, 8)).square().mean().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_compiled_equals_eager():
    layer = H3(8, 32, head_dim=2)
    x = torch.randn(2, 27, 8, requires_grad=True)
    y_c = torch.compile(layer, fullgraph=True)(x)
    grads_c = torch.autograd.grad(y_c.square().sum(), [x, layer.log_dt, layer.shift_kernel])
    y_e = layer(x)
    grads_e = torch.autograd.grad(y_e.square().sum(), [x, layer.log_dt, layer.shift_kernel])
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-4)


def test_key_padding_positions_feed_no_one():
    layer = make(head_dim=2)
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[0, :5] = True
    pad[1, 9:11] = True
    x2 = x.clone()
    x2[pad] = torch.randn_like(x2[pad])
    y, y2 = layer(x, key_padding_mask=pad), layer(x2, key_padding_mask=pad)
    torch.testing.assert_close(y[~pad], y2[~pad])
    assert (layer(x) - y)[~pad].abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=10, head_dim=4), "d_model = 10 is not divisible by head_dim = 4"),
        (dict(d_model=8, d_state=5), "d_state must be even .* got 5"),
        (dict(d_model=8, shift_len=0), "shift_len must be a positive integer, got 0"),
        (dict(d_model=8, dt_min=0.1, dt_max=0.01), "dt_min=0.1, dt_max=0.01"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        H3(l_max=16, **kwargs)


def test_bad_inputs():
    layer = H3(8, 16)
    with pytest.raises(ValueError, match="L = 20 exceeds l_max = 16"):
        layer(torch.randn(1, 20, 8))
    with pytest.raises(ValueError, match="x_t of shape \\(B, d_model=8\\), got \\(1, 1, 8\\)"):
        layer.step(torch.randn(1, 1, 8), layer.allocate_state(1))
