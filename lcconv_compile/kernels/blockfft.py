"""Three-level block FFT for the FlashConv v5 kernels: the size plan, the constant matrices and
the ``@triton.jit`` helpers that move one chunk of a stack of complex rows through the
transform, one real tensor-core product per stage.

The FFT of size ``N = N1 * N2 * N3`` (Cooley-Tukey, applied twice)::

    x[n1*M + m], m = n2*N3 + n3, M = N2*N3     viewed as A[(m), n1]
    B[m, k1]  = sum_n1 A[m, n1] F1[n1, k1]      DFT over n1 (stage 1)
    B        *= w_N^(m k1)                      twiddle 1
    C[k1, n3, k2] = sum_n2 B[n2 N3 + n3, k1] F2[n2, k2]   (stage 2)
    C        *= w_M^(n3 k2)                     twiddle 2
    X[k1 + N1 k2 + N1 N2 k3] = sum_n3 C[k1, n3, k2] F3[n3, k3]   (stage 3)

and the inverse runs the adjoint steps backwards (conjugate matrices and twiddles). Each F is
unitary (scaled by 1/sqrt(size)), so U = F3 T2 F2 T1 F1 is unitary and no intermediate grows
by more than sqrt(N) over the input: float16 operands stay in range on max-scaled rows.

What makes it cheap:

* complex values travel interleaved, ``[re0, im0, re1, im1, ...]`` along the contracted axis,
  so a complex stage ``X @ F`` is ONE real product ``X (M x 2r) @ W (2r x 2s)`` with
  ``W[2j+c, 2k+c'] = [[Fr, Fi], [-Fi, Fr]][c, c']`` (one ``tl.dot``, one wait); twiddles are
  applied in registers after ``tl.split``, then a permute brings the next axis last;
* zero padding is implicit: a causal convolution of length L uses N >= 2L, so only
  ``n1 < N1/2`` is non-zero (stage 1 contracts N1/2 inputs) and only those outputs of the
  inverse are kept (the last product produces N1/2 columns);
* spectrum columns k1 are independent between stage 1 and its inverse, so the kernels walk
  over chunks of ``CHUNK`` values of k1, holding at full size only the input operand and the
  output accumulator (like FlashAttention walks over keys);
* P complex rows (packed pairs of real rows, see blockfft_conv.py) are stacked in the M dimension
  of every product, so the constant tiles are read once per chunk for all of them;
* a sequence of two blocks of N/2 samples (longer than one plan) is two rows of the stack
  whose spectra are mixed block-Toeplitz-wise (:func:`block_product`), so L reaches N.

Tensor-core work per complex row (forward + inverse): 8 N N1 + 16 N (N2 + N3) real FLOPs,
about half the two-level plan of FlashConv v3 (removed; git history) at the same N.

This module knows Triton and torch only (no torch.library, no Inductor, no launch policy).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import cached_constants
from .common import operand  # float16 in the "fp16" mode (rows are max-scaled), else as is

# (N1, N2, N3) per FFT size. N1 is the chunked axis; it is the largest factor because stage 1
# and its inverse contract only half of it. Every dimension of every product stays >= 16 for
# tensor cores: stage 1 contracts 2 * N1/2 = N1 >= 16, stages 2 and 3 contract 2 * N2, 2 * N3 >= 16.
FACTORS = {
    1024: (16, 8, 8),
    2048: (16, 16, 8),
    4096: (16, 16, 16),
    8192: (32, 16, 16),
    16384: (32, 32, 16),
}
MIN_FFT_SIZE = min(FACTORS)
MAX_FFT_SIZE = max(FACTORS)
DEFAULT_CHUNK = 8  # k1 values per chunk: the narrowest that keeps 2 * CHUNK >= 16


@dataclass(frozen=True)
class BlockFFTPlan:
    """How a sequence is laid out for the three-level block FFT."""

    fft_size: int  # N = n1 * n2 * n3, a power of two >= 2 * seqlen
    n1: int  # chunked axis (stage 1); only n1 < n1/2 holds data
    n2: int
    n3: int
    chunk: int  # k1 values per step of the chunk loop

    @property
    def rows(self) -> int:
        """M = N2 * N3: rows of a complex row's tile (its time samples are t = n1 * M + m)."""
        return self.n2 * self.n3

    @property
    def half(self) -> int:
        return self.n1 // 2

    def tensor_core_flops(self) -> int:
        """Real FLOPs of one complex row's forward + inverse transform (fp16 products)."""
        n = self.fft_size
        return 8 * n * self.n1 + 16 * n * (self.n2 + self.n3)


