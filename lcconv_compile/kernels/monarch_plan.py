"""The two-stage Monarch FFT convolution that FlashConv v6 (:mod:`.monarch_conv`, Gluon) runs,
as plain torch: its plan (factors, pairs per tile), its constant matrices, its twiddles and index
maps, and :func:`emulate_forward`, which executes the kernel's schedule stage by stage with the
kernel's roundings (float16 operands, float32 accumulation) so its error can be read on CPU.

Gluon kernels do not run under Triton's CPU interpreter; this module is how the kernel's math is
tested without a GPU (tests/test_monarch_plan.py compares it with ``torch.fft`` and the float64
reference). It must stay a description of what the kernel does: change both together.

The math, for one FFT of size N = N1 N2 (N = 2 * next_pow2(L): causal, no wrap-around):
  time index n = n1 N2 + n2, frequency index f = f1 + N1 f2; unitary DFT matrices
  F1[f1, n1] = w1^(f1 n1) / sqrt(N1), F2[n2, f2] = w2^(n2 f2) / sqrt(N2), w_M = exp(-2 pi i / M).
  S1  (left product)  B[f1, n2]  = sum_{n1 < N1/2} F1[f1, n1] X[n1, n2]    (X zero for n1 >= N1/2)
  T1  (twiddle)       B[f1, n2] *= w_N^(f1 n2)
  S2  (right product) C[f1, f2]  = sum_{n2} B[f1, n2] F2[n2, f2]          (C = DFT(x) / sqrt(N))
  P   (pointwise)     E = C * K,  K the same transform of k (D folded into k[0])
  S2' (right product) G[f1, n2]  = sum_{f2} E[f1, f2] conj(F2)[f2, n2]
  T2  (twiddle)       G[f1, n2] *= conj(w_N^(f1 n2))
  S1' (left product)  Y[n1, n2]  = sum_{f1} conj(F1)[n1, f1] G[f1, n2],  n1 < N1/2 only (the
      outputs n < N/2: the causal half); its left operand is S1's factor tile read transposed
  y = Y * sqrt(N) / (s_x s_k), where s_x, s_k are the powers of two that scaled each row of x
  and k to max |.| <= 1 before rounding to float16.
Two real rows a, b of one channel travel as one complex row x = a + i b (k is real), so Y's
real part is a's convolution and its imaginary part b's. N1 = 128 at every N: S1 and S1' are
left products with 64 output rows each (S1 in two row chunks of f1, S1' exactly the causal
half n1 < 64), and S2 and S2' are right products whose left operand stays in registers. One
factor tile F1[f1, n1 < 64] serves S1 (as is) and S1' (transposed, conjugated by signs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["MonarchPlan", "plan_for", "emulate_forward", "dft_factor", "twiddle_angles", "MAX_SEQLEN",
           "MIN_SEQLEN"]

ROWS = 64  # rows of one warpgroup's tensor-core tile (wgmma M)
MIN_K = 16  # smallest contracted size of a 16-bit wgmma
N1 = 128  # S1's rows in two chunks of 64; S1' keeps the causal half, exactly 64 rows
MIN_SEQLEN, MAX_SEQLEN = 513, 4096  # N from 2048 (128 x 16) to 8192 (128 x 64)


@dataclass(frozen=True)
class MonarchPlan:
    """How one sequence length runs: FFT size ``n`` = ``n1`` x ``n2``, ``chunks`` = n1 / 64
    row chunks of the S1 -> S2' chain."""

    seqlen: int
    n: int
    n1: int
    n2: int

    @property
    def chunks(self) -> int:
        return self.n1 // ROWS

    @property
    def half(self) -> int:
        """Rows n1 of X that can be nonzero (and of Y that are kept): the causal half."""
        return self.n1 // 2

    def flops_per_pair(self) -> int:
        """Tensor-core FLOPs for one complex row (two real rows): four real products per
        complex one, 2 FLOPs per multiply-add; S1 and S1' contract or keep only the causal half."""
        complex_macs = self.n * (self.half + 2 * self.n2 + self.half)
        return 8 * complex_macs

    def flops_per_kernel_spectrum(self) -> int:
        """S1 and S2 of k (real: S1 is two real products, not four)."""
        return 2 * 2 * self.n * self.half + 8 * self.n * self.n2

    def shared_bytes(self) -> int:
        """Shared memory of one program: F1 and F2 (re, im, -im each), K (float32 re, im),
        X (re, im), G (re, im), the next pair's rows (u's 16-bit dtype; gate_in rows not
        counted); layout-conversion scratch not counted."""
        f1 = 3 * self.n1 * self.half * 2
        f2 = 3 * self.n2 * self.n2 * 2
        staging = 2 * self.half * self.n2 * 2
        spectrum = 2 * self.n * 4
        x = 2 * self.half * self.n2 * 2
        g = 2 * self.n1 * self.n2 * 2
        return f1 + f2 + spectrum + x + g + staging


