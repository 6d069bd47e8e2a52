"""Short kernels (Lk <= SHORT_MAX_KERNEL_LEN): a direct causal convolution on tensor cores.

For short kernels an FFT does far more work than the sum itself, so this family computes
``c[t] = sum_{j<Lk} k[j] x[t-j]`` directly, as a Toeplitz product over blocks of T samples.
A tile holds BM consecutive blocks of one channel (blocks of consecutive batch rows follow each
other, so short sequences waste nothing); with ``X_m`` the tile shifted back by m blocks,

    C = sum_{m=0..NC} X_m @ F_m,     F_m[s, t] = k[t - s + m T]  (zero outside [0, Lk)),

NC = ceil((Lk - 1) / T). T is the smaller of 16 and 32 that holds Lk - 1 (32 beyond), so a
4-tap kernel multiplies 16 x 16 matrices. The F_m are gathered from k once per program and
shared by every tile the program walks (programs are persistent over their channel's tiles).

Accuracy: every product runs on bf16 tensor-core operands with float32 accumulation, each float
operand split into a high and a low bf16 part (``v = hi + lo`` keeps 16 significant bits):
``A_hi B_hi + A_hi B_lo + A_lo B_hi``, and the first term alone where A is exactly bf16 (bf16 u
without an input gate). Relative error ~1e-5 before the output is rounded to u's dtype. float32
inputs may instead use ``tf32x3`` or ``ieee`` dots (``Tuning.precision``).

Backward (one launch; where a channel is split over several programs, its arrival counters
are a zeroed workspace, i.e. one memset before it). Its own blocks: T of 16 or 32 and a window
of W = next_pow2(T + Lk - 1) samples (:func:`_backward_shape`). Per tile of BM blocks, the (BM, W)
window ``Dw[r, s'] = dc[r T + s']`` (it reaches into the next blocks, 0 past L) gives

    du = Dw @ B,  B[s', t] = k[s' - t] (+ D at s' = t),      G += X^T @ Dw  (T x W),

one K = W product each; ``dk[j]`` is the sum of the diagonal ``s' - s = j`` of G and
``dD = dk[0]``. Without GELU or an output gate, dc = dy * mask: the window is read from dy as
it is (bf16 dy exact, unsplit) and the mask scales du and X. With them, dc (which needs c) is
computed once per tile into a per-program ring of two tile slots (L2-resident), tiles walked
from the last to the first so that the next tile's dc is already there, and windows are read
back from the ring. Each program writes its G to a workspace; the last program of a channel to
finish (an integer acq_rel counter) sums them in a fixed order. ``dk`` and ``dD`` are
bit-identical across runs; no float atomics.

NaN semantics (part of the contract): a NaN or Inf in x at time s affects only c at
s .. s+Lk-1, exactly as the direct sum does. A dense block product would spread it over the
whole block (0 * NaN = NaN), so each tile first checks whether any x it loaded is non-finite and,
if so, computes that tile with a float32 FMA loop over the taps instead. The backward does the
same for ``du`` (a non-finite dc at t reaches du only at t-Lk+1 .. t). ``dk`` sums over all
times: a non-finite value reaches every lag it pairs with, and possibly others.

Must not: register ops, import Inductor, or run torch ops other than allocating outputs and
workspaces. Launches go through :func:`.launch.launch` (or a caller's stand-in with its signature)
so the compiler's CUDA stage can trace them. Sizes: see :func:`supports`.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .common import gelu, gelu_grad, offsets_fit_int32, sm_count, strides
from .launch import launch as launch_kernel

__all__ = ["SHORT_MAX_KERNEL_LEN", "Tuning", "supports", "fftconv_fwd", "fftconv_bwd"]

# Longest kernel this family claims in kernels.select, from benchmarks/sweep_shortconv.py on the
# H100 (results/2026-11-23_h100_sweep_shortconv_f7505ed.json): at Lk = 128 this path is still
# faster than FlashConv v5 forward (0.166 vs 0.383 ms at (8,1024,4K)) and forward+backward (1.10 vs
# 1.15; 0.74 vs 1.76 at (4,768,8K)); at 256 the FFT wins forward+backward. Lk 65..128 pass the GPU
# tests (test_gpu_*_65_to_128).
SHORT_MAX_KERNEL_LEN = 128
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def supports(u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether these kernels handle the inputs: CUDA, half or float32 u, k float32 or u's dtype,
    Lk <= SHORT_MAX_KERNEL_LEN (any L), and fewer than 2^31 elements in u (32-bit offsets)."""
    return (
        u.is_cuda
        and u.dtype in INPUT_DTYPES
        and k.dtype in (torch.float32, u.dtype)
        and k.shape[-1] <= SHORT_MAX_KERNEL_LEN
        and offsets_fit_int32(u.numel())
    )


@dataclass(frozen=True)
class Tuning:
    """Launch parameters a caller may override (benchmarks explore them); None = the default."""

    block: Optional[int] = None  # T: samples per block (16, 32 or 64)
    rows: Optional[int] = None  # BM: blocks per tile (a power of two >= 16)
    num_warps: Optional[int] = None
    precision: Optional[str] = None  # "bf16" (split operands), "tf32x3" or "ieee" (float32 u only)
    programs_per_sm: Optional[int] = None


