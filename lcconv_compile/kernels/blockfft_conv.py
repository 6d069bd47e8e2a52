"""FlashConv v5: single-launch forward of ``lcconv::fftconv`` on the three-level block FFT
(:mod:`.blockfft`), with the kernel's spectrum computed on chip. The interface of every family
(``supports``, ``fftconv_fwd``, ``fftconv_bwd``, ``Tuning``, ``alloc=``; see kernels/__init__.py).

Forward: one program per item (a channel's group of stacks); a stack is P row pairs of one channel,
each pair packed as one complex row ``z = a + i b`` (k is real, so ``U^H(U z * K)`` carries
both rows' convolutions in its real and imaginary parts). For every chunk of spectrum
columns k1 the program transforms the chunk of the stack, multiplies it by k's chunk and
accumulates the chunk's inverse into the output tile. k's spectrum is either formed once per
item into a per-program scratch (``kernel_spectrum="scratch"``: 2N values written and re-read
by the same SM, L2-resident) or formed again for every stack (``"recompute"``, no memory);
there is no separate launch. Zero padding is implicit (masked loads); the skip term, GELU,
dropout mask and gates are applied in registers and y is written once in u's dtype.

Sequences longer than one block-FFT plan run as two blocks of N/2 samples per row
(:func:`.blockfft.block_product`): both blocks of a pair are rows of the same stack.

Backward: one launch, one program per channel owning all its rows. Per stack it recomputes
the pre-activation where GELU or the output gate needs it, forms dc, and in one walk over the
spectrum chunks transforms k, dc and x: ``du = corr(dc, k)`` accumulates like the forward, and
``sum_pairs q U dc * conj(U x)`` (k's gradient spectrum; two packed rows give
``dc_a x_a + dc_b x_b`` in its real part) is read-modify-written in a per-channel scratch
(L2-resident, no zeroing). At the end the program inverse-transforms it into dk; dD is summed
in registers. k's spectrum: once per channel into a scratch, or per stack (as the forward).
Fixed order throughout: dk and dD are bit-identical across runs.

Precision: half inputs use float16 operands on max-scaled rows (float32 accumulation);
float32 inputs use 3xtf32 (float32 operands split by the compiler).

Knows torch and Triton only; the op (ops.py) validates inputs and picks the family through
kernels.select (kernels.FAMILIES: the dispatched family on chip).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import triton
import triton.language as tl


from .blockfft import (
    BlockFFTPlan,
    block_fft_constants,
    compiles_on_gpu,
    block_product,
    convolve_stack,
    deinterleave,
    forward_chunk,
    interleave,
    inverse_chunk,
    kernel_chunk,
    load_chunk_constants,
    load_stage_constants,
    plan_for,
    spectrum_offsets,
    store_kernel_spectrum,
)
from .common import (gelu, gelu_grad, load_gated_pairs, load_stack, offsets_fit_int32, sm_count, stack_rows,
                     strides)
from .launch import launch

# Longest sequence per input dtype. One block-FFT plan reaches N = 16384 (L = 8192) for half
# inputs; float32 operands (3xtf32) double every shared-memory tile, so the backward's fit up
# to N = 4096 (166 KB at L = 2048, 266 KB at 4096 against 227 KB; scripts/compile_check.py).
# Beyond one plan a sequence runs as two blocks of N/2 samples (blockfft.block_product):
# L = 16384 for half inputs, 4096 for float32.
SINGLE_BLOCK_SEQLEN = {torch.bfloat16: 8192, torch.float16: 8192, torch.float32: 2048}
MAX_SEQLEN = {dtype: 2 * n for dtype, n in SINGLE_BLOCK_SEQLEN.items()}
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STACK_ELEMENTS = 2048  # P * BLOCKS * N/2: complex samples of the stack held in registers per program
# Defaults measured fastest on the H100 (benchmarks/NOTES.md, v5 second run), per FFT size:
# the forward prefers a wider N1 at 8K/16K (half the chunk's working set, ~15% more FLOPs) and
# 4 pairs per stack at 2K; the backward keeps blockfft.FACTORS and wants 8 warps at 8K.
FORWARD_FACTORS = {8192: (64, 16, 8), 16384: (64, 16, 16)}
FORWARD_PAIRS = {2048: 4}
BACKWARD_WARPS = {8192: 8, 16384: 8}
# Items per SM the forward's grid aims for: a channel's stacks split into groups until the grid
# has at least this many programs per SM. The persistent grid, the next stack's prefetch, register
# caps and stage-skipping variants were measured and rejected (benchmarks/NOTES.md, "v5.1 knobs").
ITEMS_PER_SM = 4
KERNEL_SPECTRUM = ("scratch", "recompute")


def supports(u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the v5 kernels handle these inputs (else the caller uses another family): CUDA, a
    supported dtype and length, and 32-bit offsets for u (and its gates and gradients, of u's
    shape) and for the per-channel spectrum scratch (H rows of at most 2 blocks x 2 x 2L)."""
    return (
        u.is_cuda
        and u.dtype in MAX_SEQLEN
        and k.dtype in KERNEL_DTYPES
        and u.shape[-1] <= MAX_SEQLEN[u.dtype]
        and offsets_fit_int32(u.numel(), u.shape[1] * 8 * u.shape[-1])
    )


