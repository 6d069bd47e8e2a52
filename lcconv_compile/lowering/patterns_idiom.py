"""Idiom patterns: hand-written causal FFT convolutions, each beside its replacement by the op.

Each ``_*_pattern(u, k)`` is the math as people write it (H3, Hyena, FlashFFTConv references and
textbook variants); every one is replaced by :func:`_fftconv_replacement`. Patterns are traced
once, at placeholder sizes, for inference graphs (``fwd_only``) and for training graphs
(``joint_fwd_bwd``, once per set of inputs that need gradients); the replacement is traced the
same way, so a training graph gets ``lcconv::fftconv`` *and* its ``lcconv::fftconv_bwd``.

Sizes, scalars and dtypes are ignored when matching (so any FFT size, any ``L``, any scale
matches the structure): :func:`.guards.check_idiom` then checks the graph's own numbers. A scale
by a number matches ``* c`` and ``/ c`` alike (:func:`scale_by_either`: ``rfft(k, n) * (1 / n)``
is H3's ``rfft(k, n) / n``), so each spelling is written with one of them. This module holds the
pairs and their example inputs only: no guards, no pass plumbing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import (
    CallFunction,
    Ignored,
    KeywordArg,
    MultiOutputPattern,
    fwd_only,
    joint_fwd_bwd,
)
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fft_idiom import ConvLayout, handed_over_layout, signal_first


def _sizes(u: torch.Tensor, t: int = -1) -> tuple[int, int]:
    """(L, fft_size) for tracing a pattern. Any fft_size >= L + Lk - 1 would do: matching
    ignores sizes, and the guard checks the real graph's fft_size against its L and Lk."""
    seqlen = u.shape[t]
    return seqlen, 2 * seqlen


def _crop(y: torch.Tensor, seqlen, t: int) -> torch.Tensor:
    """``y[..., :seqlen]`` along dim ``t`` (-1, or -2 for a (B, L, H) layout)."""
    return y[(Ellipsis, slice(None, seqlen)) + (slice(None),) * (-1 - t)]


def _pad(x: torch.Tensor, n, t: int) -> torch.Tensor:
    """``F.pad(x, (0, n - length))`` along dim ``t``."""
    return F.pad(x, (0, 0) * (-1 - t) + (0, n - x.shape[t]))


# Each spelling takes the time dim ``t``: -1 for (B, H, L) with an (H, Lk) kernel, -2 for
# (B, L, H) with an (Lk, H) kernel. Matching ignores dims, so the t=-1 traces match both layouts
# in inference graphs; a training graph's backward differs between them, so both are traced.
def _rfft_conv_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    return _crop(torch.fft.irfft(torch.fft.rfft(u, n=n, dim=t) * torch.fft.rfft(k, n=n, dim=t), n=n, dim=t), seqlen, t)


def _rfft_conv_kernel_first_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    return _crop(torch.fft.irfft(torch.fft.rfft(k, n=n, dim=t) * torch.fft.rfft(u, n=n, dim=t), n=n, dim=t), seqlen, t)


def _padded_rfft_conv_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    u_f, k_f = torch.fft.rfft(_pad(u, n, t), dim=t), torch.fft.rfft(_pad(k, n, t), dim=t)
    return _crop(torch.fft.irfft(u_f * k_f, n=n, dim=t), seqlen, t)


def _rfft_conv_unsqueezed_kernel_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    k_f = torch.fft.rfft(k.unsqueeze(0), n=n, dim=t)
    return _crop(torch.fft.irfft(torch.fft.rfft(u, n=n, dim=t) * k_f, n=n, dim=t), seqlen, t)


def _rfft_conv_scaled_kernel_pattern(u, k, t=-1):
    # H3 / Hyena / FlashFFTConv reference: the 1/n sits on the kernel's spectrum.
    seqlen, n = _sizes(u, t)
    k_f = torch.fft.rfft(k, n=n, dim=t) / n
    u_f = torch.fft.rfft(u, n=n, dim=t)
    return _crop(torch.fft.irfft(u_f * k_f, n=n, dim=t, norm="forward"), seqlen, t)


