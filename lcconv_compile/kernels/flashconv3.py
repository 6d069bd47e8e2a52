"""FlashConv v5: single-launch forward of ``lcconv::fftconv`` on the three-level block FFT
(:mod:`.blockfft3`), with the kernel's spectrum computed on chip. Same interface as
:mod:`.flashconv` (``supports``, ``fftconv_fwd``, ``fftconv_bwd``, ``Tuning``, ``alloc=``).

Forward: one program per (channel, group of stacks); a stack is P row pairs of one channel,
each pair packed as one complex row ``z = a + i b`` (k is real, so ``U^H(U z * K)`` carries
both rows' convolutions in its real and imaginary parts). For every chunk of spectrum
columns k1 the program transforms the chunk of k (one extra complex row, imaginary part zero)
and of the stack, multiplies them, and accumulates the chunk's inverse into the output
tile: the spectrum of k never leaves registers and there is no separate launch. Zero padding
is implicit (masked loads); the skip term, GELU, dropout mask and gates are applied in
registers and y is written once in u's dtype.

Backward: one launch, one program per channel owning all its rows. Per stack it recomputes
the pre-activation where GELU or the output gate needs it, forms dc, and in one walk over the
spectrum chunks transforms k, dc and x: ``du = corr(dc, k)`` accumulates like the forward, and
``sum_pairs q U dc * conj(U x)`` (k's gradient spectrum; two packed rows give
``dc_a x_a + dc_b x_b`` in its real part) is read-modify-written in a per-channel scratch
(L2-resident, no zeroing). At the end the program inverse-transforms it into dk; dD is summed
in registers. Fixed order throughout: dk and dD are bit-identical across runs.

Precision: half inputs use float16 operands on max-scaled rows (float32 accumulation);
float32 inputs use 3xtf32 (float32 operands split by the compiler).

Knows torch and Triton only; the op (ops.py) validates inputs and picks the family through
kernels.select. Not registered in kernels.FAMILIES until measured faster on the device.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl


from .blockfft3 import (
    BlockFFTPlan,
    block_fft_constants,
    convolve_stack,
    deinterleave,
    forward_chunk,
    interleave,
    inverse_chunk,
    load_chunk_constants,
    load_stage_constants,
    multiply_spectra,
    plan_for,
)
from .launch import launch
from .flashconv import _gelu, _gelu_grad, _load_gated_pairs, _sm_count, _stack_rows
from .monarch import load_stack

# Longest sequence per input dtype: N = 2L <= 16384 (the largest block-FFT plan) for half
# inputs. float32 operands (3xtf32) double every shared-memory tile: the backward's fit up to
# N = 4096 (166 KB at L = 2048, 266 KB at 4096 against 227 KB; scripts/compile_check.py).
MAX_SEQLEN = {torch.bfloat16: 8192, torch.float16: 8192, torch.float32: 2048}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STACK_ELEMENTS = 2048  # P * N/2: complex samples of the stack held in registers per program
# Defaults measured fastest on the H100 (benchmarks/NOTES.md, v5 second run), per FFT size:
# the forward prefers a wider N1 at 8K/16K (half the chunk's working set, ~15% more FLOPs) and
# 4 pairs per stack at 2K; the backward keeps blockfft3.FACTORS and wants 8 warps at 8K.
FORWARD_FACTORS = {8192: (64, 16, 8), 16384: (64, 16, 16)}
FORWARD_PAIRS = {2048: 4}
BACKWARD_WARPS = {8192: 8, 16384: 8}
# Benchmark-only variants that skip work to show what bounds the kernel (results are wrong):
# "io" loads and stores only, "forward" skips the inverse transform, "no_kernel_spectrum"
# multiplies by 1 instead of transforming k.
VARIANTS = ("full", "io", "forward", "no_kernel_spectrum")


def supports(u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the v5 kernels handle these inputs (else the caller uses another family)."""
    return (
        u.is_cuda
        and u.dtype in MAX_SEQLEN
        and k.dtype in KERNEL_DTYPES
        and u.shape[-1] <= MAX_SEQLEN[u.dtype]
    )


