"""``lcconv_compile.explain``: what ``torch.compile`` with our passes does to a model, in words.

It compiles ``fn`` once with the compile caches off (a cache hit would skip the passes), runs it
on the example inputs, and reports the rewrites, folds and refusals the guards recorded
(:mod:`.events`), plus Dynamo's graph breaks (``torch._dynamo.explain``). When the passes are off
(``disable()``, ``passes_enabled(False)``, ``LCCONV_COMPILE_DISABLE=1``, or a hook reassigned
after import) it says so and reports no rewrite: ``torch.compile`` would make none.

It only observes: it must not change what the passes decide, nor switch them on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Optional

import torch
from torch._inductor import config as inductor_config

from . import events
from .install import passes_off_reason


@dataclasses.dataclass
class ExplainReport:
    """What compiling a model did to its FFT convolutions. ``print(report)`` for a summary."""

    rewritten: list[events.Rewrite]  # hand-written FFT convolutions now calling lcconv::fftconv
    fused: list[events.Rewrite]  # neighbours folded into an op call
    rejected: list[events.Rejection]  # matches or leftover FFTs, with the guard that refused
    graph_count: int
    graph_break_count: int
    break_reasons: list[str]
    passes_off: str = ""  # why the passes did not run (then the three lists above are empty)

    def __str__(self) -> str:
        lines = [f"lcconv_compile.explain: {self.graph_count} graph(s), {self.graph_break_count} graph break(s)"]
        if self.passes_off:
            lines.append(f"the lcconv_compile passes are OFF: {self.passes_off}.")
            lines.append("torch.compile leaves every FFT convolution and its neighbours as written; nothing was rewritten.")
            sections = (("graph breaks", self.break_reasons),)
        else:
            sections = (
                ("rewritten into lcconv::fftconv", self.rewritten),
                ("fused into the op", self.fused),
                ("left alone", self.rejected),
                ("graph breaks", self.break_reasons),
            )
        for title, items in sections:
            lines.append(f"{title} ({len(items)}):")
            lines.extend(f"  - {item}" for item in items)
        return "\n".join(lines)


def _no_compile_caches():
    stack = contextlib.ExitStack()
    stack.enter_context(inductor_config.patch(fx_graph_cache=False))
    functorch_config = torch._functorch.config
    if hasattr(functorch_config, "enable_autograd_cache"):
        stack.enter_context(functorch_config.patch(enable_autograd_cache=False))
    return stack


def _describe_break(reason: Any) -> str:
    text = getattr(reason, "reason", str(reason))
    stack = getattr(reason, "user_stack", None) or []
    if stack:
        frame = stack[-1]
        return f"{text} ({frame.filename.rsplit('/', 1)[-1]}:{frame.lineno})"
    return str(text)


def explain(fn: Callable[..., Any], *example_inputs: Any, dynamic: Optional[bool] = None,
            **example_kwargs: Any) -> ExplainReport:
    """Compile ``fn`` (a function or ``nn.Module``) on the example inputs and report what happened.

    ``dynamic`` is passed to ``torch.compile``: ``dynamic=True`` explains the graph compiled with
    symbolic sizes, which is also the one a plain ``torch.compile`` uses from the second length on
    (automatic dynamic shapes); the default explains the first, static compile.

    Training graphs are explained when an input or parameter requires grad (only the forward
    is run; the rewrite happens then, for both halves). The report describes compilations under
    the switches as they are now: with the passes off it says so, and lists no rewrite.

    It resets Dynamo (``torch._dynamo.reset()``, before and after, as ``torch._dynamo.explain``
    does): every function compiled so far in this process is thrown away and recompiles on its
    next call. Call it before compiling the model you train, not in the middle of a run.
    """
    off = passes_off_reason()
    torch._dynamo.reset()
    dynamo_report = torch._dynamo.explain(fn)(*example_inputs, **example_kwargs)
    torch._dynamo.reset()
    recorded: list[events.Event] = []
    if off is None:
        with _no_compile_caches(), events.collect() as recorded:
            torch.compile(fn, backend="inductor", dynamic=dynamic)(*example_inputs, **example_kwargs)
        torch._dynamo.reset()

    rewrites = [e for e in recorded if isinstance(e, events.Rewrite)]
    return ExplainReport(
        rewritten=[e for e in rewrites if e.stage == "idiom"],
        fused=[e for e in rewrites if e.stage == "fusion"],
        rejected=[e for e in recorded if isinstance(e, events.Rejection)],
        graph_count=dynamo_report.graph_count,
        graph_break_count=dynamo_report.graph_break_count,
        break_reasons=[_describe_break(r) for r in dynamo_report.break_reasons],
        passes_off=off or "",
    )
