"""FlashButterfly's steps 1 and 3 (K1 = step 1, K3 = step 3 + the op's epilogue) with learned or
exact-FFT factors, forward and backward, and the family's shared launch parameters (:class:`Tuning`).

Conventions: :mod:`.flashbutterfly` (the family's entry points and module docstring). With a
factor tensor (learned, ``(N2, N1, N1, 2)``) K1/K3 run broadcast multiply-adds on CUDA cores with
the factor tile (BLOCK_C * N1^2 complex) in registers (:data:`MAX_N1`); with ``factor=None`` (the
exact FFT) they delegate to :mod:`.butterfly_steps`' tensor-core products. Factor gradients are
accumulated by one program per (column block, row group) in a fixed order; the launchers sum the
groups in a fixed order (bit-identical, no atomics).

Knows torch, Triton and reference.py only; picks no split and dispatches nothing (that is
:mod:`.flashbutterfly`'s job).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import butterfly_steps
from .common import gelu, gelu_grad, strides
from .launch import launch

__all__ = ["KERNEL_DTYPES", "MAX_N1", "Tuning", "intermediate_dtype", "split_of", "k1_forward", "k3_forward",
           "k3_backward", "k3_backward_exact", "k1_backward", "K3Grads"]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Steps 1 and 3 run on CUDA cores with the factor tile (BLOCK_C * N1^2 complex) in registers:
# N1 = 64 compiles for sm_90 at 178-255 registers (96 spilled bytes in K3's backward), N1 = 256
# cannot (scripts/compile_check.py --butterfly; flashbutterfly's docstring).
MAX_N1 = 64


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


def split_of(factor: Optional[torch.Tensor], split: Optional[tuple[int, int]]) -> tuple[int, int]:
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
    n1, n2 = split_of(in_factor, split)
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
    n1, n2 = split_of(out_factor, split)
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
    n1, n2 = split_of(out_factor, split)
    if out_factor is None:
        return k3_backward_exact(grad_y, w, u, D, gelu, dropout_mask, (n1, n2), w.dtype, alloc, tuning)
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


def k3_backward_exact(grad_y, w, u, D, gelu, dropout_mask, split, dw_dtype, alloc, tuning) -> K3Grads:
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
    n1, n2 = split_of(in_factor, split)
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