def plan_for(seqlen: int, factors: Optional[tuple[int, int, int]] = None,
             chunk: Optional[int] = None) -> BlockFFTPlan:
    """The plan for a causal convolution of length ``seqlen`` (N >= 2 * seqlen).

    ``factors`` overrides the table (tests use small ones such as (4, 4, 4) in the interpreter;
    compiled kernels need the table's sizes, whose products are all at least 16 wide).
    """
    if factors is None:
        fft_size = max(MIN_FFT_SIZE, 1 << math.ceil(math.log2(max(2 * seqlen, 1))))
        if fft_size not in FACTORS:
            raise ValueError(f"seqlen={seqlen}: needs an FFT of {fft_size} points, more than the "
                             f"block FFT's largest plan ({MAX_FFT_SIZE})")
        factors = FACTORS[fft_size]
    n1, n2, n3 = factors
    if any(f < 2 or f & (f - 1) for f in factors):
        raise ValueError(f"factors={factors}: expected powers of two >= 2")
    if n1 * n2 * n3 < 2 * seqlen:
        raise ValueError(f"factors={factors}: N = {n1 * n2 * n3} is less than 2 * seqlen = {2 * seqlen}")
    chunk = chunk or min(DEFAULT_CHUNK, n1)
    if n1 % chunk or chunk & (chunk - 1):
        raise ValueError(f"chunk={chunk}: expected a power of two dividing n1={n1}")
    return BlockFFTPlan(n1 * n2 * n3, n1, n2, n3, chunk)


def compiles_on_gpu(plan: BlockFFTPlan) -> bool:
    """Whether a GPU can compile the kernels for this plan: every complex stage is a ``tl.dot``
    whose contracted size is twice its factor (n1/2 for stage 1, the chunk for the k1 products),
    and sm_90 needs it >= 16. Every plan of :data:`FACTORS` does; smaller factors exist for
    Triton's interpreter (tests) only (seen on the H100: "K >= 16" assertions)."""
    return plan.n1 >= 16 and plan.n2 >= 8 and plan.n3 >= 8 and plan.chunk >= 8


# ------------------------------------------------------------------------------ constants --
def _dft(rows: int, cols: int, size: int, sign: float) -> torch.Tensor:
    """exp(sign 2 pi i j k / size) / sqrt(size) for j < rows, k < cols (complex128)."""
    j = torch.arange(rows, dtype=torch.float64)[:, None]
    k = torch.arange(cols, dtype=torch.float64)[None, :]
    return torch.exp(sign * 2j * math.pi * j * k / size) / math.sqrt(size)


def interleaved(matrix: torch.Tensor) -> torch.Tensor:
    """Complex (r, s) -> real (2r, 2s): W[2j+c, 2k+c'] so that [re, im]-interleaved rows times W
    are the interleaved rows of the complex product."""
    re, im = matrix.real, matrix.imag
    out = torch.empty(2 * matrix.shape[0], 2 * matrix.shape[1], dtype=torch.float64)
    out[0::2, 0::2], out[1::2, 0::2] = re, -im
    out[0::2, 1::2], out[1::2, 1::2] = im, re
    return out


