"""The registered op: opcheck, gradcheck, vmap, compile, export, errors and a pinned traced graph."""

import expecttest
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import lcconv_compile
from lcconv_compile import fftconv, reference
from inputs import random_args, rel_err
from oracles import direct_causal_conv, direct_fftconv

op = torch.ops.lcconv.fftconv.default
bwd_op = torch.ops.lcconv.fftconv_bwd.default


def op_args(B, H, L, Lk, dtype=torch.float32, k_dtype=None, options=False):
    return random_args(B, H, L, Lk, dtype=dtype, options=options, k_dtype=k_dtype)


# --------------------------------------------------------------------------------- numerics --
@pytest.mark.parametrize("dtype,k_dtype,tol", [
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.float32, 1e-2),
    (torch.bfloat16, torch.bfloat16, 1e-2),
    (torch.float16, torch.float32, 2e-3),
])
def test_dtypes_and_accuracy(dtype, k_dtype, tol):
    args = op_args(2, 3, 77, 40, dtype, k_dtype, options=True)
    y = fftconv(**args)
    assert y.dtype == dtype and y.shape == args["u"].shape and y.is_contiguous()
    assert rel_err(y, direct_fftconv(**args)) < tol


def test_non_contiguous_inputs():
    B, H, L, Lk = 3, 4, 50, 20
    u = torch.randn(B, L, H).transpose(1, 2)  # (B, H, L) view with stride 1 on H
    k = torch.randn(Lk * 2, H)[::2].t()       # (H, Lk) strided view
    D = torch.randn(2 * H)[::2]
    y = fftconv(u, k, D)
    assert y.is_contiguous()
    assert rel_err(y, direct_causal_conv(u, k, D)) < 1e-5


