"""FlashButterfly's step 2 (K2): N1 circular convolutions of length N2 of complex rows with the
rows of ``fft_N(k)``, on chip, forward and backward (:class:`TritonRowsConv`, behind the
:class:`RowsConv` interface that tests may fill with an oracle).

Runs blockfft's stages on whole rows (a circular convolution, no zero half; full stage-1
matrices): one program per row (b, h, k1) transforms the row and its kernel row
``kz[h, k1] = step1_exact(k)`` chunk by chunk, multiplies and inverse-transforms; w is written
over z. The backward (one program per kernel row (h, k1), looping over b in order) gives dz over
dw and ``dkz = sum_b corr(dw, z)`` (float32), and one exact K1-bwd launch turns dkz into dk.

Knows torch, Triton and reference.py only; dispatches nothing.
"""

from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import triton
import triton.language as tl

from .blockfft import (
    cmul,
    deinterleave,
    forward_chunk,
    interleave,
    interleaved,
    inverse_chunk,
    load_stage_constants,
    spectrum_offsets,
)
from .butterfly_factors import Tuning, k1_backward, k1_forward  # K2 runs K1 for kz and dk
from .launch import cached_constants, launch

__all__ = ["K2_FACTORS", "K2_MAX_N2", "RowsConv", "TritonRowsConv"]

# Step 2's longest rows per input dtype: float32 (3xtf32) operand tiles need more than the
# 227 KB of shared memory beyond N2 = 2048 (backward: 266 KB at 4096); half inputs reach 8192.
K2_MAX_N2 = {torch.float32: 2048, torch.bfloat16: 8192, torch.float16: 8192}


