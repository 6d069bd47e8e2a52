"""Neighbour folding (lowering/patterns_fusion.py, guards.py): the skip term, gates, the exact
GELU, a (B, H, 1) dropout mask and half-precision casts around an ``lcconv::fftconv`` call fold
into the op's options, whether the op was called directly or came from a rewritten idiom; a
neighbour the op's formula would not reproduce stays outside.
"""

from __future__ import annotations

import math

import expecttest
import pytest
import torch
import torch.nn.functional as F

from lcconv_compile import fftconv, reference
from inputs import rel_err
from lowering_helpers import compile_once
from oracles import direct_causal_conv

B, H, L = 2, 4, 24


def hand_written_conv(u, k):
    seqlen = u.shape[-1]
    fft_size = 2 * seqlen
    k_f = torch.fft.rfft(k, n=fft_size) / fft_size
    return torch.fft.irfft(torch.fft.rfft(u, n=fft_size) * k_f, n=fft_size, norm="forward")[..., :seqlen]


def in_place_skip_and_gate(u, k, D, gate, mask):
    """Skip term and gate applied in place to the cropped idiom (functionalized: crop writes)."""
    seqlen, n = u.shape[-1], 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]
    y.add_(u * D[:, None])
    y.mul_(gate)
    return y


def inputs():
    return dict(
        u=torch.randn(B, H, L),
        k=torch.randn(H, L) / L**0.5,
        D=torch.randn(H),
        gate=torch.randn(B, H, L),
        mask=(torch.rand(B, H, 1) > 0.3).float() / 0.7,
    )


class FusionGraphTest(expecttest.TestCase):
    def test_skip_term_folds_into_direct_op_call(self):
        def block(u, k, D, gate, mask):
            return fftconv(u, k) + u * D.unsqueeze(-1)

        result = compile_once(block, *inputs().values())
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: f32[2, 4, 24], in1: f32[4, 24], in2: f32[4]
v0 = lcconv.fftconv(in0, in1, in2)
return (v0,)""")
        assert result.rewrites == {"fold_skip": 1}
        x = inputs()
        want = direct_causal_conv(x["u"], x["k"], x["D"])
        assert rel_err(result.fn(*x.values()), want) < 1e-5

    def test_skip_term_written_first_folds_too(self):
        def block(u, k, D, gate, mask):
            return D[:, None] * u + fftconv(u, k)

        result = compile_once(block, *inputs().values())
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: f32[4], in1: f32[2, 4, 24], in2: f32[4, 24]
v0 = lcconv.fftconv(in1, in2, in0)
return (v0,)""")
        assert result.rewrites == {"fold_skip_first": 1}

    def test_hyena_block_becomes_one_op_call(self):
        # Hyena's operator: x = u * gate; y = gelu(conv(x, k) + D * x) * gate, conv written by hand.
        def hyena(u, k, D, gate, mask):
            x = u * gate
            return F.gelu(hand_written_conv(x, k) + x * D.unsqueeze(-1)) * gate

        result = compile_once(hyena, *inputs().values())
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: f32[2, 4, 24], in1: f32[2, 4, 24], in2: f32[4, 24], in3: f32[4]
v0 = lcconv.fftconv(in0, in2, in3, in1, in1, True)
return (v0,)""")
        assert result.rewrites == {"rfft_conv_scaled_kernel_inference": 1, "fold_skip": 1, "fold_gate_in": 1,
                                   "fold_gelu": 1, "fold_output_multiplier": 1}
        x = inputs()
        want = reference.fftconv_ref(*(x[n].double() for n in ("u", "k", "D")), gate_in=x["gate"].double(),
                                     gate_out=x["gate"].double(), gelu=True)
        assert rel_err(result.fn(*x.values()), want) < 1e-5

    def test_h3_block_with_dropout_mask_becomes_one_op_call(self):
        def h3(u, k, D, gate, mask):
            return gate * F.gelu(fftconv(u * gate, k, D)) * mask

        result = compile_once(h3, *inputs().values())
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: f32[2, 4, 24], in1: f32[2, 4, 24], in2: f32[4, 24], in3: f32[4], in4: f32[2, 4, 1]
v0 = aten.squeeze.dim(in4, -1)
v1 = lcconv.fftconv(in0, in2, in3, in1, in1, True, v0)
return (v1,)""")
        assert result.rewrites == {"fold_gate_in": 1, "fold_gelu": 1, "fold_output_multiplier_first": 1,
                                   "fold_output_multiplier": 1}
        x = inputs()
        want = reference.fftconv_ref(*(x[n].double() for n in ("u", "k", "D")), gate_in=x["gate"].double(),
                                     gate_out=x["gate"].double(), gelu=True,
                                     dropout_mask=x["mask"].double().squeeze(-1))
        assert rel_err(result.fn(*x.values()), want) < 1e-5

    def test_in_place_skip_and_gate_on_the_cropped_idiom_fold(self):
        # Functionalized, each in-place op writes the crop back into the inverse FFT's output and
        # the next reads it again: read through, the graph is the out-of-place one.
        result = compile_once(in_place_skip_and_gate, *inputs().values())
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: f32[2, 4, 24], in1: f32[4, 24], in2: f32[4], in3: f32[2, 4, 24]
v0 = lcconv.fftconv(in0, in1, in2, None, in3)
return (v0,)""")
        assert result.rewrites == {"rfft_conv_inference": 1, "fold_skip": 1, "fold_output_multiplier": 1}
        x = inputs()
        want = reference.fftconv_ref(*(x[n].double() for n in ("u", "k", "D")), gate_out=x["gate"].double())
        assert rel_err(result.fn(*x.values()), want) < 1e-5

    def test_half_precision_block_reads_half_inputs(self):
        def block(u, k, D, gate, mask):
            x = u.float()
            return (fftconv(x, k.float()) + x * D.unsqueeze(-1)).to(u.dtype)

        x = inputs()
        x["u"], x["k"] = x["u"].bfloat16(), x["k"].bfloat16()
        result = compile_once(block, *x.values())
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: bf16[2, 4, 24], in1: bf16[4, 24], in2: f32[4]
v0 = lcconv.fftconv(in0, in1, in2)
return (v0,)""")
        assert result.rewrites == {"fold_skip": 1, "fold_signal_cast": 1, "fold_kernel_cast": 1}
        y = result.fn(*x.values())
        assert y.dtype == torch.bfloat16
        assert rel_err(y, direct_causal_conv(x["u"], x["k"], x["D"])) < 1e-2


    def test_gelu_of_a_half_precision_output_folds(self):
        # Inductor decomposes F.gelu of a bf16 tensor between casts (to float32 and back); the op
        # computes GELU in float32 from its float32 pre-activation and casts once.
        def hyena_bf16(u, k, D, gate, mask):
            x = u * gate
            return F.gelu(fftconv(x, k) + x * D[:, None]) * gate

        def half_inputs():
            x = inputs()
            return {name: t.bfloat16() for name, t in x.items()}

        result = compile_once(hyena_bf16, *half_inputs().values())
        self.assertExpectedInline("\n".join(result.graphs), """\
inputs in0: bf16[2, 4, 24], in1: bf16[2, 4, 24], in2: bf16[4, 24], in3: bf16[4]
v0 = lcconv.fftconv(in0, in2, in3, in1, in1, True)
return (v0,)""")
        assert result.rewrites == {"fold_gate_in": 1, "fold_skip": 1, "fold_gelu_half": 1, "fold_output_multiplier": 1}
        x = half_inputs()
        y = result.fn(*x.values())
        assert y.dtype == torch.bfloat16
        want = reference.fftconv_ref(*(x[n].double() for n in ("u", "k", "D")), gate_in=x["gate"].double(),
                                     gate_out=x["gate"].double(), gelu=True)
        assert rel_err(y, want) < 1e-2
        assert rel_err(y, hyena_bf16(*x.values())) < 1e-2