def _rfft_conv_unsqueezed_scaled_kernel_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    k_f = torch.fft.rfft(k.unsqueeze(0), n=n, dim=t) / n
    u_f = torch.fft.rfft(u, n=n, dim=t)
    return _crop(torch.fft.irfft(u_f * k_f, n=n, dim=t, norm="forward"), seqlen, t)


def _rfft_conv_scaled_signal_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    u_f = torch.fft.rfft(u, n=n, dim=t) / n
    return _crop(torch.fft.irfft(u_f * torch.fft.rfft(k, n=n, dim=t), n=n, dim=t, norm="forward"), seqlen, t)


def _rfft_conv_scaled_product_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    product = torch.fft.rfft(u, n=n, dim=t) * torch.fft.rfft(k, n=n, dim=t) / n
    return _crop(torch.fft.irfft(product, n=n, dim=t, norm="forward"), seqlen, t)


def _rfft_conv_scaled_output_pattern(u, k, t=-1):
    # norm="ortho" on all three transforms leaves the result 1/sqrt(n) too small.
    seqlen, n = _sizes(u, t)
    u_f = torch.fft.rfft(u, n=n, dim=t, norm="ortho")
    k_f = torch.fft.rfft(k, n=n, dim=t, norm="ortho")
    return _crop(torch.fft.irfft(u_f * k_f, n=n, dim=t, norm="ortho"), seqlen, t) * n**0.5


def _fft_conv_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    return _crop(torch.fft.ifft(torch.fft.fft(u, n=n, dim=t) * torch.fft.fft(k, n=n, dim=t), dim=t), seqlen, t).real


def _fft_conv_real_first_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    return _crop(torch.fft.ifft(torch.fft.fft(u, n=n, dim=t) * torch.fft.fft(k, n=n, dim=t), dim=t).real, seqlen, t)


def _padded_fft_conv_pattern(u, k, t=-1):
    # FlashFFTConv's README: both signals padded by hand, complex FFTs along dim=-1.
    seqlen, n = _sizes(u, t)
    y = torch.fft.ifft(torch.fft.fft(_pad(u, n, t), dim=t) * torch.fft.fft(_pad(k, n, t), dim=t), dim=t)
    return _crop(y, seqlen, t).real


def _padded_fft_conv_real_first_pattern(u, k, t=-1):
    seqlen, n = _sizes(u, t)
    y = torch.fft.ifft(torch.fft.fft(_pad(u, n, t), dim=t) * torch.fft.fft(_pad(k, n, t), dim=t), dim=t)
    return _crop(y.real, seqlen, t)


def _einsum_conv_pattern(u, k):
    seqlen, n = _sizes(u)
    return torch.fft.irfft(torch.einsum("bhf,hf->bhf", torch.fft.rfft(u, n=n), torch.fft.rfft(k, n=n)), n=n)[..., :seqlen]


def _einsum_conv_scaled_kernel_pattern(u, k):
    seqlen, n = _sizes(u)
    k_f = torch.fft.rfft(k, n=n) / n
    return torch.fft.irfft(torch.einsum("bhf,hf->bhf", torch.fft.rfft(u, n=n), k_f), n=n, norm="forward")[..., :seqlen]


def _broadcast_kernel_pattern(u, k):
    # A multi-head branch (Hyena): u (B, H, heads, L), one kernel per H shared over heads.
    seqlen, n = _sizes(u)
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n).unsqueeze(1), n=n)[..., :seqlen]


def _broadcast_scaled_kernel_pattern(u, k):
    # safari's fftconv_ref: k_f = rfft(k, n) / n; if u.dim() > 3: k_f = k_f.unsqueeze(1).
    seqlen, n = _sizes(u)
    k_f = (torch.fft.rfft(k, n=n) / n).unsqueeze(1)
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n, norm="forward")[..., :seqlen]


def _fftconv_replacement(u, k):
    # The spectra's product is commutative, so a match may bind the pattern's `u` to the kernel:
    # pick the roles from shapes, by the rule the guard used.
    signal, kernel = (u, k) if signal_first(u, k) else (k, u)
    layout = handed_over_layout(signal, kernel) or ConvLayout.plain(kernel.dim())
    if kernel.dim() == layout.kernel_rank + 1:  # bound after unsqueeze(0): the guard proved it unit
        kernel = kernel.squeeze(0)
    if layout == ConvLayout.plain(kernel.dim()):
        if kernel.dim() == 3:  # (1, H, Lk): the guard proved the leading size is 1
            kernel = kernel.squeeze(0)
        return _op_with_kernel_cropped(signal, kernel)
    return _fftconv_in_layout(signal, kernel, layout)