@dataclass(frozen=True)
class Tuning:
    """Launch parameters a caller may override (tests and benchmarks); None = the default."""

    pairs: Optional[int] = None  # row pairs per stack (a power of two)
    num_warps: Optional[int] = None
    chunk: Optional[int] = None  # k1 values per step of the chunk loop
    factors: Optional[tuple[int, int, int]] = None  # (N1, N2, N3); tests use small ones
    precision: Optional[str] = None  # "fp16" or "tf32x3" (or "ieee" in the interpreter)
    programs_per_sm: Optional[int] = None
    variant: str = "full"  # see VARIANTS: anything but "full" is for benchmarks only


@dataclass(frozen=True)
class _Launch:
    plan: BlockFFTPlan
    pairs: int
    precision: str
    num_warps: int
    groups: int  # programs per channel
    stacks_per_program: int


def _launch(u: torch.Tensor, tuning: Tuning, backward: bool = False, default_per_sm: int = 4) -> _Launch:
    return _launch_for(tuple(u.shape), u.dtype, u.device, tuning, backward, default_per_sm)


@functools.lru_cache(maxsize=256)
def _launch_for(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, tuning: Tuning,
                backward: bool, default_per_sm: int) -> _Launch:
    # Cached per (shape, dtype, device, tuning, direction): a call pays one dict look-up.
    batch, channels, seqlen = shape
    if tuning.variant not in VARIANTS:
        raise ValueError(f"tuning.variant={tuning.variant!r}: expected one of {VARIANTS}")
    plan = plan_for(seqlen, tuning.factors, tuning.chunk)
    if tuning.factors is None and not backward and plan.fft_size in FORWARD_FACTORS:
        plan = plan_for(seqlen, FORWARD_FACTORS[plan.fft_size], tuning.chunk)
    max_pairs = max(1, STACK_ELEMENTS // (plan.fft_size // 2))
    if not backward:
        max_pairs = FORWARD_PAIRS.get(plan.fft_size, max_pairs)
    pairs = tuning.pairs or min(max_pairs, triton.next_power_of_2(triton.cdiv(batch, 2)))
    if pairs & (pairs - 1):
        raise ValueError(f"tuning.pairs={pairs}: expected a power of two")
    precision = tuning.precision or ("tf32x3" if dtype == torch.float32 else "fp16")
    # One warpgroup up to N = 8192, two at 16384 (the forward); more warps were 1.3-2.3x
    # slower although fewer warps mean more registers per thread (small per-chunk products).
    num_warps = 4 if plan.fft_size <= 8192 else 8
    if backward:
        num_warps = BACKWARD_WARPS.get(plan.fft_size, num_warps)
    num_warps = tuning.num_warps or num_warps
    stacks = triton.cdiv(triton.cdiv(batch, 2), pairs)
    wanted = triton.cdiv((tuning.programs_per_sm or default_per_sm) * _sm_count(device), channels)
    # A divisor of the stack count, so every program has the same number of stacks.
    groups = next((g for g in range(1, stacks + 1) if stacks % g == 0 and g >= wanted), stacks)
    return _Launch(plan, pairs, precision, num_warps, groups, stacks // groups)


def _strides(t: Optional[torch.Tensor], n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


@triton.jit
def _natural_times(P: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr):
    """Time t = n1 * M + m of every element [p, n1, m] of a stack in memory order (P, N1/2, M),
    and the pair index p (P, 1, 1). Loads and stores use this order: contiguous along m, so
    they vectorise and coalesce; the transform uses the stack order [(p, m), n1] (to_stack)."""
    n1 = tl.arange(0, HALF)[None, :, None]
    m = tl.arange(0, M)[None, None, :]
    return n1 * M + m, tl.arange(0, P)[:, None, None]


@triton.jit
def _to_stack(x, P: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr):
    """(P, N1/2, M) memory order -> (P*M, N1/2) stack order (a register permute)."""
    return tl.reshape(tl.permute(x, (0, 2, 1)), (P * M, HALF))


@triton.jit
def _to_memory(x, P: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr):
    """(P*M, N1/2) stack order -> (P, N1/2, M) memory order."""
    return tl.permute(tl.reshape(x, (P, M, HALF)), (0, 2, 1))


@triton.jit
def _row_scale(x, PRECISION: tl.constexpr):
    """(P, 1, 1) scale of each row of a (P, N1/2, M) tile: max |x| in the fp16 mode, else 1."""
    if PRECISION == "fp16":
        row = tl.max(tl.max(tl.abs(x), axis=2), axis=1)
        row = tl.where(row > 0, row, 1.0)
    else:
        row = tl.full((x.shape[0],), 1.0, tl.float32)
    return row[:, None, None]


@triton.jit
def _kernel_operand(k_ptr, h, kernel_len, sk_h, sk_l, M: tl.constexpr, HALF: tl.constexpr,
                    PRECISION: tl.constexpr):
    """Channel h's kernel as a stack of one complex row (imaginary part 0), scaled by its max
    magnitude (returned) so its spectrum fits float16."""
    t, unused_pair = _natural_times(1, M, HALF)
    kx = tl.load(k_ptr + h * sk_h + t * sk_l, mask=t < kernel_len, other=0.0).to(tl.float32)
    k_scale = _row_scale(kx, PRECISION)
    kx = _to_stack(kx / k_scale, 1, M, HALF)
    return interleave(kx, tl.zeros_like(kx), PRECISION), tl.max(tl.reshape(k_scale, (1,)), axis=0)


@triton.jit
def _fftconv_fwd_kernel(
    u_ptr, k_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr, y_ptr,
    w1_ptr, w1i_ptr, w2_ptr, w2i_ptr, w3_ptr, w3i_ptr,
    batch, channels, seqlen, kernel_len, stacks_per_program, sqrt_n,
    su_b, su_h, su_l, sk_h, sk_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr, VARIANT: tl.constexpr,
    P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr, CHUNK: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    group = tl.program_id(0)
    h = tl.program_id(1)
    M: tl.constexpr = N2 * N3
    HALF: tl.constexpr = N1 // 2
    t, p = _natural_times(P, M, HALF)
    in_seq = t < seqlen
    k0, k_scale = _kernel_operand(k_ptr, h, kernel_len, sk_h, sk_l, M, HALF, PRECISION)
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    stage = load_stage_constants(w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, N2, N3)

    for it in tl.range(0, stacks_per_program):
        b_a, b_b, valid_a, valid_b = _stack_rows(group, it, stacks_per_program, p, batch, P)
        xa, xb = _load_gated_pairs(u_ptr, gate_in_ptr, b_a, b_b, valid_a, valid_b, h, t, seqlen,
                                   su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, HAS_GATE_IN)
        sa = _row_scale(xa, PRECISION)
        sb = _row_scale(xb, PRECISION)
        x0 = interleave(_to_stack(xa / sa, P, M, HALF), _to_stack(xb / sb, P, M, HALF), PRECISION)
        if VARIANT == "io":
            acc = x0.to(tl.float32)
        elif VARIANT == "forward":
            acc = tl.zeros((P * M, N1), dtype=tl.float32)
            for chunk_start in tl.range(0, N1, CHUNK):
                w1, unused_w1i = load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1, CHUNK)
                sr, si = forward_chunk(x0, w1, chunk_start, stage, P, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
                kr, ki = forward_chunk(k0, w1, chunk_start, stage, 1, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
                sr, si = multiply_spectra(sr, si, kr, ki, P, False)
                # Keep the transforms alive with a store that never fires (no reduction, no traffic).
                spec_offs = tl.reshape(tl.arange(0, P * CHUNK * N2 * N3), (P * CHUNK * N2, N3))
                tl.store(y_ptr + spec_offs, sr.to(y_ptr.dtype.element_ty), mask=(sr + si) > 3.0e38)
        else:
            acc = convolve_stack(x0, k0, w1_ptr, w1i_ptr, stage, VARIANT != "no_kernel_spectrum", False,
                                 P, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
        yr, yi = deinterleave(acc)
        yr = _to_memory(yr, P, M, HALF)
        yi = _to_memory(yi, P, M, HALF)
        if HAS_D:
            # Reload x for the skip term (an L1/L2 hit) rather than hold it through the loop.
            xa, xb = _load_gated_pairs(u_ptr, gate_in_ptr, b_a, b_b, valid_a, valid_b, h, t, seqlen,
                                       su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, HAS_GATE_IN)
        # conv(x, k) = sqrt(N) * s_x * s_k * U^H(U(x / s_x) * U(k / s_k)), U unitary.
        ca = yr * (sa * (sqrt_n * k_scale)) + d * xa
        cb = yi * (sb * (sqrt_n * k_scale)) + d * xb
        if GELU:
            ca, cb = _gelu(ca), _gelu(cb)
        if HAS_MASK:
            ca *= tl.load(mask_ptr + b_a * sm_b + h * sm_h, mask=valid_a, other=0.0).to(tl.float32)
            cb *= tl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=valid_b, other=0.0).to(tl.float32)
        if HAS_GATE_OUT:
            ca *= load_stack(gate_out_ptr, b_a * sgo_b + h * sgo_h, valid_a, t, seqlen, sgo_l)
            cb *= load_stack(gate_out_ptr, b_b * sgo_b + h * sgo_h, valid_b, t, seqlen, sgo_l)
        y_ty = y_ptr.dtype.element_ty
        tl.store(y_ptr + (b_a * channels + h) * seqlen + t, ca.to(y_ty), mask=valid_a & in_seq)
        tl.store(y_ptr + (b_b * channels + h) * seqlen + t, cb.to(y_ty), mask=valid_b & in_seq)


def _operand_dtype(precision: str) -> torch.dtype:
    return torch.float16 if precision == "fp16" else torch.float32


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
    """One launch: y = fftconv(u, k, ...) (inputs assumed valid: the op validates them).

    ``alloc(shape, dtype=, device=)`` makes the output (tests pass one that poisons it).
    """
    batch, channels, seqlen = u.shape
    params = _launch(u, tuning)
    plan = params.plan
    consts = block_fft_constants(plan, _operand_dtype(params.precision), u.device)
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    launch(
        _fftconv_fwd_kernel, (params.groups, channels),
        u, k, D, gate_in, gate_out, dropout_mask, y, *consts,
        batch, channels, seqlen, k.shape[-1], params.stacks_per_program, float(plan.fft_size) ** 0.5,
        *u.stride(), *k.stride(), *_strides(gate_in, 3), *_strides(gate_out, 3), *_strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None, VARIANT=tuning.variant,
        P=params.pairs, N1=plan.n1, N2=plan.n2, N3=plan.n3, CHUNK=plan.chunk,
        PRECISION=params.precision, FAST_TRIG=u.is_cuda, num_warps=params.num_warps, num_stages=1,
    )
    return y


# ----------------------------------------------------------------------------------- backward --
@triton.jit
def _fftconv_bwd_kernel(
    dy_ptr, u_ptr, k_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr,
    du_ptr, dk_ptr, dd_ptr, dgate_in_ptr, dgate_out_ptr, dk_spec_ptr,
    w1_ptr, w1i_ptr, w2_ptr, w2i_ptr, w3_ptr, w3i_ptr,
    batch, channels, seqlen, kernel_len, stacks, sqrt_n,
    sdy_b, sdy_h, sdy_l, su_b, su_h, su_l, sk_h, sk_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l,
    sm_b, sm_h, sdk_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr, CHUNK: tl.constexpr,
    PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    h = tl.program_id(0)  # one program owns every row of its channel: dk and dD in a fixed order
    M: tl.constexpr = N2 * N3
    HALF: tl.constexpr = N1 // 2
    t, p = _natural_times(P, M, HALF)
    in_seq = t < seqlen
    k0, k_scale = _kernel_operand(k_ptr, h, kernel_len, sk_h, sk_l, M, HALF, PRECISION)
    out_scale = sqrt_n * k_scale
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    stage = load_stage_constants(w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, N2, N3)
    # This channel's dk spectrum S = sum over pairs of U dc * conj(U x), planes (2, N) in the
    # chunked order; rewritten (not read) by the first stack, so it needs no zeroing.
    spec_ptr = dk_spec_ptr + h * 2 * N1 * M
    spec_offs = tl.arange(0, CHUNK * N2)[:, None] * N3 + tl.arange(0, N3)[None, :]
    dd = 0.0
    scale_sum = 0.0

    for it in tl.range(0, stacks):
        b_a, b_b, valid_a, valid_b = _stack_rows(0, it, stacks, p, batch, P)
        ua = load_stack(u_ptr, b_a * su_b + h * su_h, valid_a, t, seqlen, su_l)
        ub = load_stack(u_ptr, b_b * su_b + h * su_h, valid_b, t, seqlen, su_l)
        xa, xb = ua, ub
        if HAS_GATE_IN:
            gia = load_stack(gate_in_ptr, b_a * sgi_b + h * sgi_h, valid_a, t, seqlen, sgi_l)
            gib = load_stack(gate_in_ptr, b_b * sgi_b + h * sgi_h, valid_b, t, seqlen, sgi_l)
            xa, xb = ua * gia, ub * gib
        sxa = _row_scale(xa, PRECISION)
        sxb = _row_scale(xb, PRECISION)
        x0 = interleave(_to_stack(xa / sxa, P, M, HALF), _to_stack(xb / sxb, P, M, HALF), PRECISION)
        dca = load_stack(dy_ptr, b_a * sdy_b + h * sdy_h, valid_a, t, seqlen, sdy_l)
        dcb = load_stack(dy_ptr, b_b * sdy_b + h * sdy_h, valid_b, t, seqlen, sdy_l)
        if HAS_MASK:
            ma = tl.load(mask_ptr + b_a * sm_b + h * sm_h, mask=valid_a, other=0.0).to(tl.float32)
            mb = tl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=valid_b, other=0.0).to(tl.float32)
        if GELU or HAS_GATE_OUT:
            # Recompute the pre-activation c = conv(x, k) + D x rather than storing it.
            cr, ci = deinterleave(convolve_stack(x0, k0, w1_ptr, w1i_ptr, stage, True, False,
                                                 P, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG))
            ca = _to_memory(cr, P, M, HALF) * (sxa * out_scale) + d * xa
            cb = _to_memory(ci, P, M, HALF) * (sxb * out_scale) + d * xb
            if HAS_GATE_OUT:
                act_a, act_b = ca, cb
                if GELU:
                    act_a, act_b = _gelu(ca), _gelu(cb)
                if HAS_MASK:
                    act_a, act_b = act_a * ma, act_b * mb
                dgo_ty = dgate_out_ptr.dtype.element_ty
                tl.store(dgate_out_ptr + (b_a * channels + h) * seqlen + t, (dca * act_a).to(dgo_ty),
                         mask=valid_a & in_seq)
                tl.store(dgate_out_ptr + (b_b * channels + h) * seqlen + t, (dcb * act_b).to(dgo_ty),
                         mask=valid_b & in_seq)
                dca *= load_stack(gate_out_ptr, b_a * sgo_b + h * sgo_h, valid_a, t, seqlen, sgo_l)
                dcb *= load_stack(gate_out_ptr, b_b * sgo_b + h * sgo_h, valid_b, t, seqlen, sgo_l)
            if GELU:
                dca, dcb = dca * _gelu_grad(ca), dcb * _gelu_grad(cb)
        if HAS_MASK:
            dca, dcb = dca * ma, dcb * mb
        if HAS_D:
            dd += tl.sum(tl.sum(tl.sum(dca * xa + dcb * xb, axis=2), axis=1), axis=0)
        # Scale dc's rows so both rows of a pair carry the same product of scales q: the real
        # part of U dc * conj(U x) is then (dc_a x_a + dc_b x_b) / q, what dk needs.
        q = tl.maximum(_row_scale(dca, PRECISION) * sxa, _row_scale(dcb, PRECISION) * sxb)  # (P, 1, 1)
        dsa = q / sxa
        dsb = q / sxb
        g0 = interleave(_to_stack(dca / dsa, P, M, HALF), _to_stack(dcb / dsb, P, M, HALF), PRECISION)
        scale_sum += tl.sum(tl.reshape(q, (P,)), axis=0)

        # One walk over the spectrum: du = corr(dc, k), and q U dc conj(U x) summed into S.
        acc = tl.zeros((P * M, N1), dtype=tl.float32)
        for chunk_start in tl.range(0, N1, CHUNK):
            w1, w1i = load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1, CHUNK)
            kr, ki = forward_chunk(k0, w1, chunk_start, stage, 1, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
            gr, gi = forward_chunk(g0, w1, chunk_start, stage, P, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
            xr, xi = forward_chunk(x0, w1, chunk_start, stage, P, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
            pr = tl.reshape(gr * xr + gi * xi, (P, CHUNK * N2, N3)) * q
            pi = tl.reshape(gi * xr - gr * xi, (P, CHUNK * N2, N3)) * q
            offs = chunk_start * M + spec_offs
            first = it == 0
            sr = tl.load(spec_ptr + offs, mask=(offs >= 0) & ~first, other=0.0) + tl.sum(pr, axis=0)
            si = tl.load(spec_ptr + N1 * M + offs, mask=(offs >= 0) & ~first, other=0.0) + tl.sum(pi, axis=0)
            tl.store(spec_ptr + offs, sr)
            tl.store(spec_ptr + N1 * M + offs, si)
            er, ei = multiply_spectra(gr, gi, kr, ki, P, True)
            acc = inverse_chunk(er, ei, acc, w1i, chunk_start, stage, P, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
        # The next stack (and the dk transform below) reads S, possibly from other threads.
        tl.debug_barrier()

        yr, yi = deinterleave(acc)
        dxa = _to_memory(yr, P, M, HALF) * (dsa * out_scale) + d * dca
        dxb = _to_memory(yi, P, M, HALF) * (dsb * out_scale) + d * dcb
        if HAS_GATE_IN:
            dgi_ty = dgate_in_ptr.dtype.element_ty
            tl.store(dgate_in_ptr + (b_a * channels + h) * seqlen + t, (dxa * ua).to(dgi_ty),
                     mask=valid_a & in_seq)
            tl.store(dgate_in_ptr + (b_b * channels + h) * seqlen + t, (dxb * ub).to(dgi_ty),
                     mask=valid_b & in_seq)
            dxa, dxb = dxa * gia, dxb * gib
        du_ty = du_ptr.dtype.element_ty
        tl.store(du_ptr + (b_a * channels + h) * seqlen + t, dxa.to(du_ty), mask=valid_a & in_seq)
        tl.store(du_ptr + (b_b * channels + h) * seqlen + t, dxb.to(du_ty), mask=valid_b & in_seq)

    # dk = corr(dc, x)[:Lk] summed over the batch = sqrt(N) Re(U^H S); S / sum(q) keeps the
    # float16 operands in range (each pair's term is at most N/2 in magnitude).
    acc = tl.zeros((M, N1), dtype=tl.float32)
    for chunk_start in tl.range(0, N1, CHUNK):
        unused_w1, w1i = load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1, CHUNK)
        offs = chunk_start * M + spec_offs
        sr = tl.load(spec_ptr + offs) / scale_sum
        si = tl.load(spec_ptr + N1 * M + offs) / scale_sum
        acc = inverse_chunk(sr, si, acc, w1i, chunk_start, stage, 1, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
    dk_re, unused_dk_im = deinterleave(acc)
    tk, unused_pair = _natural_times(1, M, HALF)
    tl.store(dk_ptr + h * sdk_h + tk, (_to_memory(dk_re, 1, M, HALF) * (sqrt_n * scale_sum)).to(dk_ptr.dtype.element_ty),
             mask=tk < kernel_len)
    if HAS_D:
        tl.store(dd_ptr + h, dd.to(dd_ptr.dtype.element_ty))


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
    """One launch: (du, dk, dD, dgate_in, dgate_out), None for absent inputs. One program per
    channel owns all its rows, so dk and dD are summed in a fixed order (bit-identical runs)."""
    batch, channels, seqlen = u.shape
    params = _launch(u, tuning, backward=True)
    plan = params.plan
    consts = block_fft_constants(plan, _operand_dtype(params.precision), u.device)
    du = alloc(u.shape, dtype=u.dtype, device=u.device)
    dk = alloc(k.shape, dtype=k.dtype, device=k.device)
    dD = alloc(D.shape, dtype=D.dtype, device=D.device) if D is not None else None
    dgate_in = alloc(u.shape, dtype=gate_in.dtype, device=u.device) if gate_in is not None else None
    dgate_out = alloc(u.shape, dtype=gate_out.dtype, device=u.device) if gate_out is not None else None
    dk_spectrum = torch.empty(channels, 2, plan.fft_size, dtype=torch.float32, device=u.device)
    stacks = triton.cdiv(triton.cdiv(batch, 2), params.pairs)
    launch(
        _fftconv_bwd_kernel, (channels,),
        grad_y, u, k, D, gate_in, gate_out, dropout_mask, du, dk, dD, dgate_in, dgate_out, dk_spectrum,
        *consts, batch, channels, seqlen, k.shape[-1], stacks, float(plan.fft_size) ** 0.5,
        *grad_y.stride(), *u.stride(), *k.stride(), *_strides(gate_in, 3), *_strides(gate_out, 3),
        *_strides(dropout_mask, 2), dk.stride(0),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        P=params.pairs, N1=plan.n1, N2=plan.n2, N3=plan.n3, CHUNK=plan.chunk,
        PRECISION=params.precision, FAST_TRIG=u.is_cuda, num_warps=params.num_warps, num_stages=1,
    )
    return du, dk, dD, dgate_in, dgate_out
