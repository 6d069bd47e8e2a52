"""Oracles for tests only: the op's formula as direct sums in float64 (independent of the FFT), the
one check of a kernel family's gradients against the float64 reference, and FlashButterfly's
step 2 in torch.fft (to test steps 1 and 3 alone)."""

from typing import Optional

import torch
from torch import Tensor

from lcconv_compile import reference


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


class TorchFFTRowsConv:
    """FlashButterfly's step 2 (:class:`lcconv_compile.kernels.flashbutterfly.RowsConv`) with
    torch.fft in float32: an oracle that isolates steps 1 and 3 from the on-chip step 2."""

    @staticmethod
    def _rows(z: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n1, n2 = z.shape[2], z.shape[3]
        return torch.view_as_complex(z.float()), reference.butterfly_kernel_rows(k, n1, n2, torch.float32)

    def forward(self, z: torch.Tensor, k: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        z_c, kernel_rows = self._rows(z, k)
        w = torch.view_as_real(reference.butterfly_step2(z_c, kernel_rows)).to(z.dtype)
        return w if out is None else out.copy_(w)

    def backward(self, dw: torch.Tensor, z: torch.Tensor, k: torch.Tensor,
                 out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        z_c, kernel_rows = self._rows(z, k)
        dw_c = torch.view_as_complex(dw.float())
        dz, dk = reference.butterfly_step2_bwd(dw_c, torch.fft.fft(z_c, dim=-1), kernel_rows, k.shape[-1])
        dz = torch.view_as_real(dz).to(z.dtype)
        return (dz if out is None else out.copy_(dz)), dk
