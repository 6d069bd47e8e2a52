"""FlashConv v6 (Gluon, Hopper): ``lcconv::fftconv`` forward and backward for half inputs as the
two-stage Monarch FFT of :mod:`.monarch_plan` (N = 128 x N2), every stage a 64-row warpgroup
product (wgmma) with float16 operands and float32 accumulators. Forward: 513..4096 samples;
backward: 513..2048 (its spectra in float32 do not fit shared memory at 4096).

Forward: one persistent program per SM slot walks a contiguous range of items (a channel's row
pair), so consecutive items share a channel: k's spectrum (D folded into k at lag 0) is made
once per channel the program meets and kept in shared memory as float32. Per item the two rows
(times gate_in), copied in by cp.async while the previous item computed, are scaled per row by a
power of two to max |x| <= 1 and rounded to float16 as one complex tile; S1 (left product with
the F1 tile) -> twiddle -> S2 (right product, operand in registers) -> times K -> S2' -> twiddle
run for both row chunks stage by stage and leave G in shared memory; S1' (left product with the
transposed F1 tile) gives both rows' causal outputs; the epilogue applies GELU, the dropout mask
and gate_out and stores y in u's dtype. Backward: one program owns whole channels; per pair it
recomputes the pre-activation where GELU or gate_out needs it, transforms dc (rows scaled so the
two rows' scale products match) and accumulates k's gradient spectrum DC conj(X) in shared
memory, and gets du through conj(K); per channel one inverse gives dk (fixed order: bit-identical
runs). A row holding a NaN or Inf is transformed as zeros and output NaN, never reaching its
packed partner.

Status: passes its device tests on the H100 (tests/test_kernels_monarch_conv.py); forward
1.13-1.48x v5. The family's backward (:func:`fftconv_bwd`) runs v5's kernels, measured faster than
the Gluon backward here (:func:`gluon_fftconv_bwd`, kept tested and measured). kernels.FAMILIES
holds the family only with LCCONV_FLASHCONV6=1 (benchmarks/NOTES.md, "FlashConv v6"). Registers and
spills are checked on CPU with scripts/compile_check.py --family v6 [--backward]. Compiled graphs
cannot launch Gluon kernels on torch 2.11/2.13 (:func:`compiler_visible`: the CUDA lowering stage
keeps the forward's op call). :class:`Tuning` says how the forward runs a plan; its ``probe``
variants skip stages to measure what bounds the kernel (benchmarks only). Knows torch, Triton and
Gluon only; the math is tested on CPU through :func:`.monarch_plan.emulate_forward` /
``emulate_backward``, which this kernel must match stage for stage.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Optional

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait

from . import blockfft_conv
from .common import offsets_fit_int32, sm_count, strides
from .launch import launch
from .monarch_plan import MonarchPlan, dft_factor, plan_for

__all__ = ["supports", "forward_supported", "backward_supported", "fftconv_fwd", "fftconv_bwd", "gluon_fftconv_bwd",
           "compiler_visible", "kernel_config", "INPUT_DTYPES", "Tuning"]

INPUT_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SHARED_LIMIT = 227 * 1024  # per SM on the H100
# The backward's warps per N2 (it holds more at once than the forward: 8 everywhere); the
# forward's are in FORWARD_TUNING.
BACKWARD_WARPS = {16: 8, 32: 8}


def num_warps(plan: MonarchPlan, backward: bool = False) -> int:
    return BACKWARD_WARPS[plan.n2] if backward else forward_tuning(plan).warps


@dataclasses.dataclass(frozen=True)
class Tuning:
    """How the forward runs one plan: warps, resident programs per SM (the persistent grid),
    K's spectrum in float16 (``k_half``: half its shared memory), the -Im F1 constant tile
    (``f1_neg``; without it a subtraction in registers, 16 KB less shared memory), both row
    chunks stage by stage (``both_chunks``: 6 waits per pair; else one chunk after the other, 11
    waits and half the live registers; see :func:`both_chunks`), and ``probe``,
    a measurement variant that skips work (:data:`PROBES`: wrong results, benchmarks only)."""
    warps: int
    programs_per_sm: int
    k_half: bool = False
    f1_neg: bool = True
    both_chunks: bool = True
    probe: int = 0


# What each probe skips (benchmarks/explore_monarch_conv.py times them beside the full kernel).
PROBES = {0: "full", 1: "loads, scales, stores only", 2: "forward stages and times K, no inverse",
          3: "no twiddles", 4: "no kernel spectrum"}


def forward_tuning(plan: MonarchPlan) -> Tuning:
    """The dispatched forward's settings for ``plan``."""
    return FORWARD_TUNING[plan.n2]


FORWARD_TUNING = {16: Tuning(warps=4, programs_per_sm=2), 32: Tuning(warps=8, programs_per_sm=1),
                  64: Tuning(warps=8, programs_per_sm=1)}
# Tunings measured against FORWARD_TUNING (benchmarks/explore_monarch_conv.py; the GPU tests check
# each): more programs per SM where K in float16 and no -Im F1 tile free the shared memory
# (compile_check, every option: 1K 65 KB / 156 registers -> 3 per SM; 2K with 4 warps 100 KB / 175
# registers chunk by chunk, 255 + 4 B of spills both chunks -> 2 per SM).
CANDIDATE_TUNINGS = {
    16: (Tuning(4, 3, k_half=True, f1_neg=False), Tuning(4, 3, k_half=True, f1_neg=False, both_chunks=False)),
    32: (Tuning(4, 2, k_half=True, f1_neg=False, both_chunks=False), Tuning(4, 2, k_half=True, f1_neg=False),
         Tuning(8, 1, k_half=True, f1_neg=False)),
    64: (Tuning(8, 1, k_half=True, f1_neg=False),),
}


def both_chunks(plan: MonarchPlan, staging: bool, tuning: Optional["Tuning"] = None) -> bool:
    """The tuning's both_chunks, except at N2 = 64 with plain loads (L or strides not multiples
    of 16), where the row tiles' per-element addresses push it to 255 registers + 84 B of spills."""
    return (tuning or forward_tuning(plan)).both_chunks and (staging or plan.n2 < 64)


# Compiled graphs cannot launch Gluon kernels themselves on torch 2.11 or 2.13: torch's mutation
# analysis and Inductor's code generation compile user kernels as plain Triton
# (scripts/probe_gluon_triton_op.py). The CUDA lowering stage leaves this family's forward op call;
# its backward runs v5's Triton kernels (BACKWARD_IS_V5), which compiled code launches itself.
def compiler_visible(direction: str) -> bool:
    """Whether compiled code can launch this family's kernels for ``direction`` ("forward" or
    "backward"); where not, the CUDA lowering stage keeps the op call (event ``opaque_family``)."""
    return direction == "backward" and BACKWARD_IS_V5


# The family's backward: v5's kernels (blockfft_conv), measured faster than v6's own Gluon backward
# at every length both have (H100, d6d1dfb: 1K 0.158 vs 0.264 ms, 2K 0.374 vs 0.398;
# benchmarks/NOTES.md, "FlashConv v6"); v6's own has no plan at 4K. gluon_fftconv_bwd stays
# tested and measured beside it (tests/test_kernels_monarch_conv.py, explore_monarch_conv.py).
BACKWARD_IS_V5 = True