# ---------------------------------------------------------------------------------- opcheck --
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 33, 7), (3, 1, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("options", [False, True])
def test_opcheck_forward(shape, dtype, options):
    args = op_args(*shape, dtype=dtype, options=options)
    if dtype == torch.float64:
        args = {n: v.requires_grad_(True) if isinstance(v, torch.Tensor) and n != "dropout_mask" else v
                for n, v in args.items()}
    torch.library.opcheck(op, (), args)


@pytest.mark.parametrize("options", [False, True])
def test_opcheck_backward(options):
    args = op_args(2, 3, 24, 10, options=options)
    grad_y = torch.randn(2, 3, 24)
    full = dict(D=None, gate_in=None, gate_out=None, gelu=False, dropout_mask=None)
    full.update(args)
    torch.library.opcheck(bwd_op, (grad_y, full.pop("u"), full.pop("k"), full.pop("D"), full.pop("gate_in"),
                                   full.pop("gate_out"), full.pop("gelu"), full.pop("dropout_mask")))


# --------------------------------------------------------------------------------- autograd --
@pytest.mark.parametrize("shape", [(2, 3, 12, 5), (1, 1, 9, 9), (2, 2, 17, 1)])
@pytest.mark.parametrize("options", [False, True])
def test_gradcheck(shape, options):
    args = op_args(*shape, dtype=torch.float64, options=options)
    names = [n for n, v in args.items() if isinstance(v, torch.Tensor) and n != "dropout_mask"]
    inputs = tuple(args[n].requires_grad_(True) for n in names)
    rest = {n: v for n, v in args.items() if n not in names}

    def f(*tensors):
        return fftconv(**dict(zip(names, tensors)), **rest)

    assert torch.autograd.gradcheck(f, inputs)


def test_backward_is_one_op_node():
    args = op_args(2, 3, 16, 8, options=True)
    for n in ("u", "k", "D"):
        args[n].requires_grad_(True)

    def train_step(u, k, D):
        y = fftconv(u, k, D, gate_in=args["gate_in"], gelu=True)
        return torch.autograd.grad(y.sum(), (u, k, D))

    gm = make_fx(train_step)(args["u"], args["k"], args["D"])
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert op in targets and bwd_op in targets
    assert not any(str(t).startswith("aten._fft") for t in targets), targets


# ------------------------------------------------------------------------------------- vmap --
@pytest.mark.parametrize("k_mapped", [False, True])
@pytest.mark.parametrize("options", [False, True])
def test_vmap_equals_loop(k_mapped, options):
    V, B, H, L, Lk = 4, 2, 3, 20, 9
    u = torch.randn(B, V, H, L)  # vmapped along dim 1
    k = torch.randn(V, H, Lk) if k_mapped else torch.randn(H, Lk)
    D = torch.randn(V, H) if k_mapped else torch.randn(H)
    gate = torch.randn(V, B, H, L) if options else None
    mask = torch.rand(B, H) if options else None

    def f(u, k, D, gate):
        return fftconv(u, k, D, gate_out=gate, gelu=options, dropout_mask=mask)

    in_dims = (1, 0 if k_mapped else None, 0 if k_mapped else None, 0 if options else None)
    got = torch.vmap(f, in_dims=in_dims)(u, k, D, gate)
    want = torch.stack([
        f(u[:, i], k[i] if k_mapped else k, D[i] if k_mapped else D, gate[i] if options else None)
        for i in range(V)
    ])
    assert got.shape == want.shape
    torch.testing.assert_close(got, want)


def test_vmap_gradients_flow():
    u = torch.randn(3, 2, 4, 16, requires_grad=True)
    k = torch.randn(3, 4, 8, requires_grad=True)
    torch.vmap(fftconv)(u, k).square().sum().backward()
    u2, k2 = u.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()
    torch.stack([fftconv(u2[i], k2[i]) for i in range(3)]).square().sum().backward()
    torch.testing.assert_close(u.grad, u2.grad)
    torch.testing.assert_close(k.grad, k2.grad)


# ---------------------------------------------------------------------- compile and export --
def test_compile_fullgraph_matches_eager(fresh_compile):

    def block(u, k, D, g):
        return fftconv(u.relu(), k, D, gate_out=g, gelu=True) * 2.0 + u

    compiled = torch.compile(block, fullgraph=True)
    for L in (32, 48):  # a second shape exercises recompilation or dynamic shapes
        args = [torch.randn(2, 4, L), torch.randn(4, L // 2), torch.randn(4), torch.randn(2, 4, L)]
        torch.testing.assert_close(compiled(*args), block(*args))


def test_compile_training_step_matches_eager(fresh_compile):
    u = torch.randn(2, 4, 32)
    k = torch.randn(4, 32, requires_grad=True)

    def loss(u, k):
        return fftconv(u, k, gelu=True).square().mean()

    eager_grad = torch.autograd.grad(loss(u, k), k)[0]
    compiled_grad = torch.autograd.grad(torch.compile(loss, fullgraph=True)(u, k), k)[0]
    torch.testing.assert_close(compiled_grad, eager_grad)


class _ConvModule(torch.nn.Module):
    def __init__(self, H, Lk):
        super().__init__()
        self.k = torch.nn.Parameter(torch.randn(H, Lk))
        self.D = torch.nn.Parameter(torch.randn(H))

    def forward(self, u):
        return fftconv(u, self.k, self.D)


def test_export_round_trip():
    module = _ConvModule(3, 16)
    u = torch.randn(2, 3, 16)
    exported = torch.export.export(module, (u,))
    targets = [n.target for n in exported.graph.nodes if n.op == "call_function"]
    assert op in targets
    u2 = torch.randn(2, 3, 16)
    torch.testing.assert_close(exported.module()(u2), module(u2))


# ----------------------------------------------------------------------------------- errors --
def _good():
    return dict(u=torch.randn(2, 3, 10), k=torch.randn(3, 4), D=torch.randn(3))


_BAD_TENSORS = [  # (change to _good(), exception, message): every message names the argument
    (dict(u=torch.randn(3, 10)), ValueError, r"`u` must have shape \(B, H, L\), got shape \(3, 10\)"),
    (dict(u=torch.randn(2, 3, 0), k=torch.randn(3, 1)), ValueError, r"L = 0"),
    (dict(k=torch.randn(3)), ValueError, r"`k` must have shape \(H, Lk\), got shape \(3,\)"),
    (dict(k=torch.randn(4, 4)), ValueError, r"`k` has 4 channels but `u` has H = 3"),
    (dict(k=torch.randn(3, 11)), ValueError, r"Lk = 11 must satisfy 1 <= Lk <= L = 10"),
    (dict(k=torch.randn(3, 0)), ValueError, r"Lk = 0"),
    (dict(D=torch.randn(4)), ValueError, r"`D` must have shape \(H,\) = \(3,\), got shape \(4,\)"),
    (dict(D=torch.randn(3, 1)), ValueError, r"`D` must have shape \(H,\)"),
    (dict(u=torch.randint(0, 5, (2, 3, 10))), TypeError, r"`u` must be a real floating tensor.*torch.int64"),
    (dict(k=torch.randn(3, 4, dtype=torch.complex64)), TypeError, r"`k` must be a real floating.*complex64"),
    (dict(D=torch.ones(3, dtype=torch.int32)), TypeError, r"`D` must be a real floating.*int32"),
    (dict(u=torch.randn(2, 3, 10).half(), k=torch.randn(3, 4).bfloat16()), TypeError,
     r"`k` must be float32 or u's dtype \(torch.float16\), got .*bfloat16"),
    (dict(k=torch.randn(3, 4, device="meta")), ValueError, r"`k` is on meta but `u` is on cpu"),
    (dict(gate_in=torch.randn(2, 3, 9)), ValueError, r"`gate_in` must have the shape of `u`"),
    (dict(gate_out=torch.randn(2, 3, 10, dtype=torch.complex64)), TypeError, r"`gate_out` must be a real"),
    (dict(dropout_mask=torch.rand(2, 3, 1)), ValueError, r"`dropout_mask` must have shape \(B, H\) = \(2, 3\)"),
]
_BAD_PYTHON_VALUES = [
    (dict(gelu="tanh"), TypeError, r"`gelu` must be True or False .*got str 'tanh'; only the exact \(erf\) GELU"),
    (dict(gelu=1), TypeError, r"`gelu` must be True or False .*got int 1$"),
    (dict(u=[1.0, 2.0]), TypeError, r"`u` must be a torch.Tensor, got list"),
    (dict(k=None), TypeError, r"`k` must be a torch.Tensor, got NoneType"),
    (dict(D=0.5), TypeError, r"`D` must be a torch.Tensor or None, got float 0.5"),
    (dict(gate_in=2), TypeError, r"`gate_in` must be a torch.Tensor or None, got int 2"),
    (dict(dropout_mask=0.1), TypeError, r"`dropout_mask` must be a torch.Tensor or None, got float 0.1"),
]


@pytest.mark.parametrize("change,exc,message", _BAD_TENSORS)
def test_bad_input_gets_clear_error(change, exc, message):
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=message):
        fftconv(**args)


@pytest.mark.parametrize("change,exc,message", _BAD_PYTHON_VALUES)
def test_non_tensor_arguments_get_clear_errors(change, exc, message):
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=message):
        fftconv(**args)


def test_channels_last_layout_gets_a_transpose_hint():
    u_blh, k = torch.randn(2, 10, 3), torch.randn(3, 4)  # (B, L, H), (H, Lk)
    with pytest.raises(ValueError, match=r"`k` has 3 channels but `u` has H = 10 .*must be \(B, H, L\).*"
                       r"if u is \(B, L, H\), pass u.transpose\(1, 2\)"):
        fftconv(u_blh, k)
    # The suggestion is right: transposed, the call works and equals the float64 sum.
    y = fftconv(u_blh.transpose(1, 2), k)
    torch.testing.assert_close(y.double(), direct_causal_conv(u_blh.transpose(1, 2), k), rtol=1e-5, atol=1e-5)
    # No hint when the shapes do not fit that reading.
    with pytest.raises(ValueError, match=r"`k` has 4 channels but `u` has H = 3 \(u: [^;]*; k: [^;]*\)$"):
        fftconv(torch.randn(2, 3, 10), torch.randn(4, 4))


# Under torch.compile and torch.export. Where each type holds (README, "The op"):
#   eager, torch.compile (fullgraph=False, static or dynamic shapes), non-strict torch.export:
#       the original ValueError/TypeError. fftconv checks its arguments in code that Dynamo
#       traces; on a failure it breaks the graph and the rest of the call runs eagerly and raises.
#   torch.compile(fullgraph=True), strict torch.export: there a graph break is an error, Dynamo's
#       torch._dynamo.exc.Unsupported (a RuntimeError), whose message holds the original
#       exception's type and message ("User-inserted graph break. Message: ValueError: ...").
#   torch.ops.lcconv.fftconv called directly under torch.compile: the check fails in the op's fake
#       kernel, which Dynamo reports as TorchRuntimeError (a RuntimeError), message kept.
def _compiled_block(**compile_options):
    # A neighbour after the call, so that the call sits inside a graph rather than being the graph.
    return torch.compile(lambda a: fftconv(**a) * 2, **compile_options)


@pytest.mark.parametrize("change,exc,message", _BAD_TENSORS + _BAD_PYTHON_VALUES)
def test_bad_input_keeps_its_type_under_compile(change, exc, message, fresh_compile):
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=message):
        _compiled_block()(args)


