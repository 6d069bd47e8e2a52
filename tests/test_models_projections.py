"""models/_projections.py (channels-first projections) and the op's output gate kept apart in
differentiated calls (ops._output_gate_apart): the same math as before, in float64."""

import collections

import pytest
import torch
from torch import nn

import lcconv_compile
from lcconv_compile import ops, reference
from lcconv_compile.models import H3, LongConv, _projections
from oracles import direct_fftconv


@pytest.fixture
def channels_first(monkeypatch):
    """The batched products on CPU too (by default they run on CUDA tensors only)."""
    monkeypatch.setattr(_projections, "_CHANNELS_FIRST", True)


@pytest.mark.parametrize("bias", [True, False])
def test_project_in_is_linear_channels_first(channels_first, bias):
    torch.manual_seed(1)
    linear = nn.Linear(6, 5, bias=bias).double()
    x = torch.randn(3, 7, 6, dtype=torch.float64)
    mask = torch.rand(3, 7) < 0.3
    got = _projections.project_in(linear, x, mask)
    want = linear(x).masked_fill(mask.unsqueeze(-1), 0.0).transpose(1, 2)
    assert got.shape == (3, 5, 7) and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("module", ["linear", "glu", "identity"])
def test_project_out_is_the_module_over_channels(channels_first, module):
    torch.manual_seed(2)
    proj = {"linear": nn.Linear(5, 4), "glu": nn.Sequential(nn.Linear(5, 8), nn.GLU(dim=-1)),
            "identity": nn.Identity()}[module].double()
    y = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    got = _projections.project_out(proj, y, torch.float64)
    want = proj(y.transpose(1, 2))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if module != "identity":  # the product's (B, out, L) result, seen transposed
        assert got.transpose(1, 2).is_contiguous()
        dy = torch.randn_like(got)
        (g,) = torch.autograd.grad(got, y, dy)
        (w,) = torch.autograd.grad(want, y, dy)
        assert g.is_contiguous()  # what the op's backward reads
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_key_padding_shape_is_checked(channels_first):
    linear = nn.Linear(4, 4).double()
    with pytest.raises(ValueError, match=r"key_padding_mask must have shape \(B, L\) = \(2, 5\), got \(2, 4\)"):
        _projections.project_in(linear, torch.randn(2, 5, 4, dtype=torch.float64), torch.zeros(2, 4, dtype=torch.bool))


def test_default_is_cuda_only():
    """None (the default): the batched products only where kernels read the layout."""
    assert _projections._CHANNELS_FIRST is None
    linear = nn.Linear(4, 3)
    y = _projections.project_in(linear, torch.randn(2, 5, 4))
    assert not y.is_contiguous()  # CPU: nn.Linear's output, transposed


