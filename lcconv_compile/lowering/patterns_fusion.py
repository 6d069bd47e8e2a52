"""Fusion patterns: pointwise neighbours of an ``lcconv::fftconv`` call, folded into its options.

Each ``_*_pattern`` is the op plus a neighbour as it appears in a post-grad graph (the skip term
``+ u * D.unsqueeze(-1)`` or with the weight shaped otherwise or through ``addcmul``, an input
gate ``u * g``, the exact GELU through erf, erfc or ndtr, an output gate or a (B, H, 1) dropout
mask, half-precision casts around the call), beside the replacement that moves the
neighbour into the op. They apply to graphs that called the op directly and to idioms that
:mod:`.patterns_idiom` rewrote.

The op is always written with all seven arguments (:func:`_fftconv`), and the pass spells every
call in the graph out the same way before matching, so one pattern covers every combination of
options already set; :func:`.guards.check_fusion` then refuses a fold that the op's formula
``y = gelu?(conv(u*gate_in, k) + D*u*gate_in) * dropout_mask * gate_out`` would not reproduce
(for example a skip term added after a gate). Forward graphs only: this module holds the pairs
and their example inputs, no guards and no pass plumbing.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch._inductor.pattern_matcher import fwd_only

from .guards import output_multiplier_slot
from .patterns_idiom import PatternSpec


def _fftconv(u, k, D, gate_in, gate_out, gelu, dropout_mask):
    return torch.ops.lcconv.fftconv.default(u, k, D, gate_in, gate_out, gelu, dropout_mask)


def _skip_pattern(u, k, D, gate_in, gate_out, dropout_mask, skip_weight):
    return _fftconv(u, k, D, gate_in, gate_out, False, dropout_mask) + u * skip_weight.unsqueeze(-1)


def _skip_first_pattern(u, k, D, gate_in, gate_out, dropout_mask, skip_weight):
    return skip_weight.unsqueeze(-1) * u + _fftconv(u, k, D, gate_in, gate_out, False, dropout_mask)


def _skip_weight_pattern(u, k, D, gate_in, gate_out, dropout_mask, skip_weight):
    # The weight shaped per channel by other means: D.view(H, 1), D.reshape(1, H, 1), an (H, 1) tensor.
    return _fftconv(u, k, D, gate_in, gate_out, False, dropout_mask) + u * skip_weight


def _skip_weight_first_pattern(u, k, D, gate_in, gate_out, dropout_mask, skip_weight):
    return skip_weight * u + _fftconv(u, k, D, gate_in, gate_out, False, dropout_mask)


def _skip_addcmul_pattern(u, k, D, gate_in, gate_out, dropout_mask, skip_weight):
    return torch.addcmul(_fftconv(u, k, D, gate_in, gate_out, False, dropout_mask), u, skip_weight)


def _skip_replacement(u, k, D, gate_in, gate_out, dropout_mask, skip_weight):
    # The guard proved one weight per channel: D (H,), or with unit dims, (1, H), (H, 1), (1, H, 1).
    if skip_weight.dim() != 1:
        skip_weight = skip_weight.reshape(-1)
    return _fftconv(u, k, skip_weight, gate_in, gate_out, False, dropout_mask)


def _gate_in_pattern(u, gate, k, D, gate_in, gate_out, dropout_mask, gelu):
    return _fftconv(u * gate, k, D, gate_in, gate_out, gelu, dropout_mask)


def _gate_in_replacement(u, gate, k, D, gate_in, gate_out, dropout_mask, gelu):
    return _fftconv(u, k, D, gate, gate_out, gelu, dropout_mask)


def _gelu_pattern(u, k, D, gate_in, gate_out, dropout_mask):
    return F.gelu(_fftconv(u, k, D, gate_in, gate_out, False, dropout_mask))


def _gelu_erfc_pattern(u, k, D, gate_in, gate_out, dropout_mask):
    # The exact GELU through the complementary error function: erfc(-y / sqrt(2)) = 1 + erf(y / sqrt(2)).
    y = _fftconv(u, k, D, gate_in, gate_out, False, dropout_mask)
    return 0.5 * y * torch.erfc(-y / math.sqrt(2.0))


def _gelu_ndtr_pattern(u, k, D, gate_in, gate_out, dropout_mask):
    # y * Phi(y) with the normal CDF; Inductor decomposes ndtr into 0.5 * (1 + erf(y / sqrt(2))).
    y = _fftconv(u, k, D, gate_in, gate_out, False, dropout_mask)
    return y * torch.special.ndtr(y)


def _gelu_replacement(u, k, D, gate_in, gate_out, dropout_mask):
    # Half-precision outputs too (fold_gelu_half): the op computes GELU in float32 before casting
    # to u's dtype, as the decomposition between its casts does, minus rounding y to u's dtype first.
    return _fftconv(u, k, D, gate_in, gate_out, True, dropout_mask)


def _output_multiplier_pattern(u, k, D, gate_in, gate_out, dropout_mask, multiplier, gelu):
    return _fftconv(u, k, D, gate_in, gate_out, gelu, dropout_mask) * multiplier


def _output_multiplier_first_pattern(u, k, D, gate_in, gate_out, dropout_mask, multiplier, gelu):
    return multiplier * _fftconv(u, k, D, gate_in, gate_out, gelu, dropout_mask)


def _output_multiplier_replacement(u, k, D, gate_in, gate_out, dropout_mask, multiplier, gelu):
    # A multiplier shaped like the output is a gate; one shaped (B, H, 1) is a dropout mask.
    if output_multiplier_slot(u, multiplier) == "gate_out":
        return _fftconv(u, k, D, gate_in, multiplier, gelu, dropout_mask)
    return _fftconv(u, k, D, gate_in, gate_out, gelu, multiplier.squeeze(-1))


def _signal_cast_pattern(u, k, D, gate_in, gate_out, dropout_mask, gelu):
    return _fftconv(u.float(), k, D, gate_in, gate_out, gelu, dropout_mask).to(u.dtype)


def _kernel_cast_pattern(u, k, D, gate_in, gate_out, dropout_mask, gelu):
    return _fftconv(u, k.float(), D, gate_in, gate_out, gelu, dropout_mask)


def _cast_replacement(u, k, D, gate_in, gate_out, dropout_mask, gelu):
    # The op reads half-precision u and k and computes in float32 itself: the casts are its own.
    return _fftconv(u, k, D, gate_in, gate_out, gelu, dropout_mask)


def _with_gelu(fn: Callable[..., Any], gelu: bool) -> Callable[..., Any]:
    """``fn`` with its ``gelu`` flag fixed and removed from the signature the matcher reads."""
    signature = inspect.signature(fn)
    bound = functools.partial(fn, gelu=gelu)

    def wrapper(*args, **kwargs):  # not functools.wraps: tracers would read fn's own arity
        return bound(*args, **kwargs)

    wrapper.__name__ = fn.__name__
    wrapper.__signature__ = signature.replace(
        parameters=[p for name, p in signature.parameters.items() if name != "gelu"]
    )
    return wrapper


# name -> (guard kind, pattern, replacement, which example tensors the pattern takes)
FUSIONS: dict[str, tuple[str, Callable[..., Any], Callable[..., Any], tuple[str, ...]]] = {
    "fold_skip": ("skip", _skip_pattern, _skip_replacement, ("u", "k", "D", "gate", "gate", "mask", "D")),
    "fold_skip_first": ("skip", _skip_first_pattern, _skip_replacement, ("u", "k", "D", "gate", "gate", "mask", "D")),
    "fold_gate_in": ("gate_in", _gate_in_pattern, _gate_in_replacement, ("u", "gate", "k", "D", "gate", "gate", "mask")),
    "fold_skip_weight": ("skip", _skip_weight_pattern, _skip_replacement,
                         ("u", "k", "D", "gate", "gate", "mask", "D_column")),
    "fold_skip_weight_first": ("skip", _skip_weight_first_pattern, _skip_replacement,
                               ("u", "k", "D", "gate", "gate", "mask", "D_column")),
    "fold_skip_addcmul": ("skip_addcmul", _skip_addcmul_pattern, _skip_replacement,
                          ("u", "k", "D", "gate", "gate", "mask", "D_column")),
    "fold_gelu": ("gelu", _gelu_pattern, _gelu_replacement, ("u", "k", "D", "gate", "gate", "mask")),
    # F.gelu of a bf16/f16 output: traced on half inputs, the decomposition sits between casts.
    "fold_gelu_half": ("gelu_half", _gelu_pattern, _gelu_replacement, ("half_u", "half_k", "D", "gate", "gate", "mask")),
    "fold_gelu_erfc": ("gelu_erfc", _gelu_erfc_pattern, _gelu_replacement, ("u", "k", "D", "gate", "gate", "mask")),
    "fold_gelu_ndtr": ("gelu_ndtr", _gelu_ndtr_pattern, _gelu_replacement, ("u", "k", "D", "gate", "gate", "mask")),
    "fold_output_multiplier": ("output_multiplier", _output_multiplier_pattern, _output_multiplier_replacement,
                               ("u", "k", "D", "gate", "gate", "mask", "gate")),
    "fold_output_multiplier_first": ("output_multiplier", _output_multiplier_first_pattern,
                                     _output_multiplier_replacement, ("u", "k", "D", "gate", "gate", "mask", "gate")),
    "fold_signal_cast": ("signal_cast", _signal_cast_pattern, _cast_replacement,
                         ("half_u", "k", "D", "gate", "gate", "mask")),
    "fold_kernel_cast": ("kernel_cast", _kernel_cast_pattern, _cast_replacement,
                         ("half_u", "half_k", "D", "gate", "gate", "mask")),
}


def fusion_pattern_specs(device: torch.device) -> Iterator[tuple[str, PatternSpec]]:
    """(guard kind, spec) for every fusion, once per GELU flag where the op's flag is free.

    Call under a FakeTensorMode. Example shapes are valid for the op (its fake kernel validates
    them); the half-precision ones make ``.float()`` / ``.to(u.dtype)`` show up as casts.
    """
    B, H, L = 2, 3, 8
    examples = {
        "u": (B, H, L), "gate": (B, H, L), "k": (H, L), "D": (H,), "D_column": (H, 1), "mask": (B, H),
        "half_u": (B, H, L), "half_k": (H, L),
    }

    def example(role: str) -> torch.Tensor:
        dtype = torch.bfloat16 if role.startswith("half") else torch.float32
        return torch.empty(examples[role], device=device, dtype=dtype)

    for name, (kind, pattern, replacement, roles) in FUSIONS.items():
        inputs = tuple(example(role) for role in roles)
        takes_gelu = "gelu" in inspect.signature(pattern).parameters
        for gelu in (False, True) if takes_gelu else (None,):
            search_fn = _with_gelu(pattern, gelu) if takes_gelu else pattern
            replace_fn = _with_gelu(replacement, gelu) if takes_gelu else replacement
            yield kind, PatternSpec(
                name=name,
                search_fn=search_fn,
                replace_fn=replace_fn,
                example_inputs=inputs,
                trace_fn=fwd_only,
            )