def supports(u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether this family computes the call in both directions: the forward here
    (:func:`forward_supported`: a Hopper GPU, half u, L 513..4096, k no longer than u) and the
    backward by v5's kernels (``blockfft_conv.supports``)."""
    return forward_supported(u, k) and (blockfft_conv.supports(u, k) if BACKWARD_IS_V5
                                        else backward_supported(u.shape[-1]))


def forward_supported(u: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        u.is_cuda
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(u.device)[0] == 9
        and u.dtype in INPUT_DTYPES
        and k.dtype in KERNEL_DTYPES
        and plan_for(u.shape[-1]) is not None
        and k.shape[-1] <= u.shape[-1]
        and offsets_fit_int32(u.numel(), k.numel())
    )


# ------------------------------------------------------------------------------ layouts --
@functools.lru_cache(maxsize=None)
def kernel_config(plan: MonarchPlan, backward: bool = False, warps: Optional[int] = None) -> dict:
    """The constexpr layouts of one plan: MMA (accumulators, [64, N2]), DOT (registers as a
    left operand), BLK (coalesced loads and stores of [64, N2] tiles, N2 contiguous), and the
    shared layouts of the float16 operand tiles and the spectrum. Cached: callers must not
    change the dict."""
    n2 = plan.n2
    warps = warps or num_warps(plan, backward)
    # 8 warps split the columns over two warpgroups (each holds half of every accumulator)
    mma = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, warps // 4], instr_shape=[16, n2 * 4 // warps, 16])
    # 16-byte loads of half values where each thread has 8 elements or more; fewer (8 warps at
    # N2 = 16) get narrower vectors rather than rows replicated over the warps
    vec = min(8, 64 * n2 // (32 * warps))
    cols = n2 // vec
    blk = gl.BlockedLayout(size_per_thread=[1, vec], threads_per_warp=[32 // cols, cols],
                           warps_per_cta=[warps, 1], order=[1, 0])
    return dict(
        MMA=mma,
        DOT=gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2),
        BLK=blk,
        F1_SMEM=gl.NVMMASharedLayout.get_default_for([plan.n1, plan.half], gl.float16),
        F2_SMEM=gl.NVMMASharedLayout.get_default_for([n2, n2], gl.float16),
        X_SMEM=gl.NVMMASharedLayout.get_default_for([plan.half, n2], gl.float16),
        G_SMEM=gl.NVMMASharedLayout.get_default_for([plan.n1, n2], gl.float16),
        K_SMEM=gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]),
    )


# ------------------------------------------------------------------------------ stages --
@gluon.jit
def _tile_index(N2: gl.constexpr, BLK: gl.constexpr):
    """[64, N2] sample indices of a row tile: element (n1, n2) is sample n1 N2 + n2."""
    r = gl.arange(0, 64, layout=gl.SliceLayout(1, BLK))
    c = gl.arange(0, N2, layout=gl.SliceLayout(0, BLK))
    return r[:, None] * N2 + c[None, :]


@gluon.jit
def _load_tile(ptr, offset, valid, seqlen, stride_l, N2: gl.constexpr, BLK: gl.constexpr):
    """[64, N2] float32 tile of one row (see _tile_index), 0 past seqlen."""
    n = _tile_index(N2, BLK)
    return gl.load(ptr + offset + n * stride_l, mask=(n < seqlen) & valid, other=0.0).to(gl.float32)


@gluon.jit
def _store_tile(ptr, offset, valid, seqlen, stride_l, value, N2: gl.constexpr, BLK: gl.constexpr):
    """Store a [64, N2] row tile in ptr's dtype, samples before seqlen only."""
    n = _tile_index(N2, BLK)
    gl.store(ptr + offset + n * stride_l, value.to(ptr.dtype.element_ty), mask=(n < seqlen) & valid)


@gluon.jit
def _row_scale(x):
    """2^-ceil(log2(max |x|)): an exact scale to max |x| <= 1; 0 for an all-zero tile, whose
    row is then multiplied by 0 at the end (its partner's rounding never leaks into it)."""
    m = gl.max(gl.max(gl.abs(x), axis=1), axis=0)
    return gl.exp2(-gl.ceil(gl.log2(gl.maximum(m, 1e-30)))) * (m > 0).to(gl.float32)


@gluon.jit
def _isolate_nonfinite(x):
    """(x, or zeros if x holds a NaN or Inf; NaN in that case, else 0): as monarch_plan's
    isolate_nonfinite, so a non-finite row never reaches its packed partner."""
    bad = gl.max(gl.max(gl.where(gl.abs(x) < float("inf"), 0.0, 1.0), axis=1), axis=0)
    return gl.where(bad > 0, 0.0, x), gl.where(bad > 0, float("nan"), 0.0).to(gl.float32)


@gluon.jit
def _output_scale(sqrt_n, row_scale, k_scale):
    """sqrt(N) / (s_row s_k), 0 where the row or k was all zero (scale 0)."""
    both = row_scale * k_scale
    return sqrt_n / gl.maximum(both, 1e-30) * (both > 0).to(gl.float32)


