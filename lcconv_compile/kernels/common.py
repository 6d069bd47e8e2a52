"""Small pieces every kernel family shares: the fused GELU and its derivative, tensor-core operand
casts, stack loads, launch-side stride and SM-count helpers.

Only helpers used by more than one family live here; an algorithm's own building blocks stay in its
module. Knows torch and Triton only (no torch.library, no Inductor, no kernel launches).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["gelu", "gelu_grad", "load_gated_pairs", "load_stack", "offsets_fit_int32", "operand", "sm_count",
           "stack_rows", "strides"]

# The kernels compute element offsets in 32-bit integers (e.g. blockfft_conv stores at
# `(b * channels + h) * seqlen + t`, program ids times int32 sizes), so
# no tensor they index may hold 2^31 elements or more: past that an offset wraps and the kernel
# reads or writes out of bounds (found as an illegal memory access at (1, 768, 1M), whose
# FlashButterfly intermediate holds 3.2e9 numbers). The families refuse such inputs (the op then
# runs the reference) until their offsets are 64-bit.
INT32_OFFSET_LIMIT = 2**31


def offsets_fit_int32(*numels: int) -> bool:
    """Whether tensors of these element counts can all be indexed with 32-bit offsets."""
    return all(n < INT32_OFFSET_LIMIT for n in numels)


def strides(t: Optional[torch.Tensor], n: int) -> tuple[int, ...]:
    """t's strides, or n zeros for an absent optional tensor (its kernel arguments are unused)."""
    return tuple(t.stride()) if t is not None else (0,) * n


@functools.cache
def sm_count(device: torch.device) -> int:
    # Queried once per device. Without a CUDA runtime (CPU tests that trace launches on fake
    # CUDA tensors) nothing is launched and any count will do.
    if device.type != "cuda" or not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def gelu(c):
    """Exact (erf) GELU, as torch.nn.functional.gelu."""
    return 0.5 * c * (1.0 + tl.math.erf(c * 0.7071067811865476))


@triton.jit
def gelu_grad(c):
    cdf = 0.5 * (1.0 + tl.math.erf(c * 0.7071067811865476))
    return cdf + c * tl.exp(-0.5 * c * c) * 0.3989422804014327


@triton.jit
def operand(x, PRECISION: tl.constexpr):
    """A tensor-core operand: float16 in the "fp16" mode (data is scaled to |x| <= 1)."""
    if PRECISION == "fp16":
        return x.to(tl.float16)
    else:
        return x


@triton.jit
def load_stack(ptr, row_offset, row_valid, t, seqlen, stride_l):
    """One row of each pair of a stack (row_offset/row_valid broadcast against t) as float32, 0 past L."""
    return tl.load(ptr + row_offset + t * stride_l, mask=row_valid & (t < seqlen), other=0.0).to(tl.float32)


@triton.jit
def load_gated_pairs(u_ptr, gate_ptr, b_a, b_b, valid_a, valid_b, h, t, seqlen,
                     su_b, su_h, su_l, sg_b, sg_h, sg_l, HAS_GATE: tl.constexpr):
    """x = u * gate for both rows of every pair of a stack."""
    xa = load_stack(u_ptr, b_a * su_b + h * su_h, valid_a, t, seqlen, su_l)
    xb = load_stack(u_ptr, b_b * su_b + h * su_h, valid_b, t, seqlen, su_l)
    if HAS_GATE:
        xa *= load_stack(gate_ptr, b_a * sg_b + h * sg_h, valid_a, t, seqlen, sg_l)
        xb *= load_stack(gate_ptr, b_b * sg_b + h * sg_h, valid_b, t, seqlen, sg_l)
    return xa, xb


@triton.jit
def stack_rows(group, it, stacks_per_program, p, batch, P: tl.constexpr):
    """Batch rows of the pairs of a program's it-th stack: (first, second, first valid, second valid)."""
    b_a = 2 * ((group * stacks_per_program + it) * P + p)
    b_b = b_a + 1
    return b_a, b_b, b_a < batch, b_b < batch
