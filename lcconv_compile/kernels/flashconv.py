"""FlashConv: the single-pass Triton kernels behind ``lcconv::fftconv`` on GPUs, and their launchers.

Forward: one program per (pair of batch rows, channel). It reads its two rows of ``u`` once
(zero padding is implicit: masked loads), runs the block FFT convolution of
:mod:`.monarch` on tensor cores, applies the skip term, GELU, dropout mask and gates in
registers and writes ``y`` once in u's dtype. The kernel's spectrum is computed per call by the
launcher (one small FFT over H rows, shared by the whole batch).

Backward: one program per (channel, group of batch pairs). It recomputes the pre-activation
where GELU or the output gate needs it, forms ``dc``, and in one walk over the spectrum chunks
produces ``du = corr(dc, k)`` and accumulates ``sum_b FFT(dc_b) * conj(FFT(x_b))`` for ``dk``
(two packed rows give ``dc_a x_a + dc_b x_b`` in the real part, see monarch.py). Per-group
partial spectra and ``dD`` sums are reduced in a fixed order by the launcher: ``dk`` and ``dD``
are bit-identical for identical inputs.

Knows torch and Triton only. Sizes: see :func:`supports`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .monarch import (
    causal_conv_pair,
    dft_constants,
    forward_tile,
    inverse_tile,
    kernel_spectrum,
    load_chunk_constants,
    load_f2,
    load_pair,
    load_planes,
    operand,
    pair_scale,
    plan_for,
    spectrum_to_time,
)

MAX_SEQLEN = 8192  # N = 16384 is the largest block FFT kept on chip
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the single-pass kernels handle these inputs (else the caller uses the reference)."""
    return (
        u.is_cuda
        and u.dtype in KERNEL_DTYPES
        and k.dtype in KERNEL_DTYPES
        and u.shape[-1] <= MAX_SEQLEN
    )


@dataclass(frozen=True)
class Tuning:
    """Launch parameters a caller may override (benchmarks explore them); None = the default."""

    chunk: Optional[int] = None  # spectrum rows per step of the chunk loop
    num_warps: Optional[int] = None
    precision: Optional[str] = None  # "fp16", "tf32", "tf32x3" or "ieee"
    programs_per_sm: Optional[int] = None


def _precision(dtype: torch.dtype) -> str:
    """Tensor-core operand mode. Half inputs: float16 operands on pair-scaled data (2x the tf32
    rate, same 11-bit significand). float32 inputs: 3xtf32, to stay under 1e-3 relative error."""
    return "tf32x3" if dtype == torch.float32 else "fp16"


def _num_warps(fft_size: int) -> int:
    return 4 if fft_size <= 2048 else 8