@gluon.jit
def _twiddle(c: gl.constexpr, N: gl.constexpr, N2: gl.constexpr, MMA: gl.constexpr):
    """cos and sin of w_N^(f1 n2) for f1 in row chunk c, as monarch_plan.twiddle_angles: the
    exponent reduced to [-N/2, N/2) in integers, then the SFU's approximations (|error| < 1e-6
    on [-pi, pi]; libdevice's accurate ones keep a local-memory slow path: 296 B of spills)."""
    f1 = c * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, MMA))
    # An opaque copy (not pure, so never hoisted): the twiddles are loop-invariant, and hoisted
    # out of the item loop they held 4 [64, N2] float32 tiles in registers (spills at N2 >= 32).
    f1 = gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [f1], dtype=gl.int32, is_pure=False, pack=1)
    n2 = gl.arange(0, N2, layout=gl.SliceLayout(0, MMA))
    e = (f1[:, None] * n2[None, :]) & (N - 1)
    e = gl.where(e >= N // 2, e - N, e)
    angle = e.to(gl.float32) * (-2.0 * 3.141592653589793 / N)
    cos = gl.inline_asm_elementwise("cos.approx.f32 $0, $1;", "=r,r", [angle], dtype=gl.float32, is_pure=True, pack=1)
    sin = gl.inline_asm_elementwise("sin.approx.f32 $0, $1;", "=r,r", [angle], dtype=gl.float32, is_pure=True, pack=1)
    return cos, sin


@gluon.jit
def _s1_issue(c: gl.constexpr, xr_s, xi_s, f1r_s, f1i_s, f1n_s, zero, HAS_IMAG: gl.constexpr, F1_NEG: gl.constexpr):
    """S1 for f1 in row chunk c, issued (not waited): B = F1[chunk, n1 < 64] X, as (re, im, t):
    re - t is B's real part. With the -Im F1 tile (f1n_s) t is 0 (the product accumulates
    -Im F1 Im X into re); without it (F1_NEG False: 16 KB of shared memory less) t = Im F1 Im X in
    a third accumulator, subtracted after the wait by :func:`_s1_done`."""
    a_r = f1r_s.slice(c * 64, 64)
    br = warpgroup_mma(a_r, xr_s, zero, use_acc=False, is_async=True)
    bi = warpgroup_mma(f1i_s.slice(c * 64, 64), xr_s, zero, use_acc=False, is_async=True)
    t = zero
    if HAS_IMAG:
        if not F1_NEG:
            t = warpgroup_mma(f1i_s.slice(c * 64, 64), xi_s, zero, use_acc=False, is_async=True)
        else:
            br = warpgroup_mma(f1n_s.slice(c * 64, 64), xi_s, br, is_async=True)
        bi = warpgroup_mma(a_r, xi_s, bi, is_async=True)
    return br, bi, t


@gluon.jit
def _s1_done(br, bi, t, HAS_IMAG: gl.constexpr, F1_NEG: gl.constexpr):
    """B's (re, im) from :func:`_s1_issue`'s waited results."""
    if HAS_IMAG:
        if not F1_NEG:
            br = br - t
    return br, bi


@gluon.jit
def _twiddled(xr, xi, c: gl.constexpr, CONJ: gl.constexpr, N: gl.constexpr, N2: gl.constexpr,
              MMA: gl.constexpr):
    """(xr + i xi) times w_N^(f1 n2) (or its conjugate) for row chunk c."""
    tr, ti = _twiddle(c, N, N2, MMA)
    if CONJ:
        return xr * tr + xi * ti, xi * tr - xr * ti
    else:
        return xr * tr - xi * ti, xr * ti + xi * tr


@gluon.jit
def _operands(xr, xi, DOT: gl.constexpr):
    """Register left operands (float16), re and im (signs live in the F2 tiles: -Im F2 is a
    third constant tile, which keeps a third register operand per chunk out of registers)."""
    return gl.convert_layout(xr.to(gl.float16), DOT), gl.convert_layout(xi.to(gl.float16), DOT)


@gluon.jit
def _right_product_issue(op_r, op_i, m_re, m_im, m_neg_im, zero):
    """(op_r + i op_i) M, issued (not waited), M's parts as shared tiles: S2 passes F2's
    (re, im, -im), S2' conj(F2)'s, i.e. (re, -im, im)."""
    re = warpgroup_mma(op_r, m_re, zero, use_acc=False, is_async=True)
    re = warpgroup_mma(op_i, m_neg_im, re, is_async=True)
    im = warpgroup_mma(op_r, m_im, zero, use_acc=False, is_async=True)
    im = warpgroup_mma(op_i, m_re, im, is_async=True)
    return re, im


@gluon.jit
def _forward(xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, HAS_IMAG: gl.constexpr, N: gl.constexpr,
             N2: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, TWIDDLE: gl.constexpr = True,
             F1_NEG: gl.constexpr = True):
    """S1, T1, S2 for both row chunks, stage by stage (one wait per stage, 8 products in flight):
    C[f1, f2] (float32, MMA layout) of the tile in xr_s/xi_s, as (chunk 0 re, im, chunk 1 re, im).
    TWIDDLE False skips T1 (a measurement probe: wrong results)."""
    zero = gl.zeros([64, N2], gl.float32, MMA)
    b0r, b0i, t0 = _s1_issue(0, xr_s, xi_s, f1r_s, f1i_s, f1n_s, zero, HAS_IMAG, F1_NEG)
    b1r, b1i, t1 = _s1_issue(1, xr_s, xi_s, f1r_s, f1i_s, f1n_s, zero, HAS_IMAG, F1_NEG)
    b0r, b0i, t0, b1r, b1i, t1 = warpgroup_mma_wait(0, deps=[b0r, b0i, t0, b1r, b1i, t1])
    b0r, b0i = _s1_done(b0r, b0i, t0, HAS_IMAG, F1_NEG)
    b1r, b1i = _s1_done(b1r, b1i, t1, HAS_IMAG, F1_NEG)
    if TWIDDLE:
        b0r, b0i = _twiddled(b0r, b0i, 0, False, N, N2, MMA)
        b1r, b1i = _twiddled(b1r, b1i, 1, False, N, N2, MMA)
    o0r, o0i = _operands(b0r, b0i, DOT)
    o1r, o1i = _operands(b1r, b1i, DOT)
    c0r, c0i = _right_product_issue(o0r, o0i, f2r_s, f2i_s, f2n_s, zero)
    c1r, c1i = _right_product_issue(o1r, o1i, f2r_s, f2i_s, f2n_s, zero)
    return warpgroup_mma_wait(0, deps=[c0r, c0i, c1r, c1i])


@gluon.jit
def _forward_one(c: gl.constexpr, xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, HAS_IMAG: gl.constexpr,
                 N: gl.constexpr, N2: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, F1_NEG: gl.constexpr = True):
    """S1, T1, S2 for row chunk c alone (half the live registers of :func:`_forward`)."""
    zero = gl.zeros([64, N2], gl.float32, MMA)
    br, bi, t = _s1_issue(c, xr_s, xi_s, f1r_s, f1i_s, f1n_s, zero, HAS_IMAG, F1_NEG)
    br, bi, t = warpgroup_mma_wait(0, deps=[br, bi, t])
    br, bi = _s1_done(br, bi, t, HAS_IMAG, F1_NEG)
    br, bi = _twiddled(br, bi, c, False, N, N2, MMA)
    o_r, o_i = _operands(br, bi, DOT)
    cr, ci = _right_product_issue(o_r, o_i, f2r_s, f2i_s, f2n_s, zero)
    return warpgroup_mma_wait(0, deps=[cr, ci])


@gluon.jit
def _inverse_one(cr, ci, c: gl.constexpr, kr_s, ki_s, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, CONJ_K: gl.constexpr,
                 N: gl.constexpr, N2: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr):
    """Times K (or conj K: a correlation), S2', T2 for row chunk c; G's rows into gr_s/gi_s."""
    er, ei = _times_spectrum(cr, ci, kr_s, ki_s, c, CONJ_K, MMA)
    _inverse_rows(er, ei, c, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, N, N2, MMA, DOT)


@gluon.jit
def _inverse_rows(er, ei, c: gl.constexpr, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, N: gl.constexpr,
                  N2: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr):
    """S2', T2 of spectrum rows E (row chunk c, registers); G's rows into gr_s/gi_s (float16)."""
    o_r, o_i = _operands(er, ei, DOT)
    gr, gi = _right_product_issue(o_r, o_i, f2r_s, f2n_s, f2i_s, zero)
    gr, gi = warpgroup_mma_wait(0, deps=[gr, gi])
    _store_g(gr, gi, c, gr_s, gi_s, N, N2, MMA)


@gluon.jit
def _store_g(gr, gi, c: gl.constexpr, gr_s, gi_s, N: gl.constexpr, N2: gl.constexpr, MMA: gl.constexpr,
             TWIDDLE: gl.constexpr = True):
    """T2 (the conjugate twiddle) on S2' rows of chunk c, then G's rows into gr_s/gi_s (float16)."""
    if TWIDDLE:
        gr, gi = _twiddled(gr, gi, c, True, N, N2, MMA)
    gr_s.slice(c * 64, 64).store(gr.to(gl.float16))
    gi_s.slice(c * 64, 64).store(gi.to(gl.float16))


@gluon.jit
def _inverse_both(c0r, c0i, c1r, c1i, kr_s, ki_s, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, N: gl.constexpr,
                  N2: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, TWIDDLE: gl.constexpr = True):
    """Times K, S2', T2 for both row chunks stage by stage (one wait, as :func:`_forward`)."""
    e0r, e0i = _times_spectrum(c0r, c0i, kr_s, ki_s, 0, False, MMA)
    e1r, e1i = _times_spectrum(c1r, c1i, kr_s, ki_s, 1, False, MMA)
    o0r, o0i = _operands(e0r, e0i, DOT)
    o1r, o1i = _operands(e1r, e1i, DOT)
    g0r, g0i = _right_product_issue(o0r, o0i, f2r_s, f2n_s, f2i_s, zero)
    g1r, g1i = _right_product_issue(o1r, o1i, f2r_s, f2n_s, f2i_s, zero)
    g0r, g0i, g1r, g1i = warpgroup_mma_wait(0, deps=[g0r, g0i, g1r, g1i])
    _store_g(g0r, g0i, 0, gr_s, gi_s, N, N2, MMA, TWIDDLE)
    _store_g(g1r, g1i, 1, gr_s, gi_s, N, N2, MMA, TWIDDLE)


@gluon.jit
def _s1_inverse(gr_s, gi_s, f1r_s, f1i_s, f1n_s, zero, F1_NEG: gl.constexpr = True):
    """S1': Y[n1 < 64, n2] = conj(F1)[n1, f1] G[f1, n2] (F1's tile read transposed), waited.
    Without the -Im F1 tile (F1_NEG False) Im F1^T Re G goes to a third accumulator, subtracted."""
    fence_async_shared()
    yr = warpgroup_mma(f1r_s.permute((1, 0)), gr_s, zero, use_acc=False, is_async=True)
    yr = warpgroup_mma(f1i_s.permute((1, 0)), gi_s, yr, is_async=True)
    yi = warpgroup_mma(f1r_s.permute((1, 0)), gi_s, zero, use_acc=False, is_async=True)
    if not F1_NEG:
        t = warpgroup_mma(f1i_s.permute((1, 0)), gr_s, zero, use_acc=False, is_async=True)
        yr, yi, t = warpgroup_mma_wait(0, deps=[yr, yi, t])
        return yr, yi - t
    else:
        yi = warpgroup_mma(f1n_s.permute((1, 0)), gr_s, yi, is_async=True)
        return warpgroup_mma_wait(0, deps=[yr, yi])


@gluon.jit
def _times_spectrum(cr, ci, kr_s, ki_s, c: gl.constexpr, CONJ_K: gl.constexpr, MMA: gl.constexpr):
    """E = C K (or C conj(K)) for row chunk c (K in shared memory, float32 or float16; one tile
    live at a time)."""
    kr = kr_s.slice(c * 64, 64).load(MMA).to(gl.float32)
    er = cr * kr
    ei = ci * kr
    ki = ki_s.slice(c * 64, 64).load(MMA).to(gl.float32)
    if CONJ_K:
        return er + ci * ki, ei - cr * ki
    else:
        return er - ci * ki, ei + cr * ki


@gluon.jit
def _kernel_spectrum(k_ptr, d_ptr, h, kernel_len, sk_h, sk_l, xr_s, xi_s, kr_s, ki_s,
                     f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, HAS_D: gl.constexpr, BOTH_CHUNKS: gl.constexpr,
                     N: gl.constexpr, N2: gl.constexpr, MMA: gl.constexpr, DOT: gl.constexpr, BLK: gl.constexpr,
                     F1_NEG: gl.constexpr = True):
    """K = transform of (k + D at lag 0), scaled, into kr_s/ki_s (float32); returns the scale."""
    kx = _load_tile(k_ptr, h * sk_h, True, kernel_len, sk_l, N2, BLK)
    if HAS_D:
        kx = gl.where(_tile_index(N2, BLK) == 0, kx + gl.load(d_ptr + h).to(gl.float32), kx)
    scale = _row_scale(kx)
    xr_s.store((kx * scale).to(gl.float16))
    fence_async_shared()
    if BOTH_CHUNKS:
        k0r, k0i, k1r, k1i = _forward(xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, False, N, N2, MMA, DOT,
                                      True, F1_NEG)
        kr_s.slice(0, 64).store(k0r.to(kr_s.dtype))
        ki_s.slice(0, 64).store(k0i.to(ki_s.dtype))
        kr_s.slice(64, 64).store(k1r.to(kr_s.dtype))
        ki_s.slice(64, 64).store(k1i.to(ki_s.dtype))
    else:
        for c in gl.static_range(2):
            kr, ki = _forward_one(c, xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, False, N, N2, MMA, DOT,
                                  F1_NEG)
            kr_s.slice(c * 64, 64).store(kr.to(kr_s.dtype))
            ki_s.slice(c * 64, 64).store(ki.to(ki_s.dtype))
    return scale


@gluon.jit
def _epilogue(yc, out_scale, y_ptr, gout_ptr, mask_ptr, b, h, valid, seqlen,
              sy_b, sy_h, sy_l, sg_b, sg_h, sg_l, sm_b, sm_h,
              HAS_GATE_OUT: gl.constexpr, GELU: gl.constexpr, HAS_MASK: gl.constexpr,
              N2: gl.constexpr, BLK: gl.constexpr):
    """One row's output: scale, GELU, dropout mask, gate_out; stored in y's dtype."""
    a = _rows(yc, out_scale, BLK)
    if GELU:
        a = _gelu(a)
    if HAS_MASK:
        a = a * gl.load(mask_ptr + b * sm_b + h * sm_h, mask=valid, other=0.0).to(gl.float32)
    if HAS_GATE_OUT:
        a = a * _load_tile(gout_ptr, b * sg_b + h * sg_h, valid, seqlen, sg_l, N2, BLK)
    _store_tile(y_ptr, b * sy_b + h * sy_h, valid, seqlen, sy_l, a, N2, BLK)


@gluon.jit
def _item_rows(it, pairs_per_channel, batch):
    """Channel and batch rows of item ``it`` (a channel's row pair): h, b_a, b_b, b_b valid."""
    h = it // pairs_per_channel
    b_a = 2 * (it - h * pairs_per_channel)
    return h, b_a, b_a + 1, b_a + 1 < batch


@gluon.jit
def _stage_rows(dst_a, dst_b, ptr, it, end, pairs_per_channel, batch, seqlen, s_b, s_h, s_l,
                N2: gl.constexpr, BLK: gl.constexpr):
    """Start asynchronous copies (cp.async) of item ``it``'s two rows into shared memory, zeros
    past seqlen, past the batch and for it >= end (nothing to stage after the last item)."""
    h, b_a, b_b, valid_b = _item_rows(it, pairs_per_channel, batch)
    n = _tile_index(N2, BLK)
    live = (n < seqlen) & (it < end)
    async_copy.async_copy_global_to_shared(dst_a, ptr + b_a * s_b + h * s_h + n * s_l, mask=live)
    async_copy.async_copy_global_to_shared(dst_b, ptr + b_b * s_b + h * s_h + n * s_l, mask=live & valid_b)


@gluon.jit
def _copy_to_shared(ptr, ROWS: gl.constexpr, COLS: gl.constexpr, LAYOUT: gl.constexpr, BLK: gl.constexpr):
    """A constant float16 tile into shared memory ([1, ROWS, COLS]: see _opaque_zero) by cp.async;
    the caller waits for the copies."""
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, BLK))
    c = gl.arange(0, COLS, layout=gl.SliceLayout(0, BLK))
    tile = gl.allocate_shared_memory(gl.float16, [1, ROWS, COLS], LAYOUT)
    async_copy.async_copy_global_to_shared(tile.index(0), ptr + r[:, None] * COLS + c[None, :])
    return tile


