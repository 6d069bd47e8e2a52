"""Which implementation the mixers' long convolutions run: the op (always, except in baselines).

Every mixer calls :func:`long_conv` with ``lcconv_compile.fftconv``'s arguments. By default that is
the op itself. Inside ``with conv_implementation("reference"):`` the same call runs
``reference.fftconv_ref``, the math as plain ``torch.fft`` ops, so that a benchmark can measure
the model "compiled by Inductor alone" (it must also switch our rewrites off, with
``lcconv_compile.passes_enabled(False)``, or the compiler turns those ops back into the op).

This is a switch for benchmarks and tests, read while tracing: a compiled model keeps the
implementation it was compiled with until it recompiles (dynamo guards on the switch, so a change
of implementation recompiles). It holds no math of its own.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import Tensor

from lcconv_compile import fftconv, reference

__all__ = ["IMPLEMENTATIONS", "conv_implementation", "long_conv"]

IMPLEMENTATIONS = ("op", "reference")
_current = "op"


@contextlib.contextmanager
def conv_implementation(name: str) -> Iterator[None]:
    """Within the block, :func:`long_conv` runs ``name``: ``"op"`` or ``"reference"``."""
    global _current
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"conv_implementation: unknown implementation {name!r}; choose one of {IMPLEMENTATIONS}")
    outer, _current = _current, name
    try:
        yield
    finally:
        _current = outer


def long_conv(u: Tensor, k: Tensor, D: Optional[Tensor] = None, **options) -> Tensor:
    """``lcconv_compile.fftconv(u, k, D, **options)`` (gates, gelu, dropout_mask) through the current implementation."""
    if _current == "reference":
        return reference.fftconv_ref(u, k, D, **options)
    return fftconv(u, k, D, **options)