def _make_constants(n1: int, n2: int, n3: int, operand_dtype: torch.dtype, device: torch.device):
    half = n1 // 2
    mats = (
        interleaved(_dft(half, n1, n1, -1.0)),  # stage 1: (2 * N1/2, 2 * N1), n1 < N1/2 only
        interleaved(_dft(n1, half, n1, +1.0)),  # its inverse: (2 * N1, 2 * N1/2), keeps n1 < N1/2
        interleaved(_dft(n2, n2, n2, -1.0)), interleaved(_dft(n2, n2, n2, +1.0)),
        interleaved(_dft(n3, n3, n3, -1.0)), interleaved(_dft(n3, n3, n3, +1.0)),
    )
    return tuple(m.to(operand_dtype).contiguous().to(device) for m in mats)


def block_fft_constants(plan: BlockFFTPlan, operand_dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """(W1, W1inv, W2, W2inv, W3, W3inv): the interleaved stage matrices in the operand dtype
    (float16, or float32 for 3xtf32), made once per size, dtype and device and read-only
    (:func:`.launch.cached_constants`, which also lets the compiler's CUDA stage trace them as
    graph constants). Twiddles have no table: the kernels compute them in registers
    (:func:`twiddle`)."""
    key = ("blockfft", plan.n1, plan.n2, plan.n3, operand_dtype)
    return cached_constants(key, torch.device(device),
                            lambda dev: _make_constants(plan.n1, plan.n2, plan.n3, operand_dtype, dev))


def spectrum_order(plan: BlockFFTPlan) -> torch.Tensor:
    """Natural frequency index of every element of the kernels' chunked spectrum layout
    [k1 chunk][(c, k2), k3] flattened: k = k1 + N1 k2 + N1 N2 k3 (for tests)."""
    k1 = torch.arange(plan.n1).view(plan.n1 // plan.chunk, plan.chunk, 1, 1)
    k2 = torch.arange(plan.n2).view(1, 1, plan.n2, 1)
    k3 = torch.arange(plan.n3).view(1, 1, 1, plan.n3)
    return (k1 + plan.n1 * k2 + plan.n1 * plan.n2 * k3).reshape(-1)


# ------------------------------------------------------------------------- Triton helpers --
# A stack holds P complex rows; element [(p, m), n1] of its (P*M, N1/2) tile is time n1*M + m.
@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "fp16":
        return tl.dot(a, b, acc)
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def interleave(re, im, PRECISION: tl.constexpr):
    """(R, C) re and im -> (R, 2C) operand [re0, im0, re1, im1, ...]."""
    R: tl.constexpr = re.shape[0]
    C: tl.constexpr = re.shape[1]
    return operand(tl.reshape(tl.join(re, im), (R, 2 * C)), PRECISION)


@triton.jit
def deinterleave(x):
    """(R, 2C) interleaved -> (re, im), each (R, C)."""
    R: tl.constexpr = x.shape[0]
    C: tl.constexpr = x.shape[1] // 2
    return tl.split(tl.reshape(x, (R, C, 2)))


@triton.jit
def complex_stage(re, im, w, PRECISION: tl.constexpr):
    """(re + i im) @ F for an interleaved stage matrix w = W(F): one tensor-core product."""
    R: tl.constexpr = re.shape[0]
    S: tl.constexpr = w.shape[1]
    acc = tl.zeros((R, S), dtype=tl.float32)
    return deinterleave(mma(interleave(re, im, PRECISION), w, acc, PRECISION))


@triton.jit
def cmul(ar, ai, br, bi):
    return ar * br - ai * bi, ar * bi + ai * br


@triton.jit
def load_square(ptr, SIZE: tl.constexpr):
    """A (SIZE, SIZE) row-major matrix."""
    i = tl.arange(0, SIZE)
    return tl.load(ptr + i[:, None] * SIZE + i[None, :])


@triton.jit
def _cos_sin_approx(angle):
    """(cos, sin) by the SFU (|error| < 1e-6 on [-pi, pi]); one instruction each."""
    c = tl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [angle], dtype=tl.float32,
                                  is_pure=True, pack=1)
    s = tl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [angle], dtype=tl.float32,
                                  is_pure=True, pack=1)
    return c, s


