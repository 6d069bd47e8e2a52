"""Does ``torch.library.triton_op`` + ``wrap_triton`` carry a Gluon kernel through torch.compile?

Issue 22 item 4 asks, before any kernel family is written in Gluon (``triton.experimental.gluon``,
``@gluon.jit``), whether compiled graphs can keep launching our kernels directly (today's route:
``wrap_triton`` launches become ``triton_kernel_wrapper_functional`` nodes that Inductor compiles
and launches itself, see ``lowering/cuda_lowering.py``), or whether a Gluon family must stay
opaque to Inductor. This script answers it for the torch it runs under, on a toy kernel
(``y = x * alpha``, one ``gl.BlockedLayout``), with a plain ``@triton.jit`` twin as the control:

    PYTHONPATH=$PWD python scripts/probe_gluon_triton_op.py

Routes, each a ``torch.library`` op on one 1-D CUDA tensor:

* ``triton_op``  (control): ``triton_op`` + ``wrap_triton`` of the ``@triton.jit`` twin;
* ``triton_op``  (gluon):   the same with the ``@gluon.jit`` kernel (the route in question);
* ``custom_op``  (gluon):   a plain ``custom_op`` with a registered fake kernel whose CUDA
  implementation launches the Gluon kernel itself: opaque to Inductor (the fallback route).

Steps, one line each (``OK``, ``SKIP``, ``FAIL``, or ``DEGRADED``: it ran, but torch fell back
to assuming every tensor argument is written), with the reason:

1. ``eager``: the op on CUDA tensors against ``x * alpha`` (GPU only);
2. ``make_fx``: a trace of ``op(x) + 1`` (fake CUDA tensors when there is no GPU);
3. ``functionalize``: ``make_fx(torch.func.functionalize(launcher))`` of a bare ``wrap_triton``
   launch, as ``cuda_lowering`` traces our launchers; prints the HOP's ``tensors_to_clone``;
4. ``aot_eager``: ``torch.compile(fullgraph=True)`` with AOTAutograd and no compiler (what
   ``backend="aot_eager"`` runs); prints the forward graph's kernel nodes, ``tensors_to_clone``
   and how many inputs the graph reports as mutated; on a GPU also runs it against eager;
5. ``mutation analysis``: torch's TTIR analysis (``identify_accessed_tensors`` on 2.13,
   ``identify_mutated_tensors`` on 2.11) called on the kernel alone; when it raises, torch
   assumes every tensor argument is written (a clone per input, and an input copy-back);
6. ``inductor emission``: the source Inductor embeds for a user kernel
   (``user_defined_triton_kernel_transitive_closure_source_code``, put under ``@triton.jit``) and
   compiled the way Inductor's ``CachingAutotuner`` compiles it (``ASTSource``), to PTX;
7. ``inductor``: ``torch.compile(fullgraph=True)`` on a GPU, with the generated code inspected
   (launches the kernel itself, or calls the op), against eager.

Without a GPU, steps that need a Triton target (3-6) run with a stand-in Triton driver that
names ``cuda:90`` (Triton compiles to PTX without a device), printed as such; steps 1 and 7 are
skipped. With ``--no-stand-in`` they run as torch would on this machine (the analysis then fails
for every kernel, Gluon or not, for want of a driver).

What a CPU-only machine showed, the same on torch 2.13.0+cpu and 2.11.0+cu130 with triton 3.6.0
(steps 1 and 7 wait for a GPU):

* tracing works: ``wrap_triton`` accepts the kernel (``GluonJITFunction`` subclasses
  ``JITFunction``), the op traces, and functionalization makes a
  ``triton_kernel_wrapper_functional`` node for it;
* torch's mutation analysis cannot read a Gluon kernel: ``generate_ttir`` builds a plain
  ``ASTSource``, so the module lacks ``ttg.num-warps`` and Gluon's layout verification fails
  ("Could not determine the number of warps per CTA"); torch then assumes every tensor argument
  is written: x is cloned before each launch and AOTAutograd copies it back into the input;
* Inductor cannot compile it: it re-emits the kernel's source under ``@triton.jit`` without the
  ``gl`` import (NameError); with the import, plain Triton rejects Gluon's builtins; even under
  ``@gluon.jit`` its ``CachingAutotuner`` compiles through a plain ``ASTSource`` (the same layout
  error). Neither torch handles Gluon anywhere (no "gluon" in either's torch/ sources);
* the opaque route (``custom_op`` + fake kernel) traces and compiles to an op call, as any op.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
import traceback
from typing import Any, Callable

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

BLOCK = 128
ALPHA = 2.5
N = 1000
HAS_CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------------- kernels --
@gluon.jit
def _gluon_scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: gl.constexpr):
    # 4 warps: Triton's default num_warps, which every launch below uses.
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    offs = gl.program_id(0) * BLOCK + gl.arange(0, BLOCK, layout=layout)
    mask = offs < n
    gl.store(y_ptr + offs, gl.load(x_ptr + offs, mask=mask) * alpha, mask=mask)


@triton.jit
def _triton_scale_kernel(x_ptr, y_ptr, n, alpha, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * alpha, mask=mask)


KERNELS = {"triton": _triton_scale_kernel, "gluon": _gluon_scale_kernel}


# --------------------------------------------------------------------------------------- ops --
def _scaled(launcher, x: torch.Tensor, alpha: float) -> torch.Tensor:
    y = torch.empty_like(x)
    n = x.numel()
    launcher[(triton.cdiv(n, BLOCK),)](x, y, n, alpha, BLOCK=BLOCK)
    return y


@torch.library.triton_op("gluon_probe::scale_triton", mutates_args=())
def scale_triton(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return _scaled(torch.library.wrap_triton(_triton_scale_kernel), x, alpha)


@torch.library.triton_op("gluon_probe::scale_gluon", mutates_args=())
def scale_gluon(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return _scaled(torch.library.wrap_triton(_gluon_scale_kernel), x, alpha)


@torch.library.custom_op("gluon_probe::scale_gluon_opaque", mutates_args=())
def scale_gluon_opaque(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return _scaled(_gluon_scale_kernel, x, alpha)  # launched directly: opaque to the compiler


@scale_gluon_opaque.register_fake
def _(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.empty_like(x)


ROUTES: dict[str, tuple[Callable[..., torch.Tensor], str]] = {
    # name: (op, kernel family)
    "triton_op/triton (control)": (scale_triton, "triton"),
    "triton_op/gluon": (scale_gluon, "gluon"),
    "custom_op/gluon (opaque)": (scale_gluon_opaque, "gluon"),
}


# ---------------------------------------------------------------------------------- plumbing --
class _WrapLog:
    """Stands in for ``triton_kernel_wrap``'s module logger during a step and records its
    warnings: torch's 'assuming every input is mutated' fallback (a warning with exc_info).
    Its logger cannot just be given a handler: torch._logging clears handlers when it sets up."""

    def __init__(self, real: logging.Logger) -> None:
        self.real = real
        self.records: list[str] = []

    def warning(self, msg, *args, exc_info=None, **kwargs) -> None:
        cause = ""
        exc = sys.exc_info()[1] if exc_info is True else exc_info
        if isinstance(exc, BaseException):
            cause = f" (cause: {_last_line(exc)})"
        self.records.append((msg % args if args else msg) + cause)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


@contextlib.contextmanager
def _capture_fallbacks():
    import torch._higher_order_ops.triton_kernel_wrap as tkw

    real = tkw.log
    tkw.log = _WrapLog(real)
    try:
        yield tkw.log.records
    finally:
        tkw.log = real


@contextlib.contextmanager
def _capture_stderr():
    """MLIR diagnostics are written by C++ to fd 2: collect them for the step's line."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        lines: list[str] = []
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines.extend(sink.read().decode(errors="replace").splitlines())


