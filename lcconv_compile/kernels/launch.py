"""How every Triton kernel of ours is launched, and the constant tiles the launchers share.

One helper, :func:`launch`, serves three callers:

* eager calls (the op's CUDA implementation): a plain ``kernel[grid](...)``. Not through
  ``torch.library.wrap_triton``: outside a tracer it would dispatch a higher-order op per launch
  (host time), for nothing;
* the compiler's CUDA stage (``lowering/cuda_lowering.py``), which traces a launcher on fake
  tensors under functionalization inside :func:`tracing`: the launch goes through
  ``torch.library.wrap_triton`` and becomes a ``triton_kernel_wrapper_functional`` node, so the
  code Inductor generates (and AOTInductor, and CUDA graphs) launches our kernel itself;
* Triton's interpreter (``TRITON_INTERPRET=1``, CPU tests): ``@triton.jit`` then makes
  interpreter functions, which ``wrap_triton`` cannot wrap (torch 2.11 raises): always a plain
  launch.

:func:`cached_constants` holds read-only tiles (DFT matrices, twiddles) per (key, device) in a
bounded cache, made once. While a launcher is traced, the tracer supplies stand-ins for them
(graph constants): a discovery run (:func:`discovering`) first records which ones a call needs.

Knows torch and Triton only (no torch.library ops, no Inductor). Launchers must not launch
kernels any other way, and must not read tensor data (they are run on fake tensors).
"""

from __future__ import annotations

import collections
import contextlib
import threading
from typing import Any, Callable, Iterator, Optional

import torch

try:
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - Triton ships with every supported torch on Linux
    JITFunction = ()

__all__ = ["MAX_CACHED_CONSTANTS", "cached_constants", "discovering", "launch", "tracing"]

MAX_CACHED_CONSTANTS = 64  # (key, device) entries; a plan's tiles are a few hundred KB at most

Constants = tuple[torch.Tensor, ...]
ConstantKey = tuple  # (the launcher's key, device)


class _Mode(threading.local):
    # None: launch for real. "discover": launch nothing, record the constants asked for.
    # "trace": launch through wrap_triton, constants from `supplied`.
    name: Optional[str] = None
    recorded: Optional[dict[ConstantKey, Constants]] = None
    supplied: Optional[dict[ConstantKey, Constants]] = None


_mode = _Mode()
_constant_cache: "collections.OrderedDict[ConstantKey, Constants]" = collections.OrderedDict()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
    """Launch ``kernel[grid](*args, **kwargs)`` the way the current caller needs (see module doc).

    Returns what a plain launch returns (Triton's compiled kernel: launchers may read its
    resources) and None when the launch is traced or only discovered."""
    mode = _mode.name
    if mode is None:
        return kernel[grid](*args, **kwargs)
    elif mode == "trace":
        if not isinstance(kernel, JITFunction):
            raise RuntimeError(
                f"cannot trace a launch of {getattr(kernel, '__name__', kernel)!r}: only @triton.jit "
                "kernels can be traced (Triton's interpreter, TRITON_INTERPRET=1, is for eager tests)")
        torch.library.wrap_triton(kernel)[grid](*args, **kwargs)
    # "discover": nothing runs; the caller only wants the constants the launcher asks for.
    return None


def cached_constants(key: tuple, device: torch.device, make: Callable[[torch.device], Constants]) -> Constants:
    """``make(device)``, computed once per (key, device) and kept (read-only: never write to them).

    ``key`` must name everything ``make`` depends on besides the device (e.g. the FFT plan).
    """
    full_key = (key, device)
    if _mode.name is None:
        hit = _constant_cache.get(full_key)
        if hit is None:
            hit = _constant_cache[full_key] = make(device)
            if len(_constant_cache) > MAX_CACHED_CONSTANTS:
                _constant_cache.popitem(last=False)
        return hit
    if _mode.name == "discover":
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        with unset_fake_temporarily():  # real tensors, even when the launcher runs on fake ones
            real = _mode.recorded.get(full_key) or make(device)
        _mode.recorded[full_key] = real
        return real
    try:
        return _mode.supplied[full_key]
    except KeyError:
        raise RuntimeError(f"constants {full_key} were not discovered before tracing") from None


@contextlib.contextmanager
def _in_mode(name: str, recorded=None, supplied=None) -> Iterator[None]:
    outer = (_mode.name, _mode.recorded, _mode.supplied)
    _mode.name, _mode.recorded, _mode.supplied = name, recorded, supplied
    try:
        yield
    finally:
        _mode.name, _mode.recorded, _mode.supplied = outer


@contextlib.contextmanager
def discovering() -> Iterator[dict[ConstantKey, Constants]]:
    """Within the block launch nothing; yields {(key, device): real constant tensors} asked for."""
    recorded: dict[ConstantKey, Constants] = {}
    with _in_mode("discover", recorded=recorded):
        yield recorded


@contextlib.contextmanager
def tracing(constants: dict[ConstantKey, Constants]) -> Iterator[None]:
    """Within the block launches go through ``wrap_triton`` and ``cached_constants`` returns the
    stand-ins given here (the traced function's inputs) in place of the real tensors."""
    with _in_mode("trace", supplied=constants):
        yield