@triton.jit
def twiddle(a, b, SIZE: tl.constexpr, FAST_TRIG: tl.constexpr):
    """w_SIZE^(a b) = exp(-2 pi i a b / SIZE) for integer index tensors a, b (broadcast), as
    (re, im), computed in registers where it is used: no table, no load, no layout copy.
    The exponent is reduced mod SIZE to [-SIZE/2, SIZE/2) first, so the angle is in [-pi, pi)."""
    e = (a * b) & (SIZE - 1)
    e = tl.where(e >= SIZE // 2, e - SIZE, e)
    angle = e.to(tl.float32) * (-6.283185307179586 / SIZE)
    if FAST_TRIG:
        return _cos_sin_approx(angle)
    else:  # the interpreter has no inline assembly
        return tl.cos(angle), tl.sin(angle)


@triton.jit
def load_stage_constants(w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, N2: tl.constexpr, N3: tl.constexpr):
    """The chunk-independent stage matrices: W2, W2inv, W3, W3inv."""
    return (load_square(w2_ptr, 2 * N2), load_square(w2i_ptr, 2 * N2),
            load_square(w3_ptr, 2 * N3), load_square(w3i_ptr, 2 * N3))


@triton.jit
def load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1: tl.constexpr, CHUNK: tl.constexpr):
    """Stage-1 matrices of spectrum columns k1 in [chunk_start, +CHUNK): W1's (N1, 2*CHUNK)
    column block and W1inv's (2*CHUNK, N1) row block."""
    HALF: tl.constexpr = N1 // 2
    ins = tl.arange(0, 2 * HALF)
    outs = 2 * chunk_start + tl.arange(0, 2 * CHUNK)
    w1 = tl.load(w1_ptr + ins[:, None] * (2 * N1) + outs[None, :])
    w1i = tl.load(w1i_ptr + outs[:, None] * (2 * HALF) + ins[None, :])
    return w1, w1i


@triton.jit
def twiddle1(chunk_start, M: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr, FAST_TRIG: tl.constexpr):
    """w_N^(m k1) for the chunk, (1, M, CHUNK)."""
    m = tl.arange(0, M)[None, :, None]
    k1 = chunk_start + tl.arange(0, CHUNK)[None, None, :]
    return twiddle(m, k1, N, FAST_TRIG)


@triton.jit
def twiddle2(N2: tl.constexpr, N3: tl.constexpr, FAST_TRIG: tl.constexpr):
    """w_M^(n3 k2), (1, N3, N2)."""
    n3 = tl.arange(0, N3)[None, :, None]
    k2 = tl.arange(0, N2)[None, None, :]
    return twiddle(n3, k2, N2 * N3, FAST_TRIG)


