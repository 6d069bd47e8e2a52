"""FlashConv v6's math on CPU (kernels/monarch_plan.py): the plan, the factor matrices, the
twiddles and index maps against torch.fft, and the kernel's schedule with its float16 roundings
against the float64 reference. The Gluon kernel itself runs only on the device
(tests/test_kernels_monarch_conv.py)."""

import math

import pytest
import torch

from lcconv_compile.kernels import monarch_plan as mp
from lcconv_compile.reference import fftconv_bwd_ref, fftconv_ref

from inputs import as_float64, random_args, rel_err


@pytest.mark.parametrize("seqlen, n, n2", [(513, 2048, 16), (1024, 2048, 16), (1025, 4096, 32),
                                           (2048, 4096, 32), (3000, 8192, 64), (4096, 8192, 64)])
def test_plan_for_each_length(seqlen, n, n2):
    plan = mp.plan_for(seqlen)
    assert (plan.n, plan.n1, plan.n2, plan.chunks, plan.half) == (n, 128, n2, 2, 64)
    assert plan.n >= 2 * seqlen and plan.n1 * plan.n2 == plan.n
    assert plan.shared_bytes() <= 200 * 1024  # leaves room for layout-conversion scratch (227 KB)


@pytest.mark.parametrize("seqlen", [1, 512, 4097, 8192])
def test_no_plan_outside_the_range(seqlen):
    assert mp.plan_for(seqlen) is None
    with pytest.raises(ValueError, match="no plan for L"):
        mp.emulate_forward(torch.randn(2, 1, seqlen), torch.randn(1, 1))


def test_flops_count_the_causal_halves():
    plan = mp.plan_for(4096)  # 128 x 64: S1 and S1' 64 wide, S2 and S2' 64 wide
    assert plan.flops_per_pair() == 8 * 8192 * (64 + 128 + 64)


def test_dft_factor_is_unitary_and_symmetric():
    fr, fi = mp.dft_factor(64, 64, 64)
    f = torch.complex(fr, fi)
    torch.testing.assert_close(f @ f.conj().T, torch.eye(64, dtype=torch.complex128), atol=1e-12, rtol=0)
    torch.testing.assert_close(f, f.T)
    half_r, half_i = mp.dft_factor(64, 64, 32)
    torch.testing.assert_close(torch.complex(half_r, half_i), f[:, :32])


@pytest.mark.parametrize("seqlen", [600, 1024, 2048, 4096])
def test_forward_stages_are_the_dft_in_the_plans_order(seqlen):
    plan = mp.plan_for(seqlen)
    st = mp._Stages(plan, operand=None, acc=torch.float64)
    x = torch.randn(3, seqlen, dtype=torch.complex128)
    tiles = mp._tiles(x.real, plan), mp._tiles(x.imag, plan)
    cr, ci = st.forward(*tiles)
    want = torch.fft.fft(x, n=plan.n) / math.sqrt(plan.n)
    f1, f2 = torch.arange(plan.n1)[:, None], torch.arange(plan.n2)[None, :]
    torch.testing.assert_close(torch.complex(cr, ci), want[:, f1 + plan.n1 * f2], atol=1e-12, rtol=0)


