"""nn.Modules built on ``lcconv_compile.fftconv`` in plain PyTorch.

Mixers (``Layer(d_model, l_max, **options)``, ``(B, L, d_model)`` in and out): :class:`LongConv`,
:class:`H3` (with a recurrent ``step``), :class:`ButterflyLongConv`, and :class:`Attention` as the
baseline. :class:`LongConvLM` is a small LM over any of them; :func:`swap_attention` puts them into
existing models; :mod:`.synthetic` generates associative-recall and induction-head data and
``python -m lcconv_compile.models.train_synthetic`` trains on it.
"""

from .attention import Attention
from .butterfly import ButterflyLongConv
from .h3 import H3, H3State
from .lm import LongConvLM
from .longconv import LongConv
from .mixers import MIXERS, make_mixer
from .swap import SwapReport, load_swapped_pretrained, swap_attention

__all__ = [
    "Attention",
    "ButterflyLongConv",
    "H3",
    "H3State",
    "LongConv",
    "LongConvLM",
    "load_swapped_pretrained",
    "MIXERS",
    "make_mixer",
    "SwapReport",
    "swap_attention",
]