class _StepFailed(Exception):
    """A step's failure whose message is already the summary."""


def _last_line(exc: BaseException) -> str:
    if isinstance(exc, _StepFailed):
        return str(exc)
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    text = lines[-1] if lines else ""
    # Inductor's BackendCompilerFailed ends with a hint; the cause is the line with the error.
    for line in lines:
        if any(key in line for key in ("Error:", "error:", "Exception:")):
            text = line
            break
    return f"{type(exc).__name__}: {text}"[:400]


def report(step: str, route: str, fn: Callable[[], str]) -> None:
    """One line per step: OK, SKIP, FAIL, or DEGRADED (it ran, but torch fell back to assuming
    every tensor argument is written), then torch's fallback and any MLIR error lines."""
    with _capture_fallbacks() as fallbacks, _capture_stderr() as stderr:
        try:
            detail = fn()
            status = "SKIP" if detail.startswith("SKIP") else "OK"
            detail = detail[4:].lstrip(" :") if status == "SKIP" else detail
        except Exception as exc:  # noqa: BLE001 - a probe: every outcome is printed
            status, detail = "FAIL", _last_line(exc)
            if os.environ.get("PROBE_TRACEBACK"):
                traceback.print_exc()
    if fallbacks and status == "OK":
        status = "DEGRADED"
    line = f"[{step}] {route}: {status} {detail}"
    for fallback in sorted(set(fallbacks)):
        line += f"\n    torch fell back: {fallback}"
    errors = [l.strip() for l in stderr if "error:" in l]
    for error in sorted(set(errors)):
        line += f"\n    MLIR: {error[error.index('error:'):]}"
    if os.environ.get("PROBE_TRACEBACK") and stderr:
        line += "\n" + "\n".join(stderr)
    print(line, flush=True)