@dataclass(frozen=True)
class Tuning:
    """Launch parameters a caller may override (tests and benchmarks); None = the default."""

    pairs: Optional[int] = None  # row pairs per stack (a power of two)
    num_warps: Optional[int] = None
    chunk: Optional[int] = None  # k1 values per step of the chunk loop
    factors: Optional[tuple[int, int, int]] = None  # (N1, N2, N3) of one block; tests use small ones
    precision: Optional[str] = None  # "fp16" or "tf32x3" (or "ieee" in the interpreter)
    # "scratch": k's spectrum once per (channel, group) item into a per-program scratch (L2),
    # read back by every stack; "recompute": formed again for every stack (v5).
    kernel_spectrum: Optional[str] = None
    blocks: Optional[int] = None  # 1, or 2 (two on-chip blocks); default: 2 only beyond one plan


@dataclass(frozen=True)
class _Launch:
    plan: BlockFFTPlan  # of one block
    blocks: int
    pairs: int
    precision: str
    num_warps: int
    groups: int  # items per channel (each a run of stacks_per_item stacks)
    stacks_per_item: int
    kernel_spectrum: str


def _launch(u: torch.Tensor, tuning: Tuning, backward: bool = False) -> _Launch:
    return _launch_for(tuple(u.shape), u.dtype, u.device, tuning, backward)


