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
    "butterfly_split",
    "butterfly_exact_factors",
    "butterfly_conv_ref",
    "butterfly_conv_bwd_ref",
    "ButterflyConvGrads",
]


def fft_size(seqlen: int, kernel_len: int) -> int:
    """Smallest power of two >= seqlen + kernel_len - 1: no wrap-around in the first seqlen outputs."""
    return 1 << max(0, seqlen + kernel_len - 2).bit_length()  # integers only: no float log2


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


# ---------------------------------------------------------------------------------------------
# FlashButterfly: the three-step algorithm with arbitrary (learned) factors
# ---------------------------------------------------------------------------------------------
# Form (the one models/butterfly.py, the op lcconv::butterfly_conv and kernels/flashbutterfly.py
# share). N = N1 * N2; a length-N signal is indexed n = n1*N2 + n2 (viewed as an (N1, N2) matrix,
# row-major = memory order) and its spectrum k = k1 + N1*k2. The factors are (N2, N1, N1)
# complex, stored as real pairs (N2, N1, N1, 2), one N1 x N1 matrix per column n2:
#
#   step 1   z[k1, n2] = sum_n1 in_factor[n2, k1, n1] x[n1, n2]        (x = u zero-padded to N)
#   step 2   w[k1, :]  = ifft_N2(fft_N2(z[k1, :]) * K[k1 + N1*k2])     (K = fft_N(k): N1 circular
#                                                                       convolutions of length N2)
#   step 3   v[n1, n2] = sum_k1 out_factor[n2, n1, k1] w[k1, n2]
#   c = Re(v)[:L] + D * u,  y = gelu?(c) * dropout_mask[..., None]
#
# At the exact factors (butterfly_exact_factors: DFT_N1 with the twiddles w_N^(n2 k1) folded in,
# and its inverse) steps 1-2-3 are F_N^-1 diag(F_N k) F_N: the causal convolution of fftconv.
# Gates are not part of this op (multiply them outside it).

BUTTERFLY_ON_CHIP_N2 = 8192  # the circular convolutions of step 2 run on chip up to this length
BUTTERFLY_MIN_N1 = 16  # below N = 16 * 8192 keep N1 = 16 (tl.dot needs >= 16), or sqrt(N) if smaller