# ----------------------------------------------------------------- other spellings, folded --
# The skip term with its weight shaped per channel another way or through addcmul, and the exact
# GELU through erfc or ndtr. name: (block, counters)
SPELLINGS = {
    "skip_weight_indexed_with_none": (lambda u, k, D, gate, mask: fftconv(u, k) + u * D[None, :, None],
                                      {"fold_skip": 1}),
    "skip_weight_viewed": (lambda u, k, D, gate, mask: fftconv(u, k) + u * D.view(H, 1), {"fold_skip_weight": 1}),
    "skip_weight_viewed_first": (lambda u, k, D, gate, mask: D.view(1, H, 1) * u + fftconv(u, k),
                                 {"fold_skip_weight_first": 1}),
    "skip_by_addcmul": (lambda u, k, D, gate, mask: torch.addcmul(fftconv(u, k), u, D[:, None]),
                        {"fold_skip_addcmul": 1}),
    "gelu_by_erfc": (lambda u, k, D, gate, mask: (lambda y: 0.5 * y * torch.erfc(-y / math.sqrt(2)))(fftconv(u, k, D)),
                     {"fold_gelu_erfc": 1}),
    "gelu_by_ndtr": (lambda u, k, D, gate, mask: (lambda y: y * torch.special.ndtr(y))(fftconv(u, k, D)),
                     {"fold_gelu_ndtr": 1}),
}


@pytest.mark.parametrize("name", SPELLINGS)
def test_spelling_folds(name):
    block, rewrites = SPELLINGS[name]
    result = compile_once(block, *inputs().values())
    assert result.rewrites == rewrites and result.rejections == {}
    graph = result.graphs[0]
    assert graph.count("lcconv.fftconv(") == 1
    assert not any(op in graph for op in ("aten.add", "aten.mul", "aten.addcmul", "erf", "aten.neg"))
    x = inputs()
    want = block(*(t.double() for t in x.values()))
    assert rel_err(result.fn(*x.values()), want) < 1e-5