@gluon.jit
def _opaque_zero(value):
    """0, computed where it is called by an instruction the compiler cannot move or fold."""
    return gl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,r", [value], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _operand_tiles(f1r_ptr, f1i_ptr, f1n_ptr, f2r_ptr, f2i_ptr, f2n_ptr, N2: gl.constexpr, F1_SMEM: gl.constexpr,
                   F2_SMEM: gl.constexpr, X_SMEM: gl.constexpr, G_SMEM: gl.constexpr, BLK: gl.constexpr,
                   F1_NEG: gl.constexpr = True):
    """The shared tensor-core operand tiles of a program, each [1, R, C] (see :func:`_views`): the
    constants F1[f1, n1 < 64] (re, im, and -im where F1_NEG, else im again, unused) and F2 (re, im, -im),
    float16, copied in once and waited for, then X (re, im) and G (re, im)."""
    f1r_b = _copy_to_shared(f1r_ptr, 128, 64, F1_SMEM, BLK)
    f1i_b = _copy_to_shared(f1i_ptr, 128, 64, F1_SMEM, BLK)
    f1n_b = _copy_to_shared(f1n_ptr, 128, 64, F1_SMEM, BLK) if F1_NEG else f1i_b  # unused without F1_NEG
    f2r_b = _copy_to_shared(f2r_ptr, N2, N2, F2_SMEM, BLK)
    f2i_b = _copy_to_shared(f2i_ptr, N2, N2, F2_SMEM, BLK)
    f2n_b = _copy_to_shared(f2n_ptr, N2, N2, F2_SMEM, BLK)
    async_copy.commit_group()
    async_copy.wait_group(0)
    gl.thread_barrier()
    xr_b = gl.allocate_shared_memory(gl.float16, [1, 64, N2], X_SMEM)
    xi_b = gl.allocate_shared_memory(gl.float16, [1, 64, N2], X_SMEM)
    gr_b = gl.allocate_shared_memory(gl.float16, [1, 128, N2], G_SMEM)
    gi_b = gl.allocate_shared_memory(gl.float16, [1, 128, N2], G_SMEM)
    return f1r_b, f1i_b, f1n_b, f2r_b, f2i_b, f2n_b, xr_b, xi_b, gr_b, gi_b


