"""The mixer registry: one name -> one class, shared by the LM, ``swap_attention`` and the scripts.

Every mixer is built as ``cls(d_model, l_max, **options)``, maps ``(B, L, d_model)`` to itself,
accepts an optional ``key_padding_mask`` (B, L) (True = padding) and says ``is_causal``.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .attention import Attention
from .butterfly import ButterflyLongConv
from .h3 import H3
from .longconv import LongConv

__all__ = ["MIXERS", "make_mixer"]

MIXERS: dict[str, type[nn.Module]] = {
    "h3": H3,
    "longconv": LongConv,
    "butterfly": ButterflyLongConv,
    "attention": Attention,
}


def make_mixer(name: str, d_model: int, l_max: Optional[int], **options) -> nn.Module:
    """Build the mixer called ``name``; unknown names raise ValueError listing the known ones."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {', '.join(map(repr, MIXERS))}")
    if l_max is None and name != "attention":
        raise ValueError(f"mixer {name!r} needs l_max (its kernel length / longest sequence)")
    try:
        return MIXERS[name](d_model, l_max, **options)
    except TypeError as err:  # an option the mixer does not take: say which mixer
        raise TypeError(f"mixer {name!r} ({MIXERS[name].__name__}): {err}") from err
