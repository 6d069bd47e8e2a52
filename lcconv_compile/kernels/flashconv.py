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

from typing import Callable, Optional

import torch
import triton
import triton.language as tl

from .monarch import (
    causal_conv_pair,
    dft_constants,
    forward_chunk,
    inverse_chunk_accumulate,
    kernel_spectrum,
    load_pair,
    load_planes,
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


def _precision(dtype: torch.dtype) -> str:
    # tf32 products lose ~1e-3 relative per stage; float32 inputs ask for 3xtf32 to stay < 1e-3.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _num_warps(fft_size: int) -> int:
    return 4 if fft_size <= 2048 else 8


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
    u_ptr, k_spec_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr, y_ptr,
    f1_ptr, f2_ptr, tw_ptr,
    batch, channels, seqlen,
    su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr,
    N1: tl.constexpr, N2: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr,
):
    pair = tl.program_id(0)
    h = tl.program_id(1)
    b_a = 2 * pair
    b_b = b_a + 1
    has_b = b_b < batch
    HALF: tl.constexpr = N1 // 2
    offs = tl.arange(0, HALF)[:, None] * N2 + tl.arange(0, N2)[None, :]  # time t = n1*N2 + n2

    xa, xb = load_pair(u_ptr, b_a * su_b + h * su_h, b_b * su_b + h * su_h, has_b, offs, seqlen, su_l)
    if HAS_GATE_IN:
        ga, gb = load_pair(gate_in_ptr, b_a * sgi_b + h * sgi_h, b_b * sgi_b + h * sgi_h, has_b,
                           offs, seqlen, sgi_l)
        xa, xb = xa * ga, xb * gb

    ca, cb = causal_conv_pair(xa, xb, k_spec_ptr + h * 2 * N1 * N2, f1_ptr, f2_ptr, tw_ptr, False,
                              N1, N2, CHUNK, PRECISION)
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
        ca, cb = ca + d * xa, cb + d * xb
    if GELU:
        ca, cb = _gelu(ca), _gelu(cb)
    if HAS_MASK:
        ca *= tl.load(mask_ptr + b_a * sm_b + h * sm_h).to(tl.float32)
        cb *= tl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=has_b, other=0.0).to(tl.float32)
    if HAS_GATE_OUT:
        ga, gb = load_pair(gate_out_ptr, b_a * sgo_b + h * sgo_h, b_b * sgo_b + h * sgo_h, has_b,
                           offs, seqlen, sgo_l)
        ca, cb = ca * ga, cb * gb

    in_seq = offs < seqlen
    row_a = (b_a * channels + h) * seqlen
    tl.store(y_ptr + row_a + offs, ca.to(y_ptr.dtype.element_ty), mask=in_seq)
    tl.store(y_ptr + row_a + channels * seqlen + offs, cb.to(y_ptr.dtype.element_ty), mask=in_seq & has_b)


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
) -> torch.Tensor:
    """Launch the forward kernel. Inputs are assumed valid (the op validates them).

    ``alloc(shape, dtype=, device=)`` makes the output (tests pass one that poisons it).
    """
    batch, channels, seqlen = u.shape
    plan = plan_for(seqlen)
    f1, f2, tw = dft_constants(plan, u.device)
    k_spec = kernel_spectrum(k, plan)
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    grid = (triton.cdiv(batch, 2), channels)
    _fftconv_fwd_kernel[grid](
        u, k_spec, D, gate_in, gate_out, dropout_mask, y, f1, f2, tw,
        batch, channels, seqlen,
        *u.stride(), *_strides(gate_in, 3), *_strides(gate_out, 3), *_strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        N1=plan.n1, N2=plan.n2, CHUNK=plan.chunk, PRECISION=_precision(u.dtype),
        num_warps=_num_warps(plan.fft_size),
    )
    return y