@pytest.mark.parametrize("mixer,head_dim", [("h3", 1), ("h3", 2), ("longconv", None)])
def test_layers_equal_with_either_layout(monkeypatch, mixer, head_dim):
    """H3 and LongConv give the same outputs and gradients whichever layout the projections use."""
    torch.manual_seed(3)
    layer = (H3(8, head_dim=head_dim) if mixer == "h3" else LongConv(8, 24)).double()
    x = torch.randn(2, 24, 8, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(2, 24) < 0.2
    results = []
    for on in (False, True):
        monkeypatch.setattr(_projections, "_CHANNELS_FIRST", on)
        y = layer(x, key_padding_mask=mask)
        results.append((y, *torch.autograd.grad(y, (x, *layer.parameters()), torch.ones_like(y))))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_h3_compiled_equals_eager_channels_first(channels_first):
    torch.manual_seed(4)
    layer = H3(8).double()
    x = torch.randn(2, 32, 8, dtype=torch.float64, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(eager)
    for g, w in zip(torch.autograd.grad(compiled, (x, *layer.parameters()), dy),
                    torch.autograd.grad(eager, (x, *layer.parameters()), dy)):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ output gate apart --
def _gated_args(gelu=False, mask=False):
    torch.manual_seed(5)
    B, H, L = 2, 3, 40
    u, gi, go = (torch.randn(B, H, L, dtype=torch.float64, requires_grad=True) for _ in range(3))
    k = torch.randn(H, 17, dtype=torch.float64, requires_grad=True)
    D = torch.randn(H, dtype=torch.float64, requires_grad=True)
    m = (torch.rand(B, H, dtype=torch.float64) * 2).requires_grad_(mask) if mask else None
    return u, k, D, gi, go, gelu, m


@pytest.mark.parametrize("entry", ["fftconv", "op"])
@pytest.mark.parametrize("gelu,mask", [(False, False), (True, True)])
def test_output_gate_apart_matches_direct_sum(entry, gelu, mask):
    u, k, D, gi, go, gelu, m = _gated_args(gelu, mask)
    if entry == "fftconv":
        y = lcconv_compile.fftconv(u, k, D, gate_in=gi, gate_out=go, gelu=gelu, dropout_mask=m)
    else:
        y = torch.ops.lcconv.fftconv(u, k, D, gi, go, gelu, m)
    assert type(y.grad_fn).__name__ == "MulBackward0"  # the product, recorded apart
    want = direct_fftconv(u, k, D, gi, go, gelu, m)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    inputs = [t for t in (u, k, D, gi, go, m) if t is not None and t.requires_grad]
    dy = torch.randn_like(y)
    for g, w in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(want, inputs, dy)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_output_gate_fused_when_switched_off(monkeypatch):
    monkeypatch.setattr(ops, "_OUTPUT_GATE_APART", False)
    u, k, D, gi, go, _, _ = _gated_args()
    y = torch.ops.lcconv.fftconv(u, k, D, gi, go)
    assert type(y.grad_fn).__name__ != "MulBackward0"
    want = reference.fftconv_ref(u, k, D, gate_in=gi, gate_out=go)
    dy = torch.randn_like(y)
    for g, w in zip(torch.autograd.grad(y, (u, k, D, gi, go), dy), torch.autograd.grad(want, (u, k, D, gi, go), dy)):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-9)


def test_output_gate_stays_fused_without_derivatives_and_under_torch_func():
    u, k, D, gi, go, _, _ = _gated_args()
    with torch.no_grad():
        calls = _op_calls(lambda: torch.ops.lcconv.fftconv(u, k, D, gi, go))
    assert calls == {"lcconv::fftconv": 1}
    # torch.func keeps the fused call and its Function (jvp included).
    _, tangent = torch.func.jvp(lambda g: torch.ops.lcconv.fftconv(u.detach(), k.detach(), D.detach(), gi.detach(), g),
                                (go.detach(),), (torch.ones_like(go),))
    want = reference.fftconv_ref(u.detach(), k.detach(), D.detach(), gate_in=gi.detach())
    torch.testing.assert_close(tangent, want, rtol=1e-10, atol=1e-10)


def _op_calls(fn) -> dict:
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return dict(collections.Counter(e.name for e in prof.events() if e.name.startswith("lcconv::")))


def test_compiled_training_calls_the_op_once_each_way():
    """Compiled training: one forward call without the output gate (not folded back into it, which
    would run the convolution twice), one backward call, and gradients equal to eager."""
    u, k, D, gi, go, _, _ = _gated_args()

    def f(u, k, D, gi, go):
        return (lcconv_compile.fftconv(u, k, D, gate_in=gi, gate_out=go) * 1.5).sum()

    compiled = torch.compile(f)
    compiled(u, k, D, gi, go).backward()  # compile outside the profiler
    calls = _op_calls(lambda: compiled(u, k, D, gi, go).backward())
    assert calls == {"lcconv::fftconv": 1, "lcconv::fftconv_bwd": 1}
    got = torch.autograd.grad(compiled(u, k, D, gi, go), (u, k, D, gi, go))
    want = torch.autograd.grad(f(u, k, D, gi, go), (u, k, D, gi, go))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_apart_output_rounds_at_most_one_ulp_from_fused():
    """Half inputs: y = round(round(c) * gate_out) against the fused call's round(c * gate_out)."""
    torch.manual_seed(6)
    u, gi, go = (torch.randn(2, 4, 64, dtype=torch.bfloat16) for _ in range(3))
    k, D = torch.randn(4, 64) / 8, torch.randn(4)
    with torch.no_grad():
        fused = torch.ops.lcconv.fftconv(u, k, D, gi, go)
    apart = torch.ops.lcconv.fftconv(u.requires_grad_(), k, D, gi, go)
    # One bf16 unit in the last place of |y| is at most eps * |y| (eps = 2^-7).
    ulp = torch.finfo(torch.bfloat16).eps * fused.float().abs()
    assert ((apart.float() - fused.float()).abs() <= ulp).all()