@gluon.jit
def _views(z, tiles):
    """2-D views of the operand tiles through ``z``, an opaque zero made in the loop that uses
    them (:func:`_opaque_zero`): the wgmma descriptors are then made where they are used. With
    plain 2-D tiles the compiler hoisted every descriptor out of the item loop and held them
    there (105 registers live into the loop, read off the SASS; 246 registers at 1K)."""
    f1r_b, f1i_b, f1n_b, f2r_b, f2i_b, f2n_b, xr_b, xi_b, gr_b, gi_b = tiles
    return (f1r_b.index(z), f1i_b.index(z), f1n_b.index(z), f2r_b.index(z), f2i_b.index(z), f2n_b.index(z),
            xr_b.index(z), xi_b.index(z), gr_b.index(z), gi_b.index(z))


# ------------------------------------------------------------------------------ kernel --
@gluon.jit
def _fwd_kernel(u_ptr, k_ptr, d_ptr, gin_ptr, gout_ptr, mask_ptr, y_ptr,
                f1r_ptr, f1i_ptr, f1n_ptr, f2r_ptr, f2i_ptr, f2n_ptr,
                batch, seqlen, kernel_len, items, pairs_per_channel, sqrt_n,
                su_b, su_h, su_l, sk_h, sk_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
                sy_b, sy_h, sy_l,
                HAS_D: gl.constexpr, HAS_GATE_IN: gl.constexpr, HAS_GATE_OUT: gl.constexpr,
                GELU: gl.constexpr, HAS_MASK: gl.constexpr,
                N: gl.constexpr, N2: gl.constexpr, BOTH_CHUNKS: gl.constexpr, ASYNC_STAGING: gl.constexpr,
                MMA: gl.constexpr, DOT: gl.constexpr, BLK: gl.constexpr, F1_SMEM: gl.constexpr,
                F2_SMEM: gl.constexpr, X_SMEM: gl.constexpr, G_SMEM: gl.constexpr, K_SMEM: gl.constexpr,
                K_HALF: gl.constexpr = False, F1_NEG: gl.constexpr = True, PROBE: gl.constexpr = 0):
    """The forward (module docstring). K_HALF keeps K in float16 (half its shared memory); F1_NEG
    False drops the -Im F1 tile (16 KB) for a subtraction in registers. PROBE != 0 skips work to
    measure what bounds the kernel (wrong results; benchmarks only, see PROBES)."""
    tiles = _operand_tiles(f1r_ptr, f1i_ptr, f1n_ptr, f2r_ptr, f2i_ptr, f2n_ptr, N2, F1_SMEM, F2_SMEM, X_SMEM, G_SMEM,
                           BLK, F1_NEG)
    if K_HALF:
        kr_s = gl.allocate_shared_memory(gl.float16, [128, N2], K_SMEM)
        ki_s = gl.allocate_shared_memory(gl.float16, [128, N2], K_SMEM)
    else:
        kr_s = gl.allocate_shared_memory(gl.float32, [128, N2], K_SMEM)
        ki_s = gl.allocate_shared_memory(gl.float32, [128, N2], K_SMEM)
    if ASYNC_STAGING:  # the next item's rows (and gate_in rows) land here while this item's stages run
        ua_s = gl.allocate_shared_memory(u_ptr.dtype.element_ty, [64, N2], K_SMEM)
        ub_s = gl.allocate_shared_memory(u_ptr.dtype.element_ty, [64, N2], K_SMEM)
        if HAS_GATE_IN:
            ga_s = gl.allocate_shared_memory(gin_ptr.dtype.element_ty, [64, N2], K_SMEM)
            gb_s = gl.allocate_shared_memory(gin_ptr.dtype.element_ty, [64, N2], K_SMEM)
    fence_async_shared()

    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    start = pid * items // programs
    end = (pid + 1) * items // programs
    if ASYNC_STAGING:
        _stage_rows(ua_s, ub_s, u_ptr, start, end, pairs_per_channel, batch, seqlen, su_b, su_h, su_l, N2, BLK)
        if HAS_GATE_IN:
            _stage_rows(ga_s, gb_s, gin_ptr, start, end, pairs_per_channel, batch, seqlen, sgi_b, sgi_h, sgi_l, N2,
                        BLK)
        async_copy.commit_group()
    channel = -1
    k_scale = 1.0
    zero = gl.zeros([64, N2], gl.float32, MMA)
    for it in range(start, end):
        f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, xr_s, xi_s, gr_s, gi_s = _views(_opaque_zero(it), tiles)
        h, b_a, b_b, valid_b = _item_rows(it, pairs_per_channel, batch)
        if PROBE != 1 and PROBE != 4:
            if h != channel:
                k_scale = _kernel_spectrum(k_ptr, d_ptr, h, kernel_len, sk_h, sk_l, xr_s, xi_s, kr_s, ki_s,
                                           f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, HAS_D, BOTH_CHUNKS, N, N2, MMA,
                                           DOT, BLK, F1_NEG)
                channel = h
        if ASYNC_STAGING:
            async_copy.wait_group(0)
            gl.thread_barrier()  # every thread's copies have landed
            xa = ua_s.load(BLK).to(gl.float32)
            xb = ub_s.load(BLK).to(gl.float32)
            if HAS_GATE_IN:
                xa = xa * ga_s.load(BLK).to(gl.float32)
                xb = xb * gb_s.load(BLK).to(gl.float32)
        else:  # rows not 16-byte aligned (cp.async moves 4 bytes or more): plain loads, no overlap
            xa = _load_tile(u_ptr, b_a * su_b + h * su_h, True, seqlen, su_l, N2, BLK)
            xb = _load_tile(u_ptr, b_b * su_b + h * su_h, valid_b, seqlen, su_l, N2, BLK)
            if HAS_GATE_IN:
                xa = xa * _load_tile(gin_ptr, b_a * sgi_b + h * sgi_h, True, seqlen, sgi_l, N2, BLK)
                xb = xb * _load_tile(gin_ptr, b_b * sgi_b + h * sgi_h, valid_b, seqlen, sgi_l, N2, BLK)
        xa, poison_a = _isolate_nonfinite(xa)
        xb, poison_b = _isolate_nonfinite(xb)
        sa = _row_scale(xa)
        sb = _row_scale(xb)
        xr_s.store((xa * sa).to(gl.float16))
        xi_s.store((xb * sb).to(gl.float16))
        if ASYNC_STAGING:
            gl.thread_barrier()  # the staging buffers are read: the next item's copies may start
            _stage_rows(ua_s, ub_s, u_ptr, it + 1, end, pairs_per_channel, batch, seqlen, su_b, su_h, su_l, N2, BLK)
            if HAS_GATE_IN:
                _stage_rows(ga_s, gb_s, gin_ptr, it + 1, end, pairs_per_channel, batch, seqlen, sgi_b, sgi_h, sgi_l,
                            N2, BLK)
            async_copy.commit_group()
        fence_async_shared()
        if PROBE == 1:  # loads, scales and stores only
            yr = gl.convert_layout(xa, MMA)
            yi = gl.convert_layout(xb, MMA)
        elif PROBE == 2:  # the forward stages and the product with K, no inverse stages
            c0r, c0i, c1r, c1i = _forward(xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, True, N, N2, MMA,
                                          DOT, True, F1_NEG)
            e0r, e0i = _times_spectrum(c0r, c0i, kr_s, ki_s, 0, False, MMA)
            e1r, e1i = _times_spectrum(c1r, c1i, kr_s, ki_s, 1, False, MMA)
            yr = e0r + e1r
            yi = e0i + e1i
        else:
            if BOTH_CHUNKS:  # stage by stage over both row chunks: one wait per stage
                c0r, c0i, c1r, c1i = _forward(xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, True, N, N2, MMA,
                                              DOT, PROBE != 3, F1_NEG)
                _inverse_both(c0r, c0i, c1r, c1i, kr_s, ki_s, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, N, N2, MMA, DOT,
                              PROBE != 3)
            else:  # one row chunk after the other: half the live registers
                for c in gl.static_range(2):
                    cr, ci = _forward_one(c, xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, True, N, N2, MMA,
                                          DOT, F1_NEG)
                    _inverse_one(cr, ci, c, kr_s, ki_s, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, False, N, N2, MMA,
                                 DOT)
            yr, yi = _s1_inverse(gr_s, gi_s, f1r_s, f1i_s, f1n_s, zero, F1_NEG)
        _epilogue(yr, _output_scale(sqrt_n, sa, k_scale) + poison_a, y_ptr, gout_ptr, mask_ptr, b_a, h, True, seqlen,
                  sy_b, sy_h, sy_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h, HAS_GATE_OUT, GELU, HAS_MASK, N2, BLK)
        _epilogue(yi, _output_scale(sqrt_n, sb, k_scale) + poison_b, y_ptr, gout_ptr, mask_ptr, b_b, h, valid_b, seqlen,
                  sy_b, sy_h, sy_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h, HAS_GATE_OUT, GELU, HAS_MASK, N2, BLK)
    if ASYNC_STAGING:
        async_copy.wait_group(0)  # no copy outlives the program (the last one stages nothing)


