"""Oracles for tests only: the op's formula as direct sums in float64 (independent of the FFT), and
the one check of a kernel family's gradients against the float64 reference."""

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


def assert_backward_matches_reference(got, grad_y, args, tol):
    """A family's fftconv_bwd gradients ``got`` (du, dk, dD, dgate_in, dgate_out) against the
    float64 reference: None exactly where the input is absent, the input's shape and dtype, every
    element written (outputs were poisoned with NaN), relative error below ``tol``."""
    from inputs import as_float64, rel_err
    from lcconv_compile import reference

    want = reference.fftconv_bwd_ref(grad_y.double(), **as_float64(args))
    inputs = dict(du="u", dk="k", dD="D", dgate_in="gate_in", dgate_out="gate_out")
    for name, g, w in zip(want._fields, got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.shape == w.shape and g.dtype == args[inputs[name]].dtype, name
        assert not torch.isnan(g).any(), f"{name}: unwritten elements"
        err = rel_err(g, w)
        assert err < tol, f"{name}: relative error {err:.2e}"
