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
  the input and the output accumulator at full size;
* two real rows that share a kernel are packed as one complex row ``z = a + i b``: because the
  kernel is real, ``ifft(fft(z) * K) = conv(a) + i conv(b)``, so one complex transform does two
  rows' work and real parts never need separating (each row keeps its own scale);
* P row pairs of one channel are stacked in the M dimension of every product, so the constant
  tiles are read once per chunk for all of them and the products are P times taller. Stacked,
  the data is held transposed, ``Z^T[(p, n2), n1]`` (a strided load; Triton coalesces along
  n2), which makes the first and last DFT right-multiplications; the middle two act on the
  other axis, so each chunk is permuted ``(P, N2, CHUNK) <-> (P, CHUNK, N2)`` in registers.

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
STACK_ELEMENTS = 2048  # P * N/2: time samples per row held by one program's stacked tile


@dataclass(frozen=True)
class MonarchPlan:
    """How a sequence of length ``seqlen`` is laid out for the block FFT."""

    fft_size: int  # N, a power of two >= 2 * seqlen
    n1: int  # rows of the N1 x N2 view; the first DFT is over n1
    n2: int  # columns; the second DFT is over n2
    max_pairs: int  # row pairs stacked per program (at most; fewer if the batch is small)

    def pairs_per_stack(self, batch: int) -> int:
        """Row pairs stacked per program: max_pairs, or fewer (a power of two) for small batches."""
        return min(self.max_pairs, triton.next_power_of_2((batch + 1) // 2))

    @property
    def chunk(self) -> int:
        """Spectrum rows per chunk, whatever the stack (32 measured best at L = 1K and 4K on
        H100, see NOTES.md)."""
        return min(self.n1, 32)


def plan_for(seqlen: int) -> MonarchPlan:
    """The block-FFT layout for a causal convolution of length ``seqlen``.

    N1 ~ 2 * N2 minimises the tensor-core work 8*N*N1 + 16*N*N2 per row pair (Gauss's trick
    makes it 3/4 of that).
    """
    fft_size = max(MIN_FFT_SIZE, 1 << math.ceil(math.log2(2 * seqlen)))
    log_n = int(math.log2(fft_size))
    # N2 <= 64 keeps the F2 tiles (four of them, N2 x N2) small in shared memory; N1 = N / N2.
    n2 = min(64, 1 << (log_n // 2))
    n1 = fft_size // n2
    # Registers hold about 2 * P * N floats per stacked complex tensor: keep P * N/2 <= 2048.
    max_pairs = max(1, STACK_ELEMENTS // (fft_size // 2))
    return MonarchPlan(fft_size, n1, n2, max_pairs=max_pairs)


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


def kernel_spectrum_reference(k: torch.Tensor, plan: MonarchPlan) -> torch.Tensor:
    """``U k`` (the unitary transform of k, H x N) in the Monarch order, as complex128 (H, N1, N2):
    what the spectrum kernel computes, for tests."""
    spectrum = torch.fft.fft(k.to(torch.float64), n=plan.fft_size) / math.sqrt(plan.fft_size)
    return spectrum.view(k.shape[0], plan.n2, plan.n1).transpose(1, 2)


def spectrum_to_time(spectrum: torch.Tensor, plan: MonarchPlan, out_len: int) -> torch.Tensor:
    """Planes (H, 2, N1, N2) in the Monarch order -> ``real(ifft(.))[:, :out_len]`` (H, out_len)."""
    natural = torch.complex(spectrum[:, 0], spectrum[:, 1]).transpose(1, 2).reshape(spectrum.shape[0], -1)
    return torch.fft.ifft(natural, n=plan.fft_size).real[:, :out_len]


# ------------------------------------------------------------------------------------------
# Triton helpers. Complex quantities travel as two tensors (real, imag). A "stack" is P row
# pairs of one channel held transposed: element [(p, n2), n1] is time t = n1*N2 + n2.
# ------------------------------------------------------------------------------------------
@triton.jit
def operand(x, PRECISION: tl.constexpr):
    """A tensor-core operand: float16 in the "fp16" mode (data is scaled to |x| <= 1)."""
    if PRECISION == "fp16":
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    if PRECISION == "fp16":
        return tl.dot(a, b)
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def cdot(ar, ai, br, bi, b_sum, CONJ_B: tl.constexpr, GAUSS: tl.constexpr, PRECISION: tl.constexpr):
    """(ar + i ai) @ B on tensor cores, B a constant tile given as operand tiles (br, bi, b_sum).

    With CONJ_B the product is with conj(B). GAUSS uses three real products instead of four:
    re = ar br -+ ai bi, im = (ar + ai)(br +- bi) - ar br +- ai bi, where b_sum must be br + bi
    (br - bi with CONJ_B); the data-side sum is formed in float32 before rounding to the operand
    dtype. Otherwise b_sum is unused.
    """
    a_r = operand(ar, PRECISION)
    a_i = operand(ai, PRECISION)
    rr = _dot(a_r, br, PRECISION)
    ii = _dot(a_i, bi, PRECISION)
    if GAUSS:
        ss = _dot(operand(ar + ai, PRECISION), b_sum, PRECISION)
        if CONJ_B:
            return rr + ii, ss - rr + ii
        else:
            return rr - ii, ss - rr - ii
    else:
        ri = _dot(a_r, bi, PRECISION)
        ir = _dot(a_i, br, PRECISION)
        if CONJ_B:
            return rr + ii, ir - ri
        else:
            return rr - ii, ri + ir


@triton.jit
def constant_tiles(re, im, PRECISION: tl.constexpr):
    """Operand tiles of a constant matrix M = re + i im: (re, im, re + im, re - im)."""
    return (operand(re, PRECISION), operand(im, PRECISION), operand(re + im, PRECISION),
            operand(re - im, PRECISION))


@triton.jit
def load_planes(ptr, offs, plane_stride):
    """Load a complex tile stored as two float32 planes at element offsets ``offs``."""
    return tl.load(ptr + offs), tl.load(ptr + plane_stride + offs)


@triton.jit
def stack_times(P: tl.constexpr, N2: tl.constexpr, HALF: tl.constexpr):
    """(time t, pair index p) of every element [(p, n2), n1] of a stack: t (P*N2, HALF), p (P*N2, 1)."""
    r = tl.arange(0, P * N2)
    n1 = tl.arange(0, HALF)
    return n1[None, :] * N2 + (r % N2)[:, None], (r // N2)[:, None]


@triton.jit
def load_stack(ptr, row_offset, row_valid, t, seqlen, stride_l):
    """One row of each pair of a stack (row_offset/row_valid: (P*N2, 1)) as float32, 0 past L."""
    return tl.load(ptr + row_offset + t * stride_l, mask=row_valid & (t < seqlen), other=0.0).to(tl.float32)


@triton.jit
def row_max(x, P: tl.constexpr, N2: tl.constexpr, HALF: tl.constexpr, PRECISION: tl.constexpr):
    """(P,) scale of each stacked row: max |x| in the fp16 mode (so operands are <= 1), else 1."""
    if PRECISION == "fp16":
        per_pair = tl.max(tl.max(tl.reshape(tl.abs(x), (P, N2, HALF)), axis=2), axis=1)
        return tl.where(per_pair > 0, per_pair, 1.0)
    else:
        return tl.full((P,), 1.0, tl.float32)


@triton.jit
def to_stack(v, P: tl.constexpr, N2: tl.constexpr, HALF: tl.constexpr):
    """Broadcast a per-pair vector (P,) to the stack's shape (P*N2, HALF)."""
    return tl.reshape(tl.broadcast_to(v[:, None, None], (P, N2, HALF)), (P * N2, HALF))


@triton.jit
def chunk_constants(f1_ptr, tw_ptr, chunk_start, N1: tl.constexpr, N2: tl.constexpr,
                    CHUNK: tl.constexpr, PRECISION: tl.constexpr):
    """Constant tiles for spectrum rows k1 in [chunk_start, +CHUNK), j = k1 - chunk_start:
    F1[n1, k1] as (HALF, CHUNK) operand tiles (re, im, re + im) for the forward step, its
    transpose F1[k1, n1] (F1 is symmetric) as (CHUNK, HALF) tiles (re, im, re - im) for the
    inverse step, which uses it conjugated, and the twiddles transposed, Tw[k1, n2] as (N2, CHUNK)."""
    HALF: tl.constexpr = N1 // 2
    j = chunk_start + tl.arange(0, CHUNK)
    n1 = tl.arange(0, HALF)
    n2 = tl.arange(0, N2)
    f1r, f1i = load_planes(f1_ptr, n1[:, None] * N1 + j[None, :], N1 * N1)
    twr, twi = load_planes(tw_ptr, j[None, :] * N2 + n2[:, None], N1 * N2)
    fwd = (operand(f1r, PRECISION), operand(f1i, PRECISION), operand(f1r + f1i, PRECISION))
    g1r, g1i = tl.trans(f1r), tl.trans(f1i)
    inv = (operand(g1r, PRECISION), operand(g1i, PRECISION), operand(g1r - g1i, PRECISION))
    return fwd, inv, twr, twi


@triton.jit
def load_f2(f2_ptr, N2: tl.constexpr, PRECISION: tl.constexpr):
    """F2 as operand tiles (re, im, re + im, re - im): the last two serve F2 and conj(F2)."""
    n2 = tl.arange(0, N2)
    f2r, f2i = load_planes(f2_ptr, n2[:, None] * N2 + n2[None, :], N2 * N2)
    return constant_tiles(f2r, f2i, PRECISION)


@triton.jit
def stack_forward_chunk(zr, zi, f1, twr, twi, f2, P: tl.constexpr, N2: tl.constexpr,
                        CHUNK: tl.constexpr, GAUSS: tl.constexpr, PRECISION: tl.constexpr):
    """Spectrum rows of the chunk for every pair: ((F1 z) * Tw) @ F2, as (P*CHUNK, N2) [(p, j), k2].

    z: stack (P*N2, HALF); f1: forward tiles (HALF, CHUNK); twiddles (N2, CHUNK); f2: F2 tiles.
    """
    br, bi = cdot(zr, zi, f1[0], f1[1], f1[2], False, GAUSS, PRECISION)  # (P*N2, CHUNK): [(p, n2), j]
    br3 = tl.reshape(br, (P, N2, CHUNK))
    bi3 = tl.reshape(bi, (P, N2, CHUNK))
    br3, bi3 = br3 * twr[None] - bi3 * twi[None], br3 * twi[None] + bi3 * twr[None]
    br = tl.reshape(tl.permute(br3, (0, 2, 1)), (P * CHUNK, N2))
    bi = tl.reshape(tl.permute(bi3, (0, 2, 1)), (P * CHUNK, N2))
    return cdot(br, bi, f2[0], f2[1], f2[2], False, GAUSS, PRECISION)


@triton.jit
def stack_inverse_chunk(cr, ci, twr, twi, f2, g1, P: tl.constexpr, N2: tl.constexpr,
                        CHUNK: tl.constexpr, GAUSS: tl.constexpr, PRECISION: tl.constexpr):
    """Time samples contributed by spectrum rows c (P*CHUNK, N2): conj(F1) ((c conj(F2)) conj(Tw)),
    as a stack (P*N2, HALF) to accumulate. g1: inverse tiles of F1 (CHUNK, HALF)."""
    dr, di = cdot(cr, ci, f2[0], f2[1], f2[3], True, GAUSS, PRECISION)  # (P*CHUNK, N2): [(p, j), n2]
    dr3 = tl.permute(tl.reshape(dr, (P, CHUNK, N2)), (0, 2, 1))  # (P, N2, CHUNK)
    di3 = tl.permute(tl.reshape(di, (P, CHUNK, N2)), (0, 2, 1))
    dr3, di3 = dr3 * twr[None] + di3 * twi[None], di3 * twr[None] - dr3 * twi[None]
    dr = tl.reshape(dr3, (P * N2, CHUNK))
    di = tl.reshape(di3, (P * N2, CHUNK))
    return cdot(dr, di, g1[0], g1[1], g1[2], True, GAUSS, PRECISION)


@triton.jit
def multiply_spectrum(cr, ci, k_ptr, chunk_start, k_inv_scale, CONJ_K: tl.constexpr,
                      P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr):
    """c * K (or * conj(K)) for the chunk's rows of every pair; K: planes (2, N1, N2)."""
    j = chunk_start + tl.arange(0, CHUNK)
    kr, ki = load_planes(k_ptr, j[:, None] * N2 + tl.arange(0, N2)[None, :], N1 * N2)
    kr = kr * k_inv_scale
    ki = ki * k_inv_scale
    if CONJ_K:
        ki = -ki
    cr3 = tl.reshape(cr, (P, CHUNK, N2))
    ci3 = tl.reshape(ci, (P, CHUNK, N2))
    out_r = cr3 * kr[None] - ci3 * ki[None]
    out_i = cr3 * ki[None] + ci3 * kr[None]
    return tl.reshape(out_r, (P * CHUNK, N2)), tl.reshape(out_i, (P * CHUNK, N2))


@triton.jit
def conv_stack(zr, zi, k_ptr, k_inv_scale, f1_ptr, f2_ptr, tw_ptr,
               P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr,
               GAUSS: tl.constexpr, PRECISION: tl.constexpr):
    """U^H (U z * K / k_scale) for an operand stack z (P*N2, HALF); returns the float32 stack.

    Real part = conv of the pairs' first rows, imaginary part = of their second rows. (The
    backward's correlation multiplies by conj(K) with multiply_spectrum directly.)
    """
    HALF: tl.constexpr = N1 // 2
    f2 = load_f2(f2_ptr, N2, PRECISION)
    yr = tl.zeros((P * N2, HALF), dtype=tl.float32)
    yi = tl.zeros((P * N2, HALF), dtype=tl.float32)
    for chunk_start in tl.range(0, N1, CHUNK):
        f1, g1, twr, twi = chunk_constants(f1_ptr, tw_ptr, chunk_start, N1, N2, CHUNK, PRECISION)
        cr, ci = stack_forward_chunk(zr, zi, f1, twr, twi, f2, P, N2, CHUNK, GAUSS, PRECISION)
        cr, ci = multiply_spectrum(cr, ci, k_ptr, chunk_start, k_inv_scale, False, P, N1, N2, CHUNK)
        pr, pi = stack_inverse_chunk(cr, ci, twr, twi, f2, g1, P, N2, CHUNK, GAUSS, PRECISION)
        yr += pr
        yi += pi
    return yr, yi
