"""How every Triton kernel of ours is launched, and the constant tiles the launchers share.

One helper, :func:`launch`, serves three callers:

* eager calls (the op's CUDA implementation): the first call with a new specialization is a plain
  ``kernel[grid](...)`` (Triton compiles and launches); later calls with the same specialization
  hand the arguments straight to the compiled kernel's launcher (:class:`_DirectLaunches`),
  skipping ``JITFunction.run``'s binder, cache-key hashing and option parsing: on the H100 host
  that path cost ~60-90 us per launch of our ~40-argument kernels. ``LCCONV_DIRECT_LAUNCH=0``
  turns it off. Not through ``torch.library.wrap_triton``: outside a tracer it would dispatch a
  higher-order op per launch (host time), for nothing;
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
import inspect
import os
import threading
from typing import Any, Callable, Iterator, Optional

import torch

try:
    from triton import knobs as _triton_knobs
    from triton.runtime.jit import JITFunction
except ImportError:  # pragma: no cover - Triton ships with every supported torch on Linux
    JITFunction = ()
    _triton_knobs = None

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


def _specialization(value: Any) -> Any:
    """What Triton 3.x specializes a non-constexpr argument on (``native_specialize_impl``): a
    tensor's dtype and 16-byte alignment; an int's value 1 (made a constant), divisibility by 16
    and its type (i32, i64, u64); None. Two calls with equal keys compile to the same kernel (a
    CPU test compares these keys with Triton's own, so a Triton that changes them fails it)."""
    if isinstance(value, torch.Tensor):
        return value.dtype, value.data_ptr() & 15 == 0
    if value is None:
        return None
    if isinstance(value, bool):  # tagged: True == 1 in Python, but Triton makes 1 a constant
        return bool, value
    if isinstance(value, int):  # i32, i64 or u64 (tests/test_cuda_lowering.py checks this against Triton)
        return 1 if value == 1 else (value & 15 == 0, -(2 ** 31) <= value < 2 ** 31, value >= 2 ** 63)
    if isinstance(value, float):
        return float
    return _NOT_DIRECT  # anything else (tuples, descriptors): always the plain launch


_NOT_DIRECT = object()


def _launch_hooks() -> bool:
    """Whether a Triton launch hook is installed (profilers such as proton): then every launch
    goes through Triton's own path, which calls them. Triton 3.6 keeps an empty HookChain."""
    for hook in (_triton_knobs.runtime.launch_enter_hook, _triton_knobs.runtime.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", True):
            return True
    return False


class _DirectLaunches:
    """Compiled kernels by (kernel, device, argument specializations, constexprs and options),
    each with the names of the parameters passed as keywords, in signature order."""

    def __init__(self):
        self.enabled = os.environ.get("LCCONV_DIRECT_LAUNCH", "1") != "0"
        self.compiled: dict[tuple, tuple[Any, tuple]] = {}

    def launch(self, kernel: Any, grid: tuple[int, ...], args: tuple, kwargs: dict) -> Any:
        if not self.enabled or not isinstance(kernel, JITFunction) or kernel.pre_run_hooks or _launch_hooks():
            return kernel[grid](*args, **kwargs)
        device = torch.cuda.current_device()
        spec = tuple(_specialization(a) for a in args)
        try:
            key = (kernel, device, spec, tuple(kwargs.items()))
            hit = self.compiled.get(key)
        except TypeError:  # an unhashable keyword value
            return kernel[grid](*args, **kwargs)
        if hit is None:
            compiled = kernel[grid](*args, **kwargs)
            if _NOT_DIRECT not in spec and compiled is not None and not hasattr(compiled, "result"):
                self.compiled[key] = (compiled, self._keyword_params(kernel, len(args), kwargs))
            return compiled
        compiled, keyword_params = hit
        tail = tuple(kwargs[name] if present else default for name, present, default in keyword_params)
        grid_1 = grid[1] if len(grid) > 1 else 1
        grid_2 = grid[2] if len(grid) > 2 else 1
        stream = torch._C._cuda_getCurrentRawStream(device)
        compiled.run(grid[0], grid_1, grid_2, stream, compiled.function, compiled.packed_metadata, None,
                     None, None, *args, *tail)
        return compiled

    @staticmethod
    def _keyword_params(kernel, positional: int, kwargs: dict) -> tuple:
        """(name, passed?, default) of each parameter after the positional ones, in order."""
        params = list(kernel.signature.parameters.values())[positional:]
        return tuple((p.name, p.name in kwargs, None if p.default is inspect.Parameter.empty else p.default)
                     for p in params)


_direct = _DirectLaunches()


def launch(kernel: Any, grid: tuple[int, ...], *args: Any, **kwargs: Any) -> Any:
    """Launch ``kernel[grid](*args, **kwargs)`` the way the current caller needs (see module doc).

    Returns what a plain launch returns (Triton's compiled kernel: launchers may read its
    resources) and None when the launch is traced or only discovered."""
    mode = _mode.name
    if mode is None:
        return _direct.launch(kernel, grid, args, kwargs)
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