@triton.jit
def forward_chunk(x0, w1, chunk_start, stage, P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                  N3: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr):
    """Spectrum columns of one k1 chunk for every row of a stack, as (P*CHUNK*N2, N3) planes,
    element [(p, c, k2), k3]. x0: the stack's interleaved operand (P*M, N1)."""
    M: tl.constexpr = N2 * N3
    w2, unused_w2i, w3, unused_w3i = stage
    acc = tl.zeros((P * M, 2 * CHUNK), dtype=tl.float32)
    br, bi = deinterleave(mma(x0, w1, acc, PRECISION))  # (P*M, CHUNK): [(p, n2, n3), c]
    tw1r, tw1i = twiddle1(chunk_start, M, N1 * M, CHUNK, FAST_TRIG)
    br, bi = cmul(tl.reshape(br, (P, M, CHUNK)), tl.reshape(bi, (P, M, CHUNK)), tw1r, tw1i)
    # Bring n2 last: (p, n2, n3, c) -> (p, c, n3, n2).
    br = tl.reshape(tl.permute(tl.reshape(br, (P, N2, N3, CHUNK)), (0, 3, 2, 1)), (P * CHUNK * N3, N2))
    bi = tl.reshape(tl.permute(tl.reshape(bi, (P, N2, N3, CHUNK)), (0, 3, 2, 1)), (P * CHUNK * N3, N2))
    cr, ci = complex_stage(br, bi, w2, PRECISION)  # [(p, c, n3), k2]
    tw2r, tw2i = twiddle2(N2, N3, FAST_TRIG)
    cr, ci = cmul(tl.reshape(cr, (P * CHUNK, N3, N2)), tl.reshape(ci, (P * CHUNK, N3, N2)), tw2r, tw2i)
    # Bring n3 last: (pc, n3, k2) -> (pc, k2, n3).
    cr = tl.reshape(tl.permute(cr, (0, 2, 1)), (P * CHUNK * N2, N3))
    ci = tl.reshape(tl.permute(ci, (0, 2, 1)), (P * CHUNK * N2, N3))
    return complex_stage(cr, ci, w3, PRECISION)


@triton.jit
def inverse_chunk(sr, si, acc, w1i, chunk_start, stage, P: tl.constexpr, N1: tl.constexpr,
                  N2: tl.constexpr, N3: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                  FAST_TRIG: tl.constexpr):
    """acc (P*M, N1 interleaved) + the time samples n1 < N1/2 contributed by one chunk's
    spectrum columns (P*CHUNK*N2, N3): the adjoint of forward_chunk."""
    M: tl.constexpr = N2 * N3
    unused_w2, w2i, unused_w3, w3i = stage
    dr, di = complex_stage(sr, si, w3i, PRECISION)  # [(p, c, k2), n3]
    dr = tl.permute(tl.reshape(dr, (P * CHUNK, N2, N3)), (0, 2, 1))  # (pc, n3, k2)
    di = tl.permute(tl.reshape(di, (P * CHUNK, N2, N3)), (0, 2, 1))
    tw2r, tw2i = twiddle2(N2, N3, FAST_TRIG)
    dr, di = cmul(dr, di, tw2r, -tw2i)
    er, ei = complex_stage(tl.reshape(dr, (P * CHUNK * N3, N2)), tl.reshape(di, (P * CHUNK * N3, N2)),
                           w2i, PRECISION)  # [(p, c, n3), n2]
    # Back to the stack's order: (p, c, n3, n2) -> (p, n2, n3, c).
    er = tl.reshape(tl.permute(tl.reshape(er, (P, CHUNK, N3, N2)), (0, 3, 2, 1)), (P, M, CHUNK))
    ei = tl.reshape(tl.permute(tl.reshape(ei, (P, CHUNK, N3, N2)), (0, 3, 2, 1)), (P, M, CHUNK))
    tw1r, tw1i = twiddle1(chunk_start, M, N1 * M, CHUNK, FAST_TRIG)
    er, ei = cmul(er, ei, tw1r, -tw1i)
    x = interleave(tl.reshape(er, (P * M, CHUNK)), tl.reshape(ei, (P * M, CHUNK)), PRECISION)
    return mma(x, w1i, acc, PRECISION)


@triton.jit
def _split_blocks(x, R: tl.constexpr, BLOCKS: tl.constexpr, C: tl.constexpr):
    """(R*2*C_rows, C) planes in [row, block, ...] order -> (block 0, block 1), each (R, C_rows, C)."""
    ROWS: tl.constexpr = x.shape[0] // (R * BLOCKS)
    return tl.split(tl.permute(tl.reshape(x, (R, BLOCKS, ROWS, C)), (0, 2, 3, 1)))


