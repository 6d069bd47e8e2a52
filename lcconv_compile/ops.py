"""The ``torch.library`` ops ``lcconv::fftconv`` and ``lcconv::fftconv_bwd``: the contract between
models, the compiler and the kernels.

Schema (the one place it is written down)::

    lcconv::fftconv(Tensor u, Tensor k, Tensor? D=None, Tensor? gate_in=None,
                    Tensor? gate_out=None, bool gelu=False, Tensor? dropout_mask=None) -> Tensor
    lcconv::fftconv_bwd(Tensor grad_y, Tensor u, Tensor k, Tensor? D, Tensor? gate_in,
                        Tensor? gate_out, bool gelu, Tensor? dropout_mask)
        -> (Tensor du, Tensor dk, Tensor dD, Tensor dgate_in, Tensor dgate_out)
    lcconv::butterfly_conv(Tensor u, Tensor k, Tensor in_factor, Tensor out_factor,
                           Tensor? D=None, bool gelu=False, Tensor? dropout_mask=None) -> Tensor
    lcconv::butterfly_conv_bwd(Tensor grad_y, Tensor u, Tensor k, Tensor in_factor,
                               Tensor out_factor, Tensor? D, bool gelu, Tensor? dropout_mask)
        -> (Tensor du, Tensor dk, Tensor d_in_factor, Tensor d_out_factor, Tensor dD)

The butterfly ops (learned FlashButterfly factors, real pairs ``(N2, N1, N1, 2)``) are registered
in :mod:`lcconv_compile.butterfly_ops`, which documents their arguments.

The math is in :mod:`lcconv_compile.reference`. ``fftconv_bwd`` returns an empty tensor of shape
``(0,)`` in place of the gradient of an input that was None, so that the backward is one op with a
fixed number of outputs that the compiler sees and can rewrite.

This module holds the registrations: validation, per-device kernels, fake (meta) kernels,
autograd and vmap. It does not hold math (reference.py) or Triton code (kernels/), and knows
nothing of Inductor (lowering/).
"""

from __future__ import annotations

import contextlib
import warnings
from functools import partial
from typing import NamedTuple, Optional

import torch
from torch import Tensor
from torch._C._functorch import TransformType
from torch._functorch.utils import enable_single_level_autograd_function
from torch.autograd.function import _SingleLevelFunction

from . import reference
from .kernels import select
from .validation import check_fftconv, check_fftconv_args, check_fftconv_call, check_in_traced_code

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
    # Empty batches (B = 0 or H = 0) go to the reference, which answers them without an FFT:
    # no kernel ever sees an empty input.
    family = select(u, k) if u.numel() else None
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
    # The forward's choice: select reads devices, dtypes and shapes only (empty inputs: reference).
    family = select(u, k) if u.numel() else None
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
# Autograd: reverse mode, forward mode and torch.func, for both ops.
#
# custom_op's register_autograd (torch 2.11 and 2.13) wraps the formula in an autograd.Function
# with the legacy ``forward(ctx, ...)``, no ``setup_context`` and no ``jvp`` (pytorch#170834,
# #179652): torch.func.grad/vjp/jacrev refuse it, and forward-mode AD skips it, so tangents come
# out zero without a word. Each op's Autograd kernel is therefore replaced by one that applies a
# functorch-style Function below. The ops themselves, their fake kernels and vmap rules, and what
# torch.compile, torch.export and AOTAutograd trace (lcconv.fftconv in the forward,
# lcconv.fftconv_bwd in the backward, no FFT ops) are unchanged.
# ---------------------------------------------------------------------------------------------
def _tracks_derivatives(tensors) -> bool:
    """Whether a call must record derivatives (else it goes straight to the device kernel)."""
    if torch._C._are_functorch_transforms_active():
        return True  # a torch.func grad/jvp level: its wrappers decide what is recorded
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    # Inside a forward-AD dual level any input may carry a tangent: the Function's jvp sees it.
    return torch.autograd.forward_ad._current_level >= 0


