"""Idiom patterns: hand-written causal FFT convolutions, each beside its replacement by the op.

Each ``_*_pattern(u, k)`` is the math as people write it (H3, Hyena, FlashFFTConv references and
textbook variants); every one is replaced by :func:`_fftconv_replacement`. Patterns are traced
once, at placeholder sizes, for inference graphs (``fwd_only``) and for training graphs
(``joint_fwd_bwd``, once per set of inputs that need gradients); the replacement is traced the
same way, so a training graph gets ``lcconv::fftconv`` *and* its ``lcconv::fftconv_bwd``.

Sizes, scalars and dtypes are ignored when matching (so any FFT size, any ``L``, any scale
matches the structure): :func:`.guards.check_idiom` then checks the graph's own numbers. This
module holds the pairs and their example inputs only: no guards, no pass plumbing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import fwd_only, joint_fwd_bwd
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fft_idiom import signal_first


def _sizes(u: torch.Tensor) -> tuple[int, int]:
    """(L, fft_size) for tracing a pattern. Any fft_size >= L + Lk - 1 would do: matching
    ignores sizes, and the guard checks the real graph's fft_size against its L and Lk."""
    seqlen = u.shape[-1]
    return seqlen, 2 * seqlen


def _rfft_conv_pattern(u, k):
    seqlen, n = _sizes(u)
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]


def _rfft_conv_kernel_first_pattern(u, k):
    seqlen, n = _sizes(u)
    return torch.fft.irfft(torch.fft.rfft(k, n=n) * torch.fft.rfft(u, n=n), n=n)[..., :seqlen]


def _padded_rfft_conv_pattern(u, k):
    seqlen, n = _sizes(u)
    u_padded = F.pad(u, (0, n - seqlen))
    k_padded = F.pad(k, (0, n - k.shape[-1]))
    return torch.fft.irfft(torch.fft.rfft(u_padded) * torch.fft.rfft(k_padded), n=n)[..., :seqlen]


def _rfft_conv_unsqueezed_kernel_pattern(u, k):
    seqlen, n = _sizes(u)
    k_f = torch.fft.rfft(k.unsqueeze(0), n=n)
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n)[..., :seqlen]


def _rfft_conv_scaled_kernel_pattern(u, k):
    # H3 / Hyena / FlashFFTConv reference: the 1/n sits on the kernel's spectrum.
    seqlen, n = _sizes(u)
    k_f = torch.fft.rfft(k, n=n) / n
    u_f = torch.fft.rfft(u, n=n)
    return torch.fft.irfft(u_f * k_f, n=n, norm="forward")[..., :seqlen]


def _rfft_conv_scaled_signal_pattern(u, k):
    seqlen, n = _sizes(u)
    u_f = torch.fft.rfft(u, n=n) / n
    return torch.fft.irfft(u_f * torch.fft.rfft(k, n=n), n=n, norm="forward")[..., :seqlen]


def _rfft_conv_scaled_product_pattern(u, k):
    seqlen, n = _sizes(u)
    product = torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n) / n
    return torch.fft.irfft(product, n=n, norm="forward")[..., :seqlen]


def _rfft_conv_reciprocal_product_pattern(u, k):
    # `* (1 / n)` is a multiply by a number, not the divide of the pattern above.
    seqlen, n = _sizes(u)
    product = torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n) * (1 / n)
    return torch.fft.irfft(product, n=n, norm="forward")[..., :seqlen]


def _rfft_conv_scaled_output_pattern(u, k):
    # norm="ortho" on all three transforms leaves the result 1/sqrt(n) too small.
    seqlen, n = _sizes(u)
    u_f = torch.fft.rfft(u, n=n, norm="ortho")
    k_f = torch.fft.rfft(k, n=n, norm="ortho")
    return torch.fft.irfft(u_f * k_f, n=n, norm="ortho")[..., :seqlen] * n**0.5


def _fft_conv_pattern(u, k):
    seqlen, n = _sizes(u)
    return torch.fft.ifft(torch.fft.fft(u, n=n) * torch.fft.fft(k, n=n))[..., :seqlen].real


def _fft_conv_real_first_pattern(u, k):
    seqlen, n = _sizes(u)
    return torch.fft.ifft(torch.fft.fft(u, n=n) * torch.fft.fft(k, n=n)).real[..., :seqlen]


