"""FlashConv: the single-pass Triton kernels behind ``lcconv::fftconv`` on GPUs, and their launchers.

Spectrum: one program per channel transforms k (unitary block FFT, :mod:`.monarch`) and writes
its spectrum in the Monarch order with its scale; computed on every call (never cached), once
for the whole batch.

Forward: one program per (channel, group of batch-pair stacks). Each stack of P row pairs is
read once (zero padding is implicit: masked loads), convolved on tensor cores, and the skip
term, GELU, dropout mask and gates are applied in registers before ``y`` is written once in
u's dtype.

Backward: one program per (channel, group of stacks). It recomputes the pre-activation where
GELU or the output gate needs it, forms ``dc``, and in one walk over the spectrum chunks
produces ``du = corr(dc, k)`` and accumulates ``sum_b U dc_b * conj(U x_b)`` for ``dk`` (two
packed rows give ``dc_a x_a + dc_b x_b`` in the real part, see monarch.py). Per-program partial
spectra and ``dD`` sums are reduced in a fixed order by the launcher: ``dk`` and ``dD`` are
bit-identical for identical inputs.

Knows torch and Triton only. Sizes: see :func:`supports`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .launch import cached_constants, launch
from .monarch import (
    MonarchPlan,
    chunk_constants,
    conv_stack,
    dft_constants,
    load_f2,
    load_stack,
    multiply_spectrum,
    operand,
    plan_for,
    row_max,
    spectrum_to_time,
    stack_forward_chunk,
    stack_inverse_chunk,
    stack_times,
    to_stack,
)

# Longest sequence the single-pass kernels handle, per input dtype. Half inputs use float16
# tensor-core operands up to N = 16384 on chip. float32 inputs need 3xtf32 to stay under 1e-3
# relative error, and its operand tiles fit in shared memory only up to N = 2048.
MAX_SEQLEN = {torch.bfloat16: 8192, torch.float16: 8192, torch.float32: 1024}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the single-pass kernels handle these inputs (else the caller uses the reference)."""
    return (
        u.is_cuda
        and u.dtype in MAX_SEQLEN
        and k.dtype in KERNEL_DTYPES
        and u.shape[-1] <= MAX_SEQLEN[u.dtype]
    )


@dataclass(frozen=True)
class Tuning:
    """Launch parameters a caller may override (benchmarks explore them); None = the default."""

    chunk: Optional[int] = None  # spectrum rows per step of the chunk loop
    pairs: Optional[int] = None  # row pairs per stack (a power of two)
    num_warps: Optional[int] = None
    precision: Optional[str] = None  # "fp16", "tf32", "tf32x3" or "ieee"
    programs_per_sm: Optional[int] = None
    gauss: Optional[bool] = None  # three real products per complex product instead of four


@dataclass(frozen=True)
class _Launch:
    plan: MonarchPlan
    pairs: int
    chunk: int
    precision: str
    gauss: bool
    num_warps: int
    groups: int  # programs per channel
    stacks_per_program: int


def _launch(u: torch.Tensor, tuning: Tuning, default_per_sm: int) -> _Launch:
    return _launch_for(tuple(u.shape), u.dtype, u.device, tuning, default_per_sm)