@gluon.jit
def _rows(y, scale, BLK: gl.constexpr):
    """An S1' result (MMA layout, element (n1, n2) = sample n1 N2 + n2) as a BLK tile times scale."""
    return gl.convert_layout(y, BLK) * scale


@gluon.jit
def _gelu(c):
    return 0.5 * c * (1.0 + gl.erf(c * 0.7071067811865476))


@gluon.jit
def _gelu_grad(c):
    return 0.5 * (1.0 + gl.erf(c * 0.7071067811865476)) + c * gl.exp(-0.5 * c * c) * 0.3989422804014327


@gluon.jit
def _matched_scales(sa, sb, oa, ob):
    """Scales of the two dc rows with equal products t_r s_r = q (monarch_plan.emulate_backward):
    q the smallest nonzero product of a row's own dc scale o_r and its x scale s_r (1 if none),
    t_r = q / s_r, or o_r where x's row is zero."""
    pa = oa * sa
    pb = ob * sb
    qa = gl.where(pa > 0, pa, 8.5e37)
    qb = gl.where(pb > 0, pb, 8.5e37)
    q = gl.minimum(qa, qb)
    q = gl.where(q < 8.5e37, q, 1.0)
    ta = gl.where(sa > 0, q / gl.maximum(sa, 1e-30), oa)
    tb = gl.where(sb > 0, q / gl.maximum(sb, 1e-30), ob)
    return q, ta, tb


