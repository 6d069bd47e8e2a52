"""Block (Monarch) FFT building blocks for the FlashConv kernels: the constant matrices, their
cache, the size plan, and the ``@triton.jit`` helpers that move one chunk of a row pair through
the transform on tensor cores.

The FFT of size ``N = N1 * N2`` (Cooley-Tukey "four step")::

    x[n2 + N2*n1]  viewed as a matrix A[n1, n2]                 (N1 x N2, row-major = memory order)
    B  = F1 @ A                 DFT over n1                      B[k1, n2]
    B *= Tw,  Tw[k1, n2] = exp(-2 pi i k1 n2 / N)               twiddle
    C  = B @ F2                 DFT over n2                      C[k1, k2] = X[k1 + N1*k2]

and the inverse runs the transposed steps with conjugate matrices. Three facts make it cheap:

* zero padding is implicit: a causal convolution of length L uses N >= 2L, so only the rows
  ``n1 < N1/2`` of A are non-zero (the first DFT contracts over N1/2, not N1) and only those
  rows of the inverse are kept (the last DFT produces N1/2 rows);
* rows of the spectrum (k1) are independent between the first and the last DFT, so a program
  walks over chunks of ``CHUNK`` rows of k1 (like FlashAttention walks over keys), keeping only
  the input pair and the output accumulator at full size;
* two real rows that share a kernel are packed as one complex row ``z = a + i b``: because the
  kernel is real, ``ifft(fft(z) * K) = conv(a) + i conv(b)``, so one complex transform does two
  rows' work and real parts never need separating.

This module knows Triton and torch only (no torch.library, no Inductor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import triton
import triton.language as tl

MIN_FFT_SIZE = 512  # N1/2 >= 16 and N2 >= 16: tl.dot needs every dimension >= 16


@dataclass(frozen=True)
class MonarchPlan:
    """How a sequence of length ``seqlen`` is laid out for the block FFT."""

    fft_size: int  # N, a power of two >= 2 * seqlen
    n1: int  # rows of the N1 x N2 view; the first DFT is over n1
    n2: int  # columns; the second DFT is over n2
    chunk: int  # rows of k1 handled per step of the chunk loop

    @property
    def half_rows(self) -> int:
        """Rows of the input/output view that hold the sequence (N1/2)."""
        return self.n1 // 2


def plan_for(seqlen: int) -> MonarchPlan:
    """The block-FFT layout for a causal convolution of length ``seqlen``.

    N1 ~ 2 * N2 minimises the tensor-core work 8*N*N1 + 16*N*N2 per row pair.
    """
    fft_size = max(MIN_FFT_SIZE, 1 << math.ceil(math.log2(2 * seqlen)))
    log_n = int(math.log2(fft_size))
    n2 = 1 << (log_n // 2)
    n1 = fft_size // n2
    if n1 < n2:
        n1, n2 = n2, n1
    chunk = min(n1, 32)
    return MonarchPlan(fft_size, n1, n2, chunk)


@lru_cache(maxsize=64)
def _dft_constants_cached(n1: int, n2: int, device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    def dft(size: int) -> torch.Tensor:
        idx = torch.arange(size, dtype=torch.float64)
        return torch.exp(-2j * math.pi * torch.outer(idx, idx) / size)

    twiddle = torch.exp(
        -2j * math.pi * torch.outer(torch.arange(n1, dtype=torch.float64), torch.arange(n2, dtype=torch.float64))
        / (n1 * n2)
    )

    def planes(z: torch.Tensor) -> torch.Tensor:  # complex (..) -> float32 (2, ..) [real, imag]
        return torch.stack([z.real, z.imag]).to(torch.float32).contiguous().to(device)

    return planes(dft(n1)), planes(dft(n2)), planes(twiddle)


def dft_constants(plan: MonarchPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F1, F2, Tw) as float32 planes ``(2, rows, cols)``, cached per size and device (read-only)."""
    return _dft_constants_cached(plan.n1, plan.n2, str(device))


def kernel_spectrum(k: torch.Tensor, plan: MonarchPlan) -> torch.Tensor:
    """Spectrum of k (H, Lk) in the Monarch order ``[k1, k2] = fft(k)[k1 + N1*k2] / N``.

    Returns float32 planes (H, 2, N1, N2); the 1/N of the inverse FFT is folded in here. Computed
    from k on every call, so a changed k can never meet a stale spectrum.
    """
    spectrum = torch.fft.fft(k.to(torch.float32), n=plan.fft_size) / plan.fft_size
    spectrum = spectrum.view(k.shape[0], plan.n2, plan.n1).transpose(1, 2)
    return torch.stack([spectrum.real, spectrum.imag], dim=1).contiguous()


def spectrum_to_time(spectrum: torch.Tensor, plan: MonarchPlan, out_len: int) -> torch.Tensor:
    """Planes (H, 2, N1, N2) in the Monarch order -> ``real(ifft(.))[:, :out_len]`` (H, out_len)."""
    natural = torch.complex(spectrum[:, 0], spectrum[:, 1]).transpose(1, 2).reshape(spectrum.shape[0], -1)
    return torch.fft.ifft(natural, n=plan.fft_size).real[:, :out_len]