@triton.jit
def _join_blocks(b0, b1):
    """The inverse of _split_blocks: (R, C_rows, C) x 2 -> (R*2*C_rows, C)."""
    R: tl.constexpr = b0.shape[0]
    ROWS: tl.constexpr = b0.shape[1]
    C: tl.constexpr = b0.shape[2]
    return tl.reshape(tl.permute(tl.join(b0, b1), (0, 3, 1, 2)), (R * 2 * ROWS, C))


@triton.jit
def block_product(sr, si, kr, ki, chunk_start, P: tl.constexpr, BLOCKS: tl.constexpr,
                  CONJ_K: tl.constexpr, N2: tl.constexpr):
    """Stack spectra (P*BLOCKS*CHUNK*N2, N3), rows [pair, block, (c, k2)], times a kernel's
    (PK*BLOCKS*CHUNK*N2, N3) with PK = 1 (one row for every pair) or P (one per pair).

    BLOCKS = 1: the product S K (CONJ_K: S conj(K), a correlation).
    BLOCKS = 2 (a sequence of two blocks of T = N/2 samples, each transformed alone): the block
    Toeplitz product of a causal convolution of length 2T,
        Z0 = S0 K0,                 Z1 = S0 K1 + S1 K0 + (-1)^k1 S0 K0
    (the sign shifts by T: the inverse's first half of (-1)^k X is the second half of X's, i.e.
    the tail of u0 * k0 that lands in block 1), and with CONJ_K its adjoint
        Z0 = S0 K0* + S1 K1* + (-1)^k1 S1 K0*,   Z1 = S1 K0*.
    (-1)^k = (-1)^k1 because N1 is even (k = k1 + N1 k2 + N1 N2 k3)."""
    C: tl.constexpr = kr.shape[1]
    CR: tl.constexpr = sr.shape[0] // (P * BLOCKS)  # CHUNK * N2 rows per block
    PK: tl.constexpr = kr.shape[0] // (BLOCKS * CR)
    if CONJ_K:
        ki = -ki
    if BLOCKS == 1:
        pr, pi = cmul(tl.reshape(sr, (P, CR, C)), tl.reshape(si, (P, CR, C)),
                      tl.reshape(kr, (PK, CR, C)), tl.reshape(ki, (PK, CR, C)))
        return tl.reshape(pr, (P * CR, C)), tl.reshape(pi, (P * CR, C))
    else:
        s0r, s1r = _split_blocks(sr, P, BLOCKS, C)
        s0i, s1i = _split_blocks(si, P, BLOCKS, C)
        k0r, k1r = _split_blocks(kr, PK, BLOCKS, C)
        k0i, k1i = _split_blocks(ki, PK, BLOCKS, C)
        c = chunk_start + tl.arange(0, CR)[None, :, None] // N2
        sign = (1 - 2 * (c & 1)).to(tl.float32)  # (-1)^k1
        if CONJ_K:
            z1r, z1i = cmul(s1r, s1i, k0r, k0i)
            ar, ai = cmul(s0r, s0i, k0r, k0i)
            br, bi = cmul(s1r, s1i, k1r, k1i)
            z0r, z0i = ar + br + sign * z1r, ai + bi + sign * z1i
        else:
            z0r, z0i = cmul(s0r, s0i, k0r, k0i)
            ar, ai = cmul(s0r, s0i, k1r, k1i)
            br, bi = cmul(s1r, s1i, k0r, k0i)
            z1r, z1i = ar + br + sign * z0r, ai + bi + sign * z0i
        return _join_blocks(z0r, z1r), _join_blocks(z0i, z1i)


@triton.jit
def spectrum_offsets(ROWS: tl.constexpr, N3: tl.constexpr):
    """Offsets of a chunk's (ROWS, N3) spectrum plane in a scratch of consecutive chunks."""
    return tl.arange(0, ROWS)[:, None] * N3 + tl.arange(0, N3)[None, :]


