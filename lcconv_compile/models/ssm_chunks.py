"""State passing for a diagonal SSM's convolution (seed 001's FlashConv for long sequences).

A diagonal SSM ``x[l] = a x[l-1] + b u[l]``, ``y[l] = 2 Re(c . x[l]) + D u[l]`` (per channel, ``M``
complex modes ``a, b, c``) is the causal convolution of ``u`` with ``K[j] = 2 Re(sum_n c_n b_n
a_n^j)``. Split into chunks of ``T`` samples and carry the state ``x`` across: with ``x_in`` the
state after the previous chunk,

    y_c[j]  = conv(K[:T], u_c)[j] + D u_c[j] + 2 Re(sum_n c_n a_n^(j+1) x_in_n)    (output)
    x_out_n = a_n^T x_in_n + b_n sum_i a_n^(T-1-i) u_c[i]                            (next state)

so no convolution, FFT or kernel longer than ``T`` is needed for any length, and the state after
the last chunk is exactly the recurrent state (``H3.step`` continues from it). This module holds
the two state terms; the chunk's convolution is the op's (the caller's ``long_conv``).

Both terms are Vandermonde products of ``O(B * channels * M * T)`` work; they are evaluated in
``sqrt(T)``-sized pieces (``a^(j+1) = a^(pS) a^(r+1)`` for ``j = pS + r``) so that their factors hold
``O(H * M * sqrt(T))`` numbers, not the ``(H, M, T)`` matrix. Complex tensors are used (the
recurrent form's dtype); under ``torch.compile`` Inductor runs them as eager ops. Nothing here
knows about H3's projections or gates.
"""

from __future__ import annotations


import torch
from torch import Tensor

__all__ = ["state_output", "state_update", "vandermonde_piece"]


def vandermonde_piece(length: int) -> int:
    """Samples per Vandermonde piece: the power of two at or above sqrt(length) (also H3's
    kernel chunk).

    Integer comparisons only: under ``torch.compile`` a length that is symbolic still looks like an
    int, and ``1 << ceil(log2(L) / 2)`` on it made a float expression that torch 2.11 cannot
    evaluate. On a symbolic length each comparison is a guard (a graph serves one band
    ``4^(e-1) < L <= 4^e``)."""
    piece = 1
    while piece * piece < length:
        piece *= 2
    return piece


def _powers(a: Tensor, exponents: Tensor) -> Tensor:
    """``a ** exponents`` for complex ``a`` (H, M) and integer exponents (E,): (H, E, M), as
    ``exp(exponent * log a)`` (one exp, stable for |a| <= 1)."""
    return torch.exp(exponents.to(a.dtype).view(1, -1, 1) * torch.log(a).unsqueeze(1))


def state_output(x_in: Tensor, a: Tensor, c: Tensor, length: int) -> Tensor:
    """``2 Re(sum_n c_n a_n^(j+1) x_in_n)`` for ``j < length``: the previous chunks' share of
    this chunk's output.

    ``x_in``: complex ``(B, H, P, M)`` (``P`` channels share head ``h``'s modes); ``a``, ``c``:
    complex ``(H, M)``. Returns real ``(B, H, P, length)``.
    """
    piece = vandermonde_piece(length)
    pieces = -(-length // piece)
    device = a.device
    row = _powers(a, torch.arange(pieces, device=device) * piece)  # a^(pS): (H, pieces, M)
    col = _powers(a, torch.arange(1, piece + 1, device=device)).transpose(1, 2)  # a^(r+1): (H, M, S)
    weighted = (x_in * c.unsqueeze(1)).unsqueeze(3) * row.unsqueeze(1)  # (B, H, P, pieces, M)
    out = 2.0 * (weighted @ col.unsqueeze(1)).real  # (B, H, P, pieces, S)
    return out.flatten(-2)[..., :length]


def state_update(x_in: Tensor, u: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """The state after a chunk: ``a^T x_in + b sum_i a^(T-1-i) u[i]`` with ``T = u.shape[-1]``.

    ``x_in``: complex ``(B, H, P, M)``; ``u``: real ``(B, H, P, T)``; ``a``, ``b``: complex ``(H, M)``.
    """
    length = u.shape[-1]
    piece = vandermonde_piece(length)
    pieces = -(-length // piece)
    front = pieces * piece - length  # zeros in front leave sum_i a^(T-1-i) u[i] unchanged
    u = torch.nn.functional.pad(u, (front, 0)).to(x_in.dtype).unflatten(-1, (pieces, piece))
    device = a.device
    # T_padded - 1 - (pS + r) = (pieces - 1 - p) S + (S - 1 - r)
    inner = _powers(a, torch.arange(piece - 1, -1, -1, device=device))  # a^(S-1-r): (H, S, M)
    outer = _powers(a, torch.arange(pieces - 1, -1, -1, device=device) * piece)  # (H, pieces, M)
    per_piece = u @ inner.unsqueeze(1)  # (B, H, P, pieces, M)
    summed = (per_piece * outer.unsqueeze(1)).sum(-2)  # (B, H, P, M)
    carry = _powers(a, torch.tensor([length], device=device)).squeeze(1)  # a^T: (H, M)
    return carry.unsqueeze(1) * x_in + b.unsqueeze(1) * summed