def _op_with_kernel_cropped(signal, kernel):
    seqlen = signal.shape[-1]
    if statically_known_true(kernel.shape[-1] > seqlen):
        kernel = kernel[..., :seqlen]  # taps beyond L never reach the first L outputs
    return torch.ops.lcconv.fftconv.default(signal, kernel)


def _fftconv_in_layout(signal, kernel, layout: ConvLayout):
    """The op on views of the matched tensors: time moved last, the product dims before the first
    kernel channel flattened into B, the rest into H (the kernel expanded along those it is
    broadcast over), and the result put back in the signal's layout."""
    x = signal.movedim(layout.time, -1) if layout.time != layout.rank - 1 else signal
    others = [j for j in range(layout.rank) if j != layout.time]
    first = next(i for i, j in enumerate(others) if layout.kernel_dims[j] is not None)
    channel_dims = others[first:]
    batch_shape, channel_shape, seqlen = x.shape[:first], x.shape[first:-1], x.shape[-1]
    # The kernel as (channels it varies along..., Lk), its unit dims squeezed, then expanded.
    varying = [layout.kernel_dims[j] for j in channel_dims if layout.kernel_dims[j] is not None]
    order = varying + [layout.kernel_time]
    units = [d for d in range(kernel.dim()) if d not in order]
    if order + units != list(range(kernel.dim())):
        kernel = kernel.permute(order + units)
    for _ in units:
        kernel = kernel.squeeze(-1)
    for i, j in enumerate(channel_dims):
        if layout.kernel_dims[j] is None:
            kernel = kernel.unsqueeze(i)
    if any(layout.kernel_dims[j] is None for j in channel_dims):
        kernel = kernel.expand(*channel_shape, kernel.shape[-1])
    channels, batch = math.prod(channel_shape), math.prod(batch_shape)
    if len(channel_shape) != 1:
        kernel = kernel.reshape(channels, kernel.shape[-1])
    u3 = x if len(batch_shape) == 1 and len(channel_shape) == 1 else x.reshape(batch, channels, seqlen)
    y = _op_with_kernel_cropped(u3, kernel)
    if u3 is not x:
        y = y.reshape(x.shape)
    return y.movedim(-1, layout.time) if layout.time != layout.rank - 1 else y


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
    "rfft_conv_scaled_output": _rfft_conv_scaled_output_pattern,
    "fft_conv": _fft_conv_pattern,
    "fft_conv_real_first": _fft_conv_real_first_pattern,
    "fft_conv_padded": _padded_fft_conv_pattern,
    "fft_conv_padded_real_first": _padded_fft_conv_real_first_pattern,
    "einsum_conv": _einsum_conv_pattern,
    "einsum_conv_scaled_kernel": _einsum_conv_scaled_kernel_pattern,
    "broadcast_kernel_conv": _broadcast_kernel_pattern,
    "broadcast_scaled_kernel_conv": _broadcast_scaled_kernel_pattern,
}
# The spellings also traced with time along dim 1 of (B, L, H) (all but einsum and broadcast).
TIME_ALONG_DIM_1 = tuple(family for family in IDIOMS if not family.startswith(("einsum", "broadcast")))
# Example shapes for patterns whose signal is not (B, H, L).
_SIGNAL_SHAPE = {"broadcast_kernel_conv": (2, 3, 2, 8), "broadcast_scaled_kernel_conv": (2, 3, 2, 8)}

# (suffix, trace function, u needs grad, k needs grad). A training graph's backward depends on
# which inputs need gradients, so each set is traced; inference graphs have no backward.
TRACES = (
    ("inference", fwd_only, False, False),
    ("training", joint_fwd_bwd, True, True),
    ("training", joint_fwd_bwd, False, True),
    ("training", joint_fwd_bwd, True, False),
)
_LEARNED_KERNEL = tuple(trace for trace in TRACES if trace[0] == "training" and trace[3])

