"""Hooking the passes into Inductor, and turning them on and off.

``import lcconv_compile`` calls :func:`install_when_inductor_loads`: it does not import Inductor
(most of a second, Dynamo included, that eager users should not pay) but runs
:func:`install_passes` right after the process first imports it, which every ``torch.compile``
does before reading a hook. :func:`install_passes` puts a :class:`.chained_pass.ChainedPass` on
two of Inductor's custom-pass hooks (``joint_custom_post_pass`` for the idiom rewrite,
``post_grad_custom_post_pass`` for fusion; see :mod:`.passes` for why those two). A chained
pass runs our stage and then whatever pass was on the hook before, so a user's own pass keeps
running; installing twice is a no-op. Its ``uuid()`` combines a hash of this package's lowering
sources (and ops.py), the kernel families the dispatch tries, whether the passes are active and
the previous pass's uuid, so
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
import importlib.abc
import importlib.util
import os
import pathlib
import sys
from typing import Any, Callable, Iterator, Optional

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
    from torch._inductor import config as inductor_config

    missing = [hook for hook in _STAGES if not _is_ours(getattr(inductor_config, hook))]
    if missing:
        return (f"Inductor's {', '.join(missing)} no longer chains them (the hook was assigned after "
                "import; lcconv_compile.enable() chains them in again)")
    return None


def pass_version() -> bytes:
    """Hash of the sources that decide what the passes produce: the lowering package, ops.py, and
    the kernels and reference that the CUDA stage traces into compiled code."""
    from torch._inductor.custom_graph_pass import get_hash_for_files

    package = pathlib.Path(__file__).resolve().parent
    root = package.parent
    files = (sorted(str(p) for p in package.glob("*.py")) + sorted(str(p) for p in (root / "kernels").glob("*.py"))
             + [str(root / "ops.py"), str(root / "reference.py")])
    return get_hash_for_files(tuple(files))


def dispatch_key() -> tuple[str, ...]:
    """The kernel families ``kernels.select`` tries, in order: the CUDA stage's output depends on
    them (which kernels it inlines, or whether it keeps an opaque op call), and they change
    without any source change (``LCCONV_FLASHCONV6=1``). Without this in the uuid, a process with
    FlashConv v6 opted in was served graphs compiled without it from the FX graph cache (seen on
    the H100: its compiled calls ran v5's kernels while its eager calls ran v6)."""
    from .. import kernels

    return tuple(family.__name__ for family in kernels.FAMILIES)


def _as_tuple(previous: Any) -> tuple:
    if previous is None:
        return ()
    return tuple(previous) if isinstance(previous, (list, tuple)) else (previous,)


def _stage(name: str) -> Callable[[Graph], int]:
    """``passes.<name>``, imported on first use: the pattern matcher adds a second to the import
    of lcconv_compile, which eager-only users should not pay."""

    def run(graph: Graph) -> int:
        from . import passes

        return getattr(passes, name)(graph)

    run.__name__ = name
    return run


# hook -> (name of the chained-pass class in .chained_pass, our stage)
_STAGES = {
    JOINT_HOOK: ("ChainedPass", _stage("joint_stage")),
    POST_GRAD_HOOK: ("ChainedPostGradPass", _stage("post_grad_stage")),
}


def __getattr__(name: str) -> Any:
    # install.ChainedPass and friends, without importing Inductor when this module is imported.
    if name in ("ChainedPass", "ChainedPostGradPass"):
        from . import chained_pass

        return getattr(chained_pass, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _is_ours(installed: Any) -> bool:
    from .chained_pass import ChainedPass

    return any(isinstance(p, ChainedPass) for p in _as_tuple(installed))


def install_passes() -> None:
    """Chain our passes onto Inductor's hooks, keeping whatever is there; idempotent.

    Imports Inductor: :func:`install_when_inductor_loads` is the import-time way."""
    from torch._inductor import config as inductor_config

    from . import chained_pass

    _InstallOnInductorImport.remove()
    for hook, (chained_type, stage) in _STAGES.items():
        current = getattr(inductor_config, hook)
        if not _is_ours(current):
            setattr(inductor_config, hook, getattr(chained_pass, chained_type)(hook, stage, current))


class _InstallOnInductorImport(importlib.abc.MetaPathFinder):
    """Runs :func:`install_passes` right after ``torch._inductor`` is first imported.

    Importing Inductor costs most of a second (and Dynamo with it), which ``import
    lcconv_compile`` must not add for eager users; every ``torch.compile`` with Inductor imports
    it before it reads the hooks, so installing then is in time for the first compile.
    """

    _TARGET = "torch._inductor"

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self._TARGET:
            return None
        self.remove()  # one shot; also keeps find_spec below from finding us again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run_package(module)  # the whole package __init__, as without us
            install_passes()

        spec.loader.exec_module = exec_module
        return spec

    @classmethod
    def remove(cls) -> None:
        sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, cls)]


def install_when_inductor_loads() -> None:
    """Install the passes now if Inductor is imported already, else as soon as it is."""
    if "torch._inductor" in sys.modules:
        install_passes()
    elif not any(isinstance(finder, _InstallOnInductorImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _InstallOnInductorImport())


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
