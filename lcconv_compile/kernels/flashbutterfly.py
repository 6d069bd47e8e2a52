"""FlashButterfly (work in progress): the Triton kernels of steps 1 and 3 of the three-step long
convolution with trainable factors, their backward kernels, and the interface of step 2.

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

Backward (``dX = F^H dZ``, ``dF = sum over rows of dZ X^H`` for each step): K3-bwd gives dw, the
out_factor gradient, dD, and dc (for du's skip term); K2-bwd gives dz and dk; K1-bwd gives du and
the in_factor gradient. The factor gradients are accumulated in registers by one program per
(column block, row group), looping over its rows in a fixed order; the launcher sums the row
groups in a fixed order: bit-identical results for identical inputs, no atomics.

Status, and what this module must not do yet:
* K1/K3 contract over N1 with broadcast multiply-adds on CUDA cores, not ``tl.dot``: correct
  (interpreter-tested at N1 = 4, N2 = 16 against the reference), not tuned. Register use grows as
  ``BLOCK_C * N1^2``: N1 = 256 (L = 1M) needs the factor tiles streamed through tl.dot.
* K2 will be the on-chip v5 kernel (kernels/blockfft3.py, flashconv3.py) taking complex rows.
  Until then :class:`TorchFFTRowsConvNotFinal` implements :class:`RowsConv` with torch.fft, for
  tests and docs only. This family is NOT in ``kernels.FAMILIES`` and the op
  ``lcconv::butterfly_conv`` does not call it: the op runs the reference on every device.
* The float16 intermediates are not scaled: inputs of magnitude above ~65504 / N1 overflow.

Knows torch, Triton and reference.py only (no torch.library, no Inductor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Protocol

import torch
import triton
import triton.language as tl

from .. import reference
from .common import gelu, gelu_grad, strides

__all__ = [
    "Tuning",
    "RowsConv",
    "TorchFFTRowsConvNotFinal",
    "intermediate_dtype",
    "k1_forward",
    "k3_forward",
    "k3_backward",
    "k1_backward",
    "butterfly_conv_fwd",
    "butterfly_conv_bwd",
]

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


def _block_c(n1: int, n2: int, tuning: Tuning) -> int:
    # The factor tile of a program holds BLOCK_C * N1^2 complex values in registers.
    return tuning.block_c or min(n2, max(1, triton.next_power_of_2(4096 // (n1 * n1) + 1) // 2))


def _split_of(factor: torch.Tensor) -> tuple[int, int]:
    return factor.shape[1], factor.shape[0]  # (N1, N2) of a (N2, N1, N1, 2) factor


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


def k1_forward(u: torch.Tensor, in_factor: torch.Tensor, *, alloc: Callable[..., torch.Tensor] = torch.empty,
               tuning: Tuning = Tuning()) -> torch.Tensor:
    """Step 1: ``z (B, H, N1, N2, 2)`` in :func:`intermediate_dtype` of u's dtype."""
    batch, channels, seqlen = u.shape
    n1, n2 = _split_of(in_factor)
    block_c = _block_c(n1, n2, tuning)
    rows_per_program = tuning.rows_per_program or 4
    z = alloc((batch, channels, n1, n2, 2), dtype=intermediate_dtype(u.dtype), device=u.device)
    grid = (n2 // block_c, triton.cdiv(batch * channels, rows_per_program))
    _k1_fwd_kernel[grid](
        u, in_factor.contiguous(), z, batch * channels, channels, seqlen, *u.stride(),
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
    w: torch.Tensor, u: torch.Tensor, out_factor: torch.Tensor, D: Optional[torch.Tensor] = None,
    gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    alloc: Callable[..., torch.Tensor] = torch.empty, tuning: Tuning = Tuning(),
) -> torch.Tensor:
    """Step 3 and the epilogue: ``y (B, H, L)`` in u's dtype, contiguous."""
    batch, channels, seqlen = u.shape
    n1, n2 = _split_of(out_factor)
    block_c = _block_c(n1, n2, tuning)
    rows_per_program = tuning.rows_per_program or 4
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    grid = (n2 // block_c, triton.cdiv(batch * channels, rows_per_program))
    _k3_fwd_kernel[grid](
        w, u, out_factor.contiguous(), D, dropout_mask, y, batch * channels, channels, seqlen,
        *u.stride(), *strides(dropout_mask, 2),
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
    d_out_factor: torch.Tensor  # (N2, N1, N1, 2) float32
    dD: Optional[torch.Tensor]  # (H,) float32
    dc: Optional[torch.Tensor]  # (B, H, L) float32, for du's skip term (only with D)


def _row_groups(rows: int, tuning: Tuning) -> tuple[int, int]:
    groups = min(rows, tuning.row_groups or 1)
    rows_per_group = triton.cdiv(rows, groups)
    return triton.cdiv(rows, rows_per_group), rows_per_group


def k3_backward(
    grad_y: torch.Tensor, w: torch.Tensor, u: torch.Tensor, out_factor: torch.Tensor,
    D: Optional[torch.Tensor] = None, gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    alloc: Callable[..., torch.Tensor] = torch.empty, tuning: Tuning = Tuning(),
) -> K3Grads:
    """Backward of step 3 and the epilogue (recomputes c from w where GELU needs it)."""
    batch, channels, seqlen = u.shape
    rows = batch * channels
    n1, n2 = _split_of(out_factor)
    block_c = _block_c(n1, n2, tuning)
    blocks = n2 // block_c
    groups, rows_per_group = _row_groups(rows, tuning)
    dw = alloc(w.shape, dtype=w.dtype, device=u.device)
    d_out_part = alloc((groups, n2, n1, n1, 2), dtype=torch.float32, device=u.device)
    dd_part = alloc((blocks, rows), dtype=torch.float32, device=u.device) if D is not None else None
    dc = alloc(u.shape, dtype=torch.float32, device=u.device) if D is not None else None
    _k3_bwd_kernel[(blocks, groups)](
        grad_y, w, u, out_factor.contiguous(), D, dropout_mask, dw, d_out_part, dd_part, dc,
        rows, rows_per_group, channels, seqlen, *grad_y.stride(), *u.stride(), *strides(dropout_mask, 2),
        HAS_D=D is not None, GELU=gelu, HAS_MASK=dropout_mask is not None,
        N1=n1, N2=n2, BLOCK_C=block_c, num_warps=tuning.num_warps or 4,
    )
    # Fixed-order sums over the row groups and over (column block, batch): deterministic.
    dD = dd_part.view(blocks, batch, channels).sum(dim=(0, 1)) if D is not None else None
    return K3Grads(dw, d_out_part.sum(0), dD, dc)


# ------------------------------------------------------------------------------------ K1 bwd --
@triton.jit
def _k1_bwd_kernel(
    dz_ptr, u_ptr, in_ptr, d_ptr, dc_ptr, du_ptr, d_in_part_ptr,
    rows, rows_per_group, channels, seqlen, su_b, su_h, su_l,
    HAS_D: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, BLOCK_C: tl.constexpr,
):
    block, group = tl.program_id(0), tl.program_id(1)
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
    dz: torch.Tensor, u: torch.Tensor, in_factor: torch.Tensor, D: Optional[torch.Tensor] = None,
    dc: Optional[torch.Tensor] = None, *, alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of step 1: ``(du in u's dtype (with D's skip term D * dc), d_in_factor float32)``."""
    batch, channels, seqlen = u.shape
    rows = batch * channels
    n1, n2 = _split_of(in_factor)
    block_c = _block_c(n1, n2, tuning)
    groups, rows_per_group = _row_groups(rows, tuning)
    du = alloc(u.shape, dtype=u.dtype, device=u.device)
    d_in_part = alloc((groups, n2, n1, n1, 2), dtype=torch.float32, device=u.device)
    _k1_bwd_kernel[(n2 // block_c, groups)](
        dz, u, in_factor.contiguous(), D, dc, du, d_in_part, rows, rows_per_group, channels, seqlen,
        *u.stride(), HAS_D=D is not None, N1=n1, N2=n2, BLOCK_C=block_c, num_warps=tuning.num_warps or 4,
    )
    return du, d_in_part.sum(0)


# ------------------------------------------------------------------------------------ K2 ------
class RowsConv(Protocol):
    """Step 2's interface: N1 circular convolutions of length N2 of complex rows with the rows of
    ``fft_N(k)`` (``K[h, k1, k2] = fft_N(k[h])[k1 + N1*k2]``; k's spectrum is the kernel's job).

    ``forward(z, k) -> w`` and ``backward(dw, z, k) -> (dz, dk)``; z, w, dz, dw are
    ``(B, H, N1, N2, 2)`` real pairs in the intermediate dtype, ``k (H, Lk)``, dk float32.
    """

    def forward(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor: ...

    def backward(self, dw: torch.Tensor, z: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class TorchFFTRowsConvNotFinal:
    """:class:`RowsConv` with torch.fft (float32): NOT the final kernel. For tests and docs only,
    until the on-chip v5 kernel takes its place; never used by the op."""

    @staticmethod
    def _rows(z: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n1, n2 = z.shape[2], z.shape[3]
        return torch.view_as_complex(z.float()), reference.butterfly_kernel_rows(k, n1, n2, torch.float32)

    def forward(self, z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        z_c, kernel_rows = self._rows(z, k)
        return torch.view_as_real(reference.butterfly_step2(z_c, kernel_rows)).to(z.dtype)

    def backward(self, dw: torch.Tensor, z: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z_c, kernel_rows = self._rows(z, k)
        dw_c = torch.view_as_complex(dw.float())
        dz, dk = reference.butterfly_step2_bwd(dw_c, torch.fft.fft(z_c, dim=-1), kernel_rows, k.shape[-1])
        return torch.view_as_real(dz).to(z.dtype), dk


# ------------------------------------------------------------------------------- three steps --
def butterfly_conv_fwd(
    u: torch.Tensor, k: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor,
    D: Optional[torch.Tensor] = None, gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    rows_conv: RowsConv, alloc: Callable[..., torch.Tensor] = torch.empty, tuning: Tuning = Tuning(),
) -> torch.Tensor:
    """K1, K2 (``rows_conv``: no default, so nothing runs torch.fft by accident), K3."""
    z = k1_forward(u, in_factor, alloc=alloc, tuning=tuning)
    w = rows_conv.forward(z, k)
    return k3_forward(w, u, out_factor, D, gelu, dropout_mask, alloc=alloc, tuning=tuning)


def butterfly_conv_bwd(
    grad_y: torch.Tensor, u: torch.Tensor, k: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor,
    D: Optional[torch.Tensor] = None, gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    rows_conv: RowsConv, alloc: Callable[..., torch.Tensor] = torch.empty, tuning: Tuning = Tuning(),
) -> reference.ButterflyConvGrads:
    """Recompute z and w (K1, K2), then K3-bwd, K2-bwd, K1-bwd: the op's five gradients."""
    z = k1_forward(u, in_factor, alloc=alloc, tuning=tuning)
    w = rows_conv.forward(z, k)
    k3 = k3_backward(grad_y, w, u, out_factor, D, gelu, dropout_mask, alloc=alloc, tuning=tuning)
    dz, dk = rows_conv.backward(k3.dw, z, k)
    du, d_in = k1_backward(dz, u, in_factor, D, k3.dc, alloc=alloc, tuning=tuning)
    return reference.ButterflyConvGrads(
        du, dk.to(k.dtype), d_in.to(in_factor.dtype), k3.d_out_factor.to(out_factor.dtype),
        k3.dD.to(D.dtype) if D is not None else None,
    )
