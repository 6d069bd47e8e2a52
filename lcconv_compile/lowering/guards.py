"""The guards: the one place that decides whether a structural match may be rewritten.

Patterns are traced with placeholder sizes and match with sizes, scalars and dtypes ignored (see
:mod:`.patterns_idiom`), so everything numeric is checked here, against the graph's own example
values: the FFT size against ``L + Lk - 1`` (else the convolution is circular), the slice bounds
(else it is not causal), the product of normalisations and scalar factors (else it is scaled),
the kernel's shape (the op takes one kernel per channel, shared over the batch), gate and skip
shapes (the op does not broadcast them), dtypes and devices.

Symbolic sizes (``dynamic=True``, or the recompile at a second length under automatic dynamic
shapes) are decided at the graph's example sizes: a condition that is not provable from the
symbols alone is read off their hints, and each condition so read becomes a guard of the
compiled graph (:func:`_guard_assumptions`), whether the check accepts or refuses. A rewritten graph is then reused only at sizes where the rewrite is the same math, a
refused one only where the same reason holds, and Dynamo recompiles elsewhere and decides again
(a fixed FFT size that is circular at L = 96 is still rewritten at L = 64). Only sizes without a
hint (data-dependent, unbacked) are refused as ``symbolic``.

Before any of that, every argument of every node a match absorbs goes through
:func:`.arguments.check_arguments` (the matcher itself ignores keywords such as ``alpha`` that a
pattern does not spell); each family's table of the arguments its patterns leave open sits
beside its check below.

:func:`check_idiom` guards the idiom rewrite; :func:`check_fusion` guards folding a neighbour
into an ``lcconv::fftconv`` call. Both return the ``extra_check`` the pattern matcher calls and
report what they decided to :mod:`.events`. Nothing here edits graphs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import operator
from typing import Any, Callable, Optional

import torch
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import guard_bool, statically_known_true

from . import events
from .arguments import READ, Only, OpenArguments, check_arguments
from .fft_idiom import ConvLayout, FFTConvIdiom, Spectrum, hand_over_layout, parse_fft_conv, product_dims, value

log = logging.getLogger(__name__)
aten = torch.ops.aten
prims = torch.ops.prims
FFTCONV = torch.ops.lcconv.fftconv.default
FFTCONV_ARGS = ("u", "k", "D", "gate_in", "gate_out", "gelu", "dropout_mask")
_REAL_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_HALF_FLOATS = (torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class Refusal:
    code: str
    reason: str


class _Refused(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.refusal = Refusal(code, reason)


def _refuse(code: str, reason: str):
    raise _Refused(code, reason)


# Conditions decided from hints during the check that is running (None: no check is collecting,
# e.g. explain's diagnosis of a leftover FFT, which must not add guards).
_assumptions: Optional[list] = None


def _hint(condition: Any) -> Optional[bool]:
    """A symbolic condition's value at the graph's example sizes, without guarding; None when a
    size has no hint (unbacked)."""
    node = getattr(condition, "node", None)
    if node is None or not node.has_hint():
        return None
    return bool(node.hint)


def _decide(condition: Any) -> Optional[bool]:
    """True/False: known from the symbols alone, or else read at the example sizes (see the module
    docstring: the answer is recorded and guarded if the check accepts). None when a size has no
    hint."""
    if condition is None or isinstance(condition, bool):
        return condition
    if statically_known_true(condition):
        return True
    if statically_known_true(torch.sym_not(condition)):
        return False
    answer = _hint(condition)
    if answer is not None and _assumptions is not None:
        _assumptions.append(condition if answer else torch.sym_not(condition))
    return answer


def _require(condition: Any, code: str, reason: str) -> None:
    """Refuse with ``code`` unless ``condition`` holds; with code "symbolic" if it cannot be decided."""
    decided = _decide(condition)
    if decided is None:
        _refuse("symbolic", f"the {code} check depends on a size without a hint (data-dependent)")
    if not decided:
        _refuse(code, reason)


@contextlib.contextmanager
def _collecting_assumptions():
    global _assumptions
    outer, _assumptions = _assumptions, []
    try:
        yield _assumptions
    finally:
        _assumptions = outer


def _guard_assumptions(assumptions: list) -> None:
    """Make the compiled graph valid only where what was read at the example sizes holds."""
    for condition in assumptions:
        guard_bool(condition)


def _tensor(node: Any, what: str) -> torch.Tensor:
    val = value(node)
    if not isinstance(val, torch.Tensor):
        _refuse("shape", f"{what} is not a tensor")
    return val


def _size_of(arg: Any):
    val = value(arg)
    if isinstance(val, (int, torch.SymInt)):
        return val
    _refuse("shape", f"size argument {arg!r} is not an integer")


def _show(size: Any) -> str:
    """A size for a message: a symbolic one with its value at the example sizes, ``s0 (96 here)``."""
    node = getattr(size, "node", None)
    if node is not None and node.has_hint() and not isinstance(size, torch.SymBool):
        return f"{size} ({node.hint} here)"
    return str(size)


def _shape_str(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> Optional[bool]:
    """Whether two shapes are equal; None when that depends on a symbolic size."""
    if a.dim() != b.dim():
        return False
    same: Optional[bool] = True
    for x, y in zip(a.shape, b.shape):
        decided = _decide(x == y)
        if decided is False:
            return False
        if decided is None:
            same = None
    return same


# ------------------------------------------------------------------------------ idiom guard --
# aten's FFT ``normalization`` argument (none, by 1/sqrt(n), by 1/n) as a power of the size n.
_NORMALISATION_POWER = {0: 0.0, 1: -0.5, 2: -1.0}


def _net_scale(idiom: FFTConvIdiom, fft_size) -> tuple[float, float]:
    """The factor the hand-written code applies on top of the plain convolution, as (c, p): c * n^p.

    The unnormalised inverse transform of the product is ``n`` times the convolution, hence the
    starting power 1; each transform's normalisation and each scalar multiply/divide adjust it.
    """
    constant, power = 1.0, 1.0
    for transform in (idiom.signal.transform, idiom.kernel.transform, idiom.inverse):
        if transform.args[2] not in _NORMALISATION_POWER:
            _refuse("normalisation", f"unknown FFT normalisation {transform.args[2]!r}")
        power += _NORMALISATION_POWER[transform.args[2]]
    for node in idiom.scale_nodes():
        scalar = value(node.args[1])
        sign = 1.0 if node.target == aten.mul.Tensor else -1.0
        if isinstance(scalar, (torch.SymInt, torch.SymFloat)):
            divisor = _reciprocal_of(node.args[1])
            if divisor is not None and _decide(divisor == fft_size):  # `* (1 / n)`, `/ (1 / n)`
                power -= sign
                continue
            if _decide(scalar == fft_size):
                power += sign
                continue
            _refuse("symbolic", "a scale factor is symbolic and is neither the FFT size nor its reciprocal")
        if not isinstance(scalar, (int, float)) or scalar == 0:
            _refuse("normalisation", f"scale factor {scalar!r} is not a non-zero number")
        constant *= float(scalar) ** sign
    return constant, power


def _reciprocal_of(arg: Any):
    """``m`` when ``arg`` is the graph's symbolic ``1 / m`` (a Python-level ``1 / n`` on a symbolic
    size reaches the graph as a ``truediv`` node), else None."""
    if not (isinstance(arg, Node) and arg.op == "call_function" and arg.target is operator.truediv):
        return None
    numerator, denominator = arg.args
    if not (isinstance(numerator, (int, float)) and numerator == 1):
        return None
    divisor = value(denominator)
    return divisor if isinstance(divisor, (int, torch.SymInt)) else None


def _check_padding(spectrum: Spectrum, time: int, fft_size, what: str) -> None:
    """Zeros appended along ``time`` (a dim of the padded tensor) up to the FFT size, nothing else."""
    pad_args = spectrum.pad.args
    pads = pad_args[1]
    fill = pad_args[2] if len(pad_args) > 2 else 0
    if not isinstance(fill, (int, float)) or fill != 0:
        _refuse("padding", f"{what} is padded with {fill!r}, not zeros")
    padded = _tensor(spectrum.pad, what)
    if not isinstance(pads, (list, tuple)) or len(pads) % 2 or len(pads) > 2 * padded.dim():
        _refuse("padding", f"{what}'s padding {pads!r} is not understood")
    pairs = [tuple(_size_of(p) for p in pads[i:i + 2]) for i in range(0, len(pads), 2)]  # last dim first
    time_pair = padded.dim() - 1 - time
    if time_pair >= len(pairs):
        _refuse("fft_size", f"{what} is not zero-padded along the dim its FFT transforms")
    left, right = pairs[time_pair]
    _require(left == 0, "padding", f"{what} is padded on the left by {left}: the output is shifted")
    for i, (before, after) in enumerate(pairs):
        if i != time_pair:
            _require(before == 0 and after == 0, "padding", f"{what} is padded along a dimension other than time")
    length = _tensor(spectrum.pad.args[0], what).shape[time]
    _require(
        length + right == fft_size,
        "fft_size",
        f"{what} is zero-padded to {length + right}, but the inverse FFT has size {fft_size}",
    )


def _transform_dim(node: Node, what: str) -> int:
    """The one dim an FFT node transforms, counted from 0."""
    rank = _tensor(node.args[0], what).dim()
    dims = list(node.args[1])
    if len(dims) != 1 or not -rank <= dims[0] < rank:
        _refuse("transform_dim", f"{what} transforms dims {dims}: a convolution transforms one (time) dim")
    return dims[0] % rank


# What the idiom patterns leave open (sizes, dims, normalisations, scalar factors: traced at
# placeholder values) and who checks it; every other argument is held to the pattern by
# :mod:`.arguments` (e.g. a slice's step must be 1).
IDIOM_OPEN_ARGUMENTS: OpenArguments = {
    aten.constant_pad_nd.default: {"pad": READ, "value": READ},  # _check_padding
    aten._fft_r2c.default: {"dim": READ, "normalization": READ},  # _transform_dim, _net_scale
    aten._fft_c2r.default: {"dim": READ, "normalization": READ, "last_dim_size": READ},  # + fft_size
    aten._fft_c2c.default: {"dim": READ, "normalization": READ},
    aten.slice.Tensor: {"dim": READ, "start": READ, "end": READ},  # the crop checks
    aten.select.int: {"dim": READ, "index": READ},  # the real-part checks
    aten.mul.Tensor: {"other": READ},  # scale factors: _net_scale
    aten.div.Tensor: {"other": READ},
    # unsqueeze before the kernel's FFT (dim 0 only: the replacement squeezes dim 0) or after an
    # FFT; permute after an FFT (einsum). _layout reads where each puts the dims.
    aten.unsqueeze.default: {"dim": READ},
    aten.permute.default: {"dims": READ},
}
_UNSQUEEZE_BEFORE_FFT = Only((0,), "the kernel is unsqueezed elsewhere than in front")


def _layout(idiom: FFTConvIdiom, product: torch.Tensor, time: int, u: torch.Tensor,
            k: torch.Tensor) -> ConvLayout:
    """Where B, H and L sit: the signal must be the product's own dims (no reshape, no
    broadcast); the kernel varies along some of them (its channels) and is broadcast along the
    others. Refuses what the op cannot compute by flattening dims."""
    rank = product.dim()
    signal_dims = product_dims(idiom.signal, rank)
    if idiom.signal.unsqueezed or signal_dims != list(range(rank)) or u.dim() != rank:
        _refuse("signal_shape", f"the signal {_shape_str(u)} is reshaped or broadcast into the product "
                                f"{_shape_str(product)}: the op needs it as the product's own dims")
    kernel_dims = product_dims(idiom.kernel, rank)
    if kernel_dims is None:
        _refuse("kernel_shape", "the kernel's spectrum is reshaped in a way that is not understood")
    shift = 1 if idiom.kernel.unsqueezed else 0  # FFT-output dims -> the kernel's own dims
    padded = _tensor(idiom.kernel.pad, "the padded kernel")
    kernel_time = _transform_dim(idiom.kernel.transform, "the kernel's FFT")
    if kernel_dims[time] != kernel_time:
        _refuse("transform_dim", f"the kernel's FFT transforms its dim {kernel_time - shift}, which is not "
                                 f"the product's time dim {time} (the inverse FFT's)")
    channels: list[Optional[int]] = [None] * rank
    for j, d in enumerate(kernel_dims):
        if j == time or d is None:
            continue
        size, product_size = padded.shape[d], product.shape[j]
        if _decide(size == product_size):
            if d < shift:
                continue
            channels[j] = d - shift
        elif not _decide(size == 1):
            _refuse("symbolic" if _decide(size == 1) is None else "kernel_shape",
                    f"the kernel's dim of size {size} meets the product's dim of size {product_size}")
    varying = [j for j, d in enumerate(channels) if d is not None]
    # A dim of size 1 in both the kernel and the product (B = 1 with a (1, H, Lk) kernel) holds
    # one kernel for the one index there: a batch dim as much as a channel dim. Leading ones are
    # read as batch dims (the kernel is shared over a batch of one), unless that leaves no
    # channel dim in a signal of rank 2, whose first dim is its channels.
    def unit_in_both(j: int) -> bool:
        return bool(_decide(product.shape[j] == 1)) and bool(_decide(padded.shape[channels[j] + shift] == 1))

    while varying and unit_in_both(varying[0]) and (len(varying) > 1 or (varying[0] == 0 and rank >= 3)):
        channels[varying.pop(0)] = None
    if not varying:
        _refuse("kernel_shape", f"the kernel {_shape_str(k)} is shared over channels: the op needs one kernel per "
                                f"channel, (H, Lk)")
    if varying[0] == 0 and rank >= 3:
        _refuse("kernel_varies_over_batch", f"the kernel has shape {_shape_str(k)}: one kernel per batch element, "
                                            "the op shares one over the batch")
    return ConvLayout(rank, time, k.dim(), kernel_time - shift, tuple(channels))


def _check_idiom(idiom: FFTConvIdiom) -> tuple[str, ConvLayout]:
    """Refuse unless ``idiom`` computes exactly ``fftconv(u, k)`` in some layout of its dims;
    return a one-line summary and the layout."""
    u = _tensor(idiom.signal.source, "the signal")
    k = _tensor(idiom.kernel.source, "the kernel")
    out = _tensor(idiom.output, "the output")
    for name, t in (("signal", u), ("kernel", k)):
        if t.dtype not in _REAL_FLOATS:
            _refuse("dtype", f"the {name} has dtype {t.dtype}: only real floating inputs are rewritten")
    product = _tensor(idiom.product, "the product of spectra")
    if u.dim() < 2:
        _refuse("signal_shape", f"the signal has shape {_shape_str(u)}: the op needs (B, H, L)")
    # Time is the inverse FFT's dim; both FFTs must transform that dim of their inputs.
    time = _transform_dim(idiom.inverse, "the inverse FFT")
    signal_time = _transform_dim(idiom.signal.transform, "the signal's FFT")
    if signal_time != time:
        _refuse("transform_dim", f"the signal's FFT transforms dim {signal_time}, the inverse FFT dim {time}")
    layout = _layout(idiom, product, time, u, k)  # also refuses a signal reshaped into the product
    seqlen = u.shape[time]
    kernel_len = k.shape[layout.kernel_time]
    if u.device != k.device:
        _refuse("device", f"signal on {u.device}, kernel on {k.device}")
    if out.dtype != u.dtype:
        _refuse("dtype", f"the result has dtype {out.dtype} but the op returns the signal's dtype {u.dtype}")
    if k.dtype not in (torch.float32, u.dtype):
        _refuse("dtype", f"kernel dtype {k.dtype}: the op takes float32 or the signal's dtype {u.dtype}")

    inverse = idiom.inverse
    complex_spelling = inverse.target == aten._fft_c2c.default
    if complex_spelling:
        if inverse.args[3] is not False:
            _refuse("structure", "the complex transform after the product is a forward FFT, not an inverse")
        if idiom.real_part is None or idiom.real_part.args[2] != 0:
            _refuse("structure", "the complex result's imaginary part is kept, not its real part")
        if idiom.real_part.args[1] not in (-1, _tensor(idiom.real_part.args[0], "the result").dim() - 1):
            _refuse("structure", "the real part is not taken along the complex dimension")
        fft_size = _tensor(inverse, "the inverse FFT").shape[time]
    else:
        fft_size = _size_of(inverse.args[3])
    onesided = not complex_spelling
    for spectrum in (idiom.signal, idiom.kernel):
        if spectrum.transform.args[3] is not onesided:
            _refuse("structure", "a one-sided and a two-sided spectrum are mixed")

    _check_padding(idiom.signal, signal_time, fft_size, "the signal")
    _check_padding(idiom.kernel, layout.kernel_time + idiom.kernel.unsqueezed, fft_size, "the kernel")
    _require(
        fft_size >= seqlen + kernel_len - 1,
        "circular",
        f"circular convolution: FFT size {_show(fft_size)} < L + Lk - 1 = {_show(seqlen)} + {_show(kernel_len)} - 1",
    )

    if _decide(kernel_len <= seqlen) is None:
        _refuse("symbolic", "cannot prove without a new guard whether the kernel is longer than L")

    # The slice's end is checked through the result's length: ends past L are clamped alike.
    dim, start, _end, step = (list(idiom.crop.args) + [None] * 5)[1:5]
    rank = _tensor(idiom.crop.args[0], "the sliced result").dim()
    if not isinstance(dim, int) or dim % rank != time:
        _refuse("crop", f"the result is sliced along dim {dim}, not time (dim {time})")
    written_start = start = 0 if start is None else _size_of(start)
    # A negative start counts from the end of the inverse FFT's n outputs (and stops at 0), as
    # Python's slices do: `y[..., -n:-n + L]` keeps outputs 0..L-1.
    negative = _decide(start < 0)
    if negative is None:
        _refuse("symbolic", "cannot prove without a new guard whether the slice starts from the end")
    if negative:
        start = start + _tensor(idiom.crop.args[0], "the sliced result").shape[time]
        start = 0 if _decide(start < 0) else start
    from_end = f" (output {start} counted from the front)" if negative else ""
    _require(start == 0, "non_causal_slice",
             f"the slice starts at {written_start}{from_end}: a causal convolution keeps outputs 0..L-1")
    if step not in (None, 1):
        _refuse("non_causal_slice", f"the slice has step {step}")
    _require(out.shape[time] == seqlen, "crop", f"the slice keeps {out.shape[time]} outputs, the signal has L = {seqlen}")
    _require(_same_shape(out, u), "shape", f"the result has shape {_shape_str(out)}, the signal {_shape_str(u)}")

    constant, power = _net_scale(idiom, fft_size)
    if power == 0:
        total = constant
    elif isinstance(fft_size, int):
        total = constant * fft_size**power
    else:
        _refuse("symbolic", f"the result is scaled by {constant:g} * n^{power:g} with a symbolic FFT size n")
    if not math.isclose(total, 1.0, rel_tol=1e-6):
        _refuse("normalisation", f"normalisation: the result is {total:g} times the convolution")
    where = "" if layout == ConvLayout.plain(k.dim()) else f", time along dim {time} of {_shape_str(u)}"
    return f"L={_show(seqlen)}, Lk={_show(kernel_len)}, fft_size={_show(fft_size)}{where}", layout


# ----------------------------------------------------------------------------- fusion guards --
def op_arguments(node: Node) -> dict[str, Any]:
    """The arguments of an ``lcconv::fftconv`` call by name, defaults filled in."""
    args = dict(zip(FFTCONV_ARGS, (None, None, None, None, None, False, None)))
    args.update(zip(FFTCONV_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _the_op(match) -> Node:
    ops = [n for n in match.nodes if n.target == FFTCONV]
    if len(ops) != 1:
        _refuse("structure", f"expected one fftconv call in the match, found {len(ops)}")
    return ops[0]


def _require_unset(op_args: dict[str, Any], names: tuple[str, ...], why: str) -> None:
    for name in names:
        if op_args[name] not in (None, False):
            _refuse("order", f"`{name}` is already set on the op: {why}")


def _check_same_device(*tensors: torch.Tensor) -> None:
    if len({t.device for t in tensors}) > 1:
        _refuse("device", "the op and its neighbour are on different devices")


def _check_result_dtype(match, op_out: torch.Tensor) -> None:
    result = _tensor(match.output_node(), "the fused result")
    if result.dtype != op_out.dtype:
        _refuse("dtype", f"the neighbour changes the dtype to {result.dtype}; the op returns {op_out.dtype}")


SKIP_OPEN_ARGUMENTS: OpenArguments = {aten.unsqueeze.default: {"dim": READ}}  # the (H, 1) shape check
# torch 2.11's Inductor decomposes addcmul(y, u, w, value=c) into y + (u * c) * w, so the traced
# pattern holds u * c with c open (2.13 keeps addcmul, whose value the pattern leaves at 1).
SKIP_ADDCMUL_OPEN_ARGUMENTS: OpenArguments = {
    aten.mul.Tensor: {"other": Only((1,), "u is scaled before the skip weight (addcmul's value, decomposed): "
                                          "the pattern is written for value=1")},
}


def _check_skip(match) -> None:
    """``+ u * w`` (either order, or ``addcmul(y, u, w)``) with ``w`` one weight per channel as it
    multiplies u: ``D.unsqueeze(-1)`` (the pattern's unsqueeze, of D (H,) or (1, H)), or a weight
    already shaped (H, 1) or (1, H, 1) (``D.view(H, 1)``, ``D[None, :, None]``)."""
    op = _the_op(match)
    op_args = op_arguments(op)
    _require_unset(op_args, ("D", "gate_in", "gate_out", "gelu", "dropout_mask"),
                   "the skip term is added to the bare convolution only")
    x = _tensor(match.kwargs["u"], "the conv input")
    if not isinstance(value(match.kwargs["skip_weight"]), torch.Tensor):
        _refuse("skip_shape", "u is multiplied by a number, not by a weight per channel")
    D = _tensor(match.kwargs["skip_weight"], "D")
    out = _tensor(op, "the op")
    unsqueezed = [n for n in match.nodes if n.target == aten.unsqueeze.default]
    weight = _tensor(unsqueezed[0], "the unsqueezed D") if unsqueezed else D
    channels = x.shape[1]
    # Broadcast against (B, H, L), the weight must vary along H only: (..., H, 1) with unit dims
    # in front, at most rank 3. (1, H) would scale time steps, (B, H, 1) batch elements.
    per_channel = (
        2 <= weight.dim() <= 3
        and _decide(weight.shape[-1] == 1)
        and _decide(weight.shape[-2] == channels)
        and all(_decide(size == 1) for size in weight.shape[:-2])
    )
    if not per_channel:
        _refuse("skip_shape", f"u is multiplied by a weight of shape {_shape_str(weight)}: one weight per "
                              f"channel is (H, 1) = ({channels}, 1) (or (1, H, 1)); it scales other dims")
    if D.dtype not in _REAL_FLOATS:
        _refuse("dtype", f"D has dtype {D.dtype}")
    _check_same_device(x, D)
    _check_result_dtype(match, out)
    _require(_same_shape(_tensor(match.output_node(), "the fused result"), out), "skip_shape",
             "the skip term broadcasts the result beyond the op's output")


def _check_gate_in(match) -> None:
    op = _the_op(match)
    _require_unset(op_arguments(op), ("gate_in",), "a second input gate")
    u = _tensor(match.kwargs["u"], "u")
    gate = _tensor(match.kwargs["gate"], "the input gate")
    x = _tensor(op.args[0], "the conv input")
    for t, what in ((u, "u"), (gate, "the gate")):
        _require(_same_shape(t, x), "gate_shape",
                 f"{what} has shape {_shape_str(t)}, the product {_shape_str(x)}: the op does not broadcast gates")
    if x.dtype != u.dtype:
        _refuse("dtype", f"the gated input has dtype {x.dtype}, u {u.dtype}")
    if gate.dtype not in _REAL_FLOATS:
        _refuse("dtype", f"the gate has dtype {gate.dtype}")
    _check_same_device(u, gate)


# The exact GELU y * Phi(y), in the spellings the patterns trace; each leaves its numbers open and
# its reader below says where they sit. y * 0.5 * (1 + erf(y * 1/sqrt(2))) (F.gelu's decomposition):
GELU_OPEN_ARGUMENTS: OpenArguments = {aten.mul.Tensor: {"other": READ}, aten.add.Tensor: {"other": READ}}
# 0.5 * y * erfc(-y / sqrt(2)):
GELU_ERFC_OPEN_ARGUMENTS: OpenArguments = {aten.mul.Tensor: {"other": READ}, aten.div.Tensor: {"other": READ}}
# y * ndtr(y), decomposed to y * (0.5 * (1 + erf(y * 1/sqrt(2)))) with Scalar overloads:
GELU_NDTR_OPEN_ARGUMENTS: OpenArguments = {aten.mul.Scalar: {"other": READ}, aten.add.Scalar: {"other": READ}}
_SQRT_HALF = 1.0 / math.sqrt(2.0)


def _is_number(arg: Any, expected: float) -> bool:
    return isinstance(arg, (int, float)) and not isinstance(arg, bool) and math.isclose(arg, expected, rel_tol=1e-12)


def _erf_gelu_numbers(gelu: Node) -> list[tuple[str, Any, float]]:
    halved, one_plus_erf = gelu.args
    erf_input = one_plus_erf.args[0].args[0]
    return [("y * 0.5", halved.args[1], 0.5), ("erf(y * 1/sqrt(2))", erf_input.args[1], _SQRT_HALF),
            ("1 + erf", one_plus_erf.args[1], 1.0)]


def _erfc_gelu_numbers(gelu: Node) -> list[tuple[str, Any, float]]:
    halved, erfc = gelu.args
    return [("0.5 * y", halved.args[1], 0.5), ("erfc(-y / sqrt(2))", erfc.args[0].args[1], math.sqrt(2.0))]


def _ndtr_gelu_numbers(gelu: Node) -> list[tuple[str, Any, float]]:
    _, cdf = gelu.args
    one_plus_erf = cdf.args[0]
    erf_input = one_plus_erf.args[0].args[0]
    return [("ndtr's 0.5 * (1 + erf)", cdf.args[1], 0.5), ("ndtr's 1 + erf", one_plus_erf.args[1], 1.0),
            ("ndtr's erf(y * 1/sqrt(2))", erf_input.args[1], _SQRT_HALF)]


def _check_gelu_numbers(gelu: Node, numbers: Callable[[Node], list[tuple[str, Any, float]]]) -> None:
    # Each number is read where it sits: swapping 0.5 and 1/sqrt(2) is another function.
    wrong = [f"{where} has {actual!r}" for where, actual, expected in numbers(gelu) if not _is_number(actual, expected)]
    if wrong:
        _refuse("gelu", "not the exact GELU y * 0.5 * (1 + erf(y / sqrt(2))): " + ", ".join(wrong))


def _gelu_check(numbers: Callable[[Node], list[tuple[str, Any, float]]]) -> Callable[[Any], None]:
    def check(match) -> None:
        op = _the_op(match)
        _require_unset(op_arguments(op), ("gate_out", "dropout_mask"),
                       "GELU applies before the output gate and the mask")
        _check_gelu_numbers(match.output_node(), numbers)
        _check_result_dtype(match, _tensor(op, "the op"))

    return check


def _check_gelu_half(match) -> None:
    """F.gelu of a half-precision op output: cast to float32, the erf GELU, cast back. The op
    computes it in float32 from its float32 pre-activation and casts once (reference.fftconv_ref),
    so the fold drops one rounding, of y to u's dtype before the GELU, as Inductor's own fused
    kernels do: within the half type's precision, not bitwise."""
    op = _the_op(match)
    _require_unset(op_arguments(op), ("gate_out", "dropout_mask"),
                   "GELU applies before the output gate and the mask")
    out = _tensor(op, "the op")
    downcast = match.output_node()
    (upcast,) = [cast for cast in _casts(match) if cast is not downcast]
    if out.dtype not in _HALF_FLOATS or upcast.args[1] != torch.float32 or downcast.args[1] != out.dtype:
        _refuse("dtype", f"the GELU of a {out.dtype} output is computed in {upcast.args[1]} and cast to "
                         f"{downcast.args[1]}: the op computes it in float32 and returns {out.dtype}")
    _check_gelu_numbers(downcast.args[0], _erf_gelu_numbers)
    _check_result_dtype(match, out)


def output_multiplier_slot(out: torch.Tensor, multiplier: torch.Tensor) -> Optional[str]:
    """Which op option a multiplier of the op's output becomes: gate_out, dropout_mask, or neither."""
    if _same_shape(multiplier, out) is True:
        return "gate_out"
    if (
        multiplier.dim() == 3
        and _decide(multiplier.shape[0] == out.shape[0])
        and _decide(multiplier.shape[1] == out.shape[1])
        and _decide(multiplier.shape[2] == 1)
    ):
        return "dropout_mask"
    return None


def _check_output_multiplier(match) -> None:
    op = _the_op(match)
    out = _tensor(op, "the op")
    if not isinstance(match.kwargs["multiplier"], Node):
        _refuse("gate_shape", "the output is multiplied by a constant, not a gate or mask tensor")
    multiplier = _tensor(match.kwargs["multiplier"], "the multiplier")
    slot = output_multiplier_slot(out, multiplier)
    if slot is None:
        _refuse("gate_shape", f"the output is multiplied by a tensor of shape {_shape_str(multiplier)}: "
                              f"neither a gate {_shape_str(out)} nor a (B, H, 1) mask, or it broadcasts")
    _require_unset(op_arguments(op), (slot,), f"a second {slot}")
    if multiplier.dtype not in _REAL_FLOATS:
        _refuse("dtype", f"the multiplier has dtype {multiplier.dtype}")
    _check_same_device(out, multiplier)
    _check_result_dtype(match, out)


def _casts(match) -> list[Node]:
    return [n for n in match.nodes if n.target == prims.convert_element_type.default]


CAST_OPEN_ARGUMENTS: OpenArguments = {prims.convert_element_type.default: {"dtype": READ}}  # the dtype checks


def _check_signal_cast(match) -> None:
    op = _the_op(match)
    op_args = op_arguments(op)
    u = _tensor(match.kwargs["u"], "u")
    upcast = op.args[0]
    (downcast,) = [cast for cast in _casts(match) if cast is not upcast]
    if u.dtype not in _HALF_FLOATS:
        _refuse("dtype", f"u has dtype {u.dtype}: only half-precision inputs run the op in float32 themselves")
    if upcast.args[1] != torch.float32 or downcast.args[1] != u.dtype:
        _refuse("dtype", f"the casts go to {upcast.args[1]} and back to {downcast.args[1]}, "
                         f"not float32 and back to {u.dtype}")
    for name in ("k", "D", "gate_in", "gate_out", "dropout_mask"):
        t = value(op_args[name])
        if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
            _refuse("dtype", f"`{name}` is float64: the op would compute in float64")
    k = _tensor(op_args["k"], "k")
    if k.dtype not in (torch.float32, u.dtype):
        _refuse("dtype", f"kernel dtype {k.dtype}: the op takes float32 or u's dtype {u.dtype}")


def _check_kernel_cast(match) -> None:
    op = _the_op(match)
    u = _tensor(op.args[0], "u")
    k = _tensor(match.kwargs["k"], "k")
    (cast,) = _casts(match)
    if cast.args[1] != torch.float32 or k.dtype != u.dtype or u.dtype not in _HALF_FLOATS:
        _refuse("dtype", f"the kernel is cast from {k.dtype} to {cast.args[1]} for a {u.dtype} signal: "
                         "the op only upcasts a kernel of the signal's half dtype")


# kind -> (its check, the arguments its patterns leave open for that check to read)
_FUSION_CHECKS: dict[str, tuple[Callable[[Any], None], OpenArguments]] = {
    "skip": (_check_skip, SKIP_OPEN_ARGUMENTS),
    "skip_addcmul": (_check_skip, SKIP_ADDCMUL_OPEN_ARGUMENTS),
    "gate_in": (_check_gate_in, {}),
    "gelu": (_gelu_check(_erf_gelu_numbers), GELU_OPEN_ARGUMENTS),
    "gelu_half": (_check_gelu_half, {**GELU_OPEN_ARGUMENTS, **CAST_OPEN_ARGUMENTS}),
    "gelu_erfc": (_gelu_check(_erfc_gelu_numbers), GELU_ERFC_OPEN_ARGUMENTS),
    "gelu_ndtr": (_gelu_check(_ndtr_gelu_numbers), GELU_NDTR_OPEN_ARGUMENTS),
    "output_multiplier": (_check_output_multiplier, {}),
    "signal_cast": (_check_signal_cast, CAST_OPEN_ARGUMENTS),
    "kernel_cast": (_check_kernel_cast, CAST_OPEN_ARGUMENTS),
}


def _check_match_arguments(match, open_arguments: OpenArguments) -> None:
    """Refuse a match that absorbs a node with an argument its pattern does not account for
    (an ``alpha``, a slice step, a cast's extra keyword...): see :mod:`.arguments`."""
    problem = check_arguments(match, open_arguments)
    if problem is not None:
        _refuse(*problem)


# ------------------------------------------------------------------------- extra_check hooks --
def _run(stage: str, pattern: str, anchor: Node, check: Callable[[], Optional[str]]) -> bool:
    with _collecting_assumptions() as assumptions:
        try:
            detail = check() or ""
        except _Refused as refused:
            # A refusal read off example sizes holds only where they lead to it: guard that too,
            # so other sizes are decided afresh (e.g. a fixed FFT size, circular at this L only).
            _guard_assumptions(assumptions)
            events.report(events.Rejection(stage, pattern, refused.refusal.code, refused.refusal.reason,
                                           events.source_of(anchor)), anchor)
            return False
        except Exception as error:  # a bug here must cost a rewrite, never the user's compilation
            log.warning("lcconv_compile: guard for %s failed on %s; not rewriting", pattern, anchor, exc_info=True)
            events.report(events.Rejection(stage, pattern, "internal_error", repr(error), events.source_of(anchor)),
                          anchor)
            return False
        _guard_assumptions(assumptions)
    events.report(events.Rewrite(stage, pattern, events.source_of(anchor), detail), anchor)
    return True


def check_idiom(pattern: str) -> Callable[[Any], bool]:
    """``extra_check`` for an idiom pattern: the matched FFT convolution is exactly the op's."""

    def extra_check(match) -> bool:
        anchor = match.output_nodes()[0]
        idiom = parse_fft_conv(anchor)
        if isinstance(idiom, str):
            # Sizes and scalars are ignored when matching, so e.g. a gate multiply can take a
            # scale's place: that is no FFT convolution of this spelling, not a refusal.
            return False
        events.mark_explained(idiom.inverse)

        def check() -> str:
            _check_match_arguments(match, IDIOM_OPEN_ARGUMENTS)
            for node in match.nodes:  # an unsqueeze in front of an FFT: the replacement squeezes dim 0
                if node.target == aten.unsqueeze.default and any(
                        user.target == aten.constant_pad_nd.default for user in node.users):
                    if not _UNSQUEEZE_BEFORE_FFT.allows(node.args[1]):
                        _refuse("argument", f"aten::unsqueeze dim={node.args[1]!r}: {_UNSQUEEZE_BEFORE_FFT.why}")
            summary, layout = _check_idiom(idiom)
            hand_over_layout(layout, _tensor(idiom.signal.source, "the signal").shape,
                             _tensor(idiom.kernel.source, "the kernel").shape)
            return summary

        hand_over_layout(None)
        return _run("idiom", pattern, anchor, check)

    return extra_check


def check_fusion(kind: str, pattern: str) -> Callable[[Any], bool]:
    """``extra_check`` for folding a neighbour (``kind``) into an ``lcconv::fftconv`` call."""
    check_kind, open_arguments = _FUSION_CHECKS[kind]

    def extra_check(match) -> bool:
        def check() -> None:
            _check_match_arguments(match, open_arguments)
            check_kind(match)

        return _run("fusion", pattern, match.output_node(), check)

    return extra_check


def diagnose_inverse_fft(node: Node) -> Optional[Refusal]:
    """For ``explain``: why the FFT convolution through inverse FFT ``node`` was left alone.

    Tries every place below ``node`` where a convolution could end (slice, ``.real``, scales).
    Returns None when the guards accept one of them (then no pattern matched its structure, e.g.
    because an intermediate spectrum has other users), else the refusal for the longest chain.
    """
    refusal = _unpadded_product(node) or Refusal(
        "structure", "an inverse FFT that is not sliced into a causal convolution")
    for output in _candidate_outputs(node):
        idiom = parse_fft_conv(output)
        if isinstance(idiom, str):
            if refusal.code == "structure":
                refusal = Refusal("structure", idiom)
            continue
        try:
            _check_idiom(idiom)
        except _Refused as refused:
            refusal = refused.refusal
            continue
        return None
    return refusal


def _unpadded_product(inverse: Node) -> Optional[Refusal]:
    """The common slip ``irfft(rfft(u) * rfft(k))``: a product of unpadded real FFTs is circular."""
    product = inverse.args[0]
    if not (isinstance(product, Node) and product.target == aten.mul.Tensor):
        return None
    transforms = [arg for arg in product.args if isinstance(arg, Node) and arg.target == aten._fft_r2c.default]
    if len(transforms) == 2 and not any(t.args[0].target == aten.constant_pad_nd.default for t in transforms):
        return Refusal("circular", "circular convolution: the FFT inputs are not zero-padded to L + Lk - 1")
    return None


def _candidate_outputs(node: Node) -> list[Node]:
    """Nodes below an inverse FFT where a convolution could end, nearest first."""
    chain_ops = (aten.slice.Tensor, aten.view_as_real.default, aten.select.int, aten.mul.Tensor, aten.div.Tensor)
    found, frontier = [], [node]
    while frontier:
        current = frontier.pop(0)
        for user in current.users:
            if user.target in chain_ops and user not in found:
                found.append(user)
                frontier.append(user)
    return [n for n in found if n.target != aten.view_as_real.default]
