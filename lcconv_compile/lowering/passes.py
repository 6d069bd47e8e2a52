"""The two graph passes, as plain functions of an ``fx.Graph``: where each pattern runs, and why.

* :func:`joint_stage` (Inductor's joint-graph hook) rewrites hand-written FFT convolutions into
  ``lcconv::fftconv``. It runs on the joint forward+backward graph of a training compile and on
  the forward graph of an inference compile, *before* the partitioner splits training graphs.
  That is the one place where both halves are visible: matching there replaces the forward FFTs
  by the op and their autograd-generated backward FFTs by ``lcconv::fftconv_bwd`` (the patterns
  are traced with ``joint_fwd_bwd``, as Inductor's own ``fuse_attention`` does). Crops written in
  place are first read back through their scatters (:func:`read_crops_through_scatters`). A post-grad
  match would see the forward only and leave the backward on FFTs; a pre-grad match would have
  to read Dynamo's un-normalised torch-level graph, with every spelling of every call.
* :func:`post_grad_stage` (Inductor's post-grad hook) runs :data:`POST_GRAD_STAGES` in order:
  spell every op call out, then fold pointwise neighbours into the op's options. Folding a
  neighbour changes only the forward computation of values the backward does not read (the
  pattern matcher refuses a match whose intermediate has other users, e.g. one saved for the
  backward), so it is done per graph, after partitioning, for inference and training alike.
  Last, :func:`.cuda_lowering.lower_cuda_calls` replaces op calls on CUDA tensors by the Triton
  launches (or reference FFT ops) the op would run, so Inductor launches our kernels itself.

Patterns are registered lazily, on the first graph that has something for them to match; their
search patterns come pre-traced from :mod:`.pattern_cache` (traced under a fresh fake mode when
the shipped ones do not fit this torch). This module wires patterns to guards and hooks nothing into Inductor (that
is :mod:`.install`).
"""

from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from typing import Callable, Optional

import torch
from torch._dynamo.utils import counters
from torch._inductor.pattern_matcher import (
    PatternMatcherPass,
    gen_pattern,
    register_replacement,
    stable_topological_sort,
)
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.fx import Graph, Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

aten, prims = torch.ops.aten, torch.ops.prims

from . import events, guards, pattern_cache
from .cuda_lowering import lower_cuda_calls
from .fft_idiom import is_inverse_fft
from .patterns_fusion import fusion_pattern_specs
from .patterns_idiom import PatternSpec, idiom_pattern_specs, scale_by_either

IDIOM_PATTERNS = PatternMatcherPass(pass_name="lcconv_idiom")
FUSION_PATTERNS = PatternMatcherPass(pass_name="lcconv_fusion")
MAX_FUSION_ROUNDS = 8  # one fold per round and neighbour; the op has five options


def tagged_pattern_specs(device: torch.device) -> list[tuple[str, PatternSpec]]:
    """("idiom" or the fusion's guard kind, spec) for every pattern, in registration order.
    Call inside :func:`tracing_patterns` (example inputs are fake tensors)."""
    return [("idiom", spec) for spec in idiom_pattern_specs(device)] + list(fusion_pattern_specs(device))


def trace(spec: PatternSpec):
    """The search pattern of ``spec``, traced at placeholder sizes (call inside tracing_patterns)."""
    return gen_pattern(spec.search_fn, spec.example_inputs, spec.trace_fn)


def _register(spec: PatternSpec, generic, extra_check, patterns: PatternMatcherPass) -> None:
    # Match on the pattern traced at placeholder sizes, with sizes/scalars/dtypes ignored, and
    # never re-trace it at the graph's sizes: the guard checks those numbers itself (a re-trace
    # would also need the graph's FFT size, which no pattern argument carries).
    register_replacement(
        spec.search_fn,
        spec.replace_fn,
        spec.example_inputs,
        spec.trace_fn,
        patterns,
        extra_check=extra_check,
        search_fn_pattern=generic,
        skip_duplicates=True,
    )


