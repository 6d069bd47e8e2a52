"""Oracles independent of the FFT, for tests only: the op's formula as direct sums in float64."""

from typing import Optional

import torch
from torch import Tensor


def direct_causal_conv(u: Tensor, k: Tensor, D: Optional[Tensor] = None) -> Tensor:
    """``y[b,h,t] = sum_{s<=t} k[h,t-s] u[b,h,s] + D[h] u[b,h,t]`` as an O(L * Lk) sum in float64.

    Shifts u by each tap and accumulates, so it shares no code path with the FFT.
    """
    u64, k64 = u.double(), k.double()
    seqlen, kernel_len = u.shape[-1], k.shape[-1]
    y = torch.zeros_like(u64)
    for tap in range(kernel_len):
        y[..., tap:] += k64[:, tap, None] * u64[..., : seqlen - tap]
    if D is not None:
        y += D.double()[:, None] * u64
    return y


def direct_fftconv(u, k, D=None, gate_in=None, gate_out=None, gelu=False, dropout_mask=None):
    """The documented formula of ``fftconv``, with the convolution as a direct sum (float64)."""
    x = u.double() * gate_in.double() if gate_in is not None else u.double()
    y = direct_causal_conv(x, k, D)
    if gelu:
        y = torch.nn.functional.gelu(y)
    if dropout_mask is not None:
        y = y * dropout_mask.double()[..., None]
    if gate_out is not None:
        y = y * gate_out.double()
    return y
