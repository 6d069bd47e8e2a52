"""The CUDA stage (lowering/cuda_lowering.py) and the launch helper (kernels/launch.py).

CPU: the launch helper in Triton's interpreter (plain launches; tracing refuses interpreter
kernels; discovery launches nothing), the bounded constant cache, the stage leaving CPU graphs
and symbolic sizes alone, and, in a subprocess without the interpreter, the stage's trace of a
forward call on fake CUDA tensors (Triton launches as graph nodes, DFT tiles as graph constants).
GPU (marked cuda): our kernels in Inductor's generated code for a forward and a training step,
CUDA graphs (reduce-overhead), compiled == eager at several shapes including the reference
fallback, and AOTInductor packages of H3 and LongConv run in a fresh process that never
imports lcconv_compile. AOTInductor on CPU too: a package of both layers runs in a fresh process
that imports lcconv_compile (the CPU graph calls the Python op).
"""

import itertools
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton
import triton.language as tl

import lcconv_compile  # noqa: F401  (registers the op, installs the passes)
from inputs import random_args, rel_err
from lcconv_compile import fftconv
from lcconv_compile.kernels import blockfft_conv, launch
from lcconv_compile.lowering import cuda_lowering, events

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@triton.jit
def _scale_kernel(x_ptr, y_ptr, n, factor, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * factor, mask=i < n)


# ------------------------------------------------------------------------------ launch helper --
@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs where there is no GPU")
def test_launch_is_a_plain_launch_under_the_interpreter():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    x = torch.randn(37)
    y = torch.full_like(x, math.nan)
    launch.launch(_scale_kernel, (3,), x, y, x.numel(), 2.5, BLOCK=16)
    torch.testing.assert_close(y, x * 2.5)


@pytest.mark.skipif(HAS_CUDA, reason="the interpreter runs where there is no GPU")
def test_tracing_refuses_interpreter_kernels_with_a_clear_error():
    x = torch.randn(8)
    with launch.tracing({}), pytest.raises(RuntimeError, match="only @triton.jit kernels can be traced"):
        launch.launch(_scale_kernel, (1,), x, torch.empty_like(x), 8, 1.0, BLOCK=16)


def test_discovery_launches_nothing_and_records_constants():
    x = torch.randn(8)
    y = torch.full_like(x, math.nan)
    made = []

    def make(device):
        made.append(device)
        return (torch.arange(4.0, device=device),)

    with launch.discovering() as recorded:
        launch.launch(_scale_kernel, (1,), x, y, 8, 1.0, BLOCK=16)
        tiles = launch.cached_constants(("test_tiles", 4), torch.device("cpu"), make)
    assert torch.isnan(y).all(), "a discovery run must not launch"
    assert list(recorded) == [(("test_tiles", 4), torch.device("cpu"))]
    assert recorded[(("test_tiles", 4), torch.device("cpu"))] is tiles
    with launch.tracing(recorded):  # the tracer hands back what it was given
        assert launch.cached_constants(("test_tiles", 4), torch.device("cpu"), make) is tiles
    with launch.tracing({}), pytest.raises(RuntimeError, match="not discovered"):
        launch.cached_constants(("other", 1), torch.device("cpu"), make)


@pytest.mark.cuda
@requires_cuda
def test_direct_launches_reuse_the_compiled_kernel_only_for_the_same_specialization():
    launch._direct.compiled.clear()
    base = torch.randn(4096, device="cuda")
    cases = [
        (base[:1000], 1000, 2.5),  # first: compiled by Triton
        (torch.randn(1000, device="cuda"), 1000, -1.5),  # same specialization: the direct launch
        (base[1:1001], 1000, 0.5),  # u not 16-byte aligned: a specialization of its own
        (base[:1024], 1024, 3.0),  # n divisible by 16: another one
        (base[:1], 1, 7.0),  # n == 1: Triton makes it a constant
        (base[:1000], 1000, 2.0),  # back to the first: direct again
    ]
    for x, n, factor in cases:
        y = torch.full_like(x, math.nan)
        compiled = launch.launch(_scale_kernel, (triton.cdiv(n, 128),), x, y, n, factor, BLOCK=128)
        assert compiled is not None
        torch.testing.assert_close(y, x * factor)
    specializations = {key[2] for key in launch._direct.compiled if key[0] is _scale_kernel}
    assert len(specializations) == 4


