"""The CUDA stage of the post-grad pass: op calls on CUDA tensors become the code the op runs.

Each ``lcconv::fftconv`` / ``lcconv::fftconv_bwd`` call left on CUDA tensors after fusion is
replaced by a trace of the op's own implementation (``ops.fftconv_forward_impl`` /
``fftconv_backward_impl``) at the call's sizes: the Triton launches of the family that
``kernels.select`` picks, as ``triton_kernel_wrapper_functional`` nodes (plus the launchers' few
torch ops), or, where no family covers the call, the reference's aten FFT ops. Inductor then
compiles and launches our kernels itself: they appear in the generated code, CUDA graphs
(``mode="reduce-overhead"``) capture them, and AOTInductor packages them (no Python op at run time).

Why here: the op must stay the graph-level contract until our joint-graph and fusion passes have
matched it, so it cannot be a ``triton_op`` (that decomposes at functionalization, before any of
our passes, on CPU graphs too). Inductor's ``post_grad_custom_post_pass`` runs after fusion and
before Inductor's own reinplacing and its decomposition of ``triton_kernel_wrapper_functional``,
which turn the traced launches into in-place launches on fresh buffers; that is the order of
``torch/_inductor/fx_passes/post_grad.py`` on torch 2.11 and 2.13. A custom Inductor lowering
would need Inductor's IR classes (private, different between versions) for the same result.

How: a discovery run of the implementation on the call's fake values (nothing launched) finds
the constant tiles (DFT matrices) its launchers ask for; they become graph constants
(``get_attr``); then ``make_fx`` traces the implementation under ``torch.func.functionalize``
with ``kernels.launch.tracing`` on, so every launch goes through ``torch.library.wrap_triton``,
and the traced nodes are spliced in place of the call.

A family whose module's ``compiler_visible(direction)`` says False (FlashConv v6's forward: Gluon
kernels, which torch 2.11 and 2.13 cannot trace) keeps that direction's op call (code
``opaque_family``): Inductor calls the op, which launches the kernels.

Must not: touch graphs or calls on other devices (CPU graphs keep calling the op); decide on
symbolic sizes (a call whose sizes or strides are symbolic is left as an op call and reported,
code ``symbolic_shape``: the op picks its kernel when it runs); change what the op computes.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Callable

import torch
from torch.fx import Graph, GraphModule, Node

from .. import ops
from ..kernels import launch, select
from . import events
from .guards import FFTCONV, FFTCONV_ARGS

FFTCONV_BWD = torch.ops.lcconv.fftconv_bwd.default
FFTCONV_BWD_ARGS = ("grad_y", "u", "k", "D", "gate_in", "gate_out", "gelu", "dropout_mask")
_DEFAULTS = {"D": None, "gate_in": None, "gate_out": None, "gelu": False, "dropout_mask": None}
STAGE = "cuda"


def _arguments(node: Node) -> dict[str, Any]:
    names = FFTCONV_ARGS if node.target is FFTCONV else FFTCONV_BWD_ARGS
    args = dict(_DEFAULTS)
    args.update(zip(names, node.args))
    args.update(node.kwargs)
    return args


def _value(arg: Any) -> Any:
    return arg.meta.get("val") if isinstance(arg, Node) else arg


def _on_cuda(node: Node) -> bool:
    u = _value(_arguments(node)["u"])
    return isinstance(u, torch.Tensor) and u.device.type == "cuda"


def _is_static(t: torch.Tensor) -> bool:
    return all(isinstance(s, int) for s in (*t.shape, *t.stride(), t.storage_offset()))


def _needs_dense_copy(t: torch.Tensor) -> bool:
    # The launchers pass the strides they see; Inductor keeps a kernel input's stride order but
    # may re-lay-out an input that is not dense (an expanded or sliced view): copy those first.
    expected = 1
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1)
    for stride, size in dims:
        if stride != expected:
            return True
        expected *= size
    return False


def _trace(fn: Callable[..., Any], example_inputs: list[torch.Tensor], fake_mode) -> GraphModule:
    from torch._dispatch.python import enable_python_dispatcher
    from torch._inductor.decomposition import select_decomp_table
    from torch.fx.experimental.proxy_tensor import make_fx

    # Functionalized, so launches become triton_kernel_wrapper_functional (what Inductor's
    # reinplace pass and its decomposition of the wrapper expect); decomposed with Inductor's
    # table, like every other post-grad node.
    with fake_mode, enable_python_dispatcher(), torch.no_grad():
        return make_fx(torch.func.functionalize(fn, remove="mutations"), select_decomp_table(),
                       tracing_mode="real")(*example_inputs)


def _drop_input_write_backs(gm: GraphModule) -> None:
    """Remove ``copy_`` back into the traced inputs. The op is functional (its schema mutates
    nothing), but where Triton's TTIR cannot be analysed (no GPU driver) the wrapper assumes
    every kernel argument is written, and functionalization writes the inputs back."""
    inputs = set(gm.graph.find_nodes(op="placeholder"))
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target is torch.ops.aten.copy_.default and node.args[0] in inputs:
            gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()


def _constant_node(graph: Graph, key: tuple, index: int, tensor: torch.Tensor, fake: torch.Tensor) -> Node:
    module = graph.owning_module
    (name_parts, device) = key
    name = "_lcconv_" + re.sub(r"\W", "_", "_".join(map(str, (*name_parts, device, index))))
    if not hasattr(module, name):
        module.register_buffer(name, tensor, persistent=False)  # a graph constant for Inductor
    node = graph.get_attr(name)
    node.meta["val"] = fake
    return node


def _family_name(family: Any) -> str:
    return "reference" if family is None else getattr(family, "__name__", str(family)).rsplit(".", 1)[-1]


def _lower(graph: Graph, node: Node) -> int:
    forward = node.target is FFTCONV
    op_name = "fftconv" if forward else "fftconv_bwd"
    args = _arguments(node)
    values = {name: _value(arg) for name, arg in args.items()}
    tensor_names = [name for name, arg in args.items() if isinstance(arg, Node)]
    if not all(_is_static(values[name]) for name in tensor_names):
        events.report(events.Rejection(
            STAGE, op_name, "symbolic_shape",
            "sizes or strides are symbolic: the op call stays and picks its kernel when it runs",
            events.source_of(node)), node)
        return 0

    family = select(values["u"], values["k"])
    visible = getattr(family, "compiler_visible", None)
    if visible is not None and not visible("forward" if forward else "backward"):
        events.report(events.Rejection(
            STAGE, op_name, "opaque_family",
            f"{_family_name(family)}'s kernels cannot be launched by compiled code on this torch: "
            "the op call stays and launches them when it runs", events.source_of(node)), node)
        return 0
    impl = ops.fftconv_forward_impl if forward else ops.fftconv_backward_impl
    fake_mode = torch._guards.detect_fake_mode([values[name] for name in tensor_names])
    with fake_mode, torch.no_grad(), launch.discovering() as constants:
        impl(**values)
    # One flat list of constant tensors, in the order the traced function receives them.
    keys = list(constants)
    flat_constants = [(key, i, t) for key in keys for i, t in enumerate(constants[key])]
    const_fakes = [fake_mode.from_tensor(t) for _, _, t in flat_constants]
    dense_copy = {name for name in tensor_names if _needs_dense_copy(values[name])}

    def replacement(*flat: torch.Tensor):
        call = dict(values)
        for name, t in zip(tensor_names, flat):
            call[name] = t.contiguous() if name in dense_copy else t
        supplied, rest = {}, list(flat[len(tensor_names):])
        for key in keys:
            supplied[key], rest = tuple(rest[:len(constants[key])]), rest[len(constants[key]):]
        with launch.tracing(supplied):
            return impl(**call)

    gm = _trace(replacement, [values[name] for name in tensor_names] + const_fakes, fake_mode)
    _drop_input_write_backs(gm)

    source = events.source_of(node)
    with graph.inserting_before(node):
        const_nodes = [_constant_node(graph, key, i, t, fake)
                       for (key, i, t), fake in zip(flat_constants, const_fakes)]
        placeholders = gm.graph.find_nodes(op="placeholder")
        val_map = dict(zip(placeholders, [args[name] for name in tensor_names] + const_nodes))
        outputs = graph.graph_copy(gm.graph, val_map)

    if forward:
        node.replace_all_uses_with(outputs)
    else:
        for user in list(node.users):
            if user.target is not operator.getitem:
                raise AssertionError(f"unexpected user {user.format_node()} of {node.format_node()}")
            user.replace_all_uses_with(outputs[user.args[1]])
            graph.erase_node(user)
    graph.erase_node(node)
    events.report(events.Rewrite(STAGE, f"{op_name}_{_family_name(family)}", source,
                                 f"{'x'.join(map(str, values['u'].shape))} {values['u'].dtype}"))
    return 1


def lower_cuda_calls(graph: Graph) -> int:
    """Replace every op call on CUDA tensors by its traced implementation; returns how many."""
    calls = [n for n in graph.nodes
             if n.op == "call_function" and n.target in (FFTCONV, FFTCONV_BWD) and _on_cuda(n)]
    if not calls:
        return 0
    with events.pass_run():
        return sum(_lower(graph, node) for node in calls)
