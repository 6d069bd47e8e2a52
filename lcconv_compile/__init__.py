"""lcconv-compile: long convolutions as first-class citizens of ``torch.compile``.

Importing the package registers the ``lcconv::fftconv`` ops. The user-facing API is
:func:`fftconv` (the op) and :mod:`lcconv_compile.models` (modules built on it).
"""

from . import ops
from .ops import fftconv

__version__ = "0.1.0"
__all__ = ["fftconv", "ops", "__version__"]
