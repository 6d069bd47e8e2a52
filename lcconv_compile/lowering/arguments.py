"""The argument check every rewrite passes: each node a match absorbs carries only the arguments
its pattern was written for.

Inductor's pattern matcher compares a node's target and the arguments the pattern spells out,
and nothing else: a keyword the pattern does not mention is dropped before comparing (so
``add(x, y, alpha=2)`` matches the pattern ``x + y``), and an argument traced as a size, scalar or
dtype is matched as "anything" (``Ignored()``; patterns are traced at placeholder sizes). This
module closes both holes in one place. For every forward node of a match it walks the node's
schema, argument by argument, and accepts a value only when

* the pattern binds it (a tensor input, a literal such as GELU's flag, compared by the matcher),
* or the pattern does not spell the argument and the node leaves it at the schema's default
  (``alpha=1``, ``step=1``, ``value=0``, ...),
* or the pattern leaves it open and the family's table (:class:`OpenArguments`, declared beside
  each guard in :mod:`.guards`) says either which values the rewrite allows or that the guard
  reads and checks the value itself (:data:`READ`). An open argument with no entry is refused:
  a new pattern cannot silently skip a check.

Backward nodes of a training pattern (everything that does not feed the forward output) are the
autograd derivative of the forward nodes, so they are right when the forward is: they are not
walked. (A custom ``autograd.Function`` whose hand-written backward reproduced autograd's graph
node for node with other scalars would slip through; it is not a spelling anyone writes.)
This module decides nothing beyond arguments and edits no graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch
from torch._inductor.pattern_matcher import Ignored, KeywordArg, PatternExpr
from torch.fx import Node
from torch.fx.experimental.symbolic_shapes import statically_known_true

from .fft_idiom import value


class _Read:
    def __repr__(self) -> str:
        return "READ"


READ = _Read()  # the guard reads and checks this value itself


@dataclasses.dataclass(frozen=True)
class Only:
    """An open argument the rewrite allows with these values only (compared with ``==``)."""

    values: tuple[Any, ...]
    why: str  # what another value would mean, for the refusal

    def allows(self, arg: Any) -> bool:
        return any(_same_value(arg, allowed) for allowed in self.values)


# target -> {argument name: READ or Only(...)}
OpenArguments = dict[Any, dict[str, Any]]


def _same_value(arg: Any, expected: Any) -> bool:
    """Whether ``arg`` is ``expected``, without adding a guard on a symbolic value."""
    arg = value(arg)
    if isinstance(arg, torch.Tensor) or (type(arg) is bool) != (type(expected) is bool):
        return False
    if isinstance(arg, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return statically_known_true(arg == expected)
    try:
        return bool(arg == expected)
    except Exception:  # odd values: not provably the expected one
        return False


def _op_name(target: Any) -> str:
    return str(target).replace("aten.", "aten::").removesuffix(".default")


def _depends_on_tangent(pattern: Any, memo: dict[int, bool]) -> bool:
    if isinstance(pattern, KeywordArg):
        return pattern.name.startswith("tangents")
    if not hasattr(pattern, "fns"):
        return False
    if id(pattern) not in memo:
        memo[id(pattern)] = any(_depends_on_tangent(child, memo) for child in _children(pattern))
    return memo[id(pattern)]


def _children(pattern: Any) -> list[Any]:
    return _flatten(list(getattr(pattern, "args", ())) + list(getattr(pattern, "kwargs", {}).values()))


def _forward_patterns(outputs: list[Any]) -> set[int]:
    """Ids of the call patterns that compute the forward output(s): the ancestors of the outputs
    that do not depend on a tangent (a training pattern also outputs gradients)."""
    outputs = [p for p in outputs if p is not None]
    memo: dict[int, bool] = {}
    forward: set[int] = set()
    stack = [p for p in outputs if not _depends_on_tangent(p, memo)]
    while stack:
        pattern = stack.pop()
        if hasattr(pattern, "fns") and id(pattern) not in forward:
            forward.add(id(pattern))
            stack.extend(_children(pattern))
    return forward


def _flatten(items: Any) -> list[Any]:
    flat = []
    for item in items:
        if isinstance(item, (list, tuple)):
            flat.extend(_flatten(item))
        else:
            flat.append(item)
    return flat


def _is_open(pattern_arg: Any) -> bool:
    if isinstance(pattern_arg, Ignored):
        return True
    return isinstance(pattern_arg, (list, tuple)) and any(_is_open(a) for a in _flatten(pattern_arg))


_ABSENT = object()


def _check_node(node: Node, pattern: Any, open_arguments: OpenArguments) -> Optional[tuple[str, str]]:
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return "argument", f"cannot read the arguments of {node.target} to check them"
    table = open_arguments.get(node.target, {})
    op = _op_name(node.target)
    for index, argument in enumerate(schema.arguments):
        name = argument.name
        if index < len(node.args) and not argument.kwarg_only:
            given = node.args[index]
        elif name in node.kwargs:
            given = node.kwargs[name]
        else:
            continue  # left at the schema's default
        if index < len(pattern.args) and not argument.kwarg_only:
            spelled = pattern.args[index]
        else:
            spelled = pattern.kwargs.get(name, _ABSENT)
        if spelled is _ABSENT:
            default = argument.default_value if argument.has_default_value() else _ABSENT
            if default is _ABSENT or not _same_value(given, default):
                return "argument", (f"{op} has {name}={given!r}; the pattern is written for "
                                    f"{name}={default!r} and would drop it")
        elif _is_open(spelled):
            rule = table.get(name)
            if rule is None:
                return "argument", f"{op}'s {name}={given!r} is matched as anything and no guard checks it"
            if isinstance(rule, Only) and not rule.allows(given):
                return "argument", f"{op} has {name}={given!r}: {rule.why}"
        elif isinstance(spelled, PatternExpr):
            continue  # bound by the matcher (an input, or a node of the pattern)
        # else a literal the matcher compared
    return None


def check_arguments(match: Any, open_arguments: OpenArguments) -> Optional[tuple[str, str]]:
    """(code, reason) for the first argument of a forward node in ``match`` that the rewrite
    would drop or that nobody checks; None when every argument is accounted for."""
    matched = set(match.nodes)
    seen: set[Node] = set()
    forward = _forward_patterns(match.ctx.outputs)
    for pattern, node in match.ctx.pattern_to_node.items():
        if node not in matched or not hasattr(pattern, "fns"):
            continue
        seen.add(node)
        if id(pattern) not in forward:
            continue
        problem = _check_node(node, pattern, open_arguments)
        if problem is not None:
            return problem
    unseen = matched - seen
    if unseen:  # fail closed: a node we cannot pair with its pattern is a node we cannot check
        return "argument", f"cannot tell which part of the pattern {sorted(map(str, unseen))} matched"
    return None