@functools.lru_cache(maxsize=256)
def _launch_for(shape: tuple[int, int, int], dtype: torch.dtype, device: torch.device, tuning: Tuning,
                backward: bool) -> _Launch:
    # Cached per (shape, dtype, device, tuning, direction): a call pays one dict look-up.
    batch, channels, seqlen = shape
    if tuning.kernel_spectrum not in (None,) + KERNEL_SPECTRUM:
        raise ValueError(f"tuning.kernel_spectrum={tuning.kernel_spectrum!r}: expected one of {KERNEL_SPECTRUM}")
    if tuning.blocks not in (None, 1, 2):
        raise ValueError(f"tuning.blocks={tuning.blocks}: expected 1 or 2")
    single = SINGLE_BLOCK_SEQLEN.get(dtype, SINGLE_BLOCK_SEQLEN[torch.float32])
    blocks = tuning.blocks or (2 if seqlen > single else 1)
    block_len = triton.cdiv(seqlen, blocks)
    plan = plan_for(block_len, tuning.factors, tuning.chunk)
    if tuning.factors is None and not backward and plan.fft_size in FORWARD_FACTORS:
        plan = plan_for(block_len, FORWARD_FACTORS[plan.fft_size], tuning.chunk)
    if device.type == "cuda" and not compiles_on_gpu(plan):
        raise ValueError(f"tuning.factors={tuning.factors}, chunk={tuning.chunk}: a GPU needs n1 >= 16 and "
                         f"n2, n3, chunk >= 8 (tl.dot contracts >= 16); smaller plans are for the interpreter")
    max_pairs = max(1, STACK_ELEMENTS // (blocks * plan.fft_size // 2))
    if not backward and blocks == 1:
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
    sms = sm_count(device)
    wanted = ITEMS_PER_SM * sms
    # A divisor of the stack count, so every item has the same number of stacks.
    groups = next((g for g in range(1, stacks + 1) if stacks % g == 0 and g * channels >= wanted), stacks)
    if backward:
        groups = 1  # one program per channel owns all its rows (dk and dD in a fixed order)
    stacks_per_item = stacks // groups
    # A spectrum kept for one stack only saves nothing and costs its round trip.
    # The backward of two blocks cannot recompute it: that kernel needs more than the 227 KB of
    # shared memory (252 KB at L = 16K half, 297 KB at 4K float32, scripts/compile_check.py
    # --backward --batch 2), which failed every backward with B <= 2 at those lengths.
    recompute_fits = not (backward and blocks == 2)
    kernel_spectrum = tuning.kernel_spectrum or ("scratch" if stacks_per_item > 1 or not recompute_fits
                                                 else "recompute")
    return _Launch(plan, blocks, pairs, precision, num_warps, groups, stacks_per_item, kernel_spectrum)


@triton.jit
def _stack_times(P: tl.constexpr, BLOCKS: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr):
    """Time t = block * T + n1 * M + m (T = N/2 = HALF * M) of every element [r, n1, m] of a
    stack of R = P * BLOCKS rows in memory order (R, N1/2, M), r = pair * BLOCKS + block, and the
    pair index (R, 1, 1). Loads and stores use this order: contiguous along m, so they vectorise
    and coalesce; the transform uses the stack order [(r, m), n1] (_to_stack)."""
    n1 = tl.arange(0, HALF)[None, :, None]
    m = tl.arange(0, M)[None, None, :]
    r = tl.arange(0, P * BLOCKS)[:, None, None]
    return (r % BLOCKS) * (HALF * M) + n1 * M + m, r // BLOCKS


@triton.jit
def _to_stack(x, R: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr):
    """(R, N1/2, M) memory order -> (R*M, N1/2) stack order (a register permute)."""
    return tl.reshape(tl.permute(x, (0, 2, 1)), (R * M, HALF))


@triton.jit
def _to_memory(x, R: tl.constexpr, M: tl.constexpr, HALF: tl.constexpr):
    """(R*M, N1/2) stack order -> (R, N1/2, M) memory order."""
    return tl.permute(tl.reshape(x, (R, M, HALF)), (0, 2, 1))


@triton.jit
def _pair_scale(x, BLOCKS: tl.constexpr, PRECISION: tl.constexpr):
    """(R, 1, 1) scale of each row of a (R, N1/2, M) tile: in the fp16 mode max |x| over the
    row's BLOCKS blocks (the block product mixes them, so they share one scale), else 1."""
    R: tl.constexpr = x.shape[0]
    if PRECISION == "fp16":
        row = tl.max(tl.max(tl.abs(x), axis=2), axis=1)
        if BLOCKS > 1:
            whole = tl.max(tl.reshape(row, (R // BLOCKS, BLOCKS)), axis=1)
            row = tl.reshape(tl.broadcast_to(whole[:, None], (R // BLOCKS, BLOCKS)), (R,))
        row = tl.where(row > 0, row, 1.0)
    else:
        row = tl.full((R,), 1.0, tl.float32)
    return row[:, None, None]


@triton.jit
def _isolate_nonfinite(x, BLOCKS: tl.constexpr):
    """(x with every row that holds a NaN or Inf set to 0, (R, 1, 1): NaN for those rows, else 0).

    Two rows travel as one complex row, so a non-finite value would reach its partner row
    through the transform: a NaN in u[b] made y[b + 1] NaN too, where the eager FFT keeps
    every other row finite (README, "NaN and Inf": a rewrite may narrow NaN propagation, never
    widen it). The row is transformed as zeros instead and its outputs made NaN (the eager FFT
    spreads a non-finite value over its whole row too). A row's BLOCKS blocks share the flag."""
    R: tl.constexpr = x.shape[0]
    bad = tl.max(tl.max(tl.where(tl.abs(x) < float("inf"), 0.0, 1.0), axis=2), axis=1)
    if BLOCKS > 1:
        whole = tl.max(tl.reshape(bad, (R // BLOCKS, BLOCKS)), axis=1)
        bad = tl.reshape(tl.broadcast_to(whole[:, None], (R // BLOCKS, BLOCKS)), (R,))
    bad = bad[:, None, None]
    return tl.where(bad > 0, 0.0, x), tl.where(bad > 0, float("nan"), 0.0)


@triton.jit
def _any_poisoned(poison_a, poison_b):
    """1.0 if any row of a stack's two (R, 1, 1) poisons (from _isolate_nonfinite) is NaN, else 0."""
    R: tl.constexpr = poison_a.shape[0]
    return tl.max(tl.reshape(tl.where(poison_a + poison_b == 0.0, 0.0, 1.0), (R,)), axis=0)


@triton.jit
def _kernel_operand(k_ptr, h, kernel_len, sk_h, sk_l, BLOCKS: tl.constexpr, M: tl.constexpr,
                    HALF: tl.constexpr, PRECISION: tl.constexpr):
    """Channel h's kernel as a stack of one complex row of BLOCKS blocks (imaginary part 0),
    scaled by its max magnitude (returned) so its spectrum fits float16."""
    t, unused_pair = _stack_times(1, BLOCKS, M, HALF)
    kx = tl.load(k_ptr + h * sk_h + t * sk_l, mask=t < kernel_len, other=0.0).to(tl.float32)
    k_scale = _pair_scale(kx, BLOCKS, PRECISION)
    kx = _to_stack(kx / k_scale, BLOCKS, M, HALF)
    return interleave(kx, tl.zeros_like(kx), PRECISION), tl.max(tl.reshape(k_scale, (BLOCKS,)), axis=0)


@triton.jit
def _start_item(k_ptr, d_ptr, h, kernel_len, sk_h, sk_l, kspec, w1_ptr, w1i_ptr, stage, HAS_D: tl.constexpr,
                STORE_SPECTRUM: tl.constexpr, BLOCKS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr,
                N3: tl.constexpr, CHUNK: tl.constexpr, PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr):
    """Channel h's kernel operand, its scale and skip weight; with STORE_SPECTRUM its spectrum
    written to this program's scratch (between barriers: the previous item's readers are done
    before it is overwritten, and every thread sees it before reading)."""
    k_item, k_scale = _kernel_operand(k_ptr, h, kernel_len, sk_h, sk_l, BLOCKS, M=N2 * N3, HALF=N1 // 2,
                                      PRECISION=PRECISION)
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    if STORE_SPECTRUM:
        tl.debug_barrier()
        store_kernel_spectrum(k_item, kspec, w1_ptr, w1i_ptr, stage, BLOCKS, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
        tl.debug_barrier()
    return k_item, k_scale, d


@triton.jit
def _fftconv_fwd_kernel(
    u_ptr, k_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr, y_ptr, kspec_ptr,
    w1_ptr, w1i_ptr, w2_ptr, w2i_ptr, w3_ptr, w3i_ptr,
    batch, channels, seqlen, kernel_len, groups, stacks_per_item, sqrt_n,
    su_b, su_h, su_l, sk_h, sk_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l, sm_b, sm_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr, KSPEC_SCRATCH: tl.constexpr,
    P: tl.constexpr, BLOCKS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
    CHUNK: tl.constexpr, PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    sqrt_n = tl.cast(sqrt_n, tl.float32)  # Inductor passes Python floats as float64: keep float32 math
    item = tl.program_id(0)  # channel h = item // groups, and its group item % groups of stacks
    h = item // groups
    M: tl.constexpr = N2 * N3
    HALF: tl.constexpr = N1 // 2
    R: tl.constexpr = P * BLOCKS  # stack rows: each pair's BLOCKS blocks
    t, pair = _stack_times(P, BLOCKS, M, HALF)
    in_seq = t < seqlen
    stage = load_stage_constants(w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, N2, N3)
    kspec = kspec_ptr + item * (2 * BLOCKS * N1 * M)  # this program's k spectrum (scratch mode)
    k0, k_scale, d = _start_item(k_ptr, d_ptr, h, kernel_len, sk_h, sk_l, kspec, w1_ptr, w1i_ptr, stage, HAS_D,
                                 KSPEC_SCRATCH, BLOCKS, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)

    for it in tl.range(0, stacks_per_item):
        b_a, b_b, valid_a, valid_b = stack_rows(item % groups, it, stacks_per_item, pair, batch, P)
        xa, xb = load_gated_pairs(u_ptr, gate_in_ptr, b_a, b_b, valid_a, valid_b, h, t, seqlen,
                                  su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, HAS_GATE_IN)
        xa, poison_a = _isolate_nonfinite(xa, BLOCKS)
        xb, poison_b = _isolate_nonfinite(xb, BLOCKS)
        sa = _pair_scale(xa, BLOCKS, PRECISION)
        sb = _pair_scale(xb, BLOCKS, PRECISION)
        x0 = interleave(_to_stack(xa / sa, R, M, HALF), _to_stack(xb / sb, R, M, HALF), PRECISION)
        acc = convolve_stack(x0, k0, kspec, w1_ptr, w1i_ptr, stage, KSPEC_SCRATCH, P, BLOCKS, N1,
                             N2, N3, CHUNK, PRECISION, FAST_TRIG)
        yr, yi = deinterleave(acc)
        yr = _to_memory(yr, R, M, HALF)
        yi = _to_memory(yi, R, M, HALF)
        if HAS_D:
            # Reload x for the skip term (an L1/L2 hit) rather than hold it through the loop.
            xa, xb = load_gated_pairs(u_ptr, gate_in_ptr, b_a, b_b, valid_a, valid_b, h, t, seqlen,
                                       su_b, su_h, su_l, sgi_b, sgi_h, sgi_l, HAS_GATE_IN)
        # conv(x, k) = sqrt(N) * s_x * s_k * U^H(U(x / s_x) * U(k / s_k)), U unitary.
        ca = yr * (sa * (sqrt_n * k_scale)) + d * xa + poison_a
        cb = yi * (sb * (sqrt_n * k_scale)) + d * xb + poison_b
        if GELU:
            ca, cb = gelu(ca), gelu(cb)
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
    operand_dtype = _operand_dtype(params.precision)
    consts = block_fft_constants(plan, operand_dtype, u.device)
    y = alloc(u.shape, dtype=u.dtype, device=u.device)
    scratch = params.kernel_spectrum == "scratch"
    # Per-program k spectrum: float16 like the operands it multiplies in the fp16 mode (its
    # values are at most sqrt(N)/2 on max-scaled k), else float32. Written before it is read.
    programs = channels * params.groups
    kspec = torch.empty(programs if scratch else 1, 2 * params.blocks * plan.fft_size,
                        dtype=operand_dtype, device=u.device)
    launch(
        _fftconv_fwd_kernel, (programs,),
        u, k, D, gate_in, gate_out, dropout_mask, y, kspec, *consts,
        batch, channels, seqlen, k.shape[-1], params.groups, params.stacks_per_item,
        float(plan.fft_size) ** 0.5,
        *u.stride(), *k.stride(), *strides(gate_in, 3), *strides(gate_out, 3), *strides(dropout_mask, 2),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None, KSPEC_SCRATCH=scratch,
        P=params.pairs, BLOCKS=params.blocks, N1=plan.n1, N2=plan.n2, N3=plan.n3, CHUNK=plan.chunk,
        PRECISION=params.precision, FAST_TRIG=u.is_cuda, num_warps=params.num_warps, num_stages=1,
    )
    return y


# ----------------------------------------------------------------------------------- backward --
@triton.jit
def _fftconv_bwd_kernel(
    dy_ptr, u_ptr, k_ptr, d_ptr, gate_in_ptr, gate_out_ptr, mask_ptr,
    du_ptr, dk_ptr, dd_ptr, dgate_in_ptr, dgate_out_ptr, dk_spec_ptr, kspec_ptr,
    w1_ptr, w1i_ptr, w2_ptr, w2i_ptr, w3_ptr, w3i_ptr,
    batch, channels, seqlen, kernel_len, stacks, sqrt_n,
    sdy_b, sdy_h, sdy_l, su_b, su_h, su_l, sk_h, sk_l, sgi_b, sgi_h, sgi_l, sgo_b, sgo_h, sgo_l,
    sm_b, sm_h, sdk_h,
    HAS_D: tl.constexpr, HAS_GATE_IN: tl.constexpr, HAS_GATE_OUT: tl.constexpr,
    GELU: tl.constexpr, HAS_MASK: tl.constexpr, KSPEC_SCRATCH: tl.constexpr,
    P: tl.constexpr, BLOCKS: tl.constexpr, N1: tl.constexpr, N2: tl.constexpr, N3: tl.constexpr,
    CHUNK: tl.constexpr, PRECISION: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    sqrt_n = tl.cast(sqrt_n, tl.float32)  # Inductor passes Python floats as float64: keep float32 math
    h = tl.program_id(0)  # one program owns every row of its channel: dk and dD in a fixed order
    M: tl.constexpr = N2 * N3
    HALF: tl.constexpr = N1 // 2
    R: tl.constexpr = P * BLOCKS
    t, pair = _stack_times(P, BLOCKS, M, HALF)
    in_seq = t < seqlen
    k0, k_scale = _kernel_operand(k_ptr, h, kernel_len, sk_h, sk_l, BLOCKS, M, HALF, PRECISION)
    out_scale = sqrt_n * k_scale
    d = 0.0
    if HAS_D:
        d = tl.load(d_ptr + h).to(tl.float32)
    stage = load_stage_constants(w2_ptr, w2i_ptr, w3_ptr, w3i_ptr, N2, N3)
    kspec = kspec_ptr + h * (2 * BLOCKS * N1 * M)
    if KSPEC_SCRATCH:
        # k's spectrum once for all of the channel's stacks (read back by every chunk).
        store_kernel_spectrum(k0, kspec, w1_ptr, w1i_ptr, stage, BLOCKS, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
        tl.debug_barrier()
    # This channel's dk spectrum S = sum over pairs of U dc * conj(U x) (block-mixed, see
    # blockfft.block_product), planes (2, BLOCKS * N) in the chunked order; rewritten (not
    # read) by the first stack, so it needs no zeroing.
    spec_ptr = dk_spec_ptr + h * 2 * BLOCKS * N1 * M
    spec_offs = spectrum_offsets(BLOCKS * CHUNK * N2, N3)
    dd = 0.0
    scale_sum = 0.0
    nonfinite = 0.0  # 1 once a row of x or dc held a NaN or Inf

    for it in tl.range(0, stacks):
        b_a, b_b, valid_a, valid_b = stack_rows(0, it, stacks, pair, batch, P)
        ua = load_stack(u_ptr, b_a * su_b + h * su_h, valid_a, t, seqlen, su_l)
        ub = load_stack(u_ptr, b_b * su_b + h * su_h, valid_b, t, seqlen, su_l)
        xa, xb = ua, ub
        if HAS_GATE_IN:
            gia = load_stack(gate_in_ptr, b_a * sgi_b + h * sgi_h, valid_a, t, seqlen, sgi_l)
            gib = load_stack(gate_in_ptr, b_b * sgi_b + h * sgi_h, valid_b, t, seqlen, sgi_l)
            xa, xb = ua * gia, ub * gib
        # Non-finite rows are transformed as zeros (see _isolate_nonfinite); dk and dD of the
        # channel become NaN at the end, as the eager FFT's would.
        xa, poison_xa = _isolate_nonfinite(xa, BLOCKS)
        xb, poison_xb = _isolate_nonfinite(xb, BLOCKS)
        nonfinite = tl.maximum(nonfinite, _any_poisoned(poison_xa, poison_xb))
        sxa = _pair_scale(xa, BLOCKS, PRECISION)
        sxb = _pair_scale(xb, BLOCKS, PRECISION)
        x0 = interleave(_to_stack(xa / sxa, R, M, HALF), _to_stack(xb / sxb, R, M, HALF), PRECISION)
        dca = load_stack(dy_ptr, b_a * sdy_b + h * sdy_h, valid_a, t, seqlen, sdy_l)
        dcb = load_stack(dy_ptr, b_b * sdy_b + h * sdy_h, valid_b, t, seqlen, sdy_l)
        if HAS_MASK:
            ma = tl.load(mask_ptr + b_a * sm_b + h * sm_h, mask=valid_a, other=0.0).to(tl.float32)
            mb = tl.load(mask_ptr + b_b * sm_b + h * sm_h, mask=valid_b, other=0.0).to(tl.float32)
        if GELU or HAS_GATE_OUT:
            # Recompute the pre-activation c = conv(x, k) + D x rather than storing it.
            cr, ci = deinterleave(convolve_stack(x0, k0, kspec, w1_ptr, w1i_ptr, stage, KSPEC_SCRATCH,
                                                 P, BLOCKS, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG))
            ca = _to_memory(cr, R, M, HALF) * (sxa * out_scale) + d * xa + poison_xa
            cb = _to_memory(ci, R, M, HALF) * (sxb * out_scale) + d * xb + poison_xb
            if HAS_GATE_OUT:
                act_a, act_b = ca, cb
                if GELU:
                    act_a, act_b = gelu(ca), gelu(cb)
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
                dca, dcb = dca * gelu_grad(ca), dcb * gelu_grad(cb)
        if HAS_MASK:
            dca, dcb = dca * ma, dcb * mb
        dca, poison_dca = _isolate_nonfinite(dca, BLOCKS)
        dcb, poison_dcb = _isolate_nonfinite(dcb, BLOCKS)
        nonfinite = tl.maximum(nonfinite, _any_poisoned(poison_dca, poison_dcb))
        if HAS_D:
            dd += tl.sum(tl.sum(tl.sum(dca * xa + dcb * xb, axis=2), axis=1), axis=0)
        # Scale dc's rows so both rows of a pair carry the same product of scales q: the real
        # part of U dc * conj(U x) is then (dc_a x_a + dc_b x_b) / q, what dk needs.
        q = tl.maximum(_pair_scale(dca, BLOCKS, PRECISION) * sxa, _pair_scale(dcb, BLOCKS, PRECISION) * sxb)
        dsa = q / sxa
        dsb = q / sxb
        g0 = interleave(_to_stack(dca / dsa, R, M, HALF), _to_stack(dcb / dsb, R, M, HALF), PRECISION)
        scale_sum += tl.sum(tl.reshape(q, (R,)), axis=0)

        # One walk over the spectrum: du = corr(dc, k), and q U dc conj(U x) summed into S.
        acc = tl.zeros((R * M, N1), dtype=tl.float32)
        for chunk_start in tl.range(0, N1, CHUNK):
            w1, w1i = load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1, CHUNK)
            kr, ki = kernel_chunk(k0, kspec, w1, chunk_start, stage, KSPEC_SCRATCH, BLOCKS, N1, N2, N3, CHUNK,
                                  PRECISION, FAST_TRIG)
            gr, gi = forward_chunk(g0, w1, chunk_start, stage, R, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
            xr, xi = forward_chunk(x0, w1, chunk_start, stage, R, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
            pr, pi = block_product(gr, gi, xr, xi, chunk_start, P, BLOCKS, True, N2)
            pr = tl.reshape(tl.reshape(pr, (R, CHUNK * N2, N3)) * q, (P, BLOCKS * CHUNK * N2, N3))
            pi = tl.reshape(tl.reshape(pi, (R, CHUNK * N2, N3)) * q, (P, BLOCKS * CHUNK * N2, N3))
            offs = chunk_start * (BLOCKS * M) + spec_offs
            first = it == 0
            sr = tl.load(spec_ptr + offs, mask=(offs >= 0) & ~first, other=0.0) + tl.sum(pr, axis=0)
            si = tl.load(spec_ptr + BLOCKS * N1 * M + offs, mask=(offs >= 0) & ~first, other=0.0) + tl.sum(pi, axis=0)
            tl.store(spec_ptr + offs, sr)
            tl.store(spec_ptr + BLOCKS * N1 * M + offs, si)
            er, ei = block_product(gr, gi, kr, ki, chunk_start, P, BLOCKS, True, N2)
            acc = inverse_chunk(er, ei, acc, w1i, chunk_start, stage, R, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
        # The next stack (and the dk transform below) reads S, possibly from other threads.
        tl.debug_barrier()

        yr, yi = deinterleave(acc)
        dxa = _to_memory(yr, R, M, HALF) * (dsa * out_scale) + d * dca + poison_dca
        dxb = _to_memory(yi, R, M, HALF) * (dsb * out_scale) + d * dcb + poison_dcb
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

    # dk = corr(dc, x)[:Lk] summed over the batch = sqrt(N) Re(U^H S) per block; S / sum(q)
    # keeps the float16 operands in range (each pair's term is at most N/2 in magnitude).
    acc = tl.zeros((BLOCKS * M, N1), dtype=tl.float32)
    for chunk_start in tl.range(0, N1, CHUNK):
        unused_w1, w1i = load_chunk_constants(w1_ptr, w1i_ptr, chunk_start, N1, CHUNK)
        offs = chunk_start * (BLOCKS * M) + spec_offs
        sr = tl.load(spec_ptr + offs) / scale_sum
        si = tl.load(spec_ptr + BLOCKS * N1 * M + offs) / scale_sum
        acc = inverse_chunk(sr, si, acc, w1i, chunk_start, stage, BLOCKS, N1, N2, N3, CHUNK, PRECISION, FAST_TRIG)
    dk_re, unused_dk_im = deinterleave(acc)
    tk, unused_pair = _stack_times(1, BLOCKS, M, HALF)
    poison = tl.where(nonfinite > 0, float("nan"), 0.0)
    tl.store(dk_ptr + h * sdk_h + tk,
             (_to_memory(dk_re, BLOCKS, M, HALF) * (sqrt_n * scale_sum) + poison).to(dk_ptr.dtype.element_ty),
             mask=tk < kernel_len)
    if HAS_D:
        tl.store(dd_ptr + h, (dd + poison).to(dd_ptr.dtype.element_ty))


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
    dk_spectrum = torch.empty(channels, 2 * params.blocks * plan.fft_size, dtype=torch.float32, device=u.device)
    scratch = params.kernel_spectrum == "scratch"
    kspec = torch.empty(channels if scratch else 1, 2 * params.blocks * plan.fft_size,
                        dtype=_operand_dtype(params.precision), device=u.device)
    launch(
        _fftconv_bwd_kernel, (channels,),
        grad_y, u, k, D, gate_in, gate_out, dropout_mask, du, dk, dD, dgate_in, dgate_out, dk_spectrum, kspec,
        *consts, batch, channels, seqlen, k.shape[-1], params.stacks_per_item, float(plan.fft_size) ** 0.5,
        *grad_y.stride(), *u.stride(), *k.stride(), *strides(gate_in, 3), *strides(gate_out, 3),
        *strides(dropout_mask, 2), dk.stride(0),
        HAS_D=D is not None, HAS_GATE_IN=gate_in is not None, HAS_GATE_OUT=gate_out is not None,
        GELU=gelu, HAS_MASK=dropout_mask is not None, KSPEC_SCRATCH=scratch,
        P=params.pairs, BLOCKS=params.blocks, N1=plan.n1, N2=plan.n2, N3=plan.n3, CHUNK=plan.chunk,
        PRECISION=params.precision, FAST_TRIG=u.is_cuda, num_warps=params.num_warps, num_stages=1,
    )
    return du, dk, dD, dgate_in, dgate_out