@gluon.jit
def _bwd_kernel(dy_ptr, u_ptr, k_ptr, d_ptr, gin_ptr, gout_ptr, mask_ptr,
                du_ptr, dk_ptr, dd_ptr, dgin_ptr, dgout_ptr,
                f1r_ptr, f1i_ptr, f1n_ptr, f2r_ptr, f2i_ptr, f2n_ptr,
                batch, channels, seqlen, kernel_len, pairs_per_channel, sqrt_n,
                su_b, su_h, su_l, sk_h, sk_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
                sdy_b, sdy_h, sdy_l, sdk_h, sdk_l,
                HAS_D: gl.constexpr, HAS_GATE_IN: gl.constexpr, HAS_GATE_OUT: gl.constexpr,
                GELU: gl.constexpr, HAS_MASK: gl.constexpr, N: gl.constexpr, N2: gl.constexpr,
                MMA: gl.constexpr, DOT: gl.constexpr, BLK: gl.constexpr, F1_SMEM: gl.constexpr,
                F2_SMEM: gl.constexpr, X_SMEM: gl.constexpr, G_SMEM: gl.constexpr, K_SMEM: gl.constexpr):
    """The backward of monarch_plan.emulate_backward. One program owns whole channels (a
    contiguous range), so dk and dD are summed over a channel's pairs in batch order."""
    tiles = _operand_tiles(f1r_ptr, f1i_ptr, f1n_ptr, f2r_ptr, f2i_ptr, f2n_ptr, N2, F1_SMEM, F2_SMEM, X_SMEM, G_SMEM,
                           BLK)
    kr_s = gl.allocate_shared_memory(gl.float32, [128, N2], K_SMEM)
    ki_s = gl.allocate_shared_memory(gl.float32, [128, N2], K_SMEM)
    zr_s = gl.allocate_shared_memory(gl.float32, [128, N2], K_SMEM)  # X's spectrum (this pair)
    zi_s = gl.allocate_shared_memory(gl.float32, [128, N2], K_SMEM)
    sr_s = gl.allocate_shared_memory(gl.float32, [128, N2], K_SMEM)  # k's gradient spectrum S
    si_s = gl.allocate_shared_memory(gl.float32, [128, N2], K_SMEM)
    fence_async_shared()
    zero = gl.zeros([64, N2], gl.float32, MMA)

    pid = gl.program_id(0)
    programs = gl.num_programs(0)
    for h in range(pid * channels // programs, (pid + 1) * channels // programs):
        f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, xr_s, xi_s, gr_s, gi_s = _views(_opaque_zero(h), tiles)
        k_scale = _kernel_spectrum(k_ptr, d_ptr, h, kernel_len, sk_h, sk_l, xr_s, xi_s, kr_s, ki_s,
                                   f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, HAS_D, False, N, N2, MMA, DOT, BLK)
        dd = 0.0
        nonfinite = 0.0  # 1 once a row of x or dc in this channel held a NaN or Inf
        for j in range(pairs_per_channel):
            f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, xr_s, xi_s, gr_s, gi_s = _views(_opaque_zero(j), tiles)
            b_a = 2 * j
            b_b = b_a + 1
            valid_b = b_b < batch
            ua = _load_tile(u_ptr, b_a * su_b + h * su_h, True, seqlen, su_l, N2, BLK)
            ub = _load_tile(u_ptr, b_b * su_b + h * su_h, valid_b, seqlen, su_l, N2, BLK)
            xa = ua
            xb = ub
            if HAS_GATE_IN:
                ga = _load_tile(gin_ptr, b_a * sgi_b + h * sgi_h, True, seqlen, sgi_l, N2, BLK)
                gb = _load_tile(gin_ptr, b_b * sgi_b + h * sgi_h, valid_b, seqlen, sgi_l, N2, BLK)
                xa = ua * ga
                xb = ub * gb
            xa, poison_xa = _isolate_nonfinite(xa)
            xb, poison_xb = _isolate_nonfinite(xb)
            nonfinite = gl.maximum(nonfinite, gl.where(poison_xa + poison_xb == 0.0, 0.0, 1.0))
            sa = _row_scale(xa)
            sb = _row_scale(xb)
            xr_s.store((xa * sa).to(gl.float16))
            xi_s.store((xb * sb).to(gl.float16))
            fence_async_shared()
            for c in gl.static_range(2):  # X's spectrum, kept for S; the pre-activation if needed
                zr, zi = _forward_one(c, xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, True, N, N2, MMA, DOT)
                zr_s.slice(c * 64, 64).store(zr)
                zi_s.slice(c * 64, 64).store(zi)
                if GELU or HAS_GATE_OUT:
                    _inverse_one(zr, zi, c, kr_s, ki_s, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, False, N, N2, MMA,
                                 DOT)
            dca = _load_tile(dy_ptr, b_a * sdy_b + h * sdy_h, True, seqlen, sdy_l, N2, BLK)
            dcb = _load_tile(dy_ptr, b_b * sdy_b + h * sdy_h, valid_b, seqlen, sdy_l, N2, BLK)
            if HAS_MASK:
                ma = gl.load(mask_ptr + b_a * sm_b + h * sm_h).to(gl.float32)
                mb = gl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=valid_b, other=0.0).to(gl.float32)
            if GELU or HAS_GATE_OUT:
                yr, yi = _s1_inverse(gr_s, gi_s, f1r_s, f1i_s, f1n_s, zero)
                ca = _rows(yr, _output_scale(sqrt_n, sa, k_scale) + poison_xa, BLK)
                cb = _rows(yi, _output_scale(sqrt_n, sb, k_scale) + poison_xb, BLK)
                if HAS_GATE_OUT:
                    act_a = ca
                    act_b = cb
                    if GELU:
                        act_a = _gelu(ca)
                        act_b = _gelu(cb)
                    if HAS_MASK:
                        act_a = act_a * ma
                        act_b = act_b * mb
                    _store_tile(dgout_ptr, b_a * su_b + h * su_h, True, seqlen, su_l, dca * act_a, N2, BLK)
                    _store_tile(dgout_ptr, b_b * su_b + h * su_h, valid_b, seqlen, su_l, dcb * act_b, N2, BLK)
                    dca = dca * _load_tile(gout_ptr, b_a * sgo_b + h * sgo_h, True, seqlen, sgo_l, N2, BLK)
                    dcb = dcb * _load_tile(gout_ptr, b_b * sgo_b + h * sgo_h, valid_b, seqlen, sgo_l, N2, BLK)
                if GELU:
                    dca = dca * _gelu_grad(ca)
                    dcb = dcb * _gelu_grad(cb)
            if HAS_MASK:
                dca = dca * ma
                dcb = dcb * mb
            dca, poison_dca = _isolate_nonfinite(dca)
            dcb, poison_dcb = _isolate_nonfinite(dcb)
            nonfinite = gl.maximum(nonfinite, gl.where(poison_dca + poison_dcb == 0.0, 0.0, 1.0))
            if HAS_D:
                dd += gl.sum(gl.sum(dca * xa + dcb * xb, axis=1), axis=0)
            oa = _row_scale(dca)
            ob = _row_scale(dcb)
            q, ta, tb = _matched_scales(sa, sb, oa, ob)
            xr_s.store((dca * ta).to(gl.float16))
            xi_s.store((dcb * tb).to(gl.float16))
            fence_async_shared()
            for c in gl.static_range(2):
                dr, di = _forward_one(c, xr_s, xi_s, f1r_s, f1i_s, f1n_s, f2r_s, f2i_s, f2n_s, True, N, N2, MMA, DOT)
                zr = zr_s.slice(c * 64, 64).load(MMA)
                zi = zi_s.slice(c * 64, 64).load(MMA)
                old_r = gl.where(j > 0, sr_s.slice(c * 64, 64).load(MMA), 0.0)
                old_i = gl.where(j > 0, si_s.slice(c * 64, 64).load(MMA), 0.0)
                sr_s.slice(c * 64, 64).store(old_r + (dr * zr + di * zi) / q)
                si_s.slice(c * 64, 64).store(old_i + (di * zr - dr * zi) / q)
                _inverse_one(dr, di, c, kr_s, ki_s, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, True, N, N2, MMA, DOT)
            yr, yi = _s1_inverse(gr_s, gi_s, f1r_s, f1i_s, f1n_s, zero)
            dxa = _rows(yr, _output_scale(sqrt_n, ta * (oa > 0).to(gl.float32), k_scale) + poison_dca, BLK)
            dxb = _rows(yi, _output_scale(sqrt_n, tb * (ob > 0).to(gl.float32), k_scale) + poison_dcb, BLK)
            if HAS_GATE_IN:
                _store_tile(dgin_ptr, b_a * su_b + h * su_h, True, seqlen, su_l, dxa * ua, N2, BLK)
                _store_tile(dgin_ptr, b_b * su_b + h * su_h, valid_b, seqlen, su_l, dxb * ub, N2, BLK)
                dxa = dxa * ga
                dxb = dxb * gb
            _store_tile(du_ptr, b_a * su_b + h * su_h, True, seqlen, su_l, dxa, N2, BLK)
            _store_tile(du_ptr, b_b * su_b + h * su_h, valid_b, seqlen, su_l, dxb, N2, BLK)
        # dk: the inverse of S, scaled to max |S| <= 1 first (one per channel, after its last pair)
        m = 0.0
        for c in gl.static_range(2):
            m = gl.maximum(m, gl.max(gl.max(gl.abs(sr_s.slice(c * 64, 64).load(MMA)), axis=1), axis=0))
            m = gl.maximum(m, gl.max(gl.max(gl.abs(si_s.slice(c * 64, 64).load(MMA)), axis=1), axis=0))
        ss = gl.exp2(-gl.ceil(gl.log2(gl.maximum(m, 1e-30)))) * (m > 0).to(gl.float32)
        for c in gl.static_range(2):
            er = sr_s.slice(c * 64, 64).load(MMA) * ss
            ei = si_s.slice(c * 64, 64).load(MMA) * ss
            _inverse_rows(er, ei, c, gr_s, gi_s, f2r_s, f2i_s, f2n_s, zero, N, N2, MMA, DOT)
        yr, yi = _s1_inverse(gr_s, gi_s, f1r_s, f1i_s, f1n_s, zero)
        poison = gl.where(nonfinite > 0, float("nan"), 0.0).to(gl.float32)  # dk and dD, as the eager FFT's
        _store_tile(dk_ptr, h * sdk_h, True, kernel_len, sdk_l,
                    _rows(yr, _output_scale(sqrt_n, ss, 1.0) + poison, BLK), N2, BLK)
        if HAS_D:
            gl.store(dd_ptr + h, (dd + poison).to(dd_ptr.dtype.element_ty))


