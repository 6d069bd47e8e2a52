"""``LongConv``: the long-convolution mixer of "Simple Hardware-Efficient Long Convolutions" (seed 000).

The kernel is learned directly, one weight per channel and tap, shape ``(H, l_max)``. Before
each use it is regularised as in the paper, in this order (each step can be switched off):

    Smooth   K[t] <- mean(K[t-p .. t+p])            average pool of width 2p+1, zeros outside
    Squash   K    <- sign(K) * max(|K| - lambda, 0)  soft threshold: small weights become 0
    Dropout  K    <- dropout(K)                      on the kernel weights (training only)

The block around the convolution is the paper's: input projection, the convolution with its
skip ``D``, GELU, channel dropout (one mask per (batch, channel), as H3), output projection
(a GLU by default). The convolution, skip, GELU and dropout mask are one ``lcconv_compile.fftconv``
call. With ``bidirectional=True`` a second kernel is applied anti-causally (to the reversed
sequence); the layer is then NOT causal: output t sees inputs after t.

The kernel parametrisation (a learned ``(channels, l_max)`` weight, its initialisations and the
Smooth/Squash/Dropout regularisation) is written once here as functions: :func:`check_kernel_options`,
:func:`init_kernel_weight` and :func:`regularised_kernel`; ``H3(kernel="longconv")`` uses the same
three for its per-head kernels.

This module is plain PyTorch over the op: it must not call ``torch.fft`` itself.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import check_choice, check_positive, check_seqlen
from ._conv import long_conv
from ._projections import project_in, project_out

__all__ = [
    "LongConv",
    "check_kernel_options",
    "init_kernel_weight",
    "regularised_kernel",
    "smooth_kernel",
    "squash_kernel",
]

KERNEL_INITS = ("random", "geometric")
ACTIVATIONS = ("gelu", "identity")
OUTPUT_PROJECTIONS = ("glu", "linear", "none")


def smooth_kernel(kernel: Tensor, radius: int) -> Tensor:
    """Average pool of width ``2*radius+1`` along the last dim, zeros beyond both ends.

    ``out[t] = sum_{j=-radius..radius} kernel[t+j] / (2*radius+1)``; radius 0 is the identity.
    """
    if radius == 0:
        return kernel
    width = 2 * radius + 1
    flat = kernel.reshape(-1, 1, kernel.shape[-1])
    pooled = F.avg_pool1d(flat, width, stride=1, padding=radius, count_include_pad=True)
    return pooled.reshape(kernel.shape)


def squash_kernel(kernel: Tensor, lam: float) -> Tensor:
    """``sign(K) * max(|K| - lam, 0)``; lam 0 is the identity."""
    if lam == 0:
        return kernel
    return torch.sign(kernel) * F.relu(kernel.abs() - lam)


def check_kernel_options(
    owner: str, l_max: Optional[int], *, squash_lambda: float, smooth_radius: int, kernel_dropout: float,
    kernel_init: str,
) -> None:
    """Errors for a learned kernel's options, worded for ``owner``; ``l_max`` is required."""
    if l_max is None:
        raise ValueError(
            f"{owner}: l_max is required: the learned long kernel has one weight per tap up to l_max; "
            "pass l_max=<longest sequence>"
        )
    check_positive(owner, l_max=l_max)
    check_choice(owner, "kernel_init", kernel_init, KERNEL_INITS)
    if squash_lambda < 0:
        raise ValueError(f"{owner}: squash_lambda must be >= 0, got {squash_lambda}")
    if smooth_radius < 0 or 2 * smooth_radius + 1 > l_max:
        raise ValueError(
            f"{owner}: smooth_radius must satisfy 0 <= 2*p+1 <= l_max = {l_max}, got p = {smooth_radius}"
        )
    if not 0.0 <= kernel_dropout < 1.0:
        raise ValueError(f"{owner}: kernel_dropout must be in [0, 1), got {kernel_dropout}")