def test_direct_launch_keys_never_merge_what_triton_specializes_apart():
    """The direct launches (kernels/launch.py) re-implement Triton's specialization key, so a
    Triton upgrade that specializes on something new must fail here, not reuse a kernel compiled
    for other arguments: two arguments with equal keys of ours must have equal keys in Triton."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    storage = torch.zeros(64)
    values = [storage[:8], storage[1:9], storage[4:12], torch.zeros(8, dtype=torch.bfloat16),
              torch.zeros(8, dtype=torch.int32), torch.zeros(8, dtype=torch.float16)[1:],
              0, 1, 2, 15, 16, 17, 32, -16, -5, 2 ** 31 - 1, 2 ** 31, -(2 ** 31), -(2 ** 31) - 1, 2 ** 32,
              2 ** 63 - 1, 2 ** 63, -(2 ** 63), 2 ** 64 - 16, 0.0, 2.5, -1e300, float("nan"), None, True, False]
    ours = [launch._specialization(v) for v in values]
    theirs = [native_specialize_impl(BaseBackend, v, False, True, True) for v in values]
    for i, j in itertools.combinations(range(len(values)), 2):
        if ours[i] == ours[j]:
            assert theirs[i] == theirs[j], (values[i], values[j], ours[i], theirs[i], theirs[j])


def test_direct_launch_calls_tritons_launcher_as_triton_does():
    """The direct launches call a compiled kernel's private launcher (``CompiledKernel.run``) with
    the arguments ``JITFunction.run`` passes it: grid, stream, function, packed metadata, launch
    metadata, the two launch hooks, then every parameter in signature order. A Triton whose own
    call differs (a new argument, another order) must fail here, not launch with shifted arguments
    on the device."""
    import ast
    import inspect

    from triton.runtime.jit import JITFunction

    tree = ast.parse(textwrap.dedent(inspect.getsource(JITFunction.run)))
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
             and node.func.attr == "run" and isinstance(node.func.value, ast.Name) and node.func.value.id == "kernel"]
    assert len(calls) == 1, "JITFunction.run no longer calls kernel.run(...) once"
    assert [ast.unparse(arg) for arg in calls[0].args] == [
        "grid_0", "grid_1", "grid_2", "stream", "kernel.function", "kernel.packed_metadata", "launch_metadata",
        "knobs.runtime.launch_enter_hook", "knobs.runtime.launch_exit_hook", "*bound_args.values()"]
    assert not calls[0].keywords
    # Ours passes the same positions (launch metadata and hooks None: no hook is installed there).
    ours = ast.parse(textwrap.dedent(inspect.getsource(launch._DirectLaunches.launch)))
    direct = [node for node in ast.walk(ours) if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr == "run"]
    assert [ast.unparse(arg) for arg in direct[0].args] == [
        "grid[0]", "grid_1", "grid_2", "stream", "compiled.function", "compiled.packed_metadata", "None", "None",
        "None", "*args", "*tail"]


def test_constant_cache_reuses_and_is_bounded(monkeypatch):
    monkeypatch.setattr(launch, "_constant_cache", type(launch._constant_cache)())
    calls = []

    def make(device):
        calls.append(1)
        return (torch.zeros(1),)

    first = launch.cached_constants(("bounded", 0), torch.device("cpu"), make)
    assert launch.cached_constants(("bounded", 0), torch.device("cpu"), make) is first and len(calls) == 1
    for i in range(1, launch.MAX_CACHED_CONSTANTS + 1):
        launch.cached_constants(("bounded", i), torch.device("cpu"), make)
    assert len(launch._constant_cache) == launch.MAX_CACHED_CONSTANTS
    assert (("bounded", 0), torch.device("cpu")) not in launch._constant_cache  # oldest evicted


def test_launch_parameters_are_cached_per_shape():
    def launch_params(u):
        return blockfft_conv._launch(u, blockfft_conv.Tuning())

    first = launch_params(torch.empty(4, 3, 100))
    assert launch_params(torch.empty(4, 3, 100)) is first
    assert launch_params(torch.empty(4, 3, 200)) is not first


# ------------------------------------------------------------------------- the stage on CPU --
def _graph_of(fn, *args, tracing_mode="real"):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(fn, tracing_mode=tracing_mode)(*args)


def test_stage_leaves_cpu_graphs_alone():
    args = random_args(2, 3, 40, 9, dtype=torch.float32)
    gm = _graph_of(lambda u, k, D, gi, go, m: torch.ops.lcconv.fftconv(u, k, D, gi, go, True, m),
                   args["u"], args["k"], args["D"], args["gate_in"], args["gate_out"], args["dropout_mask"])
    before = str(gm.graph)
    assert cuda_lowering.lower_cuda_calls(gm.graph) == 0
    assert str(gm.graph) == before


def test_stage_leaves_symbolic_sizes_to_the_op(monkeypatch):
    # This CPU build cannot make fake CUDA tensors with symbolic sizes: a CPU graph stands in.
    monkeypatch.setattr(cuda_lowering, "_on_cuda", lambda node: True)
    gm = _graph_of(lambda u, k: torch.ops.lcconv.fftconv(u, k) * 2, torch.randn(2, 3, 64), torch.randn(3, 64),
                   tracing_mode="symbolic")
    with events.collect() as recorded:
        assert cuda_lowering.lower_cuda_calls(gm.graph) == 0
    assert [e.code for e in recorded] == ["symbolic_shape"]
    assert len(gm.graph.find_nodes(op="call_function", target=torch.ops.lcconv.fftconv.default)) == 1


def test_stage_leaves_calls_of_opaque_families_to_the_op(monkeypatch):
    """A family that compiled code cannot launch (FlashConv v6: Gluon) keeps the op call, with
    an ``opaque_family`` event; the op launches the kernels when it runs."""
    from lcconv_compile.kernels import monarch_conv

    monkeypatch.setattr(cuda_lowering, "_on_cuda", lambda node: True)
    monkeypatch.setattr(cuda_lowering, "select", lambda u, k: monarch_conv)
    gm = _graph_of(lambda u, k: torch.ops.lcconv.fftconv(u, k) * 2, torch.randn(2, 3, 600), torch.randn(3, 600))
    with events.collect() as recorded:
        assert cuda_lowering.lower_cuda_calls(gm.graph) == 0
    assert [e.code for e in recorded] == ["opaque_family"]
    assert "monarch_conv" in recorded[0].reason
    assert len(gm.graph.find_nodes(op="call_function", target=torch.ops.lcconv.fftconv.default)) == 1


def test_opaque_family_says_so_per_direction():
    """v6's forward is Gluon (opaque to compiled code); its backward runs v5's Triton kernels,
    which the stage lowers like any other."""
    from lcconv_compile.kernels import monarch_conv

    assert monarch_conv.compiler_visible("forward") is False
    assert monarch_conv.compiler_visible("backward") is monarch_conv.BACKWARD_IS_V5


_TRACE_ON_FAKE_CUDA = textwrap.dedent("""
    import logging, torch
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    import lcconv_compile
    from lcconv_compile.kernels import blockfft
    from lcconv_compile.lowering import cuda_lowering
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    # No CUDA here: the DFT tiles become CPU graph constants (only the graph is inspected).
    make_constants = blockfft._make_constants
    blockfft._make_constants = lambda *args: make_constants(*args[:-1], torch.device("cpu"))
    with FakeTensorMode():
        u = torch.empty(U_SHAPE, device="cuda", dtype=torch.bfloat16)U_VIEW
        k = torch.empty(K_SHAPE, device="cuda")
        D = torch.empty(4, device="cuda")
        gm = make_fx(lambda u, k, D: CALL + 1)(u, k, D)
    assert cuda_lowering.lower_cuda_calls(gm.graph) == 1
    gm.graph.lint()
    names = []
    for node in gm.graph.nodes:
        if node.target is torch.ops.higher_order.triton_kernel_wrapper_functional:
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            names.append(getattr(kernel, "fn", kernel).__name__)
    print("kernels", names)
    print("op_calls", sum(n.target is torch.ops.lcconv.fftconv.default for n in gm.graph.nodes))
    print("constants", sorted(n.target for n in gm.graph.nodes if n.op == "get_attr"))
    print("copies", sum("copy" in str(n.target) for n in gm.graph.nodes))
