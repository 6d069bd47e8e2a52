"""Read a hand-written FFT convolution out of an aten graph: which nodes play which part.

A hand-written causal FFT convolution reaches the graph Inductor sees as (CPU, torch 2.13)::

    constant_pad_nd(u) -> _fft_r2c --\
                                      mul -> _fft_c2r -> slice [-> mul by a scale]
    constant_pad_nd(k) -> _fft_r2c --/

with optional scalar multiplies or divides on either spectrum, on their product or on the
result, ``unsqueeze(k, 0)`` before the kernel's padding, ``unsqueeze``/``permute`` between an FFT
and the product (an ``einsum`` product, a multi-head ``k_f.unsqueeze(1)``), and, for the complex
spelling (``fft``/``ifft`` + ``.real``), ``_fft_c2c`` and ``view_as_real -> select`` in place of
``_fft_c2r``. The FFTs may run along any one dim (a (B, L, H) layout transforms dim 1).
:func:`parse_fft_conv` walks that chain from its last node and names the parts
(:class:`FFTConvIdiom`); :func:`product_dims` says which dim of an FFT's output feeds each dim of
the product. It reads the graph only.

It decides nothing: whether the parts compute exactly ``lcconv::fftconv`` (sizes, layout,
normalisation, slice bounds) is for :mod:`.guards`, which hands the layout it accepted to the
replacement through :func:`hand_over_layout` (the replacement is traced right after the guard
accepts, from tensors alone, which do not say which dim is time). It must not edit graphs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Union

import torch
from torch.fx import Node

aten = torch.ops.aten

_SCALE_OPS = (aten.mul.Tensor, aten.div.Tensor)
INVERSE_FFTS = (aten._fft_c2r.default, aten._fft_c2c.default)


def is_inverse_fft(node: Node) -> bool:
    if node.op != "call_function" or node.target not in INVERSE_FFTS:
        return False
    return node.target == aten._fft_c2r.default or node.args[3] is False  # c2c: forward=False


@dataclasses.dataclass(frozen=True)
class Spectrum:
    """One operand of the spectral product: ``scale(r2c(pad(unsqueeze?(source))))``."""

    source: Node  # the tensor being transformed (before any unsqueeze)
    unsqueezed: bool  # the source went through unsqueeze(0) (a (H, Lk) kernel made (1, H, Lk))
    pad: Node  # constant_pad_nd
    transform: Node  # _fft_r2c
    scales: tuple[Node, ...]  # scalar mul/div applied to the spectrum
    reshapes: tuple[Node, ...] = ()  # unsqueeze/permute between the FFT and the product, first applied first


@dataclasses.dataclass(frozen=True)
class FFTConvIdiom:
    """The named parts of one hand-written FFT convolution."""

    output: Node  # the node whose value is the convolution
    signal: Spectrum
    kernel: Spectrum
    product: Node  # mul of the two spectra
    inverse: Node  # _fft_c2r, or _fft_c2c (complex spelling)
    crop: Node  # the slice that keeps the first outputs
    real_part: Optional[Node]  # select(view_as_real(.), -1, i) for the complex spelling
    output_scales: tuple[Node, ...]  # scalar mul/div on the product or anywhere after the inverse FFT

    def scale_nodes(self) -> tuple[Node, ...]:
        return self.signal.scales + self.kernel.scales + self.output_scales


def value(arg: Any) -> Any:
    """The value an argument stands for: a constant as is, a node's example value (tensor, SymInt)."""
    if isinstance(arg, Node):
        return arg.meta.get("val", arg.meta.get("example_value"))
    return arg


def is_scalar_scale(node: Node) -> bool:
    """``x * c`` or ``x / c`` with ``c`` a number or symbolic size (not a tensor)."""
    return (
        node.op == "call_function"
        and node.target in _SCALE_OPS
        and len(node.args) == 2
        and isinstance(node.args[0], Node)
        and not isinstance(value(node.args[1]), torch.Tensor)
    )