# Triton's interpreter (CPU tests) multiplies bf16 tl.dot operands wrongly (triton 3.6: errors of
# 1e10 on a 16 x 16 product), so there the same bf16-rounded values go in as float32 operands.
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class _Config:
    block: int
    rows: int
    context_blocks: int  # NC: blocks before (forward) / after (backward) a tile that it needs
    lags: int  # power of two >= Lk: the backward's dk vector
    precision: str
    num_warps: int
    nblocks: int  # blocks per (b, h) row
    tiles: int  # tiles per channel
    groups: int  # programs per channel
    window: int  # W: the backward's dc window (samples per row); the forward's = block


@functools.lru_cache(maxsize=512)
def _config(batch: int, channels: int, seqlen: int, kernel_len: int, dtype: torch.dtype,
            sms: int, backward: bool, tuning: Tuning, recompute: bool = False) -> _Config:
    precision = tuning.precision or "bf16"
    if precision != "bf16" and dtype != torch.float32:
        raise ValueError(f"shortconv: precision {precision!r} needs float32 u, got {dtype}")
    if backward:
        block, window, rows = _backward_shape(kernel_len, tuning)
    else:
        # T = 64 operands spill on sm_90 (ptxas): longer kernels take more blocks of 32 instead.
        block = tuning.block or min(32, max(16, triton.next_power_of_2(max(kernel_len - 1, 1))))
        window = block
        # 2K samples per forward tile: larger tiles spill on sm_90 (compile_check --short).
        rows = tuning.rows or max(16, 2048 // block)
    nblocks = triton.cdiv(seqlen, block)
    tiles = triton.cdiv(batch * nblocks, rows)
    per_sm = tuning.programs_per_sm or (2 if backward else 4)
    groups = max(1, min(tiles, triton.cdiv(per_sm * sms, channels), 65535))
    if backward:  # contiguous ranges of tiles, none empty
        groups = triton.cdiv(tiles, triton.cdiv(tiles, groups))
    if precision == "bf16" and _INTERPRETED:
        precision = "bf16emu"
    return _Config(
        block=block, rows=rows, context_blocks=triton.cdiv(kernel_len - 1, block),
        lags=triton.next_power_of_2(kernel_len), precision=precision,
        num_warps=tuning.num_warps or 4, nblocks=nblocks, tiles=tiles, groups=groups, window=window,
    )


def _backward_shape(kernel_len: int, tuning: Tuning) -> tuple[int, int, int]:
    """(T, W, BM) of the backward: blocks of T samples, windows of W >= T + Lk - 1 samples of dc
    (one K = W product per tile for du, one for dk), BM blocks per tile.

    T is 16 or 32, whichever needs the smaller power-of-two W (Lk = 34..49 fits W = 64 with
    T = 16, not with 32); on a tie 32 up to W = 128 (fewer overlapping window reads), 16 beyond
    (its (T, W) dk accumulator and (W, T) du operand: 150 registers at Lk = 128, not 201)."""
    def window(block):
        return triton.next_power_of_2(block + kernel_len - 1)

    if tuning.block:
        block = tuning.block
    else:
        blocks = [16] + ([32] if kernel_len > 17 else [])
        block = min(blocks, key=lambda b: (window(b), b if window(b) > 128 else -b))
    # Tiles of at most 1K samples whose (BM, W) window of dc holds at most 2K values (16 float32
    # registers per thread at 4 warps); at least 16 rows (tensor-core tiles).
    rows = tuning.rows or max(16, min(1024 // block, 2048 // window(block)))
    return block, window(block), rows


def _launch_config(u: torch.Tensor, kernel_len: int, backward: bool, tuning: Tuning,
                   recompute: bool = False) -> _Config:
    """``recompute``: the backward recomputes the pre-activation (GELU or an output gate)."""
    batch, channels, seqlen = u.shape
    sms = sm_count(u.device) if u.is_cuda else 4
    return _config(batch, channels, seqlen, kernel_len, u.dtype, sms, backward, tuning, recompute)


# ------------------------------------------------------------------------------ shared pieces --
@triton.jit
def _split(v, SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """Tensor-core operands of float32 v: (hi, lo) bf16 with v ~ hi + lo, or v itself (tf32/ieee)."""
    if PRECISION == "bf16" or PRECISION == "bf16emu":
        hi = v.to(tl.bfloat16)
        if SPLIT:
            lo = (v - hi.to(tl.float32)).to(tl.bfloat16)
        else:
            lo = hi
        if PRECISION == "bf16emu":  # the same values as float32 operands (see _INTERPRETED)
            hi = hi.to(tl.float32)
            lo = lo.to(tl.float32)
    else:
        hi = v
        lo = v
    return hi, lo


@triton.jit
def _mma(acc, a_hi, a_lo, b_hi, b_lo, A_SPLIT: tl.constexpr, PRECISION: tl.constexpr):
    """acc + A @ B from split operands (B always split; A split unless exactly bf16)."""
    return _mma_split(acc, a_hi, a_lo, b_hi, b_lo, A_SPLIT, True, PRECISION)


@triton.jit
def _mma_split(acc, a_hi, a_lo, b_hi, b_lo, A_SPLIT: tl.constexpr, B_SPLIT: tl.constexpr,
               PRECISION: tl.constexpr):
    """acc + A @ B from split operands; an operand that is exactly bf16 is not split."""
    if PRECISION == "bf16" or PRECISION == "bf16emu":
        # Small terms first: they are added to the accumulator before the large one.
        if A_SPLIT:
            acc = _dot(a_lo, b_hi, acc, PRECISION)
        if B_SPLIT:
            acc = _dot(a_hi, b_lo, acc, PRECISION)
        acc = _dot(a_hi, b_hi, acc, PRECISION)
    else:
        acc = tl.dot(a_hi, b_hi, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr):
    if PRECISION == "bf16":
        return tl.dot(a, b, acc)
    elif PRECISION == "bf16emu":
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _toeplitz(k_row, kernel_len, sk_l, offset, T: tl.constexpr, TRANSPOSED: tl.constexpr,
              PRECISION: tl.constexpr):
    """Split operands of F[s, t] = k[offset + t - s] (or its transpose), zero outside [0, Lk)."""
    a = tl.arange(0, T)[:, None]
    b = tl.arange(0, T)[None, :]
    if TRANSPOSED:
        lag = offset + a - b
    else:
        lag = offset + b - a
    taps = tl.load(k_row + lag * sk_l, mask=(lag >= 0) & (lag < kernel_len), other=0.0)
    return _split(taps.to(tl.float32), True, PRECISION)


@triton.jit
def _load_row(ptr, row, t, ok, seqlen, stride_l):
    """Values of ptr at times t of the tile's rows, 0 outside [0, L) and past the last row."""
    return tl.load(ptr + row + t * stride_l, mask=ok & (t >= 0) & (t < seqlen), other=0.0).to(tl.float32)


@triton.jit
def _load_x(u_ptr, gate_ptr, u_row, g_row, t, ok, seqlen, su_l, sg_l, HAS_GATE: tl.constexpr):
    x = _load_row(u_ptr, u_row, t, ok, seqlen, su_l)
    if HAS_GATE:
        x *= _load_row(gate_ptr, g_row, t, ok, seqlen, sg_l)
    return x


@triton.jit
def _causal_conv(u_ptr, gate_ptr, k_row, u_row, g_row, t, ok, seqlen, kernel_len, su_l, sg_l, sk_l,
                 f0_hi, f0_lo, f1_hi, f1_lo, f2_hi, f2_lo,
                 HAS_GATE: tl.constexpr, A_SPLIT: tl.constexpr, NC: tl.constexpr, T: tl.constexpr,
                 PRECISION: tl.constexpr, HOISTED: tl.constexpr):
    """(sum_j k[j] x[t-j], x[t]) at the tile's times t (BM, T), exact in its NaN semantics.

    F_m for m < HOISTED (at most 3) come from the caller (built once per program); the others
    are gathered from k here (L1 hits), which keeps registers free."""
    x_now = _load_x(u_ptr, gate_ptr, u_row, g_row, t, ok, seqlen, su_l, sg_l, HAS_GATE)
    acc = tl.zeros(t.shape, dtype=tl.float32)
    probe = x_now * 0.0  # NaN exactly where a loaded value is NaN or Inf
    for m in tl.static_range(NC + 1):
        if m == 0:
            xm = x_now
        else:
            xm = _load_x(u_ptr, gate_ptr, u_row, g_row, t - m * T, ok, seqlen, su_l, sg_l, HAS_GATE)
            probe += xm * 0.0
        if m == 0 and HOISTED > 0:
            b_hi, b_lo = f0_hi, f0_lo
        elif m == 1 and HOISTED > 1:
            b_hi, b_lo = f1_hi, f1_lo
        elif m == 2 and HOISTED > 2:
            b_hi, b_lo = f2_hi, f2_lo
        else:
            b_hi, b_lo = _toeplitz(k_row, kernel_len, sk_l, m * T, T, False, PRECISION)
        a_hi, a_lo = _split(xm, A_SPLIT, PRECISION)
        acc = _mma(acc, a_hi, a_lo, b_hi, b_lo, A_SPLIT, PRECISION)
    # A non-finite input: the block product would spread it to earlier outputs of its block.
    # Redo this tile as the direct sum, which touches only taps j < Lk. (A loop of 0 or Lk
    # steps rather than an `if`: Triton 3.6's pipeliner fails on tl.dot followed by that if.)
    not_finite = tl.sum(tl.sum(probe, axis=1), axis=0) != 0.0
    acc = tl.where(not_finite, 0.0, acc)
    for j in range(0, tl.where(not_finite, kernel_len, 0)):
        tap = tl.load(k_row + j * sk_l).to(tl.float32)
        acc += tap * _load_x(u_ptr, gate_ptr, u_row, g_row, t - j, ok, seqlen, su_l, sg_l, HAS_GATE)
    return acc, x_now


@triton.jit
def _tile_rows(tile, nblocks, total_blocks, h, su_b, su_h, sg_b, sg_h, channels, seqlen,
               BM: tl.constexpr, T: tl.constexpr):
    """Row offsets (BM, 1) and times (BM, T) of a tile: BM consecutive blocks of channel h."""
    g = tile * BM + tl.arange(0, BM)
    b = g // nblocks
    blk = g - b * nblocks
    b64 = b.to(tl.int64)[:, None]
    ok = (g < total_blocks)[:, None]
    t = blk[:, None] * T + tl.arange(0, T)[None, :]
    out_row = (b64 * channels + h) * seqlen  # contiguous outputs
    return b64, ok, t, b64 * su_b + h * su_h, b64 * sg_b + h * sg_h, out_row


# ------------------------------------------------------------------------------------ forward --
@triton.jit
def _shortconv_fwd_kernel(
    u_ptr, k_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr, y_ptr,
    batch, channels, seqlen, kernel_len, nblocks, tiles, groups,
    su_b, su_h, su_l, sk_h, sk_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    T: tl.constexpr, BM: tl.constexpr, NC: tl.constexpr, A_SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    k_row = k_ptr + h * sk_h
    # The forward's products run on wgmma, which reads F_m from shared memory: hoisting all
    # of them (up to 3) costs shared memory, not registers; re-gathering F_2 on every tile made
    # Lk = 33..64 the slowest forward (2.3-2.7x the floor). T = 64 would hold its operands in
    # ~64 registers.
    HOISTED: tl.constexpr = 3 if T <= 32 else 0
    f0_hi, f0_lo = _toeplitz(k_row, kernel_len, sk_l, 0, T, False, PRECISION)
    f1_hi, f1_lo = f0_hi, f0_lo
    f2_hi, f2_lo = f0_hi, f0_lo
    if NC >= 1:
        f1_hi, f1_lo = _toeplitz(k_row, kernel_len, sk_l, T, T, False, PRECISION)
    if NC >= 2:
        f2_hi, f2_lo = _toeplitz(k_row, kernel_len, sk_l, 2 * T, T, False, PRECISION)
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    for tile in range(group, tiles, groups):
        b, ok, t, u_row, gi_row, y_row = _tile_rows(tile, nblocks, batch * nblocks, h, su_b, su_h,
                                                    sgi_b, sgi_h, channels, seqlen, BM, T)
        c, x = _causal_conv(u_ptr, gate_in_ptr, k_row, u_row, gi_row, t, ok, seqlen, kernel_len,
                            su_l, sgi_l, sk_l, f0_hi, f0_lo, f1_hi, f1_lo, f2_hi, f2_lo,
                            HAS_GATE_IN, A_SPLIT, NC, T, PRECISION, HOISTED)
        c += d * x
        if GELU:
            c = gelu(c)
        if HAS_MASK:
            c *= tl.load(mask_ptr + b * sm_b + h * sm_h, mask=ok, other=0.0).to(tl.float32)
        if HAS_GATE_OUT:
            c *= _load_row(gate_out_ptr, b * sgo_b + h * sgo_h, t, ok, seqlen, sgo_l)
        tl.store(y_ptr + y_row + t, c.to(y_ptr.dtype.element_ty), mask=ok & (t < seqlen))


# Forward programs resident per SM (sm_90), keyed by (u dtype, T, NC, gate_in, epilogue), where the
# epilogue is any of gate_out, GELU and dropout mask: from the registers and shared memory of each
# configuration compiled for sm_90 (`scripts/compile_check.py --short --occupancy-table` prints
# this table; a CPU test recompiles the bfloat16 rows and compares). A table rather than the count
# read from the compiled kernel after its first launch: the grid must not depend on which call ran
# first (a graph traced before any eager launch got another grid than one traced after it).
# Configurations not in it (explicit tunings) use _FWD_GUESS_PER_SM.
FORWARD_PROGRAMS_PER_SM = {
    ('bfloat16', 16, 0, False, False): 8, ('bfloat16', 16, 0, False, True): 7,
    ('bfloat16', 16, 0, True, False): 4, ('bfloat16', 16, 0, True, True): 4,
    ('bfloat16', 16, 1, False, False): 6, ('bfloat16', 16, 1, False, True): 7,
    ('bfloat16', 16, 1, True, False): 5, ('bfloat16', 16, 1, True, True): 5,
    ('bfloat16', 32, 1, False, False): 6, ('bfloat16', 32, 1, False, True): 7,
    ('bfloat16', 32, 1, True, False): 4, ('bfloat16', 32, 1, True, True): 5,
    ('bfloat16', 32, 2, False, False): 6, ('bfloat16', 32, 2, False, True): 6,
    ('bfloat16', 32, 2, True, False): 3, ('bfloat16', 32, 2, True, True): 4,
    ('bfloat16', 32, 3, False, False): 4, ('bfloat16', 32, 3, False, True): 5,
    ('bfloat16', 32, 3, True, False): 3, ('bfloat16', 32, 3, True, True): 3,
    ('bfloat16', 32, 4, False, False): 3, ('bfloat16', 32, 4, False, True): 3,
    ('bfloat16', 32, 4, True, False): 3, ('bfloat16', 32, 4, True, True): 2,
    ('float16', 16, 0, False, False): 6, ('float16', 16, 0, False, True): 6,
    ('float16', 16, 0, True, False): 4, ('float16', 16, 0, True, True): 5,
    ('float16', 16, 1, False, False): 5, ('float16', 16, 1, False, True): 5,
    ('float16', 16, 1, True, False): 5, ('float16', 16, 1, True, True): 5,
    ('float16', 32, 1, False, False): 5, ('float16', 32, 1, False, True): 6,
    ('float16', 32, 1, True, False): 4, ('float16', 32, 1, True, True): 5,
    ('float16', 32, 2, False, False): 4, ('float16', 32, 2, False, True): 5,
    ('float16', 32, 2, True, False): 4, ('float16', 32, 2, True, True): 4,
    ('float16', 32, 3, False, False): 4, ('float16', 32, 3, False, True): 4,
    ('float16', 32, 3, True, False): 3, ('float16', 32, 3, True, True): 3,
    ('float16', 32, 4, False, False): 3, ('float16', 32, 4, False, True): 3,
    ('float16', 32, 4, True, False): 3, ('float16', 32, 4, True, True): 2,
    ('float32', 16, 0, False, False): 4, ('float32', 16, 0, False, True): 4,
    ('float32', 16, 0, True, False): 2, ('float32', 16, 0, True, True): 3,
    ('float32', 16, 1, False, False): 4, ('float32', 16, 1, False, True): 4,
    ('float32', 16, 1, True, False): 3, ('float32', 16, 1, True, True): 3,
    ('float32', 32, 1, False, False): 4, ('float32', 32, 1, False, True): 4,
    ('float32', 32, 1, True, False): 3, ('float32', 32, 1, True, True): 3,
    ('float32', 32, 2, False, False): 3, ('float32', 32, 2, False, True): 3,
    ('float32', 32, 2, True, False): 2, ('float32', 32, 2, True, True): 2,
    ('float32', 32, 3, False, False): 2, ('float32', 32, 3, False, True): 2,
    ('float32', 32, 3, True, False): 2, ('float32', 32, 3, True, True): 2,
    ('float32', 32, 4, False, False): 2, ('float32', 32, 4, False, True): 2,
    ('float32', 32, 4, True, False): 2, ('float32', 32, 4, True, True): 2,
}
_FWD_GUESS_PER_SM = 3
_SM90_REGISTERS, _SM90_THREADS, _SM90_SHARED = 65536, 2048, 228 * 1024
_PROGRAM_SETUP_TILES = 0.3  # building the F_m of a channel costs about a third of a tile


def _sms(u: torch.Tensor) -> int:
    if not u.is_cuda:
        return 4
    return sm_count(u.device)


@functools.lru_cache(maxsize=1024)
def _forward_groups(channels: int, tiles: int, sms: int, per_sm: int) -> int:
    """Programs per channel: the count whose grid ends closest to a whole number of waves.

    One program per channel put 1024 channels on 792 resident slots: a second wave with a
    third of the SMs busy (1.8x the memory floor where 768 channels took 1.5x). The model:
    time ~ waves * (tiles per program + set-up), for 1..tiles programs per channel."""
    slots = max(1, sms * per_sm)

    def cost(groups):
        waves = -(-channels * groups // slots)
        return waves * (-(-tiles // groups) + _PROGRAM_SETUP_TILES)

    return min(range(1, min(tiles, 64) + 1), key=lambda g: (cost(g), g))


def resident_programs(registers: int, shared: int, num_warps: int) -> int:
    """Programs of a compiled kernel that fit on one sm_90 SM: registers (allocated per warp in
    units of 256), threads, shared memory (plus 1 KB reserved per program)."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    return max(1, min(_SM90_REGISTERS // (regs_per_warp * num_warps), _SM90_THREADS // (32 * num_warps),
                      _SM90_SHARED // (shared + 1024)))


def occupancy_key(dtype: torch.dtype, block: int, context_blocks: int, gate_in: bool, epilogue: bool) -> tuple:
    """FORWARD_PROGRAMS_PER_SM's key of a forward launch: u's dtype, T, NC, gate_in, epilogue."""
    return (str(dtype).removeprefix("torch."), block, context_blocks, gate_in, epilogue)


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
    launch: Callable = launch_kernel,
) -> torch.Tensor:
    """Launch the forward kernel (one launch). Inputs are assumed valid (the op validates them).

    ``alloc(shape, dtype=, device=)`` makes the output (tests pass one that poisons it);
    ``launch(kernel, grid, *args, **kwargs)`` launches (default: :func:`.launch.launch`, which
    the compiler's CUDA stage turns into traced launches; tests pass one that records).
    """
    batch, channels, seqlen = u.shape
    kernel_len = k.shape[-1]
    cfg = _launch_config(u, kernel_len, False, tuning)
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    if tuning.programs_per_sm:
        groups = cfg.groups
    else:
        key = occupancy_key(u.dtype, cfg.block, cfg.context_blocks, gate_in is not None,
                            gate_out is not None or gelu or dropout_mask is not None)
        groups = _forward_groups(channels, cfg.tiles, _sms(u), FORWARD_PROGRAMS_PER_SM.get(key, _FWD_GUESS_PER_SM))
    launch(
        _shortconv_fwd_kernel, (channels, groups),
        u, k, D, gate_in, gate_out, dropout_mask, y,
        batch, channels, seqlen, kernel_len, cfg.nblocks, cfg.tiles, groups,
        *u.stride(), *k.stride(), *strides(gate_in, 3), *strides(gate_out, 3),
        *strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        T=cfg.block, BM=cfg.rows, NC=cfg.context_blocks,
        A_SPLIT=not (u.dtype == torch.bfloat16 and gate_in is None), PRECISION=cfg.precision,
        num_warps=cfg.num_warps, num_stages=1,
    )
    return y


# ----------------------------------------------------------------------------------- backward --
@triton.jit
def _grad_pre_activation(
    dy_ptr, u_ptr, gate_in_ptr, gate_out_ptr, k_row, dy_row, u_row, gi_row, go_row, row_scale,
    t, ok, d, seqlen, kernel_len, sdy_l, su_l, sgi_l, sgo_l, sk_l,
    f0_hi, f0_lo, f1_hi, f1_lo, f2_hi, f2_lo,
    HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr, GELU: tl.constexpr,
    A_SPLIT: tl.constexpr, NC: tl.constexpr, T: tl.constexpr, PRECISION: tl.constexpr,
    HOISTED: tl.constexpr,
):
    """(dc, dy * activation * mask) at times t; dc is 0 outside [0, L) and past the last row."""
    valid = ok & (t >= 0) & (t < seqlen)
    dc = _load_row(dy_ptr, dy_row, t, ok, seqlen, sdy_l) * row_scale
    act = dc
    if GELU or HAS_GATE_OUT:
        # Recompute the pre-activation rather than store it: NC + 1 products per tile.
        c, x = _causal_conv(u_ptr, gate_in_ptr, k_row, u_row, gi_row, t, ok, seqlen, kernel_len,
                            su_l, sgi_l, sk_l, f0_hi, f0_lo, f1_hi, f1_lo, f2_hi, f2_lo,
                            HAS_GATE_IN, A_SPLIT, NC, T, PRECISION, HOISTED)
        c += d * x
        if HAS_GATE_OUT:
            act = gelu(c) if GELU else c
            act = dc * act  # dgate_out = dy * a * mask
            dc *= _load_row(gate_out_ptr, go_row, t, ok, seqlen, sgo_l)
        if GELU:
            dc *= gelu_grad(c)
    return tl.where(valid, dc, 0.0), act


@triton.jit
def _dc_at(dy_ptr, ring, dy_row, ring_base, rows, cols, t_first, ok, seqlen, sdy_l,
           RING: tl.constexpr, T: tl.constexpr, FROM_RING: tl.constexpr):
    """dc at times t_first + cols of each row (rows: 0..BM-1 as a column): from the ring of
    recomputed dc (this tile's slot, then the next tile's), or dy itself (without the row's
    mask scale). 0 at or past L: a window never reaches into the next batch row."""
    t = t_first + cols
    inside = ok & (t < seqlen)
    if FROM_RING:
        v = tl.load(ring + (ring_base + rows * T + cols) % RING, mask=inside, other=0.0)
    else:
        v = tl.load(dy_ptr + dy_row + t * sdy_l, mask=inside, other=0.0).to(tl.float32)
    return v


@triton.jit
def _shortconv_bwd_kernel(
    dy_ptr, u_ptr, k_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr,
    du_ptr, dk_ptr, dd_ptr, dgate_in_ptr, dgate_out_ptr, g_part_ptr, dc_ring_ptr, arrivals_ptr,
    batch, channels, seqlen, kernel_len, nblocks, tiles, groups, tiles_per_group,
    sdy_b, sdy_h, sdy_l, su_b, su_h, su_l, sk_h, sk_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l,
    sm_b, sm_h, sdk_h, sdk_l,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    T: tl.constexpr, BM: tl.constexpr, W: tl.constexpr, NC: tl.constexpr, LAGS: tl.constexpr,
    A_SPLIT: tl.constexpr, DY_SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    SPLIT_CHANNEL: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    k_row = k_ptr + h * sk_h
    RECOMPUTE: tl.constexpr = GELU or HAS_GATE_OUT
    # Without a recompute dc = dy * (the row's mask): the windows are read from dy itself and the
    # mask scales du after the product (and x before the dk product).
    MASK_AFTER: tl.constexpr = HAS_MASK and not RECOMPUTE
    WIN_SPLIT: tl.constexpr = RECOMPUTE or DY_SPLIT  # bf16 dy read as is is exact
    X_SPLIT: tl.constexpr = A_SPLIT or MASK_AFTER
    HOISTED: tl.constexpr = NC + 1 if NC < 3 else 3
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    # du[t] = sum_{s'} dc[t0 + s'] B[s', t - t0]: B[s', t] = k[s' - t], and D at s' = t (the
    # skip term rides on tap 0).
    lag = tl.arange(0, W)[:, None] - tl.arange(0, T)[None, :]
    taps = tl.load(k_row + lag * sk_l, mask=(lag >= 0) & (lag < kernel_len), other=0.0).to(tl.float32)
    b_hi, b_lo = _split(taps + tl.where(lag == 0, d, 0.0), True, PRECISION)
    f0_hi, f0_lo = b_hi, b_lo
    f1_hi, f1_lo = b_hi, b_lo
    f2_hi, f2_lo = b_hi, b_lo
    if RECOMPUTE:  # the forward's F_m for c
        f0_hi, f0_lo = _toeplitz(k_row, kernel_len, sk_l, 0, T, False, PRECISION)
        if NC >= 1:
            f1_hi, f1_lo = _toeplitz(k_row, kernel_len, sk_l, T, T, False, PRECISION)
        if NC >= 2:
            f2_hi, f2_lo = _toeplitz(k_row, kernel_len, sk_l, 2 * T, T, False, PRECISION)
    # G[s, s'] = sum over this program's tiles and rows r of x[r T + s] dc[r T + s']: dk[j] is the
    # sum of its diagonal s' - s = j (j < Lk <= W - T + 1). dD = dk[0].
    g = tl.zeros((T, W), dtype=tl.float32)
    rows = tl.arange(0, BM)[:, None]
    cols = tl.arange(0, W)[None, :]
    in_block = tl.arange(0, T)[None, :]
    RING: tl.constexpr = 2 * BM * T
    ring = dc_ring_ptr
    first = group * tiles_per_group
    end = tl.minimum(first + tiles_per_group, tiles)
    total_blocks = batch * nblocks
    if RECOMPUTE:
        # dc of a tile is computed once, kept in a per-program ring of two tile slots (L2) and
        # read back as windows. Tiles are walked from the last to the first, so the next tile's
        # dc is already there; first the dc of the tile after this program's range.
        ring = dc_ring_ptr + (h * groups + group) * RING
        b, ok, t, u_row, gi_row, out_row = _tile_rows(end, nblocks, total_blocks, h, su_b, su_h,
                                                      sgi_b, sgi_h, channels, seqlen, BM, T)
        row_scale = 1.0
        if HAS_MASK:
            row_scale = tl.load(mask_ptr + b * sm_b + h * sm_h, mask=ok, other=0.0).to(tl.float32)
        dc, act = _grad_pre_activation(
            dy_ptr, u_ptr, gate_in_ptr, gate_out_ptr, k_row, b * sdy_b + h * sdy_h, u_row, gi_row,
            b * sgo_b + h * sgo_h, row_scale, t, ok, d, seqlen, kernel_len, sdy_l, su_l, sgi_l, sgo_l,
            sk_l, f0_hi, f0_lo, f1_hi, f1_lo, f2_hi, f2_lo, HAS_GATE_IN, HAS_GATE_OUT, GELU, A_SPLIT,
            NC, T, PRECISION, HOISTED)
        tl.store(ring + (end % 2) * (BM * T) + rows * T + in_block, dc)

    for i in range(0, end - first):
        tile = end - 1 - i
        b, ok, t, u_row, gi_row, out_row = _tile_rows(tile, nblocks, total_blocks, h, su_b, su_h,
                                                      sgi_b, sgi_h, channels, seqlen, BM, T)
        flat = tile * BM + tl.arange(0, BM)
        t_first = ((flat - (flat // nblocks) * nblocks) * T)[:, None]  # the rows' block starts
        dy_row = b * sdy_b + h * sdy_h
        row_scale = 1.0
        if HAS_MASK:
            row_scale = tl.load(mask_ptr + b * sm_b + h * sm_h, mask=ok, other=0.0).to(tl.float32)
        u_now = _load_row(u_ptr, u_row, t, ok, seqlen, su_l)
        x_now = u_now
        if HAS_GATE_IN:
            gate_now = _load_row(gate_in_ptr, gi_row, t, ok, seqlen, sgi_l)
            x_now = u_now * gate_now
        ring_base = (tile % 2) * (BM * T)
        if RECOMPUTE:
            tl.debug_barrier()  # the previous tile's window reads are done: its slot is reused
            dc, act = _grad_pre_activation(
                dy_ptr, u_ptr, gate_in_ptr, gate_out_ptr, k_row, dy_row, u_row, gi_row,
                b * sgo_b + h * sgo_h, row_scale, t, ok, d, seqlen, kernel_len, sdy_l, su_l, sgi_l,
                sgo_l, sk_l, f0_hi, f0_lo, f1_hi, f1_lo, f2_hi, f2_lo, HAS_GATE_IN, HAS_GATE_OUT,
                GELU, A_SPLIT, NC, T, PRECISION, HOISTED)
            if HAS_GATE_OUT:
                tl.store(dgate_out_ptr + out_row + t, act.to(dgate_out_ptr.dtype.element_ty),
                         mask=ok & (t < seqlen))
            tl.store(ring + ring_base + rows * T + in_block, dc)
            tl.debug_barrier()  # every thread's dc is in the ring before any window reads it
        win = _dc_at(dy_ptr, ring, dy_row, ring_base, rows, cols, t_first, ok, seqlen, sdy_l,
                     RING, T, RECOMPUTE)
        probe = tl.sum(tl.sum(win * 0.0, axis=1), axis=0)  # NaN iff a value is NaN or Inf
        w_hi, w_lo = _split(win, WIN_SPLIT, PRECISION)
        dx = _mma_split(tl.zeros((BM, T), dtype=tl.float32), w_hi, w_lo, b_hi, b_lo, WIN_SPLIT, True,
                        PRECISION)
        xs = x_now
        if MASK_AFTER:
            xs = x_now * row_scale
        xt_hi, xt_lo = _split(tl.trans(xs), X_SPLIT, PRECISION)
        g = _mma_split(g, xt_hi, xt_lo, w_hi, w_lo, X_SPLIT, WIN_SPLIT, PRECISION)
        # A non-finite dc: the window product would spread it over the row; the direct
        # correlation keeps it to du[t - Lk + 1 .. t] (a loop of 0 or Lk steps, as in _causal_conv).
        not_finite = probe != 0.0
        dx = tl.where(not_finite, 0.0, dx)
        for j in range(0, tl.where(not_finite, kernel_len, 0)):
            tap = tl.load(k_row + j * sk_l).to(tl.float32) + tl.where(j == 0, d, 0.0)
            dx += tap * _dc_at(dy_ptr, ring, dy_row, ring_base, rows, in_block + j, t_first, ok,
                               seqlen, sdy_l, RING, T, RECOMPUTE)
        if MASK_AFTER:
            dx *= row_scale
        if HAS_GATE_IN:
            tl.store(dgate_in_ptr + out_row + t, (dx * u_now).to(dgate_in_ptr.dtype.element_ty),
                     mask=ok & (t < seqlen))
            dx *= gate_now
        tl.store(du_ptr + out_row + t, dx.to(du_ptr.dtype.element_ty), mask=ok & (t < seqlen))

    tl.store(g_part_ptr + (h * groups + group) * (T * W) + tl.arange(0, T)[:, None] * W + cols, g)
    # Every thread's partials are written before this program reports (and, if it is the last
    # of its channel, before it reads them back).
    tl.debug_barrier()
    is_last = True
    if SPLIT_CHANNEL:
        # acq_rel: the release publishes this program's partials; the last arrival's acquire
        # makes every other program's partials visible to it.
        is_last = tl.atomic_add(arrivals_ptr + h, 1, sem="acq_rel") == groups - 1
    if is_last:
        _reduce_channel(g_part_ptr, dk_ptr, dd_ptr, h, groups, kernel_len, sdk_h, sdk_l,
                        HAS_D, T, W, LAGS)


@triton.jit
def _reduce_channel(g_part_ptr, dk_ptr, dd_ptr, h, groups, kernel_len, sdk_h, sdk_l,
                    HAS_D: tl.constexpr, T: tl.constexpr, W: tl.constexpr, LAGS: tl.constexpr):
    """dk[h, j] = sum over programs (in order) of the diagonal s' - s = j of their G; dD = dk[0]."""
    CHUNK: tl.constexpr = 64 if LAGS > 64 else LAGS
    s = tl.arange(0, T)[:, None]
    for j0 in tl.static_range(0, LAGS, CHUNK):
        j = j0 + tl.arange(0, CHUNK)[None, :]
        ok = (j < kernel_len) & (s + j < W)
        dk = tl.zeros((CHUNK,), dtype=tl.float32)
        for grp in range(0, groups):
            part = g_part_ptr + (h * groups + grp) * (T * W)
            # .cg: other programs wrote these; read them from L2, never a stale L1 line.
            dk += tl.sum(tl.load(part + s * W + s + j, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
        jj = j0 + tl.arange(0, CHUNK)
        tl.store(dk_ptr + h * sdk_h + jj * sdk_l, dk.to(dk_ptr.dtype.element_ty), mask=jj < kernel_len)
        if HAS_D and j0 == 0:  # sum_t dc x over all times: the lag-0 term of dk
            tl.store(dd_ptr + h, tl.sum(tl.where(jj == 0, dk, 0.0), axis=0).to(dd_ptr.dtype.element_ty))


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
    launch: Callable = launch_kernel,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel (one launch); returns (du, dk, dD, dgate_in, dgate_out)."""
    batch, channels, seqlen = u.shape
    kernel_len = k.shape[-1]
    recompute = gelu or gate_out is not None
    cfg = _launch_config(u, kernel_len, True, tuning, recompute=recompute)
    T, W, BM = cfg.block, cfg.window, cfg.rows
    du = alloc(u.shape, dtype=u.dtype, device=u.device)
    dk = alloc(k.shape, dtype=k.dtype, device=u.device)
    dD = alloc(D.shape, dtype=D.dtype, device=u.device) if D is not None else None
    dgate_in = alloc(u.shape, dtype=gate_in.dtype, device=u.device) if gate_in is not None else None
    dgate_out = alloc(u.shape, dtype=gate_out.dtype, device=u.device) if gate_out is not None else None
    # Workspaces: every program writes all of its slice before anything reads it.
    g_part = torch.empty(channels * cfg.groups * T * W, dtype=torch.float32, device=u.device)
    dc_ring = torch.empty(channels * cfg.groups * 2 * BM * T, dtype=torch.float32, device=u.device) \
        if recompute else None
    # The arrival counters must start at zero: a fresh zeroed workspace per call (a memset), so
    # concurrent calls on other streams never share one. One program per channel needs none.
    split_channel = cfg.groups > 1
    arrivals = torch.zeros(channels, dtype=torch.int32, device=u.device) if split_channel else None
    launch(
        _shortconv_bwd_kernel, (channels, cfg.groups),
        grad_y, u, k, D, gate_in, gate_out, dropout_mask,
        du, dk, dD, dgate_in, dgate_out, g_part, dc_ring, arrivals,
        batch, channels, seqlen, kernel_len, cfg.nblocks, cfg.tiles, cfg.groups,
        triton.cdiv(cfg.tiles, cfg.groups),
        *grad_y.stride(), *u.stride(), *k.stride(), *strides(gate_in, 3), *strides(gate_out, 3),
        *strides(dropout_mask, 2), *dk.stride(),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        T=T, BM=BM, W=W, NC=cfg.context_blocks, LAGS=cfg.lags,
        A_SPLIT=not (u.dtype == torch.bfloat16 and gate_in is None),
        DY_SPLIT=grad_y.dtype != torch.bfloat16, PRECISION=cfg.precision,
        SPLIT_CHANNEL=split_channel,
        num_warps=cfg.num_warps, num_stages=1,
    )
    return du, dk, dD, dgate_in, dgate_out
