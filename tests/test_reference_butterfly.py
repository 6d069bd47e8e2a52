"""reference.py, FlashButterfly part: the split, the exact factors, the three steps with arbitrary
factors (equal to fftconv_ref at the exact ones) and the explicit backward against autograd."""

import math

import pytest
import torch

from lcconv_compile import reference
from oracles import direct_causal_conv
from lcconv_compile.reference import (
    butterfly_conv_bwd_ref,
    butterfly_conv_ref,
    butterfly_exact_factors,
    butterfly_split,
)


def random_factors(n1, n2, dtype=torch.float64):
    """Random factors of the scale of the exact ones (entries ~1 in, ~1/N1 out)."""
    return torch.randn(n2, n1, n1, 2, dtype=dtype), torch.randn(n2, n1, n1, 2, dtype=dtype) / n1


def exact_factors_for_split(n1, n2):
    return butterfly_exact_factors(n1 * n2, split=(n1, n2))


@pytest.mark.parametrize("n,expected", [
    (1, (1, 1)), (2, (1, 2)), (8, (2, 4)), (64, (8, 8)), (128, (8, 16)), (256, (16, 16)),
    (1024, (16, 64)), (16384, (16, 1024)), (1 << 17, (16, 8192)), (1 << 18, (32, 8192)),
    (1 << 21, (256, 8192)), (1 << 23, (1024, 8192)),
])
def test_split_is_the_kernels_split(n, expected):
    """N2 = 8192 (on chip) from N = 128K on: N1 = 16 at L = 64K, 256 at L = 1M."""
    assert butterfly_split(n) == expected


@pytest.mark.parametrize("n", [0, 12, -4, 3])
def test_split_rejects_non_powers_of_two(n):
    with pytest.raises(ValueError, match=f"power of two >= 1, got {n}"):
        butterfly_split(n)


@pytest.mark.parametrize("n", [1, 2, 8, 128, 1024])
def test_exact_in_factor_then_row_ffts_is_the_fft(n):
    """Step 1 at the exact in_factor, then length-N2 FFTs along rows, is F_N in the k1 + N1*k2 order."""
    n1, n2 = butterfly_split(n)
    in_pairs, out_pairs = butterfly_exact_factors(n)
    assert in_pairs.shape == out_pairs.shape == (n2, n1, n1, 2) and in_pairs.dtype == torch.float64
    in_c, out_c = torch.view_as_complex(in_pairs), torch.view_as_complex(out_pairs)
    x = torch.randn(n, dtype=torch.complex128)
    spectrum = torch.fft.fft(reference.butterfly_step1(x.view(1, 1, n1, n2), in_c), dim=-1)[0, 0]
    torch.testing.assert_close(spectrum.transpose(0, 1).reshape(n), torch.fft.fft(x))
    torch.testing.assert_close(out_c @ in_c, torch.eye(n1, dtype=torch.complex128).expand(n2, n1, n1))


@pytest.mark.parametrize("L,Lk", [(1, 1), (7, 3), (45, 30), (64, 64), (100, 1), (129, 77), (300, 256)])
@pytest.mark.parametrize("options", [False, True])
def test_exact_factors_equal_fftconv_ref(L, Lk, options):
    """float64, to ~1e-12, including L that are not powers of two."""
    u, k = torch.randn(2, 3, L, dtype=torch.float64), torch.randn(3, Lk, dtype=torch.float64) / math.sqrt(Lk)
    extra = {}
    if options:
        extra = dict(D=torch.randn(3, dtype=torch.float64), gelu=True,
                     dropout_mask=(torch.rand(2, 3) > 0.3).double() / 0.7)
    factors = butterfly_exact_factors(reference.fft_size(L, Lk))
    expected = reference.fftconv_ref(u, k, **extra)
    torch.testing.assert_close(butterfly_conv_ref(u, k, *factors, **extra), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n1,n2", [(4, 16), (16, 4), (1, 64), (64, 1), (2, 128)])
def test_any_split_and_larger_n_are_the_causal_convolution(n1, n2):
    """The reference takes any split with N1 * N2 >= L + Lk - 1 (the op insists on butterfly_split)."""
    u, k, D = torch.randn(2, 3, 40, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64), torch.randn(3)
    got = butterfly_conv_ref(u, k, *exact_factors_for_split(n1, n2), D=D.double())
    torch.testing.assert_close(got, direct_causal_conv(u, k, D), rtol=1e-11, atol=1e-12)


def test_random_factors_are_a_different_linear_map():
    """Guards against a reference that ignores its factors."""
    u, k = torch.randn(1, 2, 30, dtype=torch.float64), torch.randn(2, 30, dtype=torch.float64)
    in_f, out_f = exact_factors_for_split(4, 16)
    moved = butterfly_conv_ref(u, k, in_f + 0.01 * torch.randn_like(in_f), out_f)
    assert (moved - direct_causal_conv(u, k)).abs().max() > 1e-4


@pytest.mark.parametrize("options", [False, True])
def test_forward_reference_gradcheck(options):
    """Autograd through the forward reference is right (the oracle for the explicit backward)."""
    u, k = torch.randn(2, 2, 11, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    in_f, out_f = random_factors(4, 4)
    tensors = [u, k, in_f, out_f] + ([torch.randn(2, dtype=torch.float64)] if options else [])
    mask = torch.tensor([[1.0, 0.0], [2.0, 1.5]], dtype=torch.float64)

    def f(*args):
        return butterfly_conv_ref(*args, gelu=options, dropout_mask=mask if options else None)

    assert torch.autograd.gradcheck(f, [t.requires_grad_(True) for t in tensors])


@pytest.mark.parametrize("n1,n2,L,Lk", [(4, 16, 33, 20), (8, 8, 32, 32), (1, 16, 9, 2), (16, 2, 10, 7)])
@pytest.mark.parametrize("options", [False, True])
def test_explicit_backward_equals_autograd(n1, n2, L, Lk, options):
    B, H = 3, 2
    u, k = torch.randn(B, H, L, dtype=torch.float64), torch.randn(H, Lk, dtype=torch.float64)
    in_f, out_f = random_factors(n1, n2)
    D = torch.randn(H, dtype=torch.float64) if options else None
    extra = dict(gelu=options, dropout_mask=(torch.rand(B, H) + 0.5).double() if options else None)
    leaves = [t.requires_grad_(True) for t in (u, k, in_f, out_f) + ((D,) if options else ())]
    y = butterfly_conv_ref(u, k, in_f, out_f, D, **extra)
    grad_y = torch.randn_like(y)
    expected = torch.autograd.grad(y, leaves, grad_y)
    got = butterfly_conv_bwd_ref(grad_y, *(t.detach() for t in (u, k, in_f, out_f)),
                                 D.detach() if D is not None else None, **extra)
    assert (got.dD is None) == (D is None)
    for name, g, e in zip(got._fields, [g for g in got if g is not None], expected):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


def test_float32_and_half_inputs_compute_in_float32():
    u, k = torch.randn(2, 3, 50), torch.randn(3, 50)
    factors = butterfly_exact_factors(reference.fft_size(50, 50), torch.float32)
    want = direct_causal_conv(u, k)
    assert ((butterfly_conv_ref(u, k, *factors).double() - want).norm() / want.norm()) < 1e-5
    y_half = butterfly_conv_ref(u.bfloat16(), k, *factors)
    assert y_half.dtype == torch.bfloat16
    assert ((y_half.double() - want).norm() / want.norm()) < 1e-2