STAND_IN: dict[str, Any] = {"on": False}


@contextlib.contextmanager
def triton_target():
    """On a GPU: nothing. Without one: a Triton driver whose only answer is the target cuda:90,
    all that torch's TTIR generation asks of it (``generate_ttir``: ``get_current_target``)."""
    if HAS_CUDA or not STAND_IN["on"]:
        yield
        return
    from triton.backends.compiler import GPUTarget

    class _StandInDriver:
        def get_current_target(self):
            return GPUTarget("cuda", 90, 32)

    drivers = triton.runtime.driver
    previous = drivers._active
    drivers.set_active(_StandInDriver())
    try:
        yield
    finally:
        drivers._active = previous


def _target():
    from triton.backends.compiler import GPUTarget

    if HAS_CUDA:
        return triton.runtime.driver.active.get_current_target()
    return GPUTarget("cuda", 90, 32)


@contextlib.contextmanager
def cuda_input():
    """x on CUDA: a real tensor on a GPU, else a fake one (FakeTensorMode needs no device)."""
    if HAS_CUDA:
        yield torch.randn(N, device="cuda")
        return
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        yield torch.empty(N, device="cuda")


def _hop_summary(gm: torch.fx.GraphModule) -> str:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    parts = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (torch.ops.higher_order.triton_kernel_wrapper_functional,
                           torch.ops.higher_order.triton_kernel_wrapper_mutation):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            kind = "gluon" if getattr(kernel, "is_gluon", lambda: False)() else "triton"
            clone = node.kwargs.get("tensors_to_clone")
            parts.append(f"{node.target.__name__}({kind} {getattr(kernel, '__name__', kernel)}"
                         + (f", tensors_to_clone={clone}" if clone is not None else "") + ")")
        elif "gluon_probe" in str(node.target):
            parts.append(str(node.target))
    return "; ".join(parts) or "no kernel or op node"


# ------------------------------------------------------------------------------------- steps --
def step_eager(op, family) -> str:
    if not HAS_CUDA:
        return "SKIP no CUDA device (the op's CUDA implementation launches the kernel)"
    x = torch.randn(N, device="cuda")
    torch.testing.assert_close(op(x, ALPHA), x * ALPHA)
    return "matches x * alpha"


def step_make_fx(op, family) -> str:
    from torch.fx.experimental.proxy_tensor import make_fx

    with cuda_input() as x, triton_target():
        gm = make_fx(lambda x: op(x, ALPHA) + 1, tracing_mode="fake" if HAS_CUDA else "real")(x)
    return _hop_summary(gm)


def step_functionalize(op, family) -> str:
    if op is scale_gluon_opaque:
        return "SKIP the opaque route launches no wrap_triton kernel"
    from torch.fx.experimental.proxy_tensor import make_fx

    kernel = KERNELS[family]

    def launcher(x):
        y = torch.empty_like(x)
        torch.library.wrap_triton(kernel)[(triton.cdiv(N, BLOCK),)](x, y, N, ALPHA, BLOCK=BLOCK)
        return y

    with cuda_input() as x, triton_target():
        gm = make_fx(torch.func.functionalize(launcher),
                     tracing_mode="fake" if HAS_CUDA else "real")(x)
    return _hop_summary(gm)