# ------------------------------------------------------------------------------------------
# Triton helpers. Every complex quantity travels as two float32 tensors (real, imag).
# ------------------------------------------------------------------------------------------
@triton.jit
def cdot(ar, ai, br, bi, PRECISION: tl.constexpr):
    """Complex matrix product (ar + i ai) @ (br + i bi) as four real tensor-core products."""
    re = tl.dot(ar, br, input_precision=PRECISION) - tl.dot(ai, bi, input_precision=PRECISION)
    im = tl.dot(ar, bi, input_precision=PRECISION) + tl.dot(ai, br, input_precision=PRECISION)
    return re, im


@triton.jit
def load_planes(ptr, rows, cols, row_stride, plane_stride):
    """Load a complex tile stored as two float32 planes."""
    offs = rows[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs), tl.load(ptr + plane_stride + offs)


@triton.jit
def forward_chunk(zr, zi, chunk_start, f1_ptr, f2_ptr, tw_ptr,
                  N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """Rows [chunk_start, chunk_start + CHUNK) of the spectrum of z (z: (N1/2, N2) complex).

    Returns (CHUNK, N2) real and imaginary parts in the Monarch order [k1, k2].
    """
    HALF: tl.constexpr = N1 // 2
    k1 = chunk_start + tl.arange(0, CHUNK)
    n1 = tl.arange(0, HALF)
    cols = tl.arange(0, N2)
    f1r, f1i = load_planes(f1_ptr, k1, n1, N1, N1 * N1)  # F1[k1, n1], n1 < N1/2 (padding)
    br, bi = cdot(f1r, f1i, zr, zi, PRECISION)
    twr, twi = load_planes(tw_ptr, k1, cols, N2, N1 * N2)
    br, bi = br * twr - bi * twi, br * twi + bi * twr
    f2r, f2i = load_planes(f2_ptr, cols, cols, N2, N2 * N2)
    return cdot(br, bi, f2r, f2i, PRECISION)


@triton.jit
def inverse_chunk_accumulate(cr, ci, chunk_start, yr, yi, f1_ptr, f2_ptr, tw_ptr,
                             N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr,
                             PRECISION: tl.constexpr):
    """Add the contribution of spectrum rows [chunk_start, +CHUNK) to the time rows n1 < N1/2.

    (yr, yi): (N1/2, N2) accumulators; (cr, ci): (CHUNK, N2) spectrum chunk. No 1/N here.
    """
    HALF: tl.constexpr = N1 // 2
    k1 = chunk_start + tl.arange(0, CHUNK)
    n1 = tl.arange(0, HALF)
    cols = tl.arange(0, N2)
    f2r, f2i = load_planes(f2_ptr, cols, cols, N2, N2 * N2)
    dr, di = cdot(cr, ci, f2r, -f2i, PRECISION)  # @ conj(F2)
    twr, twi = load_planes(tw_ptr, k1, cols, N2, N1 * N2)
    dr, di = dr * twr + di * twi, di * twr - dr * twi  # * conj(Tw)
    g_r, g_i = load_planes(f1_ptr, n1, k1, N1, N1 * N1)  # conj(F1)[n1, k1]
    pr, pi = cdot(g_r, -g_i, dr, di, PRECISION)
    return yr + pr, yi + pi


@triton.jit
def load_pair(ptr, row_a, row_b, has_b, offs, seqlen, stride_l):
    """Two rows of a (B, H, L) tensor at time offsets ``offs`` as float32 (zero where t >= L)."""
    in_seq = offs < seqlen
    a = tl.load(ptr + row_a + offs * stride_l, mask=in_seq, other=0.0).to(tl.float32)
    b = tl.load(ptr + row_b + offs * stride_l, mask=in_seq & has_b, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def causal_conv_pair(xa, xb, k_ptr, f1_ptr, f2_ptr, tw_ptr, CONJ_K: tl.constexpr,
                     N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """conv(xa, k), conv(xb, k) for two real rows held as (N1/2, N2) tiles.

    ``k_ptr`` points at this channel's spectrum planes (2, N1, N2) with 1/N folded in; with
    CONJ_K the spectrum is conjugated, which turns the convolution into the correlation used by
    the backward pass.
    """
    HALF: tl.constexpr = N1 // 2
    cols = tl.arange(0, N2)
    yr = tl.zeros((HALF, N2), dtype=tl.float32)
    yi = tl.zeros((HALF, N2), dtype=tl.float32)
    for chunk_start in tl.range(0, N1, CHUNK):
        cr, ci = forward_chunk(xa, xb, chunk_start, f1_ptr, f2_ptr, tw_ptr, N1, N2, CHUNK, PRECISION)
        kr, ki = load_planes(k_ptr, chunk_start + tl.arange(0, CHUNK), cols, N2, N1 * N2)
        if CONJ_K:
            ki = -ki
        cr, ci = cr * kr - ci * ki, cr * ki + ci * kr
        yr, yi = inverse_chunk_accumulate(cr, ci, chunk_start, yr, yi, f1_ptr, f2_ptr, tw_ptr,
                                          N1, N2, CHUNK, PRECISION)
    return yr, yi
