"""The ``torch.library`` ops ``lcconv::butterfly_conv`` and ``lcconv::butterfly_conv_bwd``:
FlashButterfly's three-step convolution with trainable (learned-butterfly) factors.

Schema::

    lcconv::butterfly_conv(Tensor u, Tensor k, Tensor in_factor, Tensor out_factor,
                           Tensor? D=None, bool gelu=False, Tensor? dropout_mask=None) -> Tensor
    lcconv::butterfly_conv_bwd(Tensor grad_y, Tensor u, Tensor k, Tensor in_factor,
                               Tensor out_factor, Tensor? D, bool gelu, Tensor? dropout_mask)
        -> (Tensor du, Tensor dk, Tensor d_in_factor, Tensor d_out_factor, Tensor dD)

``u (B, H, L)``, ``k (H, Lk)`` with ``1 <= Lk <= L``, ``in_factor`` and ``out_factor`` real pairs
``(N2, N1, N1, 2)`` where ``N = N1 * N2`` is a power of two ``>= L + Lk - 1`` (usually
``fft_size(L, Lk)``; a larger N lets one set of factors serve every L up to a model's l_max) and
``(N1, N2) = reference.butterfly_split(N)``. The math (steps 1-3 and the epilogue
``y = gelu?(Re(v)[:L] + D u) * dropout_mask``) is :func:`reference.butterfly_conv_ref`; at the
exact factors (``reference.butterfly_exact_factors``) it equals ``lcconv::fftconv``. Gates are
not fused here: multiply them outside. ``butterfly_conv_bwd`` returns a ``(0,)`` tensor for dD
when D is None (one op with a fixed number of outputs, as ``fftconv_bwd``). Factor gradients are
sums over batch and channels in a fixed order: deterministic.

Devices: on CUDA, where ``kernels.flashbutterfly.supports_learned`` says the kernels run the
split (half inputs up to N1 = 64, i.e. N = 512K; float32 up to N = 32K, where N2 <= 2048), the
FlashButterfly kernels run both directions (K1 and K3 with the learned factors, K2 on chip);
elsewhere (CPU, float64, longer N) the reference.

This module holds registrations only: validation, fake, autograd and vmap. No math (reference.py),
no Triton (kernels/), no Inductor (lowering/).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference
from .kernels import flashbutterfly
from .ops import _to_front
from .validation import check_fftconv_args, check_in_traced_code

__all__ = ["butterfly_conv", "butterfly_conv_op", "butterfly_conv_bwd_op", "check_butterfly_args"]

def _describe(t: Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def check_butterfly_args(
    u: Tensor,
    k: Tensor,
    in_factor: Tensor,
    out_factor: Tensor,
    D: Optional[Tensor] = None,
    dropout_mask: Optional[Tensor] = None,
) -> None:
    """Raise TypeError/ValueError naming the offending argument; reads shapes and dtypes only."""
    try:  # u, k, D and the mask follow fftconv's rules: one place writes them
        check_fftconv_args(u, k, D, None, None, dropout_mask)
    except (TypeError, ValueError) as err:
        raise type(err)(str(err).replace("fftconv:", "butterfly_conv:", 1)) from None
    seqlen, kernel_len = u.shape[-1], k.shape[-1]
    for name, factor in (("in_factor", in_factor), ("out_factor", out_factor)):
        if factor.dtype not in (torch.float32, u.dtype):
            raise TypeError(
                f"butterfly_conv: `{name}` must be real pairs in float32 or u's dtype ({u.dtype}), "
                f"got {_describe(factor)}"
            )
        if factor.device != u.device:
            raise ValueError(f"butterfly_conv: `{name}` is on {factor.device} but `u` is on {u.device}")
    if in_factor.dim() != 4 or in_factor.shape[-1] != 2 or in_factor.shape[1] != in_factor.shape[2]:
        raise ValueError(
            f"butterfly_conv: `in_factor` must have shape (N2, N1, N1, 2) (complex as real pairs), "
            f"got {_describe(in_factor)}"
        )
    n2, n1 = in_factor.shape[0], in_factor.shape[1]
    n = n1 * n2
    if n & (n - 1) or n < seqlen + kernel_len - 1:
        raise ValueError(
            f"butterfly_conv: the factors' FFT size N = N1 * N2 = {n1} * {n2} = {n} must be a power "
            f"of two >= L + Lk - 1 = {seqlen + kernel_len - 1} (e.g. N = "
            f"{reference.fft_size(seqlen, kernel_len)}); `in_factor`: {_describe(in_factor)}"
        )
    want_n1, want_n2 = reference.butterfly_split(n)
    if (n1, n2) != (want_n1, want_n2):
        raise ValueError(
            f"butterfly_conv: for N = {n} the factors must have the kernels' split "
            f"(N2, N1, N1, 2) = ({want_n2}, {want_n1}, {want_n1}, 2) (reference.butterfly_split), "
            f"got `in_factor` {_describe(in_factor)}"
        )
    if out_factor.shape != in_factor.shape:
        raise ValueError(
            f"butterfly_conv: `out_factor` must have the shape of `in_factor` {tuple(in_factor.shape)}, "
            f"got {_describe(out_factor)}"
        )


# ---------------------------------------------------------------------------------------------
# Forward op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lcconv::butterfly_conv", mutates_args=())
def butterfly_conv_op(
    u: Tensor,
    k: Tensor,
    in_factor: Tensor,
    out_factor: Tensor,
    D: Optional[Tensor] = None,
    gelu: bool = False,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    check_butterfly_args(u, k, in_factor, out_factor, D, dropout_mask)
    if u.numel() and flashbutterfly.supports_learned(u, k, in_factor):
        return flashbutterfly.butterfly_conv_fwd(u, k, in_factor, out_factor, D, gelu, dropout_mask)
    return reference.butterfly_conv_ref(u, k, in_factor, out_factor, D, gelu, dropout_mask)


@butterfly_conv_op.register_fake
def _butterfly_conv_fake(u, k, in_factor, out_factor, D=None, gelu=False, dropout_mask=None):
    check_butterfly_args(u, k, in_factor, out_factor, D, dropout_mask)
    return u.new_empty(u.shape)


# ---------------------------------------------------------------------------------------------
# Backward op
# ---------------------------------------------------------------------------------------------
@torch.library.custom_op("lcconv::butterfly_conv_bwd", mutates_args=())
def butterfly_conv_bwd_op(
    grad_y: Tensor,
    u: Tensor,
    k: Tensor,
    in_factor: Tensor,
    out_factor: Tensor,
    D: Optional[Tensor],
    gelu: bool,
    dropout_mask: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # The forward's choice (shapes, dtypes and devices only).
    if u.numel() and flashbutterfly.supports_learned(u, k, in_factor):
        grads = flashbutterfly.butterfly_conv_bwd(grad_y, u, k, in_factor, out_factor, D, gelu, dropout_mask)
    else:
        grads = reference.butterfly_conv_bwd_ref(grad_y, u, k, in_factor, out_factor, D, gelu, dropout_mask)
    dD = grads.dD.contiguous() if grads.dD is not None else u.new_empty((0,))
    return grads.du, grads.dk, grads.d_in_factor, grads.d_out_factor, dD


@butterfly_conv_bwd_op.register_fake
def _butterfly_conv_bwd_fake(grad_y, u, k, in_factor, out_factor, D, gelu, dropout_mask):
    dD = D.new_empty(D.shape) if D is not None else u.new_empty((0,))
    return (u.new_empty(u.shape), k.new_empty(k.shape), in_factor.new_empty(in_factor.shape),
            out_factor.new_empty(out_factor.shape), dD)


# ---------------------------------------------------------------------------------------------
# Autograd: the backward is the butterfly_conv_bwd op, one node in compiled training graphs.
# ---------------------------------------------------------------------------------------------
def _setup_context(ctx, inputs, output):
    u, k, in_factor, out_factor, D, gelu, dropout_mask = inputs
    ctx.save_for_backward(u, k, in_factor, out_factor, D, dropout_mask)
    ctx.gelu = gelu


def _backward(ctx, grad_y):
    u, k, in_factor, out_factor, D, dropout_mask = ctx.saved_tensors
    du, dk, d_in, d_out, dD = butterfly_conv_bwd_op(
        grad_y, u, k, in_factor, out_factor, D, ctx.gelu, dropout_mask
    )
    return du, dk, d_in, d_out, dD if D is not None else None, None, None


butterfly_conv_op.register_autograd(_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# vmap: fold into the batch (k, D, factors shared) or the channels (k or D vmapped); vmapped
# factors (shared by all channels, so they cannot be folded) run one call per slice.
# ---------------------------------------------------------------------------------------------
def _butterfly_conv_vmap(
    info, in_dims, u, k, in_factor, out_factor, D=None, gelu=False, dropout_mask=None
):
    size = info.batch_size
    in_dims = tuple(in_dims) + (None,) * (7 - len(in_dims))
    u_dim, k_dim, in_dim, out_dim, D_dim, _, mask_dim = in_dims
    u = _to_front(u, u_dim, size)
    dropout_mask = _to_front(dropout_mask, mask_dim, size)  # (V, B, H)

    if in_dim is not None or out_dim is not None:
        k, D = _to_front(k, k_dim, size), _to_front(D, D_dim, size)
        in_factor, out_factor = _to_front(in_factor, in_dim, size), _to_front(out_factor, out_dim, size)
        slices = [
            butterfly_conv_op(u[i], k[i], in_factor[i], out_factor[i], None if D is None else D[i],
                              gelu, None if dropout_mask is None else dropout_mask[i])
            for i in range(size)
        ]
        return torch.stack(slices), 0

    batch, channels = u.shape[1], u.shape[2]
    if k_dim is None and D_dim is None:  # (V, B, H, L) -> (V*B, H, L)
        mask = dropout_mask.reshape(size * batch, channels) if dropout_mask is not None else None
        out = butterfly_conv_op(u.reshape(size * batch, channels, -1), k, in_factor, out_factor, D, gelu, mask)
        return out.view(size, batch, channels, -1), 0

    def fold_channels(t):  # (V, B, H, ...) -> (B, V*H, ...)
        return None if t is None else t.transpose(0, 1).reshape(batch, size * channels, *t.shape[3:])

    k = _to_front(k, k_dim, size).reshape(size * channels, -1)
    D = _to_front(D, D_dim, size).reshape(size * channels) if D is not None else None
    out = butterfly_conv_op(fold_channels(u), k, in_factor, out_factor, D, gelu, fold_channels(dropout_mask))
    return out.view(batch, size, channels, -1), 1


torch.library.register_vmap(butterfly_conv_op, _butterfly_conv_vmap)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def butterfly_conv(
    u: Tensor,
    k: Tensor,
    in_factor: Tensor,
    out_factor: Tensor,
    D: Optional[Tensor] = None,
    *,
    gelu: bool = False,
    dropout_mask: Optional[Tensor] = None,
) -> Tensor:
    r"""Long convolution through FlashButterfly's three steps with given (trainable) factors.

    .. math::
        y = \mathrm{gelu}?\big(\mathrm{Re}(B\, \mathrm{conv}_{N_2}(A\, u, k))[:L] + D u\big) \cdot m

    Args:
        u: ``(B, H, L)``, float32 / bfloat16 / float16 / float64; any strides.
        k: ``(H, Lk)``, ``1 <= Lk <= L``, float32 or u's dtype.
        in_factor, out_factor: ``(N2, N1, N1, 2)`` complex factors as real pairs, float32 or u's
            dtype, ``N = N1 * N2`` a power of two ``>= L + Lk - 1`` and ``(N1, N2) =
            reference.butterfly_split(N)``; ``reference.butterfly_exact_factors(N)`` makes this
            the causal convolution of :func:`lcconv_compile.fftconv`.
        D: optional skip weight ``(H,)``; gelu: exact GELU; dropout_mask: optional ``(B, H)``.

    Returns ``y (B, H, L)`` in u's dtype, contiguous; float32 accumulation (float64 for float64
    inputs). Differentiable in u, k, both factors and D; works under ``torch.compile``,
    ``torch.export`` and ``torch.vmap``. On CUDA the FlashButterfly kernels where they cover the
    split (see the module docstring), else the reference.

    Bad arguments raise TypeError/ValueError naming the argument, eagerly and under
    ``torch.compile`` alike (with ``fullgraph=True`` or strict export: Dynamo's Unsupported,
    whose message holds the original type and message), as :func:`lcconv_compile.fftconv`.
    """
    if torch.compiler.is_compiling():
        check_in_traced_code(check_butterfly_args, u, k, in_factor, out_factor, D, dropout_mask)
    return butterfly_conv_op(u, k, in_factor, out_factor, D, gelu, dropout_mask)