# ------------------------------------------------------------------------------------ K2 ------
class RowsConv(Protocol):
    """Step 2's interface: N1 circular convolutions of length N2 of complex rows with the rows of
    ``fft_N(k)`` (``K[h, k1, k2] = fft_N(k[h])[k1 + N1*k2]``; k's spectrum is the kernel's job).

    ``forward(z, k, out=None) -> w`` and ``backward(dw, z, k, out=None) -> (dz, dk)``; z, w, dz,
    dw are ``(B, H, N1, N2, 2)`` real pairs in the intermediate dtype, ``k (H, Lk)``, dk float32;
    ``out`` may be the input it replaces (w over z, dz over dw).
    """

    def forward(self, z: torch.Tensor, k: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def backward(self, dw: torch.Tensor, z: torch.Tensor, k: torch.Tensor,
                 out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]: ...


# ------------------------------------------------------------------------------------ K2 ------
# Step 2 runs blockfft's stages on complex rows of length N2 = M1 * M2 * M3 that fill the whole
# row (a circular convolution: no zero half), so stage 1 and its inverse contract all M1 inputs
# with full (2*M1, 2*M1) DFT matrices; stages 2, 3 and the twiddles are blockfft's. Every
# contracted / produced dimension stays >= 16 (M1 >= 8, chunk >= 8, M2, M3 >= 8) for sm_90.
K2_FACTORS = {
    512: (8, 8, 8),
    1024: (16, 8, 8),
    2048: (16, 16, 8),
    4096: (16, 16, 16),
    8192: (32, 16, 16),
}
K2_CHUNK = 8


def _k2_plan(n2: int, tuning: Tuning) -> tuple[int, int, int, int]:
    """(M1, M2, M3, chunk) of step 2's transforms of length n2."""
    factors = tuning.k2_factors or K2_FACTORS.get(n2)
    if factors is None or factors[0] * factors[1] * factors[2] != n2:
        raise ValueError(f"flashbutterfly: no step-2 plan for rows of length N2 = {n2} "
                         f"(plans: {sorted(K2_FACTORS)}; tests pass Tuning(k2_factors=...))")
    m1 = factors[0]
    chunk = min(tuning.k2_chunk or K2_CHUNK, m1)
    return (*factors, chunk)


def _k2_precision(dtype: torch.dtype, on_gpu: bool) -> str:
    """float16 operands on max-scaled rows for float16 intermediates, 3xtf32 for float32 ones
    (plain float32 products in the interpreter, which has no tf32)."""
    if dtype == torch.float16:
        return "fp16"
    return "tf32x3" if on_gpu else "ieee"


def _operand_dtype(precision: str) -> torch.dtype:
    return torch.float16 if precision == "fp16" else torch.float32


def _k2_make_constants(m1: int, m2: int, m3: int, operand_dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    from .blockfft import _dft  # the one DFT-matrix builder

    mats = (interleaved(_dft(m1, m1, m1, -1.0)), interleaved(_dft(m1, m1, m1, +1.0)),
            interleaved(_dft(m2, m2, m2, -1.0)), interleaved(_dft(m2, m2, m2, +1.0)),
            interleaved(_dft(m3, m3, m3, -1.0)), interleaved(_dft(m3, m3, m3, +1.0)))
    return tuple(m.to(operand_dtype).contiguous().to(device) for m in mats)


def _k2_constants(m1: int, m2: int, m3: int, operand_dtype: torch.dtype, device) -> tuple[torch.Tensor, ...]:
    """(W1, W1inv, W2, W2inv, W3, W3inv): full interleaved DFT matrices, read-only and cached."""
    return cached_constants(("flashbutterfly-k2", m1, m2, m3, operand_dtype), torch.device(device),
                            lambda dev: _k2_make_constants(m1, m2, m3, operand_dtype, dev))


@triton.jit
def _full_chunk_constants(w1_ptr, w1i_ptr, chunk_start, M1: tl.constexpr, CHUNK: tl.constexpr):
    """Stage-1 matrices of spectrum columns [chunk_start, +CHUNK) of a full-row transform: W1's
    (2*M1, 2*CHUNK) column block and W1inv's (2*CHUNK, 2*M1) row block."""
    ins = tl.arange(0, 2 * M1)
    outs = 2 * chunk_start + tl.arange(0, 2 * CHUNK)
    w1 = tl.load(w1_ptr + ins[:, None] * (2 * M1) + outs[None, :])
    w1i = tl.load(w1i_ptr + outs[:, None] * (2 * M1) + ins[None, :])
    return w1, w1i


@triton.jit
def _row_offsets(row, M: tl.constexpr, M1: tl.constexpr):
    """Offsets of one complex row of an intermediate as an (M, M1, 2) tile [m, j, re/im]:
    time j*M + m (blockfft's stack layout), real pairs."""
    t = tl.arange(0, M1)[None, :] * M + tl.arange(0, M)[:, None]
    return (row * (M1 * M) + t)[:, :, None] * 2 + tl.arange(0, 2)[None, None, :]


@triton.jit
def _load_row_operand(p_ptr, row, M: tl.constexpr, M1: tl.constexpr, PRECISION: tl.constexpr):
    """A complex row as a tensor-core operand (M, 2*M1) and its scale: in the fp16 mode the row
    is divided by max(|re|, |im|) (so the transforms stay in float16's range), else scale 1."""
    x = tl.load(p_ptr + _row_offsets(row, M, M1)).to(tl.float32)
    if PRECISION == "fp16":
        scale = tl.max(tl.max(tl.max(tl.abs(x), axis=2), axis=1), axis=0)
        scale = tl.where(scale > 0, scale, 1.0)
    else:
        scale = 1.0
    re, im = tl.split(x / scale)
    return interleave(re, im, PRECISION), scale


@triton.jit
def _store_row(p_ptr, row, acc, scale, M: tl.constexpr, M1: tl.constexpr):
    """Store an interleaved float32 accumulator (M, 2*M1) times ``scale`` as a complex row."""
    re, im = deinterleave(acc)
    tl.store(p_ptr + _row_offsets(row, M, M1), (tl.join(re, im) * scale).to(p_ptr.dtype.element_ty))


@triton.jit
def _k2_fwd_kernel(
    z_ptr, kz_ptr, w_ptr, w1_ptr, w1i_ptr, w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, kernel_rows, sqrt_n2,
    M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, CHUNK: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    sqrt_n2 = tl.cast(sqrt_n2, tl.float32)  # Inductor passes Python floats as float64: keep float32 math
    # One program per complex row (b, h, k1); its kernel row (h, k1) is row % (H * N1) of kz.
    row = tl.program_id(0)
    M: tl.constexpr = M2 * M3
    x0, sx = _load_row_operand(z_ptr, row, M, M1, PRECISION)
    k0, sk = _load_row_operand(kz_ptr, row % kernel_rows, M, M1, PRECISION)
    stage = load_stage_constants(w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, M2, M3)
    acc = tl.zeros((M, 2 * M1), dtype=tl.float32)
    for chunk_start in tl.range(0, M1, CHUNK):
        w1, w1i = _full_chunk_constants(w1_ptr, w1i_ptr, chunk_start, M1, CHUNK)
        sr, si = forward_chunk(x0, w1, chunk_start, stage, 1, M1, M2, M3, CHUNK, PRECISION, FAST_TRIG)
        kr, ki = forward_chunk(k0, w1, chunk_start, stage, 1, M1, M2, M3, CHUNK, PRECISION, FAST_TRIG)
        pr, pi = cmul(sr, si, kr, ki)
        acc = inverse_chunk(pr, pi, acc, w1i, chunk_start, stage, 1, M1, M2, M3, CHUNK, PRECISION, FAST_TRIG)
    # ifft(fft(z) fft(kz)) = sqrt(N2) U^H(U z * U kz) with U the unitary DFT.
    tl.debug_barrier()  # w may be written over z: every thread has read its part of the row
    _store_row(w_ptr, row, acc, sx * sk * sqrt_n2, M, M1)


@triton.jit
def _k2_bwd_kernel(
    dw_ptr, z_ptr, kz_ptr, dz_ptr, dkz_ptr, w1_ptr, w1i_ptr, w2_ptr, w2i_ptr, w3_ptr, w3i_ptr,
    batch, kernel_rows, sqrt_n2,
    M1: tl.constexpr, M2: tl.constexpr, M3: tl.constexpr, CHUNK: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    sqrt_n2 = tl.cast(sqrt_n2, tl.float32)  # Inductor passes Python floats as float64: keep float32 math
    # One program per kernel row (h, k1) owns the rows (b, h, k1) of every b, in order b = 0, 1, ...
    # dz = corr(dw, kz) per row; dkz = sum_b corr(dw, z), summed into the program's own dkz row
    # (float32, chunked spectrum order while it accumulates): deterministic, no atomics.
    krow = tl.program_id(0)
    M: tl.constexpr = M2 * M3
    k0, sk = _load_row_operand(kz_ptr, krow, M, M1, PRECISION)
    stage = load_stage_constants(w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, M2, M3)
    spec_ptr = dkz_ptr + krow * (2 * M1 * M)  # planes (re, im) of M1*M values each
    spec_offs = spectrum_offsets(CHUNK * M2, M3)
    scale_sum = 0.0
    for b in tl.range(0, batch):
        row = b * kernel_rows + krow
        g0, sg = _load_row_operand(dw_ptr, row, M, M1, PRECISION)
        x0, sx = _load_row_operand(z_ptr, row, M, M1, PRECISION)
        q = sg * sx
        scale_sum += q
        acc = tl.zeros((M, 2 * M1), dtype=tl.float32)
        for chunk_start in tl.range(0, M1, CHUNK):
            w1, w1i = _full_chunk_constants(w1_ptr, w1i_ptr, chunk_start, M1, CHUNK)
            gr, gi = forward_chunk(g0, w1, chunk_start, stage, 1, M1, M2, M3, CHUNK, PRECISION, FAST_TRIG)
            xr, xi = forward_chunk(x0, w1, chunk_start, stage, 1, M1, M2, M3, CHUNK, PRECISION, FAST_TRIG)
            kr, ki = forward_chunk(k0, w1, chunk_start, stage, 1, M1, M2, M3, CHUNK, PRECISION, FAST_TRIG)
            pr, pi = cmul(gr, gi, xr, -xi)  # U dw conj(U z), this row's share of dkz's spectrum
            offs = chunk_start * M + spec_offs
            first = b == 0
            sr = tl.load(spec_ptr + offs, mask=(offs >= 0) & ~first, other=0.0) + q * pr
            si = tl.load(spec_ptr + M1 * M + offs, mask=(offs >= 0) & ~first, other=0.0) + q * pi
            tl.store(spec_ptr + offs, sr)
            tl.store(spec_ptr + M1 * M + offs, si)
            er, ei = cmul(gr, gi, kr, -ki)  # U dw conj(U kz): dz's spectrum
            acc = inverse_chunk(er, ei, acc, w1i, chunk_start, stage, 1, M1, M2, M3, CHUNK, PRECISION, FAST_TRIG)
        tl.debug_barrier()  # the next row (and the final transform) reads the sums, maybe other threads'
        _store_row(dz_ptr, row, acc, sg * sk * sqrt_n2, M, M1)
    # dkz = sqrt(N2) U^H(sum_b q_b U(dw_b/sg) conj(U(z_b/sx))); divided by sum q on the way in
    # so the float16 operands stay in range, multiplied back after.
    acc = tl.zeros((M, 2 * M1), dtype=tl.float32)
    for chunk_start in tl.range(0, M1, CHUNK):
        unused_w1, w1i = _full_chunk_constants(w1_ptr, w1i_ptr, chunk_start, M1, CHUNK)
        offs = chunk_start * M + spec_offs
        sr = tl.load(spec_ptr + offs) / scale_sum
        si = tl.load(spec_ptr + M1 * M + offs) / scale_sum
        acc = inverse_chunk(sr, si, acc, w1i, chunk_start, stage, 1, M1, M2, M3, CHUNK, PRECISION, FAST_TRIG)
    tl.debug_barrier()  # every thread has read the sums before the row is overwritten
    _store_row(dkz_ptr, krow, acc, scale_sum * sqrt_n2, M, M1)


class TritonRowsConv:
    """:class:`RowsConv` by the K2 kernels (on chip, blockfft's stages).

    k's spectrum rows ``K[h, k1, :]`` are ``fft_N2`` of ``kz = step1_exact(k)`` (the exact step-1
    factor applied to k: ``fft_N(k)[k1 + N1 k2] = sum_n2 w_N2^(n2 k2) kz[k1, n2]``). ``kz`` is made
    by one K1 launch with the exact factor computed in registers ((H, N1, N2) complex, the size of
    one batch row of z), and each K2 program transforms its kernel row on chip next to its data
    row: no spectrum table, no torch.fft, one extra forward transform per row (+50% of K2's
    tensor-core work, which is not what bounds it). Backward: ``dkz`` (float32) is summed over the
    batch by one program per (h, k1) row in a fixed order, then ``dk = Re(A^H dkz)[:Lk]`` is one
    K1-backward launch with the exact factor (A). Deterministic: no atomics anywhere. An instance
    keeps the last kz (keyed on k's identity and version), so a backward that recomputes the
    forward makes it once.
    """

    def __init__(self, tuning: Tuning = Tuning()):
        self.tuning = tuning
        self._kz = None  # (k, k's version, split, dtype, kz): a backward reuses its forward's kz

    def _kernel_rows(self, k: torch.Tensor, n1: int, n2: int, dtype: torch.dtype) -> torch.Tensor:
        try:
            version = k._version
        except RuntimeError:  # inference tensors have no version counter: no reuse
            version = None
        cached = self._kz
        if version is not None and cached is not None and cached[0] is k and cached[1:4] == (version, (n1, n2), dtype):
            return cached[4]
        kz = k1_forward(k.unsqueeze(0), None, split=(n1, n2), out_dtype=dtype, tuning=self.tuning)
        self._kz = (k, version, (n1, n2), dtype, kz)
        return kz

    def _setup(self, z: torch.Tensor, k: torch.Tensor):
        n1, n2 = z.shape[2], z.shape[3]
        m1, m2, m3, chunk = _k2_plan(n2, self.tuning)
        precision = self.tuning.k2_precision or _k2_precision(z.dtype, z.is_cuda)
        consts = _k2_constants(m1, m2, m3, _operand_dtype(precision), z.device)
        kz = self._kernel_rows(k, n1, n2, z.dtype)
        meta = dict(M1=m1, M2=m2, M3=m3, CHUNK=chunk, PRECISION=precision, FAST_TRIG=z.is_cuda,
                    num_warps=self.tuning.k2_warps or (8 if n2 >= 4096 else 4), num_stages=1)
        return kz, consts, meta, float(n2) ** 0.5

    def forward(self, z: torch.Tensor, k: torch.Tensor, alloc: Callable[..., torch.Tensor] = torch.empty,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """w; ``out=z`` writes it over z (each program reads its whole row before it writes)."""
        batch, channels, n1 = z.shape[:3]
        kz, consts, meta, sqrt_n2 = self._setup(z, k)
        w = alloc(z.shape, dtype=z.dtype, device=z.device) if out is None else out
        launch(_k2_fwd_kernel, (batch * channels * n1,), z, kz, w, *consts, channels * n1, sqrt_n2, **meta)
        return w

    def backward(self, dw: torch.Tensor, z: torch.Tensor, k: torch.Tensor,
                 alloc: Callable[..., torch.Tensor] = torch.empty,
                 out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(dz, dk float32); ``out=dw`` writes dz over dw (a row is read before the barrier that
        precedes its store, by the one program that owns it)."""
        batch, channels, n1, n2 = z.shape[:4]
        kz, consts, meta, sqrt_n2 = self._setup(z, k)
        dz = alloc(z.shape, dtype=z.dtype, device=z.device) if out is None else out
        dkz = torch.empty((1, channels, n1, n2, 2), dtype=torch.float32, device=z.device)
        launch(_k2_bwd_kernel, (channels * n1,), dw, z, kz, dz, dkz, *consts, batch, channels * n1, sqrt_n2,
               **meta)
        dk, unused = k1_backward(dkz, k.unsqueeze(0).float(), None, split=(n1, n2), alloc=alloc, tuning=self.tuning)
        return dz, dk[0]