@pytest.mark.parametrize("change,exc,message", [_BAD_TENSORS[i] for i in (0, 3, 4, 8, 14)] + _BAD_PYTHON_VALUES[:1])
def test_bad_input_keeps_its_type_under_compile_with_dynamic_shapes(change, exc, message, fresh_compile):
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=message):
        _compiled_block(dynamic=True)(args)


def test_bad_input_keeps_its_type_after_a_good_call_compiled(fresh_compile):
    # A compiled graph exists (guards on the good shapes): the bad call fails its guards,
    # recompiles, and still raises the original type.
    block = _compiled_block()
    good = _good()
    torch.testing.assert_close(block(good), 2 * direct_causal_conv(good["u"], good["k"], good["D"]).float())
    with pytest.raises(ValueError, match=r"`k` has 4 channels but `u` has H = 3"):
        block(dict(good, k=torch.randn(4, 4)))


def test_a_caught_bad_call_leaves_the_caller_compiled(fresh_compile):
    """An exception raised in traced code that leaves the compiled frame makes Dynamo skip that
    frame for good (every later call of the caller would run eagerly); fftconv breaks the graph
    before raising, so the caller's next calls compile as usual, with the op in their graph."""
    from torch._dynamo.testing import EagerAndRecordGraphs

    backend = EagerAndRecordGraphs()
    block = torch.compile(lambda u, k, D: fftconv(u, k, D) * 2, backend=backend)
    with pytest.raises(ValueError, match=r"Lk = 11 must satisfy"):
        block(torch.randn(2, 3, 10), torch.randn(3, 11), torch.randn(3))
    graphs_before = len(backend.graphs)
    u, k, D = torch.randn(2, 3, 12), torch.randn(3, 5), torch.randn(3)
    torch.testing.assert_close(block(u, k, D), 2 * direct_causal_conv(u, k, D).float())
    new_graphs = backend.graphs[graphs_before:]
    assert any("lcconv.fftconv" in graph.code for graph in new_graphs), [g.code for g in new_graphs]