# ------------------------------------------------------------------------------ launcher --
_CONSTANTS: dict = {}


def factor_tiles(plan: MonarchPlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """F1[f1, n1 < 64] re, im, -im ((128, 64) float16) and F2 re, im, -im ((N2, N2) float16)."""
    key = (plan.n, device)
    if key not in _CONSTANTS:
        f1r, f1i = dft_factor(plan.n1, plan.n1, plan.half)
        f2r, f2i = dft_factor(plan.n2, plan.n2, plan.n2)
        _CONSTANTS[key] = tuple(t.to(device=device, dtype=torch.float16).contiguous()
                                for t in (f1r, f1i, -f1i, f2r, f2i, -f2i))
    return _CONSTANTS[key]


def programs_per_sm(plan: MonarchPlan) -> int:
    """Resident forward programs per SM (the dispatched tuning's)."""
    return forward_tuning(plan).programs_per_sm


def backward_programs_per_sm(plan: MonarchPlan) -> int:
    """Resident backward programs per SM that the shared memory allows (scratch: +16 KB)."""
    return max(1, SHARED_LIMIT // (plan.shared_bytes() + 16 * 1024))


def async_staging(u: torch.Tensor, gate_in: Optional[torch.Tensor]) -> bool:
    """Whether u's (and gate_in's) rows can be copied by cp.async: 16-byte vectors need L and
    the batch and channel strides to be multiples of 16 (what Triton specialises on), unit
    stride along L and 16-byte aligned data. Else plain loads (the copies would be 2 bytes,
    which cp.async cannot do: a compile error, seen with compile_check at L = 513)."""
    def aligned(t):
        return (t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                and all(s % 16 == 0 for s in (t.shape[-1], t.stride(0), t.stride(1))))
    return aligned(u) and (gate_in is None or aligned(gate_in))


def _present(t: Optional[torch.Tensor], stand_in: torch.Tensor) -> torch.Tensor:
    """``t``, or ``stand_in`` for an absent tensor (never read: its HAS_* flag is off)."""
    return t if t is not None else stand_in


def _option_flags(D, gate_in, gate_out, gelu, dropout_mask) -> dict:
    return dict(HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
                GELU=gelu, HAS_MASK=dropout_mask is not None)


def fftconv_fwd(
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    gate_in: Optional[torch.Tensor] = None,
    gate_out: Optional[torch.Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
    alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Optional[Tuning] = None,
) -> torch.Tensor:
    """One launch: y = fftconv(u, k, ...) for inputs :func:`supports` (the op validated them).
    ``tuning`` overrides :func:`forward_tuning` (benchmarks)."""
    batch, channels, seqlen = u.shape
    plan = plan_for(seqlen)
    tuning = tuning or forward_tuning(plan)
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    pairs_per_channel = (batch + 1) // 2
    items = channels * pairs_per_channel
    programs = min(items, tuning.programs_per_sm * sm_count(u.device))
    staging = async_staging(u, gate_in)
    launch(
        _fwd_kernel, (programs,), u, k, _present(D, u), _present(gate_in, u), _present(gate_out, u), _present(dropout_mask, u), y,
        *factor_tiles(plan, u.device),
        batch, seqlen, k.shape[-1], items, pairs_per_channel, math.sqrt(plan.n),
        *u.stride(), *k.stride(), *strides(gate_in, 3), *strides(gate_out, 3), *strides(dropout_mask, 2),
        *y.stride(),
        **_option_flags(D, gate_in, gate_out, gelu, dropout_mask), N=plan.n, N2=plan.n2,
        BOTH_CHUNKS=both_chunks(plan, staging, tuning), ASYNC_STAGING=staging, **kernel_config(plan, warps=tuning.warps),
        K_HALF=tuning.k_half, F1_NEG=tuning.f1_neg, PROBE=tuning.probe, num_warps=tuning.warps)
    return y


def backward_supported(seqlen: int) -> bool:
    """Whether :func:`gluon_fftconv_bwd` has a plan: it keeps X's spectrum and S in float32 shared memory beside K: up to N2 = 32
    (L <= 2048); at 4096 it does not fit (3 spectra of 64 KB)."""
    plan = plan_for(seqlen)
    return plan is not None and plan.n2 <= 32


def fftconv_bwd(*args, **kwargs) -> tuple:
    """The family's backward (same signature as :func:`gluon_fftconv_bwd`): v5's kernels where
    BACKWARD_IS_V5 (measured faster), else v6's own."""
    return (blockfft_conv.fftconv_bwd if BACKWARD_IS_V5 else gluon_fftconv_bwd)(*args, **kwargs)


def gluon_fftconv_bwd(
    grad_y: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    gate_in: Optional[torch.Tensor] = None,
    gate_out: Optional[torch.Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
    alloc: Callable[..., torch.Tensor] = torch.empty,
) -> tuple:
    """One launch: (du, dk, dD, dgate_in, dgate_out), None for absent inputs; every output has
    u's strides where it has u's shape (dgate_in, dgate_out, du are written at u's offsets)."""
    batch, channels, seqlen = u.shape
    if not backward_supported(seqlen):
        raise ValueError(f"v6 backward: no plan for L = {seqlen} (L <= 2048 for now)")
    plan = plan_for(seqlen)
    u = u.contiguous()
    du = alloc(u.shape, dtype=u.dtype, device=u.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dD = alloc(D.shape, dtype=D.dtype, device=D.device) if D is not None else None
    dgate_in = alloc(u.shape, dtype=gate_in.dtype, device=u.device) if gate_in is not None else None
    dgate_out = alloc(u.shape, dtype=gate_out.dtype, device=u.device) if gate_out is not None else None
    programs = min(channels, backward_programs_per_sm(plan) * sm_count(u.device))
    launch(
        _bwd_kernel, (programs,), grad_y, u, k, _present(D, u), _present(gate_in, u), _present(gate_out, u), _present(dropout_mask, u),
        du, dk, _present(dD, u), _present(dgate_in, u), _present(dgate_out, u),
        *factor_tiles(plan, u.device),
        batch, channels, seqlen, k.shape[-1], (batch + 1) // 2, math.sqrt(plan.n),
        *u.stride(), *k.stride(), *strides(gate_in, 3), *strides(gate_out, 3), *strides(dropout_mask, 2),
        *grad_y.stride(), *dk.stride(),
        **_option_flags(D, gate_in, gate_out, gelu, dropout_mask), N=plan.n, N2=plan.n2,
        **kernel_config(plan, backward=True),
        num_warps=num_warps(plan, backward=True))
    return du, dk, dD, dgate_in, dgate_out
