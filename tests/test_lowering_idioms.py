"""Idiom rewrite (lowering/patterns_idiom.py, guards.py): hand-written causal FFT convolutions
become ``lcconv::fftconv`` in inference graphs and ``fftconv`` + ``fftconv_bwd`` in training
graphs; anything that is not exactly that function is left alone, with the guard's reason.

Each idiom below is written the way people write it, with its own choice of FFT size. Every
idiom is compiled once per mode (module-level cache) and the compiled function is reused on
fresh random inputs.
"""

from __future__ import annotations

import functools

import expecttest

import pytest
import torch
import torch.nn.functional as F

import lcconv_compile
from inputs import rel_err
from lowering_helpers import compile_once, torch_211_r2c_strides_bug
from oracles import direct_causal_conv

B, H, L, LK = 2, 4, 24, 20


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


# ----------------------------------------------------------------------------------- idioms --
# Each spelling takes the time dim t: -1 for (B, H, L) signals and (H, Lk) kernels (torch.fft's
# default dim, so `dim=-1` is what `rfft(u, n=n)` traces to), -2 for (B, L, H) and (Lk, H).
def crop(y, seqlen, t):
    return y[..., :seqlen] if t == -1 else y[:, :seqlen]


def pad(x, n, t):
    return F.pad(x, (0, n - x.shape[t])) if t == -1 else F.pad(x, (0, 0, 0, n - x.shape[t]))


def textbook(u, k, t=-1):
    seqlen = u.shape[t]
    n = next_pow2(seqlen + k.shape[t] - 1)
    return crop(torch.fft.irfft(torch.fft.rfft(u, n=n, dim=t) * torch.fft.rfft(k, n=n, dim=t), n=n, dim=t), seqlen, t)


def kernel_first_exact_size(u, k, t=-1):
    seqlen = u.shape[t]
    n = seqlen + k.shape[t] - 1  # the smallest non-circular size, odd here
    return crop(torch.fft.irfft(torch.fft.rfft(k, n=n, dim=t) * torch.fft.rfft(u, n=n, dim=t), n=n, dim=t), seqlen, t)


def explicit_pad(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    u_f = torch.fft.rfft(pad(u, n, t), dim=t)
    k_f = torch.fft.rfft(pad(k, n, t), dim=t)
    return crop(torch.fft.irfft(u_f * k_f, n=n, dim=t), seqlen, t)


def unsqueezed_kernel(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    return crop(torch.fft.irfft(torch.fft.rfft(u, n=n, dim=t) * torch.fft.rfft(k.unsqueeze(0), n=n, dim=t), n=n, dim=t),
                seqlen, t)


def h3_style(u, k, t=-1):
    # H3 / Hyena / FlashFFTConv reference code.
    seqlen = u.shape[t]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size, dim=t) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size, dim=t)
    return crop(torch.fft.irfft(u_f * k_f, n=fft_size, dim=t, norm="forward"), seqlen, t)


