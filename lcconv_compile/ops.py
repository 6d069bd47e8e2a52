"""The ``torch.library`` ops ``lcconv::fftconv`` and ``lcconv::fftconv_bwd``: the contract between
models, the compiler and the kernels.

Schema (the one place it is written down)::

    lcconv::fftconv(Tensor u, Tensor k, Tensor? D=None, Tensor? gate_in=None,
                    Tensor? gate_out=None, bool gelu=False, Tensor? dropout_mask=None) -> Tensor
    lcconv::fftconv_bwd(Tensor grad_y, Tensor u, Tensor k, Tensor? D, Tensor? gate_in,
                        Tensor? gate_out, bool gelu, Tensor? dropout_mask)
        -> (Tensor du, Tensor dk, Tensor dD, Tensor dgate_in, Tensor dgate_out)

The math is in :mod:`lcconv_compile.reference`. ``fftconv_bwd`` returns an empty tensor of shape
``(0,)`` in place of the gradient of an input that was None, so that the backward is one op with a
fixed number of outputs that the compiler sees and can rewrite.

This module holds the registrations: validation, per-device kernels, fake (meta) kernels,
autograd and vmap. It does not hold math (reference.py) or Triton code (kernels/), and knows
nothing of Inductor (lowering/).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .kernels import select
from .validation import check_fftconv_args

__all__ = ["fftconv", "fftconv_backward_impl", "fftconv_bwd_op", "fftconv_forward_impl", "fftconv_op"]


# ---------------------------------------------------------------------------------------------
# Forward op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lcconv::fftconv", mutates_args=())
def fftconv_op(
    u: Tensor,
    k: Tensor,
    D: Optional[Tensor] = None,
    gate_in: Optional[Tensor] = None,
    gate_out: Optional[Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    check_fftconv_args(u, k, D, gate_in, gate_out, dropout_mask)
    return fftconv_forward_impl(u, k, D, gate_in, gate_out, gelu, dropout_mask)


def fftconv_forward_impl(u, k, D, gate_in, gate_out, gelu, dropout_mask) -> Tensor:
    """The op's implementation on every device, for validated arguments: the kernel family that
    kernels.select picks, else the reference. The compiler's CUDA stage traces this same function
    into compiled graphs (lowering/cuda_lowering.py), so eager and compiled calls run one code."""
    family = select(u, k)
    if family is not None:
        return family.fftconv_fwd(u, k, D, gate_in, gate_out, gelu, dropout_mask)
    # No kernel covers these inputs (CPU, float64, past every kernel's length): the reference.
    return reference.fftconv_ref(u, k, D, gate_in, gate_out, gelu, dropout_mask).contiguous()


@fftconv_op.register_fake
def _fftconv_fake(u, k, D=None, gate_in=None, gate_out=None, gelu=False, dropout_mask=None):
    check_fftconv_args(u, k, D, gate_in, gate_out, dropout_mask)
    return u.new_empty(u.shape)  # contiguous, like every real implementation's output


# ---------------------------------------------------------------------------------------------
# Backward op
# ---------------------------------------------------------------------------------------------
def _absent_grad(like: Tensor) -> Tensor:
    return like.new_empty((0,))


@torch.library.custom_op("lcconv::fftconv_bwd", mutates_args=())
def fftconv_bwd_op(
    grad_y: Tensor,
    u: Tensor,
    k: Tensor,
    D: Optional[Tensor],
    gate_in: Optional[Tensor],
    gate_out: Optional[Tensor],
    gelu: bool,
    dropout_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return fftconv_backward_impl(grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask)


def fftconv_backward_impl(grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask):
    """The backward op's implementation on every device (traced by the CUDA stage, like the forward)."""
    family = select(u, k)  # the forward's choice: select reads devices, dtypes and shapes only
    if family is not None:
        grads = family.fftconv_bwd(grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask)
    else:
        grads = reference.fftconv_bwd_ref(grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask)
    return tuple(g.contiguous() if g is not None else _absent_grad(u) for g in grads)


@fftconv_bwd_op.register_fake
def _fftconv_bwd_fake(grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask):
    def like(t: Optional[Tensor]) -> Tensor:
        return t.new_empty(t.shape) if t is not None else _absent_grad(u)

    return like(u), like(k), like(D), like(gate_in), like(gate_out)


