"""FlashButterfly: the Triton kernels of the three-step long convolution (K1 = step 1, K2 =
step 2 on chip, K3 = step 3 + epilogue) with trainable or exact-FFT factors, and their backward.

The math and index conventions are :func:`lcconv_compile.reference.butterfly_conv_ref` (read its
section comment first). ``N = N1 * N2`` with ``(N1, N2) = reference.butterfly_split(N)``; u is
viewed as ``x[n1, n2] = u[n1*N2 + n2]`` (zero past L). Per (batch, channel) row:

    K1  z[k1, n2] = sum_n1 in_factor[n2, k1, n1] x[n1, n2]     one read of u; writes z
    K2  w[k1, :]  = N1 circular convolutions of length N2 with the rows of fft_N(k)  (on chip)
    K3  y[t]      = epilogue(Re(sum_k1 out_factor[n2, n1, k1] w[k1, n2]) + D u[t]), t = n1*N2 + n2

The intermediates z and w are ``(B, H, N1, N2, 2)``: complex as interleaved real pairs, float16
for half inputs and float32 for float32 inputs (:func:`intermediate_dtype`). One program owns a
block of columns n2 (and, forward, a block of rows): the factors of its columns are loaded once
and reused for every row it handles.

K2 (:class:`TritonRowsConv`) runs blockfft's stages on whole rows (a circular convolution, no
zero half; full stage-1 matrices): one program per row (b, h, k1) transforms the row and its
kernel row ``kz[h, k1] = step1_exact(k)`` chunk by chunk, multiplies and inverse-transforms; w is
written over z. k's spectrum rows are never stored: one K1 launch with the exact factor makes kz
((H, N1, N2) complex, one batch row's worth), and each program transforms its kernel row on
chip (+50% K2 tensor-core work, against an (H, N) complex spectrum round trip).

Backward (``dX = F^H dZ``, ``dF = sum over rows of dZ X^H`` for each step): K3-bwd gives dw, the
out_factor gradient, dD, and dc (for du's skip term); K2-bwd (one program per kernel row (h, k1),
looping over b in order) gives dz over dw and ``dkz = sum_b corr(dw, z)`` (float32), and one
exact K1-bwd launch turns dkz into dk; K1-bwd gives du and the in_factor gradient. Factor
gradients are accumulated in registers by one program per (column block, row group), looping
over its rows in a fixed order; the launcher sums the row groups in a fixed order: bit-identical
results for identical inputs, no atomics.

Two users: ``lcconv::butterfly_conv`` (learned factors, :func:`butterfly_conv_fwd` /
:func:`butterfly_conv_bwd`, where :func:`supports_learned`) and the ``fftconv`` family
(:func:`supports`, :func:`fftconv_fwd`, :func:`fftconv_bwd`: the exact factors, steps 1 and 3 by
:mod:`butterfly_steps`; no factor tables, no factor gradients). Gates of ``fftconv`` are torch
multiplies around the kernels (not fused).

Exact factors (the fftconv family, kz, dk): steps 1 and 3 are :mod:`butterfly_steps`' tensor-core
products (any N1), so these kernels cover every length to 4M; the op dispatches them only where
they were measured faster than the torch.fft reference (:data:`DISPATCH_MAX_N1`,
:data:`DISPATCH_DTYPES`).

Limits, said plainly:
* Learned factors (one matrix per column) still run K1/K3 with broadcast multiply-adds on CUDA
  cores (not ``tl.dot``); the factor tile is ``BLOCK_C * N1^2`` complex values in registers.
  sm_90 compiles N1 <= 64 (:data:`MAX_N1`); N1 = 256 spills 4.3 KB (K1) and 18.6 KB (K3) per
  thread (scripts/compile_check.py --butterfly --learned). Measured 7-15x slower than the exact
  kernels on the H100 (benchmarks/NOTES.md). Next: columns grouped so a tile shares its factor,
  as a batched tl.dot.
* float32 (3xtf32) K2 needs > 227 KB of shared memory beyond N2 = 2048 (:data:`K2_MAX_N2`): the
  fftconv family then splits with N2 = 2048 (float32 to N = 128K, L = 64K); the learned op's
  split is fixed (N2 = 8192 from N = 128K), so float32 learned calls past N = 32K run the reference.
* K2 at N2 = 8192 (half) uses 255 registers, spilling 4 bytes forward and 64-496 bytes backward;
  it bounds the family (4.5 of 5.8 ms forward at (2,1024,64K)).
* The float16 intermediates are not scaled: inputs of magnitude above ~65504 / N1 overflow, and
  gradients small enough to make dw float16 subnormal (|dw| < 6e-5) lose precision (an estimate,
  not measured).

Knows torch, Triton and reference.py only (no torch.library, no Inductor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol

import torch
import triton
import triton.language as tl

from .. import reference
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
from . import butterfly_steps
from .common import gelu, gelu_grad, offsets_fit_int32, strides
from .launch import cached_constants, launch

__all__ = [
    "Tuning",
    "RowsConv",
    "intermediate_dtype",
    "k1_forward",
    "k3_forward",
    "k3_backward",
    "k1_backward",
    "butterfly_conv_fwd",
    "butterfly_conv_bwd",
    "TritonRowsConv",
    "split_for",
    "covers",
    "split_compiles",
    "supports_learned",
    "supports",
    "fftconv_fwd",
    "fftconv_bwd",
]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_SEQLEN = 1 << 22  # 4M: the op's longest; what runs here is what covers() says
# Steps 1 and 3 run on CUDA cores with the factor tile (BLOCK_C * N1^2 complex) in registers:
# N1 = 64 compiles for sm_90 at 178-255 registers (96 spilled bytes in K3's backward), N1 = 256
# cannot (scripts/compile_check.py --butterfly; module docstring).
MAX_N1 = 64
# The op dispatches here only up to this N1 (L = 2M for half inputs at Lk = L, 64K for float32):
# measured on the H100 (bf16) 1.8-2.2x faster forward and 1.6-2.1x faster forward+backward than
# torch.fft at 64K, 256K, 1M and 2M (N1 = 256 / 512 run the two-level steps). At 4M (N1 = 1024)
# forward is 1.5x faster but forward+backward 0.91x: its backward's 3xtf32 step 3 (dk) spills
# (benchmarks/NOTES.md, stop 11). Calls past it run the reference; the kernels cover them.
DISPATCH_MAX_N1 = 512
# float32 inputs are not dispatched: their 3xtf32 steps and N2 = 2048 split measured 0.5-0.7x the
# torch.fft reference at 32K/64K and slower beyond (the kernels still compute them).
DISPATCH_DTYPES = (torch.bfloat16, torch.float16)
# Step 2's longest rows per input dtype: float32 (3xtf32) operand tiles need more than the
# 227 KB of shared memory beyond N2 = 2048 (backward: 266 KB at 4096); half inputs reach 8192.
K2_MAX_N2 = {torch.float32: 2048, torch.bfloat16: 8192, torch.float16: 8192}


def intermediate_dtype(u_dtype: torch.dtype) -> torch.dtype:
    """float32 intermediates for float32 inputs, float16 for half inputs (more mantissa than bf16)."""
    return torch.float32 if u_dtype == torch.float32 else torch.float16


@dataclass(frozen=True)
class Tuning:
    """Launch parameters a caller may override; None = the default (untuned: see the docstring)."""

    block_c: Optional[int] = None  # columns n2 per program (a power of two <= N2)
    rows_per_program: Optional[int] = None  # forward: (batch, channel) rows per program
    row_groups: Optional[int] = None  # backward: programs per column block (partial factor grads)
    num_warps: Optional[int] = None
    k2_factors: Optional[tuple[int, int, int]] = None  # step 2's (M1, M2, M3); tests use small ones
    k2_chunk: Optional[int] = None
    k2_precision: Optional[str] = None  # "fp16", "tf32x3" or "ieee"; default from the dtype
    k2_warps: Optional[int] = None
    split: Optional[tuple[int, int]] = None  # fftconv family: (N1, N2) in place of split_for's (tests)


def _block_c(n1: int, n2: int, tuning: Tuning) -> int:
    # The factor tile of a program holds BLOCK_C * N1^2 complex values in registers.
    return tuning.block_c or min(n2, max(1, triton.next_power_of_2(4096 // (n1 * n1) + 1) // 2))


def _split_of(factor: Optional[torch.Tensor], split: Optional[tuple[int, int]]) -> tuple[int, int]:
    """(N1, N2) of a (N2, N1, N1, 2) factor, or ``split`` where the factor is None (the exact FFT,
    computed in registers)."""
    if factor is None:
        if split is None:
            raise ValueError("flashbutterfly: without a factor (the exact FFT) give split=(N1, N2)")
        return split
    return factor.shape[1], factor.shape[0]


def _factor_arg(factor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return factor.contiguous() if factor is not None else None


def _exact_tiles(tuning: Tuning) -> dict:
    """The Tuning fields the exact-factor kernels (:mod:`butterfly_steps`) take."""
    return dict(block_n=tuning.block_c, rows_per_program=tuning.rows_per_program, num_warps=tuning.num_warps)


# ----------------------------------------------------------------------------- shared pieces --
@triton.jit
def _columns(N1: tl.constexpr, N2: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's columns n2 and the times ``t[n1, c] = n1*N2 + n2`` of its tile."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    return cols, tl.arange(0, N1)[:, None] * N2 + cols[None, :]


@triton.jit
def _row(row, rows, channels, t, seqlen):
    """(valid, batch index, channel, in-sequence mask of the tile) of a (batch, channel) row."""
    valid = row < rows
    return valid, row // channels, row % channels, valid & (t < seqlen)


@triton.jit
def _factor_offsets(cols, N1: tl.constexpr):
    """Offsets of the real parts of a factor's ``(N1, N1, BLOCK_C)`` tile ``[i, j, c] = f[c, i, j]``."""
    i = tl.arange(0, N1)[:, None, None]
    j = tl.arange(0, N1)[None, :, None]
    return ((cols[None, None, :] * N1 + i) * N1 + j) * 2