_FULLGRAPH_CASES = [_BAD_TENSORS[i] for i in (4, 8)] + _BAD_PYTHON_VALUES[:1]


@pytest.mark.parametrize("change,exc,message", _FULLGRAPH_CASES)
def test_bad_input_under_fullgraph_names_the_original_error(change, exc, message, fresh_compile):
    args = _good()
    args.update(change)
    # Dynamo's error for the graph break, whose reason is the original type's name and message.
    with pytest.raises(torch._dynamo.exc.Unsupported, match=f"Message: {exc.__name__}: fftconv: .*{message.rstrip('$')}"):
        _compiled_block(fullgraph=True)(args)


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("change,exc,message", _FULLGRAPH_CASES)
def test_bad_input_under_export(change, exc, message, strict):
    args = _good()
    args.update(change)
    u, k = args.pop("u"), args.pop("k")

    class Block(torch.nn.Module):
        def forward(self, u, k):
            return fftconv(u, k, **args)

    expected = (torch._dynamo.exc.Unsupported, f"Message: {exc.__name__}: fftconv: .*{message.rstrip('$')}") if strict else (exc, message)
    with pytest.raises(expected[0], match=expected[1]):
        torch.export.export(Block(), (u, k), strict=strict)


def test_bad_input_to_the_raw_op_under_compile_is_dynamos_error(fresh_compile):
    with pytest.raises(torch._dynamo.exc.TorchRuntimeError, match=r"Lk = 11 must satisfy"):
        torch.compile(op, fullgraph=True)(torch.randn(2, 3, 10), torch.randn(3, 11))


def _input_guards(fn, args, dynamic):
    """The code of the guards that read fn's arguments (Dynamo's cache entry for fn)."""
    torch._dynamo.reset()
    torch.compile(fn, backend="eager", fullgraph=True, dynamic=dynamic)(*args)
    (entry,) = torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__)
    return sorted(part for part in entry.guard_manager.code_parts if "L[" in part)


@pytest.mark.parametrize("dynamic", [False, True])
def test_compiled_checks_add_no_guard_and_no_graph_break(dynamic, fresh_compile):
    """The checks fftconv runs in traced code (for the original error types above) cost a valid
    call nothing: fullgraph=True proves there is no graph break, and the guards on the inputs are
    those of a direct call of the op (whose fake kernel runs the same checks). Guards on
    lcconv_compile's own functions and constants (identity checks) are not the inputs' and are
    left out."""
    def public(u, k, D, g, m):
        return fftconv(u, k, D, gate_in=g, gate_out=g, gelu=True, dropout_mask=m)

    def raw(u, k, D, g, m):
        return op(u, k, D, g, g, True, m)

    args = op_args(2, 3, 16, 8, options=True)
    inputs = (args["u"], args["k"], args["D"], args["gate_in"], args["dropout_mask"])
    public_guards = _input_guards(public, inputs, dynamic)
    assert public_guards == _input_guards(raw, inputs, dynamic)
    assert any("L['u']" in part for part in public_guards)  # the comparison saw the guards at all