""")


# (u's shape, a view of it, k's shape, the call): u as a batch-major view, and the views the
# idiom rewrite of a (B, L, H) spelling passes (u and k permuted, the result permuted back).
FAKE_CUDA_CALLS = {
    "batch_major_view": ((2, 4, 1000), ".transpose(0, 1)", (4, 300),
                         "torch.ops.lcconv.fftconv(u.transpose(0, 1), k, D, gelu=True)"),
    "time_along_dim_1": ((2, 1000, 4), "", (300, 4),
                         "torch.ops.lcconv.fftconv(u.permute(0, 2, 1), k.permute(1, 0), D, gelu=True).permute(0, 2, 1)"),
}


@pytest.mark.parametrize("case", FAKE_CUDA_CALLS)
def test_stage_traces_forward_launches_on_fake_cuda_tensors(case):
    """The stage's trace, on torch of this machine: run without the interpreter, as on a GPU."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    u_shape, u_view, k_shape, call = FAKE_CUDA_CALLS[case]
    source = (_TRACE_ON_FAKE_CUDA.replace("U_SHAPE", repr(u_shape)).replace("U_VIEW", u_view)
              .replace("K_SHAPE", repr(k_shape)).replace("CALL", call))
    result = subprocess.run([sys.executable, "-c", source], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert lines["kernels"] == "['_fftconv_fwd_kernel']"  # v5: k's spectrum on chip, one launch
    assert lines["op_calls"] == "0"
    assert lines["constants"].count("_lcconv_blockfft_") == 6  # the three stages and their inverses
    assert lines["copies"] == "0"  # u's and k's layouts (strided views) are passed as they are


# ------------------------------------------------------------------------------------ GPU --
def _compiled_code(fn, *args):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    result, codes = run_and_get_code(torch.compile(fn), *args)
    return result, "\n".join(codes)


def _cuda_args(B, H, L, Lk, dtype, options, requires_grad=False):
    args = random_args(B, H, L, Lk, dtype=dtype, options=options, device="cuda", k_dtype=torch.float32)
    if requires_grad:
        for name in ("u", "k", "D", "gate_in", "gate_out"):
            if name in args:
                args[name].requires_grad_()
    return args


def _call(args):
    return fftconv(args["u"], args["k"], args.get("D"), gate_in=args.get("gate_in"),
                   gate_out=args.get("gate_out"), gelu=args.get("gelu", False),
                   dropout_mask=args.get("dropout_mask"))


@pytest.mark.cuda
@requires_cuda
def test_generated_forward_launches_our_kernels():
    args = _cuda_args(2, 4, 1024, 1024, torch.bfloat16, options=True)
    got, code = _compiled_code(lambda a: _call(a) * 2, args)
    assert "_fftconv_fwd_kernel" in code  # v5: k's spectrum is formed on chip, one launch
    assert "torch.ops.lcconv" not in code, "the compiled code still calls the Python op"
    assert rel_err(got, _call(args) * 2) < 1e-6  # the same kernels: equal up to rounding order


@pytest.mark.cuda
@requires_cuda
def test_generated_training_step_launches_our_kernels():
    args = _cuda_args(3, 4, 1000, 600, torch.bfloat16, options=False, requires_grad=True)
    leaves = [args["u"], args["k"], args["D"]]
    grad_y = torch.randn_like(args["u"])

    def step(a):
        return torch.autograd.grad(_call(a), leaves, grad_y)

    got, code = _compiled_code(step, args)
    assert "_fftconv_fwd_kernel" in code and "_fftconv_bwd_kernel" in code
    assert "torch.ops.lcconv" not in code
    for g, w in zip(got, step(args)):
        assert rel_err(g, w) < 1e-6


@pytest.mark.cuda
@requires_cuda
def test_reduce_overhead_captures_our_kernels_in_cuda_graphs():
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    args = _cuda_args(2, 4, 1024, 1024, torch.bfloat16, options=True)
    compiled = torch.compile(lambda a: _call(a) + 1, mode="reduce-overhead")
    want = _call(args) + 1
    for _ in range(3):  # warm-up, record, replay
        got = compiled(args)
    assert rel_err(got, want) < 1e-6
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("B,H,L,Lk,dtype,options", [
    (3, 5, 100, 37, torch.float32, True),  # odd sizes, every option (FlashConv v5)
    (3, 5, 300, 7, torch.bfloat16, True),  # a short kernel (shortconv)
    (2, 3, 5000, 2048, torch.float32, False),  # past v5's float32 limit (4096): reference (FlashButterfly takes half dtypes only)
    (1, 2, 20000, 300, torch.bfloat16, True),  # past v5 (16384): reference FFT ops, every option
    (1, 2, 600000, 300, torch.bfloat16, False),  # N = 1M, N1 = 128: past every kernel, reference FFT ops
])
def test_compiled_equals_eager(B, H, L, Lk, dtype, options):
    args = _cuda_args(B, H, L, Lk, dtype, options)
    got, code = _compiled_code(_call, args)
    assert "torch.ops.lcconv" not in code
    want = _call(args)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel_err(got, want) < tol


# ------------------------------------------------------------------------------ AOTInductor --
# A package is built here and loaded and run in a fresh Python process. In the child:
#   import_op "import": first try to load without lcconv_compile (CPU graphs call lcconv::fftconv, a
#       Python custom op, and the loader refuses it unknown), then `import lcconv_compile` and load.
#   import_op "none": lcconv_compile is never imported (CUDA graphs launch our Triton kernels).
_LOAD_AND_RUN = textwrap.dedent("""
    import sys, torch
    package, inputs, output, device, import_op = sys.argv[1:]
    if import_op == "import":
        try:
            torch._inductor.aoti_load_package(package)
            print("without lcconv_compile: loaded", flush=True)
        except RuntimeError as exc:
            print("without lcconv_compile:", str(exc).splitlines()[0], flush=True)
        import lcconv_compile
    model = torch._inductor.aoti_load_package(package)
    x = torch.load(inputs).to(device)
    torch.save(model(x).cpu(), output)
    print("lcconv_compile imported:", "lcconv_compile" in sys.modules, flush=True)
""")


def _package_and_run(model, example, fresh, tmp_path, device, import_op):
    """Export ``model`` at ``example``'s shape, package it with AOTInductor, and run the package
    on ``fresh`` in a new process; (the finished process, its output or None)."""
    exported = torch.export.export(model, (example,))
    package = torch._inductor.aoti_compile_and_package(exported, package_path=str(tmp_path / "model.pt2"))
    torch.save(fresh.cpu(), tmp_path / "x.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # torch only...
    if import_op == "import":
        env["PYTHONPATH"] = REPO  # ...or torch and this tree's lcconv_compile
    result = subprocess.run(
        [sys.executable, "-c", _LOAD_AND_RUN, package, str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), device,
         import_op], capture_output=True, text=True, env=env, timeout=300)
    return result, (torch.load(tmp_path / "y.pt") if result.returncode == 0 else None)


def _aoti_probe_crash(device: str, tmp_path_factory) -> str | None:
    """Whether AOTInductor itself crashes in this environment: a trivial nn.Linear package is
    loaded and run in a fresh process on ``device``. The reason to skip if that process dies of a
    signal, else None (a probe that fails any other way fails the test that asked). Run once per
    device and pytest session: xdist workers share the answer through a file under the session's
    common temporary directory."""
    import filelock  # a dependency of torch
    import json

    worker = os.environ.get("PYTEST_XDIST_WORKER")
    root = tmp_path_factory.getbasetemp().parent if worker else tmp_path_factory.getbasetemp()
    answer = root / f"aoti_probe_{device}.json"
    with filelock.FileLock(str(answer) + ".lock"):
        if answer.exists():
            return json.loads(answer.read_text())["crash"]
        work = root / f"aoti_probe_{device}"
        work.mkdir(exist_ok=True)
        linear = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).to(device).eval()
        x = torch.randn(2, 8, device=device)
        result, out = _package_and_run(linear, x, x, work, device, "none")
        if result.returncode < 0:
            crash = (f"AOTInductor crashes in this environment (torch {torch.__version__}, {device}): a "
                     f"trivial nn.Linear package killed the process loading it with signal {-result.returncode} "
                     f"(scripts/diagnose_aoti.py narrows it down)")
        else:
            assert result.returncode == 0, f"AOTInductor probe failed: {result.stderr[-3000:]}"
            with torch.no_grad():
                torch.testing.assert_close(out, linear(x).cpu())
            crash = None
        answer.write_text(json.dumps({"crash": crash}))
        return crash


