"""Inductor integration: rewrite hand-written FFT convolutions into ``lcconv::fftconv`` and fold
their pointwise neighbours into the op's options.

Layout (each file one job): :mod:`.fft_idiom` reads an FFT convolution out of a graph,
:mod:`.guards` decides whether a match computes exactly the op (:mod:`.arguments` holds
every absorbed node to the arguments its pattern allows), :mod:`.patterns_idiom` and
:mod:`.patterns_fusion` hold the pattern/replacement pairs, :mod:`.passes` runs them on graphs,
:mod:`.install` hooks the passes into Inductor with on/off switches, :mod:`.events` records what
happened and :mod:`.explain` reports it. Nothing here imports the models.
"""

from .explain import ExplainReport, explain
from .install import DISABLE_ENV, disable, enable, install_passes, passes_active, passes_enabled

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