# H3's spelling with a kernel that arrives as (1, H, Lk), learned: the kernel's gradient is summed
# over the batch keeping the unit dim (then squeezed, for an unsqueeze in the function), or not
# summed at all when B = 1, so the backward is not an (H, Lk) kernel's. Inference graphs and
# graphs where only u learns match `rfft_conv_scaled_kernel` (the replacement squeezes the
# kernel): only traces with a learned kernel are added, at these shapes. Time along dim -1 only.
# family: (search function, signal shape, kernel shape)
UNIT_BATCH_KERNEL_TRAINING = {
    "rfft_conv_unsqueezed_scaled_kernel": (_rfft_conv_unsqueezed_scaled_kernel_pattern, (2, 3, 8), (3, 8)),
    "rfft_conv_unsqueezed_scaled_kernel_batch_1": (_rfft_conv_unsqueezed_scaled_kernel_pattern, (1, 3, 8), (3, 8)),
    "rfft_conv_scaled_unit_kernel": (_rfft_conv_scaled_kernel_pattern, (2, 3, 8), (1, 3, 8)),
    "rfft_conv_scaled_unit_kernel_batch_1": (_rfft_conv_scaled_kernel_pattern, (1, 3, 8), (1, 3, 8)),
}


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
    # (family, search function, signal shape, kernel shape, traces)
    variants = [(family, _time_along(pattern, -1) if family in TIME_ALONG_DIM_1 else pattern,
                 _SIGNAL_SHAPE.get(family, (2, 3, 8)), (3, 8), TRACES) for family, pattern in IDIOMS.items()]
    # (B, L, H) with an (Lk, H) kernel: training graphs only (inference ones match the above).
    training = tuple(trace for trace in TRACES if trace[0] == "training")
    variants += [(family, _time_along(IDIOMS[family], -2), (2, 8, 3), (8, 3), training) for family in TIME_ALONG_DIM_1]
    variants += [(family, _time_along(pattern, -1), signal_shape, kernel_shape, _LEARNED_KERNEL)
                 for family, (pattern, signal_shape, kernel_shape) in UNIT_BATCH_KERNEL_TRAINING.items()]
    for family, search, signal_shape, kernel_shape, traces in variants:
        for suffix, trace_fn, u_grad, k_grad in traces:
            yield PatternSpec(
                name=f"{family}_{suffix}",
                search_fn=search,
                replace_fn=_fftconv_replacement,
                example_inputs=(torch.empty(signal_shape, device=device, requires_grad=u_grad),
                                torch.empty(kernel_shape, device=device, requires_grad=k_grad)),
                trace_fn=trace_fn,
            )


def _time_along(pattern: Callable[..., Any], t: int) -> Callable[..., Any]:
    """``pattern`` with its time dim fixed to ``t``, as a function of (u, k) only (the matcher
    reads the search function's parameters as the pattern's inputs)."""

    def search(u, k):
        return pattern(u, k, t)

    search.__name__ = f"{pattern.__name__}_time_{t}"
    return search


_SCALES = (torch.ops.aten.div.Tensor, torch.ops.aten.mul.Tensor)


def scale_by_either(pattern: Any) -> Any:
    """``pattern`` (a traced idiom pattern) with each scale by a number matching ``x * c`` and
    ``x / c`` alike; returns it, changed in place.

    A scale is a ``div.Tensor`` or ``mul.Tensor`` node of a tensor pattern and a number traced as
    anything (``Ignored``): the guard reads which operator and number the graph has
    (``_net_scale``), so one traced spelling covers both. In a training pattern this includes the
    backward's scale of the same spectrum (``grad / c`` or ``grad * c``, whichever the forward
    had: autograd's derivative of it). Products of two spectra (two tensor patterns) are not
    scales and keep their one operator.
    """
    seen: set[int] = set()
    stack = [pattern]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, MultiOutputPattern):
            stack.extend(output for output in node.outputs if output is not None)
            continue
        if not isinstance(node, CallFunction):
            continue
        if (set(node.fns) <= set(_SCALES) and len(node.args) == 2 and not node.kwargs
                and isinstance(node.args[1], Ignored) and isinstance(node.args[0], (CallFunction, KeywordArg))):
            node.fns = list(_SCALES)
            node.fns_set = type(node.fns_set)(node.fns)
        for arg in list(node.args) + list(node.kwargs.values()):
            stack.extend(arg if isinstance(arg, (list, tuple)) else [arg])
    return pattern