# ----------------------------------------------------------------------------------- backward --
@triton.jit
def _fftconv_bwd_kernel(
    dy_ptr, u_ptr, k_spec_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr,
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
    # This program's slice of the partial dk spectrum: (2, N1, N2), zero-initialised by the launcher.
    s_ptr = dk_spec_part_ptr + (h * num_groups + group) * 2 * N1 * N2
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    dd_acc = tl.zeros((HALF, N2), dtype=tl.float32)

    for i in tl.range(0, pairs_per_group):
        pair = group * pairs_per_group + i
        b_a = 2 * pair
        b_b = b_a + 1
        has_b = b_b < batch
        ua, ub = load_pair(u_ptr, b_a * su_b + h * su_h, b_b * su_b + h * su_h, has_b, offs, seqlen, su_l)
        xa, xb = ua, ub
        if HAS_GATE_IN:
            gia, gib = load_pair(gate_in_ptr, b_a * sgi_b + h * sgi_h, b_b * sgi_b + h * sgi_h, has_b,
                                 offs, seqlen, sgi_l)
            xa, xb = ua * gia, ub * gib
        dca, dcb = load_pair(dy_ptr, b_a * sdy_b + h * sdy_h, b_b * sdy_b + h * sdy_h, has_b,
                             offs, seqlen, sdy_l)
        if HAS_MASK:
            ma = tl.load(mask_ptr + b_a * sm_b + h * sm_h).to(tl.float32)
            mb = tl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=has_b, other=0.0).to(tl.float32)
        if GELU or HAS_GATE_OUT:
            # Recompute the pre-activation c = conv(x, k) + D x rather than storing it.
            ca, cb = causal_conv_pair(xa, xb, k_spec_h, f1_ptr, f2_ptr, tw_ptr, False,
                                      N1, N2, CHUNK, PRECISION)
            ca, cb = ca + d * xa, cb + d * xb
            if HAS_GATE_OUT:
                act_a, act_b = ca, cb
                if GELU:
                    act_a, act_b = _gelu(ca), _gelu(cb)
                if HAS_MASK:
                    act_a, act_b = act_a * ma, act_b * mb
                row_a = (b_a * channels + h) * seqlen
                row_b = row_a + channels * seqlen
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

        # One walk over the spectrum: du = corr(dc, k) and sum_b FFT(dc_b) conj(FFT(x_b)).
        yr = tl.zeros((HALF, N2), dtype=tl.float32)
        yi = tl.zeros((HALF, N2), dtype=tl.float32)
        for chunk_start in tl.range(0, N1, CHUNK):
            rows = chunk_start + tl.arange(0, CHUNK)
            xr, xi = forward_chunk(xa, xb, chunk_start, f1_ptr, f2_ptr, tw_ptr, N1, N2, CHUNK, PRECISION)
            gr, gi = forward_chunk(dca, dcb, chunk_start, f1_ptr, f2_ptr, tw_ptr, N1, N2, CHUNK, PRECISION)
            s_offs = rows[:, None] * N2 + cols[None, :]
            sr = tl.load(s_ptr + s_offs)
            si = tl.load(s_ptr + N1 * N2 + s_offs)
            tl.store(s_ptr + s_offs, sr + gr * xr + gi * xi)
            tl.store(s_ptr + N1 * N2 + s_offs, si + gi * xr - gr * xi)
            kr, ki = load_planes(k_spec_h, rows, cols, N2, N1 * N2)
            er, ei = gr * kr + gi * ki, gi * kr - gr * ki  # * conj(K): correlation
            yr, yi = inverse_chunk_accumulate(er, ei, chunk_start, yr, yi, f1_ptr, f2_ptr, tw_ptr,
                                              N1, N2, CHUNK, PRECISION)
        # The next pair reads this pair's partial spectrum, possibly from other threads.
        tl.debug_barrier()

        dxa, dxb = yr + d * dca, yi + d * dcb
        row_a = (b_a * channels + h) * seqlen
        row_b = row_a + channels * seqlen
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


def _num_groups(batch: int, channels: int, device: torch.device) -> int:
    """Batch-pair groups per channel: a divisor of the pair count (every group is full), the
    smallest one that gives enough programs to fill the GPU twice over."""
    pairs = triton.cdiv(batch, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    wanted = triton.cdiv(2 * sms, channels)
    return next((g for g in range(1, pairs + 1) if pairs % g == 0 and g >= wanted), pairs)


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
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Launch the backward kernel; returns (du, dk, dD, dgate_in, dgate_out) with None for absent inputs."""
    batch, channels, seqlen = u.shape
    plan = plan_for(seqlen)
    f1, f2, tw = dft_constants(plan, u.device)
    k_spec = kernel_spectrum(k, plan)
    groups = num_groups or _num_groups(batch, channels, u.device)
    if triton.cdiv(batch, 2) % groups:
        raise ValueError(f"num_groups={groups} must divide the number of batch pairs {triton.cdiv(batch, 2)}")
    du = alloc(u.shape, dtype=u.dtype, device=u.device)
    dgate_in = alloc(u.shape, dtype=gate_in.dtype, device=u.device) if gate_in is not None else None
    dgate_out = alloc(u.shape, dtype=gate_out.dtype, device=u.device) if gate_out is not None else None
    dk_spec_part = torch.zeros(channels, groups, 2, plan.n1, plan.n2, dtype=torch.float32, device=u.device)
    dd_part = torch.empty(channels, groups, dtype=torch.float32, device=u.device) if D is not None else None
    _fftconv_bwd_kernel[(groups, channels)](
        grad_y, u, k_spec, D, gate_in, gate_out, dropout_mask,
        du, dgate_in, dgate_out, dk_spec_part, dd_part, f1, f2, tw,
        batch, channels, seqlen, triton.cdiv(batch, 2) // groups, groups,
        *grad_y.stride(), *u.stride(), *_strides(gate_in, 3), *_strides(gate_out, 3),
        *_strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None,
        N1=plan.n1, N2=plan.n2, CHUNK=plan.chunk, PRECISION=_precision(u.dtype),
        num_warps=_num_warps(plan.fft_size),
    )
    # Fixed-order reductions over the groups: deterministic dk and dD.
    dk = spectrum_to_time(dk_spec_part.sum(1), plan, k.shape[-1]).to(k.dtype)
    dD = dd_part.sum(1).to(D.dtype) if D is not None else None
    return du, dk, dD, dgate_in, dgate_out