def forward_norm_on_signal(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    u_f = torch.fft.rfft(u, n=n, dim=t, norm="forward")
    return crop(torch.fft.irfft(u_f * torch.fft.rfft(k, n=n, dim=t), n=n, dim=t, norm="forward"), seqlen, t)


def scaled_signal(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    u_f = torch.fft.rfft(u, n=n, dim=t) / n
    return crop(torch.fft.irfft(u_f * torch.fft.rfft(k, n=n, dim=t), n=n, dim=t, norm="forward"), seqlen, t)


def scaled_product(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    y_f = torch.fft.rfft(u, n=n, dim=t) * torch.fft.rfft(k, n=n, dim=t) / n
    return crop(torch.fft.irfft(y_f, n=n, dim=t, norm="forward"), seqlen, t)


def ortho(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    u_f = torch.fft.rfft(u, n=n, dim=t, norm="ortho")
    k_f = torch.fft.rfft(k, n=n, dim=t, norm="ortho")
    return crop(torch.fft.irfft(u_f * k_f, n=n, dim=t, norm="ortho"), seqlen, t) * n**0.5


def complex_fft(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    return crop(torch.fft.ifft(torch.fft.fft(u, n=n, dim=t) * torch.fft.fft(k, n=n, dim=t), dim=t), seqlen, t).real


def complex_fft_real_first(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    return crop(torch.fft.ifft(torch.fft.fft(u, n=n, dim=t) * torch.fft.fft(k, n=n, dim=t), dim=t).real, seqlen, t)


def reciprocal_product(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen + 3  # not a power of two: 1 / n is inexact in floating point
    y_f = torch.fft.rfft(u, n=n, dim=t) * torch.fft.rfft(k, n=n, dim=t) * (1 / n)
    return crop(torch.fft.irfft(y_f, n=n, dim=t, norm="forward"), seqlen, t)


def reciprocal_kernel(u, k, t=-1):
    # H3 with `* (1 / n)` for its `/ n`: a multiply by a number on the kernel's spectrum.
    seqlen = u.shape[t]
    n = 2 * seqlen + 3
    k_f = torch.fft.rfft(k, n=n, dim=t) * (1 / n)
    return crop(torch.fft.irfft(torch.fft.rfft(u, n=n, dim=t) * k_f, n=n, dim=t, norm="forward"), seqlen, t)


def reciprocal_signal(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    u_f = torch.fft.rfft(u, n=n, dim=t) * (1 / n)
    return crop(torch.fft.irfft(u_f * torch.fft.rfft(k, n=n, dim=t), n=n, dim=t, norm="forward"), seqlen, t)


def crop_from_the_end(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    y = torch.fft.irfft(torch.fft.rfft(u, n=n, dim=t) * torch.fft.rfft(k, n=n, dim=t), n=n, dim=t)
    return y[..., -n:-n + seqlen] if t == -1 else y[:, -n:-n + seqlen]


def complex_fft_padded(u, k, t=-1):
    # FlashFFTConv's README style: explicit padding, complex FFTs along dim=-1.
    seqlen = u.shape[t]
    n = 2 * seqlen
    u_f = torch.fft.fft(pad(u, n, t), dim=t)
    k_f = torch.fft.fft(pad(k, n, t), dim=t)
    return crop(torch.fft.ifft(u_f * k_f, dim=t), seqlen, t).real


def complex_fft_padded_real_first(u, k, t=-1):
    seqlen = u.shape[t]
    n = 2 * seqlen
    u_f = torch.fft.fft(pad(u, n, t), dim=t)
    k_f = torch.fft.fft(pad(k, n, t), dim=t)
    return crop(torch.fft.ifft(u_f * k_f, dim=t).real, seqlen, t)


# (idiom, counter family): the counter is "<family>_inference" or "<family>_training".
IDIOMS = {
    "textbook": (textbook, "rfft_conv"),
    "kernel_first_exact_size": (kernel_first_exact_size, "rfft_conv_kernel_first"),
    "explicit_pad": (explicit_pad, "rfft_conv_padded"),
    "unsqueezed_kernel": (unsqueezed_kernel, "rfft_conv_unsqueezed_kernel"),
    "h3_style": (h3_style, "rfft_conv_scaled_kernel"),
    "forward_norm_on_signal": (forward_norm_on_signal, "rfft_conv"),
    "scaled_signal": (scaled_signal, "rfft_conv_scaled_signal"),
    "scaled_product": (scaled_product, "rfft_conv_scaled_product"),
    "ortho": (ortho, "rfft_conv_scaled_output"),
    "complex_fft": (complex_fft, "fft_conv"),
    "complex_fft_real_first": (complex_fft_real_first, "fft_conv_real_first"),
    # A scale by a number matches `* c` and `/ c` alike: these count as the `/ n` spellings.
    "reciprocal_product": (reciprocal_product, "rfft_conv_scaled_product"),
    "reciprocal_kernel": (reciprocal_kernel, "rfft_conv_scaled_kernel"),
    "reciprocal_signal": (reciprocal_signal, "rfft_conv_scaled_signal"),
    "crop_from_the_end": (crop_from_the_end, "rfft_conv"),
    "complex_fft_padded": (complex_fft_padded, "fft_conv_padded"),
    "complex_fft_padded_real_first": (complex_fft_padded_real_first, "fft_conv_padded_real_first"),
}
# The forward pattern is symmetric in its two spectra, so for inference a kernel-first product
# is matched by the plain pattern (the replacement picks the roles from the shapes).
INFERENCE_FAMILY = {"kernel_first_exact_size": "rfft_conv"}
# Layouts: "BHL" is u (B, H, L) with k (H, Lk); "BLH" is u (B, L, H) with k (Lk, H), time dim 1.
TIME_DIM = {"BHL": -1, "BLH": -2}


def fresh_inputs(train: bool, u_grad: bool = True, layout: str = "BHL"):
    u = torch.randn(B, H, L, requires_grad=train and u_grad)
    k = (torch.randn(H, LK) / LK**0.5).requires_grad_(train)
    if layout == "BLH":
        u = torch.randn(B, L, H, requires_grad=train and u_grad)
        k = (torch.randn(LK, H) / LK**0.5).requires_grad_(train)
    return u, k


def in_layout(name: str, layout: str):
    fn = IDIOMS[name][0]
    if layout == "BHL":
        return fn
    t = TIME_DIM[layout]

    def spelled_in_layout(u, k):  # a plain function: compile_once compiles a fresh copy of it
        return fn(u, k, t)

    return spelled_in_layout


def direct_conv_in_layout(u, k, layout):
    if layout == "BHL":
        return direct_causal_conv(u, k)
    return direct_causal_conv(u.transpose(1, 2), k.t()).transpose(1, 2)


@functools.cache
def compiled(name: str, train: bool, layout: str = "BHL"):
    return compile_once(in_layout(name, layout), *fresh_inputs(train, layout=layout), train=train)


# --------------------------------------------------------------------------- pinned graphs --
class IdiomGraphTest(expecttest.TestCase):
    def same_graphs_for_every_idiom(self, train: bool, layout: str) -> list[str]:
        """The post-grad graphs of every idiom, asserted equal; returns the textbook one's."""
        graphs = {name: compiled(name, train, layout).graphs for name in IDIOMS}
        for name, recorded in graphs.items():
            self.assertEqual(recorded, graphs["textbook"], name)
        return graphs["textbook"]

    def test_every_idiom_becomes_one_op_call_for_inference(self):
        self.assertExpectedInline("\n\n".join(self.same_graphs_for_every_idiom(False, "BHL")), """\
inputs in0: f32[2, 4, 24], in1: f32[4, 20]
v0 = lcconv.fftconv(in0, in1)
return (v0,)""")

    def test_every_idiom_calls_op_and_backward_op_when_training(self):
        forward, backward = self.same_graphs_for_every_idiom(True, "BHL")
        self.assertExpectedInline(forward, """\
inputs in0: f32[2, 4, 24], in1: f32[4, 20]
v0 = lcconv.fftconv(in0, in1)
return (v0, in0, in1)""")
        self.assertExpectedInline(backward, """\
inputs in0: f32[2, 4, 24], in1: f32[4, 20], in2: f32[2, 4, 24]
v0 = lcconv.fftconv_bwd(in2, in0, in1, None, None, None, False, None)
v1 = getitem(v0, 0)
v2 = getitem(v0, 1)
return (v1, v2)""")

    def test_time_along_dim_1_calls_the_op_on_transposed_views(self):
        self.assertExpectedInline("\n\n".join(self.same_graphs_for_every_idiom(False, "BLH")), """\
inputs in0: f32[2, 24, 4], in1: f32[20, 4]
v0 = aten.permute(in0, [0, 2, 1])
v1 = aten.permute(in1, [1, 0])
v2 = lcconv.fftconv(v0, v1)
v3 = aten.permute(v2, [0, 2, 1])
return (v3,)""")
        self.assertExpectedInline("\n\n".join(self.same_graphs_for_every_idiom(True, "BLH")), """\
inputs in0: f32[2, 24, 4], in1: f32[20, 4]
v0 = aten.permute(in0, [0, 2, 1])
v1 = aten.permute(in1, [1, 0])
v2 = lcconv.fftconv(v0, v1)
v3 = aten.permute(v2, [0, 2, 1])
return (v3, v0, v1)

inputs in0: f32[2, 4, 24], in1: f32[4, 20], in2: f32[2, 24, 4]
v0 = aten.permute(in2, [0, 2, 1])
v1 = lcconv.fftconv_bwd(v0, in0, in1, None, None, None, False, None)
v2 = getitem(v1, 0)
v3 = getitem(v1, 1)
v4 = aten.permute(v3, [1, 0])
v5 = aten.permute(v2, [0, 2, 1])
return (v5, v4)""")

    def test_kernel_longer_than_signal_is_truncated(self):
        def long_kernel(u, k):
            seqlen = u.shape[-1]
            n = next_pow2(seqlen + k.shape[-1] - 1)
            return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]

        u, k = torch.randn(B, H, L), torch.randn(H, L + 9)
        result = compile_once(long_kernel, u, k)
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: f32[2, 4, 24], in1: f32[4, 33]
v0 = aten.slice.Tensor(in1, 1, 0, 24)
v1 = lcconv.fftconv(in0, v0)
return (v1,)""")
        assert rel_err(result.fn(u, k), direct_causal_conv(u, k[:, :L])) < 1e-5

    def test_half_precision_casts_fold_into_the_op(self):
        def upcast_conv(u, k):
            seqlen = u.shape[-1]
            n = 2 * seqlen
            y = torch.fft.irfft(torch.fft.rfft(u.float(), n=n) * torch.fft.rfft(k.float(), n=n), n=n)
            return y[..., :seqlen].to(u.dtype)

        u, k = torch.randn(B, H, L, dtype=torch.bfloat16), torch.randn(H, LK, dtype=torch.bfloat16)
        result = compile_once(upcast_conv, u, k)
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: bf16[2, 4, 24], in1: bf16[4, 20]
v0 = lcconv.fftconv(in0, in1)
return (v0,)""")
        assert result.rewrites == {"rfft_conv_inference": 1, "fold_signal_cast": 1, "fold_kernel_cast": 1}
        y = result.fn(u, k)
        assert y.dtype == torch.bfloat16
        assert rel_err(y, direct_causal_conv(u, k)) < 1e-2


# ---------------------------------------------------------------------- counters, numerics --
@pytest.mark.parametrize("layout", TIME_DIM)
@pytest.mark.parametrize("name", IDIOMS)
def test_inference_counter_and_output(name, layout):
    result = compiled(name, False, layout)
    family = INFERENCE_FAMILY.get(name, IDIOMS[name][1])
    assert result.rewrites == {f"{family}_inference": 1}
    assert result.rejections == {}
    u, k = fresh_inputs(train=False, layout=layout)
    assert rel_err(result.fn(u, k), direct_conv_in_layout(u, k, layout)) < 1e-5


@pytest.mark.parametrize("layout", TIME_DIM)
@pytest.mark.parametrize("name", IDIOMS)
def test_training_counter_and_gradients(name, layout):
    result = compiled(name, True, layout)
    assert result.rewrites == {f"{IDIOMS[name][1]}_training": 1}
    assert "lcconv.fftconv_bwd(" in result.graphs[1] and "_fft_" not in result.graphs[1]
    u, k = fresh_inputs(train=True, layout=layout)
    y = result.fn(u, k)
    grad_y = torch.randn(y.shape)
    du, dk = torch.autograd.grad(y, (u, k), grad_y)
    # The oracle: the same idiom in float64, differentiated eagerly.
    u64, k64 = (t.detach().double().requires_grad_() for t in (u, k))
    du64, dk64 = torch.autograd.grad(in_layout(name, layout)(u64, k64), (u64, k64), grad_y.double())
    assert rel_err(du, du64) < 1e-5 and rel_err(dk, dk64) < 1e-5


def test_training_with_only_the_kernel_learned():
    u, k = fresh_inputs(train=True, u_grad=False)
    result = compile_once(h3_style, u, k, train=True)
    assert result.rewrites == {"rfft_conv_scaled_kernel_training": 1}
    assert "lcconv.fftconv_bwd" in result.graphs[1] and "_fft_" not in result.graphs[1]
    u, k = fresh_inputs(train=True, u_grad=False)
    (dk,) = torch.autograd.grad(result.fn(u, k).square().sum(), k)
    k64 = k.detach().double().requires_grad_()
    (dk64,) = torch.autograd.grad(h3_style(u.double(), k64).square().sum(), k64)
    assert rel_err(dk, dk64) < 1e-5


def h3_unsqueezed_kernel(u, k):
    fft_size = 2 * u.shape[-1]
    k_f = torch.fft.rfft(k.unsqueeze(0), n=fft_size) / fft_size
    return torch.fft.irfft(torch.fft.rfft(u, n=fft_size) * k_f, n=fft_size, norm="forward")[..., :u.shape[-1]]


# H3's spelling with a kernel that arrives as (1, H, Lk): unsqueezed in the function, or passed
# in so (an SSM kernel with one channel). name: (fn, kernel shape, training family for B > 1)
UNIT_BATCH_KERNEL = {
    "unsqueezed_in_the_function": (h3_unsqueezed_kernel, (H, LK), "rfft_conv_unsqueezed_scaled_kernel"),
    "passed_as_1_h_lk": (h3_style, (1, H, LK), "rfft_conv_scaled_unit_kernel"),
}


@pytest.mark.parametrize("mode", ["inference", "training", "training_kernel_only"])
@pytest.mark.parametrize("batch", [B, 1])
@pytest.mark.parametrize("name", UNIT_BATCH_KERNEL)
def test_unit_batch_kernel_is_rewritten(name, batch, mode, fresh_compile):
    fn, k_shape, family = UNIT_BATCH_KERNEL[name]
    train = mode != "inference"

    def inputs():
        u = torch.randn(batch, H, L, requires_grad=mode == "training")
        return u, (torch.randn(k_shape) / LK**0.5).requires_grad_(train)

    result = compile_once(fn, *inputs(), train=train)
    if train:
        family = family if batch > 1 else f"{family}_batch_1"
    else:
        family = "rfft_conv_scaled_kernel"
    assert result.rewrites == {f"{family}_{'training' if train else 'inference'}": 1} and result.rejections == {}
    assert "_fft_" not in "".join(result.graphs)
    u, k = inputs()
    y = result.fn(u, k)
    assert rel_err(y, direct_causal_conv(u.detach(), k.detach().reshape(H, LK))) < 1e-5
    if train:
        leaves = [t for t in (u, k) if t.requires_grad]
        grad_y = torch.randn(y.shape)
        got = torch.autograd.grad(y, leaves, grad_y)
        leaves64 = [t.detach().double().requires_grad_(t.requires_grad) for t in (u, k)]
        want = torch.autograd.grad(fn(*leaves64), [t for t in leaves64 if t.requires_grad], grad_y.double())
        assert all(rel_err(g, w) < 1e-5 for g, w in zip(got, want))


class TrainedModule(torch.nn.Module):
    """A long-convolution layer written with the idiom, as a training step would use it."""

    def __init__(self):
        super().__init__()
        self.kernel = torch.nn.Parameter(torch.randn(H, L) / L**0.5)
        self.proj = torch.nn.Linear(H, H)

    def forward(self, x):  # x: (B, L, H)
        y = h3_style(x.transpose(1, 2), self.kernel)
        return self.proj(y.transpose(1, 2)) + x


def test_training_step_of_a_module_uses_both_ops():
    torch.manual_seed(torch.initial_seed() + 1)
    module = TrainedModule()
    x = torch.randn(B, L, H)
    result = compile_once(module, x.requires_grad_(), train=True)
    forward, backward = result.graphs
    assert "lcconv.fftconv(" in forward and "_fft_" not in forward
    assert "lcconv.fftconv_bwd(" in backward and "_fft_" not in backward

    x = torch.randn(B, L, H)
    result.fn(x).square().mean().backward()
    compiled_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    module.double()(x.double()).square().mean().backward()
    for got, want in zip(compiled_grads, (p.grad for p in module.parameters())):
        assert rel_err(got, want) < 1e-5


# ----------------------------------------------------------------------------------- guards --
def conv(u, k, n, crop=lambda y, seqlen: y[..., :seqlen], norm="backward"):
    return crop(torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n, norm=norm), u.shape[-1])


REFUSED = {
    # name: (function, u shape, k shape, guard code)
    "circular": (lambda u, k: conv(u, k, L + LK - 2), (B, H, L), (H, LK), "circular"),
    "slice_from_one": (lambda u, k: conv(u, k, 64, crop=lambda y, s: y[..., 1:s + 1]), (B, H, L), (H, LK),
                       "non_causal_slice"),
    "slice_of_the_tail": (lambda u, k: conv(u, k, 48, crop=lambda y, s: y[..., -s:]), (B, H, L), (H, LK),
                          "non_causal_slice"),
    "short_slice": (lambda u, k: conv(u, k, 64, crop=lambda y, s: y[..., :s - 1]), (B, H, L), (H, LK), "crop"),
    "kernel_per_batch": (lambda u, k: conv(u, k, 64), (B, H, L), (B, H, LK), "kernel_varies_over_batch"),
    "kernel_shared_over_channels": (lambda u, k: conv(u, k, 64), (B, H, L), (1, LK), "kernel_shape"),
    "missing_normalisation": (lambda u, k: conv(u, k, 64, norm="forward"), (B, H, L), (H, LK), "normalisation"),
    "padded_on_the_left": (
        lambda u, k: torch.fft.irfft(torch.fft.rfft(F.pad(u, (1, 63 - L))) * torch.fft.rfft(F.pad(k, (0, 64 - LK))),
                                     n=64)[..., :L],
        (B, H, L), (H, LK), "padding"),
    "signal_is_a_vector": (lambda u, k: conv(u, k, 64), (L,), (LK,), "signal_shape"),
    # Look-alikes of the spellings above that are not the causal convolution.
    "crop_from_the_end_one_late": (lambda u, k: conv(u, k, 64, crop=lambda y, s: y[..., -63:-63 + s]),
                                   (B, H, L), (H, LK), "non_causal_slice"),
    "reciprocal_of_another_size": (
        lambda u, k: torch.fft.irfft(torch.fft.rfft(u, n=64) * torch.fft.rfft(k, n=64) * (1 / 63), n=64,
                                     norm="forward")[..., :L],
        (B, H, L), (H, LK), "normalisation"),
    "complex_padded_on_the_left": (
        lambda u, k: torch.fft.ifft(torch.fft.fft(F.pad(u, (1, 63 - L)), dim=-1)
                                    * torch.fft.fft(F.pad(k, (0, 64 - LK)), dim=-1), dim=-1)[..., :L].real,
        (B, H, L), (H, LK), "padding"),
    # Time along dim 1 (transforms and inverse), but the crop keeps channels instead.
    "time_along_dim_1_cropped_along_dim_2": (
        lambda u, k: torch.fft.irfft(torch.fft.rfft(u, n=64, dim=1) * torch.fft.rfft(k, n=64, dim=0), n=64,
                                     dim=1)[..., :2],
        (B, L, H), (LK, H), "crop"),
    # Look-alikes of the reshaped-spectrum spellings: the broadcast pattern matches their structure.
    "multi_head_kernel_per_batch": (
        lambda u, k: torch.fft.irfft(torch.fft.rfft(u, n=64) * torch.fft.rfft(k, n=64).unsqueeze(2), n=64)[..., :L],
        (B, H, 3, L), (B, H, LK), "kernel_varies_over_batch"),
    "multi_head_cropped_along_heads": (
        lambda u, k: torch.fft.irfft(torch.fft.rfft(u, n=64) * torch.fft.rfft(k, n=64).unsqueeze(1), n=64)[:, :, :2],
        (B, H, 3, L), (H, LK), "crop"),
    "einsum_slice_from_one": (
        lambda u, k: torch.fft.irfft(torch.einsum("bhf,hf->bhf", torch.fft.rfft(u, n=64), torch.fft.rfft(k, n=64)),
                                     n=64)[..., 1:L + 1],
        (B, H, L), (H, LK), "non_causal_slice"),
    "complex_padded_circular": (
        lambda u, k: torch.fft.ifft(torch.fft.fft(F.pad(u, (0, 8)), dim=-1)
                                    * torch.fft.fft(F.pad(k, (0, L + 8 - LK)), dim=-1), dim=-1).real[..., :L],
        (B, H, L), (H, LK), "circular"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_guard_refuses(name):
    fn, u_shape, k_shape, code = REFUSED[name]
    u, k = torch.randn(u_shape), torch.randn(k_shape)
    with torch_211_r2c_strides_bug():
        result = compile_once(fn, u, k)
    assert result.rewrites == {}
    assert result.rejections == {code: 1}
    assert "lcconv" not in result.graphs[0] and "_fft_c2" in result.graphs[0]  # c2r, or c2c if complex
    u, k = torch.randn(u_shape), torch.randn(k_shape)
    torch.testing.assert_close(result.fn(u, k), fn(u, k))


# B = 1 with a (1, H, Lk) kernel: the batch dim of size 1 on both sides holds one kernel per
# channel (not one per batch element). name: (fn, kernel shape, counter family)
SINGLE_BATCH = {
    "textbook": (textbook, (1, H, LK), "rfft_conv"),
    "kernel_first_and_shorter": (kernel_first_exact_size, (1, H, LK), "rfft_conv"),
    "h3_style": (h3_style, (1, H, L), "rfft_conv_scaled_kernel"),
    "time_along_dim_1": (in_layout("textbook", "BLH"), (1, LK, H), "rfft_conv"),
}


@pytest.mark.parametrize("name", SINGLE_BATCH)
def test_single_batch_with_a_unit_batch_kernel_is_rewritten(name, fresh_compile):
    fn, k_shape, family = SINGLE_BATCH[name]
    u_shape = (1, L, H) if name == "time_along_dim_1" else (1, H, L)

    def inputs():
        return torch.randn(u_shape), torch.randn(k_shape) / k_shape[-1]**0.5

    result = compile_once(fn, *inputs())
    assert result.rewrites == {f"{family}_inference": 1} and result.rejections == {}
    assert "_fft_" not in result.graphs[0]
    u, k = inputs()
    if name == "time_along_dim_1":
        want = direct_causal_conv(u.transpose(1, 2), k[0].t()).transpose(1, 2)
    else:
        want = direct_causal_conv(u, k[0])
    assert rel_err(result.fn(u, k), want) < 1e-5


# Spellings with spectra reshaped after the FFT: an einsum product, a kernel spectrum broadcast
# over heads (Hyena's multi-head branch, safari's fftconv_ref). name: (fn, u shape, k shape, family)
HEADS = 3


def einsum_product(u, k):
    return torch.fft.irfft(torch.einsum("bhf,hf->bhf", torch.fft.rfft(u, n=64), torch.fft.rfft(k, n=64)), n=64)[..., :L]


def einsum_h3_style(u, k):
    k_f = torch.fft.rfft(k, n=2 * L) / (2 * L)
    y = torch.fft.irfft(torch.einsum("bhf,hf->bhf", torch.fft.rfft(u, n=2 * L), k_f), n=2 * L, norm="forward")
    return y[..., :L]


def multi_head_broadcast(u, k):
    return torch.fft.irfft(torch.fft.rfft(u, n=64) * torch.fft.rfft(k, n=64).unsqueeze(1), n=64)[..., :L]


def hyena_multi_head(u, k):
    # safari's fftconv_ref, with u (B, H, heads, L).
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    u_f = torch.fft.rfft(u.to(dtype=k.dtype), n=fft_size)
    if len(u.shape) > 3:
        k_f = k_f.unsqueeze(1)
    return torch.fft.irfft(u_f * k_f, n=fft_size, norm="forward")[..., :seqlen]


RESHAPED_SPECTRA = {
    "einsum_product": (einsum_product, (B, H, L), (H, LK), "einsum_conv"),
    "einsum_h3_style": (einsum_h3_style, (B, H, L), (H, LK), "einsum_conv_scaled_kernel"),
    "multi_head_broadcast": (multi_head_broadcast, (B, H, HEADS, L), (H, LK), "broadcast_kernel_conv"),
    "hyena_multi_head": (hyena_multi_head, (B, H, HEADS, L), (H, LK), "broadcast_scaled_kernel_conv"),
}


def direct_conv_of(name, u, k):
    """The oracle for RESHAPED_SPECTRA: each head (dim 2) convolved with its channel's kernel."""
    if u.dim() == 4:
        return torch.stack([direct_causal_conv(u[:, :, i], k) for i in range(u.shape[2])], dim=2)
    return direct_causal_conv(u, k)


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", RESHAPED_SPECTRA)
def test_reshaped_spectra_are_rewritten(name, train):
    fn, u_shape, k_shape, family = RESHAPED_SPECTRA[name]

    def inputs():
        return torch.randn(u_shape, requires_grad=train), (torch.randn(k_shape) / LK**0.5).requires_grad_(train)

    result = compile_once(fn, *inputs(), train=train)
    assert result.rewrites == {f"{family}_{'training' if train else 'inference'}": 1}
    assert "_fft_" not in "".join(result.graphs) and result.graphs[0].count("lcconv.fftconv(") == 1
    u, k = inputs()
    y = result.fn(u, k)
    assert rel_err(y, direct_conv_of(name, u.detach().double(), k.detach().double())) < 1e-5
    if train:
        grad_y = torch.randn(y.shape)
        got = torch.autograd.grad(y, (u, k), grad_y)
        u64, k64 = (t.detach().double().requires_grad_() for t in (u, k))
        want = torch.autograd.grad(fn(u64, k64), (u64, k64), grad_y.double())
        assert all(rel_err(g, w) < 1e-5 for g, w in zip(got, want))


def test_multi_head_graph_flattens_heads_into_channels():
    _, u_shape, k_shape, _ = RESHAPED_SPECTRA["multi_head_broadcast"]
    result = compile_once(multi_head_broadcast, torch.randn(u_shape), torch.randn(k_shape))
    assert result.graphs[0].splitlines()[1:] == [
        "v0 = aten.reshape(in0, [2, 12, 24])",  # (B, H, heads, L) -> (B, H * heads, L): a view
        "v1 = aten.unsqueeze(in1, 1)",
        "v2 = aten.expand(v1, [4, 3, 20])",
        "v3 = aten.clone(v2, memory_format=torch.contiguous_format)",
        "v4 = aten.reshape(v3, [12, 20])",  # the kernel repeated per head: (H * heads, Lk)
        "v5 = lcconv.fftconv(v0, v4)",
        "v6 = aten.reshape(v5, [2, 4, 3, 24])",
        "return (v6,)",
    ]


# Spellings no pattern matches; explain must say what to change. name: (fn, u, k, words)
NOT_MATCHED = {
    "spectrum_viewed": (
        lambda u, k: torch.fft.irfft(torch.fft.rfft(u, n=64) * torch.fft.rfft(k, n=64).view(1, H, 33), n=64)[..., :L],
        (B, H, L), (H, LK), "a spectrum is reshaped after its FFT (view([1, 4, 33]))"),
}


@pytest.mark.parametrize("name", NOT_MATCHED)
def test_spellings_not_matched_stay_as_written_and_say_why(name):
    fn, u_shape, k_shape, words = NOT_MATCHED[name]
    result = compile_once(fn, torch.randn(u_shape), torch.randn(k_shape))
    assert result.rewrites == {} and "lcconv" not in result.graphs[0]
    u, k = torch.randn(u_shape), torch.randn(k_shape)
    torch.testing.assert_close(result.fn(u, k), fn(u, k))
    with torch.no_grad():
        report = lcconv_compile.explain(fn, torch.randn(u_shape), torch.randn(k_shape))
    assert [r.code for r in report.rejected] == ["structure"]
    assert words in report.rejected[0].reason


def test_broadcast_scaled_after_the_broadcast_is_left_alone():
    # `k_f.unsqueeze(1) / n` (scale after the broadcast) is no registered spelling: unmatched.
    def scaled_after_broadcast(u, k):
        y_f = torch.fft.rfft(u, n=64) * torch.fft.rfft(k, n=64).unsqueeze(1) / 64
        return torch.fft.irfft(y_f, n=64, norm="forward")[..., :L]

    u, k = torch.randn(B, H, 3, L), torch.randn(H, LK)
    result = compile_once(scaled_after_broadcast, u, k)
    assert result.rewrites == {} and "lcconv" not in result.graphs[0]
    u, k = torch.randn(B, H, 3, L), torch.randn(H, LK)
    torch.testing.assert_close(result.fn(u, k), scaled_after_broadcast(u, k))
    report = lcconv_compile.explain(scaled_after_broadcast, u, k)
    assert [r.code for r in report.rejected] == ["unmatched"]


def test_explain_says_where_time_is():
    fn = in_layout("textbook", "BLH")
    report = lcconv_compile.explain(fn, *fresh_inputs(train=False, layout="BLH"))
    assert [r.pattern for r in report.rewritten] == ["rfft_conv_inference"]
    assert "time along dim 1 of (2, 24, 4)" in report.rewritten[0].detail


def test_kernel_of_higher_precision_is_not_rewritten():
    # float64 kernel: the result is float64, but the op returns the signal's dtype.
    u, k = torch.randn(B, H, L), torch.randn(H, LK, dtype=torch.float64)
    result = compile_once(textbook, u, k)
    assert result.rewrites == {} and result.rejections == {"dtype": 1}


def test_complex_signal_is_not_rewritten():
    def complex_conv(u, k):
        return torch.fft.ifft(torch.fft.fft(u, n=64) * torch.fft.fft(k, n=64))[..., :L].real

    u, k = torch.randn(B, H, L, dtype=torch.complex64), torch.randn(H, LK)
    report = lcconv_compile.explain(complex_conv, u, k)
    assert report.rewritten == []
    assert [(r.code, "complex inputs" in r.reason) for r in report.rejected] == [("structure", True)]


@pytest.mark.parametrize("kernel_len", [L, LK])
def test_symbolic_sizes_are_rewritten_under_guards(kernel_len):
    # With dynamic shapes, L and Lk are symbols. n = 2L >= L + Lk - 1 is provable when Lk is L's
    # symbol; for a kernel of its own length it is read off the example sizes and guarded
    # (tests/test_lowering_dynamic.py has the recompiles).
    u, k = torch.randn(B, H, L), torch.randn(H, kernel_len)
    result = compile_once(h3_style, u, k, dynamic=True)
    assert result.rewrites == {"rfft_conv_scaled_kernel_inference": 1} and result.rejections == {}
    u, k = torch.randn(B, H, L + 8), torch.randn(H, kernel_len + 8)  # other sizes, same graph
    assert rel_err(result.fn(u, k), direct_causal_conv(u, k)) < 1e-5


def test_reused_spectrum_is_left_alone():
    def shared_kernel_spectrum(u, k):
        n = 2 * L
        k_f = torch.fft.rfft(k, n=n)
        return torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n)[..., :L], k_f.abs()

    u, k = torch.randn(B, H, L), torch.randn(H, LK)
    result = compile_once(shared_kernel_spectrum, u, k)
    assert result.rewrites == {}
    report = lcconv_compile.explain(shared_kernel_spectrum, u, k)
    assert [r.code for r in report.rejected] == ["unmatched"]


def test_a_failing_guard_costs_the_rewrite_not_the_compilation(monkeypatch):
    from lcconv_compile.lowering import guards

    def broken_check(idiom):
        raise KeyError("a bug in a guard")

    monkeypatch.setattr(guards, "_check_idiom", broken_check)
    u, k = torch.randn(B, H, L), torch.randn(H, LK)
    result = compile_once(textbook, u, k)
    assert result.rewrites == {} and result.rejections == {"internal_error": 1}
    assert rel_err(result.fn(u, k), direct_causal_conv(u, k)) < 1e-5


# ------------------------------------------------------------------------------ NaN and Inf --
def hand_written_fft_conv(u, k):
    """The idiom as people write it: FFT size 2L, kernel zero-padded by rfft's n."""
    seqlen = u.shape[-1]
    n = 2 * seqlen
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]


_requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
_CUDA = [pytest.mark.cuda, _requires_cuda]


@pytest.mark.parametrize("device,seqlen,kernel_len,family", [
    ("cpu", 256, 16, None),  # CPU: the compiled graph runs the op's reference (an FFT)
    ("cpu", 256, 256, None),
    pytest.param("cuda", 1024, 64, "shortconv", marks=_CUDA),  # Lk <= 128: the short kernels
    pytest.param("cuda", 1024, 1024, "blockfft_conv", marks=_CUDA),  # FlashConv v5
])
def test_rewrite_narrows_nan_and_inf_never_widens(device, seqlen, kernel_len, family):
    """README, "NaN and Inf": a rewrite may narrow NaN/Inf propagation, never widen it. Wherever
    the compiled output is non-finite, the eager hand-written code's output is non-finite too;
    where both are finite they agree. The compiled output is also non-finite at least where the
    causal sum itself is (outputs t .. t+Lk-1 of the row: a rewrite never hides a NaN), and its
    finite outputs equal the float64 direct sum. On CPU the compiled graph runs the reference,
    an FFT like the eager code: there both spread over the whole row and the sets are equal. On
    CUDA the short kernels compute the sum directly, so only outputs t .. t+Lk-1 are NaN/Inf."""
    from lcconv_compile import kernels

    batch, channels = 2, 3
    u = torch.randn(batch, channels, seqlen, device=device)
    k = torch.randn(channels, kernel_len, device=device) / kernel_len ** 0.5
    if family is not None:  # the path under test is the one the op dispatches to
        assert kernels.select(u, k).__name__.rsplit(".", 1)[-1] == family
    # Static sizes: other tests compile the same function at other sizes, and Dynamo's automatic
    # dynamic shapes would make these symbolic (left unrewritten, guards.py's `symbolic`).
    compiled = compile_once(hand_written_fft_conv, u, k, dynamic=False)
    # The op runs, not the FFTs (on CUDA the lowering stage then counts its launch too).
    assert compiled.rewrites.get("rfft_conv_inference") == 1, compiled.rewrites

    # A NaN in one row and an Inf in another, at one time step each, away from both ends.
    nan_at, inf_at = (0, 1, seqlen // 2), (1, 2, seqlen // 3)
    u[nan_at], u[inf_at] = float("nan"), float("inf")
    got = compiled.fn(u, k)
    eager = hand_written_fft_conv(u, k)
    direct = direct_causal_conv(u, k)  # float64, tap by tap: non-finite exactly at t .. t+Lk-1

    got_bad, eager_bad, direct_bad = ~got.isfinite(), ~eager.isfinite(), ~direct.isfinite()
    rows, reach = torch.zeros_like(eager_bad), torch.zeros_like(eager_bad)
    for b, h, t in (nan_at, inf_at):
        rows[b, h] = True
        reach[b, h, t:t + kernel_len] = True
    assert torch.equal(direct_bad, reach)  # the oracle says what the causal sum reaches
    assert not (got_bad & ~eager_bad).any(), "compiled non-finite where the eager code is finite"
    assert not (direct_bad & ~got_bad).any(), "compiled finite where the causal sum is not"
    both_finite = ~got_bad & ~eager_bad
    assert rel_err(got[both_finite], eager[both_finite]) < 1e-4
    assert rel_err(got[~got_bad], direct[~got_bad]) < 1e-4
    # The eager FFT spreads each one over its whole row, earlier steps too, and nowhere else.
    assert torch.equal(eager_bad, rows)
    if device == "cpu":
        assert torch.equal(got_bad, eager_bad)
    elif family == "shortconv":
        assert torch.equal(got_bad, direct_bad)
