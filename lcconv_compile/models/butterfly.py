"""``ButterflyLongConv``: LongConv whose FFT is written as learnable butterfly (Monarch) factors.

Form (decided here, the one the FlashButterfly kernels use). With ``N = fft_size(l_max, l_max)``
split as ``N = N1 * N2`` (``N1 = 2^floor(log2(N)/2)``), index a length-N signal as
``n = n1*N2 + n2`` and its spectrum as ``k = k1 + N1*k2``. Cooley-Tukey then reads::

    F_N x = [ F_N2 along n2, for each k1 ]  .  [ twiddle w_N^(n2*k1) . F_N1 along n1, for each n2 ]
                                               `------------------- in_factor ------------------'

so the causal FFT convolution ``F_N^-1 diag(F_N k) F_N`` becomes the three steps of FlashButterfly:

    1. in_factor:  for each column n2, an (N1 x N1) complex matrix on u[:, n2]      (one pass over u)
    2. N1 independent FFT convolutions of length N2 (rows k1), spectrum of k cut into rows
    3. out_factor: for each column n2, an (N1 x N1) complex matrix back to time      (one more pass)

``in_factor`` and ``out_factor`` (each ``(N2, N1, N1)`` complex, stored as real pairs, shared by all
channels) are trainable parameters initialised to the exact factors (twiddles folded in), so at
initialisation the layer is exactly LongConv (up to rounding; tests check float64). Step 2 keeps
exact FFTs: it is the on-chip part of the algorithm, not a learned one.

Causality (decided): the layer is causal ONLY while the factors are exact. Once they are trained
the map ``u -> y`` is a general linear mixer over the zero-padded length N (output t may see inputs
after t); the real part of step 3 is taken as the output. We do not constrain the factors: any
structure that keeps them causal would make them the FFT again. So ``is_causal`` is False when
``learn_butterfly=True``; ``LongConvLM(causal=True)`` and ``swap_attention`` refuse such a layer
where causality is required, and ``learn_butterfly=False`` (factors as buffers) keeps it causal.

This file is the plain-PyTorch reference behind a stable module API; the FlashButterfly kernel will
replace ``butterfly_conv`` without changing the module. It is the one place in ``models/`` that calls
``torch.fft`` directly (step 2 and the kernel spectrum).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lcconv_compile.reference import fft_size

from .longconv import LongConv

__all__ = ["ButterflyLongConv", "monarch_sizes", "exact_fft_factors", "butterfly_conv"]


def monarch_sizes(n: int) -> tuple[int, int]:
    """``(N1, N2)`` with ``N1 * N2 = n`` (a power of two), ``N1 = 2^floor(log2(n)/2) <= N2``."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"butterfly: FFT size must be a power of two, got {n}")
    n1 = 1 << (int(math.log2(n)) // 2)
    return n1, n // n1


def exact_fft_factors(n: int, dtype: torch.dtype = torch.complex128) -> tuple[Tensor, Tensor]:
    """The exact ``(in_factor, out_factor)``, each ``(N2, N1, N1)``: ``in[n2, k1, n1]`` and ``out[n2, n1, k1]``.

    ``in[n2, k1, n1] = w_N^(n2 k1) w_N1^(n1 k1)`` (twiddle times DFT_N1), ``w_M = exp(-2 pi i / M)``;
    ``out`` is its inverse for each n2, ``(1/N1) w_N1^(-n1 k1) w_N^(-n2 k1)``.
    """
    n1, n2 = monarch_sizes(n)
    idx1 = torch.arange(n1, dtype=torch.float64)
    idx2 = torch.arange(n2, dtype=torch.float64)
    dft_phase = -2 * math.pi * torch.outer(idx1, idx1) / n1  # [k1, n1]
    twiddle_phase = -2 * math.pi * idx2[:, None, None] * idx1[None, :, None] / n  # [n2, k1, 1]
    phase = dft_phase.unsqueeze(0) + twiddle_phase  # [n2, k1, n1]
    in_factor = torch.polar(torch.ones_like(phase), phase)
    out_factor = in_factor.conj().transpose(1, 2) / n1  # unitary up to 1/N1: the inverse
    return in_factor.to(dtype), out_factor.to(dtype)


def butterfly_conv(u: Tensor, k: Tensor, in_factor: Tensor, out_factor: Tensor) -> Tensor:
    """``u (B, H, L)`` convolved with ``k (H, Lk)`` through the factors; real ``(B, H, L)``.

    With exact factors and ``N >= L + Lk - 1`` this is the causal convolution ``causal_conv(u, k)``.
    Computes in the factors' complex dtype.
    """
    n2, n1, _ = in_factor.shape
    n = n1 * n2
    batch, channels, seqlen = u.shape
    x = F.pad(u, (0, n - seqlen)).to(in_factor.dtype).view(batch, channels, n1, n2)
    z = torch.einsum("cki,bhic->bhkc", in_factor, x)  # step 1: rows k1, columns n2
    k_spectrum = torch.fft.fft(k.to(in_factor.dtype), n=n).view(channels, n2, n1).transpose(1, 2)
    w = torch.fft.ifft(torch.fft.fft(z, dim=-1) * k_spectrum, dim=-1)  # step 2: along n2
    y = torch.einsum("cik,bhkc->bhic", out_factor, w)  # step 3: back to time, [n1, n2]
    return y.reshape(batch, channels, n)[..., :seqlen].real


class ButterflyLongConv(LongConv):
    """LongConv with the convolution computed through learnable butterfly factors.

    Takes every LongConv argument, plus:
        learn_butterfly: factors are trainable parameters (True; the layer is then a general,
            non-causal mixer once trained) or fixed buffers (False; exactly LongConv, causal).
    """

    def __init__(self, d_model: int, l_max: int, *, learn_butterfly: bool = True, **longconv_options):
        super().__init__(d_model, l_max, **longconv_options)
        self.learn_butterfly = learn_butterfly
        self.fft_size = fft_size(l_max, l_max)
        real_dtype = self.kernel_weight.dtype
        complex_dtype = torch.complex128 if real_dtype == torch.float64 else torch.complex64
        in_factor, out_factor = exact_fft_factors(self.fft_size, complex_dtype)
        device = self.kernel_weight.device
        for name, factor in (("in_factor", in_factor), ("out_factor", out_factor)):
            stored = torch.view_as_real(factor).to(device=device, dtype=real_dtype)
            if learn_butterfly:
                self.register_parameter(name, nn.Parameter(stored))
            else:
                self.register_buffer(name, stored)

    @property
    def is_causal(self) -> bool:
        return not self.learn_butterfly and not self.bidirectional

    @torch.no_grad()
    def reset_butterfly(self) -> None:
        """Set the factors back to the exact FFT factors, computed in their current dtype.

        After ``.double()`` on a float32 layer the factors are float32 values cast up; call this
        to make fixed factors exact to float64 rounding.
        """
        dtype = torch.complex128 if self.in_factor.dtype == torch.float64 else torch.complex64
        for stored, exact in zip((self.in_factor, self.out_factor), exact_fft_factors(self.fft_size, dtype)):
            stored.copy_(torch.view_as_real(exact))

    def long_conv(
        self, u: Tensor, k: Tensor, D: Optional[Tensor], gelu: bool, dropout_mask: Optional[Tensor]
    ) -> Tensor:
        """Same contract as ``lcconv_compile.fftconv`` (float32 compute for half inputs)."""
        compute = torch.float64 if u.dtype == torch.float64 else torch.float32
        with torch.autocast(u.device.type, enabled=False):
            x = u.to(compute)
            in_factor = torch.view_as_complex(self.in_factor.to(compute).contiguous())
            out_factor = torch.view_as_complex(self.out_factor.to(compute).contiguous())
            y = butterfly_conv(x, k.to(compute), in_factor, out_factor)
            if D is not None:
                y = y + x * D.to(compute).unsqueeze(-1)
            if gelu:
                y = F.gelu(y)
            if dropout_mask is not None:
                y = y * dropout_mask.to(compute).unsqueeze(-1)
        return y.to(u.dtype)

    def extra_repr(self) -> str:
        n1, n2 = monarch_sizes(self.fft_size)
        return f"{super().extra_repr()}, fft_size={self.fft_size} ({n1}x{n2}), learn_butterfly={self.learn_butterfly}"
