"""Argument checks and the padding helper shared by the mixers: one wording for every error.

Only shape, dtype and option checks; nothing here reads tensor data (all of it runs unchanged
under ``torch.compile``).
"""

from __future__ import annotations

from typing import Iterable, Optional

from torch import Tensor


def check_positive(owner: str, **values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}")


def check_choice(owner: str, name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{owner}: unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}")


def check_divisible(owner: str, d_model: int, name: str, value: int) -> None:
    check_positive(owner, **{name: value})
    if d_model % value != 0:
        raise ValueError(f"{owner}: d_model = {d_model} is not divisible by {name} = {value}")


def check_seqlen(owner: str, x: Tensor, d_model: int, l_max: Optional[int]) -> int:
    """Check that ``x`` is ``(B, L, d_model)`` with ``1 <= L <= l_max``; return L."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"{owner}: expected input of shape (B, L, d_model={d_model}), got {tuple(x.shape)}")
    seqlen = x.shape[1]
    if seqlen < 1:
        raise ValueError(f"{owner}: empty sequence (input shape {tuple(x.shape)})")
    if l_max is not None and seqlen > l_max:
        raise ValueError(
            f"{owner}: sequence length L = {seqlen} exceeds l_max = {l_max} the layer was built for; "
            f"build it with l_max >= {seqlen}"
        )
    return seqlen


def apply_key_padding(x: Tensor, key_padding_mask: Optional[Tensor], *, channels_first: bool = False) -> Tensor:
    """Zero the positions of ``x`` (B, L, C), or (B, C, L) with ``channels_first``, where
    ``key_padding_mask`` (B, L) is True (padding)."""
    if key_padding_mask is None:
        return x
    batch, seqlen = (x.shape[0], x.shape[2]) if channels_first else x.shape[:2]
    if tuple(key_padding_mask.shape) != (batch, seqlen):
        raise ValueError(
            f"key_padding_mask must have shape (B, L) = {(batch, seqlen)}, got {tuple(key_padding_mask.shape)}"
        )
    return x.masked_fill(key_padding_mask.bool().unsqueeze(1 if channels_first else -1), 0.0)
