"""Input checks for ``lcconv::fftconv``: one place that turns bad arguments into clear errors.

Called by the public ``fftconv`` and by the op's real and fake implementations, so eager calls,
``torch.compile`` tracing and ``torch.export`` all refuse the same inputs with the same message.
Checks only shapes, dtypes and devices: it never reads tensor data (it must work on fake tensors).
``fftconv`` and ``butterfly_conv`` also run them in code that Dynamo traces
(:func:`check_in_traced_code`), so they are written in what Dynamo traces without a graph break
or a guard of its own.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _sizes(t: Tensor) -> str:
    """t's shape written as a tuple, e.g. "(3,)" or "(2, 3, 10)". Built from f-strings of the sizes,
    not str(tuple(t.shape)): under torch.compile with dynamic shapes the sizes are symbolic, and
    Dynamo turns an f-string of one into a constant string but cannot format a tuple of them
    (fftconv hands the message to Dynamo as a graph break's reason, which must be a constant)."""
    sizes = [f"{size}" for size in t.shape]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"


def _describe(t: Tensor) -> str:
    return f"shape {_sizes(t)}, dtype {t.dtype}, device {t.device}"


def _check_float(name: str, t: Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"fftconv: `{name}` must be a real floating tensor (float32, bfloat16, float16 or "
            f"float64), got {_describe(t)}"
        )


def _check_same_device(name: str, t: Tensor, u: Tensor) -> None:
    if t.device != u.device:
        raise ValueError(
            f"fftconv: `{name}` is on {t.device} but `u` is on {u.device}; move both to one device"
        )


_OPTIONAL_TENSORS = ("D", "gate_in", "gate_out", "dropout_mask")


def _kind(value) -> str:
    return f"{type(value).__name__} {value!r}" if isinstance(value, (str, int, float)) else type(value).__name__


def check_fftconv_call(u, k, D, gate_in, gate_out, gelu, dropout_mask) -> None:
    """Check the Python types of the public ``fftconv``'s arguments before the op's schema sees
    them (its own error is a raw pybind cast message that names neither the argument nor the fix)."""
    for name, value in (("u", u), ("k", k)):
        if not isinstance(value, Tensor):
            raise TypeError(f"fftconv: `{name}` must be a torch.Tensor, got {_kind(value)}")
    for name, value in zip(_OPTIONAL_TENSORS, (D, gate_in, gate_out, dropout_mask)):
        if value is not None and not isinstance(value, Tensor):
            raise TypeError(f"fftconv: `{name}` must be a torch.Tensor or None, got {_kind(value)}")
    if not isinstance(gelu, bool):
        hint = (
            "; only the exact (erf) GELU is fused: apply the tanh approximation outside the op"
            if isinstance(gelu, str) else ""
        )
        raise TypeError(f"fftconv: `gelu` must be True or False (exact erf GELU or none), got {_kind(gelu)}{hint}")


def _layout_hint(u: Tensor, k: Tensor) -> str:
    """A hint when u looks like (B, L, H): its last dim matches k's channel count."""
    if u.shape[-1] == k.shape[0] and k.shape[1] <= u.shape[1]:
        return (
            f"; u must be (B, H, L) but its last dim matches k's H = {k.shape[0]}: if u is (B, L, H), "
            f"pass u.transpose(1, 2) (and transpose the output back)"
        )
    return ""


def check_fftconv_args(
    u: Tensor,
    k: Tensor,
    D: Optional[Tensor] = None,
    gate_in: Optional[Tensor] = None,
    gate_out: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
) -> None:
    """Raise TypeError/ValueError naming the offending argument if the inputs are not valid."""
    _check_float("u", u)
    if u.dim() != 3:
        raise ValueError(f"fftconv: `u` must have shape (B, H, L), got {_describe(u)}")
    # .size(), not .shape: with dynamic sizes Dynamo adds a type guard on a tensor whose .shape
    # is read in traced code (not for .size()), a guard the op's own tracing does not add. Each
    # size is read once: .size() costs a little more than .shape.
    u_size = u.size()
    batch, channels, seqlen = u_size
    if seqlen == 0:
        raise ValueError(f"fftconv: `u` has sequence length L = 0 ({_describe(u)}); need L >= 1")

    _check_float("k", k)
    if k.dtype not in (torch.float32, u.dtype):
        raise TypeError(
            f"fftconv: `k` must be float32 or u's dtype ({u.dtype}), got {_describe(k)}; "
            f"cast it with k.float()"
        )
    _check_same_device("k", k, u)
    if k.dim() != 2:
        raise ValueError(f"fftconv: `k` must have shape (H, Lk), got {_describe(k)}")
    k_channels, kernel_len = k.size()
    if k_channels != channels:
        raise ValueError(
            f"fftconv: `k` has {k.shape[0]} channels but `u` has H = {channels} "
            f"(u: {_describe(u)}; k: {_describe(k)}){_layout_hint(u, k)}"
        )
    if kernel_len == 0 or kernel_len > seqlen:
        raise ValueError(
            f"fftconv: kernel length Lk = {k.shape[1]} must satisfy 1 <= Lk <= L = {seqlen} "
            f"(k: {_describe(k)}); truncate the kernel or pad u"
        )

    if D is not None:
        _check_float("D", D)
        _check_same_device("D", D, u)
        if D.dim() != 1 or D.size(0) != channels:
            raise ValueError(f"fftconv: `D` must have shape (H,) = ({channels},), got {_describe(D)}")

    for name, gate in (("gate_in", gate_in), ("gate_out", gate_out)):
        if gate is None:
            continue
        _check_float(name, gate)
        _check_same_device(name, gate, u)
        if gate.size() != u_size:
            raise ValueError(
                f"fftconv: `{name}` must have the shape of `u` {_sizes(u)}, got {_describe(gate)}"
            )

    if dropout_mask is not None:
        _check_float("dropout_mask", dropout_mask)
        _check_same_device("dropout_mask", dropout_mask, u)
        if dropout_mask.size() != (batch, channels):
            raise ValueError(
                f"fftconv: `dropout_mask` must have shape (B, H) = ({batch}, {channels}), "
                f"got {_describe(dropout_mask)}"
            )


def check_fftconv(u, k, D, gate_in, gate_out, gelu, dropout_mask) -> None:
    """The public ``fftconv``'s checks, in order: :func:`check_fftconv_call`, then
    :func:`check_fftconv_args`."""
    check_fftconv_call(u, k, D, gate_in, gate_out, gelu, dropout_mask)
    check_fftconv_args(u, k, D, gate_in, gate_out, dropout_mask)


def check_in_traced_code(check: Callable[..., None], *args) -> None:
    """Run ``check(*args)`` (it raises TypeError/ValueError) in code that Dynamo traces
    (``fftconv`` and ``butterfly_conv`` under torch.compile or strict torch.export), so that bad
    arguments raise their own type there too.

    Checked only inside the op (its fake kernel), a bad argument reaches the user as Dynamo's
    TorchRuntimeError. Checked here, a failure could simply be raised, but a raise that leaves the
    compiled frame makes Dynamo skip that frame (the user's model) for good: after one caught bad
    call the model would run eagerly (torch 2.11 and 2.13). Hence the graph break first: Dynamo
    compiles the graph up to this call and the code after the break runs outside it, where the
    check raises the original error (Dynamo then gives up only on that code, not on the caller).
    Under fullgraph=True or strict export the graph break is itself an error,
    torch._dynamo.exc.Unsupported, whose message is the original error's type and message.

    On valid arguments the check evaluates what the fake kernel evaluates anyway: no graph break,
    no guard the op's own tracing does not add (tests/test_ops.py), nothing in the compiled code.
    """
    try:
        check(*args)
        return
    except (TypeError, ValueError) as found:
        problem = found
    torch._dynamo.graph_break(msg=f"{type(problem).__name__}: {problem.args[0]}")
    check(*args)  # runs after the graph break, i.e. eagerly: raises the error found above