@pytest.mark.parametrize("fast_path", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_an_eager_call_checks_its_arguments_once(fast_path, requires_grad, monkeypatch):
    """Each check runs once per eager call (issue 23: no check repeated on the way to the
    kernel), on the op path (CPU: the reference) and on the fast path (a kernel family called
    directly), with and without autograd; the compiled path's checks are not on this path."""
    from lcconv_compile import kernels, ops

    calls = []
    for name in ("check_fftconv_call", "check_fftconv_args"):
        original = getattr(ops, name)
        monkeypatch.setattr(ops, name, lambda *a, _f=original, _n=name: (calls.append(_n), _f(*a))[1])
    if fast_path:
        family = _RecordingFamily()
        monkeypatch.setattr(kernels, "FAMILIES", (family,))
    args = random_args(2, 3, 24, 9, options=True)
    args["u"].requires_grad_(requires_grad)
    y = fftconv(**args)
    torch.testing.assert_close(y, direct_fftconv(**{n: v.detach() if isinstance(v, torch.Tensor) else v
                                                    for n, v in args.items()}))
    if requires_grad:
        y.sum().backward()
    assert sorted(calls) == ["check_fftconv_args", "check_fftconv_call"]
    if fast_path:
        assert family.calls == (["fwd", "bwd"] if requires_grad else ["fwd"])


# ----------------------------------------------------------------------- pinned graph shape --
class TracedGraphTest(expecttest.TestCase):
    def test_traced_graph_holds_the_op(self):
        def block(u, k, D, g):
            return fftconv(u, k, D, gate_out=g, gelu=True)

        args = (torch.randn(2, 3, 8), torch.randn(3, 8), torch.randn(3), torch.randn(2, 3, 8))
        code = make_fx(block)(*args).code.strip()
        self.assertExpectedInline(code, """\
def forward(self, u_1, k_1, D_1, g_1):
    d_1 = D_1
    fftconv = torch.ops.lcconv.fftconv.default(u_1, k_1, d_1, None, g_1, True);  u_1 = k_1 = d_1 = g_1 = None
    return fftconv""")


def test_package_exports():
    assert lcconv_compile.fftconv is fftconv
    assert "y[b,h,t]" in fftconv.__doc__


# ------------------------------------------------------------------------------ empty inputs --
@pytest.mark.parametrize("shape", [(0, 3, 8, 5), (2, 0, 8, 5), (0, 0, 8, 8), (2, 3, 1, 1)])
def test_empty_batch_or_channels_forward_backward_and_compiled(shape, fresh_compile):
    B, H, L, Lk = shape
    args = op_args(B, H, L, Lk, options=True)
    leaves = {n: v.requires_grad_() for n, v in args.items() if isinstance(v, torch.Tensor)}
    y = fftconv(**args)
    assert y.shape == (B, H, L) and y.is_contiguous()
    grads = torch.autograd.grad(y.sum(), list(leaves.values()), allow_unused=False)
    for (name, leaf), grad in zip(leaves.items(), grads):
        assert grad.shape == leaf.shape, name
    if B * H == 0:  # sums over an empty batch are zero, not missing
        assert torch.equal(grads[1], torch.zeros_like(args["k"]))
    else:  # L = Lk = 1, the smallest length validation allows
        assert rel_err(y, direct_fftconv(**args)) < 1e-5
    compiled = torch.compile(lambda a: fftconv(**a).square().sum(), fullgraph=True)
    loss = compiled(args)
    torch.testing.assert_close(loss, fftconv(**args).square().sum())
    assert all(g.shape == t.shape for g, t in zip(torch.autograd.grad(loss, list(leaves.values())), leaves.values()))
    torch.library.opcheck(op, (), {n: v.detach() if isinstance(v, torch.Tensor) else v for n, v in args.items()})


# ------------------------------------------------------------------- dropout-mask gradient --
def test_dropout_mask_gradient_is_computed():
    args = op_args(2, 3, 12, 5, dtype=torch.float64, options=True)
    names = ["u", "k", "D", "gate_in", "gate_out", "dropout_mask"]
    inputs = tuple(args[n].requires_grad_(True) for n in names)

    def f(*tensors):
        return fftconv(**dict(zip(names, tensors)), gelu=True)

    assert torch.autograd.gradcheck(f, inputs)
    grad_y = torch.randn(2, 3, 12, dtype=torch.float64)
    (dmask,) = torch.autograd.grad(f(*inputs), inputs[-1], grad_y)
    unmasked = direct_fftconv(**{n: t.detach() for n, t in zip(names[:-1], inputs)}, gelu=True)
    torch.testing.assert_close(dmask, (grad_y * unmasked).sum(-1))


def test_dropout_mask_gradient_only_when_asked_for():
    args = op_args(2, 3, 12, 5, options=True)
    args["u"].requires_grad_(True)

    def count_forward_calls(fn):
        gm = make_fx(fn)(args["u"], args["dropout_mask"])
        return [n.target for n in gm.graph.nodes].count(op)

    def step(u, mask):
        return torch.autograd.grad(fftconv(u, args["k"], gelu=True, dropout_mask=mask).sum(), u)

    assert count_forward_calls(step) == 1  # the mask does not require grad: no extra forward
    args["dropout_mask"].requires_grad_(True)

    def step_with_mask(u, mask):
        return torch.autograd.grad(fftconv(u, args["k"], gelu=True, dropout_mask=mask).sum(), (u, mask))

    assert count_forward_calls(step_with_mask) == 2


# --------------------------------------------------------- second order, torch.func, forward AD --
_NAMES = ("u", "k", "D", "gate_in", "gate_out", "dropout_mask")


def _float64_primals(options=True):
    args = op_args(2, 3, 10, 4, dtype=torch.float64, options=True)
    return tuple(args[n] for n in _NAMES)


def _op_fn(*tensors):
    return fftconv(**dict(zip(_NAMES, tensors)), gelu=True)


def _reference_fn(*tensors):
    kw = dict(zip(_NAMES, tensors))
    return reference.fftconv_ref(kw.pop("u"), kw.pop("k"), kw.pop("D"), gelu=True, **kw)


def test_double_backward_gradgradcheck():
    inputs = tuple(t.requires_grad_(True) for t in _float64_primals())
    assert torch.autograd.gradgradcheck(_op_fn, inputs)


def _compiled_training_graphs(step, *args):
    """Targets of the forward and backward graphs AOTAutograd hands to the compiler."""
    from torch._dynamo.backends.common import aot_autograd
    from functorch.compile import make_boxed_func

    graphs = {}

    def recorder(name):
        def compiler(gm, example_inputs):
            graphs[name] = [n.target for n in gm.graph.nodes if n.op == "call_function"]
            return make_boxed_func(gm.forward)
        return compiler

    out = torch.compile(step, backend=aot_autograd(fw_compiler=recorder("fw"), bw_compiler=recorder("bw")))(*args)
    out.backward()
    return graphs


def test_training_graph_keeps_op_and_bwd_op_after_autograd_changes(fresh_compile):
    args = op_args(2, 3, 16, 8, options=True)
    for name in ("u", "k", "D", "gate_in", "gate_out"):
        args[name].requires_grad_(True)
    graphs = _compiled_training_graphs(lambda a: fftconv(**a).square().sum(), args)
    assert op in graphs["fw"] and bwd_op in graphs["bw"], graphs
    assert not any(str(t).startswith("aten._fft") for t in graphs["fw"] + graphs["bw"]), graphs


def test_torch_func_reverse_mode_matches_reference():
    primals = _float64_primals()
    argnums = tuple(range(len(_NAMES)))
    got = torch.func.grad(lambda *t: _op_fn(*t).square().sum(), argnums)(*primals)
    want = torch.func.grad(lambda *t: _reference_fn(*t).square().sum(), argnums)(*primals)
    for name, g, w in zip(_NAMES, got, want):
        torch.testing.assert_close(g, w, msg=name)
    cotangent = torch.randn_like(primals[0])
    got = torch.func.vjp(_op_fn, *primals)[1](cotangent)
    want = torch.func.vjp(_reference_fn, *primals)[1](cotangent)
    for name, g, w in zip(_NAMES, got, want):
        torch.testing.assert_close(g, w, msg=name)
    torch.testing.assert_close(torch.func.jacrev(_op_fn, argnums=1)(*primals),
                               torch.func.jacrev(_reference_fn, argnums=1)(*primals))


def test_forward_mode_matches_reference():
    primals = _float64_primals()
    tangents = tuple(torch.randn_like(p) for p in primals)
    want = torch.func.jvp(_reference_fn, primals, tangents)[1]
    torch.testing.assert_close(torch.func.jvp(_op_fn, primals, tangents)[1], want)
    with torch.autograd.forward_ad.dual_level():
        duals = [torch.autograd.forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)]
        torch.testing.assert_close(torch.autograd.forward_ad.unpack_dual(_op_fn(*duals)).tangent, want)
    # One input at a time: each term of the product rule on its own.
    for i, name in enumerate(_NAMES):
        only = tuple(t if j == i else torch.zeros_like(t) for j, t in enumerate(tangents))
        torch.testing.assert_close(torch.func.jvp(_op_fn, primals, only)[1],
                                   torch.func.jvp(_reference_fn, primals, only)[1], msg=name)
    torch.testing.assert_close(torch.func.jacfwd(_op_fn, argnums=0)(*primals),
                               torch.func.jacfwd(_reference_fn, argnums=0)(*primals))


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # torch: conj_physical under vmap
@pytest.mark.parametrize("argnum", [0, 1, 5])
def test_torch_func_second_order_matches_reference(argnum):
    primals = _float64_primals()

    def loss(fn):
        return lambda x: fn(*primals[:argnum], x, *primals[argnum + 1:]).square().sum()

    want = torch.func.hessian(loss(_reference_fn))(primals[argnum])
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacrev(loss(_op_fn)))(primals[argnum]), want)
    torch.testing.assert_close(torch.func.jacrev(torch.func.jacfwd(loss(_op_fn)))(primals[argnum]), want)
    grad_of_sum = torch.func.grad(lambda x: torch.func.grad(loss(_op_fn))(x).sum())(primals[argnum])
    torch.testing.assert_close(grad_of_sum, want.sum(tuple(range(primals[argnum].dim()))))