def _pair_groups(batch: int, channels: int, device: torch.device, per_sm: int) -> int:
    """Groups of batch pairs per channel, one program each: a divisor of the pair count (every
    group is full), the smallest that gives at least ``per_sm`` programs per multiprocessor."""
    pairs = triton.cdiv(batch, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(per_sm * sms, channels)
    return next((g for g in range(1, pairs + 1) if pairs % g == 0 and g >= wanted), pairs)


@triton.jit
def _gelu(c):
    return 0.5 * c * (1.0 + tl.math.erf(c * 0.7071067811865476))


@triton.jit
def _gelu_grad(c):
    cdf = 0.5 * (1.0 + tl.math.erf(c * 0.7071067811865476))
    return cdf + c * tl.exp(-0.5 * c * c) * 0.3989422804014327


# ------------------------------------------------------------------------------------ forward --
@triton.jit
def _fftconv_fwd_kernel(
    u_ptr, k_spec_ptr, k_scale_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr, y_ptr,
    f1_ptr, f2_ptr, tw_ptr,
    batch, channels, seqlen, pairs_per_group,
    su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = N1 // 2
    offs = tl.arange(0, HALF)[:, None] * N2 + tl.arange(0, N2)[None, :]  # time t = n1*N2 + n2
    in_seq = offs < seqlen
    k_spec_h = k_spec_ptr + h * 2 * N1 * N2
    k_scale = tl.load(k_scale_ptr + h)
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)

    for i in tl.range(0, pairs_per_group):
        b_a = 2 * (group * pairs_per_group + i)
        b_b = b_a + 1
        has_b = b_b < batch
        xa, xb = load_pair(u_ptr, b_a * su_b + h * su_h, b_b * su_b + h * su_h, has_b, offs, seqlen, su_l)
        if HAS_GATE_IN:
            ga, gb = load_pair(gate_in_ptr, b_a * sgi_b + h * sgi_h, b_b * sgi_b + h * sgi_h, has_b,
                               offs, seqlen, sgi_l)
            xa, xb = xa * ga, xb * gb
        x_scale = pair_scale(xa, xb, PRECISION)
        ca, cb = causal_conv_pair(xa / x_scale, xb / x_scale, k_spec_h, f1_ptr, f2_ptr, tw_ptr, False,
                                  N1, N2, CHUNK, PRECISION)
        ca, cb = ca * (x_scale * k_scale) + d * xa, cb * (x_scale * k_scale) + d * xb
        if GELU:
            ca, cb = _gelu(ca), _gelu(cb)
        if HAS_MASK:
            ca *= tl.load(mask_ptr + b_a * sm_b + h * sm_h).to(tl.float32)
            cb *= tl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=has_b, other=0.0).to(tl.float32)
        if HAS_GATE_OUT:
            ga, gb = load_pair(gate_out_ptr, b_a * sgo_b + h * sgo_h, b_b * sgo_b + h * sgo_h, has_b,
                               offs, seqlen, sgo_l)
            ca, cb = ca * ga, cb * gb
        row_a = (b_a * channels + h) * seqlen
        tl.store(y_ptr + row_a + offs, ca.to(y_ptr.dtype.element_ty), mask=in_seq)
        tl.store(y_ptr + row_a + channels * seqlen + offs, cb.to(y_ptr.dtype.element_ty),
                 mask=in_seq & has_b)