@triton.jit
def store_kernel_spectrum(k0, kspec_ptr, w1_ptr, w1i_ptr, stage, BLOCKS: tl.constexpr, N1: tl.constexpr,
                          N2: tl.constexpr, N3: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
                          FAST_TRIG: tl.constexpr):
    """U k for a kernel operand k0 (BLOCKS*M, N1) into kspec_ptr: planes (re, im) of BLOCKS*N
    values, chunk after chunk in forward_chunk's order (the caller owns the barriers)."""
    M: tl.constexpr = N2 * N3
    offs = spectrum_offsets(BLOCKS * CHUNK * N2, N3)
    for chunk_start in tl.range(0, N1, CHUNK):
        w1, unused_w1i = load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1, CHUNK)
        kr, ki = forward_chunk(k0, w1, chunk_start, stage, BLOCKS, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
        base = chunk_start * (BLOCKS * M)
        tl.store(kspec_ptr + base + offs, kr.to(kspec_ptr.dtype.element_ty))
        tl.store(kspec_ptr + BLOCKS * N1 * M + base + offs, ki.to(kspec_ptr.dtype.element_ty))


@triton.jit
def load_kernel_chunk(kspec_ptr, chunk_start, BLOCKS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                      N3: tl.constexpr, CHUNK: tl.constexpr):
    """One chunk of a spectrum written by store_kernel_spectrum, as float32 (re, im)."""
    M: tl.constexpr = N2 * N3
    offs = chunk_start * (BLOCKS * M) + spectrum_offsets(BLOCKS * CHUNK * N2, N3)
    kr = tl.load(kspec_ptr + offs).to(tl.float32)
    ki = tl.load(kspec_ptr + BLOCKS * N1 * M + offs).to(tl.float32)
    return kr, ki


@triton.jit
def kernel_chunk(k0, kspec_ptr, w1, chunk_start, stage, KSPEC_SCRATCH: tl.constexpr, BLOCKS: tl.constexpr,
                 N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr, CHUNK: tl.constexpr,
                 PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr):
    """k's spectrum for one chunk: loaded from the scratch (KSPEC_SCRATCH) or transformed now."""
    if KSPEC_SCRATCH:
        return load_kernel_chunk(kspec_ptr, chunk_start, BLOCKS, N1, N2, N3, CHUNK)
    else:
        return forward_chunk(k0, w1, chunk_start, stage, BLOCKS, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)


@triton.jit
def convolve_stack(x0, k0, kspec_ptr, w1_ptr, w1i_ptr, stage, KSPEC_SCRATCH: tl.constexpr, P: tl.constexpr,
                   BLOCKS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr, CHUNK: tl.constexpr,
                   PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr):
    """U^H (U x * U k) for a stack operand x0 (P*BLOCKS*M, N1) of P rows of BLOCKS blocks and a
    kernel operand k0 (BLOCKS*M, N1) (block product: see block_product): the interleaved float32
    accumulator (P*BLOCKS*M, N1). k's spectrum is read chunk by chunk from kspec_ptr
    (KSPEC_SCRATCH) or formed chunk by chunk from k0."""
    M: tl.constexpr = N2 * N3
    R: tl.constexpr = P * BLOCKS
    acc = tl.zeros((R * M, N1), dtype=tl.float32)
    for chunk_start in tl.range(0, N1, CHUNK):
        w1, w1i = load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1, CHUNK)
        sr, si = forward_chunk(x0, w1, chunk_start, stage, R, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
        kr, ki = kernel_chunk(k0, kspec_ptr, w1, chunk_start, stage, KSPEC_SCRATCH, BLOCKS, N1, N2, N3,
                              CHUNK, PRECISION, FAST_TRIG)
        sr, si = block_product(sr, si, kr, ki, chunk_start, P, BLOCKS, False, N2)
        acc = inverse_chunk(sr, si, acc, w1i, chunk_start, stage, R, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
    return acc
