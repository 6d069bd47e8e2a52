"""lcconv-compile: long convolutions as first-class citizens of ``torch.compile``.

Importing the package registers the ``lcconv::fftconv`` ops and chains our Inductor passes onto
its custom-pass hooks (unless ``LCCONV_COMPILE_DISABLE=1``): ``torch.compile`` then rewrites
hand-written FFT convolutions into the op and folds their neighbours into it. The user-facing
API is :func:`fftconv` (the op), :func:`butterfly_conv` (FlashButterfly with learned factors,
op ``lcconv::butterfly_conv``), :mod:`lcconv_compile.models` (modules built on them),
:func:`explain` (and :class:`LostRewriteWarning`, warned when a recompilation loses a rewrite),
and the switches :func:`enable`, :func:`disable`, :func:`passes_enabled`.
"""

import importlib
from typing import Any

from . import butterfly_ops, ops
from .butterfly_ops import butterfly_conv
from .lowering import disable, enable, passes_enabled
from .lowering.install import _env_disabled, install_when_inductor_loads
from .ops import fftconv

# Not install_passes(): that imports Inductor (and Dynamo), most of a second an eager user
# would pay; the passes go on the hooks when Inductor is first imported, before any compile.
if not _env_disabled():
    install_when_inductor_loads()


def __getattr__(name: str) -> Any:
    # explain / ExplainReport import Inductor: loaded on first access, not with the package.
    if name in ("ExplainReport", "explain"):
        explain_module = importlib.import_module(".lowering.explain", __name__)
        globals().update(explain=explain_module.explain, ExplainReport=explain_module.ExplainReport)
        return globals()[name]
    if name == "LostRewriteWarning":  # lowering.events imports Dynamo
        globals()[name] = importlib.import_module(".lowering.events", __name__).LostRewriteWarning
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [
    "butterfly_conv",
    "ExplainReport",
    "disable",
    "enable",
    "explain",
    "fftconv",
    "LostRewriteWarning",
    "ops",
    "passes_enabled",
    "__version__",
]
