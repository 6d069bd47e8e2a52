"""Triton kernels and their launchers, and :func:`select`: the one place that picks a kernel.

Knows torch and Triton only: no torch.library, no Inductor. The op's forward and backward
(``ops.py``) both ask :func:`select` which kernel family runs a call, so the two directions can
never disagree. Adding a family is one module with ``supports``, ``fftconv_fwd`` and
``fftconv_bwd`` (same signatures as :mod:`.blockfft_conv`) and one entry in :data:`FAMILIES`, ahead
of the families it should win against.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Optional

import torch

from . import flashbutterfly, blockfft_conv, monarch_conv, shortconv

__all__ = ["FAMILIES", "select"]

# Tried in order; the first whose ``supports(u, k)`` is true runs the call. Each ``supports``
# says only whether its kernels compute the op correctly for these inputs: where two families
# could, the one listed first is the one measured faster there. shortconv claims only kernels up
# to its SHORT_MAX_KERNEL_LEN, where it beats the FFT (benchmarks/sweep_shortconv.py).
# blockfft_conv (FlashConv v5) replaced FlashConv v3 (two-level Monarch FFT, removed; its
# measurements are in benchmarks/NOTES.md and git history): 1.0-1.9x faster forward and 1.4-1.6x
# faster forward+backward, and on chip up to 16K.
# flashbutterfly (three steps through HBM) takes what blockfft_conv leaves, where its split has
# N1 <= flashbutterfly.DISPATCH_MAX_N1: measured 1.8-2.2x faster forward than the torch.fft
# reference from 32K to 2M (bf16); at 4M forward+backward is still slower (benchmarks/NOTES.md,
# "two-level DFT"), where the op keeps running the reference.
# monarch_conv (FlashConv v6: a Gluon forward; its backward runs blockfft_conv's kernels, measured
# faster than its own) runs ahead of blockfft_conv only where LCCONV_FLASHCONV6=1 is set when
# lcconv_compile is imported: correct on the H100 and faster forward, but compiled code cannot
# launch its Gluon forward (the op call stays: host time per call, and AOTInductor packages would
# need lcconv_compile where they load), so not the default (benchmarks/NOTES.md, "FlashConv v6").
EXPERIMENTAL: tuple[ModuleType, ...] = (monarch_conv,) if os.environ.get("LCCONV_FLASHCONV6") == "1" else ()
FAMILIES: tuple[ModuleType, ...] = (shortconv, *EXPERIMENTAL, blockfft_conv, flashbutterfly)


def select(u: torch.Tensor, k: torch.Tensor) -> Optional[ModuleType]:
    """The kernel family for ``fftconv(u, k, ...)`` (forward and backward alike), or None.

    None means no kernel covers these inputs (CPU tensors, float64, lengths past every kernel's
    limit): the caller runs the reference. The choice depends on devices, dtypes and shapes
    only, never on values, so a forward and its backward always select the same family.
    """
    for family in FAMILIES:
        if family.supports(u, k):
            return family
    return None
