"""Inductor integration: rewrite hand-written FFT convolutions into ``lcconv::fftconv`` and fold
their pointwise neighbours into the op's options.

Layout (each file one job): :mod:`.fft_idiom` reads an FFT convolution out of a graph,
:mod:`.guards` decides whether a match computes exactly the op (:mod:`.arguments` holds
every absorbed node to the arguments its pattern allows), :mod:`.patterns_idiom` and
:mod:`.patterns_fusion` hold the pattern/replacement pairs, :mod:`.passes` runs them on graphs,
:mod:`.install` hooks the passes into Inductor with on/off switches, :mod:`.events` records what
happened and :mod:`.explain` reports it. Nothing here imports the models, and importing this
package does not import Inductor (:mod:`.install` defers that to the first compile; ``explain``
and ``ExplainReport`` load on first access).
"""

import importlib
from typing import Any

from .install import DISABLE_ENV, disable, enable, install_passes, passes_active, passes_enabled


def __getattr__(name: str) -> Any:
    if name in ("ExplainReport", "explain"):
        # Imports Inductor and Dynamo. Importing the submodule `explain` sets this package's
        # attribute `explain` to the module: put the function (and the report) in its place.
        explain_module = importlib.import_module(f"{__name__}.explain")
        globals().update(explain=explain_module.explain, ExplainReport=explain_module.ExplainReport)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DISABLE_ENV",
    "ExplainReport",
    "disable",
    "enable",
    "explain",
    "install_passes",
    "passes_active",
    "passes_enabled",
]