@contextlib.contextmanager
def tracing_patterns():
    # Tracing must see neither the fake mode nor the tracing context of the compile that asked,
    # nor leave counters of its own behind (what Inductor's init_once_fakemode does).
    saved_counters = counters["inductor"].copy()
    with torch._guards.tracing(None), unset_fake_temporarily(), FakeTensorMode(), warnings.catch_warnings():
        # Inductor warns about complex tensors while normalising the FFT patterns' own graphs.
        warnings.filterwarnings("ignore", message=".*complex operators.*")
        yield torch.device("cpu")  # devices are ignored by matching: patterns are traced once
    counters["inductor"] = saved_counters


@functools.cache
def _searched_patterns() -> tuple[tuple[str, PatternSpec, object], ...]:
    """(kind, spec, search pattern) for every pattern: pre-traced where the shipped or cached
    patterns fit this torch and these sources, else traced now (seconds)."""
    with tracing_patterns() as device:
        tagged = tagged_pattern_specs(device)
        searched = pattern_cache.load_or_trace([spec for _, spec in tagged], trace)
    return tuple((kind, spec, pattern) for (kind, spec), pattern in zip(tagged, searched))


# Registered on the first graph that needs them: a graph without FFTs or without the op never
# pays for loading (or tracing) them.
@functools.cache
def _register_idiom_patterns() -> None:
    for kind, spec, generic in _searched_patterns():
        if kind == "idiom":
            _register(spec, scale_by_either(generic), guards.check_idiom(spec.name), IDIOM_PATTERNS)


@functools.cache
def _register_fusion_patterns() -> None:
    for kind, spec, generic in _searched_patterns():
        if kind != "idiom":
            _register(spec, generic, guards.check_fusion(kind, spec.name), FUSION_PATTERNS)