def _peel_scales(node: Node) -> tuple[Node, tuple[Node, ...]]:
    scales = []
    while isinstance(node, Node) and is_scalar_scale(node):
        scales.append(node)
        node = node.args[0]
    return node, tuple(scales)


def _is_call(node: Any, target) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target == target


# Ops that only reshape a tensor. unsqueeze and permute between a spectrum and the product are
# read (:func:`product_dims`); any other reshape there is not understood.
_READ_RESHAPES = (aten.permute.default, aten.unsqueeze.default)
_RESHAPES = _READ_RESHAPES + (aten.view.default, aten.expand.default, aten.reshape.default,
                              aten._unsafe_view.default, aten.squeeze.dim, aten.transpose.int)


def _peel_reshapes(node: Node) -> tuple[Node, tuple[Node, ...], Optional[str]]:
    """Walk up through reshapes; return the node above them, the ones read (first applied first)
    and, when one is not readable, its description."""
    read = []
    while isinstance(node, Node) and node.op == "call_function" and node.target in _RESHAPES:
        if node.target not in _READ_RESHAPES:
            args = ", ".join(repr(arg) for arg in node.args[1:])
            return node, (), f"{node.target.__name__.split('.')[0]}({args})"
        read.append(node)
        node = node.args[0]
    return node, tuple(reversed(read)), None


def _parse_spectrum(node: Node) -> Union[Spectrum, str]:
    node, scales = _peel_scales(node)
    node, reshapes, unread = _peel_reshapes(node)
    if unread is not None:
        return (f"a spectrum is reshaped after its FFT ({unread}): only unsqueeze and permute (an einsum "
                "product, a multi-head `k_f.unsqueeze(1)`) are read there (reshape before the FFT, or call "
                "lcconv_compile.fftconv)")
    node, more_scales = _peel_scales(node)
    scales += more_scales
    if _is_call(node, aten._fft_c2c.default):
        return "a spectrum is a complex-to-complex FFT: complex inputs are not rewritten"
    if not _is_call(node, aten._fft_r2c.default):
        return "a spectrum is not a real-to-complex FFT"
    pad = node.args[0]
    if not _is_call(pad, aten.constant_pad_nd.default):
        return "an FFT input is not zero-padded"
    source = pad.args[0]
    unsqueezed = _is_call(source, aten.unsqueeze.default) and source.args[1] == 0
    if unsqueezed:
        source = source.args[0]
    if not isinstance(source, Node):
        return "an FFT input is a constant"
    return Spectrum(source, unsqueezed, pad, node, scales, reshapes)


def product_dims(spectrum: Spectrum, product_rank: int) -> Optional[list[Optional[int]]]:
    """For each dim of the product (broadcast to ``product_rank``): the dim of the spectrum's FFT
    output that feeds it, or None where a unit dim was inserted (by unsqueeze or broadcasting).
    None when the reshapes are not understood (a dim out of range)."""
    rank = value(spectrum.transform).dim()
    dims: list[Optional[int]] = list(range(rank))
    for node in spectrum.reshapes:
        if node.target == aten.unsqueeze.default:
            at = node.args[1]
            at = at + len(dims) + 1 if at < 0 else at
            if not 0 <= at <= len(dims):
                return None
            dims.insert(at, None)
        else:  # permute
            order = [d + len(dims) if d < 0 else d for d in node.args[1]]
            if sorted(order) != list(range(len(dims))):
                return None
            dims = [dims[d] for d in order]
    if len(dims) > product_rank:
        return None
    return [None] * (product_rank - len(dims)) + dims


@dataclasses.dataclass(frozen=True)
class ConvLayout:
    """Where the op's (B, H, L) and (H, Lk) sit in a matched convolution's tensors.

    The signal's dims are the product's; ``time`` is the product dim the FFTs run along.
    ``kernel_dims[j]`` is the kernel dim that varies along product dim ``j`` (a channel dim), or
    None where the kernel is broadcast; the kernel's other dims are ``kernel_time`` and unit dims.
    Product dims before the first channel dim are flattened into the op's B, the rest (time
    excluded) into its H, the kernel expanded along the broadcast ones among them.
    """

    rank: int
    time: int
    kernel_rank: int  # the kernel's rank before any unsqueeze(0) in front of its FFT
    kernel_time: int
    kernel_dims: tuple[Optional[int], ...]

    @staticmethod
    def plain(kernel_rank: int = 2) -> "ConvLayout":
        """(B, H, L) with an (H, Lk) kernel: the op's own layout."""
        return ConvLayout(3, 2, kernel_rank, kernel_rank - 1, (None, kernel_rank - 2, None))