def step_aot_eager(op, family) -> str:
    from torch._dynamo.backends.common import aot_autograd

    graphs: list[torch.fx.GraphModule] = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm  # no compiler: backend="aot_eager" runs the graph as it is

    torch._dynamo.reset()
    fn = torch.compile(lambda x: op(x, ALPHA) + 1, backend=aot_autograd(fw_compiler=capture),
                       fullgraph=True)
    run_error = None
    with cuda_input() as x, triton_target():
        try:
            got = fn(x)
            if HAS_CUDA:
                torch.testing.assert_close(got, x * ALPHA + 1)
        except Exception as exc:  # noqa: BLE001
            run_error = exc
    if not graphs:
        raise run_error if run_error is not None else RuntimeError("no graph captured")
    gm = graphs[0]
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    mutated_inputs = len(outputs) - 1  # the one user output; AOT returns mutated inputs first
    text = f"{_hop_summary(gm)}; inputs the graph reports mutated: {mutated_inputs}"
    if run_error is not None:
        if HAS_CUDA:
            raise run_error
        text += f"; running it on fake CUDA tensors: {_last_line(run_error)}"
    elif HAS_CUDA:
        text += "; matches eager"
    return text


def _analysis(kernel, kwargs) -> list[str]:
    import torch._higher_order_ops.triton_kernel_wrap as tkw

    if hasattr(tkw, "identify_accessed_tensors"):  # torch 2.13
        accesses = tkw.identify_accessed_tensors(kernel, kwargs, {})
        return sorted(dep.name for dep in accesses.read_writes.writes)
    return sorted(tkw.identify_mutated_tensors(kernel, kwargs, {}))  # torch 2.11


def step_mutation_analysis(op, family) -> str:
    if op is scale_gluon_opaque:
        return "SKIP the opaque route is not analysed (custom_op: mutates_args=() is the contract)"
    kernel = KERNELS[family]
    device = "cuda" if HAS_CUDA else "cpu"  # values are never read: torch swaps in empty tensors
    kwargs = dict(x_ptr=torch.empty(N, device=device), y_ptr=torch.empty(N, device=device),
                  n=N, alpha=ALPHA, BLOCK=BLOCK)
    with triton_target():
        written = _analysis(kernel, kwargs)
    return f"written tensors: {written} (expected ['y_ptr'])"


def step_mutation_analysis_gluon_source(op, family) -> str:
    """Not a route: what torch's analysis would say if generate_ttir built a GluonASTSource."""
    if family != "gluon" or op is scale_gluon_opaque:
        return "SKIP only for the wrap_triton gluon route"
    import triton.compiler.compiler as tcc
    from triton.experimental.gluon._runtime import GluonASTSource

    plain = tcc.ASTSource

    def pick(fn, *args, **kwargs):
        return (GluonASTSource if fn.is_gluon() else plain)(fn, *args, **kwargs)

    kwargs = dict(x_ptr=torch.empty(N), y_ptr=torch.empty(N), n=N, alpha=ALPHA, BLOCK=BLOCK)
    tcc.ASTSource = pick  # generate_ttir imports it from this module at each call
    try:
        with triton_target():
            written = _analysis(KERNELS[family], kwargs)
    finally:
        tcc.ASTSource = plain
    return f"written tensors: {written} (an experiment, not a route: torch itself never does this)"


def _closure_source(kernel) -> str:
    from torch._inductor.codegen import wrapper

    return wrapper.user_defined_triton_kernel_transitive_closure_source_code(kernel)


def _compile_module(source: str, name: str, kernel_name: str) -> str:
    """Load ``source`` as a module (as Inductor's async_compile does) and compile the kernel the
    way Inductor's CachingAutotuner does (``ASTSource``) for the target; PTX size or raise."""
    from triton.compiler.compiler import ASTSource

    directory = tempfile.mkdtemp(prefix="gluon_probe_")
    path = os.path.join(directory, f"{name}.py")
    with open(path, "w") as f:
        f.write(source)
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001
        raise RuntimeError(f"loading it: {_last_line(exc)}") from exc
    signature = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "alpha": "fp32",
                 "BLOCK": "constexpr"}
    # A fresh cache: ASTSource's hash does not include the language, so a cached Gluon build of
    # the same source would be found and hide what plain Triton does with it.
    old = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gluon_probe_cache_")
    try:
        source_ = ASTSource(getattr(module, kernel_name), signature, {"BLOCK": BLOCK})
        compiled = triton.compile(source_, target=_target())
    finally:
        if old is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = old
    return f"compiles to PTX ({len(compiled.asm['ptx'])} chars)"


