"""lcconv-compile: long convolutions as first-class citizens of ``torch.compile``.

Importing the package registers the ``lcconv::fftconv`` ops and chains our Inductor passes onto
its custom-pass hooks (unless ``LCCONV_COMPILE_DISABLE=1``): ``torch.compile`` then rewrites
hand-written FFT convolutions into the op and folds their neighbours into it. The user-facing
API is :func:`fftconv` (the op), :func:`butterfly_conv` (FlashButterfly with learned factors,
op ``lcconv::butterfly_conv``), :mod:`lcconv_compile.models` (modules built on them),
:func:`explain`, and the switches :func:`enable`, :func:`disable`, :func:`passes_enabled`.
"""

from . import butterfly_ops, ops
from .butterfly_ops import butterfly_conv
from .lowering import ExplainReport, disable, enable, explain, passes_enabled
from .lowering.install import _env_disabled, install_passes as _install_passes
from .ops import fftconv

if not _env_disabled():
    _install_passes()

__version__ = "0.1.0"
__all__ = [
    "butterfly_conv",
    "ExplainReport",
    "disable",
    "enable",
    "explain",
    "fftconv",
    "ops",
    "passes_enabled",
    "__version__",
]