_handed_over: list[tuple[ConvLayout, tuple, tuple]] = []


def hand_over_layout(layout: Optional[ConvLayout], signal_shape=(), kernel_shape=()) -> None:
    """The guard, on accepting a match: the layout for the replacement traced next (None clears)."""
    _handed_over.clear()
    if layout is not None:
        _handed_over.append((layout, tuple(signal_shape), tuple(kernel_shape)))


def handed_over_layout(signal: torch.Tensor, kernel: torch.Tensor) -> Optional[ConvLayout]:
    """The layout the guard accepted for tensors of these shapes, or None."""
    if not _handed_over:
        return None
    layout, signal_shape, kernel_shape = _handed_over[0]
    if signal_shape != tuple(signal.shape) or kernel_shape not in (tuple(kernel.shape), tuple(kernel.shape[1:])):
        return None
    return layout


def signal_first(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when ``a`` (not ``b``) is the convolved signal, judged from shapes alone.

    The product of spectra is commutative, so a graph does not say which operand is the signal.
    The signal is the operand of higher rank; between two (B, H, L)-shaped operands, the kernel
    is the one of batch size 1 when exactly one is, the one with fewer elements when both are
    (B = 1 with a (1, H, Lk) kernel, Lk < L), else the first operand is the signal.
    The replacement uses the same rule, so the guard judges what the replacement will build.
    """
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if a.dim() != b.dim():
        return a.dim() > b.dim()
    if a.dim() == 3:
        a_single, b_single = (statically_known_true(t.shape[0] == 1) for t in (a, b))
        if a_single != b_single:
            return b_single
        if a_single and statically_known_true(a.numel() < b.numel()):
            return False
    return True


def parse_fft_conv(output: Node) -> Union[FFTConvIdiom, str]:
    """Name the parts of the FFT convolution ending at ``output``, or say why it is not one."""
    node, output_scales = _peel_scales(output)
    crop = real_part = None
    for _ in range(2):  # slice and .real, in either order, possibly with scales between
        node, more_scales = _peel_scales(node)
        output_scales += more_scales
        if _is_call(node, aten.slice.Tensor) and crop is None:
            crop, node = node, node.args[0]
        elif (
            _is_call(node, aten.select.int)
            and real_part is None
            and _is_call(node.args[0], aten.view_as_real.default)
        ):
            real_part, node = node, node.args[0].args[0]
    node, more_scales = _peel_scales(node)
    output_scales += more_scales
    if crop is None:
        return "the inverse FFT's output is not sliced"
    if not (isinstance(node, Node) and node.op == "call_function" and node.target in INVERSE_FFTS):
        return "no inverse FFT under the slice"
    inverse = node
    product, product_scales = _peel_scales(inverse.args[0])
    output_scales += product_scales
    if not _is_call(product, aten.mul.Tensor):
        return "the inverse FFT's input is not a product of two spectra"
    spectra = [_parse_spectrum(arg) for arg in product.args]
    for spectrum in spectra:
        if isinstance(spectrum, str):
            return spectrum
    first, second = spectra
    first_val, second_val = value(first.source), value(second.source)
    if not (isinstance(first_val, torch.Tensor) and isinstance(second_val, torch.Tensor)):
        return "an FFT input has no example value"
    if not signal_first(first_val, second_val):
        first, second = second, first
    return FFTConvIdiom(
        output=output,
        signal=first,
        kernel=second,
        product=product,
        inverse=inverse,
        crop=crop,
        real_part=real_part,
        output_scales=output_scales,
    )
