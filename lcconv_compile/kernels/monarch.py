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
    def unitary_dft(size: int) -> torch.Tensor:
        idx = torch.arange(size, dtype=torch.float64)
        return torch.exp(-2j * math.pi * torch.outer(idx, idx) / size) / math.sqrt(size)

    rows, cols = torch.arange(n1, dtype=torch.float64), torch.arange(n2, dtype=torch.float64)
    twiddle = torch.exp(-2j * math.pi * torch.outer(rows, cols) / (n1 * n2))

    def planes(z: torch.Tensor) -> torch.Tensor:  # complex (..) -> float32 (2, ..) [real, imag]
        return torch.stack([z.real, z.imag]).to(torch.float32).contiguous().to(device)

    return planes(unitary_dft(n1)), planes(unitary_dft(n2)), planes(twiddle)


def dft_constants(plan: MonarchPlan, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(F1, F2, Tw) as float32 planes ``(2, rows, cols)``, cached per size and device (read-only).

    F1 and F2 are unitary (scaled by 1/sqrt(size)), so the whole transform U is unitary and
    ``conv(x, k) = U^H (U x * fft(k))``: no intermediate grows by more than sqrt(N) times the
    input, which keeps float16 tensor-core operands in range.
    """
    return _dft_constants_cached(plan.n1, plan.n2, str(device))


def kernel_spectrum(k: torch.Tensor, plan: MonarchPlan) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectrum of k (H, Lk) in the Monarch order ``[k1, k2] = fft(k)[k1 + N1*k2]``, normalised.

    Returns (planes (H, 2, N1, N2) float32 with max modulus 1 per channel, scale (H,) float32 that
    multiplies it back). Computed from k on every call, so a changed k never meets a stale one.
    """
    spectrum = torch.fft.fft(k.to(torch.float32), n=plan.fft_size)
    scale = spectrum.abs().amax(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    spectrum = (spectrum / scale[:, None]).view(k.shape[0], plan.n2, plan.n1).transpose(1, 2)
    return torch.stack([spectrum.real, spectrum.imag], dim=1).contiguous(), scale.contiguous()


def spectrum_to_time(spectrum: torch.Tensor, plan: MonarchPlan, out_len: int) -> torch.Tensor:
    """Planes (H, 2, N1, N2) in the Monarch order -> ``real(ifft(.))[:, :out_len]`` (H, out_len)."""
    natural = torch.complex(spectrum[:, 0], spectrum[:, 1]).transpose(1, 2).reshape(spectrum.shape[0], -1)
    return torch.fft.ifft(natural, n=plan.fft_size).real[:, :out_len]


# ------------------------------------------------------------------------------------------
# Triton helpers. Every complex quantity travels as two float32 tensors (real, imag). Constant
# tiles are passed in (loaded once per program where they fit, per chunk where they do not).
# ------------------------------------------------------------------------------------------
@triton.jit
def operand(x, PRECISION: tl.constexpr):
    """A tensor-core operand: float16 in the "fp16" mode (inputs are scaled to |x| <= 1)."""
    if PRECISION == "fp16":
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def cdot(ar, ai, br, bi, PRECISION: tl.constexpr):
    """Complex matrix product (ar + i ai) @ (br + i bi) as four real tensor-core products."""
    if PRECISION == "fp16":
        ar, ai, br, bi = operand(ar, PRECISION), operand(ai, PRECISION), operand(br, PRECISION), operand(bi, PRECISION)
        re = tl.dot(ar, br) - tl.dot(ai, bi)
        im = tl.dot(ar, bi) + tl.dot(ai, br)
    else:
        re = tl.dot(ar, br, input_precision=PRECISION) - tl.dot(ai, bi, input_precision=PRECISION)
        im = tl.dot(ar, bi, input_precision=PRECISION) + tl.dot(ai, br, input_precision=PRECISION)
    return re, im


@triton.jit
def load_planes(ptr, rows, cols, row_stride, plane_stride):
    """Load a complex tile stored as two float32 planes."""
    offs = rows[:, None] * row_stride + cols[None, :]
    return tl.load(ptr + offs), tl.load(ptr + plane_stride + offs)


@triton.jit
def load_chunk_constants(f1_ptr, tw_ptr, chunk_start, N1: tl.constexpr, N2: tl.constexpr,
                         CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """The constant tiles for spectrum rows [chunk_start, +CHUNK): F1[rows, :N1/2], Tw[rows, :],
    and conj(F1)[:N1/2, rows] (the inverse's last DFT). Operand tiles come back in operand dtype."""
    HALF: tl.constexpr = N1 // 2
    k1 = chunk_start + tl.arange(0, CHUNK)
    n1 = tl.arange(0, HALF)
    f1r, f1i = load_planes(f1_ptr, k1, n1, N1, N1 * N1)
    twr, twi = load_planes(tw_ptr, k1, tl.arange(0, N2), N2, N1 * N2)
    g1r, g1i = load_planes(f1_ptr, n1, k1, N1, N1 * N1)
    return (operand(f1r, PRECISION), operand(f1i, PRECISION), twr, twi,
            operand(g1r, PRECISION), operand(-g1i, PRECISION))


@triton.jit
def load_f2(f2_ptr, N2: tl.constexpr, PRECISION: tl.constexpr):
    """F2 and conj(F2) as operand tiles (real, imag, -imag)."""
    cols = tl.arange(0, N2)
    f2r, f2i = load_planes(f2_ptr, cols, cols, N2, N2 * N2)
    return operand(f2r, PRECISION), operand(f2i, PRECISION), operand(-f2i, PRECISION)


@triton.jit
def forward_tile(zr, zi, f1r, f1i, twr, twi, f2r, f2i, PRECISION: tl.constexpr):
    """Spectrum rows of z (z: (N1/2, N2) complex, zero rows beyond N1/2 implied) for the given
    F1 rows and twiddles: ((F1 z) * Tw) @ F2, in the Monarch order [k1, k2]."""
    br, bi = cdot(f1r, f1i, zr, zi, PRECISION)
    br, bi = br * twr - bi * twi, br * twi + bi * twr
    return cdot(br, bi, f2r, f2i, PRECISION)


@triton.jit
def inverse_tile(cr, ci, twr, twi, f2r, f2i_neg, g1r, g1i_neg, PRECISION: tl.constexpr):
    """Time rows n1 < N1/2 contributed by spectrum rows c: conj(F1) @ ((c @ conj(F2)) * conj(Tw))."""
    dr, di = cdot(cr, ci, f2r, f2i_neg, PRECISION)
    dr, di = dr * twr + di * twi, di * twr - dr * twi
    return cdot(g1r, g1i_neg, dr, di, PRECISION)


@triton.jit
def load_pair(ptr, row_a, row_b, has_b, offs, seqlen, stride_l):
    """Two rows of a (B, H, L) tensor at time offsets ``offs`` as float32 (zero where t >= L)."""
    in_seq = offs < seqlen
    a = tl.load(ptr + row_a + offs * stride_l, mask=in_seq, other=0.0).to(tl.float32)
    b = tl.load(ptr + row_b + offs * stride_l, mask=in_seq & has_b, other=0.0).to(tl.float32)
    return a, b


@triton.jit
def pair_scale(xa, xb, PRECISION: tl.constexpr):
    """Common scale of a row pair: max |x| in the fp16 mode (so operands are <= 1), else 1."""
    if PRECISION == "fp16":
        s = tl.maximum(tl.max(tl.abs(xa)), tl.max(tl.abs(xb)))
        return tl.where(s > 0, s, 1.0)
    else:
        return 1.0


@triton.jit
def causal_conv_pair(xa, xb, k_ptr, f1_ptr, f2_ptr, tw_ptr, CONJ_K: tl.constexpr,
                     N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """U^H(U z * K) for z = xa + i xb held as (N1/2, N2) tiles, walking CHUNK spectrum rows at a time.

    ``k_ptr``: this channel's normalised spectrum planes (2, N1, N2). Returns the real and
    imaginary parts, i.e. conv(xa), conv(xb) up to the spectrum's scale. With CONJ_K the
    spectrum is conjugated: correlation, used by the backward pass.
    """
    HALF: tl.constexpr = N1 // 2
    cols = tl.arange(0, N2)
    f2r, f2i, f2i_neg = load_f2(f2_ptr, N2, PRECISION)
    yr = tl.zeros((HALF, N2), dtype=tl.float32)
    yi = tl.zeros((HALF, N2), dtype=tl.float32)
    zr, zi = operand(xa, PRECISION), operand(xb, PRECISION)
    for chunk_start in tl.range(0, N1, CHUNK):
        f1r, f1i, twr, twi, g1r, g1i_neg = load_chunk_constants(f1_ptr, tw_ptr, chunk_start, N1, N2, CHUNK, PRECISION)
        cr, ci = forward_tile(zr, zi, f1r, f1i, twr, twi, f2r, f2i, PRECISION)
        kr, ki = load_planes(k_ptr, chunk_start + tl.arange(0, CHUNK), cols, N2, N1 * N2)
        if CONJ_K:
            ki = -ki
        cr, ci = cr * kr - ci * ki, cr * ki + ci * kr
        pr, pi = inverse_tile(cr, ci, twr, twi, f2r, f2i_neg, g1r, g1i_neg, PRECISION)
        yr += pr
        yi += pi
    return yr, yi