@pytest.mark.parametrize("transform,message", [
    (lambda f: torch.func.jacfwd(torch.func.jacfwd(f)), r"forward-mode AD over forward-mode AD"),
    (lambda f: torch.func.jacfwd(torch.func.jacrev(f)), r"forward-mode AD of its backward.*jacrev\(jacrev"),
    (torch.func.hessian, r"forward-mode AD of its backward"),
])
def test_unsupported_second_order_modes_refuse_clearly(transform, message):
    u, k = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match=message):
        transform(lambda k: fftconv(u, k, gelu=True).square().sum())(k)


def test_vmap_of_grad_matches_loop():
    u = torch.randn(4, 2, 3, 12)
    k = torch.randn(3, 6)
    mask = torch.rand(2, 3)

    def loss(u, k):
        return fftconv(u, k, gelu=True, dropout_mask=mask).square().sum()

    got = torch.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(0, None))(u, k)
    want = [torch.func.grad(loss, argnums=(0, 1))(u[i], k) for i in range(4)]
    torch.testing.assert_close(got[0], torch.stack([w[0] for w in want]))
    torch.testing.assert_close(got[1], torch.stack([w[1] for w in want]))


# ------------------------------------------------------------------------------ NaN and Inf --
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("where", ["u", "gate_in", "k", "gate_out", "D"])
def test_nan_semantics_of_the_fft_path(bad, where):
    """Pins the documented semantics: a non-finite value in the convolution's input row (u or
    gate_in, any t) makes that whole (b, h) row NaN, earlier steps too; in k[h] every row of
    channel h; D[h] every output of channel h; gate_out only its own output."""
    B, H, L, Lk, t_bad = 3, 4, 16, 6, 9
    args = op_args(B, H, L, Lk, options=True)
    index = {"u": (1, 2, t_bad), "gate_in": (1, 2, t_bad), "gate_out": (1, 2, t_bad), "k": (2, 3), "D": (2,)}[where]
    args[where][index] = bad
    y = fftconv(**args)
    poisoned = torch.zeros(B, H, L, dtype=torch.bool)
    if where in ("u", "gate_in"):
        poisoned[1, 2, :] = True
    elif where in ("k", "D"):
        poisoned[:, 2, :] = True
    else:
        poisoned[1, 2, t_bad] = True
    assert torch.isnan(y[poisoned]).all() if bad != bad or where != "gate_out" else not torch.isfinite(y[poisoned]).any()
    assert torch.isfinite(y[~poisoned]).all()


