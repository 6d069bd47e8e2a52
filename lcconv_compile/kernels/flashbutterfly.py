"""FlashButterfly: the Triton kernels of the three-step long convolution (K1 = step 1, K2 =
step 2 on chip, K3 = step 3 + epilogue) with trainable or exact-FFT factors, and their backward.

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

K2 (:class:`TritonRowsConv`) runs blockfft's stages on whole rows (a circular convolution, no
zero half; full stage-1 matrices): one program per row (b, h, k1) transforms the row and its
kernel row ``kz[h, k1] = step1_exact(k)`` chunk by chunk, multiplies and inverse-transforms; w is
written over z. k's spectrum rows are never stored: one K1 launch with the exact factor makes kz
((H, N1, N2) complex, one batch row's worth), and each program transforms its kernel row on
chip (+50% K2 tensor-core work, against an (H, N) complex spectrum round trip).

Backward (``dX = F^H dZ``, ``dF = sum over rows of dZ X^H`` for each step): K3-bwd gives dw, the
out_factor gradient, dD, and dc (for du's skip term); K2-bwd (one program per kernel row (h, k1),
looping over b in order) gives dz over dw and ``dkz = sum_b corr(dw, z)`` (float32), and one
exact K1-bwd launch turns dkz into dk; K1-bwd gives du and the in_factor gradient. Factor
gradients are accumulated in registers by one program per (column block, row group), looping
over its rows in a fixed order; the launcher sums the row groups in a fixed order: bit-identical
results for identical inputs, no atomics.

Two users: ``lcconv::butterfly_conv`` (learned factors, :func:`butterfly_conv_fwd` /
:func:`butterfly_conv_bwd`, where :func:`supports_learned`) and the ``fftconv`` family
(:func:`supports`, :func:`fftconv_fwd`, :func:`fftconv_bwd`: the exact factors, steps 1 and 3 by
:mod:`butterfly_steps`; no factor tables, no factor gradients). Gates of ``fftconv`` are torch
multiplies around the kernels (not fused).

Exact factors (the fftconv family, kz, dk): steps 1 and 3 are :mod:`butterfly_steps`' tensor-core
products (any N1), so these kernels cover every length to 4M; the op dispatches them only where
they were measured faster than the torch.fft reference (:data:`DISPATCH_MAX_N1`,
:data:`DISPATCH_DTYPES`).

Limits, said plainly:
* Learned factors (one matrix per column) still run K1/K3 with broadcast multiply-adds on CUDA
  cores (not ``tl.dot``); the factor tile is ``BLOCK_C * N1^2`` complex values in registers.
  sm_90 compiles N1 <= 64 (:data:`MAX_N1`); N1 = 256 spills 4.3 KB (K1) and 18.6 KB (K3) per
  thread (scripts/compile_check.py --butterfly --learned). Measured 7-15x slower than the exact
  kernels on the H100 (benchmarks/NOTES.md). Next: columns grouped so a tile shares its factor,
  as a batched tl.dot.
* float32 (3xtf32) K2 needs > 227 KB of shared memory beyond N2 = 2048 (:data:`K2_MAX_N2`): the
  fftconv family then splits with N2 = 2048 (float32 to N = 128K, L = 64K); the learned op's
  split is fixed (N2 = 8192 from N = 128K), so float32 learned calls past N = 32K run the reference.
* K2 at N2 = 8192 (half) uses 255 registers, spilling 4 bytes forward and 64-496 bytes backward;
  it bounds the family (4.5 of 5.8 ms forward at (2,1024,64K)).
* The float16 intermediates are not scaled: inputs of magnitude above ~65504 / N1 overflow, and
  gradients small enough to make dw float16 subnormal (|dw| < 6e-5) lose precision (an estimate,
  not measured).

Where the code is: :mod:`.butterfly_factors` (K1 and K3 with learned or exact factors, their
backward, :class:`Tuning`), :mod:`.butterfly_rows_conv` (K2), :mod:`.butterfly_steps` (the exact
steps 1 and 3 on tensor cores); this module holds the family's entry points (the learned op's
three steps and the ``fftconv`` family), its split and its dispatch limits, and re-exports the
kernels' launchers under their names here.

Knows torch, Triton and reference.py only (no torch.library, no Inductor).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .. import reference
from .butterfly_factors import (  # noqa: F401  (the family's kernels, re-exported: its public names)
    KERNEL_DTYPES,
    MAX_N1,
    Tuning,
    intermediate_dtype,
    k1_backward,
    k1_forward,
    k3_backward,
    k3_backward_exact,
    k3_forward,
    split_of,
)
from .butterfly_rows_conv import K2_FACTORS, K2_MAX_N2, RowsConv, TritonRowsConv  # noqa: F401
from .common import offsets_fit_int32


__all__ = [
    "Tuning",
    "RowsConv",
    "intermediate_dtype",
    "k1_forward",
    "k3_forward",
    "k3_backward",
    "k1_backward",
    "butterfly_conv_fwd",
    "butterfly_conv_bwd",
    "TritonRowsConv",
    "split_for",
    "covers",
    "split_compiles",
    "supports_learned",
    "supports",
    "fftconv_fwd",
    "fftconv_bwd",
]

MAX_SEQLEN = 1 << 22  # 4M: the op's longest; what runs here is what covers() says
# The op dispatches here only up to this N1 (L = 2M for half inputs at Lk = L, 64K for float32):
# measured on the H100 (bf16) 1.8-2.2x faster forward and 1.6-2.1x faster forward+backward than
# torch.fft at 64K, 256K, 1M and 2M (N1 = 256 / 512 run the two-level steps). At 4M (N1 = 1024)
# forward is 1.5x faster but forward+backward 0.91x: its backward's 3xtf32 step 3 (dk) spills
# (benchmarks/NOTES.md, stop 11). Calls past it run the reference; the kernels cover them.
DISPATCH_MAX_N1 = 512
# float32 inputs are not dispatched: their 3xtf32 steps and N2 = 2048 split measured 0.5-0.7x the
# torch.fft reference at 32K/64K and slower beyond (the kernels still compute them).
DISPATCH_DTYPES = (torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------- three steps --
def butterfly_conv_fwd(
    u: torch.Tensor, k: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor,
    D: Optional[torch.Tensor] = None, gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    rows_conv: Optional[RowsConv] = None, alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> torch.Tensor:
    """K1, K2 (``rows_conv``, default :class:`TritonRowsConv`), K3: ``lcconv::butterfly_conv``."""
    rows_conv = rows_conv or TritonRowsConv(tuning)
    z = k1_forward(u, in_factor, alloc=alloc, tuning=tuning)
    w = rows_conv.forward(z, k, out=z)
    return k3_forward(w, u, out_factor, D, gelu, dropout_mask, alloc=alloc, tuning=tuning)


def butterfly_conv_bwd(
    grad_y: torch.Tensor, u: torch.Tensor, k: torch.Tensor, in_factor: torch.Tensor, out_factor: torch.Tensor,
    D: Optional[torch.Tensor] = None, gelu: bool = False, dropout_mask: Optional[torch.Tensor] = None, *,
    rows_conv: Optional[RowsConv] = None, alloc: Callable[..., torch.Tensor] = torch.empty,
    tuning: Tuning = Tuning(),
) -> reference.ButterflyConvGrads:
    """Recompute z and w (K1, K2), then K3-bwd, K2-bwd, K1-bwd: the op's five gradients."""
    rows_conv = rows_conv or TritonRowsConv(tuning)
    z = k1_forward(u, in_factor, alloc=alloc, tuning=tuning)
    w = rows_conv.forward(z, k)
    k3 = k3_backward(grad_y, w, u, out_factor, D, gelu, dropout_mask, alloc=alloc, tuning=tuning)
    del w
    dz, dk = rows_conv.backward(k3.dw, z, k, out=k3.dw)
    del z
    du, d_in = k1_backward(dz, u, in_factor, D, k3.dc, alloc=alloc, tuning=tuning)
    return reference.ButterflyConvGrads(
        du, dk.to(k.dtype), d_in.to(in_factor.dtype), k3.d_out_factor.to(out_factor.dtype),
        k3.dD.to(D.dtype) if D is not None else None,
    )


