"""reference.py against an independent oracle: the direct O(L*Lk) sum in float64."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from inputs import random_args, rel_err
from lcconv_compile import reference
from oracles import direct_fftconv

SHAPES = [  # (B, H, L, Lk): odd and prime L, Lk < L, Lk == L, B = 1, H = 1, L = 1
    (1, 1, 1, 1),
    (2, 3, 2, 1),
    (1, 4, 7, 7),
    (3, 2, 13, 5),
    (2, 5, 31, 31),
    (1, 1, 97, 40),
    (4, 3, 64, 64),
    (2, 2, 100, 3),
    (1, 2, 257, 129),
    (2, 8, 1024, 1024),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("with_D", [True, False])
def test_forward_matches_direct_sum(shape, with_D):
    args = random_args(*shape, options=False)
    if not with_D:
        args["D"] = None
    y = reference.fftconv_ref(**args)
    assert y.dtype == torch.float64 and y.is_contiguous()
    assert rel_err(y, direct_fftconv(**args)) < 1e-12


@pytest.mark.parametrize("shape", SHAPES[:7])
def test_forward_with_all_options_matches_direct_sum(shape):
    args = random_args(*shape)
    assert rel_err(reference.fftconv_ref(**args), direct_fftconv(**args)) < 1e-12


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 3),
    H=st.integers(1, 4),
    L=st.integers(1, 300),
    frac=st.floats(0.0, 1.0),
)
def test_forward_random_shapes(B, H, L, frac):
    Lk = max(1, int(round(frac * L)))
    args = random_args(B, H, L, Lk, options=False)
    assert rel_err(reference.fftconv_ref(**args), direct_fftconv(**args)) < 1e-12


@pytest.mark.parametrize("shape", SHAPES[:8])
@pytest.mark.parametrize("options", [False, True])
def test_backward_matches_autograd_of_direct_sum(shape, options):
    args = random_args(*shape, options=options)
    tensors = {n: v for n, v in args.items() if isinstance(v, torch.Tensor) and n != "dropout_mask"}
    for t in tensors.values():
        t.requires_grad_(True)
    y = direct_fftconv(**args)
    grad_y = torch.randn_like(y)
    expected = torch.autograd.grad(y, list(tensors.values()), grad_y)
    grads = reference.fftconv_bwd_ref(grad_y, **{n: (v.detach() if isinstance(v, torch.Tensor) else v) for n, v in args.items()})
    name_to_grad = {"u": grads.du, "k": grads.dk, "D": grads.dD, "gate_in": grads.dgate_in, "gate_out": grads.dgate_out}
    for (name, _), want in zip(tensors.items(), expected):
        got = name_to_grad[name]
        assert got is not None and got.shape == want.shape, name
        assert rel_err(got, want) < 1e-11, name
    if not options:
        assert grads.dgate_in is None and grads.dgate_out is None


def test_backward_without_D_returns_none_for_it():
    args = random_args(2, 3, 20, 7, options=False)
    args["D"] = None
    grads = reference.fftconv_bwd_ref(torch.randn(2, 3, 20, dtype=torch.float64), **args)
    assert grads.dD is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    args = random_args(2, 4, 256, 200, dtype=dtype)
    args["k"] = args["k"].float()
    y = reference.fftconv_ref(**args)
    assert y.dtype == dtype
    want = direct_fftconv(**args)
    # Only the final rounding to `dtype` may cost accuracy, not the accumulation.
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    assert rel_err(y, want) < tol


def test_fft_size_avoids_wraparound():
    for L in range(1, 70):
        for Lk in range(1, L + 1):
            n = reference.fft_size(L, Lk)
            assert n >= L + Lk - 1 and n & (n - 1) == 0 and n < 2 * (L + Lk - 1) + 1


def test_causal_corr_is_adjoint_of_causal_conv():
    x, k = torch.randn(3, 50, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    g = torch.randn(3, 50, dtype=torch.float64)
    # <g, conv(x, k)> == <corr(g, k), x> == <corr(g, x), k>
    lhs = (g * reference.causal_conv(x, k)).sum()
    assert torch.allclose(lhs, (reference.causal_corr(g, k, 50) * x).sum())
    assert torch.allclose(lhs, (reference.causal_corr(g, x, 20) * k).sum())


@pytest.mark.parametrize("shape", [(0, 3, 8, 5), (2, 0, 8, 5), (0, 0, 4, 4)])
def test_empty_batch_or_channels_need_no_fft(shape):
    B, H, L, Lk = shape
    args = random_args(B, H, L, Lk)
    y = reference.fftconv_ref(**args)
    assert y.shape == (B, H, L) and y.dtype == torch.float64
    grads = reference.fftconv_bwd_ref(torch.randn(B, H, L, dtype=torch.float64), **args)
    assert grads.du.shape == (B, H, L) and grads.dgate_in.shape == grads.dgate_out.shape == (B, H, L)
    # Gradients summed over an empty batch are zeros of their input's shape.
    assert torch.equal(grads.dk, torch.zeros(H, Lk, dtype=torch.float64))
    assert torch.equal(grads.dD, torch.zeros(H, dtype=torch.float64))


def test_nan_at_one_step_poisons_its_whole_row_only():
    """The FFT spreads a NaN over every output of its row, before it in time too; other rows
    (and other channels) stay finite. This is the documented semantics of the FFT path."""
    args = random_args(2, 3, 20, 7, options=False)
    args["u"][1, 2, 13] = float("nan")
    y = reference.fftconv_ref(**args)
    assert torch.isnan(y[1, 2]).all()
    finite = torch.ones_like(y, dtype=torch.bool)
    finite[1, 2] = False
    assert torch.isfinite(y[finite]).all()