# ---------------------------------------------------------------------------------------------
# Autograd: the backward is the fftconv_bwd op, so compiled training graphs see one node.
# ---------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    u, k, D, gate_in, gate_out, gelu, dropout_mask = inputs
    ctx.save_for_backward(u, k, D, gate_in, gate_out, dropout_mask)
    ctx.gelu = gelu


def _backward(ctx, grad_y):
    u, k, D, gate_in, gate_out, dropout_mask = ctx.saved_tensors
    du, dk, dD, dgate_in, dgate_out = fftconv_bwd_op(
        grad_y, u, k, D, gate_in, gate_out, ctx.gelu, dropout_mask
    )
    return (
        du,
        dk,
        dD if D is not None else None,
        dgate_in if gate_in is not None else None,
        dgate_out if gate_out is not None else None,
        None,
        None,
    )


fftconv_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# vmap: fold the vmapped dim into the batch (kernel shared) or into the channels (kernel vmapped).
# ---------------------------------------------------------------------------------------------
def _to_front(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _fftconv_vmap(
    info, in_dims, u, k, D=None, gate_in=None, gate_out=None, gelu=False, dropout_mask=None
):
    size = info.batch_size
    # Arguments left at their defaults may be missing from in_dims.
    in_dims = tuple(in_dims) + (None,) * (7 - len(in_dims))
    u_dim, k_dim, D_dim, gate_in_dim, gate_out_dim, _, mask_dim = in_dims
    u, gate_in, gate_out = (
        _to_front(t, d, size) for t, d in ((u, u_dim), (gate_in, gate_in_dim), (gate_out, gate_out_dim))
    )
    dropout_mask = _to_front(dropout_mask, mask_dim, size)  # (V, B, H)
    batch, channels = u.shape[1], u.shape[2]

    if k_dim is None and D_dim is None:
        # Kernel shared by every vmapped slice: (V, B, H, L) -> (V*B, H, L).
        def fold(t):
            return None if t is None else t.reshape(size * batch, *t.shape[2:])

        out = fftconv_op(fold(u), k, D, fold(gate_in), fold(gate_out), gelu, fold(dropout_mask))
        return out.view(size, batch, channels, -1), 0

    # The kernel differs per slice: treat each (slice, channel) pair as a channel of its own.
    def fold_channels(t):  # (V, B, H, ...) -> (B, V*H, ...)
        return None if t is None else t.transpose(0, 1).reshape(batch, size * channels, *t.shape[3:])

    k = _to_front(k, k_dim, size).reshape(size * channels, -1)
    D = _to_front(D, D_dim, size).reshape(size * channels) if D is not None else None
    out = fftconv_op(
        fold_channels(u), k, D, fold_channels(gate_in), fold_channels(gate_out), gelu,
        fold_channels(dropout_mask),
    )
    return out.view(batch, size, channels, -1), 1


torch.library.register_vmap(fftconv_op, _fftconv_vmap)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def fftconv(
    u: Tensor,
    k: Tensor,
    D: Optional[Tensor] = None,
    *,
    gate_in: Optional[Tensor] = None,
    gate_out: Optional[Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Causal long convolution of ``u`` with a per-channel kernel ``k``, plus a skip term.

    .. math::
        y[b,h,t] = \sum_{s=0}^{t} k[h, t-s]\, u[b,h,s] + D[h]\, u[b,h,t]

    Args:
        u: input, shape ``(B, H, L)``, float32 / bfloat16 / float16 (float64 runs the reference).
            May be non-contiguous.
        k: kernel, shape ``(H, Lk)`` with ``1 <= Lk <= L`` (a shorter kernel is zero-padded),
            float32 or u's dtype.
        D: optional skip weight, shape ``(H,)``.
        gate_in: optional pre-gate of u's shape; the convolution (and the skip) see ``u * gate_in``.
        gate_out: optional post-gate of u's shape, multiplied onto the output.
        gelu: apply the exact (erf) GELU to ``conv + skip`` before the gates and the mask.
        dropout_mask: optional ``(B, H)`` multiplier (already scaled by 1/(1-p)), as in H3.

    Returns:
        ``y`` of shape ``(B, H, L)`` in u's dtype, contiguous. Internally accumulates in float32
        (float64 for float64 inputs). Differentiable in u, k, D and both gates; works under
        ``torch.compile``, ``torch.export`` and ``torch.vmap``.

    The full formula with every option::

        x = u * gate_in;  c = causal_conv(x, k) + D * x;  y = gelu?(c) * dropout_mask * gate_out
    """
    return fftconv_op(u, k, D, gate_in, gate_out, gelu, dropout_mask)