def _strides(t: Optional[torch.Tensor], n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


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
    """Launch the forward kernel. Inputs are assumed valid (the op validates them).

    ``alloc(shape, dtype=, device=)`` makes the output (tests pass one that poisons it).
    """
    batch, channels, seqlen = u.shape
    plan = plan_for(seqlen)
    f1, f2, tw = dft_constants(plan, u.device)
    k_spec, k_scale = kernel_spectrum(k, plan)
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    groups = _pair_groups(batch, channels, u.device, per_sm=tuning.programs_per_sm or 4)
    _fftconv_fwd_kernel[(groups, channels)](
        u, k_spec, k_scale, D, gate_in, gate_out, dropout_mask, y, f1, f2, tw,
        batch, channels, seqlen, triton.cdiv(batch, 2) // groups,
        *u.stride(), *_strides(gate_in, 3), *_strides(gate_out, 3), *_strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        N1=plan.n1, N2=plan.n2, CHUNK=tuning.chunk or plan.chunk,
        PRECISION=tuning.precision or _precision(u.dtype),
        num_warps=tuning.num_warps or _num_warps(plan.fft_size), num_stages=1,
    )
    return y


# ----------------------------------------------------------------------------------- backward --
@triton.jit
def _fftconv_bwd_kernel(
    dy_ptr, u_ptr, k_spec_ptr, k_scale_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr,
    du_ptr, dgate_in_ptr, dgate_out_ptr, dk_spec_part_ptr, dd_part_ptr,
    f1_ptr, f2_ptr, tw_ptr,
    batch, channels, seqlen, pairs_per_group, num_groups,
    sdy_b, sdy_h, sdy_l, su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    group = tl.program_id(0)
    h = tl.program_id(1)
    HALF: tl.constexpr = N1 // 2
    offs = tl.arange(0, HALF)[:, None] * N2 + tl.arange(0, N2)[None, :]
    in_seq = offs < seqlen
    cols = tl.arange(0, N2)
    k_spec_h = k_spec_ptr + h * 2 * N1 * N2
    k_scale = tl.load(k_scale_ptr + h)
    # This program's slice of the partial dk spectrum: (2, N1, N2), zero-initialised by the launcher.
    s_ptr = dk_spec_part_ptr + (h * num_groups + group) * 2 * N1 * N2
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    dd_acc = tl.zeros((HALF, N2), dtype=tl.float32)
    f2r, f2i, f2i_neg = load_f2(f2_ptr, N2, PRECISION)

    for i in tl.range(0, pairs_per_group):
        b_a = 2 * (group * pairs_per_group + i)
        b_b = b_a + 1
        has_b = b_b < batch
        row_a = (b_a * channels + h) * seqlen
        row_b = row_a + channels * seqlen
        ua, ub = load_pair(u_ptr, b_a * su_b + h * su_h, b_b * su_b + h * su_h, has_b, offs, seqlen, su_l)
        xa, xb = ua, ub
        if HAS_GATE_IN:
            gia, gib = load_pair(gate_in_ptr, b_a * sgi_b + h * sgi_h, b_b * sgi_b + h * sgi_h, has_b,
                                 offs, seqlen, sgi_l)
            xa, xb = ua * gia, ub * gib
        x_scale = pair_scale(xa, xb, PRECISION)
        dca, dcb = load_pair(dy_ptr, b_a * sdy_b + h * sdy_h, b_b * sdy_b + h * sdy_h, has_b,
                             offs, seqlen, sdy_l)
        if HAS_MASK:
            ma = tl.load(mask_ptr + b_a * sm_b + h * sm_h).to(tl.float32)
            mb = tl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=has_b, other=0.0).to(tl.float32)
        if GELU or HAS_GATE_OUT:
            # Recompute the pre-activation c = conv(x, k) + D x rather than storing it.
            ca, cb = causal_conv_pair(xa / x_scale, xb / x_scale, k_spec_h, f1_ptr, f2_ptr, tw_ptr, False,
                                      N1, N2, CHUNK, PRECISION)
            ca, cb = ca * (x_scale * k_scale) + d * xa, cb * (x_scale * k_scale) + d * xb
            if HAS_GATE_OUT:
                act_a, act_b = ca, cb
                if GELU:
                    act_a, act_b = _gelu(ca), _gelu(cb)
                if HAS_MASK:
                    act_a, act_b = act_a * ma, act_b * mb
                dgo_ty = dgate_out_ptr.dtype.element_ty
                tl.store(dgate_out_ptr + row_a + offs, (dca * act_a).to(dgo_ty), mask=in_seq)
                tl.store(dgate_out_ptr + row_b + offs, (dcb * act_b).to(dgo_ty), mask=in_seq & has_b)
                goa, gob = load_pair(gate_out_ptr, b_a * sgo_b + h * sgo_h, b_b * sgo_b + h * sgo_h,
                                     has_b, offs, seqlen, sgo_l)
                dca, dcb = dca * goa, dcb * gob
            if GELU:
                dca, dcb = dca * _gelu_grad(ca), dcb * _gelu_grad(cb)
        if HAS_MASK:
            dca, dcb = dca * ma, dcb * mb
        if HAS_D:
            dd_acc += dca * xa + dcb * xb
        dc_scale = pair_scale(dca, dcb, PRECISION)

        # One walk over the spectrum: du = corr(dc, k), and U dc * conj(U x) summed for dk.
        zxr, zxi = operand(xa / x_scale, PRECISION), operand(xb / x_scale, PRECISION)
        zdr, zdi = operand(dca / dc_scale, PRECISION), operand(dcb / dc_scale, PRECISION)
        yr = tl.zeros((HALF, N2), dtype=tl.float32)
        yi = tl.zeros((HALF, N2), dtype=tl.float32)
        for chunk_start in tl.range(0, N1, CHUNK):
            rows = chunk_start + tl.arange(0, CHUNK)
            f1r, f1i, twr, twi, g1r, g1i_neg = load_chunk_constants(f1_ptr, tw_ptr, chunk_start,
                                                                    N1, N2, CHUNK, PRECISION)
            xr, xi = forward_tile(zxr, zxi, f1r, f1i, twr, twi, f2r, f2i, PRECISION)
            gr, gi = forward_tile(zdr, zdi, f1r, f1i, twr, twi, f2r, f2i, PRECISION)
            s_offs = rows[:, None] * N2 + cols[None, :]
            both_scales = x_scale * dc_scale
            sr = tl.load(s_ptr + s_offs) + (gr * xr + gi * xi) * both_scales
            si = tl.load(s_ptr + N1 * N2 + s_offs) + (gi * xr - gr * xi) * both_scales
            tl.store(s_ptr + s_offs, sr)
            tl.store(s_ptr + N1 * N2 + s_offs, si)
            kr, ki = load_planes(k_spec_h, rows, cols, N2, N1 * N2)
            er, ei = gr * kr + gi * ki, gi * kr - gr * ki  # * conj(K): correlation
            pr, pi = inverse_tile(er, ei, twr, twi, f2r, f2i_neg, g1r, g1i_neg, PRECISION)
            yr += pr
            yi += pi
        # The next pair reads this pair's partial spectrum, possibly from other threads.
        tl.debug_barrier()

        dxa, dxb = yr * (dc_scale * k_scale) + d * dca, yi * (dc_scale * k_scale) + d * dcb
        if HAS_GATE_IN:
            dgi_ty = dgate_in_ptr.dtype.element_ty
            tl.store(dgate_in_ptr + row_a + offs, (dxa * ua).to(dgi_ty), mask=in_seq)
            tl.store(dgate_in_ptr + row_b + offs, (dxb * ub).to(dgi_ty), mask=in_seq & has_b)
            dxa, dxb = dxa * gia, dxb * gib
        du_ty = du_ptr.dtype.element_ty
        tl.store(du_ptr + row_a + offs, dxa.to(du_ty), mask=in_seq)
        tl.store(du_ptr + row_b + offs, dxb.to(du_ty), mask=in_seq & has_b)

    if HAS_D:
        tl.store(dd_part_ptr + h * num_groups + group, tl.sum(dd_acc))


def fftconv_bwd(
    grad_y: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    gate_in: Optional[torch.Tensor] = None,
    gate_out: Optional[torch.Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
    num_groups: Optional[int] = None,
    alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel; returns (du, dk, dD, dgate_in, dgate_out) with None for absent inputs."""
    batch, channels, seqlen = u.shape
    plan = plan_for(seqlen)
    f1, f2, tw = dft_constants(plan, u.device)
    k_spec, k_scale = kernel_spectrum(k, plan)
    groups = num_groups or _pair_groups(batch, channels, u.device, per_sm=tuning.programs_per_sm or 2)
    if triton.cdiv(batch, 2) % groups:
        raise ValueError(f"num_groups={groups} must divide the number of batch pairs {triton.cdiv(batch, 2)}")
    du = alloc(u.shape, dtype=u.dtype, device=u.device)
    dgate_in = alloc(u.shape, dtype=gate_in.dtype, device=u.device) if gate_in is not None else None
    dgate_out = alloc(u.shape, dtype=gate_out.dtype, device=u.device) if gate_out is not None else None
    dk_spec_part = torch.zeros(channels, groups, 2, plan.n1, plan.n2, dtype=torch.float32, device=u.device)
    dd_part = torch.empty(channels, groups, dtype=torch.float32, device=u.device) if D is not None else None
    _fftconv_bwd_kernel[(groups, channels)](
        grad_y, u, k_spec, k_scale, D, gate_in, gate_out, dropout_mask,
        du, dgate_in, dgate_out, dk_spec_part, dd_part, f1, f2, tw,
        batch, channels, seqlen, triton.cdiv(batch, 2) // groups, groups,
        *grad_y.stride(), *u.stride(), *_strides(gate_in, 3), *_strides(gate_out, 3),
        *_strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        N1=plan.n1, N2=plan.n2, CHUNK=tuning.chunk or plan.chunk,
        PRECISION=tuning.precision or _precision(u.dtype),
        num_warps=tuning.num_warps or _num_warps(plan.fft_size), num_stages=1,
    )
    # Fixed-order reductions over the groups: deterministic dk and dD. The kernel summed
    # U dc * conj(U x) with unitary U; the correlation is N * ifft of that.
    dk = spectrum_to_time(dk_spec_part.sum(1) * plan.fft_size, plan, k.shape[-1]).to(k.dtype)
    dD = dd_part.sum(1).to(D.dtype) if D is not None else None
    return du, dk, dD, dgate_in, dgate_out
