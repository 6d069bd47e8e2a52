"""lcconv::butterfly_conv and its backward op: numerics vs the reference, opcheck, gradcheck,
vmap, compile, export, and clear errors."""

import math

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import lcconv_compile
from lcconv_compile import butterfly_conv, fftconv, reference
from lcconv_compile.reference import butterfly_exact_factors, butterfly_split, fft_size
from inputs import rel_err
from oracles import direct_causal_conv

op = torch.ops.lcconv.butterfly_conv.default
bwd_op = torch.ops.lcconv.butterfly_conv_bwd.default


def factors_for(L, Lk, dtype=torch.float32, exact=False):
    """The kernels'-split factors for (L, Lk): exact, or random at the exact factors' scale."""
    n1, n2 = butterfly_split(fft_size(L, Lk))
    if exact:
        return butterfly_exact_factors(n1 * n2, dtype)
    return (torch.randn(n2, n1, n1, 2).to(dtype), (torch.randn(n2, n1, n1, 2) / n1).to(dtype))


def args_for(B, H, L, Lk, dtype=torch.float32, factor_dtype=None, options=False, exact=False):
    in_f, out_f = factors_for(L, Lk, factor_dtype or dtype, exact)
    args = dict(u=torch.randn(B, H, L).to(dtype), k=(torch.randn(H, Lk) / math.sqrt(Lk)).to(factor_dtype or dtype),
                in_factor=in_f, out_factor=out_f)
    if options:
        mask = (torch.rand(B, H) > 0.25).to(dtype) / 0.75
        mask[0, 0] = 1 / 0.75
        args.update(D=torch.randn(H).to(dtype), gelu=True, dropout_mask=mask)
    return args


def ordered(args):
    """The op's positional arguments."""
    return (args["u"], args["k"], args["in_factor"], args["out_factor"], args.get("D"),
            args.get("gelu", False), args.get("dropout_mask"))


# --------------------------------------------------------------------------------- numerics --
@pytest.mark.parametrize("dtype,factor_dtype,tol", [
    (torch.float32, torch.float32, 1e-5),
    (torch.bfloat16, torch.float32, 1e-2),
    (torch.float16, torch.float16, 3e-3),
])
def test_eager_equals_float64_reference(dtype, factor_dtype, tol):
    args = args_for(2, 3, 77, 40, dtype, factor_dtype, options=True)
    y = butterfly_conv(**args)
    assert y.dtype == dtype and y.shape == args["u"].shape and y.is_contiguous()
    want = reference.butterfly_conv_ref(**{n: v.double() if isinstance(v, torch.Tensor) else v
                                           for n, v in args.items()})
    assert rel_err(y, want) < tol


@pytest.mark.parametrize("L,Lk", [(1, 1), (45, 30), (64, 64), (130, 5)])
def test_exact_factors_equal_fftconv(L, Lk):
    args = args_for(2, 3, L, Lk, torch.float64, options=True, exact=True)
    plain = {n: v for n, v in args.items() if n not in ("in_factor", "out_factor")}
    torch.testing.assert_close(butterfly_conv(**args), fftconv(**plain), rtol=1e-12, atol=1e-12)


def test_larger_fft_size_serves_shorter_sequences():
    """Factors for N = 128 (l_max 64) take any L with L + Lk - 1 <= 128."""
    factors = butterfly_exact_factors(128, torch.float64)
    u, k = torch.randn(2, 3, 20, dtype=torch.float64), torch.randn(3, 20, dtype=torch.float64)
    torch.testing.assert_close(butterfly_conv(u, k, *factors), direct_causal_conv(u, k))


def test_non_contiguous_inputs():
    u = torch.randn(2, 40, 3).transpose(1, 2)
    k = torch.randn(40, 3).t()
    in_f, out_f = factors_for(40, 40)
    in_f = in_f.permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3)  # same values, other strides
    y = butterfly_conv(u, k, in_f, out_f)
    assert rel_err(y, reference.butterfly_conv_ref(u.double(), k.double(), in_f.double(), out_f.double())) < 1e-5