# --------------------------------------------------------------------------------------- GPU --
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-3), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)])
@pytest.mark.parametrize("shape", [(2, 64, 1024, 1024), (3, 16, 333, 100), (1, 8, 4096, 4096)])
def test_cuda_matches_float64_reference(dtype, tol, shape):
    args = op_args(*shape, dtype=dtype, k_dtype=torch.float32, options=True)
    want = reference.fftconv_ref(**{n: v.double() if isinstance(v, torch.Tensor) else v for n, v in args.items()})
    cuda_args = {n: v.cuda() if isinstance(v, torch.Tensor) else v for n, v in args.items()}
    y = fftconv(**cuda_args)
    assert y.device.type == "cuda" and y.dtype == dtype
    assert rel_err(y.cpu(), want) < tol


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("options", [False, True])
def test_cuda_opcheck(options):
    args = {n: v.cuda() if isinstance(v, torch.Tensor) else v for n, v in op_args(2, 8, 128, 64, options=options).items()}
    torch.library.opcheck(op, (), args)


@pytest.mark.cuda
@requires_cuda
def test_cuda_compile_matches_eager(fresh_compile):
    u, k, D = torch.randn(2, 16, 512, device="cuda"), torch.randn(16, 512, device="cuda"), torch.randn(16, device="cuda")

    def block(u, k, D):
        return fftconv(u, k, D, gelu=True) * u.sigmoid()

    torch.testing.assert_close(torch.compile(block, fullgraph=True)(u, k, D), block(u, k, D))