@torch.no_grad()
def init_kernel_weight(weight: Tensor, kernel_init: str, kernel_std: float) -> None:
    """Fill a ``(..., channels, l_max)`` kernel weight in place (see LongConv's ``kernel_init``)."""
    weight.normal_(0.0, kernel_std)
    if kernel_init == "geometric":
        channels, l_max = weight.shape[-2], weight.shape[-1]
        max_rate = max(channels / 2, 1.0)
        rates = max_rate ** (torch.arange(channels, dtype=torch.float64) / max(channels - 1, 1))
        taps = torch.arange(l_max, dtype=torch.float64) / l_max
        decay = torch.exp(-rates[:, None] * taps[None, :])  # (channels, l_max)
        weight.mul_(decay.to(weight))


def regularised_kernel(
    weight: Tensor, seqlen: int, *, smooth_radius: int, squash_lambda: float, kernel_dropout: float,
    training: bool,
) -> Tensor:
    """Smooth, Squash, then Dropout the full ``(..., l_max)`` weight; return its first ``seqlen`` taps.

    Smooth and Squash act on the full kernel, so a shorter sequence sees the same leading taps.
    """
    k = smooth_kernel(weight, smooth_radius)
    k = squash_kernel(k, squash_lambda)
    k = F.dropout(k, kernel_dropout, training)
    if isinstance(seqlen, torch.SymInt):
        # A view cut to a symbolic L is contiguous only at L = l_max, and torch.export would guard
        # on it (leaving L = l_max out of the exported range); a gather makes a contiguous copy.
        return k.index_select(-1, torch.arange(seqlen, device=k.device))
    return k[..., :seqlen]


