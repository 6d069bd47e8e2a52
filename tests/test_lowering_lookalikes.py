"""A sweep of look-alikes (lowering/guards.py, arguments.py, patterns_*.py): code that resembles a
fusion or an idiom the passes rewrite but computes something else, or the same thing spelled
another way. For each, the compiled function equals eager, and the outcome is pinned: what
folded or was rewritten (counters["lcconv"]) and what a guard refused, by reason code
(counters["lcconv_rejected"]); ``{}`` and ``{}`` means the structure did not match at all.

One function per look-alike, all on the same tiny inputs: u, g (B, H, L), k (H, L), D (H,).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lcconv_compile import fftconv
from inputs import rel_err
from lowering_helpers import compile_once, torch_211_r2c_strides_bug

B, H, L = 2, 3, 8
N = 2 * L  # FFT size of the hand-written convolutions
INV_SQRT2 = 1 / math.sqrt(2)


def rfft_conv(u, k, crop=lambda y: y[..., :L], norm="backward"):
    return crop(torch.fft.irfft(torch.fft.rfft(u, n=N) * torch.fft.rfft(k, n=N), n=N, norm=norm))


# ------------------------------------------------------------------------------- skip term --
def skip_alpha_one_as_float(u, k, D, g):
    return torch.add(fftconv(u, k), u * D[:, None], alpha=1.0)


def skip_subtracted(u, k, D, g):
    return fftconv(u, k) - u * D[:, None]


def skip_minus_conv(u, k, D, g):
    return u * D[:, None] - fftconv(u, k)


def skip_sub_alpha_minus_one(u, k, D, g):
    return torch.sub(fftconv(u, k), u * D[:, None], alpha=-1)


def skip_of_scaled_weight(u, k, D, g):  # (2 D) is still one weight per channel
    return fftconv(u, k) + u * (2 * D)[:, None]


def skip_of_scaled_signal(u, k, D, g):
    return fftconv(u, k) + 2.0 * u * D[:, None]


def skip_of_double_weight(u, k, D, g):
    return fftconv(u, k) + u * D.double()[:, None]


def skip_addcmul_value_two(u, k, D, g):
    return torch.addcmul(fftconv(u, k), u, D[:, None], value=2)


def skip_addcmul_of_another_tensor(u, k, D, g):
    return torch.addcmul(fftconv(u, k), g, D[:, None])


def skip_weight_per_time_step(u, k, D, g):  # (1, 1, L): broadcast over channels, not time
    return fftconv(u, k) + u * g[:1, :1]


def skip_weight_viewed_per_batch_element(u, k, D, g):  # (B, 1, 1)
    return fftconv(u, k) + u * g[:, :1, :1]


# ------------------------------------------------------------------------------------ GELU --
def gelu_by_hand(u, k, D, g):
    y = fftconv(u, k)
    return y * 0.5 * (1 + torch.erf(y * INV_SQRT2))


def gelu_scalars_first(u, k, D, g):
    y = fftconv(u, k)
    return 0.5 * y * (torch.erf(INV_SQRT2 * y) + 1.0)


def gelu_add_alpha_one(u, k, D, g):
    y = fftconv(u, k)
    return y * 0.5 * torch.add(torch.erf(y * INV_SQRT2), 1, alpha=1)


def gelu_offset_two(u, k, D, g):
    y = fftconv(u, k)
    return y * 0.5 * (2 + torch.erf(y * INV_SQRT2))


def gelu_scale_0_6(u, k, D, g):
    y = fftconv(u, k)
    return y * 0.6 * (1 + torch.erf(y * INV_SQRT2))


def gelu_one_minus_erf(u, k, D, g):
    y = fftconv(u, k)
    return y * 0.5 * (1 - torch.erf(y * INV_SQRT2))


def gelu_erf_minus_minus_one(u, k, D, g):
    y = fftconv(u, k)
    return y * 0.5 * (torch.erf(y * INV_SQRT2) - (-1))


def gelu_erf_of_quotient(u, k, D, g):  # the exact GELU too, spelled with a division: not folded
    y = fftconv(u, k)
    return y * 0.5 * (1 + torch.erf(y / math.sqrt(2)))


def gelu_tanh(u, k, D, g):
    return F.gelu(fftconv(u, k), approximate="tanh")


def gelu_tensor_half(u, k, D, g):
    y = fftconv(u, k)
    return y * torch.tensor(0.5) * (1 + torch.erf(y * INV_SQRT2))


def gelu_erfc_wrong_sign(u, k, D, g):  # erfc(y / sqrt(2)) = 1 - erf(y / sqrt(2))
    y = fftconv(u, k)
    return 0.5 * y * torch.erfc(y / math.sqrt(2))


def gelu_erfc_scale_0_6(u, k, D, g):
    y = fftconv(u, k)
    return 0.6 * y * torch.erfc(-y / math.sqrt(2))


def gelu_erfc_of_product(u, k, D, g):  # the exact GELU too, erfc(-y * 1/sqrt(2)): not folded
    y = fftconv(u, k)
    return 0.5 * y * torch.erfc(-y * INV_SQRT2)


def gelu_ndtr_of_scaled_output(u, k, D, g):
    y = fftconv(u, k)
    return y * torch.special.ndtr(2 * y)


def gelu_ndtr_of_another_tensor(u, k, D, g):
    return g * torch.special.ndtr(fftconv(u, k))


# --------------------------------------------------------------------------- gates, masks --
def input_gate_scalar(u, k, D, g):
    return fftconv(u * 2.0, k)


def input_divided_by_gate(u, k, D, g):
    return fftconv(u / g, k)


def output_times_scalar(u, k, D, g):
    return fftconv(u, k) * 2.0


def output_divided_by_gate(u, k, D, g):
    return fftconv(u, k) / g


def output_where(u, k, D, g):
    return torch.where(g > 0, fftconv(u, k), 0.0)


def output_clamp(u, k, D, g):
    return fftconv(u, k).clamp(min=0)


def output_times_bool_mask(u, k, D, g):
    return fftconv(u, k) * (g > 0)


def output_times_batch_mask(u, k, D, g):  # (B, 1, 1): neither a gate nor a (B, H, 1) mask
    return fftconv(u, k) * g[:, :1, :1]


def gelu_after_output_gate(u, k, D, g):  # the gate folds; GELU after it cannot
    return F.gelu(fftconv(u, k) * g)


# ------------------------------------------------------------------ casts (bf16 u and k) --
def cast_back_to_another_half(u, k, D, g):
    return fftconv(u.float(), k.float()).half()


def cast_through_double(u, k, D, g):
    return fftconv(u.double(), k.double()).to(u.dtype)


def gelu_of_half_output_cast_to_another_half(u, k, D, g):
    return F.gelu(fftconv(u, k).float()).half()


def gelu_tanh_of_half_output(u, k, D, g):
    return F.gelu(fftconv(u, k), approximate="tanh")


def cast_with_copy_and_memory_format(u, k, D, g):
    x = u.to(torch.float32, copy=True)
    return fftconv(x, k.to(dtype=torch.float32, memory_format=torch.contiguous_format)).to(u.dtype)


# ----------------------------------------------------------------- hand-written convolution --
def idiom_slice_with_step(u, k, D, g):
    return rfft_conv(u, k, crop=lambda y: y[..., :L:2])


def idiom_padded_with_ones(u, k, D, g):
    return torch.fft.irfft(torch.fft.rfft(F.pad(u, (0, N - L), value=1.0)) * torch.fft.rfft(F.pad(k, (0, N - L))),
                           n=N)[..., :L]


def idiom_transforms_channels(u, k, D, g):
    y = torch.fft.irfft(torch.fft.rfft(u, n=N, dim=1) * torch.fft.rfft(k, n=N, dim=0), n=N, dim=1)
    return y[..., :L]


def idiom_correlation(u, k, D, g):
    return torch.fft.irfft(torch.fft.rfft(u, n=N) * torch.fft.rfft(k, n=N).conj(), n=N)[..., :L]


def idiom_imaginary_part(u, k, D, g):
    return torch.fft.ifft(torch.fft.fft(u, n=N) * torch.fft.fft(k, n=N))[..., :L].imag


def idiom_inverse_is_a_forward_fft(u, k, D, g):
    return torch.fft.fft(torch.fft.fft(u, n=N) * torch.fft.fft(k, n=N))[..., :L].real


def idiom_ortho_inverse_only(u, k, D, g):
    return rfft_conv(u, k, norm="ortho")


def idiom_per_channel_spectrum_scale(u, k, D, g):
    k_f = torch.fft.rfft(k, n=N) / D[:, None]
    return torch.fft.irfft(torch.fft.rfft(u, n=N) * k_f, n=N)[..., :L]


def idiom_extra_output_factor(u, k, D, g):  # ortho * sqrt(n) is the conv; the * 2 stays outside
    u_f, k_f = torch.fft.rfft(u, n=N, norm="ortho"), torch.fft.rfft(k, n=N, norm="ortho")
    return torch.fft.irfft(u_f * k_f, n=N, norm="ortho")[..., :L] * N**0.5 * 2


def idiom_inverse_of_another_size(u, k, D, g):  # irfft crops the spectrum first: no match
    return torch.fft.irfft(torch.fft.rfft(u, n=N) * torch.fft.rfft(k, n=N), n=N - 1)[..., :L]


def idiom_output_scaled_by_tensor(u, k, D, g):
    return rfft_conv(u, k) * D[:, None]


def idiom_then_floor_division(u, k, D, g):  # div with rounding_mode is div.Tensor_mode: not a scale
    return torch.div(rfft_conv(u, k), 1000.0, rounding_mode="floor")


def idiom_kernel_per_batch_element(u, k, D, g):  # g (B, H, L) as the kernel: one per batch element
    return rfft_conv(u, g)


def idiom_single_batch_kernel_shared_over_channels(u, k, D, g):  # B = 1, but a (1, 1, L) kernel
    return rfft_conv(u[:1], k[None, :1])


def idiom_kernel_spectrum_times_n(u, k, D, g):  # `* n` where H3 has `/ n` (or `* (1 / n)`)
    k_f = torch.fft.rfft(k, n=N) * N
    return torch.fft.irfft(torch.fft.rfft(u, n=N) * k_f, n=N, norm="forward")[..., :L]


def idiom_kernel_spectrum_times_channel_weights(u, k, D, g):  # a tensor, not a number
    k_f = torch.fft.rfft(k, n=N) * D[:, None]
    return torch.fft.irfft(torch.fft.rfft(u, n=N) * k_f, n=N, norm="forward")[..., :L]


def idiom_written_in_place_then_read_shifted(u, k, D, g):  # the read is not the range written
    y = torch.fft.irfft(torch.fft.rfft(u, n=N) * torch.fft.rfft(k, n=N), n=N)
    y[..., :L].add_(u * D[:, None])
    return y[..., 1:L + 1]


def idiom_written_in_place_whole_output_read(u, k, D, g):  # the crop reads through; the tail
    y = torch.fft.irfft(torch.fft.rfft(u, n=N) * torch.fft.rfft(k, n=N), n=N)  # keeps the scatter
    y[..., :L].mul_(g)
    return y[..., :L] + y[..., L:].sum(-1, keepdim=True)


# name -> (function, rewrites, refusals)
LOOKALIKES = {
    skip_alpha_one_as_float: ({"fold_skip": 1}, {}),
    skip_subtracted: ({}, {}),
    skip_minus_conv: ({}, {}),
    skip_sub_alpha_minus_one: ({}, {}),
    skip_of_scaled_weight: ({"fold_skip": 1}, {}),
    # torch 2.11 decomposes addcmul(y, u, w, value=c) into y + (u * c) * w: this graph, which its
    # addcmul pattern meets and refuses (c is not 1); 2.13 keeps addcmul, and no pattern matches.
    skip_of_scaled_signal: ({}, {"argument": 1} if torch.__version__ < (2, 12) else {}),
    skip_of_double_weight: ({}, {"dtype": 1}),
    skip_addcmul_value_two: ({}, {"argument": 1}),
    skip_addcmul_of_another_tensor: ({}, {}),
    skip_weight_per_time_step: ({}, {"skip_shape": 1}),
    skip_weight_viewed_per_batch_element: ({}, {"skip_shape": 1}),
    gelu_by_hand: ({"fold_gelu": 1}, {}),
    gelu_scalars_first: ({"fold_gelu": 1}, {}),
    gelu_add_alpha_one: ({"fold_gelu": 1}, {}),
    gelu_offset_two: ({}, {"gelu": 1}),
    gelu_scale_0_6: ({}, {"gelu": 1}),
    gelu_one_minus_erf: ({}, {}),
    gelu_erf_minus_minus_one: ({}, {}),
    gelu_erf_of_quotient: ({}, {}),
    gelu_tanh: ({}, {}),
    gelu_tensor_half: ({}, {"gelu": 1}),
    gelu_erfc_wrong_sign: ({}, {}),
    gelu_erfc_scale_0_6: ({}, {"gelu": 1}),
    gelu_erfc_of_product: ({}, {}),
    gelu_ndtr_of_scaled_output: ({}, {}),
    gelu_ndtr_of_another_tensor: ({}, {}),
    input_gate_scalar: ({}, {"shape": 1}),
    input_divided_by_gate: ({}, {}),
    output_times_scalar: ({}, {"gate_shape": 1}),
    output_divided_by_gate: ({}, {}),
    output_where: ({}, {}),
    output_clamp: ({}, {}),
    output_times_bool_mask: ({}, {"dtype": 1}),
    output_times_batch_mask: ({}, {"gate_shape": 1}),
    gelu_after_output_gate: ({"fold_output_multiplier": 1}, {"order": 1}),
    cast_back_to_another_half: ({}, {"dtype": 2}),
    cast_through_double: ({}, {"dtype": 2}),
    cast_with_copy_and_memory_format: ({"fold_signal_cast": 1, "fold_kernel_cast": 1}, {}),
    gelu_of_half_output_cast_to_another_half: ({}, {"dtype": 1}),
    gelu_tanh_of_half_output: ({}, {}),
    idiom_slice_with_step: ({}, {}),
    idiom_padded_with_ones: ({}, {"padding": 1}),
    idiom_transforms_channels: ({}, {}),
    idiom_correlation: ({}, {}),
    idiom_imaginary_part: ({}, {"structure": 1}),
    idiom_inverse_is_a_forward_fft: ({}, {}),
    idiom_ortho_inverse_only: ({}, {"normalisation": 1}),
    idiom_per_channel_spectrum_scale: ({}, {}),
    idiom_extra_output_factor: ({"rfft_conv_scaled_output_inference": 1}, {"gate_shape": 1}),
    idiom_inverse_of_another_size: ({}, {}),
    idiom_output_scaled_by_tensor: ({"rfft_conv_inference": 1}, {"gate_shape": 1}),
    idiom_then_floor_division: ({"rfft_conv_inference": 1}, {}),
    idiom_kernel_per_batch_element: ({}, {"kernel_varies_over_batch": 1}),
    idiom_kernel_spectrum_times_n: ({}, {"normalisation": 1}),
    idiom_kernel_spectrum_times_channel_weights: ({}, {}),
    idiom_written_in_place_then_read_shifted: ({}, {}),
    idiom_written_in_place_whole_output_read: ({}, {}),
    idiom_single_batch_kernel_shared_over_channels: ({}, {"kernel_shape": 1}),
}
HALF_INPUTS = {cast_back_to_another_half, cast_through_double, cast_with_copy_and_memory_format,
               gelu_of_half_output_cast_to_another_half, gelu_tanh_of_half_output}


def lookalike_inputs(fn):
    dtype = torch.bfloat16 if fn in HALF_INPUTS else torch.float32
    return (torch.randn(B, H, L).to(dtype), (torch.randn(H, L) / L**0.5).to(dtype), torch.randn(H) + 2,
            torch.randn(B, H, L))


@pytest.mark.parametrize("fn", LOOKALIKES, ids=lambda fn: fn.__name__)
def test_lookalike(fn):
    rewrites, refusals = LOOKALIKES[fn]
    with torch_211_r2c_strides_bug():  # idiom_transforms_channels: a graph left alone
        result = compile_once(fn, *lookalike_inputs(fn))
    assert (result.rewrites, result.rejections) == (rewrites, refusals)
    x = lookalike_inputs(fn)
    got, want = result.fn(*x), fn(*x)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert rel_err(got, want) < (1e-2 if want.dtype == torch.bfloat16 else 1e-5)


def test_sweep_is_large_enough():
    assert len(LOOKALIKES) >= 30


def test_training_with_a_kernel_per_batch_element_stays_alone():
    # H3's spelling with a learned (B, H, L) kernel, B = 2: the backward has the shape of a
    # (1, H, L) kernel's with B = 1 (no sum over the batch), but the kernel varies over batch.
    def h3_style(u, k):
        k_f = torch.fft.rfft(k, n=N) / N
        return torch.fft.irfft(torch.fft.rfft(u, n=N) * k_f, n=N, norm="forward")[..., :L]

    def inputs():
        return torch.randn(B, H, L, requires_grad=True), torch.randn(B, H, L, requires_grad=True)

    result = compile_once(h3_style, *inputs(), train=True)
    assert (result.rewrites, result.rejections) == ({}, {"kernel_varies_over_batch": 1})
    u, k = inputs()
    y = result.fn(u, k)
    assert rel_err(y, h3_style(u, k)) < 1e-5
    grad_y = torch.randn(y.shape)
    got = torch.autograd.grad(y, (u, k), grad_y)
    want = torch.autograd.grad(h3_style(u, k), (u, k), grad_y)
    assert all(rel_err(g, w) < 1e-5 for g, w in zip(got, want))
