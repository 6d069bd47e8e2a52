"""The pass object that sits on an Inductor hook: our stage, then whatever was there before.

Split from :mod:`.install` because it subclasses Inductor's ``CustomGraphPass``: importing it
imports Inductor, which :mod:`.install` (imported with the package) must not do. It holds the
chaining only; the switches and hooks are :mod:`.install`, the stages :mod:`.passes`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch._inductor import custom_graph_pass
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.fx import Graph

from . import install
from .install import _as_tuple

_InferenceAware = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)


class ChainedPass(CustomGraphPass):
    """Our stage on one hook, then the pass(es) that were on the hook before."""

    def __init__(self, hook: str, stage: Callable[[Graph], int], previous: Any):
        self.hook = hook
        self.stage = stage
        self.previous = previous

    def _run(self, graph: Graph, is_inference: Optional[bool]) -> None:
        if install.passes_active():  # read through the module: tests patch it
            self.stage(graph)
        for user_pass in _as_tuple(self.previous):
            if is_inference is not None and _InferenceAware is not None and isinstance(user_pass, _InferenceAware):
                user_pass(graph, is_inference=is_inference)
            else:
                user_pass(graph)

    def __call__(self, graph: Graph) -> None:
        self._run(graph, None)

    def uuid(self) -> Optional[Any]:
        previous_ids = []
        for user_pass in _as_tuple(self.previous):
            user_id = user_pass.uuid() if isinstance(user_pass, CustomGraphPass) else None
            if user_id is None:
                return None  # the previous pass cannot be keyed: no caching, as Inductor does
            previous_ids.append(user_id)
        return (install.pass_version(), install.dispatch_key(), self.hook, install.passes_active(), tuple(previous_ids))


if _InferenceAware is not None:

    class ChainedPostGradPass(ChainedPass, _InferenceAware):
        """A chained pass for post-grad hooks: takes ``is_inference`` (torch >= 2.13) and hands it on."""

        def __call__(self, graph: Graph, is_inference: Optional[bool] = None) -> None:
            self._run(graph, is_inference)

else:
    ChainedPostGradPass = ChainedPass  # torch 2.11: post-grad passes take the graph only