# ---------------------------------------------------------------------------------- opcheck --
@pytest.mark.parametrize("shape", [(2, 3, 16, 16), (1, 2, 33, 7), (3, 1, 5, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [False, True])
def test_opcheck_forward(shape, dtype, options):
    args = args_for(*shape, dtype=dtype, options=options)
    for name in ("u", "k", "in_factor", "out_factor", "D"):
        if name in args:
            args[name].requires_grad_(True)
    torch.library.opcheck(op, ordered(args))


@pytest.mark.parametrize("options", [False, True])
def test_opcheck_backward(options):
    args = args_for(2, 3, 24, 10, options=options)
    u, k, in_f, out_f, D, gelu, mask = ordered(args)
    torch.library.opcheck(bwd_op, (torch.randn(2, 3, 24), u, k, in_f, out_f, D, gelu, mask))


# --------------------------------------------------------------------------------- autograd --
@pytest.mark.parametrize("shape", [(2, 3, 12, 5), (1, 2, 9, 9), (2, 1, 17, 1)])
@pytest.mark.parametrize("options", [False, True])
def test_gradcheck_float64(shape, options):
    args = args_for(*shape, dtype=torch.float64, options=options)
    names = [n for n in ("u", "k", "in_factor", "out_factor", "D") if n in args]
    rest = {n: v for n, v in args.items() if n not in names}

    def f(*tensors):
        return butterfly_conv(**dict(zip(names, tensors)), **rest)

    assert torch.autograd.gradcheck(f, tuple(args[n].requires_grad_(True) for n in names))


def test_gradients_are_the_backward_reference_and_deterministic():
    args = args_for(3, 2, 30, 17, options=True)
    leaves = [args[n].requires_grad_(True) for n in ("u", "k", "in_factor", "out_factor", "D")]
    grad_y = torch.randn(3, 2, 30)
    got = torch.autograd.grad(butterfly_conv(**args), leaves, grad_y)
    again = torch.autograd.grad(butterfly_conv(**args), leaves, grad_y)
    want = reference.butterfly_conv_bwd_ref(grad_y, *(t.detach() for t in leaves[:4]), leaves[4].detach(),
                                            True, args["dropout_mask"])
    for g, g2, w in zip(got, again, want):
        assert torch.equal(g, g2)  # fixed-order reductions
        torch.testing.assert_close(g, w)


def test_backward_is_one_op_node():
    args = args_for(2, 3, 16, 8, options=True)
    leaves = [args[n].requires_grad_(True) for n in ("u", "k", "in_factor", "out_factor", "D")]

    def train_step(*tensors):
        y = butterfly_conv(*tensors[:4], tensors[4], gelu=True, dropout_mask=args["dropout_mask"])
        return torch.autograd.grad(y.sum(), tensors)

    gm = make_fx(train_step)(*leaves)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert op in targets and bwd_op in targets
    assert not any(str(t).startswith("aten._fft") for t in targets), targets


# ------------------------------------------------------------------------------------- vmap --
@pytest.mark.parametrize("mapped", ["u", "k", "factors"])
def test_vmap_equals_loop(mapped):
    V, B, H, L, Lk = 3, 2, 3, 20, 9
    u = torch.randn(B, V, H, L)  # vmapped along dim 1
    k = torch.randn(V, H, Lk) if mapped != "u" else torch.randn(H, Lk)
    D = torch.randn(V, H) if mapped != "u" else torch.randn(H)
    in_f, out_f = factors_for(L, Lk)
    if mapped == "factors":
        in_f, out_f = torch.stack([in_f, 2 * in_f, -in_f]), torch.stack([out_f, out_f, 0.5 * out_f])
    mask = torch.rand(V, B, H)

    def f(u, k, D, in_f, out_f, mask):
        return butterfly_conv(u, k, in_f, out_f, D, gelu=True, dropout_mask=mask)

    kd = 0 if mapped != "u" else None
    fd = 0 if mapped == "factors" else None
    got = torch.vmap(f, in_dims=(1, kd, kd, fd, fd, 0))(u, k, D, in_f, out_f, mask)
    want = torch.stack([
        f(u[:, i], k[i] if kd == 0 else k, D[i] if kd == 0 else D,
          in_f[i] if fd == 0 else in_f, out_f[i] if fd == 0 else out_f, mask[i])
        for i in range(V)
    ])
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------- compile and export --
def test_compile_fullgraph_training_step_equals_eager():
    torch._dynamo.reset()
    args = args_for(2, 4, 32, 32, options=True)
    leaves = [args[n].requires_grad_(True) for n in ("k", "in_factor", "out_factor", "D")]

    def loss(u, k, in_f, out_f, D):
        y = butterfly_conv(u.relu(), k, in_f, out_f, D, gelu=True, dropout_mask=args["dropout_mask"])
        return (y * 2.0 + u).square().mean()

    eager = loss(args["u"], *leaves)
    compiled = torch.compile(loss, fullgraph=True)(args["u"], *leaves)
    torch.testing.assert_close(compiled, eager)
    for g_c, g_e in zip(torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves)):
        torch.testing.assert_close(g_c, g_e)


class _ButterflyModule(torch.nn.Module):
    def __init__(self, H, L):
        super().__init__()
        self.k = torch.nn.Parameter(torch.randn(H, L))
        self.in_factor, self.out_factor = (torch.nn.Parameter(f) for f in factors_for(L, L))

    def forward(self, u):
        return butterfly_conv(u, self.k, self.in_factor, self.out_factor)


def test_export_round_trip():
    module = _ButterflyModule(3, 16)
    exported = torch.export.export(module, (torch.randn(2, 3, 16),))
    assert op in [n.target for n in exported.graph.nodes if n.op == "call_function"]
    u2 = torch.randn(2, 3, 16)
    torch.testing.assert_close(exported.module()(u2), module(u2))


# ----------------------------------------------------------------------------------- errors --
def _good():
    in_f, out_f = factors_for(10, 4)  # N = 16: split (4, 4)
    return dict(u=torch.randn(2, 3, 10), k=torch.randn(3, 4), in_factor=in_f, out_factor=out_f)


@pytest.mark.parametrize("change,exc,message", [
    (dict(k=torch.randn(4, 4)), ValueError, r"^butterfly_conv: `k` has 4 channels but `u` has H = 3"),
    (dict(u=torch.randn(3, 10)), ValueError, r"^butterfly_conv: `u` must have shape \(B, H, L\)"),
    (dict(D=torch.randn(4)), ValueError, r"^butterfly_conv: `D` must have shape \(H,\) = \(3,\)"),
    (dict(in_factor=torch.randn(4, 4, 4)), ValueError, r"`in_factor` must have shape \(N2, N1, N1, 2\)"),
    (dict(in_factor=torch.randn(4, 4, 2, 2)), ValueError, r"`in_factor` must have shape \(N2, N1, N1, 2\)"),
    (dict(in_factor=torch.randn(2, 4, 4, 2)), ValueError,
     r"FFT size N = N1 \* N2 = 4 \* 2 = 8 must be a power of two >= L \+ Lk - 1 = 13 \(e.g. N = 16\)"),
    (dict(in_factor=torch.randn(3, 4, 4, 2)), ValueError, r"N = N1 \* N2 = 4 \* 3 = 12 must be a power of two"),
    (dict(in_factor=torch.randn(8, 2, 2, 2)), ValueError,
     r"for N = 16 the factors must have the kernels' split \(N2, N1, N1, 2\) = \(4, 4, 4, 2\)"),
    (dict(out_factor=torch.randn(4, 4, 4, 2)[:2]), ValueError, r"`out_factor` must have the shape of `in_factor`"),
    (dict(in_factor=torch.randn(4, 4, 4, 2, dtype=torch.float64)), TypeError,
     r"`in_factor` must be real pairs in float32 or u's dtype \(torch.float32\), got .*float64"),
    (dict(out_factor=torch.randn(4, 4, 4, 2).half()), TypeError, r"`out_factor` must be real pairs"),
    (dict(out_factor=torch.randn(4, 4, 4, 2, device="meta")), ValueError, r"`out_factor` is on meta but `u` is on cpu"),
])
def test_bad_input_gets_clear_error(change, exc, message):
    args = _good()
    args.update(change)
    with pytest.raises(exc, match=message):
        butterfly_conv(**args)


def test_bad_input_keeps_its_type_under_compile():
    """As fftconv (tests/test_ops.py): the original ValueError under torch.compile (the call
    breaks the graph, then raises eagerly), Dynamo's Unsupported naming it under fullgraph=True,
    and the caller stays compiled for its next good call."""
    torch._dynamo.reset()
    args = _good()
    bad = dict(args, in_factor=torch.randn(8, 2, 2, 2))
    block = torch.compile(lambda a: butterfly_conv(**a) * 2)
    with pytest.raises(ValueError, match=r"kernels' split"):
        block(bad)
    torch.testing.assert_close(block(args), 2 * butterfly_conv(**args))
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported, match=r"Message: ValueError: .*kernels' split"):
        torch.compile(lambda a: butterfly_conv(**a) * 2, fullgraph=True)(bad)
    torch._dynamo.reset()


def test_package_exports():
    assert lcconv_compile.butterfly_conv is butterfly_conv
    assert "butterfly_conv" in lcconv_compile.__all__
