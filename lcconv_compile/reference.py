"""The math of ``lcconv::fftconv`` in plain PyTorch: the oracle every fast path is tested against.

Everything here is written for clarity and for float64, not for speed. It is also the op's CPU
implementation (and its fallback on GPUs for sizes the Triton kernels do not cover). This module
must not import ``torch.library``, Triton or Inductor: it sits at the top of the layering.

The function, for ``u: (B, H, L)``, ``k: (H, Lk)`` with ``1 <= Lk <= L``::

    x      = u * gate_in                                   (gate_in optional, shape of u)
    c[t]   = sum_{s=0..t} k[t - s] * x[s]  +  D * x[t]     (causal convolution + skip; D optional)
    a      = gelu(c) if gelu else c                        (exact, erf-based GELU)
    y      = a * dropout_mask[..., None] * gate_out        (both optional)

The convolution is computed with a zero-padded real FFT of size ``fft_size(L, Lk)``, which is
large enough that the circular convolution equals the linear one on the first L outputs. Empty
batches (B = 0 or H = 0) never reach the FFT backend, which refuses them: the result is empty and
the batch-summed gradients (dk, dD) are zeros.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

__all__ = [
    "fft_size",
    "compute_dtype",
    "causal_conv",
    "causal_corr",
    "fftconv_ref",
    "fftconv_bwd_ref",
    "FFTConvGrads",
    "gelu_grad",
    "output_scale",
]


def fft_size(seqlen: int, kernel_len: int) -> int:
    """Smallest power of two >= seqlen + kernel_len - 1: no wrap-around in the first seqlen outputs."""
    return 1 << max(0, math.ceil(math.log2(seqlen + kernel_len - 1)))


def compute_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """float64 if any input is float64, else float32 (half inputs accumulate in float32)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _empty_fft_result(a: Tensor, b: Tensor, out_len: int) -> Tensor:
    """The (empty) result of a convolution of ``a`` and ``b`` when one of them holds no rows.

    MKL's (and cuFFT's) plans refuse a batch of zero transforms, so empty inputs are answered
    here; the result still has the broadcast shape, so sums over an empty batch come out zero.
    """
    shape = torch.broadcast_shapes(a.shape[:-1], b.shape[:-1]) + (out_len,)
    return a.new_zeros(shape, dtype=torch.promote_types(a.dtype, b.dtype))


def causal_conv(x: Tensor, k: Tensor) -> Tensor:
    """``out[..., t] = sum_{s<=t} k[..., t-s] * x[..., s]`` for the first ``x.shape[-1]`` outputs.

    ``k`` broadcasts against ``x`` over the leading dims; both must already be in a float dtype
    suitable for computation (the result has their common dtype).
    """
    seqlen, kernel_len = x.shape[-1], k.shape[-1]
    if x.numel() == 0 or k.numel() == 0:
        return _empty_fft_result(x, k, seqlen)
    n = fft_size(seqlen, kernel_len)
    spectrum = torch.fft.rfft(x, n=n) * torch.fft.rfft(k, n=n)
    return torch.fft.irfft(spectrum, n=n)[..., :seqlen]


def causal_corr(g: Tensor, x: Tensor, out_len: int) -> Tensor:
    """``out[..., j] = sum_t g[..., t] * x[..., t-j]`` for ``0 <= j < out_len`` (x zero outside [0, L)).

    This is the adjoint of :func:`causal_conv`: with ``g = dL/dc`` it gives ``dL/dk`` (x = input)
    and ``dL/dx`` (x = kernel, out_len = L).
    """
    if g.numel() == 0 or x.numel() == 0:
        return _empty_fft_result(g, x, out_len)
    # A negative lag t - j wraps to N + t - j, which must fall outside x's support [0, len(x)).
    n = fft_size(max(g.shape[-1], x.shape[-1] + out_len - 1), 1)
    # conj_physical, not conj(): a lazy conjugate bit is dropped when this runs as an opaque op
    # inside compiled code (seen on torch 2.13, AOT runtime), silently turning corr into conv.
    spectrum = torch.fft.rfft(g, n=n) * torch.fft.rfft(x, n=n).conj_physical()
    return torch.fft.irfft(spectrum, n=n)[..., :out_len]