@triton.jit
def _factor_tile(f_ptr, cols, N1: tl.constexpr):
    """A factor's ``(N1, N1, BLOCK_C)`` tile as (re, im) in float32, ``[i, j, c] = f[c, i, j]``."""
    offs = _factor_offsets(cols, N1)
    return tl.load(f_ptr + offs).to(tl.float32), tl.load(f_ptr + offs + 1).to(tl.float32)


@triton.jit
def _plane_offsets(row, cols, N1: tl.constexpr, N2: tl.constexpr):
    """Offsets of the real parts of an intermediate's ``(N1, BLOCK_C)`` tile of one row."""
    return ((row * N1 + tl.arange(0, N1)[:, None]) * N2 + cols[None, :]) * 2


@triton.jit
def _load_plane(p_ptr, offs, valid):
    re = tl.load(p_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    im = tl.load(p_ptr + offs + 1, mask=valid, other=0.0).to(tl.float32)
    return re, im


@triton.jit
def _store_plane(p_ptr, offs, re, im, valid):
    ty = p_ptr.dtype.element_ty
    tl.store(p_ptr + offs, re.to(ty), mask=valid)
    tl.store(p_ptr + offs + 1, im.to(ty), mask=valid)


@triton.jit
def _store_factor_grad(g_ptr, cols, acc_r, acc_i, N1: tl.constexpr):
    """Store an ``(N1, N1, BLOCK_C)`` accumulator ``[i, j, c]`` at ``g[c, i, j]`` (real pairs)."""
    offs = _factor_offsets(cols, N1)
    tl.store(g_ptr + offs, acc_r)
    tl.store(g_ptr + offs + 1, acc_i)


# ------------------------------------------------------------------------------------ K1 fwd --
@triton.jit
def _k1_fwd_kernel(
    u_ptr, in_ptr, z_ptr, rows, channels, seqlen, su_b, su_h, su_l,
    ROWS_PER_PROGRAM: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, t = _columns(N1, N2, BLOCK_C)  # t: [n1, c]
    ar, ai = _factor_tile(in_ptr, cols, N1)  # [k1, n1, c]
    for r in tl.range(0, ROWS_PER_PROGRAM):
        row = tl.program_id(1) * ROWS_PER_PROGRAM + r
        valid, b, h, in_seq = _row(row, rows, channels, t, seqlen)
        x = tl.load(u_ptr + b * su_b + h * su_h + t * su_l, mask=in_seq, other=0.0)
        x = x.to(tl.float32)[None, :, :]
        # x is real: z = A x needs two real products, not four.
        _store_plane(z_ptr, _plane_offsets(row, cols, N1, N2), tl.sum(ar * x, axis=1),
                     tl.sum(ai * x, axis=1), valid)


def k1_forward(u: torch.Tensor, in_factor: Optional[torch.Tensor], *, split: Optional[tuple[int, int]] = None,
               out_dtype: Optional[torch.dtype] = None, alloc: Callable[..., torch.Tensor] = torch.empty,
               tuning: Tuning = Tuning()) -> torch.Tensor:
    """Step 1: ``z (B, H, N1, N2, 2)`` in ``out_dtype`` (default :func:`intermediate_dtype` of u's
    dtype). ``in_factor=None``: the exact FFT factor of ``split`` (:func:`butterfly_steps.step1`)."""
    batch, channels, seqlen = u.shape
    n1, n2 = _split_of(in_factor, split)
    if in_factor is None:
        return butterfly_steps.step1(u, (n1, n2), out_dtype or intermediate_dtype(u.dtype), alloc=alloc,
                              **_exact_tiles(tuning))[0]
    block_c = _block_c(n1, n2, tuning)
    rows_per_program = tuning.rows_per_program or 4
    z = alloc((batch, channels, n1, n2, 2), dtype=out_dtype or intermediate_dtype(u.dtype), device=u.device)
    grid = (n2 // block_c, triton.cdiv(batch * channels, rows_per_program))
    launch(
        _k1_fwd_kernel, grid, u, _factor_arg(in_factor), z, batch * channels, channels, seqlen, *u.stride(),
        ROWS_PER_PROGRAM=rows_per_program, N1=n1, N2=n2, BLOCK_C=block_c, num_warps=tuning.num_warps or 4,
    )
    return z


# ------------------------------------------------------------------------------------ K3 fwd --
@triton.jit
def _step3_real(br, bi, w_ptr, offs, valid):
    """``Re(sum_k1 out[c, n1, k1] w[k1, c])`` as ``(N1, BLOCK_C)`` [n1, c], and w's (re, im)."""
    wr, wi = _load_plane(w_ptr, offs, valid)
    return tl.sum(br * wr[None, :, :] - bi * wi[None, :, :], axis=1), wr, wi


@triton.jit
def _k3_fwd_kernel(
    w_ptr, u_ptr, out_ptr, d_ptr, mask_ptr, y_ptr, rows, channels, seqlen,
    su_b, su_h, su_l, sm_b, sm_h,
    HAS_D: tl.constexpr, GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    ROWS_PER_PROGRAM: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    cols, t = _columns(N1, N2, BLOCK_C)  # t: [n1, c]
    br, bi = _factor_tile(out_ptr, cols, N1)  # [n1, k1, c]
    for r in tl.range(0, ROWS_PER_PROGRAM):
        row = tl.program_id(1) * ROWS_PER_PROGRAM + r
        valid, b, h, in_seq = _row(row, rows, channels, t, seqlen)
        c, unused_wr, unused_wi = _step3_real(br, bi, w_ptr, _plane_offsets(row, cols, N1, N2), valid)
        if HAS_D:
            x = tl.load(u_ptr + b * su_b + h * su_h + t * su_l, mask=in_seq, other=0.0).to(tl.float32)
            c += tl.load(d_ptr + h, mask=valid, other=0.0).to(tl.float32) * x
        if GELU:
            c = gelu(c)
        if HAS_MASK:
            c *= tl.load(mask_ptr + b * sm_b + h * sm_h, mask=valid, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * seqlen + t, c.to(y_ptr.dtype.element_ty), mask=in_seq)


def k3_forward(
    w: torch.Tensor, u: torch.Tensor, out_factor: Optional[torch.Tensor], D: Optional[torch.Tensor] = None,
    gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *, split: Optional[tuple[int, int]] = None,
    alloc: Callable[..., torch.Tensor] = torch.empty, tuning: Tuning = Tuning(),
) -> torch.Tensor:
    """Step 3 and the epilogue: ``y (B, H, L)`` in u's dtype, contiguous (``out_factor=None``: the
    exact inverse of ``split``, :func:`butterfly_steps.step3`)."""
    batch, channels, seqlen = u.shape
    n1, n2 = _split_of(out_factor, split)
    if out_factor is None:
        return butterfly_steps.step3(w, seqlen, u.dtype, scale=1.0 / n1, D=D, skip=u if D is not None else None,
                              gelu=gelu, dropout_mask=dropout_mask, alloc=alloc, **_exact_tiles(tuning))[0]
    block_c = _block_c(n1, n2, tuning)
    rows_per_program = tuning.rows_per_program or 4
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    grid = (n2 // block_c, triton.cdiv(batch * channels, rows_per_program))
    launch(
        _k3_fwd_kernel, grid, w, u, _factor_arg(out_factor), D, dropout_mask, y, batch * channels, channels,
        seqlen, *u.stride(), *strides(dropout_mask, 2),
        HAS_D=D is not None, GELU=gelu, HAS_MASK=dropout_mask is not None,
        ROWS_PER_PROGRAM=rows_per_program, N1=n1, N2=n2, BLOCK_C=block_c, num_warps=tuning.num_warps or 4,
    )
    return y


# ------------------------------------------------------------------------------------ K3 bwd --
@triton.jit
def _k3_bwd_kernel(
    dy_ptr, w_ptr, u_ptr, out_ptr, d_ptr, mask_ptr, dw_ptr, d_out_part_ptr, dd_part_ptr, dc_ptr,
    rows, rows_per_group, channels, seqlen, sdy_b, sdy_h, sdy_l, su_b, su_h, su_l, sm_b, sm_h,
    HAS_D: tl.constexpr, GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    block, group = tl.program_id(0), tl.program_id(1)
    cols, t = _columns(N1, N2, BLOCK_C)  # t: [n1, c]
    br, bi = _factor_tile(out_ptr, cols, N1)  # [n1, k1, c]
    acc_r = tl.zeros((N1, N1, BLOCK_C), dtype=tl.float32)
    acc_i = tl.zeros((N1, N1, BLOCK_C), dtype=tl.float32)
    for r in tl.range(0, rows_per_group):
        row = group * rows_per_group + r
        valid, b, h, in_seq = _row(row, rows, channels, t, seqlen)
        offs = _plane_offsets(row, cols, N1, N2)
        dc = tl.load(dy_ptr + b * sdy_b + h * sdy_h + t * sdy_l, mask=in_seq, other=0.0).to(tl.float32)
        if HAS_MASK:
            dc *= tl.load(mask_ptr + b * sm_b + h * sm_h, mask=valid, other=0.0).to(tl.float32)
        c, wr, wi = _step3_real(br, bi, w_ptr, offs, valid)
        if HAS_D:
            x = tl.load(u_ptr + b * su_b + h * su_h + t * su_l, mask=in_seq, other=0.0).to(tl.float32)
            d = tl.load(d_ptr + h, mask=valid, other=0.0).to(tl.float32)
            c += d * x
        if GELU:
            dc *= gelu_grad(c)
        if HAS_D:
            tl.store(dd_part_ptr + block * rows + row, tl.sum(tl.sum(dc * x, axis=1), axis=0), mask=valid)
            tl.store(dc_ptr + row * seqlen + t, dc, mask=in_seq)
        # dw = out^H dc (dc real): dw[k1, c] = sum_n1 conj(out[c, n1, k1]) dc[n1, c].
        dc3 = dc[:, None, :]
        _store_plane(dw_ptr, offs, tl.sum(br * dc3, axis=0), -tl.sum(bi * dc3, axis=0), valid)
        # d_out[c, n1, k1] += dc[n1, c] conj(w[k1, c]).
        acc_r += dc3 * wr[None, :, :]
        acc_i -= dc3 * wi[None, :, :]
    _store_factor_grad(d_out_part_ptr + group * N2 * N1 * N1 * 2, cols, acc_r, acc_i, N1)


class K3Grads(NamedTuple):
    dw: torch.Tensor  # (B, H, N1, N2, 2), intermediate dtype
    d_out_factor: Optional[torch.Tensor]  # (N2, N1, N1, 2) float32; None for the exact factor
    dD: Optional[torch.Tensor]  # (H,) float32
    # (B, H, L), for du's skip term D * dc * dc_mask[b, h] (only with D): float32 from the
    # learned kernels and with GELU; without GELU the exact path hands back grad_y itself and
    # the dropout mask (dc is never written).
    dc: Optional[torch.Tensor]
    dc_mask: Optional[torch.Tensor] = None


def _row_groups(rows: int, tuning: Tuning) -> tuple[int, int]:
    # One group by default: each group adds a factor-sized partial gradient.
    groups = min(rows, tuning.row_groups or 1)
    rows_per_group = triton.cdiv(rows, groups)
    return triton.cdiv(rows, rows_per_group), rows_per_group


def k3_backward(
    grad_y: torch.Tensor, w: torch.Tensor, u: torch.Tensor, out_factor: Optional[torch.Tensor],
    D: Optional[torch.Tensor] = None, gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    split: Optional[tuple[int, int]] = None, alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> K3Grads:
    """Backward of step 3 and the epilogue (recomputes c from w where GELU needs it). With
    ``out_factor=None`` (the exact inverse of ``split``) there is no factor gradient."""
    batch, channels, seqlen = u.shape
    rows = batch * channels
    n1, n2 = _split_of(out_factor, split)
    if out_factor is None:
        return _k3_backward_exact(grad_y, w, u, D, gelu, dropout_mask, (n1, n2), w.dtype, alloc, tuning)
    block_c = _block_c(n1, n2, tuning)
    blocks = n2 // block_c
    groups, rows_per_group = _row_groups(rows, tuning)
    dw = alloc(w.shape, dtype=w.dtype, device=u.device)
    d_out_part = alloc((groups, n2, n1, n1, 2), dtype=torch.float32, device=u.device)
    dd_part = alloc((blocks, rows), dtype=torch.float32, device=u.device) if D is not None else None
    dc = alloc(u.shape, dtype=torch.float32, device=u.device) if D is not None else None
    launch(
        _k3_bwd_kernel, (blocks, groups),
        grad_y, w, u, _factor_arg(out_factor), D, dropout_mask, dw, d_out_part, dd_part, dc,
        rows, rows_per_group, channels, seqlen, *grad_y.stride(), *u.stride(), *strides(dropout_mask, 2),
        HAS_D=D is not None, GELU=gelu, HAS_MASK=dropout_mask is not None,
        N1=n1, N2=n2, BLOCK_C=block_c, num_warps=tuning.num_warps or 4,
    )
    # Fixed-order sums over the row groups and over (column block, batch): deterministic.
    dD = dd_part.view(blocks, batch, channels).sum(dim=(0, 1)) if D is not None else None
    return K3Grads(dw, d_out_part.sum(0), dD, dc)


def _k3_backward_exact(grad_y, w, u, D, gelu, dropout_mask, split, dw_dtype, alloc, tuning) -> K3Grads:
    # dw = out^H dc = step1(dc) / N1. GELU needs c: step 3 recomputes it from w and writes dc
    # (and dD); without GELU dc = grad_y * mask is read by step 1 directly (dD on the side) and
    # w is not needed (may be None).
    n1, seqlen = split[0], u.shape[-1]
    tiles = _exact_tiles(tuning)
    if gelu:
        dc, dD = butterfly_steps.step3(w, seqlen, torch.float32, scale=1.0 / n1, D=D, skip=u if D is not None else None,
                                gelu=True, dropout_mask=dropout_mask, grad_y=grad_y, **tiles)
        dw, unused = butterfly_steps.step1(dc, split, dw_dtype, scale=1.0 / n1, alloc=alloc, **tiles)
        return K3Grads(dw, None, dD, dc)
    dw, dD = butterfly_steps.step1(grad_y, split, dw_dtype, scale=1.0 / n1, dropout_mask=dropout_mask,
                            dd_with=u if D is not None else None, alloc=alloc, **tiles)
    return K3Grads(dw, None, dD, grad_y, dropout_mask)


# ------------------------------------------------------------------------------------ K1 bwd --
@triton.jit
def _k1_bwd_kernel(
    dz_ptr, u_ptr, in_ptr, d_ptr, dc_ptr, du_ptr, d_in_part_ptr,
    rows, rows_per_group, channels, seqlen, su_b, su_h, su_l,
    HAS_D: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    group = tl.program_id(1)
    cols, t = _columns(N1, N2, BLOCK_C)  # t: [n1, c]
    ar, ai = _factor_tile(in_ptr, cols, N1)  # [k1, n1, c]
    acc_r = tl.zeros((N1, N1, BLOCK_C), dtype=tl.float32)
    acc_i = tl.zeros((N1, N1, BLOCK_C), dtype=tl.float32)
    for r in tl.range(0, rows_per_group):
        row = group * rows_per_group + r
        valid, b, h, in_seq = _row(row, rows, channels, t, seqlen)
        dzr, dzi = _load_plane(dz_ptr, _plane_offsets(row, cols, N1, N2), valid)
        dzr3, dzi3 = dzr[:, None, :], dzi[:, None, :]
        # dx = Re(in^H dz): dx[n1, c] = sum_k1 Re(conj(in[c, k1, n1]) dz[k1, c]).
        dx = tl.sum(ar * dzr3 + ai * dzi3, axis=0)
        if HAS_D:
            dc = tl.load(dc_ptr + row * seqlen + t, mask=in_seq, other=0.0)
            dx += tl.load(d_ptr + h, mask=valid, other=0.0).to(tl.float32) * dc
        tl.store(du_ptr + row * seqlen + t, dx.to(du_ptr.dtype.element_ty), mask=in_seq)
        # d_in[c, k1, n1] += dz[k1, c] x[n1, c] (x real).
        x = tl.load(u_ptr + b * su_b + h * su_h + t * su_l, mask=in_seq, other=0.0).to(tl.float32)
        acc_r += dzr3 * x[None, :, :]
        acc_i += dzi3 * x[None, :, :]
    _store_factor_grad(d_in_part_ptr + group * N2 * N1 * N1 * 2, cols, acc_r, acc_i, N1)


def k1_backward(
    dz: torch.Tensor, u: torch.Tensor, in_factor: Optional[torch.Tensor], D: Optional[torch.Tensor] = None,
    dc: Optional[torch.Tensor] = None, *, dc_mask: Optional[torch.Tensor] = None,
    split: Optional[tuple[int, int]] = None, alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Backward of step 1: ``(du in u's dtype (with D's skip term D * dc), d_in_factor float32)``;
    with ``in_factor=None`` (the exact factor of ``split``, :func:`butterfly_steps.step3`; there ``dc``
    may have any strides and ``dc_mask[b, h]`` scales it) no factor gradient (None)."""
    batch, channels, seqlen = u.shape
    rows = batch * channels
    n1, n2 = _split_of(in_factor, split)
    if in_factor is None:
        du, unused = butterfly_steps.step3(dz, seqlen, u.dtype, scale=1.0, D=D, skip=dc if D is not None else None,
                                    skip_mask=dc_mask if D is not None else None, alloc=alloc,
                                    **_exact_tiles(tuning))
        return du, None
    if dc_mask is not None:
        raise ValueError("flashbutterfly.k1_backward: dc_mask is for the exact factor only")
    block_c = _block_c(n1, n2, tuning)
    groups, rows_per_group = _row_groups(rows, tuning)
    du = alloc(u.shape, dtype=u.dtype, device=u.device)
    d_in_part = alloc((groups, n2, n1, n1, 2), dtype=torch.float32, device=u.device)
    launch(
        _k1_bwd_kernel, (n2 // block_c, groups),
        dz, u, _factor_arg(in_factor), D, dc, du, d_in_part, rows, rows_per_group, channels, seqlen,
        *u.stride(), HAS_D=D is not None, N1=n1, N2=n2, BLOCK_C=block_c, num_warps=tuning.num_warps or 4,
    )
    return du, d_in_part.sum(0)


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


# ------------------------------------------------------------------------------- three steps --
def butterfly_conv_fwd(
    u: torch.Tensor, k: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor,
    D: Optional[torch.Tensor] = None, gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    rows_conv: Optional[RowsConv] = None, alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> torch.Tensor:
    """K1, K2 (``rows_conv``, default :class:`TritonRowsConv`), K3: ``lcconv::butterfly_conv``."""
    rows_conv = rows_conv or TritonRowsConv(tuning)
    z = k1_forward(u, in_factor, alloc=alloc, tuning=tuning)
    w = rows_conv.forward(z, k, out=z)
    return k3_forward(w, u, out_factor, D, gelu, dropout_mask, alloc=alloc, tuning=tuning)


def butterfly_conv_bwd(
    grad_y: torch.Tensor, u: torch.Tensor, k: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor,
    D: Optional[torch.Tensor] = None, gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    rows_conv: Optional[RowsConv] = None, alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> reference.ButterflyConvGrads:
    """Recompute z and w (K1, K2), then K3-bwd, K2-bwd, K1-bwd: the op's five gradients."""
    rows_conv = rows_conv or TritonRowsConv(tuning)
    z = k1_forward(u, in_factor, alloc=alloc, tuning=tuning)
    w = rows_conv.forward(z, k)
    k3 = k3_backward(grad_y, w, u, out_factor, D, gelu, dropout_mask, alloc=alloc, tuning=tuning)
    del w
    dz, dk = rows_conv.backward(k3.dw, z, k, out=k3.dw)
    del z
    du, d_in = k1_backward(dz, u, in_factor, D, k3.dc, alloc=alloc, tuning=tuning)
    return reference.ButterflyConvGrads(
        du, dk.to(k.dtype), d_in.to(in_factor.dtype), k3.d_out_factor.to(out_factor.dtype),
        k3.dD.to(D.dtype) if D is not None else None,
    )


# ------------------------------------------------------------- the fftconv family (fixed FFT) --
def split_for(seqlen: int, kernel_len: int, dtype: torch.dtype) -> tuple[int, int]:
    """(N1, N2) of ``fftconv`` at these lengths: ``reference.butterfly_split(fft_size(L, Lk))``,
    with N2 capped at K2_MAX_N2[dtype] (the factors are internal here, so the split is free)."""
    n1, n2 = reference.butterfly_split(reference.fft_size(seqlen, kernel_len))
    cap = K2_MAX_N2.get(dtype, n2)
    return (n1 * (n2 // cap), cap) if n2 > cap else (n1, n2)


def split_compiles(dtype: torch.dtype, n1: int, n2: int, learned: bool = False) -> bool:
    """Whether the kernels run this split on a GPU: a step-2 plan for N2 (K2_FACTORS, at most
    K2_MAX_N2[dtype]) and, for learned factors, N1 <= MAX_N1 (their steps 1 and 3 hold
    BLOCK_C * N1^2 factor values in registers; the exact factor's steps (:mod:`butterfly_steps`) take
    any N1)."""
    return (dtype in KERNEL_DTYPES and n2 in K2_FACTORS and n2 <= K2_MAX_N2[dtype]
            and (n1 <= MAX_N1 or not learned))


def _covered_split(dtype: torch.dtype, seqlen: int, kernel_len: int) -> Optional[tuple[int, int]]:
    """The split of :func:`split_for` where the kernels cover these lengths, else None."""
    if dtype not in KERNEL_DTYPES or not 1 <= kernel_len <= seqlen <= MAX_SEQLEN:
        return None
    split = split_for(seqlen, kernel_len, dtype)
    return split if split_compiles(dtype, *split) else None


def covers(dtype: torch.dtype, seqlen: int, kernel_len: int) -> bool:
    """Whether the kernels compute ``fftconv`` for this dtype and these lengths on a GPU."""
    return _covered_split(dtype, seqlen, kernel_len) is not None


def supports(u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the op dispatches ``fftconv(u, k, ...)`` here: CUDA tensors, :func:`covers`, a half
    dtype (:data:`DISPATCH_DTYPES`), a split with N1 <= :data:`DISPATCH_MAX_N1` (where the
    kernels were measured faster than the torch.fft reference) and an intermediate that 32-bit
    offsets can index (``common.offsets_fit_int32``). Listed after blockfft_conv in
    kernels.FAMILIES, which takes every length it covers."""
    if not (u.is_cuda and u.dim() == 3 and u.dtype in DISPATCH_DTYPES and k.dtype in KERNEL_DTYPES):
        return False
    split = _covered_split(u.dtype, u.shape[-1], k.shape[-1])
    return split is not None and split[0] <= DISPATCH_MAX_N1 and _intermediate_fits(u, *split)


def _intermediate_fits(u: torch.Tensor, n1: int, n2: int) -> bool:
    # z, the largest tensor the kernels index: (B, H, N1, N2, 2) real numbers.
    return offsets_fit_int32(u.shape[0] * u.shape[1] * n1 * n2 * 2)


def supports_learned(u: torch.Tensor, k: torch.Tensor, in_factor: torch.Tensor) -> bool:
    """Whether these kernels run ``lcconv::butterfly_conv`` for validated inputs: CUDA, a kernel
    dtype, a split (the factors') that :func:`split_compiles` and an intermediate that 32-bit
    offsets can index."""
    n1, n2 = _split_of(in_factor, None)
    return (u.is_cuda and k.dtype in KERNEL_DTYPES and in_factor.dtype in KERNEL_DTYPES
            and split_compiles(u.dtype, n1, n2, learned=True) and _intermediate_fits(u, n1, n2))


def _gated(u: torch.Tensor, gate_in: Optional[torch.Tensor]) -> torch.Tensor:
    # The input gate is one torch multiply (float32) ahead of K1, not fused: see the docstring.
    return u if gate_in is None else u.float() * gate_in.float()


def fftconv_fwd(
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    gate_in: Optional[torch.Tensor] = None,
    gate_out: Optional[torch.Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
    alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> torch.Tensor:
    """``y = fftconv(u, k, ...)`` by K1 (exact factor), K2 (w written over z), K3 + epilogue:
    three launches and one for k's step-1 rows. Inputs assumed valid (the op validates them)."""
    split = tuning.split or split_for(u.shape[-1], k.shape[-1], u.dtype)
    x = _gated(u, gate_in)
    z = k1_forward(x, None, split=split, out_dtype=intermediate_dtype(u.dtype), tuning=tuning)
    w = TritonRowsConv(tuning).forward(z, k, out=z)
    if gate_in is None and gate_out is None:
        return k3_forward(w, u, None, D, gelu, dropout_mask, split=split, alloc=alloc, tuning=tuning)
    y = k3_forward(w, x, None, D, gelu, dropout_mask, split=split, tuning=tuning)
    if gate_out is not None:
        y = y.float() * gate_out.float()
    return y.to(u.dtype)


def fftconv_bwd(
    grad_y: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    gate_in: Optional[torch.Tensor] = None,
    gate_out: Optional[torch.Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
    alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(du, dk, dD, dgate_in, dgate_out), None for absent inputs: K1 recomputed (and K2 where GELU or
    gate_out needs the activation), then
    K3-bwd, K2-bwd (dz over dw; dk summed per kernel row in a fixed order), K1-bwd. dk and dD are
    bit-identical across runs (no atomics)."""
    split = tuning.split or split_for(u.shape[-1], k.shape[-1], u.dtype)
    rows_conv = TritonRowsConv(tuning)
    x = _gated(u, gate_in)
    z = k1_forward(x, None, split=split, out_dtype=intermediate_dtype(u.dtype), tuning=tuning)
    # w (step 2's output) is needed only to recompute the activation: for GELU' and gate_out's
    # gradient. Without both, the backward skips step 2's forward (a third of its time).
    w = rows_conv.forward(z, k) if gelu or gate_out is not None else None
    dgate_out = None
    dc = grad_y
    if gate_out is not None:
        act = k3_forward(w, x, None, D, gelu, dropout_mask, split=split, tuning=tuning)
        dgate_out = (grad_y.float() * act.float()).to(gate_out.dtype)
        dc = grad_y.float() * gate_out.float()
        del act
    k3 = _k3_backward_exact(dc, w, x, D, gelu, dropout_mask, split, z.dtype, torch.empty, tuning)
    del w
    dz, dk = rows_conv.backward(k3.dw, z, k, out=k3.dw)
    del z
    plain = gate_in is None
    dx, unused = k1_backward(dz, x, None, D, k3.dc, dc_mask=k3.dc_mask, split=split,
                             alloc=alloc if plain else torch.empty, tuning=tuning)
    dgate_in = None
    du = dx
    if not plain:
        dgate_in = (dx * u.float()).to(gate_in.dtype)
        du = (dx * gate_in.float()).to(u.dtype)
    dD = k3.dD.to(D.dtype) if D is not None else None
    return du, dk.to(k.dtype), dD, dgate_in, dgate_out