# ----------------------------------------------------------------------- eager fast path (CPU) --
class _RecordingFamily:
    """A kernel family for CPU float64 tensors that runs the reference and counts its calls, so
    the eager fast path of ``fftconv`` (kernels without the dispatcher) is exercised on CPU."""

    def __init__(self):
        self.calls = []

    def supports(self, u, k):
        return u.dtype == torch.float64 and u.device.type == "cpu"

    def fftconv_fwd(self, *args):
        self.calls.append("fwd")
        return reference.fftconv_ref(*args).contiguous()

    def fftconv_bwd(self, *args):
        self.calls.append("bwd")
        return reference.fftconv_bwd_ref(*args)


@pytest.fixture
def recording_family(monkeypatch):
    from lcconv_compile import kernels

    family = _RecordingFamily()
    monkeypatch.setattr(kernels, "FAMILIES", (family,))
    return family


def _op_calls(fn):
    """lcconv ops dispatched while ``fn`` runs (a dispatch mode: it also turns the fast path off)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    with Record():
        fn()
    return [name for name in seen if name.startswith("lcconv.")]


@pytest.mark.parametrize("options", [False, True])
def test_eager_fast_path_matches_the_op_with_gradients(recording_family, options, monkeypatch):
    from lcconv_compile import ops

    def no_dispatch(*args, **kwargs):
        raise AssertionError("the fast path dispatched an op")

    monkeypatch.setattr(ops, "fftconv_op", no_dispatch)
    monkeypatch.setattr(ops, "fftconv_bwd_op", no_dispatch)
    args = random_args(2, 3, 40, 17, options=options)
    if options:
        args["dropout_mask"] = args["dropout_mask"].detach()  # a mask with a gradient takes the op
    leaves = {n: v.clone().requires_grad_(True) for n, v in args.items()
              if isinstance(v, torch.Tensor) and n != "dropout_mask"}
    call = dict(args, **leaves)
    y = fftconv(**call)
    assert recording_family.calls == ["fwd"]  # the kernel ran, once
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, list(leaves.values()), dy)
    assert recording_family.calls == ["fwd", "bwd"]
    want_y = direct_fftconv(**args)
    want = reference.fftconv_bwd_ref(dy, *(args.get(n) for n in ("u", "k", "D", "gate_in", "gate_out")),
                                     args.get("gelu", False), args.get("dropout_mask"))
    assert rel_err(y, want_y) < 1e-10
    for name, got in zip(leaves, grads):
        idx = ("u", "k", "D", "gate_in", "gate_out").index(name)
        assert rel_err(got, want[idx]) < 1e-10, name


def test_eager_fast_path_double_backward(recording_family):
    args = random_args(2, 2, 24, 9, options=False)
    u, k, D = (args[n].requires_grad_(True) for n in ("u", "k", "D"))
    torch.autograd.gradcheck(lambda u, k, D: fftconv(u, k, D), (u, k, D))
    torch.autograd.gradgradcheck(lambda u, k, D: fftconv(u, k, D), (u, k, D))
    assert "fwd" in recording_family.calls


def test_eager_fast_path_is_left_where_the_op_must_be_seen(recording_family, fresh_compile):
    args = random_args(2, 2, 24, 9, options=False)
    # A dispatch mode (tracers, FakeTensor, debugging modes) sees the op, not the kernels.
    assert _op_calls(lambda: fftconv(**args)) == ["lcconv.fftconv.default"]
    # Profilers show the op by name.
    with torch.autograd.profiler.profile() as prof:
        fftconv(**args)
    assert any(e.name == "lcconv::fftconv" for e in prof.function_events)
    # torch.func transforms and forward AD go through the op's own Function.
    u = args["u"]
    tangent = torch.randn_like(u)
    _, jvp_out = torch.func.jvp(lambda u: fftconv(u, args["k"], args["D"]), (u,), (tangent,))
    assert rel_err(jvp_out, direct_fftconv(tangent, args["k"], args["D"])) < 1e-10
    # Compiled graphs hold the op.
    from torch._dynamo.testing import EagerAndRecordGraphs

    backend = EagerAndRecordGraphs()
    torch.compile(lambda u, k, D: fftconv(u, k, D), backend=backend, fullgraph=True)(u, args["k"], args["D"])
    assert "lcconv.fftconv" in backend.graphs[0].code


def test_eager_fast_path_refuses_bad_input_like_the_op(recording_family):
    args = random_args(2, 2, 24, 9, options=False)
    with pytest.raises(ValueError, match="k"):
        fftconv(args["u"], torch.randn(3, 9, dtype=torch.float64), args["D"])
    assert recording_family.calls == []