def _gated_input(u: Tensor, gate_in: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    x = u.to(dtype)
    return x * gate_in.to(dtype) if gate_in is not None else x


def _pre_activation(x: Tensor, k: Tensor, D: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    c = causal_conv(x, k.to(dtype))
    if D is not None:
        c = c + x * D.to(dtype).unsqueeze(-1)
    return c


def output_scale(
    gate_out: Optional[Tensor], dropout_mask: Optional[Tensor], dtype: torch.dtype
) -> Optional[Tensor]:
    """The product of everything multiplied onto the activation, or None."""
    scale = None
    if dropout_mask is not None:
        scale = dropout_mask.to(dtype).unsqueeze(-1)
    if gate_out is not None:
        g = gate_out.to(dtype)
        scale = g if scale is None else scale * g
    return scale


def fftconv_ref(
    u: Tensor,
    k: Tensor,
    D: Optional[Tensor] = None,
    gate_in: Optional[Tensor] = None,
    gate_out: Optional[Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """Reference forward (see the module docstring for the formula). Returns u's dtype, contiguous."""
    dtype = compute_dtype(u, k, D, gate_in, gate_out)
    x = _gated_input(u, gate_in, dtype)
    a = _pre_activation(x, k, D, dtype)
    if gelu:
        a = torch.nn.functional.gelu(a)
    scale = output_scale(gate_out, dropout_mask, dtype)
    if scale is not None:
        a = a * scale
    return a.to(u.dtype).contiguous()


class FFTConvGrads(NamedTuple):
    """Gradients of ``fftconv`` w.r.t. its tensor inputs; None where the input was None."""

    du: Tensor
    dk: Tensor
    dD: Optional[Tensor]
    dgate_in: Optional[Tensor]
    dgate_out: Optional[Tensor]


def gelu_grad(c: Tensor) -> Tensor:
    """d/dc of the exact GELU c * Phi(c): Phi(c) + c * phi(c)."""
    cdf = 0.5 * (1.0 + torch.erf(c * (1.0 / math.sqrt(2.0))))
    pdf = torch.exp(-0.5 * c * c) * (1.0 / math.sqrt(2.0 * math.pi))
    return cdf + c * pdf


def fftconv_bwd_ref(
    grad_y: Tensor,
    u: Tensor,
    k: Tensor,
    D: Optional[Tensor] = None,
    gate_in: Optional[Tensor] = None,
    gate_out: Optional[Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[Tensor] = None,
) -> FFTConvGrads:
    """Reference backward. Recomputes the forward's pre-activation instead of storing it.

    ``dx = corr(dc, k) + D * dc`` (the convolution with the reversed kernel),
    ``dk[h] = sum_b corr(dc, x)[:Lk]``, ``dD[h] = sum_{b,t} dc * x``; the batch sums are done
    in the compute dtype so that ``dk`` and ``dD`` are deterministic.
    """
    dtype = compute_dtype(grad_y, u, k, D, gate_in, gate_out)
    x = _gated_input(u, gate_in, dtype)
    g = grad_y.to(dtype)

    dgate_out = None
    if gate_out is not None:
        a = _pre_activation(x, k, D, dtype)
        a = torch.nn.functional.gelu(a) if gelu else a
        if dropout_mask is not None:
            a = a * dropout_mask.to(dtype).unsqueeze(-1)
        dgate_out = (g * a).to(gate_out.dtype)

    scale = output_scale(gate_out, dropout_mask, dtype)
    dc = g * scale if scale is not None else g
    if gelu:
        dc = dc * gelu_grad(_pre_activation(x, k, D, dtype))

    seqlen, kernel_len = u.shape[-1], k.shape[-1]
    dx = causal_corr(dc, k.to(dtype), seqlen)
    if D is not None:
        dx = dx + dc * D.to(dtype).unsqueeze(-1)
    dk = causal_corr(dc, x, kernel_len).sum(0)
    dD = (dc * x).sum(dim=(0, 2)).to(D.dtype) if D is not None else None
    du = dx * gate_in.to(dtype) if gate_in is not None else dx
    dgate_in = (dx * u.to(dtype)).to(gate_in.dtype) if gate_in is not None else None
    return FFTConvGrads(du.to(u.dtype), dk.to(k.dtype), dD, dgate_in, dgate_out)