def _backward_nodes(graph: Graph) -> set[Node]:
    """Nodes that depend on a tangent: the backward half of a joint graph (empty for inference)."""
    backward: set[Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" and str(node.target).startswith("tangents"):
            backward.add(node)
        elif any(arg in backward for arg in node.all_input_nodes):
            backward.add(node)
    return backward


def _report_unmatched_ffts(graph: Graph, written_in_place: set[Node]) -> None:
    """For ``explain``: say why each forward inverse FFT that survived the idiom pass is there."""
    backward = _backward_nodes(graph)
    for node in graph.nodes:
        if not is_inverse_fft(node) or node in backward or events.is_explained(node):
            continue
        refusal = guards.diagnose_inverse_fft(node)
        if refusal is None and node in written_in_place and backward:
            refusal = guards.Refusal(
                "unmatched", "the guards accept it, but in-place ops on the cropped result (`y.add_`, "
                "`y.mul_`) give a training graph's backward a form (copy, slice_scatter) no training "
                "pattern matches: write them out of place (`y = y + u * D`)")
        elif refusal is None:
            refusal = guards.Refusal(
                "unmatched", "the guards accept it, but no pattern matched: an intermediate "
                "(a spectrum, the product) has other users, or the spelling is not one we know")
        events.report(events.Rejection("idiom", "unmatched_fft", refusal.code, refusal.reason,
                                       events.source_of(node)), node)


def _sym_expression_node(graph: Graph, expr, symbols: dict) -> Optional[Node]:
    """FX nodes computing the integer sympy expression ``expr`` from the graph's symbol inputs
    (sums, products, min, max, floor division); None for anything else."""
    import sympy
    from torch.utils._sympy.functions import FloorDiv, Max, Min

    if isinstance(expr, sympy.Integer):
        return int(expr)
    if isinstance(expr, sympy.Symbol):
        return symbols.get(expr)
    combiners = {sympy.Add: operator.add, sympy.Mul: operator.mul, Min: torch.sym_min, Max: torch.sym_max}
    if type(expr) in combiners:
        combine = combiners[type(expr)]
        terms = [_sym_expression_node(graph, term, symbols) for term in expr.args]
        if any(term is None for term in terms):
            return None
        result = terms[0]
        for term in terms[1:]:
            result = graph.call_function(combine, (result, term))
        return result
    if isinstance(expr, FloorDiv):
        base, divisor = (_sym_expression_node(graph, term, symbols) for term in expr.args)
        if base is None or divisor is None:
            return None
        return graph.call_function(operator.floordiv, (base, divisor))
    return None


def read_sizes_from_inputs(graph: Graph) -> None:
    """Compute each symbolic size the graph reads off an intermediate tensor from the graph's
    symbol inputs instead.

    With symbolic sizes, the joint graph reads sizes such as ``n // 2 + 1`` off the spectra
    (``sym_size(_fft_r2c, 1)``). That read is an extra user of the spectrum, and a pattern whose
    node expects two users (the product and its backward) then fails to match: a training graph
    recompiled at a second length would silently lose the rewrite. The value is the same symbolic
    expression either way; only where it is read from changes.
    """
    import sympy

    symbols = {}
    for node in graph.find_nodes(op="placeholder"):
        val = node.meta.get("val")
        if isinstance(val, torch.SymInt) and isinstance(val.node.expr, sympy.Symbol):
            symbols.setdefault(val.node.expr, node)
    if not symbols:
        return
    for node in list(graph.find_nodes(op="call_function", target=aten.sym_size.int)):
        source, val = node.args[0], node.meta.get("val")
        if not isinstance(val, torch.SymInt) or source.op == "placeholder":
            continue
        with graph.inserting_before(node):
            replacement = _sym_expression_node(graph, val.node.expr, symbols)
        if replacement is None:
            continue
        if isinstance(replacement, Node):
            replacement.meta["val"] = val
        node.replace_all_uses_with(replacement)  # type: ignore[arg-type]
        graph.erase_node(node)


def _slice_bounds(node: Node, first_index: int) -> Optional[tuple]:
    """(dim, start, end) of a slice or slice_scatter with step 1, counted from 0 and clamped to
    the sliced dim; None when a step or a bound is not a plain or provable value."""
    base = node.args[0].meta.get("val") if isinstance(node.args[0], Node) else None
    if not isinstance(base, torch.Tensor) or base.dim() == 0:
        return None
    given = list(node.args[first_index:])
    dim, start, end, step = given + [0, None, None, 1][len(given):]
    if node.kwargs or not isinstance(dim, int) or not (isinstance(step, int) and step == 1):
        return None
    size = base.shape[dim % base.dim()]
    bounds = []
    for bound, default in ((start, 0), (end, size)):
        bound = default if bound is None else bound
        if not isinstance(bound, (int, torch.SymInt)):
            return None
        if statically_known_true(bound < 0):
            bound = bound + size
        bounds.append(torch.sym_min(torch.sym_max(bound, 0), size))
    return (dim % base.dim(), *bounds)


def read_crops_through_scatters(graph: Graph) -> set[Node]:
    """Below each inverse FFT, replace ``slice(slice_scatter(base, src, d, s, e), d, s, e)`` by
    ``src``; return the inverse FFTs whose output was written into.

    In-place ops on a cropped convolution (``y = irfft(...)[..., :L]; y.add_(u * D); y.mul_(g)``)
    reach the graph functionalized: each writes its result back into the inverse FFT's whole
    output (``slice_scatter``) and the next reads the crop again (``slice``), so the inverse FFT
    has two users and no pattern matches. Reading a range back from the tensor just written into
    it gives what was written: with those reads replaced, the scatters are dead (unless something
    else reads the whole buffer) and the graph is the out-of-place one, ``irfft -> slice -> add
    -> mul``, which the idiom and then the folds match. Values are unchanged.
    """
    written: set[Node] = set()
    for inverse in [node for node in graph.nodes if is_inverse_fft(node)]:
        base = inverse
        while True:
            scatters = [user for user in base.users
                        if user.target == aten.slice_scatter.default and user.args[0] is base]
            if len(scatters) != 1:
                break
            scatter = scatters[0]
            written.add(inverse)
            bounds = _slice_bounds(scatter, 2)
            for user in list(scatter.users):
                if (bounds is not None and user.target == aten.slice.Tensor and user.args[0] is scatter
                        and _same_bounds(_slice_bounds(user, 1), bounds) and _same_value_type(user, scatter.args[1])):
                    user.replace_all_uses_with(scatter.args[1])
            base = scatter
    return written


def _same_bounds(a: Optional[tuple], b: Optional[tuple]) -> bool:
    return a is not None and b is not None and all(statically_known_true(x == y) for x, y in zip(a, b))


def _same_value_type(a: Node, b: object) -> bool:
    """Whether nodes ``a`` and ``b`` hold tensors of one shape, dtype and device."""
    a_val, b_val = a.meta.get("val"), b.meta.get("val") if isinstance(b, Node) else None
    return (isinstance(a_val, torch.Tensor) and isinstance(b_val, torch.Tensor) and a_val.dtype == b_val.dtype
            and a_val.device == b_val.device and a_val.dim() == b_val.dim()
            and all(statically_known_true(x == y) for x, y in zip(a_val.shape, b_val.shape)))


@contextlib.contextmanager
def _complex_warning_deferred():
    """Inductor's pattern matcher asks of every node it visits whether Inductor can generate code
    for it, and that check warns, once per process, that Inductor "does not support code
    generation for complex operators", about the very FFT nodes this pass is about to replace
    (the first screen of ``make demo`` showed it). Silenced while our patterns match: an FFT that
    survives the pass still gets the warning from Inductor's lowering, which has not spent it."""
    from torch._inductor import lowering

    original = getattr(lowering, "_warn_complex_not_supported", None)
    if original is None:  # a torch without it: nothing to defer
        yield
        return
    lowering._warn_complex_not_supported = lambda: None
    try:
        yield
    finally:
        lowering._warn_complex_not_supported = original


def joint_stage(graph: Graph) -> int:
    """Rewrite hand-written FFT convolutions into ``lcconv::fftconv`` (+ ``fftconv_bwd``)."""
    if not any(is_inverse_fft(node) for node in graph.nodes):
        return 0
    _register_idiom_patterns()
    read_sizes_from_inputs(graph)
    written_in_place = read_crops_through_scatters(graph)
    # A dead node gives its inputs an extra user, which a pattern's user counts refuse (autograd
    # leaves one in the backward of an FFT along dim 0: a slice whose copy was folded away; the
    # scatters of in-place ops on a crop, once nothing reads them).
    graph.eliminate_dead_code()
    with events.pass_run(), _complex_warning_deferred():
        count = IDIOM_PATTERNS.apply(graph)
        if events.collecting():
            _report_unmatched_ffts(graph, written_in_place)
    if count:
        # A joint replacement is inserted where the forward output was, before the backward
        # nodes that feed its fftconv_bwd: restore topological order for the passes after ours.
        stable_topological_sort(graph)
    return count


_OP_DEFAULTS = (None, None, None, None, None, False, None)


def spell_out_op_calls(graph: Graph, full: bool) -> None:
    """Write every ``lcconv::fftconv`` call positionally, with all seven arguments or trimmed.

    Traced graphs drop trailing defaults, so the same op appears with 2 to 7 arguments. Fusion
    patterns are written for the full form (see :mod:`.patterns_fusion`); Inductor's lowering
    of the call expects the trimmed form back.
    """
    for node in graph.find_nodes(op="call_function", target=guards.FFTCONV):
        by_name = guards.op_arguments(node)
        args = [by_name[name] for name in guards.FFTCONV_ARGS]
        while not full and len(args) > 2 and args[-1] is _OP_DEFAULTS[len(args) - 1]:
            args.pop()
        node.args = tuple(args)
        node.kwargs = {}


# Neighbours a fusion pattern could fold (skip term, gates, GELU, casts): aten.add / mul / erf
# and dtype casts. Others (a matmul, a reduction) are not ours to report.
_FOLDABLE_NEIGHBOURS = (aten.add.Tensor, aten.mul.Tensor, aten.erf.default, prims.convert_element_type.default)


def _is_training_forward(graph: Graph) -> bool:
    # AOT autograd names a training forward's inputs primals_N (an inference graph's argN_1).
    return any(str(node.target).startswith("primals") for node in graph.find_nodes(op="placeholder"))


def _sharing(graph: Graph, others: list[Node]) -> tuple[str, str]:
    """(reason code, who else uses the value) for a value a fold would have absorbed."""
    saved = _is_training_forward(graph) and any(user.op == "output" for user in others)
    described = ["the graph's outputs, saved for the backward" if saved and user.op == "output"
                 else "the graph's outputs" if user.op == "output"
                 else f"{user.target} ({events.source_of(user) or user.name})" for user in others]
    return ("saved_for_backward" if saved else "other_users"), ", ".join(described)


def _descendants(nodes: list[Node], limit: int = 32) -> set[Node]:
    """Nodes computed from ``nodes`` (them included), nearest first, at most ``limit``; not outputs."""
    found: set[Node] = set()
    frontier = list(nodes)
    while frontier and len(found) < limit:
        node = frontier.pop(0)
        if node in found or node.op == "output":
            continue
        found.add(node)
        frontier.extend(node.users)
    return found


def _report_unfused_neighbours(graph: Graph) -> None:
    """For ``explain``: name each neighbour left outside an op call because a value the fold
    would absorb has another user (in training, typically the partitioner saving it for the
    backward), which the pattern matcher does not fold over; or, when every other user feeds
    the same expression as the neighbours (the output read twice, as a GELU does), that no fold
    pattern matches that expression."""
    for op in graph.find_nodes(op="call_function", target=guards.FFTCONV):
        outside = [user for user in op.users if user.op == "call_function" and user.target in _FOLDABLE_NEIGHBOURS]
        others = [user for user in op.users if user not in outside]
        if outside and others:  # all users foldable: a guard, not sharing, kept them out (it says why)
            expression = _descendants(outside)
            sharing = [user for user in others if not _descendants([user]) & expression]
            names = ", ".join(f"{user.target}" for user in outside)
            if sharing:
                code, users = _sharing(graph, sharing)
                reason = f"{names} on the op's output stays outside: the output is also used by {users}"
            else:
                code = "unmatched"
                reason = (f"{names} and {', '.join(str(user.target) for user in others)} on the op's output "
                          "compute one expression that no fold pattern matches (not the exact GELU, skip "
                          "term or gate as the op computes them, or a spelling of one we do not know)")
            events.report(events.Rejection("fusion", "neighbour_left_outside", code, reason,
                                           events.source_of(outside[0])), op)
        signal = op.args[0]
        if (isinstance(signal, Node) and signal.target == aten.mul.Tensor and len(signal.users) > 1
                and all(isinstance(arg, Node) for arg in signal.args)):
            others = [user for user in signal.users if user is not op]
            code, users = _sharing(graph, others)
            events.report(events.Rejection(
                "fusion", "input_gate_left_outside", code,
                f"the product {signal.name} feeding the op stays outside as its input gate: it is also used "
                f"by {users}", events.source_of(signal)), signal)


def fuse_neighbours(graph: Graph) -> int:
    """Fold neighbours into op calls until nothing more folds (each fold can enable the next)."""
    if not graph.find_nodes(op="call_function", target=guards.FFTCONV):
        return 0
    _register_fusion_patterns()
    total = 0
    with events.pass_run():
        for _ in range(MAX_FUSION_ROUNDS):
            spell_out_op_calls(graph, full=True)
            count = FUSION_PATTERNS.apply(graph)
            if not count:
                break
            graph.eliminate_dead_code()
            total += count
        spell_out_op_calls(graph, full=False)
        if events.collecting():
            _report_unfused_neighbours(graph)
    return total


# The post-grad stages, in order; each takes the graph and returns how many nodes it changed.
# The CUDA stage comes last: it replaces op calls on CUDA tensors by their Triton launches, so
# every fold must have happened before it (see cuda_lowering.py).
POST_GRAD_STAGES: list[Callable[[Graph], int]] = [fuse_neighbours, lower_cuda_calls]


def post_grad_stage(graph: Graph) -> int:
    return sum(stage(graph) for stage in POST_GRAD_STAGES)