def butterfly_split(n: int) -> tuple[int, int]:
    """``(N1, N2)`` with ``N1 * N2 = n`` (a power of two): the kernels' split of FlashButterfly.

    ``N2`` is the on-chip length (8192) once ``n >= 16 * 8192``, so ``N1 = n / 8192`` stays small
    (16 at n = 128K, i.e. L = 64K; 256 at n = 2M, L = 1M): steps 1 and 3 cost ``8 N1`` FLOPs per
    sample and a factor holds ``n * N1`` complex numbers. Smaller sizes keep
    ``N1 = min(16, 2^floor(log2(n)/2))`` so the factors still mix rows. The one split used by the
    op, the kernels and ``ButterflyLongConv``.
    """
    if n < 1 or n & (n - 1):
        raise ValueError(f"butterfly_split: the FFT size must be a power of two >= 1, got {n}")
    sqrt_n1 = 1 << ((n.bit_length() - 1) // 2)
    n1 = max(n // BUTTERFLY_ON_CHIP_N2, min(BUTTERFLY_MIN_N1, sqrt_n1))
    return n1, n // n1


def butterfly_exact_factors(
    n: int,
    dtype: torch.dtype = torch.float64,
    device: Optional[torch.device] = None,
    split: Optional[tuple[int, int]] = None,
) -> tuple[Tensor, Tensor]:
    """The exact ``(in_factor, out_factor)`` for FFT size n, as real pairs ``(N2, N1, N1, 2)``.

    ``split = (N1, N2)`` defaults to :func:`butterfly_split` (tests use others: the reference
    takes any split).

    ``in[n2, k1, n1] = w_N^(n2 k1) w_N1^(n1 k1)`` (twiddle times DFT_N1), ``w_M = exp(-2 pi i / M)``;
    ``out[n2, n1, k1] = (1/N1) w_N1^(-n1 k1) w_N^(-n2 k1)``, its inverse for each n2. Computed in
    float64 and then cast to ``dtype`` (a real dtype).
    """
    n1, n2 = split or butterfly_split(n)
    if n1 * n2 != n:
        raise ValueError(f"butterfly_exact_factors: split {split} does not multiply to n = {n}")
    idx1 = torch.arange(n1, dtype=torch.float64, device=device)
    idx2 = torch.arange(n2, dtype=torch.float64, device=device)
    dft_phase = -2 * math.pi * torch.outer(idx1, idx1) / n1  # [k1, n1]
    twiddle_phase = -2 * math.pi * idx2[:, None, None] * idx1[None, :, None] / n  # [n2, k1, 1]
    phase = dft_phase.unsqueeze(0) + twiddle_phase  # [n2, k1, n1]
    in_factor = torch.polar(torch.ones_like(phase), phase)
    out_factor = in_factor.conj().transpose(1, 2) / n1  # unitary up to 1/N1: the inverse
    return tuple(torch.view_as_real(f.resolve_conj().contiguous()).to(dtype) for f in (in_factor, out_factor))


def butterfly_factor_as_complex(factor: Tensor, real_dtype: torch.dtype) -> Tensor:
    """A real-pair factor ``(N2, N1, N1, 2)`` as a complex ``(N2, N1, N1)`` tensor of ``real_dtype``."""
    return torch.view_as_complex(factor.to(real_dtype).contiguous())


def butterfly_columns(u: Tensor, n1: int, n2: int, dtype: torch.dtype) -> Tensor:
    """``u (B, H, L)`` zero-padded to ``N = n1 * n2`` and viewed as ``(B, H, N1, N2)`` (n = n1*N2 + n2)."""
    batch, channels, seqlen = u.shape
    return torch.nn.functional.pad(u.to(dtype), (0, n1 * n2 - seqlen)).view(batch, channels, n1, n2)


def butterfly_kernel_rows(k: Tensor, n1: int, n2: int, dtype: torch.dtype) -> Tensor:
    """Step 2's kernel: ``K[h, k1, k2] = fft_N(k[h])[k1 + N1*k2]``, complex ``(H, N1, N2)``."""
    return torch.fft.fft(k.to(dtype), n=n1 * n2).view(k.shape[0], n2, n1).transpose(1, 2)


def butterfly_step1(x: Tensor, in_factor: Tensor) -> Tensor:
    """``z[b, h, k1, n2] = sum_n1 in_factor[n2, k1, n1] x[b, h, n1, n2]`` (complex factor)."""
    return torch.einsum("cki,bhic->bhkc", in_factor, x.to(in_factor.dtype))


def butterfly_step2(z: Tensor, kernel_rows: Tensor) -> Tensor:
    """The N1 circular convolutions of length N2: ``ifft(fft(z) * K)`` along the last dim."""
    return torch.fft.ifft(torch.fft.fft(z, dim=-1) * kernel_rows, dim=-1)


def butterfly_step3(w: Tensor, out_factor: Tensor) -> Tensor:
    """``v[b, h, n1, n2] = sum_k1 out_factor[n2, n1, k1] w[b, h, k1, n2]``."""
    return torch.einsum("cik,bhkc->bhic", out_factor, w)


def butterfly_step2_bwd(dw: Tensor, z_spectrum: Tensor, kernel_rows: Tensor, kernel_len: int) -> tuple[Tensor, Tensor]:
    """Backward of step 2 (``w = ifft(z_spectrum * K)`` along n2): ``(dz, dk)``.

    ``dz = ifft(fft(dw) conj(K))``; ``dK = sum_b fft(dw)/N2 * conj(z_spectrum)`` (the adjoint of
    ``ifft`` is ``fft / N2``), put back in the order ``k1 + N1*k2``, and since ``K = F_N k`` with
    k real, ``dk = Re(F_N^H dK)[:Lk] = Re(N ifft_N(dK))[:Lk]``.
    """
    channels, n1, n2 = kernel_rows.shape
    # conj_physical, not conj(): see causal_corr (a lazy conjugate bit is lost in compiled code).
    dw_spectrum = torch.fft.fft(dw, dim=-1)
    dz = torch.fft.ifft(dw_spectrum * kernel_rows.conj_physical(), dim=-1)
    d_rows = (dw_spectrum / n2 * z_spectrum.conj_physical()).sum(0)  # (H, N1, N2) in [k1, k2]
    d_spectrum = d_rows.transpose(1, 2).reshape(channels, n1 * n2)
    dk = (torch.fft.ifft(d_spectrum, dim=-1).real * (n1 * n2))[..., :kernel_len]
    return dz, dk


class _ButterflyForward(NamedTuple):
    """What the backward needs of the forward: factors and x, step 1's spectrum, w, and c."""

    in_factor: Tensor  # complex (N2, N1, N1)
    out_factor: Tensor
    x: Tensor  # real (B, H, N1, N2): u zero-padded
    kernel_rows: Tensor  # complex (H, N1, N2)
    z_spectrum: Tensor  # fft_N2 of step 1's output
    w: Tensor  # step 2's output
    c: Tensor  # real (B, H, L): Re(step 3)[:L] + D u


def _butterfly_forward(u, k, in_factor, out_factor, D, dtype) -> _ButterflyForward:
    n2, n1 = in_factor.shape[0], in_factor.shape[1]
    batch, channels, seqlen = u.shape
    in_c = butterfly_factor_as_complex(in_factor, dtype)
    out_c = butterfly_factor_as_complex(out_factor, dtype)
    x = butterfly_columns(u, n1, n2, dtype)
    kernel_rows = butterfly_kernel_rows(k, n1, n2, dtype)
    # Step 2 spelled out (not butterfly_step2) to keep fft(z) for the backward's dk.
    z_spectrum = torch.fft.fft(butterfly_step1(x, in_c), dim=-1)
    w = torch.fft.ifft(z_spectrum * kernel_rows, dim=-1)
    c = butterfly_step3(w, out_c).real.reshape(batch, channels, n1 * n2)[..., :seqlen]
    if D is not None:
        c = c + u.to(dtype) * D.to(dtype).unsqueeze(-1)
    return _ButterflyForward(in_c, out_c, x, kernel_rows, z_spectrum, w, c)


def butterfly_conv_ref(
    u: Tensor,
    k: Tensor,
    in_factor: Tensor,
    out_factor: Tensor,
    D: Optional[Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    """Reference of ``lcconv::butterfly_conv``: the three steps above with arbitrary factors.

    ``u (B, H, L)``, ``k (H, Lk)``, factors real pairs ``(N2, N1, N1, 2)`` with any split
    ``N1 * N2 = N >= L + Lk - 1`` (the op insists on :func:`butterfly_split`), ``D (H,)`` and
    ``dropout_mask (B, H)`` optional. Computes in float64 if any input is float64, else float32
    (complex64); returns u's dtype, contiguous. Differentiable by torch autograd (tests use that
    to check :func:`butterfly_conv_bwd_ref`).
    """
    dtype = compute_dtype(u, k, in_factor, out_factor, D)
    a = _butterfly_forward(u, k, in_factor, out_factor, D, dtype).c
    if gelu:
        a = torch.nn.functional.gelu(a)
    if dropout_mask is not None:
        a = a * dropout_mask.to(dtype).unsqueeze(-1)
    return a.to(u.dtype).contiguous()


class ButterflyConvGrads(NamedTuple):
    """Gradients of ``butterfly_conv``; ``dD`` is None where D was None."""

    du: Tensor
    dk: Tensor
    d_in_factor: Tensor
    d_out_factor: Tensor
    dD: Optional[Tensor]


def butterfly_conv_bwd_ref(
    grad_y: Tensor,
    u: Tensor,
    k: Tensor,
    in_factor: Tensor,
    out_factor: Tensor,
    D: Optional[Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[Tensor] = None,
) -> ButterflyConvGrads:
    """Explicit reference backward of :func:`butterfly_conv_ref` (recomputes the forward).

    For a linear complex step ``Z = F X`` and a real loss, with gradients ``dZ = dL/dRe Z +
    i dL/dIm Z`` (torch's convention): ``dX = F^H dZ`` and ``dF = sum over rows of dZ X^H``.
    Applied step by step, backwards:

    * step 3 (``c = Re v``, so ``dv = dc``, real): ``dw = out^H dv``, ``d_out = sum_bh dv w^H``;
    * step 2 (``w = ifft(fft(z) K)``): ``dz = ifft(fft(dw) conj(K))``,
      ``dK = sum_b fft(dw)/N2 * conj(fft(z))``, then ``dk = Re(N ifft_N(dK in k order))[:Lk]``;
    * step 1 (``x`` real): ``dx = Re(in^H dz)``, ``d_in = sum_bh dz x^T``.

    Every sum over batch and channels is one torch reduction over fixed dims: deterministic.
    """
    dtype = compute_dtype(grad_y, u, k, in_factor, out_factor, D)
    n2, n1 = in_factor.shape[0], in_factor.shape[1]
    n = n1 * n2
    fwd = _butterfly_forward(u, k, in_factor, out_factor, D, dtype)

    dc = grad_y.to(dtype)
    if dropout_mask is not None:
        dc = dc * dropout_mask.to(dtype).unsqueeze(-1)
    if gelu:
        dc = dc * gelu_grad(fwd.c)

    # conj_physical, not conj(): see causal_corr (a lazy conjugate bit is lost in compiled code).
    dv = butterfly_columns(dc, n1, n2, dtype).to(fwd.w.dtype)  # c = Re(v)[:L]: dv is dc, zero-padded
    dw = torch.einsum("cik,bhic->bhkc", fwd.out_factor.conj_physical(), dv)
    d_out = torch.einsum("bhic,bhkc->cik", dv, fwd.w.conj_physical())

    dz, dk = butterfly_step2_bwd(dw, fwd.z_spectrum, fwd.kernel_rows, k.shape[-1])

    dx = torch.einsum("cki,bhkc->bhic", fwd.in_factor.conj_physical(), dz).real
    dx = dx.reshape(u.shape[0], u.shape[1], n)[..., : u.shape[-1]]
    d_in = torch.einsum("bhkc,bhic->cki", dz, fwd.x.to(dz.dtype))
    dD = None
    if D is not None:
        dx = dx + dc * D.to(dtype).unsqueeze(-1)
        dD = (dc * u.to(dtype)).sum(dim=(0, 2)).to(D.dtype)
    return ButterflyConvGrads(
        dx.to(u.dtype).contiguous(),
        dk.to(k.dtype).contiguous(),
        torch.view_as_real(d_in).to(in_factor.dtype).contiguous(),
        torch.view_as_real(d_out).to(out_factor.dtype).contiguous(),
        dD,
    )