@pytest.mark.parametrize("seqlen", [600, 1024, 2048, 4096])
def test_inverse_stages_keep_the_causal_half_of_the_inverse_dft(seqlen):
    plan = mp.plan_for(seqlen)
    st = mp._Stages(plan, operand=None, acc=torch.float64)
    e = torch.randn(2, plan.n1, plan.n2, dtype=torch.complex128)
    yr, yi = st.inverse(e.real, e.imag)
    f1, f2 = torch.arange(plan.n1)[:, None], torch.arange(plan.n2)[None, :]
    spectrum = torch.zeros(2, plan.n, dtype=torch.complex128)
    spectrum[:, f1 + plan.n1 * f2] = e
    want = torch.fft.ifft(spectrum) * math.sqrt(plan.n)
    got = torch.complex(yr, yi).reshape(2, plan.n // 2)
    torch.testing.assert_close(got, want[:, : plan.n // 2], atol=1e-12, rtol=0)


def test_twiddle_angles_reduce_in_integers():
    plan = mp.plan_for(4096)
    f1, n2 = torch.arange(plan.n1), torch.arange(plan.n2)
    angle = mp.twiddle_angles(plan, f1, n2).double()
    want = (-2 * math.pi / plan.n) * (f1[:, None] * n2[None, :] % plan.n).double()
    wrapped = torch.remainder(angle - want + math.pi, 2 * math.pi) - math.pi  # equal mod 2 pi
    assert wrapped.abs().max() < 1e-5
    assert angle.min() > -math.pi - 1e-6 and angle.max() <= math.pi + 1e-6  # the SFU's range


@pytest.mark.parametrize("B, L, Lk", [(3, 600, 600), (2, 1000, 7), (5, 1024, 1024), (2, 2048, 999),
                                      (1, 3000, 3000), (2, 4096, 4096)])
@pytest.mark.parametrize("options", [False, True])
def test_schedule_is_exact_without_rounding(B, L, Lk, options):
    args = random_args(B, 2, L, Lk, dtype=torch.float64, options=options)
    got = mp.emulate_forward(**args, operand=None, acc=torch.float64)
    assert rel_err(got, fftconv_ref(**args)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, L, Lk", [(4, 513, 513), (3, 1024, 1024), (2, 2048, 2048), (2, 4096, 4096),
                                      (2, 4096, 100), (8, 1024, 1)])
@pytest.mark.parametrize("spectrum", [None, torch.float16], ids=["K_float32", "K_float16"])
def test_float16_operands_meet_the_error_budget(dtype, B, L, Lk, spectrum):
    """The kernel's roundings (float16 operands on power-of-two-scaled tiles, float32
    accumulation, output in u's dtype; k's spectrum kept in float32 or, with the k_half tuning,
    float16) against float64: within the issue's 2e-3."""
    args = random_args(B, 4, L, Lk, dtype=dtype, options=True, k_dtype=torch.float32)
    got = mp.emulate_forward(**args, spectrum=spectrum)
    want = fftconv_ref(**as_float64(args))
    assert got.dtype == dtype
    assert rel_err(got, want) <= 2e-3


def test_scaling_keeps_extreme_magnitudes_in_float16_range():
    """bf16 inputs far outside float16's range (1e8, 1e-8) come out as accurate as O(1) ones:
    the power-of-two scales, not the data, carry the magnitude."""
    args = random_args(2, 2, 1024, 1024, dtype=torch.bfloat16, options=False, k_dtype=torch.float32)
    args["u"][0] *= 1e8
    args["u"][1] *= 1e-8
    args["k"] = args["k"] * 1e-6
    got = mp.emulate_forward(**args)
    want = fftconv_ref(**as_float64(args))
    for b in range(2):
        assert rel_err(got[b], want[b]) <= 2e-3


def test_zero_rows_and_zero_kernels_give_exact_zeros():
    """A zero row packed with a nonzero partner (the partner's rounding would leak into it
    through the shared complex transform) and an all-zero k come out as exact zeros."""
    args = random_args(4, 3, 1024, 1024, dtype=torch.bfloat16, options=False, k_dtype=torch.float32)
    args["u"][2] = 0
    args["k"][1] = 0
    args["D"][1] = 0
    got = mp.emulate_forward(**args)
    assert torch.equal(got[2], torch.zeros_like(got[2]))
    assert torch.equal(got[:, 1], torch.zeros_like(got[:, 1]))
    want = fftconv_ref(**as_float64(args))
    assert rel_err(got, want) <= 2e-3


@pytest.mark.parametrize("B, L, Lk", [(3, 600, 600), (2, 1024, 100), (4, 2048, 2048), (1, 4096, 4096)])
@pytest.mark.parametrize("options", [False, True])
def test_backward_schedule_is_exact_without_rounding(B, L, Lk, options):
    args = random_args(B, 2, L, Lk, dtype=torch.float64, options=options)
    grad_y = torch.randn(B, 2, L, dtype=torch.float64)
    got = mp.emulate_backward(grad_y, **args, operand=None, acc=torch.float64)
    want = fftconv_bwd_ref(grad_y, **args)
    for name, g, w in zip(want._fields, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            assert rel_err(g, w) < 1e-10, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B, L, Lk", [(4, 1024, 1024), (3, 2048, 500), (2, 4096, 4096)])
def test_backward_float16_operands_meet_the_error_budget(dtype, B, L, Lk):
    """du, dgate_in, dgate_out as the forward (2e-3 for bf16, mostly the output's rounding);
    dk and dD (float32 here, as k and D) at the v5 tests' 1e-2 for half inputs."""
    args = random_args(B, 3, L, Lk, dtype=dtype, options=True, k_dtype=torch.float32)
    grad_y = torch.randn(B, 3, L).to(dtype)
    got = mp.emulate_backward(grad_y, **args)
    want = fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    tol = dict(du=3e-3, dk=1e-2, dD=1e-2, dgate_in=3e-3, dgate_out=3e-3)
    for name, g, w in zip(want._fields, got, want):
        assert rel_err(g, w) <= tol[name], (name, rel_err(g, w))


def test_backward_rows_of_a_pair_with_zero_x_or_zero_grad():
    """A row whose x is zero, and a row whose dc is zero, in pairs with ordinary rows: the
    matched scales must not zero or overflow the partner's gradient."""
    args = random_args(4, 2, 1024, 300, dtype=torch.bfloat16, options=False, k_dtype=torch.float32)
    args["u"][1] = 0
    grad_y = torch.randn(4, 2, 1024).to(torch.bfloat16)
    grad_y[2] = 0
    got = mp.emulate_backward(grad_y, **args)
    want = fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    for name, g, w in zip(want._fields, got, want):
        if w is not None:
            assert rel_err(g, w) <= 1e-2, name
    assert torch.equal(got[0][2], torch.zeros_like(got[0][2]))  # du of a zero-gradient row


def test_a_nonfinite_row_does_not_reach_its_packed_partner():
    """README, "NaN and Inf": never widen. A NaN in u[0, 1] and an Inf in u[1, 2] make exactly
    those rows NaN (the eager FFT spreads them over the row too), their partners stay right;
    a NaN in dy[1, 0] makes du[1, 0] and channel 0's dk and dD NaN, nothing else."""
    B, H, L = 2, 3, 1024
    args = random_args(B, H, L, 700, dtype=torch.bfloat16, options=False, k_dtype=torch.float32)
    args["u"][0, 1, 500] = float("nan")
    args["u"][1, 2, 300] = float("inf")
    y = mp.emulate_forward(**args)
    bad = torch.zeros(B, H, dtype=torch.bool)
    bad[0, 1] = bad[1, 2] = True
    assert torch.equal((~y.isfinite()).all(-1), bad) and torch.equal((~y.isfinite()).any(-1), bad)
    want = fftconv_ref(**as_float64(args))
    assert rel_err(y[~bad], want[~bad]) <= 2e-3

    args = random_args(B, H, L, 700, dtype=torch.bfloat16, options=False, k_dtype=torch.float32)
    dy = torch.randn(B, H, L).to(torch.bfloat16)
    dy[1, 0, 100] = float("nan")
    du, dk, dD, _, _ = mp.emulate_backward(dy, **args)
    bad = torch.zeros(B, H, dtype=torch.bool)
    bad[1, 0] = True
    assert torch.equal((~du.isfinite()).all(-1), bad) and torch.equal((~du.isfinite()).any(-1), bad)
    assert (~dk[0].isfinite()).all() and dk[1:].isfinite().all()
    assert not dD[0].isfinite() and dD[1:].isfinite().all()
    want = fftconv_bwd_ref(dy.double(), **as_float64(args))
    assert rel_err(du[~bad], want.du[~bad]) <= 3e-3
    assert rel_err(dk[1:], want.dk[1:]) <= 1e-2