def _install_autograd(op_def, function: type) -> None:
    """Make ``function`` the Autograd kernel of the custom op ``op_def``.

    ``function`` is a single-level autograd.Function (as torch.func builds for each transform
    level; pytorch#184974 takes the same route for register_autograd): the dispatcher has
    already picked the level, so its C++ apply records the node on that level's tensors.
    Its forward takes the op's arguments and the dispatch keyset, and redispatches below
    autograd, as custom_op's generated kernel does.
    """
    overload = op_def._opoverload
    defaults = tuple(arg.default_value for arg in overload._schema.arguments)

    def autograd_kernel(keyset, *args):
        # The dispatcher drops trailing arguments equal to their defaults: put them back.
        args = args + defaults[len(args):]
        if not _tracks_derivatives([a for a in args if isinstance(a, Tensor)]):
            return _redispatch_below_autograd(overload, keyset, *args)
        with enable_single_level_autograd_function():
            return function.apply(*args, _Keyset(keyset))

    with warnings.catch_warnings():
        # The dispatcher warns (once per process) that custom_op's generated kernel is replaced:
        # that is the point here, and the warning would reach every user at import.
        warnings.filterwarnings("ignore", message=r"(?s).*Overriding a previously registered kernel")
        op_def._lib.impl(op_def._name, autograd_kernel, "Autograd", with_keyset=True, allow_override=True)


class _Keyset(NamedTuple):
    """The dispatch keyset of a call, passed through a Function's forward (not a tensor)."""

    keyset: torch._C.DispatchKeySet


def _redispatch_below_autograd(overload, keyset, *args):
    with torch._C._AutoDispatchBelowAutograd():
        return overload.redispatch(keyset & torch._C._after_autograd_keyset, *args)


@contextlib.contextmanager
def _derivatives_recorded():
    """Reverse and forward AD on, for the torch.func levels beneath this one: apply switches them
    off around a Function's forward, and without them a nested transform (grad of grad,
    jacrev of jacfwd) would see this op as a constant, silently. torch.func's own single-level
    Functions switch them back on the same way."""
    with torch.enable_grad(), torch.autograd.forward_ad._set_fwd_grad_enabled(True):
        yield


def _forward_below(overload, call: _Keyset, *args):
    """A Function's forward: the op below this level's autograd."""
    with _derivatives_recorded():
        return _redispatch_below_autograd(overload, call.keyset, *args)