def plan_for(seqlen: int) -> Optional[MonarchPlan]:
    """The plan for sequences of ``seqlen`` samples (any kernel length <= seqlen), or None where
    v6 has none: N = 2 next_pow2(L) from 2048 to 8192, N1 = 128, N2 = N / 128 >= 16 (wgmma's
    smallest K)."""
    if not MIN_SEQLEN <= seqlen <= MAX_SEQLEN:
        return None
    n = 2 << (seqlen - 1).bit_length()
    n2 = n // N1
    assert n2 >= MIN_K
    return MonarchPlan(seqlen=seqlen, n=n, n1=N1, n2=n2)


def dft_factor(size: int, rows: int, cols: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Real and imaginary parts of the unitary DFT factor w_size^(j c) / sqrt(size) for
    j < rows, c < cols (symmetric where rows = cols). The angle is reduced mod ``size`` in
    integers first, as the kernel's twiddles are."""
    j = torch.arange(rows, dtype=torch.int64)[:, None]
    c = torch.arange(cols, dtype=torch.int64)[None, :]
    angle = (-2.0 * math.pi / size) * ((j * c) % size).to(torch.float64)
    scale = 1.0 / math.sqrt(size)
    return (torch.cos(angle) * scale).to(dtype), (torch.sin(angle) * scale).to(dtype)


def twiddle_angles(plan: MonarchPlan, f1: torch.Tensor, n2: torch.Tensor) -> torch.Tensor:
    """The angle of w_N^(f1 n2) as the kernel computes it: the exponent f1 n2 reduced to
    [-N/2, N/2) in integers, times -2 pi / N in float32 (so the angle is in (-pi, pi])."""
    e = (f1[:, None].to(torch.int64) * n2[None, :].to(torch.int64)) % plan.n
    e = torch.where(e >= plan.n // 2, e - plan.n, e)
    return e.to(torch.float32) * torch.tensor(-2.0 * math.pi / plan.n, dtype=torch.float32)


def _round(x: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """Round to the operand dtype and back (None: exact, for the float64 map tests)."""
    return x if dtype is None else x.to(dtype).to(x.dtype)


def power_of_two_scale(x: torch.Tensor) -> torch.Tensor:
    """2^-ceil(log2(max|x|)) over the last two dims: the kernel's exact scale that brings a tile
    to max |.| <= 1 before rounding to float16; 0 where x is all zero (the kernel then
    multiplies that row's output by 0, so its partner's rounding never leaks into it)."""
    m = x.abs().amax(dim=(-2, -1)).to(torch.float32)
    e = torch.ceil(torch.log2(torch.where(m > 0, m, torch.ones_like(m))))
    return torch.where(m > 0, torch.exp2(-e), torch.zeros_like(m))


def _output_scale(n: int, row_scale: torch.Tensor, k_scale: torch.Tensor) -> torch.Tensor:
    """sqrt(N) / (s_row s_k), 0 where either scale is 0 (an all-zero row or k)."""
    both = row_scale * k_scale
    return torch.where(both > 0, math.sqrt(n) / torch.where(both > 0, both, torch.ones_like(both)),
                       torch.zeros_like(both))


class _Stages:
    """The stage products on float tensors with the kernel's roundings (``operand`` dtype for
    every tensor-core operand, ``acc`` for accumulators): one instance per emulation."""

    def __init__(self, plan: MonarchPlan, operand: Optional[torch.dtype], acc: torch.dtype):
        self.plan, self.operand, self.acc = plan, operand, acc
        p = plan
        self.f1r, self.f1i = (_round(t.to(acc), operand) for t in dft_factor(p.n1, p.n1, p.half))
        self.f2r, self.f2i = (_round(t.to(acc), operand) for t in dft_factor(p.n2, p.n2, p.n2))
        angle = twiddle_angles(p, torch.arange(p.n1), torch.arange(p.n2))
        if acc == torch.float64:  # exact maps: the twiddle in float64 too
            angle = (-2.0 * math.pi / p.n) * ((torch.arange(p.n1)[:, None] * torch.arange(p.n2)[None, :]) % p.n
                                              ).to(torch.float64)
        self.twr, self.twi = torch.cos(angle).to(acc), torch.sin(angle).to(acc)

    def op(self, x):
        return _round(x, self.operand)

    def forward(self, xr, xi):
        """S1, T1, S2 on X (..., N1/2, N2) -> C (..., N1, N2) = DFT(x)[f1 + N1 f2] / sqrt(N)."""
        br = self.f1r @ xr - self.f1i @ xi
        bi = self.f1i @ xr + self.f1r @ xi
        br, bi = br * self.twr - bi * self.twi, br * self.twi + bi * self.twr
        br, bi = self.op(br), self.op(bi)
        return br @ self.f2r - bi @ self.f2i, br @ self.f2i + bi @ self.f2r

    def inverse(self, er, ei):
        """S2', T2, S1' on E (..., N1, N2) -> Y (..., N1/2, N2), the causal half."""
        er, ei = self.op(er), self.op(ei)
        gr = er @ self.f2r + ei @ self.f2i
        gi = ei @ self.f2r - er @ self.f2i
        gr, gi = gr * self.twr + gi * self.twi, gi * self.twr - gr * self.twi
        gr, gi = self.op(gr), self.op(gi)
        f1r, f1i = self.f1r.T, self.f1i.T  # S1' reads S1's tile transposed: conj(F1)[n1, f1]
        return f1r @ gr + f1i @ gi, f1r @ gi - f1i @ gr


def _tiles(x: torch.Tensor, plan: MonarchPlan) -> torch.Tensor:
    """(..., L) -> (..., N1/2, N2): the sequence zero-padded to N/2 and read as n = n1 N2 + n2."""
    pad = plan.n // 2 - x.shape[-1]
    return torch.nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], plan.half, plan.n2)


def emulate_forward(
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    gate_in: Optional[torch.Tensor] = None,
    gate_out: Optional[torch.Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
    operand: Optional[torch.dtype] = torch.float16,
    acc: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``fftconv`` forward as v6 computes it (u (B, H, L), k (H, Lk), Lk <= L), returned in u's
    dtype. ``operand=None, acc=float64`` runs the same index maps exactly (no rounding)."""
    B, H, L = u.shape
    plan = plan_for(L)
    if plan is None:
        raise ValueError(f"v6 has no plan for L = {L} (supports {MIN_SEQLEN}..{MAX_SEQLEN})")
    st = _Stages(plan, operand, acc)
    x = u.to(acc) if gate_in is None else u.to(acc) * gate_in.to(acc)
    if B % 2:
        x = torch.cat([x, torch.zeros_like(x[:1])])
    kk = k.to(acc).clone()
    if D is not None:
        kk[:, 0] += D.to(acc)  # the skip term D x is the convolution with D at lag 0
    # k's spectrum, once per channel: X = sk k, no imaginary part
    kt = _tiles(kk, plan)
    sk = power_of_two_scale(kt)[:, None, None].to(acc)
    kr, ki = st.forward(st.op(kt * sk), torch.zeros_like(kt))
    # pairs (2j, 2j + 1) of each channel as one complex row
    # (each row its own scale: the transform is linear and k real, so Re and Im stay separate
    # and each row's error is relative to its own size, not to its partner's)
    xt = _tiles(x, plan).reshape(-1, 2, H, plan.half, plan.n2)
    sx = power_of_two_scale(xt).to(acc)[..., None, None]  # (pairs, 2, H, 1, 1)
    xr, xi = st.op(xt[:, 0] * sx[:, 0]), st.op(xt[:, 1] * sx[:, 1])
    cr, ci = st.forward(xr, xi)
    er, ei = cr * kr - ci * ki, cr * ki + ci * kr
    yr, yi = st.inverse(er, ei)
    out_scale = _output_scale(plan.n, sx, sk)
    y = torch.stack([yr, yi], dim=1) * out_scale
    y = y.reshape(-1, H, plan.n // 2)[:B, :, :L]
    if gelu:
        y = torch.nn.functional.gelu(y)
    if dropout_mask is not None:
        y = y * dropout_mask.to(acc)[..., None]
    if gate_out is not None:
        y = y * gate_out.to(acc)
    return y.to(u.dtype)