def _fail_or_skip_a_crash(result, device, tmp_path_factory):
    """A child that died of a signal: skip if AOTInductor crashes on any package here (the probe),
    else it is ours and the test fails below."""
    if result.returncode < 0:
        crash = _aoti_probe_crash(device, tmp_path_factory)
        if crash is not None:
            pytest.skip(crash)
    assert result.returncode == 0, f"rc {result.returncode}: {result.stderr[-3000:]}"


def test_aoti_package_runs_in_a_fresh_process_on_cpu(tmp_path, tmp_path_factory):
    """An AOTInductor package of an H3 and a LongConv layer, built on CPU, runs in a fresh process
    and equals the eager model on fresh inputs.

    On CPU the compiled graph keeps calling lcconv::fftconv, a Python custom op (the CUDA stage
    replaces it by kernel launches only on CUDA). AOTInductor calls such an op through the
    dispatcher, where only importing lcconv_compile registers it: the loading process must
    `import lcconv_compile` first; without it torch refuses to load the package ("Could not find
    schema for lcconv::fftconv. Custom operators created via torch.library.custom_op cannot be run
    via AOTI without Python environment"), which the child checks before importing it. So a CPU
    package needs Python and this package; running it from C++ alone would need the op
    registered in C++ (TORCH_LIBRARY). One package holds both layers: AOTInductor compiles C++,
    about 30 s per package on 2 cores."""
    from lcconv_compile.models import H3, LongConv

    model = torch.nn.Sequential(H3(16, 64), LongConv(16, 64)).eval()
    example, fresh = torch.randn(2, 64, 16), torch.randn(2, 64, 16)
    with torch.no_grad():
        want = model(fresh)
    result, got = _package_and_run(model, example, fresh, tmp_path, "cpu", "import")
    _fail_or_skip_a_crash(result, "cpu", tmp_path_factory)
    assert "without lcconv_compile: Could not find schema for lcconv::fftconv" in result.stdout, result.stdout
    assert "lcconv_compile imported: True" in result.stdout
    assert rel_err(got, want) < 1e-5


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("layer", ["H3", "LongConv"])
def test_aoti_package_runs_in_a_fresh_process(tmp_path, tmp_path_factory, layer):
    """On CUDA the package launches our kernels itself: the loading process never imports
    lcconv_compile. Skipped only where AOTInductor crashes on a trivial package too."""
    from lcconv_compile.models import H3, LongConv

    model = (H3(64, 512) if layer == "H3" else LongConv(64, 512)).cuda().eval()
    example, fresh = torch.randn(2, 512, 64, device="cuda"), torch.randn(2, 512, 64, device="cuda")
    with torch.no_grad():
        want = model(fresh)
    result, got = _package_and_run(model, example, fresh, tmp_path, "cuda", "none")
    _fail_or_skip_a_crash(result, "cuda", tmp_path_factory)
    assert "lcconv_compile imported: False" in result.stdout
    assert rel_err(got, want.cpu()) < 1e-5
