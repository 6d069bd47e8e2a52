"""Steps 1 and 3 of FlashButterfly with the exact FFT factor, as tensor-core products.

With the FFT's own factors (``reference.butterfly_exact_factors``) step 1 of a row is a DFT of
size N1 down every column followed by a twiddle, and step 3 the conjugate pair:

    step 1   z[k1, c] = scale * w_N^(k1 c) * sum_n1 w_N1^(k1 n1) x[n1, c]          (x real)
    step 3   y[n1, c] = scale * Re(sum_k1 conj(w_N1^(k1 n1)) conj(w_N^(k1 c)) z[k1, c])

with ``x[n1, c] = x[n1 * N2 + c]`` (zero past the sequence), ``w_M = exp(-2 pi i / M)`` and z
``(rows, N1, N2, 2)`` (complex as interleaved real pairs). The DFT matrix is the same for every
column, so each is a product ``(BLOCK_M x BLOCK_K) @ (BLOCK_K x BLOCK_N)`` on tensor cores
(``tl.dot``) with the twiddle applied elementwise: one program per (column block, output-row
block, row group), looping over N1 in BLOCK_K chunks, so any N1 (16 at L = 64K, 256 at 1M,
1024 at 4M) runs with the same registers. DFT entries and twiddles are computed in registers
(``blockfft.twiddle``: exact exponent reduction, no tables). From N1 = 256 to 1024
(:func:`two_level`) the steps run the DFT as 16 x N1/16 inside the program instead (section
"two-level DFT" below): measured 1.3-1.7x the traffic floor at 1M on the H100, where the chunked
kernels took 5-9x.

The same two kernels serve the whole exact path (forward and backward):

* K1 forward (u -> z) and the kernel rows kz: :func:`step1` with scale 1;
* K3's backward ``dw = out^H dc = step1(dc) / N1``: :func:`step1` with scale 1 / N1 (and, when
  the output has no GELU, ``dc = dy * mask`` read directly, dD's partial sums on the side);
* K3 forward (z -> y, epilogue D u, GELU, dropout mask): :func:`step3` with scale 1 / N1;
* with GELU, K3's backward first recomputes c by :func:`step3` in its ``grad`` mode, which
  writes ``dc = dy * mask * gelu'(c)`` (float32) and dD's partial sums;
* K1's backward ``du = Re(in^H dz) + D * dc``: :func:`step3` with scale 1.

Operands: float16 for float16 intermediates (half inputs; the intermediate itself is float16,
so no new range limit), 3xtf32 for float32 ones on a GPU (plain float32 in the interpreter).
sm_90's ``tl.dot`` needs every dimension >= 16: N1 < 16 is padded (masked) to 16.

Knows torch, Triton and the kernels' shared helpers only (no torch.library, no Inductor); the
learned factors (one matrix per column) are flashbutterfly's CUDA-core kernels, not these.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .blockfft import mma, twiddle
from .common import gelu, gelu_grad, operand, strides
from .launch import launch

__all__ = ["Blocks", "blocks_for", "precision_for", "step1", "step3"]

MIN_DOT = 16  # sm_90's smallest tl.dot dimension
SPLIT_P = 16  # two-level splits: N1 = SPLIT_P * Q (Q >= 16)


class Blocks(NamedTuple):
    """The tiles of one launch."""

    block_m: int  # output rows (k1 or n1) per program
    block_n: int  # columns per program
    block_k: int  # N1 chunk contracted per product
    rows_per_program: int
    num_warps: int


def two_level(n1: int, n2: int) -> bool:
    """Whether a split runs the two-level kernels: N1 = SPLIT_P * Q with 16 <= Q <= 64 (both
    products have sides >= 16, sm_90's smallest; from Q = 128 the 3xtf32 tile needs more than
    227 KB of shared memory) and at least 4 columns. Other splits run the chunked kernels."""
    return SPLIT_P * MIN_DOT <= n1 <= SPLIT_P * 64 and n2 >= 4


def blocks_for(n1: int, n2: int, precision: str, block_n: Optional[int] = None,
               rows_per_program: Optional[int] = None, num_warps: Optional[int] = None) -> Blocks:
    """Tiles for a split: BLOCK_M = BLOCK_K = N1 up to 64 (padded to 16), 128 columns while
    N1 <= 32, beyond that 64 (32 for float32 operands, split in three for 3xtf32); 8 warps from
    BLOCK_M = 64 on. Two float32 accumulators, the twiddle tile and the DFT block stay in
    registers: larger tiles spill (scripts/compile_check.py --butterfly).

    Two-level splits (:func:`two_level`) take all N1 rows per program (BLOCK_M = N1, BLOCK_K =
    SPLIT_P) and 4096 / N1 columns (2048 / N1 for float32 operands), at least 4, with 8 warps:
    for float16 operands 62-237 registers and no spills at N1 = 256..1024; 16 warps or more
    columns spill at N1 = 1024 (compile_check, sm_90). 3xtf32 spills 0.4-1.7 KB from N1 = 512."""
    if two_level(n1, n2):
        block_n = min(n2, block_n or max(4, (4096 if precision == "fp16" else 2048) // n1))
        return Blocks(n1, block_n, SPLIT_P, rows_per_program or 4, num_warps or 8)
    block_mk = max(MIN_DOT, min(64, triton.next_power_of_2(n1)))
    block_n = min(n2, block_n or (128 if n1 <= 32 else 64 if precision == "fp16" else 32))
    warps = num_warps or (8 if block_mk >= 64 else 4)
    return Blocks(block_mk, block_n, block_mk, rows_per_program or 4, warps)


def precision_for(intermediate: torch.dtype, on_gpu: bool) -> str:
    """float16 operands for float16 intermediates, 3xtf32 for float32 ones (the interpreter has
    no tf32: plain float32 there)."""
    if intermediate == torch.float16:
        return "fp16"
    return "tf32x3" if on_gpu else "ieee"


@triton.jit
def _dft_block(out_idx, in_idx, N1: tl.constexpr, CONJ: tl.constexpr, FAST_TRIG: tl.constexpr,
               PRECISION: tl.constexpr):
    """``w_N1^(o i)`` (or its conjugate) for o in out_idx (rows), i in in_idx (columns), zero
    outside N1 x N1: the (re, im) operands of one product."""
    re, im = twiddle(out_idx[:, None], in_idx[None, :], N1, FAST_TRIG)
    inside = (out_idx[:, None] < N1) & (in_idx[None, :] < N1)
    re = tl.where(inside, re, 0.0)
    im = tl.where(inside, im, 0.0)
    if CONJ:
        im = -im
    return operand(re, PRECISION), operand(im, PRECISION)


@triton.jit
def _z_offsets(row, k1, col0, N1: tl.constexpr, N2: tl.constexpr, BLOCK_N: tl.constexpr):
    """Offsets of a (len(k1), 2 * BLOCK_N) tile [k1, (c, re/im)] of row ``row`` of z, columns
    from col0: each row of the tile is contiguous, so loads and stores are 16-byte vectors (a
    (k1, c, 2) tile compiles to 4-byte accesses: step 1 wrote at 0.7 TB/s on the H100)."""
    return ((row * N1 + k1[:, None]) * N2 + col0) * 2 + tl.arange(0, 2 * BLOCK_N)[None, :]


@triton.jit
def _load_z(z_ptr, row, k1, col0, valid, N1: tl.constexpr, N2: tl.constexpr, BLOCK_N: tl.constexpr):
    """A (len(k1), 2 * BLOCK_N) interleaved tile of z (zero outside N1 and past the rows)."""
    return tl.load(z_ptr + _z_offsets(row, k1, col0, N1, N2, BLOCK_N), mask=(valid & (k1 < N1))[:, None], other=0.0)


@triton.jit
def _program(N1: tl.constexpr, N2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(row block, column block, row group) of this program. One grid axis (no 65535 limit on
    B * H), the row block fastest: the programs that share a tile of x or z run side by side,
    so it is read from HBM once and from L2 by the others."""
    M_BLOCKS: tl.constexpr = (N1 + BLOCK_M - 1) // BLOCK_M
    N_BLOCKS: tl.constexpr = N2 // BLOCK_N
    pid = tl.program_id(0)
    return pid % M_BLOCKS, (pid // M_BLOCKS) % N_BLOCKS, pid // (M_BLOCKS * N_BLOCKS)


def _grid(n1: int, n2: int, rows: int, tiles: Blocks) -> tuple[int]:
    return (triton.cdiv(n1, tiles.block_m) * (n2 // tiles.block_n) * triton.cdiv(rows, tiles.rows_per_program),)


def _launch_step(kernels: tuple, n1: int, n2: int, rows: int, tiles: Blocks, args: tuple, flags: dict) -> None:
    """One step's launch: ``kernels = (two-level kernel, chunked kernel)``, by :func:`two_level`."""
    two_level_kernel, chunked_kernel = kernels
    if two_level(n1, n2):
        launch(two_level_kernel, _grid(n1, n2, rows, tiles), *args,
               P=SPLIT_P, Q=n1 // SPLIT_P, N2=n2, BLOCK_N=tiles.block_n, **flags)
    else:
        launch(chunked_kernel, _grid(n1, n2, rows, tiles), *args, N1=n1, N2=n2, BLOCK_M=tiles.block_m,
               BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, **flags)


# --------------------------------------------------------------------------------- step 1 --
@triton.jit
def _rows_and_chunk(it, row0, rows, channels, ROWS_PER_PROGRAM: tl.constexpr, NK: tl.constexpr):
    """(row, valid, b, h, chunk) of iteration ``it`` of a program's (row, N1 chunk) loop; past
    the last iteration the row is invalid (the prefetch of the iteration after the last)."""
    row = row0 + it // NK
    valid = (row < rows) & (it < ROWS_PER_PROGRAM * NK)
    return row, valid, row // channels, row % channels, it % NK


@triton.jit
def _x_chunk_offsets(ki, cols, valid, seqlen, N1: tl.constexpr, N2: tl.constexpr, BLOCK_K: tl.constexpr):
    """Times ``t[n1, c]`` of chunk ``ki`` of a row of x and the in-sequence mask."""
    n1 = ki * BLOCK_K + tl.arange(0, BLOCK_K)
    t = n1[:, None] * N2 + cols[None, :]
    return t, valid & (n1[:, None] < N1) & (t < seqlen)


@triton.jit
def _step1_kernel(
    x_ptr, mask_ptr, u_ptr, z_ptr, dd_ptr, rows, channels, seqlen, scale,
    sx_b, sx_h, sx_l, sm_b, sm_h, su_b, su_h, su_l,
    HAS_MASK: tl.constexpr, HAS_DD: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as float64: keep float32 math
    pid_m, pid_n, pid_r = _program(N1, N2, BLOCK_M, BLOCK_N)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k1 = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    NK: tl.constexpr = (N1 + BLOCK_K - 1) // BLOCK_K
    if NK == 1:  # the whole DFT block fits: made once, not per row
        fr0, fi0 = _dft_block(k1, tl.arange(0, BLOCK_K), N1, False, FAST_TRIG, PRECISION)
    twr, twi = twiddle(k1[:, None], cols[None, :], N1 * N2, FAST_TRIG)
    twr *= scale
    twi *= scale
    # One loop over (row, N1 chunk), each iteration's x tile loaded one iteration ahead (in
    # registers), so a load is always in flight while the previous tile is multiplied.
    row0 = pid_r * ROWS_PER_PROGRAM
    row, valid, b, h, ki = _rows_and_chunk(0, row0, rows, channels, ROWS_PER_PROGRAM, NK)
    t, inside = _x_chunk_offsets(ki, cols, valid, seqlen, N1, N2, BLOCK_K)
    nxt = tl.load(x_ptr + b * sx_b + h * sx_h + t * sx_l, mask=inside, other=0.0)
    acc_r = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_i = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    dd = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for it in tl.range(0, ROWS_PER_PROGRAM * NK):
        x = nxt.to(tl.float32)
        row_n, valid_n, b_n, h_n, ki_n = _rows_and_chunk(it + 1, row0, rows, channels, ROWS_PER_PROGRAM, NK)
        t_n, inside_n = _x_chunk_offsets(ki_n, cols, valid_n, seqlen, N1, N2, BLOCK_K)
        nxt = tl.load(x_ptr + b_n * sx_b + h_n * sx_h + t_n * sx_l, mask=inside_n, other=0.0)
        row, valid, b, h, ki = _rows_and_chunk(it, row0, rows, channels, ROWS_PER_PROGRAM, NK)
        if HAS_MASK:
            x *= tl.load(mask_ptr + b * sm_b + h * sm_h, mask=valid, other=0.0).to(tl.float32)
        if HAS_DD:  # dD's partial sum of this column block: the first row block only
            t, inside = _x_chunk_offsets(ki, cols, valid & (pid_m == 0), seqlen, N1, N2, BLOCK_K)
            xu = tl.load(u_ptr + b * su_b + h * su_h + t * su_l, mask=inside, other=0.0).to(tl.float32)
            dd = tl.where(ki == 0, 0.0, dd) + tl.sum(x * xu, axis=0)
        if NK == 1:
            fr, fi = fr0, fi0
        else:
            fr, fi = _dft_block(k1, ki * BLOCK_K + tl.arange(0, BLOCK_K), N1, False, FAST_TRIG, PRECISION)
        xo = operand(x, PRECISION)
        acc_r = mma(fr, xo, tl.where(ki == 0, 0.0, acc_r), PRECISION)
        acc_i = mma(fi, xo, tl.where(ki == 0, 0.0, acc_i), PRECISION)
        if ki == NK - 1:
            zr = acc_r * twr - acc_i * twi
            zi = acc_r * twi + acc_i * twr
            zz = tl.reshape(tl.join(zr, zi), (BLOCK_M, 2 * BLOCK_N)).to(z_ptr.dtype.element_ty)
            tl.store(z_ptr + _z_offsets(row, k1, pid_n * BLOCK_N, N1, N2, BLOCK_N), zz,
                     mask=(valid & (k1 < N1))[:, None])
            if HAS_DD:
                tl.store(dd_ptr + pid_n * rows + row, tl.sum(dd, axis=0), mask=valid & (pid_m == 0))


def step1(
    x: torch.Tensor, split: tuple[int, int], out_dtype: torch.dtype, *, scale: float = 1.0,
    dropout_mask: Optional[torch.Tensor] = None, dd_with: Optional[torch.Tensor] = None,
    alloc: Callable[..., torch.Tensor] = torch.empty, block_n: Optional[int] = None,
    rows_per_program: Optional[int] = None, num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``z (B, H, N1, N2, 2)`` in ``out_dtype`` from real ``x (B, H, L)`` (any strides), times
    ``dropout_mask[b, h]`` where given; with ``dd_with`` (u, (B, H, L)) also ``sum_t x*mask*u``
    per channel (float32, (H,), fixed-order sums: dD), else None."""
    batch, channels, seqlen = x.shape
    n1, n2 = split
    rows = batch * channels
    precision = precision_for(out_dtype, x.is_cuda)
    tiles = blocks_for(n1, n2, precision, block_n, rows_per_program, num_warps)
    n_blocks = n2 // tiles.block_n
    z = alloc((batch, channels, n1, n2, 2), dtype=out_dtype, device=x.device)
    dd_part = torch.empty((n_blocks, rows), dtype=torch.float32, device=x.device) if dd_with is not None else None
    args = (x, dropout_mask, dd_with, z, dd_part, rows, channels, seqlen, float(scale),
            *x.stride(), *strides(dropout_mask, 2), *strides(dd_with, 3))
    flags = dict(HAS_MASK=dropout_mask is not None, HAS_DD=dd_with is not None, ROWS_PER_PROGRAM=tiles.rows_per_program,
                 PRECISION=precision, FAST_TRIG=x.is_cuda, num_warps=tiles.num_warps)
    _launch_step((_step1_split_kernel, _step1_kernel), n1, n2, rows, tiles, args, flags)
    dd = dd_part.view(n_blocks, batch, channels).sum(dim=(0, 1)) if dd_part is not None else None
    return z, dd


# --------------------------------------------------------------------------------- step 3 --
@triton.jit
def _step3_kernel(
    z_ptr, skip_ptr, skip_mask_ptr, d_ptr, dy_ptr, mask_ptr, y_ptr, dd_ptr,
    rows, channels, seqlen, scale,
    ss_b, ss_h, ss_l, ssm_b, ssm_h, sdy_b, sdy_h, sdy_l, sm_b, sm_h,
    HAS_D: tl.constexpr, SKIP_MASK: tl.constexpr, GRAD: tl.constexpr, GELU: tl.constexpr,
    HAS_MASK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as float64: keep float32 math
    pid_m, pid_n, pid_r = _program(N1, N2, BLOCK_M, BLOCK_N)
    n_blocks: tl.constexpr = N2 // BLOCK_N
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n1 = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = n1[:, None] * N2 + cols[None, :]
    NK: tl.constexpr = (N1 + BLOCK_K - 1) // BLOCK_K
    if NK == 1:  # the DFT block and the twiddle tile: made once, not per row
        k1_0 = tl.arange(0, BLOCK_K)
        gr0, gi0 = _dft_block(n1, k1_0, N1, True, FAST_TRIG, PRECISION)
        twr0, twi0 = twiddle(k1_0[:, None], cols[None, :], N1 * N2, FAST_TRIG)
    # One loop over (row, N1 chunk), each z tile loaded one iteration ahead (see step 1).
    row0 = pid_r * ROWS_PER_PROGRAM
    row, valid, b, h, ki = _rows_and_chunk(0, row0, rows, channels, ROWS_PER_PROGRAM, NK)
    k1 = ki * BLOCK_K + tl.arange(0, BLOCK_K)
    nxt = _load_z(z_ptr, row, k1, pid_n * BLOCK_N, valid, N1, N2, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in tl.range(0, ROWS_PER_PROGRAM * NK):
        zr, zi = tl.split(tl.reshape(nxt.to(tl.float32), (BLOCK_K, BLOCK_N, 2)))
        row_n, valid_n, b_n, h_n, ki_n = _rows_and_chunk(it + 1, row0, rows, channels, ROWS_PER_PROGRAM, NK)
        k1_n = ki_n * BLOCK_K + tl.arange(0, BLOCK_K)
        nxt = _load_z(z_ptr, row_n, k1_n, pid_n * BLOCK_N, valid_n, N1, N2, BLOCK_N)
        row, valid, b, h, ki = _rows_and_chunk(it, row0, rows, channels, ROWS_PER_PROGRAM, NK)
        if NK == 1:
            gr, gi, twr, twi = gr0, gi0, twr0, twi0
        else:
            k1 = ki * BLOCK_K + tl.arange(0, BLOCK_K)
            gr, gi = _dft_block(n1, k1, N1, True, FAST_TRIG, PRECISION)
            twr, twi = twiddle(k1[:, None], cols[None, :], N1 * N2, FAST_TRIG)
        # z * conj(w_N^(k1 c)), then Re(G z') = Gr z'r - Gi z'i.
        pr = zr * twr + zi * twi
        pi = zi * twr - zr * twi
        acc = mma(gr, operand(pr, PRECISION), tl.where(ki == 0, 0.0, acc), PRECISION)
        acc = mma(-gi, operand(pi, PRECISION), acc, PRECISION)
        if ki == NK - 1:
            _step3_epilogue(acc * scale, t, row, valid, b, h, pid_m * n_blocks + pid_n, skip_ptr, skip_mask_ptr,
                            d_ptr, dy_ptr, mask_ptr, y_ptr, dd_ptr, rows, seqlen,
                            ss_b, ss_h, ss_l, ssm_b, ssm_h, sdy_b, sdy_h, sdy_l, sm_b, sm_h,
                            HAS_D, SKIP_MASK, GRAD, GELU, HAS_MASK, N1, N2)


@triton.jit
def _step3_epilogue(
    c, t, row, valid, b, h, block, skip_ptr, skip_mask_ptr, d_ptr, dy_ptr, mask_ptr, y_ptr, dd_ptr, rows, seqlen,
    ss_b, ss_h, ss_l, ssm_b, ssm_h, sdy_b, sdy_h, sdy_l, sm_b, sm_h,
    HAS_D: tl.constexpr, SKIP_MASK: tl.constexpr, GRAD: tl.constexpr, GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr,
):
    """c += D skip; then y = mask * gelu?(c), or in the grad mode dc = dy * mask * gelu'(c) and
    dD's partial sum of this (row block, column block)."""
    inside = valid & (t < seqlen) & (t < N1 * N2)
    if HAS_D:
        s = tl.load(skip_ptr + b * ss_b + h * ss_h + t * ss_l, mask=inside, other=0.0).to(tl.float32)
        if SKIP_MASK:
            s *= tl.load(skip_mask_ptr + b * ssm_b + h * ssm_h, mask=valid, other=0.0).to(tl.float32)
        c += tl.load(d_ptr + h, mask=valid, other=0.0).to(tl.float32) * s
    if HAS_MASK:
        keep = tl.load(mask_ptr + b * sm_b + h * sm_h, mask=valid, other=0.0).to(tl.float32)
    if GRAD:
        g = tl.load(dy_ptr + b * sdy_b + h * sdy_h + t * sdy_l, mask=inside, other=0.0).to(tl.float32)
        if HAS_MASK:
            g *= keep
        if GELU:
            g *= gelu_grad(c)
        tl.store(y_ptr + row * seqlen + t, g, mask=inside)
        if HAS_D:
            tl.store(dd_ptr + block * rows + row, tl.sum(tl.sum(g * s, axis=1), axis=0), mask=valid)
    else:
        if GELU:
            c = gelu(c)
        if HAS_MASK:
            c *= keep
        tl.store(y_ptr + row * seqlen + t, c.to(y_ptr.dtype.element_ty), mask=inside)


def step3(
    z: torch.Tensor, seqlen: int, out_dtype: torch.dtype, *, scale: float = 1.0,
    D: Optional[torch.Tensor] = None, skip: Optional[torch.Tensor] = None, skip_mask: Optional[torch.Tensor] = None,
    gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, grad_y: Optional[torch.Tensor] = None,
    alloc: Callable[..., torch.Tensor] = torch.empty, block_n: Optional[int] = None,
    rows_per_program: Optional[int] = None, num_warps: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """From ``z (B, H, N1, N2, 2)``: ``c = scale * step-3 sum + D[h] * skip * skip_mask[b, h]``.

    Without ``grad_y``: ``y = mask * gelu?(c)`` (B, H, L) contiguous in ``out_dtype``, and None.
    With ``grad_y``: ``dc = grad_y * mask * gelu'(c)?`` (float32, contiguous) and, with D, dD's
    sum ``sum_t dc * skip`` per channel (float32, fixed order).
    """
    batch, channels, n1, n2 = z.shape[:4]
    rows = batch * channels
    precision = precision_for(z.dtype, z.is_cuda)
    tiles = blocks_for(n1, n2, precision, block_n, rows_per_program, num_warps)
    n_blocks, m_blocks = n2 // tiles.block_n, triton.cdiv(n1, tiles.block_m)
    grad = grad_y is not None
    y = alloc((batch, channels, seqlen), dtype=torch.float32 if grad else out_dtype, device=z.device)
    dd_part = (torch.empty((m_blocks * n_blocks, rows), dtype=torch.float32, device=z.device)
               if grad and D is not None else None)
    args = (z, skip, skip_mask, D, grad_y, dropout_mask, y, dd_part, rows, channels, seqlen, float(scale),
            *strides(skip, 3), *strides(skip_mask, 2), *strides(grad_y, 3), *strides(dropout_mask, 2))
    flags = dict(HAS_D=D is not None, SKIP_MASK=skip_mask is not None, GRAD=grad, GELU=gelu,
                 HAS_MASK=dropout_mask is not None, ROWS_PER_PROGRAM=tiles.rows_per_program,
                 PRECISION=precision, FAST_TRIG=z.is_cuda, num_warps=tiles.num_warps)
    _launch_step((_step3_split_kernel, _step3_kernel), n1, n2, rows, tiles, args, flags)
    dd = dd_part.view(m_blocks * n_blocks, batch, channels).sum(dim=(0, 1)) if dd_part is not None else None
    return y, dd


# ------------------------------------------------------------- two-level DFT (N1 >= 256) --
# From N1 = 256 on, one (BLOCK_M x BLOCK_K) DFT block per 64-chunk made every iteration cost
# more than the data (trig per element per chunk: step 1 5x, step 3 9x its traffic floor at 1M).
# There the N1-point DFT runs as P x Q (P = SPLIT_P, Q = N1 / P), Cooley-Tukey inside the
# program, with n1 = Q a + b and k1 = P kb + ka:
#     X[P kb + ka] = sum_b w_Q^(kb b) w_N1^(ka b) sum_a w_P^(ka a) x[Q a + b]
# on a tile of all N1 rows and BLOCK_N columns: a (P x P) @ (P x Q*BLOCK_N) product over a, a
# transpose in registers to [b, (ka, c)], the inner twiddle and a (Q x Q) @ (Q x P*BLOCK_N)
# product over b, whose rows [kb, (ka, c)] are z's rows k1 in order. Every matrix and twiddle
# depends on the program's columns only, so it is made once and reused for each of its rows;
# the outer twiddle w_N^(k1 c) = w_N^(P kb c) w_N^(ka c) is kept as its two small factors.
@triton.jit
def _split_constants(col0, P: tl.constexpr, Q: tl.constexpr, N2: tl.constexpr, BLOCK_N: tl.constexpr,
                     PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr):
    """The program's DFT matrices w_P (P, P) and w_Q (Q, Q), the inner twiddle w_N1^(ka b) as
    (Q, P, 1) [b, ka] and the outer twiddle's factors w_N^(P kb c) (Q, 1, BLOCK_N) and
    w_N^(ka c) (1, P, BLOCK_N)."""
    N1: tl.constexpr = P * Q
    ip = tl.arange(0, P)
    iq = tl.arange(0, Q)
    fpr, fpi = _dft_block(ip, ip, P, False, FAST_TRIG, PRECISION)
    fqr, fqi = _dft_block(iq, iq, Q, False, FAST_TRIG, PRECISION)
    tir, tii = twiddle(iq[:, None, None], ip[None, :, None], N1, FAST_TRIG)
    cols = col0 + tl.arange(0, BLOCK_N)[None, None, :]
    thr, thi = twiddle(P * iq[:, None, None], cols, N1 * N2, FAST_TRIG)
    tlr, tli = twiddle(ip[None, :, None], cols, N1 * N2, FAST_TRIG)
    return fpr, fpi, fqr, fqi, tir, tii, thr, thi, tlr, tli


@triton.jit
def _split_times(col0, P: tl.constexpr, Q: tl.constexpr, N2: tl.constexpr, BLOCK_N: tl.constexpr):
    """Times t = (Q a + b) N2 + c of the (P, Q * BLOCK_N) tile [a, (b, c)] of a row of x or y."""
    j = tl.arange(0, Q * BLOCK_N)[None, :]
    return (Q * tl.arange(0, P)[:, None] + j // BLOCK_N) * N2 + col0 + j % BLOCK_N


@triton.jit
def _transpose_blocks(x, R: tl.constexpr, S: tl.constexpr, BLOCK_N: tl.constexpr):
    """(R, S * BLOCK_N) [r, (s, c)] -> (S, R * BLOCK_N) [s, (r, c)]: a shuffle on chip."""
    return tl.reshape(tl.permute(tl.reshape(x, (R, S, BLOCK_N)), (1, 0, 2)), (S, R * BLOCK_N))


@triton.jit
def _split_program(P: tl.constexpr, Q: tl.constexpr, N2: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr):
    """Column block, row group, first column, the times of the [a, (b, c)] tile and the
    :func:`_split_constants` of this program. Column blocks run fastest, so neighbouring programs
    read neighbouring columns of the same rows."""
    N_BLOCKS: tl.constexpr = N2 // BLOCK_N
    pid = tl.program_id(0)
    pid_n = pid % N_BLOCKS
    col0 = pid_n * BLOCK_N
    fpr, fpi, fqr, fqi, tir, tii, thr, thi, tlr, tli = _split_constants(col0, P, Q, N2, BLOCK_N, PRECISION, FAST_TRIG)
    t = _split_times(col0, P, Q, N2, BLOCK_N)
    return pid_n, pid // N_BLOCKS, col0, t, fpr, fpi, fqr, fqi, tir, tii, thr, thi, tlr, tli


@triton.jit
def _step1_split_kernel(
    x_ptr, mask_ptr, u_ptr, z_ptr, dd_ptr, rows, channels, seqlen, scale,
    sx_b, sx_h, sx_l, sm_b, sm_h, su_b, su_h, su_l,
    HAS_MASK: tl.constexpr, HAS_DD: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    P: tl.constexpr, Q: tl.constexpr, N2: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as float64: keep float32 math
    N1: tl.constexpr = P * Q
    pid_n, pid_r, col0, t, fpr, fpi, fqr, fqi, tir, tii, thr, thi, tlr, tli = _split_program(
        P, Q, N2, BLOCK_N, PRECISION, FAST_TRIG)
    tlr *= scale
    tli *= scale
    inside = t < seqlen
    row0 = pid_r * ROWS_PER_PROGRAM
    # Each row's tile is loaded one row ahead, so a load is in flight while a row is transformed.
    nxt = tl.load(x_ptr + (row0 // channels) * sx_b + (row0 % channels) * sx_h + t * sx_l,
                  mask=inside & (row0 < rows), other=0.0)
    for r in tl.range(0, ROWS_PER_PROGRAM):
        row = row0 + r
        valid = row < rows
        b = row // channels
        h = row % channels
        x = nxt.to(tl.float32)
        row_n = row + 1
        nxt = tl.load(x_ptr + (row_n // channels) * sx_b + (row_n % channels) * sx_h + t * sx_l,
                      mask=inside & (row_n < rows) & (r + 1 < ROWS_PER_PROGRAM), other=0.0)
        if HAS_MASK:
            x *= tl.load(mask_ptr + b * sm_b + h * sm_h, mask=valid, other=0.0).to(tl.float32)
        if HAS_DD:
            xu = tl.load(u_ptr + b * su_b + h * su_h + t * su_l, mask=inside & valid, other=0.0).to(tl.float32)
            tl.store(dd_ptr + pid_n * rows + row, tl.sum(tl.sum(x * xu, axis=1), axis=0), mask=valid)
        xo = operand(x, PRECISION)
        yr = mma(fpr, xo, tl.zeros((P, Q * BLOCK_N), dtype=tl.float32), PRECISION)  # [ka, (b, c)]
        yi = mma(fpi, xo, tl.zeros((P, Q * BLOCK_N), dtype=tl.float32), PRECISION)
        yr = tl.reshape(_transpose_blocks(yr, P, Q, BLOCK_N), (Q, P, BLOCK_N))  # [b, ka, c]
        yi = tl.reshape(_transpose_blocks(yi, P, Q, BLOCK_N), (Q, P, BLOCK_N))
        yr, yi = yr * tir - yi * tii, yr * tii + yi * tir
        yr = operand(tl.reshape(yr, (Q, P * BLOCK_N)), PRECISION)
        yi = operand(tl.reshape(yi, (Q, P * BLOCK_N)), PRECISION)
        zr = mma(fqr, yr, tl.zeros((Q, P * BLOCK_N), dtype=tl.float32), PRECISION)  # [kb, (ka, c)]
        zr = mma(-fqi, yi, zr, PRECISION)
        zi = mma(fqr, yi, tl.zeros((Q, P * BLOCK_N), dtype=tl.float32), PRECISION)
        zi = mma(fqi, yr, zi, PRECISION)
        zr = tl.reshape(zr, (Q, P, BLOCK_N))
        zi = tl.reshape(zi, (Q, P, BLOCK_N))
        zr, zi = zr * thr - zi * thi, zr * thi + zi * thr
        zr, zi = zr * tlr - zi * tli, zr * tli + zi * tlr
        zz = tl.reshape(tl.join(zr, zi), (N1, 2 * BLOCK_N)).to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + _z_offsets(row, tl.arange(0, N1), col0, N1, N2, BLOCK_N), zz, mask=valid)


@triton.jit
def _step3_split_kernel(
    z_ptr, skip_ptr, skip_mask_ptr, d_ptr, dy_ptr, mask_ptr, y_ptr, dd_ptr,
    rows, channels, seqlen, scale,
    ss_b, ss_h, ss_l, ssm_b, ssm_h, sdy_b, sdy_h, sdy_l, sm_b, sm_h,
    HAS_D: tl.constexpr, SKIP_MASK: tl.constexpr, GRAD: tl.constexpr, GELU: tl.constexpr,
    HAS_MASK: tl.constexpr, ROWS_PER_PROGRAM: tl.constexpr,
    P: tl.constexpr, Q: tl.constexpr, N2: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    scale = tl.cast(scale, tl.float32)  # Inductor passes Python floats as float64: keep float32 math
    N1: tl.constexpr = P * Q
    # Step 1's constants, conjugated where used: the inverse runs the same stages backwards.
    pid_n, pid_r, col0, t, fpr, fpi, fqr, fqi, tir, tii, thr, thi, tlr, tli = _split_program(
        P, Q, N2, BLOCK_N, PRECISION, FAST_TRIG)
    k1 = tl.arange(0, N1)
    row0 = pid_r * ROWS_PER_PROGRAM
    nxt = _load_z(z_ptr, row0, k1, col0, row0 < rows, N1, N2, BLOCK_N)
    for r in tl.range(0, ROWS_PER_PROGRAM):
        row = row0 + r
        valid = row < rows
        zr, zi = tl.split(tl.reshape(nxt.to(tl.float32), (Q, P, BLOCK_N, 2)))  # [kb, ka, c]
        row_n = row + 1
        nxt = _load_z(z_ptr, row_n, k1, col0, (row_n < rows) & (r + 1 < ROWS_PER_PROGRAM), N1, N2, BLOCK_N)
        # z * conj(w_N^(k1 c)); then V[b, (ka, c)] = sum_kb conj(w_Q^(b kb)) z'[kb, (ka, c)].
        zr, zi = zr * thr + zi * thi, zi * thr - zr * thi
        zr, zi = zr * tlr + zi * tli, zi * tlr - zr * tli
        pr = operand(tl.reshape(zr, (Q, P * BLOCK_N)), PRECISION)
        pi = operand(tl.reshape(zi, (Q, P * BLOCK_N)), PRECISION)
        vr = mma(fqr, pr, tl.zeros((Q, P * BLOCK_N), dtype=tl.float32), PRECISION)
        vr = mma(fqi, pi, vr, PRECISION)
        vi = mma(fqr, pi, tl.zeros((Q, P * BLOCK_N), dtype=tl.float32), PRECISION)
        vi = mma(-fqi, pr, vi, PRECISION)
        # times conj(w_N1^(ka b)), back to [ka, (b, c)]; then y[a, (b, c)] = Re sum_ka conj(w_P^(a ka)) V.
        vr = tl.reshape(vr, (Q, P, BLOCK_N))
        vi = tl.reshape(vi, (Q, P, BLOCK_N))
        wr = _transpose_blocks(tl.reshape(vr * tir + vi * tii, (Q, P * BLOCK_N)), Q, P, BLOCK_N)
        wi = _transpose_blocks(tl.reshape(vi * tir - vr * tii, (Q, P * BLOCK_N)), Q, P, BLOCK_N)
        acc = mma(fpr, operand(wr, PRECISION), tl.zeros((P, Q * BLOCK_N), dtype=tl.float32), PRECISION)
        acc = mma(fpi, operand(wi, PRECISION), acc, PRECISION)
        _step3_epilogue(acc * scale, t, row, valid, row // channels, row % channels, pid_n, skip_ptr, skip_mask_ptr,
                        d_ptr, dy_ptr, mask_ptr, y_ptr, dd_ptr, rows, seqlen,
                        ss_b, ss_h, ss_l, ssm_b, ssm_h, sdy_b, sdy_h, sdy_l, sm_b, sm_h,
                        HAS_D, SKIP_MASK, GRAD, GELU, HAS_MASK, N1, N2)
