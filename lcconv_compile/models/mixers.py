"""The mixer registry: one name -> one class, shared by the LM, ``swap_attention`` and the scripts.

Every mixer is built as ``cls(d_model, l_max, **options)``, maps ``(B, L, d_model)`` to itself,
accepts an optional ``key_padding_mask`` (B, L) (True = padding) and says ``is_causal``. A name
may stand for a class with preset options (``"h3-longconv"``: ``H3(kernel="longconv")``).
``l_max`` may be None: the mixers that need a maximum length (a learned kernel's length) say so.
"""

from __future__ import annotations

from typing import Optional

from torch import nn

from .attention import Attention
from .butterfly import ButterflyLongConv
from .h3 import H3
from .longconv import LongConv

__all__ = ["MIXERS", "MIXER_PRESETS", "make_mixer"]

MIXERS: dict[str, type[nn.Module]] = {
    "h3": H3,
    "h3-longconv": H3,
    "longconv": LongConv,
    "butterfly": ButterflyLongConv,
    "attention": Attention,
}
# Options a name fixes; the caller may not contradict them.
MIXER_PRESETS: dict[str, dict] = {"h3-longconv": {"kernel": "longconv"}}


def make_mixer(name: str, d_model: int, l_max: Optional[int], **options) -> nn.Module:
    """Build the mixer called ``name``; unknown names raise ValueError listing the known ones."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {', '.join(map(repr, MIXERS))}")
    preset = MIXER_PRESETS.get(name, {})
    for option, value in preset.items():
        if option in options and options[option] != value:
            raise ValueError(f"mixer {name!r} sets {option}={value!r}; got {option}={options[option]!r}")
    try:
        return MIXERS[name](d_model, l_max, **{**options, **preset})
    except TypeError as err:  # an option the mixer does not take: say which mixer
        raise TypeError(f"mixer {name!r} ({MIXERS[name].__name__}): {err}") from err