class LongConv(nn.Module):
    """Long-convolution mixer; ``forward`` maps ``(B, L, d_model)`` to ``(B, L, d_model)``, ``L <= l_max``.

    Args:
        d_model: channels.
        l_max: kernel length, the longest sequence the layer accepts.
        squash_lambda: Squash threshold lambda (0 switches Squash off).
        smooth_radius: Smooth half-width p; the pool has width 2p+1 (0 switches Smooth off).
        kernel_dropout: dropout probability on the kernel weights.
        kernel_init: ``"random"`` (i.i.d. normal, std ``kernel_std``) or ``"geometric"`` (normal
            times ``exp(-rate_h * t / l_max)``, rates spaced geometrically from 1 to ``d_model/2``
            over the channels: short and long memories side by side).
        kernel_std: standard deviation of the initial kernel weights.
        bidirectional: add an anti-causal kernel (non-causal layer; see the module docstring).
        activation: ``"gelu"`` (fused into the op) or ``"identity"``.
        dropout: channel dropout after the activation, one Bernoulli per (batch, channel).
        in_proj: input projection ``Linear(d_model, d_model)`` before the convolution.
        out_proj: ``"glu"`` (``Linear(d, 2d)`` + GLU, the paper's block), ``"linear"`` or ``"none"``.
    """

    def __init__(
        self,
        d_model: int,
        l_max: Optional[int],
        *,
        squash_lambda: float = 1e-3,
        smooth_radius: int = 0,
        kernel_dropout: float = 0.0,
        kernel_init: str = "geometric",
        kernel_std: float = 0.02,
        bidirectional: bool = False,
        activation: str = "gelu",
        dropout: float = 0.0,
        in_proj: bool = True,
        out_proj: str = "glu",
        device=None,
        dtype=None,
    ):
        super().__init__()
        owner = type(self).__name__
        check_positive(owner, d_model=d_model)
        check_kernel_options(
            owner, l_max, squash_lambda=squash_lambda, smooth_radius=smooth_radius,
            kernel_dropout=kernel_dropout, kernel_init=kernel_init,
        )
        check_choice(owner, "activation", activation, ACTIVATIONS)
        check_choice(owner, "out_proj", out_proj, OUTPUT_PROJECTIONS)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"{owner}: dropout must be in [0, 1), got {dropout}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.l_max = d_model, l_max
        self.squash_lambda, self.smooth_radius = squash_lambda, smooth_radius
        self.kernel_dropout, self.dropout = kernel_dropout, dropout
        self.bidirectional = bidirectional
        self.activation = activation

        self.in_proj = nn.Linear(d_model, d_model, **factory) if in_proj else nn.Identity()
        directions = 2 if bidirectional else 1  # row 0: causal kernel, row 1: anti-causal kernel
        self.kernel_weight = nn.Parameter(torch.empty(directions, d_model, l_max, **factory))
        self.D = nn.Parameter(torch.randn(d_model, **factory))
        if out_proj == "glu":
            self.out_proj = nn.Sequential(nn.Linear(d_model, 2 * d_model, **factory), nn.GLU(dim=-1))
        elif out_proj == "linear":
            self.out_proj = nn.Linear(d_model, d_model, **factory)
        else:
            self.out_proj = nn.Identity()
        self.kernel_init, self.kernel_std = kernel_init, kernel_std
        init_kernel_weight(self.kernel_weight, kernel_init, kernel_std)

    @property
    def is_causal(self) -> bool:
        """True when output t depends only on inputs 0..t."""
        return not self.bidirectional

    def kernel(self, seqlen: int) -> Tensor:
        """The regularised kernel for a sequence of ``seqlen``: ``(directions * d_model, seqlen)``.

        Smooth and Squash act on the full ``l_max`` kernel (so that a shorter sequence sees the
        same leading taps), then the kernel is cut to ``seqlen`` taps.
        """
        # Flattened before the cut: a reshape after it would test the cut view's contiguity, which
        # under torch.export guards L != l_max and leaves L = l_max out of a dynamic range.
        return regularised_kernel(
            self.kernel_weight.flatten(0, 1), seqlen, smooth_radius=self.smooth_radius,
            squash_lambda=self.squash_lambda, kernel_dropout=self.kernel_dropout, training=self.training,
        )

    def _channel_dropout_mask(self, u: Tensor) -> Optional[Tensor]:
        if not self.training or self.dropout == 0.0:
            return None
        keep = 1.0 - self.dropout
        return torch.bernoulli(torch.full(u.shape[:2], keep, device=u.device, dtype=torch.float32)) / keep

    def long_conv(
        self, u: Tensor, k: Tensor, D: Optional[Tensor], gelu: bool, dropout_mask: Optional[Tensor]
    ) -> Tensor:
        """The ``lcconv_compile.fftconv`` contract (causal conv + skip, GELU, mask) on ``(B, H, L)``.

        The one place subclasses change the convolution's implementation (ButterflyLongConv).
        """
        return long_conv(u, k, D, gelu=gelu, dropout_mask=dropout_mask)

    def forward(self, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
        """``x``: ``(B, L, d_model)``; ``key_padding_mask``: optional ``(B, L)`` bool, True = padding.

        Padded positions are zeroed before the convolution, so they feed no other position
        (their own outputs are meaningless, as in attention).
        """
        seqlen = check_seqlen(type(self).__name__, x, self.d_model, self.l_max)
        u = project_in(self.in_proj, x, key_padding_mask)  # (B, H, L), contiguous
        k = self.kernel(seqlen)
        gelu = self.activation == "gelu"
        mask = self._channel_dropout_mask(u)
        if not self.bidirectional:
            y = self.long_conv(u, k, self.D, gelu, mask)
        else:
            # Causal and anti-causal halves as one call over 2H channels: the anti-causal part is
            # the causal convolution of the reversed sequence, reversed back.
            both = self.long_conv(torch.cat([u, u.flip(-1)], dim=1), k, None, False, None)
            forward_part, backward_part = both.split(self.d_model, dim=1)
            y = forward_part + backward_part.flip(-1) + u * self.D.unsqueeze(-1)
            y = F.gelu(y) if gelu else y
            y = y * mask.unsqueeze(-1) if mask is not None else y
        return project_out(self.out_proj, y, x.dtype)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, l_max={self.l_max}, squash_lambda={self.squash_lambda}, "
            f"smooth_radius={self.smooth_radius}, kernel_dropout={self.kernel_dropout}, "
            f"kernel_init={self.kernel_init!r}, bidirectional={self.bidirectional}, "
            f"activation={self.activation!r}, dropout={self.dropout}"
        )
