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

__all__ = ["MonarchPlan", "plan_for", "emulate_forward", "emulate_backward", "dft_factor", "twiddle_angles",
           "MAX_SEQLEN", "MIN_SEQLEN"]

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


class _Channelwise:
    """What forward and backward share: the plan's stages, k's spectrum (D folded in) and the
    packed, per-row-scaled transform of x = u * gate_in."""

    def __init__(self, u, k, D, gate_in, operand, acc, spectrum=None):
        B, H, L = u.shape
        self.plan = plan = plan_for(L)
        if plan is None:
            raise ValueError(f"v6 has no plan for L = {L} (supports {MIN_SEQLEN}..{MAX_SEQLEN})")
        self.B, self.H, self.L, self.acc = B, H, L, acc
        self.st = st = _Stages(plan, operand, acc)
        x = u.to(acc) if gate_in is None else u.to(acc) * gate_in.to(acc)
        self.x = x
        kk = k.to(acc).clone()
        if D is not None:
            kk[:, 0] += D.to(acc)  # the skip term D x is the convolution with D at lag 0
        kt = _tiles(kk, plan)
        self.sk = power_of_two_scale(kt)[:, None, None].to(acc)
        self.kr, self.ki = st.forward(st.op(kt * self.sk), torch.zeros_like(kt))
        self.kr, self.ki = _round(self.kr, spectrum), _round(self.ki, spectrum)  # K as the kernel keeps it
        # pairs (2j, 2j + 1) of each channel as one complex row, each row its own scale; a row
        # holding a NaN or Inf is transformed as zeros and poisoned (isolate_nonfinite)
        self.xt, self.x_poison = isolate_nonfinite(self.pairs(x))
        self.sx = power_of_two_scale(self.xt).to(acc)[..., None, None]  # (pairs, 2, H, 1, 1)
        self.xr, self.xi = st.forward(st.op(self.xt[:, 0] * self.sx[:, 0]), st.op(self.xt[:, 1] * self.sx[:, 1]))

    def pairs(self, t):
        """(B, H, L) -> (pairs, 2, H, N1/2, N2) tiles, an odd batch padded with a zero row."""
        if self.B % 2:
            t = torch.cat([t, torch.zeros_like(t[:1])])
        return _tiles(t, self.plan).reshape(-1, 2, self.H, self.plan.half, self.plan.n2)

    def rows(self, yr, yi, scale):
        """Inverse-transformed pairs (Re, Im) times per-row ``scale`` (pairs, 2, H, 1, 1) -> (B, H, L)."""
        y = torch.stack([yr, yi], dim=1) * scale
        return y.reshape(-1, self.H, self.plan.n // 2)[: self.B, :, : self.L]

    def convolve(self, cr, ci, row_scales, conj, poison):
        """Rows of the inverse of C K (or C conj(K)), C packed with ``row_scales``; + ``poison``
        (NaN for the rows that were non-finite, else 0)."""
        ki = -self.ki if conj else self.ki
        yr, yi = self.st.inverse(cr * self.kr - ci * ki, cr * ki + ci * self.kr)
        return self.rows(yr, yi, _output_scale(self.plan.n, row_scales, self.sk) + poison)


def isolate_nonfinite(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tiles with each row that holds a NaN or Inf set to 0, NaN for those rows else 0, shaped
    (..., 1, 1)). Two rows travel as one complex row, so a non-finite value would reach its
    partner through the transform, where the eager FFT keeps other rows finite (README, "NaN and
    Inf": never widen); the kernels transform such a row as zeros and make its output NaN (the
    eager FFT spreads it over the whole row too)."""
    bad = ~tiles.isfinite().all(dim=-1).all(dim=-1, keepdim=True)[..., None]
    nan = torch.full((), math.nan, dtype=tiles.dtype)
    return torch.where(bad, torch.zeros((), dtype=tiles.dtype), tiles), torch.where(bad, nan, torch.zeros_like(nan))


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
    spectrum: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """``fftconv`` forward as v6 computes it (u (B, H, L), k (H, Lk), Lk <= L), returned in u's
    dtype. ``operand=None, acc=float64`` runs the same index maps exactly (no rounding);
    ``spectrum=torch.float16`` rounds k's spectrum as the kernel's ``k_half`` tuning keeps it."""
    ch = _Channelwise(u, k, D, gate_in, operand, acc, spectrum)
    y = ch.convolve(ch.xr, ch.xi, ch.sx, conj=False, poison=ch.x_poison)
    if gelu:
        y = torch.nn.functional.gelu(y)
    if dropout_mask is not None:
        y = y * dropout_mask.to(acc)[..., None]
    if gate_out is not None:
        y = y * gate_out.to(acc)
    return y.to(u.dtype)


def emulate_backward(
    grad_y: torch.Tensor,
    u: torch.Tensor,
    k: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    gate_in: Optional[torch.Tensor] = None,
    gate_out: Optional[torch.Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
    operand: Optional[torch.dtype] = torch.float16,
    acc: torch.dtype = torch.float32,
) -> tuple:
    """``fftconv``'s gradients (du, dk, dD, dgate_in, dgate_out; None where the input is None)
    as the v6 backward is designed to compute them, in the inputs' dtypes, per channel:

    - the pre-activation c (for GELU and dgate_out) recomputed through the forward's stages;
    - dc = dy * gate_out * mask * gelu'(c); its rows packed as one complex row with scales t_r
      chosen so that t_r s_r (s_r: x's row scales) is the same for both rows of the pair, q;
    - dx = corr(dc, k + D delta) = inverse of DC conj(K), whose real and imaginary parts are
      the two rows' (D folded in as in the forward);
    - k's gradient spectrum S = sum over pairs, in batch order, of DC conj(X) / q: with equal
      products of scales the real part of S's inverse is sum_r corr(dc_r, x_r), i.e. dk at
      lags < Lk (one inverse per channel, after its last pair: deterministic);
    - dD = sum dc x in float32, batch order (exact sums, not lag 0 of S);
    - du = dx * gate_in, dgate_in = dx * u.
    ``operand=None, acc=float64`` runs the same maps exactly.
    """
    ch = _Channelwise(u, k, D, gate_in, operand, acc)
    st, plan = ch.st, ch.plan
    g = grad_y.to(acc)
    needs_c = gelu or gate_out is not None
    c = ch.convolve(ch.xr, ch.xi, ch.sx, conj=False, poison=ch.x_poison) if needs_c else None
    dgate_out = None
    if gate_out is not None:
        a = torch.nn.functional.gelu(c) if gelu else c
        if dropout_mask is not None:
            a = a * dropout_mask.to(acc)[..., None]
        dgate_out = (g * a).to(gate_out.dtype)
    dc = g
    if dropout_mask is not None:
        dc = dc * dropout_mask.to(acc)[..., None]
    if gate_out is not None:
        dc = dc * gate_out.to(acc)
    if gelu:
        cdf = 0.5 * (1.0 + torch.erf(c * (1.0 / math.sqrt(2.0))))
        dc = dc * (cdf + c * torch.exp(-0.5 * c * c) * (1.0 / math.sqrt(2.0 * math.pi)))
    dct, dc_poison = isolate_nonfinite(ch.pairs(dc))
    # a non-finite x or dc row anywhere in the channel: its dk and dD are NaN (as the eager FFT's)
    channel_poison = (ch.x_poison + dc_poison).sum(dim=(0, 1))[:, 0, 0]  # (H,): NaN or 0
    dc = torch.where(dc.isfinite(), dc, torch.zeros((), dtype=acc))  # (for dD; the poison says NaN)
    own = power_of_two_scale(dct).to(acc)[..., None, None]  # each dc row's own scale
    # q: the smallest product of a row's own dc scale and its x scale over the rows where both
    # are nonzero (rows with a zero x or dc add nothing to dk); each row then gets t_r = q / s_r
    # (<= its own scale: no overflow), a row with zero x its own dc scale.
    product = own * ch.sx  # (pairs, 2, H, 1, 1)
    big = torch.tensor(2.0 ** 126, dtype=acc)
    q = torch.where(product > 0, product, big).amin(dim=1)  # (pairs, H, 1, 1)
    q = torch.where(q < big, q, torch.ones_like(q))
    t = torch.where(ch.sx > 0, q[:, None] / torch.where(ch.sx > 0, ch.sx, torch.ones_like(ch.sx)), own)
    dr, di = st.forward(st.op(dct[:, 0] * t[:, 0]), st.op(dct[:, 1] * t[:, 1]))
    dx = ch.convolve(dr, di, torch.where(own > 0, t, torch.zeros_like(t)), conj=True,  # zero dc row: exact 0
                     poison=dc_poison)
    # S = sum_pairs DC conj(X) / q, in batch order; its inverse (scaled to max 1) gives dk
    sr = torch.zeros(ch.H, plan.n1, plan.n2, dtype=acc)
    si = torch.zeros_like(sr)
    for j in range(dr.shape[0]):
        sr = sr + (dr[j] * ch.xr[j] + di[j] * ch.xi[j]) / q[j]
        si = si + (di[j] * ch.xr[j] - dr[j] * ch.xi[j]) / q[j]
    ss = power_of_two_scale(torch.cat([sr, si], dim=-2))[:, None, None].to(acc)
    yr, _ = st.inverse(sr * ss, si * ss)
    dk_full = yr.reshape(ch.H, plan.n // 2) * _output_scale(plan.n, ss, torch.ones_like(ss))[:, :, 0]
    dk = (dk_full[:, : k.shape[-1]] + channel_poison[:, None]).to(k.dtype)
    dD = None
    if D is not None:
        x_clean = torch.where(ch.x.isfinite(), ch.x, torch.zeros((), dtype=acc))
        dD = torch.zeros(ch.H, dtype=acc)
        for b in range(ch.B):
            dD = dD + (dc[b] * x_clean[b]).sum(-1)
        dD = (dD + channel_poison).to(D.dtype)
    du = dx * gate_in.to(acc) if gate_in is not None else dx
    dgate_in = (dx * u.to(acc)).to(gate_in.dtype) if gate_in is not None else None
    return du.to(u.dtype), dk, dD, dgate_in, dgate_out