@functools.lru_cache(maxsize=256)
def _launch_for(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, tuning: Tuning,
                default_per_sm: int) -> _Launch:
    # Cached per (shape, dtype, device, tuning): a call pays one dict look-up, not this arithmetic.
    batch, channels, seqlen = shape
    plan = plan_for(seqlen)
    pairs = tuning.pairs or plan.pairs_per_stack(batch)
    chunk = tuning.chunk or plan.chunk
    # Half inputs: float16 operands on row-scaled data (twice the tf32 rate, same 11-bit
    # significand). float32 inputs: 3xtf32 (fp16 operands reach only ~1e-3 on their gradients).
    precision = tuning.precision or ("tf32x3" if dtype == torch.float32 else "fp16")
    # One warpgroup unless the tile is large: measured faster at L = 1K and 4K (NOTES.md).
    num_warps = tuning.num_warps or (4 if plan.fft_size <= 8192 else 8)
    stacks = triton.cdiv(triton.cdiv(batch, 2), pairs)
    wanted = triton.cdiv((tuning.programs_per_sm or default_per_sm) * _sm_count(device), channels)
    # A divisor of the stack count, so every program has the same number of stacks.
    groups = next((g for g in range(1, stacks + 1) if stacks % g == 0 and g >= wanted), stacks)
    # Four products by default: the configuration measured on the H100 (NOTES.md, v3). Gauss's
    # three-product form compiles for sm_90 and passes the interpreter tests but is unmeasured.
    gauss = bool(tuning.gauss)
    return _Launch(plan, pairs, chunk, precision, gauss, num_warps, groups, stacks // groups)


@functools.cache
def _sm_count(device: torch.device) -> int:
    # Queried once per device. Without a CUDA runtime (CPU tests that trace launches on fake
    # CUDA tensors) nothing is launched and any count will do.
    if device.type != "cuda" or not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dft_tiles(plan: MonarchPlan, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(F1, F2, Tw) for the plan: made once per size and device (see launch.cached_constants)."""
    return cached_constants(("monarch_dft", plan.n1, plan.n2), device, lambda dev: dft_constants(plan, dev))


def _strides(t: Optional[torch.Tensor], n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


@triton.jit
def _gelu(c):
    return 0.5 * c * (1.0 + tl.math.erf(c * 0.7071067811865476))


@triton.jit
def _gelu_grad(c):
    cdf = 0.5 * (1.0 + tl.math.erf(c * 0.7071067811865476))
    return cdf + c * tl.exp(-0.5 * c * c) * 0.3989422804014327


@triton.jit
def _load_gated_pairs(u_ptr, gate_ptr, b_a, b_b, valid_a, valid_b, h, t, seqlen,
                      su_b, su_h, su_l, sg_b, sg_h, sg_l, HAS_GATE: tl.constexpr):
    """x = u * gate for both rows of every pair of a stack."""
    xa = load_stack(u_ptr, b_a * su_b + h * su_h, valid_a, t, seqlen, su_l)
    xb = load_stack(u_ptr, b_b * su_b + h * su_h, valid_b, t, seqlen, su_l)
    if HAS_GATE:
        xa *= load_stack(gate_ptr, b_a * sg_b + h * sg_h, valid_a, t, seqlen, sg_l)
        xb *= load_stack(gate_ptr, b_b * sg_b + h * sg_h, valid_b, t, seqlen, sg_l)
    return xa, xb


@triton.jit
def _channel_constants(spec_ptr, scales_ptr, d_ptr, h, N1: tl.constexpr, N2: tl.constexpr,
                       HAS_D: tl.constexpr):
    """Channel h's spectrum planes, its two scales (1/max, output scale) and its skip weight."""
    k_inv = tl.load(scales_ptr + 2 * h)
    k_out = tl.load(scales_ptr + 2 * h + 1)
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    return spec_ptr + h * 2 * N1 * N2, k_inv, k_out, d


@triton.jit
def _stack_rows(group, it, stacks_per_program, p, batch, P: tl.constexpr):
    """Batch rows of the pairs of a program's it-th stack: (first, second, first valid, second valid)."""
    b_a = 2 * ((group * stacks_per_program + it) * P + p)  # (P*N2, 1)
    b_b = b_a + 1
    return b_a, b_b, b_a < batch, b_b < batch


# ----------------------------------------------------------------------------------- spectrum --
@triton.jit
def _spectrum_kernel(
    k_ptr, spec_ptr, scales_ptr, f1_ptr, f2_ptr, tw_ptr,
    kernel_len, sk_h, sk_l, sqrt_n,
    N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, GAUSS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """spec[h] = U (k[h] / s) in the Monarch order; scales[h] = (1 / max|spec[h]|, sqrt(N) s max|spec[h]|)."""
    h = tl.program_id(0)
    HALF: tl.constexpr = N1 // 2
    t, unused_pair = stack_times(1, N2, HALF)
    x = tl.load(k_ptr + h * sk_h + t * sk_l, mask=t < kernel_len, other=0.0).to(tl.float32)
    k_max_abs = row_max(x, 1, N2, HALF, PRECISION)
    zr = operand(x / to_stack(k_max_abs, 1, N2, HALF), PRECISION)
    zi = operand(tl.zeros((N2, HALF), dtype=tl.float32), PRECISION)
    f2 = load_f2(f2_ptr, N2, PRECISION)
    spec_max = 0.0
    for chunk_start in tl.range(0, N1, CHUNK):
        # Named, not `_`: Triton treats a reassigned `_` as a loop-carried variable.
        f1, unused_g1, twr, twi = chunk_constants(f1_ptr, tw_ptr, chunk_start, N1, N2, CHUNK, PRECISION)
        cr, ci = stack_forward_chunk(zr, zi, f1, twr, twi, f2, 1, N2, CHUNK, GAUSS, PRECISION)
        offs = (chunk_start + tl.arange(0, CHUNK))[:, None] * N2 + tl.arange(0, N2)[None, :]
        tl.store(spec_ptr + h * 2 * N1 * N2 + offs, cr)
        tl.store(spec_ptr + h * 2 * N1 * N2 + N1 * N2 + offs, ci)
        spec_max = tl.maximum(spec_max, tl.max(cr * cr + ci * ci))
    spec_max = tl.sqrt(spec_max)
    spec_max = tl.where(spec_max > 0, spec_max, 1.0)
    tl.store(scales_ptr + 2 * h, 1.0 / spec_max)
    tl.store(scales_ptr + 2 * h + 1, sqrt_n * tl.max(k_max_abs) * spec_max)


def kernel_spectrum(k: torch.Tensor, plan: MonarchPlan, precision: str,
                    gauss: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(spectrum planes (H, 2, N1, N2), scales (H, 2)) of k for the convolution kernels."""
    channels, kernel_len = k.shape
    f1, f2, tw = _dft_tiles(plan, k.device)
    spec = torch.empty(channels, 2, plan.n1, plan.n2, dtype=torch.float32, device=k.device)
    scales = torch.empty(channels, 2, dtype=torch.float32, device=k.device)
    launch(
        _spectrum_kernel, (channels,),
        k, spec, scales, f1, f2, tw, kernel_len, *k.stride(), float(plan.fft_size) ** 0.5,
        N1=plan.n1, N2=plan.n2, CHUNK=plan.chunk, GAUSS=gauss, PRECISION=precision,
        num_warps=4 if plan.fft_size <= 4096 else 8, num_stages=1,
    )
    return spec, scales


# ------------------------------------------------------------------------------------ forward --
@triton.jit
def _fftconv_fwd_kernel(
    u_ptr, spec_ptr, scales_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr, y_ptr,
    f1_ptr, f2_ptr, tw_ptr,
    batch, channels, seqlen, stacks_per_program,
    su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, GAUSS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = N1 // 2
    t, p = stack_times(P, N2, HALF)
    in_seq = t < seqlen
    spec_h, k_inv, k_out, d = _channel_constants(spec_ptr, scales_ptr, d_ptr, h, N1, N2, HAS_D)

    for it in tl.range(0, stacks_per_program):
        b_a, b_b, valid_a, valid_b = _stack_rows(group, it, stacks_per_program, p, batch, P)
        xa, xb = _load_gated_pairs(u_ptr, gate_in_ptr, b_a, b_b, valid_a, valid_b, h, t, seqlen,
                                   su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, HAS_GATE_IN)
        sa = row_max(xa, P, N2, HALF, PRECISION)
        sb = row_max(xb, P, N2, HALF, PRECISION)
        yr, yi = conv_stack(operand(xa / to_stack(sa, P, N2, HALF), PRECISION),
                            operand(xb / to_stack(sb, P, N2, HALF), PRECISION), spec_h, k_inv,
                            f1_ptr, f2_ptr, tw_ptr, P, N1, N2, CHUNK, GAUSS, PRECISION)
        # Reload x for the skip term (an L1/L2 hit) rather than hold it in registers through the loop.
        xa, xb = _load_gated_pairs(u_ptr, gate_in_ptr, b_a, b_b, valid_a, valid_b, h, t, seqlen,
                                   su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, HAS_GATE_IN)
        ca = yr * to_stack(sa * k_out, P, N2, HALF) + d * xa
        cb = yi * to_stack(sb * k_out, P, N2, HALF) + d * xb
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
    """Launch the forward kernels. Inputs are assumed valid (the op validates them).

    ``alloc(shape, dtype=, device=)`` makes the output (tests pass one that poisons it).
    """
    batch, channels, seqlen = u.shape
    params = _launch(u, tuning, default_per_sm=4)
    plan = params.plan
    f1, f2, tw = _dft_tiles(plan, u.device)
    spec, scales = kernel_spectrum(k, plan, params.precision, params.gauss)
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    launch(
        _fftconv_fwd_kernel, (params.groups, channels),
        u, spec, scales, D, gate_in, gate_out, dropout_mask, y, f1, f2, tw,
        batch, channels, seqlen, params.stacks_per_program,
        *u.stride(), *_strides(gate_in, 3), *_strides(gate_out, 3), *_strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        P=params.pairs, N1=plan.n1, N2=plan.n2, CHUNK=params.chunk, GAUSS=params.gauss,
        PRECISION=params.precision,
        num_warps=params.num_warps, num_stages=1,
    )
    return y


# ----------------------------------------------------------------------------------- backward --
@triton.jit
def _fftconv_bwd_kernel(
    dy_ptr, u_ptr, spec_ptr, scales_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr,
    du_ptr, dgate_in_ptr, dgate_out_ptr, dk_spec_part_ptr, dd_part_ptr,
    f1_ptr, f2_ptr, tw_ptr,
    batch, channels, seqlen, stacks_per_program, num_groups,
    sdy_b, sdy_h, sdy_l, su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    P: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, GAUSS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = N1 // 2
    t, p = stack_times(P, N2, HALF)
    in_seq = t < seqlen
    spec_h, k_inv, k_out, d = _channel_constants(spec_ptr, scales_ptr, d_ptr, h, N1, N2, HAS_D)
    # This program's slice of the partial dk spectrum: (2, N1, N2), zero-initialised by the launcher.
    s_ptr = dk_spec_part_ptr + (h * num_groups + group) * 2 * N1 * N2
    dd_acc = tl.zeros((P * N2, HALF), dtype=tl.float32)
    f2 = load_f2(f2_ptr, N2, PRECISION)

    for it in tl.range(0, stacks_per_program):
        b_a, b_b, valid_a, valid_b = _stack_rows(group, it, stacks_per_program, p, batch, P)
        ua = load_stack(u_ptr, b_a * su_b + h * su_h, valid_a, t, seqlen, su_l)
        ub = load_stack(u_ptr, b_b * su_b + h * su_h, valid_b, t, seqlen, su_l)
        xa, xb = ua, ub
        if HAS_GATE_IN:
            gia = load_stack(gate_in_ptr, b_a * sgi_b + h * sgi_h, valid_a, t, seqlen, sgi_l)
            gib = load_stack(gate_in_ptr, b_b * sgi_b + h * sgi_h, valid_b, t, seqlen, sgi_l)
            xa, xb = ua * gia, ub * gib
        sxa_p = row_max(xa, P, N2, HALF, PRECISION)
        sxb_p = row_max(xb, P, N2, HALF, PRECISION)
        sxa = to_stack(sxa_p, P, N2, HALF)
        sxb = to_stack(sxb_p, P, N2, HALF)
        zxr, zxi = operand(xa / sxa, PRECISION), operand(xb / sxb, PRECISION)
        dca = load_stack(dy_ptr, b_a * sdy_b + h * sdy_h, valid_a, t, seqlen, sdy_l)
        dcb = load_stack(dy_ptr, b_b * sdy_b + h * sdy_h, valid_b, t, seqlen, sdy_l)
        if HAS_MASK:
            ma = tl.load(mask_ptr + b_a * sm_b + h * sm_h, mask=valid_a, other=0.0).to(tl.float32)
            mb = tl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=valid_b, other=0.0).to(tl.float32)
        if GELU or HAS_GATE_OUT:
            # Recompute the pre-activation c = conv(x, k) + D x rather than storing it.
            yr, yi = conv_stack(zxr, zxi, spec_h, k_inv, f1_ptr, f2_ptr, tw_ptr,
                                P, N1, N2, CHUNK, GAUSS, PRECISION)
            ca = yr * (sxa * k_out) + d * xa
            cb = yi * (sxb * k_out) + d * xb
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
            dd_acc += dca * xa + dcb * xb
        # Scale dc's rows so that both rows of a pair carry the same product of scales q: then the
        # real part of U dc * conj(U x) is q (dc_a x_a + dc_b x_b), what dk needs.
        q_p = tl.maximum(row_max(dca, P, N2, HALF, PRECISION) * sxa_p,
                         row_max(dcb, P, N2, HALF, PRECISION) * sxb_p)
        dsa = to_stack(q_p / sxa_p, P, N2, HALF)
        dsb = to_stack(q_p / sxb_p, P, N2, HALF)
        zdr, zdi = operand(dca / dsa, PRECISION), operand(dcb / dsb, PRECISION)
        q3 = q_p[:, None, None]

        # One walk over the spectrum: du = corr(dc, k), and q U dc conj(U x) summed for dk.
        yr = tl.zeros((P * N2, HALF), dtype=tl.float32)
        yi = tl.zeros((P * N2, HALF), dtype=tl.float32)
        for chunk_start in tl.range(0, N1, CHUNK):
            f1, g1, twr, twi = chunk_constants(f1_ptr, tw_ptr, chunk_start, N1, N2, CHUNK, PRECISION)
            xr, xi = stack_forward_chunk(zxr, zxi, f1, twr, twi, f2, P, N2, CHUNK, GAUSS, PRECISION)
            gr, gi = stack_forward_chunk(zdr, zdi, f1, twr, twi, f2, P, N2, CHUNK, GAUSS, PRECISION)
            prod_r = tl.reshape(gr * xr + gi * xi, (P, CHUNK, N2))
            prod_i = tl.reshape(gi * xr - gr * xi, (P, CHUNK, N2))
            offs = (chunk_start + tl.arange(0, CHUNK))[:, None] * N2 + tl.arange(0, N2)[None, :]
            sr = tl.load(s_ptr + offs) + tl.sum(prod_r * q3, axis=0)
            si = tl.load(s_ptr + N1 * N2 + offs) + tl.sum(prod_i * q3, axis=0)
            tl.store(s_ptr + offs, sr)
            tl.store(s_ptr + N1 * N2 + offs, si)
            er, ei = multiply_spectrum(gr, gi, spec_h, chunk_start, k_inv, True, P, N1, N2, CHUNK)
            pr, pi = stack_inverse_chunk(er, ei, twr, twi, f2, g1, P, N2, CHUNK, GAUSS, PRECISION)
            yr += pr
            yi += pi
        # The next stack reads this stack's partial spectrum, possibly from other threads.
        tl.debug_barrier()

        dxa = yr * (dsa * k_out) + d * dca
        dxb = yi * (dsb * k_out) + d * dcb
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

    if HAS_D:
        tl.store(dd_part_ptr + h * num_groups + group, tl.sum(tl.sum(dd_acc, axis=1), axis=0))


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
    """Launch the backward kernels; returns (du, dk, dD, dgate_in, dgate_out), None for absent inputs."""
    batch, channels, seqlen = u.shape
    params = _launch(u, tuning, default_per_sm=2)
    plan = params.plan
    f1, f2, tw = _dft_tiles(plan, u.device)
    spec, scales = kernel_spectrum(k, plan, params.precision, params.gauss)
    du = alloc(u.shape, dtype=u.dtype, device=u.device)
    dgate_in = alloc(u.shape, dtype=gate_in.dtype, device=u.device) if gate_in is not None else None
    dgate_out = alloc(u.shape, dtype=gate_out.dtype, device=u.device) if gate_out is not None else None
    dk_spec_part = torch.zeros(channels, params.groups, 2, plan.n1, plan.n2, dtype=torch.float32, device=u.device)
    dd_part = torch.empty(channels, params.groups, dtype=torch.float32, device=u.device) if D is not None else None
    launch(
        _fftconv_bwd_kernel, (params.groups, channels),
        grad_y, u, spec, scales, D, gate_in, gate_out, dropout_mask,
        du, dgate_in, dgate_out, dk_spec_part, dd_part, f1, f2, tw,
        batch, channels, seqlen, params.stacks_per_program, params.groups,
        *grad_y.stride(), *u.stride(), *_strides(gate_in, 3), *_strides(gate_out, 3),
        *_strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        P=params.pairs, N1=plan.n1, N2=plan.n2, CHUNK=params.chunk, GAUSS=params.gauss,
        PRECISION=params.precision,
        num_warps=params.num_warps, num_stages=1,
    )
    # Fixed-order reductions over the programs: deterministic dk and dD. The kernel summed
    # U dc * conj(U x) with unitary U; the correlation is N * ifft of that.
    dk = spectrum_to_time(dk_spec_part.sum(1) * plan.fft_size, plan, k.shape[-1]).to(k.dtype)
    dD = dd_part.sum(1).to(D.dtype) if D is not None else None
    return du, dk, dD, dgate_in, dgate_out