def step_inductor_emission(op, family) -> str:
    """The module Inductor writes for a user kernel (``define_user_defined_triton_kernel``: its
    common Triton imports, ``@triton.jit``, the kernel's closure source), compiled as Inductor
    compiles it. For Gluon, two hand edits show that fixing the emitted text is not enough."""
    if op is scale_gluon_opaque:
        return "SKIP the opaque route is an extern call, no kernel source is emitted"
    from torch._inductor.codegen import wrapper
    from torch._inductor.codegen.triton import TritonKernel

    kernel = KERNELS[family]
    imports = TritonKernel.gen_common_triton_imports()
    body = wrapper.user_defined_triton_kernel_transitive_closure_source_code(kernel)
    variants = {"as emitted (@triton.jit)": imports + "\n@triton.jit\n" + body}
    if family == "gluon":
        gl_import = ("from triton.experimental import gluon\n"
                     "from triton.experimental.gluon import language as gl\n")
        variants["edit 1, gl imported"] = imports + gl_import + "\n@triton.jit\n" + body
        variants["edit 2, gl imported, @gluon.jit"] = imports + gl_import + "\n@gluon.jit\n" + body
    results, emitted_fails = [], False
    for i, (label, source) in enumerate(variants.items()):
        try:
            outcome = _compile_module(source, f"emitted_{family}_{i}", kernel.__name__)
        except Exception as exc:  # noqa: BLE001
            emitted_fails = emitted_fails or i == 0
            outcome = "fails, " + str(exc) if isinstance(exc, RuntimeError) and str(exc).startswith(
                "loading") else "fails, " + _last_line(exc)
        results.append(f"{label}: {outcome}")
    if emitted_fails:
        raise _StepFailed("; ".join(results))
    return "; ".join(results)


def step_inductor(op, family) -> str:
    if not HAS_CUDA:
        return "SKIP no CUDA device (Inductor needs the device's properties to generate code)"
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    x = torch.randn(N, device="cuda")
    got, codes = run_and_get_code(torch.compile(lambda x: op(x, ALPHA) + 1, fullgraph=True), x)
    torch.testing.assert_close(got, x * ALPHA + 1)
    code = "\n".join(codes)
    name = KERNELS[family].__name__
    lines = code.splitlines()
    decorators = sorted({lines[i - 1].strip() for i, line in enumerate(lines)
                         if i and line.lstrip().startswith(f"def {name}")})
    direct = name in code and "torch.ops.gluon_probe" not in code
    calls_op = "torch.ops.gluon_probe" in code
    return (f"matches eager; launches {name} directly: {direct} (emitted under {decorators}); "
            f"calls the op: {calls_op}")


STEPS = [
    ("1 eager", step_eager),
    ("2 make_fx", step_make_fx),
    ("3 functionalize", step_functionalize),
    ("4 aot_eager", step_aot_eager),
    ("5 mutation analysis", step_mutation_analysis),
    ("5b analysis with GluonASTSource", step_mutation_analysis_gluon_source),
    ("6 inductor emission", step_inductor_emission),
    ("7 inductor", step_inductor),
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-stand-in", action="store_true",
                        help="without a GPU, do not stand in a cuda:90 Triton driver")
    parser.add_argument("--steps", nargs="*", help="step numbers to run (default: all)")
    args = parser.parse_args()
    STAND_IN["on"] = not args.no_stand_in
    torch._inductor.config.compile_threads = 1  # errors from kernel compiles in this process

    device = torch.cuda.get_device_name() if HAS_CUDA else "none"
    print(f"torch {torch.__version__}, triton {triton.__version__}, CUDA device: {device}")
    if not HAS_CUDA:
        print("no GPU: steps 1 and 7 skipped; steps 2-6 on fake CUDA tensors"
              + (", Triton target stand-in cuda:90" if STAND_IN["on"] else ", no Triton target"))
    for step, fn in STEPS:
        if args.steps and step.split()[0] not in args.steps:
            continue
        for route, (op, family) in ROUTES.items():
            report(step, route, lambda: fn(op, family))
    return 0


if __name__ == "__main__":
    sys.exit(main())
