"""models/_projections.py: the channels-first projections are nn.Linear's math (float64), and the
layers using them give the same outputs and gradients in either layout."""

import pytest
import torch
from torch import nn

from lcconv_compile.models import H3, LongConv, _projections


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


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_cuda_default_feeds_the_op_contiguous_rows(monkeypatch):
    """On CUDA the projections are channels-first by default, and the layer equals the
    transposed-view form (float32; our kernels run in both)."""
    torch.manual_seed(7)
    layer = H3(64).cuda()
    x = torch.randn(2, 256, 64, device="cuda", requires_grad=True)
    assert _projections.project_in(layer.q_proj, x).is_contiguous()
    y = layer(x)
    grads = torch.autograd.grad(y, (x, *layer.parameters()), torch.ones_like(y))
    monkeypatch.setattr(_projections, "_CHANNELS_FIRST", False)
    y_t = layer(x)
    grads_t = torch.autograd.grad(y_t, (x, *layer.parameters()), torch.ones_like(y_t))
    torch.testing.assert_close(y, y_t, rtol=1e-4, atol=1e-4)
    for g, w in zip(grads, grads_t):
        torch.testing.assert_close(g, w, rtol=1e-3, atol=1e-3)


@needs_cuda
def test_cuda_compiled_lm_training_equals_eager():
    from lcconv_compile.models import LongConvLM

    torch.manual_seed(8)
    model = LongConvLM(128, d_model=64, n_layers=2, mixer="h3").cuda()
    ids = torch.randint(128, (2, 513), device="cuda")

    def loss_fn(ids):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())

    eager = loss_fn(ids)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    compiled = torch.compile(loss_fn)(ids)
    compiled_grads = torch.autograd.grad(compiled, list(model.parameters()))
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
    for g, w in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, w, rtol=5e-2, atol=5e-2 * w.abs().max().item())
