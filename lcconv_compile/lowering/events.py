"""What the lowering passes did to a graph: rewrites, fusions and refusals, as data.

Every accepted or refused match is reported here once, by the guards. Each report bumps a counter
in ``torch._dynamo.utils.counters`` (``counters["lcconv"][pattern]`` for a rewrite,
``counters["lcconv_rejected"][reason_code]`` for a refusal) so tests can assert on hits, and is
appended to every collector opened with :func:`collect` (that is how ``explain`` sees them).

A function compiled again (a new length under automatic dynamic shapes, say) can lose a rewrite
it had: :func:`pass_run` warns once per call site when an idiom rewritten in an earlier
compilation is refused in a later one (:class:`LostRewriteWarning`), naming the reason.

This module only records and tells. It must not decide anything, import the patterns or touch
Inductor's configuration.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings
from typing import Iterator, Optional, Union

import torch
from torch._dynamo.utils import counters

REWRITE_COUNTERS = "lcconv"
REJECTION_COUNTERS = "lcconv_rejected"


@dataclasses.dataclass(frozen=True)
class Rewrite:
    """A match that was replaced: an FFT-convolution idiom turned into the op, or a neighbour folded."""

    stage: str  # "idiom" or "fusion"
    pattern: str  # the registered pattern's name, e.g. "rfft_conv_training"
    source: str  # "file:line" of the user's code, or "" when the graph does not say
    detail: str = ""

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        detail = f" ({self.detail})" if self.detail else ""
        return f"{self.pattern}{where}{detail}"


@dataclasses.dataclass(frozen=True)
class Rejection:
    """A structural match that a guard refused, with the guard's reason."""

    stage: str
    pattern: str
    code: str  # short, stable identifier of the guard that failed, e.g. "circular"
    reason: str  # one sentence for people
    source: str = ""

    def __str__(self) -> str:
        where = f" at {self.source}" if self.source else ""
        return f"{self.pattern}{where}: [{self.code}] {self.reason}"


class LostRewriteWarning(UserWarning):
    """An FFT convolution rewritten in an earlier compilation was left as written in a later one."""


Event = Union[Rewrite, Rejection]
_collectors: list[list[Event]] = []
# Call sites ("file:line") whose idiom was rewritten in some compilation of this process, and
# those already warned about; the idiom events of the pass run in progress, by call site.
_rewritten_sources: set[str] = set()
_warned_sources: set[str] = set()
_idiom_run: Optional[dict[str, list[Event]]] = None
# Several registered patterns can match the same nodes and ask the same guard: a refusal is
# reported once per node and reason within one run of a pass (see `pass_run`).
_refused_in_this_run: Optional[set[tuple[int, str]]] = None
# Nodes a guard has already spoken about in this run (explain's scan of leftovers skips them).
_explained_in_this_run: set[int] = set()


@contextlib.contextmanager
def collect() -> Iterator[list[Event]]:
    """Gather every event reported while the block runs (nested collectors all receive them)."""
    events: list[Event] = []
    _collectors.append(events)
    try:
        yield events
    finally:
        _collectors.remove(events)


def collecting() -> bool:
    """Whether someone (``explain``) is listening; passes skip diagnostics nobody reads."""
    return bool(_collectors)


@contextlib.contextmanager
def pass_run() -> Iterator[None]:
    """Scope of one pass over one graph, for reporting each refusal once."""
    global _refused_in_this_run, _explained_in_this_run, _idiom_run
    outer = _refused_in_this_run, _explained_in_this_run, _idiom_run
    _refused_in_this_run, _explained_in_this_run, _idiom_run = set(), set(), {}
    try:
        yield
        _warn_lost_rewrites(_idiom_run)
    finally:
        _refused_in_this_run, _explained_in_this_run, _idiom_run = outer


def _warn_lost_rewrites(by_source: dict[str, list[Event]]) -> None:
    """Once per call site: refused in this run, with no rewrite, after a rewrite in an earlier one."""
    for source, site_events in by_source.items():
        rewritten = any(isinstance(event, Rewrite) for event in site_events)
        if rewritten:
            _rewritten_sources.add(source)
        elif source in _rewritten_sources and source not in _warned_sources:
            _warned_sources.add(source)
            reasons = "; ".join(f"[{e.code}] {e.reason}" for e in site_events if isinstance(e, Rejection))
            warnings.warn(
                f"lcconv_compile: the FFT convolution at {source} was rewritten into lcconv::fftconv in an "
                f"earlier compilation, but this one (other sizes, shapes or dtypes) leaves it as written, so it "
                f"runs the unfused torch.fft code: {reasons}. lcconv_compile.explain(fn, *inputs, dynamic=True) "
                f"reports it too.",
                LostRewriteWarning, stacklevel=2)


def mark_explained(node: torch.fx.Node) -> None:
    _explained_in_this_run.add(id(node))


def is_explained(node: torch.fx.Node) -> bool:
    return id(node) in _explained_in_this_run


def report(event: Event, node: Optional[torch.fx.Node] = None) -> None:
    """Count ``event`` and hand it to every open collector (refusals: once per node and reason)."""
    if isinstance(event, Rewrite):
        counters[REWRITE_COUNTERS][event.pattern] += 1
    else:
        key = (id(node), event.code)
        if _refused_in_this_run is not None:
            if key in _refused_in_this_run:
                return
            _refused_in_this_run.add(key)
        counters[REJECTION_COUNTERS][event.code] += 1
    if _idiom_run is not None and event.stage == "idiom" and event.source:
        _idiom_run.setdefault(event.source, []).append(event)
    for events in _collectors:
        events.append(event)


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def source_of(node: Optional[torch.fx.Node]) -> str:
    """``file:line`` of the innermost user frame that produced ``node`` (Dynamo records it)."""
    trace = node.meta.get("stack_trace") if node is not None else None
    if not trace:
        return ""
    frames = _FRAME.findall(trace)
    if not frames:
        return ""
    path, line = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}"