def _padded_fft_conv_pattern(u, k):
    # FlashFFTConv's README: both signals padded by hand, complex FFTs along dim=-1.
    seqlen, n = _sizes(u)
    u_padded = F.pad(u, (0, n - seqlen))
    k_padded = F.pad(k, (0, n - k.shape[-1]))
    y = torch.fft.ifft(torch.fft.fft(u_padded, dim=-1) * torch.fft.fft(k_padded, dim=-1), dim=-1)
    return y[..., :seqlen].real


def _padded_fft_conv_real_first_pattern(u, k):
    seqlen, n = _sizes(u)
    u_padded = F.pad(u, (0, n - seqlen))
    k_padded = F.pad(k, (0, n - k.shape[-1]))
    y = torch.fft.ifft(torch.fft.fft(u_padded, dim=-1) * torch.fft.fft(k_padded, dim=-1), dim=-1)
    return y.real[..., :seqlen]


def _fftconv_replacement(u, k):
    # The spectra's product is commutative, so a match may bind the pattern's `u` to the kernel:
    # pick the roles from shapes, by the rule the guard used.
    signal, kernel = (u, k) if signal_first(u, k) else (k, u)
    seqlen = signal.shape[-1]
    if kernel.dim() == 3:  # (1, H, Lk): the guard proved the leading size is 1
        kernel = kernel.squeeze(0)
    if statically_known_true(kernel.shape[-1] > seqlen):
        kernel = kernel[..., :seqlen]  # taps beyond L never reach the first L outputs
    return torch.ops.lcconv.fftconv.default(signal, kernel)


# Registration order is match order for patterns ending in the same op: a pattern that is a
# more specific spelling of another comes first (an unsqueezed kernel would otherwise match the
# plain pattern with `k` bound to the unsqueeze, leaving an unsqueeze/squeeze pair behind).
IDIOMS: dict[str, Callable[..., Any]] = {
    "rfft_conv_unsqueezed_kernel": _rfft_conv_unsqueezed_kernel_pattern,
    "rfft_conv": _rfft_conv_pattern,
    "rfft_conv_kernel_first": _rfft_conv_kernel_first_pattern,
    "rfft_conv_padded": _padded_rfft_conv_pattern,
    "rfft_conv_scaled_kernel": _rfft_conv_scaled_kernel_pattern,
    "rfft_conv_scaled_signal": _rfft_conv_scaled_signal_pattern,
    "rfft_conv_scaled_product": _rfft_conv_scaled_product_pattern,
    "rfft_conv_reciprocal_product": _rfft_conv_reciprocal_product_pattern,
    "rfft_conv_scaled_output": _rfft_conv_scaled_output_pattern,
    "fft_conv": _fft_conv_pattern,
    "fft_conv_real_first": _fft_conv_real_first_pattern,
    "fft_conv_padded": _padded_fft_conv_pattern,
    "fft_conv_padded_real_first": _padded_fft_conv_real_first_pattern,
}

# (suffix, trace function, u needs grad, k needs grad). A training graph's backward depends on
# which inputs need gradients, so each set is traced; inference graphs have no backward.
TRACES = (
    ("inference", fwd_only, False, False),
    ("training", joint_fwd_bwd, True, True),
    ("training", joint_fwd_bwd, False, True),
    ("training", joint_fwd_bwd, True, False),
)


@dataclasses.dataclass(frozen=True)
class PatternSpec:
    """Everything ``register_replacement`` needs for one traced pattern."""

    name: str  # counter key, e.g. "rfft_conv_training"
    search_fn: Callable[..., Any]
    replace_fn: Callable[..., Any]
    example_inputs: tuple[Any, ...]
    trace_fn: Callable[..., Any]


def idiom_pattern_specs(device: torch.device) -> Iterator[PatternSpec]:
    """Every idiom pattern with every trace. Call under a FakeTensorMode (inputs are ``empty``)."""
    signal = functools.partial(torch.empty, (2, 3, 8), device=device)
    kernel = functools.partial(torch.empty, (3, 8), device=device)
    for family, pattern in IDIOMS.items():
        for suffix, trace_fn, u_grad, k_grad in TRACES:
            yield PatternSpec(
                name=f"{family}_{suffix}",
                search_fn=pattern,
                replace_fn=_fftconv_replacement,
                example_inputs=(signal(requires_grad=u_grad), kernel(requires_grad=k_grad)),
                trace_fn=trace_fn,
            )