class _FFTConvFunction(_SingleLevelFunction):
    """Derivatives of lcconv::fftconv. The backward is the fftconv_bwd op, so compiled training
    graphs see one backward node; the jvp is three or four calls of the op plus pointwise terms."""

    @staticmethod
    def forward(u, k, D, gate_in, gate_out, gelu, dropout_mask, call):
        return _forward_below(fftconv_op._opoverload, call, u, k, D, gate_in, gate_out, gelu, dropout_mask)

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, k, D, gate_in, gate_out, gelu, dropout_mask, _ = inputs
        ctx.save_for_backward(u, k, D, gate_in, gate_out, dropout_mask)
        ctx.save_for_forward(u, k, D, gate_in, gate_out, dropout_mask)
        ctx.gelu = gelu

    @staticmethod
    def backward(ctx, grad_y):
        u, k, D, gate_in, gate_out, dropout_mask = ctx.saved_tensors
        du, dk, dD, dgate_in, dgate_out = fftconv_bwd_op(
            grad_y, u, k, D, gate_in, gate_out, ctx.gelu, dropout_mask
        )
        dmask = None
        if ctx.needs_input_grad[6]:
            # dy/dmask[b,h] = sum_t dy * (y without the mask). Masks are usually sampled constants,
            # so this is paid only when asked for: one more forward through the op (a node the
            # compiler sees, on every device), rather than a sixth output of fftconv_bwd that
            # every kernel family would have to produce.
            unmasked = fftconv_op(u, k, D, gate_in, gate_out, ctx.gelu, None)
            dtype = reference.compute_dtype(grad_y, unmasked)
            dmask = (grad_y.to(dtype) * unmasked.to(dtype)).sum(-1).to(dropout_mask.dtype)
        return (
            du,
            dk,
            dD if D is not None else None,
            dgate_in if gate_in is not None else None,
            dgate_out if gate_out is not None else None,
            None,
            dmask,
            None,
        )

    @staticmethod
    def jvp(ctx, *tangents):
        stack = torch._C._functorch.get_interpreter_stack() or []
        if sum(level.key() == TransformType.Jvp for level in stack) > 1:
            # The op calls below would need forward mode on for the outer level only, and
            # torch.func offers no switch per level: refuse rather than give a wrong answer.
            raise NotImplementedError(
                "fftconv: forward-mode AD over forward-mode AD (torch.func.jacfwd(jacfwd(...)), "
                "jvp of a jvp) is not supported; use jacrev(jacrev(...)) or jacrev(jacfwd(...))"
            )
        # Reverse mode on (apply switched it off): the tangent stays differentiable by the
        # levels beneath (torch.autograd.grad of a tangent, jacrev(jacfwd(...))). Forward mode
        # stays off, or the op calls below would come back here for ever.
        with torch.enable_grad():
            return _FFTConvFunction._tangent(ctx, *tangents)

    @staticmethod
    def _tangent(ctx, du, dk, dD, dgate_in, dgate_out, _gelu, dmask, _call):
        # y = act(c) * m * g_out with c = conv(u * g_in, k) + D * (u * g_in): linear in u, k and
        # D separately, so dc is a sum of op calls, each with one factor replaced by its tangent.
        u, k, D, gate_in, gate_out, mask = ctx.saved_tensors
        dtype = reference.compute_dtype(u, k, D, gate_in, gate_out)
        conv_terms = []
        if du is not None:
            conv_terms.append(fftconv_op(du, k, D, gate_in))
        if dgate_in is not None:
            conv_terms.append(fftconv_op(u, k, D, dgate_in))
        if dk is not None:
            conv_terms.append(fftconv_op(u, dk, dD, gate_in))
        elif dD is not None:
            x = u * gate_in if gate_in is not None else u
            conv_terms.append(x.to(dtype) * dD.to(dtype).unsqueeze(-1))
        dc = sum(t.to(dtype) for t in conv_terms) if conv_terms else None

        c = None
        if ctx.gelu or dmask is not None or dgate_out is not None:
            c = fftconv_op(u, k, D, gate_in).to(dtype)
        # d act(c) = act'(c) dc; then the product rule over the mask and the output gate.
        dact = dc * reference.gelu_grad(c) if ctx.gelu and dc is not None else dc
        act = torch.nn.functional.gelu(c) if ctx.gelu else c
        scale = reference.output_scale(gate_out, mask, dtype)
        dy = None if dact is None else (dact * scale if scale is not None else dact)
        if dmask is not None:
            term = act * dmask.to(dtype).unsqueeze(-1)
            term = term * gate_out.to(dtype) if gate_out is not None else term
            dy = term if dy is None else dy + term
        if dgate_out is not None:
            term = act * dgate_out.to(dtype)
            term = term * mask.to(dtype).unsqueeze(-1) if mask is not None else term
            dy = term if dy is None else dy + term
        return dy.to(u.dtype)


_BWD_INPUTS = ("grad_y", "u", "k", "D", "gate_in", "gate_out", "dropout_mask")


def _reference_bwd(args: dict, gelu: bool, names: tuple, *tensors):
    """fftconv_bwd through the reference math, as a function of the named tensor inputs: the
    present gradients only (fftconv_bwd's empty placeholders for absent inputs are left out)."""
    full = dict(args, **dict(zip(names, tensors)))
    grads = reference.fftconv_bwd_ref(
        full["grad_y"], full["u"], full["k"], full["D"], full["gate_in"], full["gate_out"], gelu,
        full["dropout_mask"],
    )
    return tuple(g for g in grads if g is not None)


