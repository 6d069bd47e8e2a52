"""The argument check (lowering/arguments.py, used by every guard in guards.py): a rewrite never
drops an argument of a node it absorbs. Each case here was folded silently before (compiled !=
eager); now it is left alone, compiled equals eager, and ``explain`` says why.
"""

from __future__ import annotations

import math

import pytest
import torch

import lcconv_compile
from lcconv_compile import fftconv
from lcconv_compile.lowering import guards
from lcconv_compile.lowering.arguments import READ
from lowering_helpers import compile_once

B, H, L = 2, 3, 8
INV_SQRT2 = 1 / math.sqrt(2)


def hand_written_conv(u, k):
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


def skip_with_alpha(u, k, D):  # issue 8, case 1: alpha scales the skip term
    return torch.add(fftconv(u, k), u * D[:, None], alpha=2)


def skip_first_with_alpha(u, k, D):  # the same hole in the other operand order: alpha scales the conv
    return torch.add(D[:, None] * u, fftconv(u, k), alpha=2)


def hand_written_skip_with_alpha(u, k, D):  # issue 8, case 1 through the idiom rewrite
    return torch.add(hand_written_conv(u, k), u * D[:, None], alpha=-1)


def gelu_with_alpha(u, k, D):  # issue 8, case 2
    y = fftconv(u, k)
    return y * 0.5 * torch.add(torch.erf(y * INV_SQRT2), 1, alpha=3)


def gelu_constants_swapped(u, k, D):  # issue 8, case 3
    y = fftconv(u, k)
    return y * INV_SQRT2 * (1 + torch.erf(y * 0.5))


def kernel_unsqueezed_last(u, k, D):
    # k: (1, H) made (1, H, 1): one tap per channel. The unsqueezed-kernel pattern's replacement
    # undoes unsqueeze(0) only (this crashed the compile); the plain pattern, with the unsqueezed
    # tensor as the kernel, rewrites it correctly.
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k.unsqueeze(-1), n=n), n=n)[..., :u.shape[-1]]


# name: (function, kernel shape, rewrites expected, refusals expected, words the refusal names)
CASES = {
    "skip_with_alpha": (skip_with_alpha, (H, L), {}, {"argument": 1}, "alpha=2"),
    "skip_first_with_alpha": (skip_first_with_alpha, (H, L), {}, {"argument": 1}, "alpha=2"),
    "hand_written_skip_with_alpha": (hand_written_skip_with_alpha, (H, L), {"rfft_conv_inference": 1},
                                     {"argument": 1}, "alpha=-1"),
    "gelu_with_alpha": (gelu_with_alpha, (H, L), {}, {"argument": 1}, "alpha=3"),
    "gelu_constants_swapped": (gelu_constants_swapped, (H, L), {}, {"gelu": 1}, "y * 0.5 has 0.707"),
    "kernel_unsqueezed_last": (kernel_unsqueezed_last, (1, H), {"rfft_conv_inference": 1}, {"argument": 1},
                               "dim=-1"),
}


def case_inputs(k_shape):
    return torch.randn(B, H, L), torch.randn(k_shape), torch.randn(H)


@pytest.mark.parametrize("name", CASES)
def test_left_alone_and_compiled_equals_eager(name):
    fn, k_shape, rewrites, refusals, _ = CASES[name]
    result = compile_once(fn, *case_inputs(k_shape))
    assert result.rewrites == rewrites
    assert result.rejections == refusals
    x = case_inputs(k_shape)
    torch.testing.assert_close(result.fn(*x), fn(*x))


@pytest.mark.parametrize("name", CASES)
def test_explain_names_the_reason(name):
    fn, k_shape, rewrites, refusals, words = CASES[name]
    report = lcconv_compile.explain(fn, *case_inputs(k_shape))
    assert report.fused == []
    assert [r.pattern for r in report.rewritten] == list(rewrites)
    (code,) = refusals
    refused = [r for r in report.rejected if r.code == code]
    assert len(refused) == 1 and words in refused[0].reason, report
    assert f"[{code}]" in str(report).split("left alone")[1]


def test_explicit_default_alpha_still_folds():
    def block(u, k, D):
        return torch.add(fftconv(u, k), u * D[:, None], alpha=1)

    result = compile_once(block, *case_inputs((H, L)))
    assert result.rewrites == {"fold_skip": 1} and result.rejections == {}
    x = case_inputs((H, L))
    torch.testing.assert_close(result.fn(*x), block(*x))


@pytest.mark.parametrize("train", [False, True])
def test_an_open_argument_no_guard_reads_is_refused(monkeypatch, train):
    # Fail closed: were a guard to stop reading the inverse FFT's size, the rewrite must stop,
    # in inference graphs and in the forward half of training (joint) graphs alike.
    monkeypatch.setitem(guards.IDIOM_OPEN_ARGUMENTS, torch.ops.aten._fft_c2r.default,
                        {"dim": READ, "normalization": READ})
    u, k = torch.randn(B, H, L, requires_grad=train), torch.randn(H, L, requires_grad=train)
    result = compile_once(hand_written_conv, u, k, train=train)
    assert result.rewrites == {} and result.rejections == {"argument": 1}
    assert "lcconv" not in result.graphs[0]