# --------------------------------------------------------------------------- not folded --
NOT_FOLDED = {
    # name: (block, guard code or None when the structure does not match at all)
    "skip_of_another_tensor": (lambda u, k, D, gate, mask: fftconv(u, k) + gate * D.unsqueeze(-1), None),
    "tanh_gelu": (lambda u, k, D, gate, mask: F.gelu(fftconv(u, k, D), approximate="tanh"), None),
    "gate_broadcast_over_batch": (lambda u, k, D, gate, mask: fftconv(u, k, D) * gate[:1], "gate_shape"),
    "input_gate_broadcast_over_channels": (lambda u, k, D, gate, mask: fftconv(u * gate[:, :1], k, D),
                                           "gate_shape"),
    "skip_after_output_gate": (lambda u, k, D, gate, mask: fftconv(u, k, gate_out=gate) + u * D.unsqueeze(-1),
                               "order"),
    "skip_of_wrong_shape": (lambda u, k, D, gate, mask: fftconv(u, k) + u * gate[:, :, :1], "skip_shape"),
    "double_precision_gate": (lambda u, k, D, gate, mask: fftconv(u, k, D) * gate.double(), "dtype"),
    "output_also_returned": (lambda u, k, D, gate, mask: (lambda y: (y, y * gate))(fftconv(u, k, D)), None),
}


@pytest.mark.parametrize("name", NOT_FOLDED)
def test_not_folded(name):
    block, code = NOT_FOLDED[name]
    result = compile_once(block, *inputs().values())
    assert not any(key.startswith("fold") for key in result.rewrites), result.rewrites
    assert result.rejections == ({code: 1} if code else {})
    x = inputs()
    torch.testing.assert_close(result.fn(*x.values()), block(*x.values()))


# With H == L, D shaped (1, H) broadcasts over time: it scales time steps, not channels.
OVER_TIME = {
    "unsqueezed_at_0": lambda u, k, D: fftconv(u, k) + u * D.unsqueeze(0),
    "viewed": lambda u, k, D: fftconv(u, k) + u * D.view(1, -1),
    "indexed_with_none": lambda u, k, D: fftconv(u, k) + u * D[None, None, :],
    "viewed_first": lambda u, k, D: D.view(1, 1, -1) * u + fftconv(u, k),
    "by_addcmul": lambda u, k, D: torch.addcmul(fftconv(u, k), u, D[None, :]),
}


@pytest.mark.parametrize("name", OVER_TIME)
def test_skip_weight_over_time_is_not_folded(name):
    block = OVER_TIME[name]
    u, k, D = torch.randn(B, 8, 8), torch.randn(8, 8), torch.randn(8)
    result = compile_once(block, u, k, D)
    assert result.rewrites == {} and result.rejections == {"skip_shape": 1}
    u, k, D = torch.randn(B, 8, 8), torch.randn(8, 8), torch.randn(8)
    torch.testing.assert_close(result.fn(u, k, D), block(u, k, D))


def test_training_forward_folds_only_what_the_backward_does_not_read():
    # The op's output feeds GELU, whose backward needs it: it is saved, so the skip term cannot
    # fold in the forward graph. Gradients still match the float64 eager computation.
    def block(u, k, D, gate, mask):
        return F.gelu(fftconv(u, k) + u * D.unsqueeze(-1))

    x = inputs()
    for name in ("u", "k", "D"):
        x[name].requires_grad_()
    result = compile_once(block, *x.values(), train=True)
    assert "fold_skip" not in result.rewrites
    assert "lcconv.fftconv_bwd" in result.graphs[1]

    x = inputs()
    leaves = [x[n].requires_grad_() for n in ("u", "k", "D")]
    grad_y = torch.randn(B, H, L)
    got = torch.autograd.grad(result.fn(*x.values()), leaves, grad_y)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = torch.autograd.grad(block(*leaves64, None, None), leaves64, grad_y.double())
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5


def test_in_place_ops_on_the_crop_when_training_keep_their_gradients():
    # The crops read through their scatters in the joint graph; its backward (copy,
    # slice_scatter) matches no training pattern, so it runs as written, with exact gradients.
    x = inputs()
    for name in ("u", "k", "D"):
        x[name].requires_grad_()
    result = compile_once(in_place_skip_and_gate, *x.values(), train=True)
    assert result.rewrites == {}

    x = inputs()
    leaves = [x[n].requires_grad_() for n in ("u", "k", "D")]
    grad_y = torch.randn(B, H, L)
    y = result.fn(*x.values())
    got = torch.autograd.grad(y, leaves, grad_y)
    x64 = {name: t.detach().double() for name, t in x.items()}
    leaves64 = [x64[n].requires_grad_() for n in ("u", "k", "D")]
    y64 = in_place_skip_and_gate(*x64.values())
    want = torch.autograd.grad(y64, leaves64, grad_y.double())
    assert rel_err(y, y64) < 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
