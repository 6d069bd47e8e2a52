"""Linear projections into and out of the channels-first ``(B, C, L)`` layout that the op reads.

The convolution kernels read each channel's samples along L. ``nn.Linear`` on ``x`` ``(B, L, d)``
writes ``(B, L, C)``; its ``.transpose(1, 2)`` is a view whose L stride is C, so every load of
the kernels would stride over the channels (and the output's transpose back costs a copy before
the next product). Here the products are written channels-first instead, as batched products
with the weight shared over the batch (stride 0, no copy):

* :func:`project_in`: ``W x^T + b`` -> ``(B, C, L)``, contiguous;
* :func:`project_out`: ``W y + b`` for ``y`` ``(B, C, L)`` -> ``(B, L, d)``, returned as the
  transposed view of a contiguous ``(B, d, L)`` product, so that its gradient reaching ``y`` is
  contiguous too (the product's backward writes it).

The same parameters as ``nn.Linear`` (the modules stay, and so do their state-dict names); the
same math. Nothing here knows about convolutions.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._common import apply_key_padding

__all__ = ["project_in", "project_out"]

# When the batched products run: None on CUDA tensors only (where the kernels read the layout);
# True always, False never (benchmarks time the transposed views with False, tests force True).
# Not on CPU by default: there the op runs torch.fft (no kernel to feed), and torch 2.13's
# vectorised CPU codegen writes out of bounds in the backward of a compiled H3 LM whose
# convolutions are plain torch.fft with these products (heap corruption, gone with
# torch._inductor.config.cpp.vec_isa_ok = False; benchmarks/NOTES.md, stop 12).
_CHANNELS_FIRST: Optional[bool] = None


def _channels_first(x: Tensor, module: nn.Module) -> bool:
    on = x.is_cuda if _CHANNELS_FIRST is None else _CHANNELS_FIRST
    return on and isinstance(module, nn.Linear)


def _batched(linear: nn.Linear, x: Tensor, batch: int) -> Tensor:
    """``linear.weight @ x`` for ``x`` ``(B, in, L)`` (any strides), plus the bias per output row."""
    weight = linear.weight.expand(batch, *linear.weight.shape)
    if linear.bias is None:
        return torch.bmm(weight, x)
    return torch.baddbmm(linear.bias.unsqueeze(-1), weight, x)


def _is_linear_glu(module: nn.Module) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Linear)
            and isinstance(module[1], nn.GLU) and module[1].dim == -1)


def project_in(module: nn.Module, x: Tensor, key_padding_mask: Optional[Tensor] = None) -> Tensor:
    """``module(x)`` for ``x`` ``(B, L, in)`` as ``(B, out, L)``: contiguous when ``module`` is an
    ``nn.Linear`` and x is on CUDA (else ``module(x)`` transposed, a view); positions where
    ``key_padding_mask`` ``(B, L)`` is True are zero."""
    if _channels_first(x, module):
        y = _batched(module, x.transpose(1, 2), x.shape[0])
    else:
        y = module(x).transpose(1, 2)
    return apply_key_padding(y, key_padding_mask, channels_first=True)


def project_out(module: nn.Module, y: Tensor, dtype: torch.dtype) -> Tensor:
    """``module`` applied to ``y`` ``(B, in, L)`` over its channels: ``(B, L, out)``, a transposed
    view for an ``nn.Linear`` or a ``Sequential(Linear, GLU(dim=-1))`` on CUDA (else the module
    runs on ``y``'s transposed view). ``y`` is cast to ``dtype`` (the block's input dtype) unless autocast
    is on."""
    if not torch.is_autocast_enabled(y.device.type):
        y = y.to(dtype)
    if _channels_first(y, module):
        return _batched(module, y, y.shape[0]).transpose(1, 2)
    if _is_linear_glu(module) and _channels_first(y, module[0]):
        return F.glu(_batched(module[0], y, y.shape[0]), dim=1).transpose(1, 2)
    return module(y.transpose(1, 2))
