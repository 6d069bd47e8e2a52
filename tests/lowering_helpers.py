"""Shared by the lowering tests: compile a function once with a recorder chained after our
post-grad pass, and print post-grad graphs in a form stable across runs and torch versions.

Not a test module (no ``test_`` prefix). Compiles happen with the FX graph and AOTAutograd
caches off, so the passes always run (a cache hit would skip them and record nothing).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import operator
import types
from typing import Any, Callable, Optional

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass

from lcconv_compile.lowering import install
from lcconv_compile.lowering.events import REJECTION_COUNTERS, REWRITE_COUNTERS


_SHORT_DTYPES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64",
                 torch.complex64: "c64", torch.complex128: "c128"}


def _describe_input(node: torch.fx.Node) -> str:
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor):
        return str(val)
    return f"{_SHORT_DTYPES.get(val.dtype, str(val.dtype))}[{', '.join(str(s) for s in val.shape)}]"


def format_graph(graph: torch.fx.Graph) -> str:
    """One line per node, names replaced by position (``in0``, ``v0``), floats rounded.

    Inputs are listed with dtype and shape (the graph orders them by first use, not by the
    function's parameters).
    """
    names: dict[torch.fx.Node, str] = {}
    lines = []
    inputs = []

    def show(arg: Any) -> str:
        if isinstance(arg, torch.fx.Node):
            return names[arg]
        if isinstance(arg, (list, tuple)):
            inner = ", ".join(show(a) for a in arg)
            return f"[{inner}]" if isinstance(arg, list) else f"({inner}{',' if len(arg) == 1 else ''})"
        if isinstance(arg, float):
            return f"{arg:.6g}"
        return str(arg)

    for node in graph.nodes:
        if node.op == "placeholder":
            names[node] = f"in{len(inputs)}"
            inputs.append(f"{names[node]}: {_describe_input(node)}")
            continue
        if node.op == "output":
            lines.append(f"return {show(node.args[0])}")
            continue
        names[node] = f"v{len(lines)}"
        if node.target is operator.getitem:
            target = "getitem"
        else:
            target = str(node.target).removesuffix(".default")
        args = [show(a) for a in node.args] + [f"{k}={show(v)}" for k, v in node.kwargs.items()]
        lines.append(f"{names[node]} = {target}({', '.join(args)})")
    return "\n".join(["inputs " + ", ".join(inputs)] + lines)


class GraphRecorder(CustomGraphPass):
    """A user's post-grad pass: records each graph it sees (ours runs first, so: the result)."""

    def __init__(self) -> None:
        self.graphs: list[str] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs.append(format_graph(graph))

    def uuid(self) -> bytes:
        return b"lcconv-tests-graph-recorder"


@contextlib.contextmanager
def no_compile_caches():
    with inductor_config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


@dataclasses.dataclass
class Compiled:
    """A function compiled once with ``fullgraph=True``, with what its compilation recorded."""

    fn: Callable[..., Any]  # the compiled callable, reusable on fresh inputs of the same shapes
    graphs: list[str]  # formatted post-grad graphs: forward (and backward when trained)
    rewrites: dict[str, int]  # counters["lcconv"] increments during the compilation
    rejections: dict[str, int]  # counters["lcconv_rejected"] increments


def counter_delta(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
    """What a counter gained between two readings, by key."""
    return {key: after[key] - before[key] for key in after if after[key] != before[key]}


def fresh_copy(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own: Dynamo caches compiled code per code object, so each
    test compiles afresh (and never hits the recompile limit) even when it reuses a function."""
    if not isinstance(fn, types.FunctionType):
        return fn
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


def compile_once(fn: Callable[..., Any], *inputs: torch.Tensor, train: bool = False,
                 dynamic: Optional[bool] = None) -> Compiled:
    """Compile (a fresh copy of) ``fn``, run it on ``inputs`` (and its backward when ``train``),
    and return the compiled callable with what the compilation recorded."""
    fn = fresh_copy(fn)
    recorder = GraphRecorder()
    before = {name: counters[name].copy() for name in (REWRITE_COUNTERS, REJECTION_COUNTERS)}
    with no_compile_caches(), inductor_config.patch(post_grad_custom_post_pass=recorder):
        install.install_passes()  # chain our pass in front of the recorder for this compilation
        compiled = torch.compile(fn, fullgraph=True, dynamic=dynamic)
        out = compiled(*inputs)
        if train:
            leaves = [t for t in inputs if t.requires_grad]
            torch.autograd.grad(out.sum(), leaves)
    return Compiled(
        fn=compiled,
        graphs=recorder.graphs,
        rewrites=counter_delta(before[REWRITE_COUNTERS], counters[REWRITE_COUNTERS]),
        rejections=counter_delta(before[REJECTION_COUNTERS], counters[REJECTION_COUNTERS]),
    )


@contextlib.contextmanager
def torch_211_r2c_strides_bug():
    """torch 2.11's Inductor (CPU) asserts a wrong stride for its own aten._fft_r2c along a middle
    dim (the generated code's assert_size_stride fails on a graph our passes left alone). Seen on
    the GPU machine (torch 2.11.0+cu130); fixed by 2.13. Such a run is an expected failure there."""
    try:
        yield
    except AssertionError as exc:
        if torch.__version__ < (2, 12) and "_fft_r2c" in str(exc) and "stride" in str(exc):
            pytest.xfail("torch 2.11 Inductor: wrong assert_size_stride for aten._fft_r2c along dim 1")
        raise
