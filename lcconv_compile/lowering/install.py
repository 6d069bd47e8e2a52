"""Hooking the passes into Inductor, and turning them on and off.

``import lcconv_compile`` calls :func:`install_passes`, which puts a :class:`ChainedPass` on two of
Inductor's custom-pass hooks (``joint_custom_post_pass`` for the idiom rewrite,
``post_grad_custom_post_pass`` for fusion; see :mod:`.passes` for why those two). A chained
pass runs our stage and then whatever pass was on the hook before, so a user's own pass keeps
running; installing twice is a no-op. Its ``uuid()`` combines a hash of this package's lowering
sources (and ops.py) with whether the passes are active and with the previous pass's uuid, so
the FX graph cache never serves a graph compiled under different passes (and is bypassed, as
Inductor does, when the previous pass has no uuid).

Off switches: :func:`disable` / :func:`enable`, the context manager :func:`passes_enabled`, and
the environment variable ``LCCONV_COMPILE_DISABLE=1`` (checked at every compile; when set at
import, nothing is installed either). They affect compilations that start afterwards; code
already compiled keeps what it was compiled with.

If you set one of these two hooks yourself *after* importing lcconv_compile, you replace our
pass: call :func:`enable` afterwards to chain it in again.

Torch versions: tested with 2.13 (CPU). On 2.11 a hook holds one callable (2.13 also accepts
lists, which a chained pass calls in order), and 2.13 passes ``is_inference`` to post-grad passes
that subclass ``CustomInferenceAwareGraphPass`` (absent in 2.11): the post-grad chained pass
subclasses it where it exists and hands the flag on to a previous pass that wants it.

This module holds hooks and switches only; what the passes do is in :mod:`.passes`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from typing import Any, Callable, Iterator, Optional

from torch._inductor import config as inductor_config
from torch._inductor import custom_graph_pass
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.fx import Graph

DISABLE_ENV = "LCCONV_COMPILE_DISABLE"
JOINT_HOOK = "joint_custom_post_pass"
POST_GRAD_HOOK = "post_grad_custom_post_pass"

_enabled = True
_override: Optional[bool] = None  # set by passes_enabled(); wins over enable()/disable()


def _env_disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def passes_active() -> bool:
    """Whether a compilation starting now gets our rewrites (when they are on the hooks)."""
    if _env_disabled():
        return False
    return _override if _override is not None else _enabled


def passes_off_reason() -> Optional[str]:
    """Why a compilation starting now would not get our rewrites, in words; None when it would."""
    if _env_disabled():
        return f"{DISABLE_ENV}={os.environ[DISABLE_ENV]} is set"
    if _override is False:
        return "inside `with lcconv_compile.passes_enabled(False)`"
    if _override is None and not _enabled:
        return "lcconv_compile.disable() was called (lcconv_compile.enable() turns them back on)"
    missing = [hook for hook in _STAGES if not _is_ours(getattr(inductor_config, hook))]
    if missing:
        return (f"Inductor's {', '.join(missing)} no longer chains them (the hook was assigned after "
                "import; lcconv_compile.enable() chains them in again)")
    return None


def pass_version() -> bytes:
    """Hash of the sources that decide what the passes produce: the lowering package, ops.py, and
    the kernels and reference that the CUDA stage traces into compiled code."""
    package = pathlib.Path(__file__).resolve().parent
    root = package.parent
    files = (sorted(str(p) for p in package.glob("*.py")) + sorted(str(p) for p in (root / "kernels").glob("*.py"))
             + [str(root / "ops.py"), str(root / "reference.py")])
    return get_hash_for_files(tuple(files))


def _as_tuple(previous: Any) -> tuple:
    if previous is None:
        return ()
    return tuple(previous) if isinstance(previous, (list, tuple)) else (previous,)


_InferenceAware = getattr(custom_graph_pass, "CustomInferenceAwareGraphPass", None)


class ChainedPass(CustomGraphPass):
    """Our stage on one hook, then the pass(es) that were on the hook before."""

    def __init__(self, hook: str, stage: Callable[[Graph], int], previous: Any):
        self.hook = hook
        self.stage = stage
        self.previous = previous

    def _run(self, graph: Graph, is_inference: Optional[bool]) -> None:
        if passes_active():
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
        return (pass_version(), self.hook, passes_active(), tuple(previous_ids))


if _InferenceAware is not None:

    class ChainedPostGradPass(ChainedPass, _InferenceAware):
        """A chained pass for post-grad hooks: takes ``is_inference`` (torch >= 2.13) and hands it on."""

        def __call__(self, graph: Graph, is_inference: Optional[bool] = None) -> None:
            self._run(graph, is_inference)

else:
    ChainedPostGradPass = ChainedPass  # torch 2.11: post-grad passes take the graph only


def _stage(name: str) -> Callable[[Graph], int]:
    """``passes.<name>``, imported on first use: the pattern matcher adds a second to the import
    of lcconv_compile, which eager-only users should not pay."""

    def run(graph: Graph) -> int:
        from . import passes

        return getattr(passes, name)(graph)

    run.__name__ = name
    return run


_STAGES = {
    JOINT_HOOK: (ChainedPass, _stage("joint_stage")),
    POST_GRAD_HOOK: (ChainedPostGradPass, _stage("post_grad_stage")),
}


def _is_ours(installed: Any) -> bool:
    return any(isinstance(p, ChainedPass) for p in _as_tuple(installed))


def install_passes() -> None:
    """Chain our passes onto Inductor's hooks, keeping whatever is there; idempotent."""
    for hook, (chained_type, stage) in _STAGES.items():
        current = getattr(inductor_config, hook)
        if not _is_ours(current):
            setattr(inductor_config, hook, chained_type(hook, stage, current))


def enable() -> None:
    """Turn the rewrites on for compilations that start from now (and re-chain them if needed)."""
    global _enabled
    _enabled = True
    install_passes()


def disable() -> None:
    """Turn the rewrites off for compilations that start from now; user passes keep running."""
    global _enabled
    _enabled = False


@contextlib.contextmanager
def passes_enabled(enabled: bool = True) -> Iterator[None]:
    """Within the block, compilations get the rewrites iff ``enabled`` (the env variable still wins)."""
    global _override
    if enabled:
        install_passes()
    outer, _override = _override, enabled
    try:
        yield
    finally:
        _override = outer
