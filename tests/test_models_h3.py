"""models/h3.py: the H3 mixer's math, causality, step == forward, gradients, compile, errors."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lcconv_compile import reference
from lcconv_compile.models import H3, h3 as h3_module
from lcconv_compile.models._conv import conv_implementation
from lcconv_compile.models.longconv import init_kernel_weight, smooth_kernel, squash_kernel
from oracles import direct_causal_conv


def make(d_model=8, l_max=40, **kw):
    return H3(d_model, l_max, **kw).double()


def vandermonde_kernel(layer, seqlen):
    """The S4D kernel through the full (H, N/2, L) Vandermonde matrix, in complex arithmetic."""
    dt = layer.log_dt.exp()[:, None]
    A = torch.complex(-layer.log_A_real.exp(), layer.A_imag)
    B, C = torch.view_as_complex(layer.B), torch.view_as_complex(layer.C)
    W = C * (torch.exp(dt * A) - 1) / A * B
    steps = torch.arange(seqlen, dtype=torch.float64)
    return 2 * (W[..., None] * torch.exp(dt[..., None] * A[..., None] * steps)).sum(1).real


class LargestTensor(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_ssm_kernel_is_the_zoh_vandermonde_product():
    layer = make(d_state=8)
    dt = layer.log_dt.exp()[:, None]
    A = torch.complex(-layer.log_A_real.exp(), layer.A_imag)
    B, C = torch.view_as_complex(layer.B), torch.view_as_complex(layer.C)
    A_bar, B_bar = torch.exp(dt * A), (torch.exp(dt * A) - 1) / A * B
    expected = torch.stack([2 * (C * B_bar * A_bar**l).sum(-1).real for l in range(25)], dim=-1)
    torch.testing.assert_close(layer.ssm_kernel(25), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seqlen", [1, 2, 5, 64, 100, 1000])
def test_chunked_kernel_and_its_gradients_equal_the_vandermonde_product(seqlen):
    layer = make(d_state=10, ssm_init="lin")
    with torch.no_grad():
        layer.log_dt.copy_(torch.empty_like(layer.log_dt).uniform_(-7, -1))  # dt from 1e-3 to 0.4
    params = [layer.log_dt, layer.log_A_real, layer.A_imag, layer.B, layer.C]
    weights = torch.randn(8, seqlen, dtype=torch.float64)
    got = layer.ssm_kernel(seqlen)
    want = vandermonde_kernel(layer, seqlen)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    grads_got = torch.autograd.grad((got * weights).sum(), params)
    grads_want = torch.autograd.grad((want * weights).sum(), params)
    for name, g, w in zip(["log_dt", "log_A_real", "A_imag", "B", "C"], grads_got, grads_want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-11, msg=name)


def test_kernel_never_materialises_the_vandermonde_matrix():
    heads, modes, seqlen = 8, 32, 4096
    layer = H3(heads, d_state=2 * modes)
    with LargestTensor() as mode:
        kernel = layer.ssm_kernel(seqlen)
        kernel.sum().backward()
    assert kernel.shape == (heads, seqlen)
    # The (H, N/2, L) matrix would hold 32 x more; the chunks' factors hold H*N*2*sqrt(L).
    assert mode.largest <= heads * seqlen, mode.largest


def test_kernel_stays_float32_under_bfloat16_autocast():
    layer = H3(8, d_state=16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        kernel = layer.ssm_kernel(300)
    assert kernel.dtype == torch.float32
    torch.testing.assert_close(kernel, layer.ssm_kernel(300))


@pytest.mark.parametrize("kernel_type", ["ssm", "longconv"])
@pytest.mark.parametrize("head_dim", [1, 2, 4])
def test_forward_is_the_h3_formula(head_dim, kernel_type):
    """q * (diag_conv(shift(k) (outer) v) + D kv), with direct O(L^2) convolutions."""
    layer = make(head_dim=head_dim, shift_len=3, kernel=kernel_type)
    if kernel_type == "longconv":
        with torch.no_grad():
            layer.kernel_weight.normal_()  # O(1) taps: the long-kernel part must show in the output
    x = torch.randn(2, 21, 8, dtype=torch.float64)
    q, k, v = (proj(x).transpose(1, 2) for proj in (layer.q_proj, layer.k_proj, layer.v_proj))
    k = direct_causal_conv(k, layer.shift_kernel, layer.shift_D)
    kernel = layer.ssm_kernel(21) if kernel_type == "ssm" else layer.kernel_weight[:, :21]
    kernel = squash_kernel(kernel, layer.squash_lambda) if kernel_type == "longconv" else kernel
    heads, hd = layer.n_heads, head_dim
    y = torch.zeros(2, heads, hd, 21, dtype=torch.float64)
    for h in range(heads):
        for i in range(hd):
            for j in range(hd):
                kv = k[:, h * hd + i] * v[:, h * hd + j]
                s = direct_causal_conv(kv[:, None], kernel[h : h + 1], layer.D[h : h + 1])[:, 0]
                y[:, h, j] += q[:, h * hd + i] * s
    expected = layer.out_proj(y.reshape(2, 8, 21).transpose(1, 2))
    torch.testing.assert_close(layer(x), expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_causal(head_dim):
    layer = make(head_dim=head_dim)
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    y = layer(x)
    x2 = x.clone()
    x2[:, 12:] = torch.randn_like(x2[:, 12:])
    diff = layer(x2) - y
    assert diff[:, :12].abs().max() < 1e-12 and diff[:, 12:].abs().max() > 1e-3


@pytest.mark.parametrize("head_dim,shift_len,seqlen", [(1, 4, 37), (2, 5, 23), (4, 3, 16), (1, 8, 5)])
def test_step_equals_forward(head_dim, shift_len, seqlen):
    layer = make(head_dim=head_dim, shift_len=shift_len, d_state=6)
    x = torch.randn(3, seqlen, 8, dtype=torch.float64)
    y = layer(x)
    state = layer.allocate_state(3)
    assert state.ssm.dtype == torch.complex128 and state.shift.shape == (3, 8, shift_len - 1)
    outputs = []
    for t in range(seqlen):
        y_t, state = layer.step(x[:, t], state)
        outputs.append(y_t)
    torch.testing.assert_close(torch.stack(outputs, 1), y, rtol=1e-10, atol=1e-12)


def test_step_state_is_constant_size_and_continues_past_l_max():
    layer = make(l_max=8)
    state = layer.allocate_state(2)
    sizes = {(state.shift.shape, state.ssm.shape)}
    for _ in range(12):  # beyond l_max: the recurrence has no length limit
        _, state = layer.step(torch.randn(2, 8, dtype=torch.float64), state)
        sizes.add((state.shift.shape, state.ssm.shape))
    assert len(sizes) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_and_dtypes(dtype):
    layer = H3(16, 64, head_dim=4, dtype=dtype)
    x = torch.randn(2, 50, 16, dtype=dtype)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == dtype and torch.isfinite(y).all()


def test_float32_matches_float64():
    layer = make(d_model=16, l_max=512)
    x = torch.randn(2, 512, 16, dtype=torch.float64)
    y64 = layer(x)
    y32 = layer.float()(x.float())
    assert ((y32.double() - y64).norm() / y64.norm()).item() < 1e-4


@pytest.mark.parametrize("head_dim,kernel_type", [(1, "ssm"), (2, "ssm"), (2, "longconv")])
def test_gradients_reach_every_parameter(head_dim, kernel_type):
    layer = H3(8, 32, head_dim=head_dim, kernel=kernel_type)
    layer(torch.randn(2, 32, 8)).square().mean().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(
    "options,kernel_param",
    [({"head_dim": 2, "l_max": 32}, "log_dt"), ({"head_dim": 2}, "C"),
     ({"kernel": "longconv", "l_max": 32, "smooth_radius": 1}, "kernel_weight")],
)
def test_compiled_equals_eager(options, kernel_param):
    layer = H3(8, **options)
    x = torch.randn(2, 27, 8, requires_grad=True)
    params = [x, getattr(layer, kernel_param), layer.shift_kernel]
    y_c = torch.compile(layer, fullgraph=True)(x)
    grads_c = torch.autograd.grad(y_c.square().sum(), params)
    y_e = layer(x)
    grads_e = torch.autograd.grad(y_e.square().sum(), params)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    for g_c, g_e in zip(grads_c, grads_e):
        torch.testing.assert_close(g_c, g_e, rtol=1e-4, atol=1e-4)


def test_key_padding_positions_feed_no_one():
    layer = make(head_dim=2)
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    pad = torch.zeros(2, 20, dtype=torch.bool)
    pad[0, :5] = True
    pad[1, 9:11] = True
    x2 = x.clone()
    x2[pad] = torch.randn_like(x2[pad])
    y, y2 = layer(x, key_padding_mask=pad), layer(x2, key_padding_mask=pad)
    torch.testing.assert_close(y[~pad], y2[~pad])
    assert (layer(x) - y)[~pad].abs().max() > 1e-3


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(d_model=10, head_dim=4), "d_model = 10 is not divisible by head_dim = 4"),
        (dict(d_model=8, d_state=5), "d_state must be even .* got 5"),
        (dict(d_model=8, shift_len=0), "shift_len must be a positive integer, got 0"),
        (dict(d_model=8, dt_min=0.1, dt_max=0.01), "dt_min=0.1, dt_max=0.01"),
        (dict(d_model=8, c_scale=0.0), "c_scale must be > 0, got 0.0"),
        (dict(d_model=8, kernel="fir"), "unknown kernel 'fir'; choose one of 'ssm', 'longconv'"),
        (dict(d_model=8, squash_lambda=0.1), "option 'squash_lambda' belongs to the other kernel; kernel='ssm'"),
        (dict(d_model=8, kernel="longconv", d_state=8), "option 'd_state' belongs to the other kernel"),
        (dict(d_model=8, kernel="longconv", smooth_radius=9), "smooth_radius .* l_max = 16, got p = 9"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(ValueError, match=match):
        H3(l_max=16, **kwargs)


def test_c_scale_scales_the_initial_c():
    torch.manual_seed(3)
    plain = H3(8, d_state=16)
    torch.manual_seed(3)
    scaled = H3(8, d_state=16, c_scale=10.0)
    torch.testing.assert_close(scaled.C, 10.0 * plain.C)
    torch.testing.assert_close(scaled.ssm_kernel(50), 10.0 * plain.ssm_kernel(50))


def test_longconv_kernel_needs_l_max_and_has_no_step():
    with pytest.raises(ValueError, match=r"H3\(kernel='longconv'\): l_max is required"):
        H3(8, kernel="longconv")
    with pytest.raises(TypeError, match="unexpected keyword argument 'ssm_lr'"):
        H3(8, ssm_lr=1e-3)
    layer = H3(8, 16, kernel="longconv")
    with pytest.raises(ValueError, match="H3.step: the recurrent form needs kernel='ssm'"):
        layer.step(torch.randn(1, 8), None)
    with pytest.raises(ValueError, match="H3.allocate_state: the recurrent form needs kernel='ssm'"):
        layer.allocate_state(1)


def test_longconv_kernel_is_the_longconv_parametrisation():
    layer = make(kernel="longconv", smooth_radius=2, squash_lambda=0.01, kernel_std=0.1)
    assert layer.kernel_weight.shape == (8, 40)
    expected = squash_kernel(smooth_kernel(layer.kernel_weight, 2), 0.01)[:, :13]
    torch.testing.assert_close(layer.kernel(13), expected)
    assert layer.kernel_init == "geometric"
    # Geometric init, as LongConv: the same normal draw times an envelope that decays along the
    # taps for every head (checked on the envelope itself: comparing draws would be a lottery).
    seed = torch.initial_seed() + 1
    torch.manual_seed(seed)
    weight = torch.empty(8, 40)
    init_kernel_weight(weight, "geometric", 0.1)
    torch.manual_seed(seed)
    envelope = weight / torch.empty(8, 40).normal_(0.0, 0.1)
    torch.testing.assert_close(envelope[:, 0], torch.ones(8))
    assert (envelope[:, 1:] < envelope[:, :-1]).all()


def test_l_max_is_optional_for_the_ssm_kernel():
    unbounded = make(l_max=None, head_dim=2)
    bounded = make(l_max=30, head_dim=2)
    bounded.load_state_dict(unbounded.state_dict())
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    torch.testing.assert_close(unbounded(x), bounded(x))
    assert unbounded(torch.randn(1, 200, 8, dtype=torch.float64)).shape == (1, 200, 8)  # any length
    assert "l_max=None" in repr(unbounded)


@pytest.mark.parametrize("seqlen", [3, 40])
def test_shift_ssm_passes_its_short_kernel(seqlen, monkeypatch):
    layer = make(shift_len=4)
    seen = []

    def recording_conv(u, k, D=None, **options):
        seen.append(k)
        return reference.fftconv_ref(u, k, D, options.get("gate_in"), options.get("gate_out"))

    monkeypatch.setattr(h3_module, "long_conv", recording_conv)
    layer(torch.randn(2, seqlen, 8, dtype=torch.float64))
    assert seen[0].shape == (8, min(4, seqlen))  # the shift taps, never zero-padded to L
    torch.testing.assert_close(seen[0], layer.shift_kernel[:, :min(4, seqlen)])
    assert seen[1].shape == (8, seqlen)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_reference_implementation_switch_gives_the_same_layer(head_dim):
    layer = make(head_dim=head_dim)
    x = torch.randn(2, 33, 8, dtype=torch.float64)
    with conv_implementation("reference"):
        y_reference = layer(x)
    torch.testing.assert_close(y_reference, layer(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="unknown implementation 'torch'; choose one of \\('op', 'reference'\\)"):
        with conv_implementation("torch"):
            pass


def test_bad_inputs():
    layer = H3(8, 16)
    with pytest.raises(ValueError, match="L = 20 exceeds l_max = 16"):
        layer(torch.randn(1, 20, 8))
    with pytest.raises(ValueError, match="x_t of shape \\(B, d_model=8\\), got \\(1, 1, 8\\)"):
        layer.step(torch.randn(1, 1, 8), layer.allocate_state(1))


@pytest.mark.parametrize("head_dim,kernel_type", [(1, "ssm"), (2, "ssm"), (2, "longconv")])
def test_export_with_a_dynamic_length_has_no_hidden_bounds(head_dim, kernel_type):
    # The obvious Dim works: no bound from the 4-tap shift SSM (L >= 4 once) nor from the
    # Vandermonde chunk; H3(kernel="longconv") is bounded by its l_max only.
    from torch.export import Dim, export

    l_max = 80 if kernel_type == "longconv" else None
    layer = H3(16, l_max=l_max, head_dim=head_dim, kernel=kernel_type).double()
    length = Dim("L", max=l_max) if l_max else Dim("L")
    program = export(layer, (torch.randn(2, 16, 16, dtype=torch.float64),), dynamic_shapes={"x": {1: length}})
    exported = program.module()
    for seqlen in (1, 3, 4, 64, 65, 80):
        x = torch.randn(2, seqlen, 16, dtype=torch.float64)
        with conv_implementation("reference"):
            expected = layer(x)
        torch.testing.assert_close(exported(x), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("head_dim", [1, 2])
@pytest.mark.parametrize("l_max", [64, None])
def test_compiled_with_dynamic_lengths_equals_eager(head_dim, l_max):
    # torch.compile(dynamic=True) failed at its first call on torch 2.11: the Vandermonde chunk was
    # 1 << ceil(log2(L) / 2) of a symbolic L (under Dynamo a SymInt looks like an int), a float
    # expression 2.11 could not evaluate. With l_max, one graph serves every length.
    torch.manual_seed(0)
    layer = H3(16, l_max=l_max, head_dim=head_dim, d_state=8)
    torch._dynamo.reset()  # H3.forward's compiled code is per code object: keep other tests' recompiles apart
    try:
        compiled = torch.compile(layer, dynamic=True)
        for seqlen in (48, 20, 64, 5):
            x = torch.randn(2, seqlen, 16)
            torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
    finally:
        torch._dynamo.reset()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_compiled_with_dynamic_lengths_equals_eager_on_cuda():
    # The case: torch.compile(H3(256, l_max=8192).cuda(), dynamic=True) failed at its first
    # call on the H100's torch 2.11.
    torch.manual_seed(0)
    layer = H3(256, l_max=8192).cuda()
    torch._dynamo.reset()
    try:
        compiled = torch.compile(layer, dynamic=True)
        for seqlen in (2048, 1000, 8192):
            x = torch.randn(2, seqlen, 256, device="cuda")
            torch.testing.assert_close(compiled(x), layer(x), rtol=2e-3, atol=2e-3)
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("seqlen,l_max", [(1, 1), (5, 64), (64, 64), (100, None), (4097, None)])
def test_vandermonde_chunk_depends_on_l_max_not_on_the_length(seqlen, l_max):
    chunk = h3_module.vandermonde_chunk(seqlen, l_max)
    bound = l_max if l_max is not None else seqlen
    assert chunk * chunk >= bound and (chunk == 1 or (chunk // 2) ** 2 < bound)  # the power of two >= sqrt
    assert chunk & (chunk - 1) == 0


# ------------------------------------------------------------------------- state passing --
@pytest.mark.parametrize("head_dim", [1, 2])
@pytest.mark.parametrize("seqlen,chunk", [(1, 16), (37, 16), (100, 40), (64, 64), (50, 200), (33, 1)])
def test_prefill_in_chunks_equals_forward_and_reaches_the_step_state(head_dim, seqlen, chunk):
    layer = make(l_max=None, head_dim=head_dim, d_state=6)
    x = torch.randn(3, seqlen, 8, dtype=torch.float64)
    y, state = layer.prefill(x, chunk=chunk)
    torch.testing.assert_close(y, layer(x), rtol=1e-10, atol=1e-12)
    stepped = layer.allocate_state(3)
    for t in range(seqlen):
        _, stepped = layer.step(x[:, t], stepped)
    torch.testing.assert_close(state.shift, stepped.shift, rtol=1e-12, atol=1e-14)  # batched vs per-token matmul
    torch.testing.assert_close(state.ssm, stepped.ssm, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_prompt_prefilled_in_pieces_then_stepped_equals_one_forward(head_dim):
    layer = make(l_max=None, head_dim=head_dim, d_state=6)
    x = torch.randn(2, 90, 8, dtype=torch.float64)
    full = layer(x)
    first, state = layer.prefill(x[:, :50], chunk=16)
    second, state = layer.prefill(x[:, 50:80], state, chunk=7)
    outputs = [first, second]
    for t in range(80, 90):
        y_t, state = layer.step(x[:, t], state)
        outputs.append(y_t.unsqueeze(1))
    torch.testing.assert_close(torch.cat(outputs, 1), full, rtol=1e-10, atol=1e-12)


def test_prefill_uses_no_kernel_longer_than_the_chunk(monkeypatch):
    layer = make(l_max=None, d_state=6)
    lengths = []
    real_kernel = layer.ssm_kernel
    monkeypatch.setattr(layer, "ssm_kernel", lambda seqlen: lengths.append(seqlen) or real_kernel(seqlen))
    layer.prefill(torch.randn(1, 100, 8, dtype=torch.float64), chunk=32)
    assert lengths == [32, 32, 32, 4]


def test_prefill_with_key_padding_equals_forward():
    layer = make(l_max=None, d_state=6)
    x = torch.randn(2, 30, 8, dtype=torch.float64)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 20:] = True
    y, _ = layer.prefill(x, chunk=8, key_padding_mask=mask)
    torch.testing.assert_close(y, layer(x, key_padding_mask=mask), rtol=1e-10, atol=1e-12)


def test_prefill_float32_matches_float64():
    layer = make(l_max=None, head_dim=2)
    x = torch.randn(2, 300, 8)
    y32, _ = layer.float().prefill(x, chunk=64)
    y64 = layer.double()(x.double())
    assert ((y32.double() - y64).norm() / y64.norm()).item() < 1e-5


def test_prefill_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="H3.prefill: the recurrent form needs kernel='ssm'"):
        make(kernel="longconv").prefill(torch.randn(1, 4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk"):
        make(l_max=None).prefill(torch.randn(1, 4, 8, dtype=torch.float64), chunk=0)


@pytest.mark.parametrize("head_dim", [1, 2])
def test_state_chunk_forward_and_its_gradients_equal_the_full_convolution(head_dim):
    full = make(l_max=None, head_dim=head_dim, d_state=6)
    chunked = make(l_max=None, head_dim=head_dim, d_state=6, state_chunk=16)
    chunked.load_state_dict(full.state_dict())
    x = torch.randn(2, 50, 8, dtype=torch.float64)
    grad_y = torch.randn(2, 50, 8, dtype=torch.float64)
    ys, grads = [], []
    for layer in (full, chunked):
        y = layer(x)
        ys.append(y)
        grads.append(torch.autograd.grad(y, list(layer.parameters()), grad_y))
    torch.testing.assert_close(ys[1], ys[0], rtol=1e-10, atol=1e-12)
    for (name, _), g_chunked, g_full in zip(full.named_parameters(), grads[1], grads[0]):
        torch.testing.assert_close(g_chunked, g_full, rtol=1e-9, atol=1e-11, msg=name)


def test_state_chunk_needs_the_ssm_kernel():
    with pytest.raises(ValueError, match="state_chunk needs kernel='ssm'"):
        H3(8, 40, kernel="longconv", state_chunk=16)
    with pytest.raises(ValueError, match="state_chunk"):
        H3(8, state_chunk=0)


def test_state_chunk_compiled_equals_eager():
    layer = H3(8, head_dim=2, d_state=6, state_chunk=16)
    x = torch.randn(2, 40, 8)
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), rtol=1e-4, atol=1e-5)
