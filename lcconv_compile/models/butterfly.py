"""``ButterflyLongConv``: LongConv whose FFT is written as learnable butterfly (Monarch) factors.

Form (the one of the op ``lcconv::butterfly_conv`` and the FlashButterfly kernels; the math is
``reference.butterfly_conv_ref``). With ``N = fft_size(l_max, l_max)`` split as ``N = N1 * N2``
by ``reference.butterfly_split`` (the kernels' split), index a length-N signal as
``n = n1*N2 + n2`` and its spectrum as ``k = k1 + N1*k2``. Cooley-Tukey then reads::

    F_N x = [ F_N2 along n2, for each k1 ]  .  [ twiddle w_N^(n2*k1) . F_N1 along n1, for each n2 ]
                                               `------------------- in_factor ------------------'

so the causal FFT convolution ``F_N^-1 diag(F_N k) F_N`` becomes the three steps of FlashButterfly:

    1. in_factor:  for each column n2, an (N1 x N1) complex matrix on u[:, n2]      (one pass over u)
    2. N1 independent FFT convolutions of length N2 (rows k1), spectrum of k cut into rows
    3. out_factor: for each column n2, an (N1 x N1) complex matrix back to time      (one more pass)

``in_factor`` and ``out_factor`` (each ``(N2, N1, N1)`` complex, stored as real pairs
``(N2, N1, N1, 2)``, shared by all channels) are trainable parameters initialised to the exact
factors (twiddles folded in), so at initialisation the layer is exactly LongConv (up to rounding;
tests check float64). Step 2 keeps exact FFTs: it is the on-chip part of the algorithm, not a
learned one.

The split (changed): N1 used to be ``2^floor(log2(N)/2)`` (about sqrt(N)); it is now the kernels'
``butterfly_split(N)``: ``N1 = N / 8192`` from N = 128K on (16 at l_max = 64K, 256 at 1M) and
``min(16, sqrt(N))`` below. A factor holds ``N * N1`` complex numbers (16 MB per factor at 64K
instead of 268 MB) and steps 1 and 3 cost ``8 N1`` FLOPs per sample. The constructor's arguments
are unchanged; checkpoints saved with the old split have factors of another shape and are refused
with a clear error (a learned factor of one split cannot be converted to another).

Causality (decided): the layer is causal ONLY while the factors are exact. Once they are trained
the map ``u -> y`` is a general linear mixer over the zero-padded length N (output t may see inputs
after t); the real part of step 3 is taken as the output. We do not constrain the factors: any
structure that keeps them causal would make them the FFT again. So ``is_causal`` is False when
``learn_butterfly=True``; ``LongConvLM(causal=True)`` and ``swap_attention`` refuse such a layer
where causality is required, and ``learn_butterfly=False`` (factors as buffers) keeps it causal.

The convolution is one ``lcconv_compile.butterfly_conv`` call (skip, GELU and channel dropout
fused, as in LongConv); like every module here it does not call ``torch.fft`` itself.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from lcconv_compile.butterfly_ops import butterfly_conv
from lcconv_compile.reference import butterfly_exact_factors, butterfly_split, fft_size

from .longconv import LongConv

__all__ = ["ButterflyLongConv"]


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
        factors = butterfly_exact_factors(self.fft_size, self.kernel_weight.dtype, self.kernel_weight.device)
        for name, stored in zip(("in_factor", "out_factor"), factors):
            if learn_butterfly:
                self.register_parameter(name, nn.Parameter(stored))
            else:
                self.register_buffer(name, stored)

    @property
    def is_causal(self) -> bool:
        return not self.learn_butterfly and not self.bidirectional

    @torch.no_grad()
    def reset_butterfly(self) -> None:
        """Set the factors back to the exact FFT factors (computed in float64, cast to their dtype).

        After ``.double()`` on a float32 layer the factors are float32 values cast up; call this
        to make fixed factors exact to float64 rounding.
        """
        exact = butterfly_exact_factors(self.fft_size, self.in_factor.dtype, self.in_factor.device)
        for stored, value in zip((self.in_factor, self.out_factor), exact):
            stored.copy_(value)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("in_factor", "out_factor"):
            saved, mine = state_dict.get(prefix + name), getattr(self, name)
            if saved is not None and tuple(saved.shape) != tuple(mine.shape):
                raise ValueError(
                    f"ButterflyLongConv: checkpoint `{prefix}{name}` has shape {tuple(saved.shape)} but "
                    f"this layer's is {tuple(mine.shape)}: factors now use the kernels' split "
                    f"(N2, N1, N1, 2) with (N1, N2) = butterfly_split({self.fft_size}), not "
                    f"N1 = 2^floor(log2(N)/2). A learned factor cannot be converted between splits: "
                    f"drop `{name}` from the checkpoint, load with strict=False and call reset_butterfly()"
                )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def long_conv(
        self, u: Tensor, k: Tensor, D: Optional[Tensor], gelu: bool, dropout_mask: Optional[Tensor]
    ) -> Tensor:
        """Same contract as ``lcconv_compile.fftconv``, through the butterfly factors."""
        return butterfly_conv(u, k, self.in_factor, self.out_factor, D, gelu=gelu, dropout_mask=dropout_mask)

    def extra_repr(self) -> str:
        n1, n2 = butterfly_split(self.fft_size)
        return f"{super().extra_repr()}, fft_size={self.fft_size} ({n1}x{n2}), learn_butterfly={self.learn_butterfly}"