class _FFTConvBwdFunction(_SingleLevelFunction):
    """Derivatives of lcconv::fftconv_bwd (second order: double backward, hessians, jvp of a grad).

    These are derivatives of the first derivative: no op computes them, so they go through the
    differentiable reference math (torch.func.vjp / jvp of reference.fftconv_bwd_ref), on every
    device. Ordinary training never reaches them: its graphs keep the single fftconv_bwd node.
    """

    @staticmethod
    def forward(grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask, call):
        return _forward_below(
            fftconv_bwd_op._opoverload, call, grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask, _ = inputs
        ctx.save_for_backward(grad_y, u, k, D, gate_in, gate_out, dropout_mask)
        ctx.gelu = gelu

    @staticmethod
    def _as_function(ctx):
        """(function of the present inputs, their names, their values) for torch.func."""
        args = dict(zip(_BWD_INPUTS, ctx.saved_tensors))
        names = tuple(n for n in _BWD_INPUTS if args[n] is not None)
        return partial(_reference_bwd, args, ctx.gelu, names), names, tuple(args[n] for n in names)

    @staticmethod
    def backward(ctx, *grad_outputs):
        fn, names, primals = _FFTConvBwdFunction._as_function(ctx)
        _, vjp_fn = torch.func.vjp(fn, *primals)
        # Gradients of the outputs that exist (absent inputs have an empty placeholder output).
        present = ("u", "k", "D", "gate_in", "gate_out")
        cotangents = tuple(g for g, n in zip(grad_outputs, present) if n in names)
        by_name = dict(zip(names, vjp_fn(cotangents)))
        return tuple(by_name.get(n) for n in _BWD_INPUTS[:6]) + (None, by_name.get("dropout_mask"), None)

    @staticmethod
    def jvp(ctx, *tangents):
        # Called from inside the op's Autograd kernel, where no torch.func transform may start
        # (functorch asserts), and no op computes these terms: refuse in words.
        raise NotImplementedError(
            "fftconv: forward-mode AD of its backward (torch.func.jacfwd(jacrev(...)), "
            "torch.func.hessian, a jvp of a gradient) is not supported; use "
            "jacrev(jacrev(...)) or jacrev(jacfwd(...)) for second derivatives"
        )


_install_autograd(fftconv_op, _FFTConvFunction)
_install_autograd(fftconv_bwd_op, _FFTConvBwdFunction)


# ---------------------------------------------------------------------------------------------
# vmap: fold the vmapped dim into the batch (kernel shared) or into the channels (kernel vmapped).
# ---------------------------------------------------------------------------------------------
def _to_front(t: Optional[Tensor], dim: Optional[int], size: int) -> Optional[Tensor]:
    if t is None:
        return None
    return t.movedim(dim, 0) if dim is not None else t.expand(size, *t.shape)


def _channel_folders(size: int, batch: int, channels: int):
    """Treat each (vmapped slice, channel) pair as a channel of its own, channel index v*H + h:
    (fold per-row tensors (V, B, H, ...) -> (B, V*H, ...), fold per-channel ones (V, H, ...) -> (V*H, ...))."""

    def fold_rows(t):
        return None if t is None else t.transpose(0, 1).reshape(batch, size * channels, *t.shape[3:])

    def fold_channels(t):
        return None if t is None else t.reshape(size * channels, *t.shape[2:])

    return fold_rows, fold_channels


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

    # The kernel differs per slice.
    fold_rows, fold_channels = _channel_folders(size, batch, channels)
    out = fftconv_op(
        fold_rows(u), fold_channels(_to_front(k, k_dim, size)), fold_channels(_to_front(D, D_dim, size)),
        fold_rows(gate_in), fold_rows(gate_out), gelu, fold_rows(dropout_mask),
    )
    return out.view(batch, size, channels, -1), 1


def _fftconv_bwd_vmap(info, in_dims, grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask):
    # Always into the channels: dk and dD sum over the batch, and must not sum over the slices.
    # (torch.func.jacrev and vmap-of-grad reach here, mostly with only grad_y vmapped.)
    size = info.batch_size
    grad_y, u, k, D, gate_in, gate_out, _, dropout_mask = (
        _to_front(t, d, size) if isinstance(t, Tensor) else t
        for t, d in zip((grad_y, u, k, D, gate_in, gate_out, gelu, dropout_mask), in_dims)
    )
    batch, channels = u.shape[1], u.shape[2]
    fold_rows, fold_channels = _channel_folders(size, batch, channels)
    grads = fftconv_bwd_op(
        fold_rows(grad_y), fold_rows(u), fold_channels(k), fold_channels(D), fold_rows(gate_in),
        fold_rows(gate_out), gelu, fold_rows(dropout_mask),
    )
    du, dk, dD, dgate_in, dgate_out = grads

    def unfold_rows(g):  # (B, V*H, L) -> (B, V, H, L), vmapped along dim 1
        return g.view(batch, size, channels, -1), 1

    def unfold_channels(g, present):  # (V*H, ...) -> (V, H, ...)
        return (g.view(size, channels, *g.shape[1:]), 0) if present else (g, None)

    outs = (
        unfold_rows(du),
        unfold_channels(dk, True),
        unfold_channels(dD, D is not None),
        unfold_rows(dgate_in) if gate_in is not None else (dgate_in, None),
        unfold_rows(dgate_out) if gate_out is not None else (dgate_out, None),
    )
    return tuple(o for o, _ in outs), tuple(d for _, d in outs)


torch.library.register_vmap(fftconv_op, _fftconv_vmap)
torch.library.register_vmap(fftconv_bwd_op, _fftconv_bwd_vmap)


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
        (float64 for float64 inputs). Works under ``torch.compile``, ``torch.export`` and
        ``torch.vmap``. ``B = 0`` or ``H = 0`` gives an empty ``y`` (and empty or zero gradients).

    The full formula with every option::

        x = u * gate_in;  c = causal_conv(x, k) + D * x;  y = gelu?(c) * dropout_mask * gate_out

    Derivatives: differentiable in every tensor argument. ``dropout_mask``'s gradient,
    ``sum_t dy * gelu?(c) * gate_out``, costs one more forward and is computed only when the mask
    requires grad. Reverse mode (backward, ``torch.func.grad``/``vjp``/``jacrev``) and forward
    mode (``torch.func.jvp``/``jacfwd``, ``torch.autograd.forward_ad``) are supported, and so are
    second derivatives in reverse-over-reverse (``create_graph=True``, ``jacrev(jacrev(...))``)
    and reverse-over-forward (``jacrev(jacfwd(...))``); forward-over-reverse or
    forward-over-forward (``torch.func.hessian``, ``jacfwd(jacfwd(...))``) raise
    NotImplementedError. Ordinary training graphs hold ``lcconv::fftconv_bwd``, no FFT ops.

    NaN and Inf: the convolution is computed through an FFT (reference, FlashConv and
    FlashButterfly kernels), which spreads a non-finite value over the whole row: NaN or Inf in
    ``u[b, h, t]`` or ``gate_in[b, h, t]`` at any single t makes every output ``y[b, h, :]`` NaN,
    earlier time steps too; in ``k[h, j]`` or ``D[h]``, every output of channel h. ``gate_out``
    and ``dropout_mask`` act pointwise: only the outputs they multiply. Other rows stay finite.
    The short kernels (CUDA, ``Lk <= 128``) compute the sum directly: a NaN/Inf in u at t reaches
    only ``y[b, h, t .. t+Lk-1]``.

    Bad arguments raise TypeError/ValueError naming the argument (under torch.compile too; with
    ``fullgraph=True`` Dynamo's Unsupported carries that error's type and message: README).
    """
    if torch.compiler.is_compiling():
        return _fftconv_traced(u, k, D, gate_in, gate_out, gelu, dropout_mask)
    check_fftconv_call(u, k, D, gate_in, gate_out, gelu, dropout_mask)
    family = _plain_eager_kernel_family(u, k, D, gate_in, gate_out, dropout_mask)
    if family is not None:
        check_fftconv_args(u, k, D, gate_in, gate_out, dropout_mask)
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (u, k, D, gate_in, gate_out)
        ):
            return _EagerFFTConv.apply(family, u, k, D, gate_in, gate_out, gelu, dropout_mask)
        return family.fftconv_fwd(u, k, D, gate_in, gate_out, gelu, dropout_mask)
    return fftconv_op(u, k, D, gate_in, gate_out, gelu, dropout_mask)


def _fftconv_traced(u, k, D, gate_in, gate_out, gelu, dropout_mask) -> Tensor:
    """``fftconv`` as Dynamo (torch.compile, strict torch.export) traces it: the checks in Python,
    so that bad arguments raise their own ValueError/TypeError there too (how, and why through a
    graph break: validation.check_in_traced_code)."""
    check_in_traced_code(check_fftconv, u, k, D, gate_in, gate_out, gelu, dropout_mask)
    return fftconv_op(u, k, D, gate_in, gate_out, gelu, dropout_mask)


# ---------------------------------------------------------------------------------------------
# Eager fast path: the same kernels without the dispatcher.
#
# Through the op, an eager call pays the custom-op dispatch twice (the op, then its Autograd kernel
# redispatching below autograd), the single-level Function machinery of torch.func, and the
# validation twice; the backward pays the same for fftconv_bwd. For a plain eager call (no tracer,
# no torch.func transform, no forward AD, no mode, no tensor subclass, no profiler, a kernel family
# for the inputs) ``fftconv`` calls the implementation directly, under an ordinary
# autograd.Function whose backward calls the backward implementation. Everything else (and
# ``torch.ops.lcconv.fftconv`` called directly) goes through the op as before, so what compilers,
# exporters, torch.func and profilers see is unchanged.
# ---------------------------------------------------------------------------------------------
_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def _plain_eager_kernel_family(u, k, D, gate_in, gate_out, dropout_mask):
    """The kernel family a plain eager call can run directly (kernels.select's choice), else None
    (the call goes through the op)."""
    if (  # (compiling was ruled out by fftconv)
        torch._C._are_functorch_transforms_active()
        or torch._C._len_torch_dispatch_stack()
        or torch._C._is_torch_function_mode_enabled()
        or torch.autograd.forward_ad._current_level >= 0
        or torch.autograd.profiler._is_profiler_enabled
    ):
        return None
    for t in (u, k, D, gate_in, gate_out, dropout_mask):
        if t is not None and type(t) not in _PLAIN_TENSOR_TYPES:
            return None
    if dropout_mask is not None and dropout_mask.requires_grad:
        return None  # its gradient is the op's Function's business
    if u.numel() == 0 or u.dim() != 3 or k.dim() != 2:
        return None  # empty inputs go to the reference; malformed ones to the op's errors
    return select(u, k)


class _EagerFFTConv(torch.autograd.Function):
    """Reverse mode for the eager fast path: the family's backward kernel directly, or the
    fftconv_bwd op (differentiable: double backward) when the backward itself is recorded
    (create_graph=True)."""

    @staticmethod
    def forward(ctx, family, u, k, D, gate_in, gate_out, gelu, dropout_mask):
        ctx.save_for_backward(u, k, D, gate_in, gate_out, dropout_mask)
        ctx.gelu, ctx.family = gelu, family
        return family.fftconv_fwd(u, k, D, gate_in, gate_out, gelu, dropout_mask)

    @staticmethod
    def backward(ctx, grad_y):
        u, k, D, gate_in, gate_out, dropout_mask = ctx.saved_tensors
        if torch.is_grad_enabled():
            du, dk, dD, dgate_in, dgate_out = fftconv_bwd_op(
                grad_y, u, k, D, gate_in, gate_out, ctx.gelu, dropout_mask)
            # The op returns empty placeholders for absent inputs; autograd wants None there.
            dD, dgate_in, dgate_out = (g if t is not None else None
                                       for g, t in ((dD, D), (dgate_in, gate_in), (dgate_out, gate_out)))
        else:  # the family returns None for absent inputs itself
            du, dk, dD, dgate_in, dgate_out = ctx.family.fftconv_bwd(
                grad_y, u, k, D, gate_in, gate_out, ctx.gelu, dropout_mask)
        return None, du, dk, dD, dgate_in, dgate_out, None, None