# ------------------------------------------------------------- the fftconv family (fixed FFT) --
def split_for(seqlen: int, kernel_len: int, dtype: torch.dtype) -> tuple[int, int]:
    """(N1, N2) of ``fftconv`` at these lengths: ``reference.butterfly_split(fft_size(L, Lk))``,
    with N2 capped at K2_MAX_N2[dtype] (the factors are internal here, so the split is free)."""
    n1, n2 = reference.butterfly_split(reference.fft_size(seqlen, kernel_len))
    cap = K2_MAX_N2.get(dtype, n2)
    return (n1 * (n2 // cap), cap) if n2 > cap else (n1, n2)


def split_compiles(dtype: torch.dtype, n1: int, n2: int, learned: bool = False) -> bool:
    """Whether the kernels run this split on a GPU: a step-2 plan for N2 (K2_FACTORS, at most
    K2_MAX_N2[dtype]) and, for learned factors, N1 <= MAX_N1 (their steps 1 and 3 hold
    BLOCK_C * N1^2 factor values in registers; the exact factor's steps (:mod:`butterfly_steps`) take
    any N1)."""
    return (dtype in KERNEL_DTYPES and n2 in K2_FACTORS and n2 <= K2_MAX_N2[dtype]
            and (n1 <= MAX_N1 or not learned))


def _covered_split(dtype: torch.dtype, seqlen: int, kernel_len: int) -> Optional[tuple[int, int]]:
    """The split of :func:`split_for` where the kernels cover these lengths, else None."""
    if dtype not in KERNEL_DTYPES or not 1 <= kernel_len <= seqlen <= MAX_SEQLEN:
        return None
    split = split_for(seqlen, kernel_len, dtype)
    return split if split_compiles(dtype, *split) else None


def covers(dtype: torch.dtype, seqlen: int, kernel_len: int) -> bool:
    """Whether the kernels compute ``fftconv`` for this dtype and these lengths on a GPU."""
    return _covered_split(dtype, seqlen, kernel_len) is not None


def supports(u: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the op dispatches ``fftconv(u, k, ...)`` here: CUDA tensors, :func:`covers`, a half
    dtype (:data:`DISPATCH_DTYPES`), a split with N1 <= :data:`DISPATCH_MAX_N1` (where the
    kernels were measured faster than the torch.fft reference) and an intermediate that 32-bit
    offsets can index (``common.offsets_fit_int32``). Listed after blockfft_conv in
    kernels.FAMILIES, which takes every length it covers."""
    if not (u.is_cuda and u.dim() == 3 and u.dtype in DISPATCH_DTYPES and k.dtype in KERNEL_DTYPES):
        return False
    split = _covered_split(u.dtype, u.shape[-1], k.shape[-1])
    return split is not None and split[0] <= DISPATCH_MAX_N1 and _intermediate_fits(u, *split)


def _intermediate_fits(u: torch.Tensor, n1: int, n2: int) -> bool:
    # z, the largest tensor the kernels index: (B, H, N1, N2, 2) real numbers.
    return offsets_fit_int32(u.shape[0] * u.shape[1] * n1 * n2 * 2)


def supports_learned(u: torch.Tensor, k: torch.Tensor, in_factor: torch.Tensor) -> bool:
    """Whether these kernels run ``lcconv::butterfly_conv`` for validated inputs: CUDA, a kernel
    dtype, a split (the factors') that :func:`split_compiles` and an intermediate that 32-bit
    offsets can index."""
    n1, n2 = split_of(in_factor, None)
    return (u.is_cuda and k.dtype in KERNEL_DTYPES and in_factor.dtype in KERNEL_DTYPES
            and split_compiles(u.dtype, n1, n2, learned=True) and _intermediate_fits(u, n1, n2))


def _gated(u: torch.Tensor, gate_in: Optional[torch.Tensor]) -> torch.Tensor:
    # The input gate is one torch multiply (float32) ahead of K1, not fused: see the docstring.
    return u if gate_in is None else u.float() * gate_in.float()


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
    """``y = fftconv(u, k, ...)`` by K1 (exact factor), K2 (w written over z), K3 + epilogue:
    three launches and one for k's step-1 rows. Inputs assumed valid (the op validates them)."""
    split = tuning.split or split_for(u.shape[-1], k.shape[-1], u.dtype)
    x = _gated(u, gate_in)
    z = k1_forward(x, None, split=split, out_dtype=intermediate_dtype(u.dtype), tuning=tuning)
    w = TritonRowsConv(tuning).forward(z, k, out=z)
    if gate_in is None and gate_out is None:
        return k3_forward(w, u, None, D, gelu, dropout_mask, split=split, alloc=alloc, tuning=tuning)
    y = k3_forward(w, x, None, D, gelu, dropout_mask, split=split, tuning=tuning)
    if gate_out is not None:
        y = y.float() * gate_out.float()
    return y.to(u.dtype)


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
    """(du, dk, dD, dgate_in, dgate_out), None for absent inputs: K1 recomputed (and K2 where GELU or
    gate_out needs the activation), then
    K3-bwd, K2-bwd (dz over dw; dk summed per kernel row in a fixed order), K1-bwd. dk and dD are
    bit-identical across runs (no atomics)."""
    split = tuning.split or split_for(u.shape[-1], k.shape[-1], u.dtype)
    rows_conv = TritonRowsConv(tuning)
    x = _gated(u, gate_in)
    z = k1_forward(x, None, split=split, out_dtype=intermediate_dtype(u.dtype), tuning=tuning)
    # w (step 2's output) is needed only to recompute the activation: for GELU' and gate_out's
    # gradient. Without both, the backward skips step 2's forward (a third of its time).
    w = rows_conv.forward(z, k) if gelu or gate_out is not None else None
    dgate_out = None
    dc = grad_y
    if gate_out is not None:
        act = k3_forward(w, x, None, D, gelu, dropout_mask, split=split, tuning=tuning)
        dgate_out = (grad_y.float() * act.float()).to(gate_out.dtype)
        dc = grad_y.float() * gate_out.float()
        del act
    k3 = k3_backward_exact(dc, w, x, D, gelu, dropout_mask, split, z.dtype, torch.empty, tuning)
    del w
    dz, dk = rows_conv.backward(k3.dw, z, k, out=k3.dw)
    del z
    plain = gate_in is None
    dx, unused = k1_backward(dz, x, None, D, k3.dc, dc_mask=k3.dc_mask, split=split,
                             alloc=alloc if plain else torch.empty, tuning=tuning)
    dgate_in = None
    du = dx
    if not plain:
        dgate_in = (dx * u.float()).to(gate_in.dtype)
        du = (dx * gate_in.float()).to(u.dtype)
    dD = k3.dD.to(D.dtype) if D is not None else None
    return du, dk.to(k.dtype), dD, dgate_in, dgate_out
