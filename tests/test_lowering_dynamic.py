"""Symbolic sizes (lowering/guards.py, passes.read_sizes_from_inputs): a hand-written FFT
convolution keeps its rewrite when ``torch.compile`` recompiles it with symbolic sizes (the second
length under automatic dynamic shapes, or ``dynamic=True``), and keeps it only where it is the same
math: whatever the guards read off the example sizes becomes a guard of the compiled graph, so a
length where the code is circular gets a graph of its own that stays as written.

Each test resets Dynamo (which dims it has seen change is remembered per function name and line,
across code objects), compiles its function with the compile caches off, calls it at several
lengths and compares every call with the eager function (float32, fresh random inputs).
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lcconv_compile
from inputs import rel_err
from lowering_helpers import counter_delta, no_compile_caches
from lcconv_compile.lowering import install
from lcconv_compile.lowering.events import REJECTION_COUNTERS, REWRITE_COUNTERS
from torch._dynamo.utils import counters

B, H, L_MAX, SHORT_LK = 2, 4, 512, 24


def lk_equals_l(u, k):
    seqlen = u.shape[-1]
    n = 2 * seqlen
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]


def h3_min_l_max(u, k):
    # H3 / safari: the FFT size depends on the kernel's length, cut to the sequence.
    seqlen = u.shape[-1]
    n = min(seqlen, L_MAX) + seqlen
    k_f = torch.fft.rfft(k[..., :seqlen], n=n) / n
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * k_f, n=n, norm="forward")[..., :seqlen]


def reciprocal_product(u, k):
    # `* (1 / n)` with a symbolic n: a SymFloat factor on the product.
    seqlen = u.shape[-1]
    n = 2 * seqlen
    product = torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n) * (1 / n)
    return torch.fft.irfft(product, n=n, norm="forward")[..., :seqlen]


def fixed_fft_size(u, k):
    # A look-alike: n = 128 is a causal convolution for L + Lk - 1 <= 128 and circular beyond.
    seqlen = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=128) * torch.fft.rfft(k, n=128), n=128)[..., :seqlen]


def _inputs(seqlen, kernel_len, train):
    u = torch.randn(B, H, seqlen, requires_grad=train)
    k = torch.randn(H, kernel_len, requires_grad=train)
    return u, k


def run_lengths(fn, lengths, kernel_len=None, train=False):
    """Compile a fresh copy of ``fn`` (plain ``torch.compile``), call it at each length and check it
    against eager (outputs, and gradients when ``train``); return the counters' increments."""
    torch._dynamo.reset()
    before = {name: counters[name].copy() for name in (REWRITE_COUNTERS, REJECTION_COUNTERS)}
    with no_compile_caches():
        install.install_passes()
        compiled = torch.compile(fn)
        for seqlen in lengths:
            u, k = _inputs(seqlen, kernel_len or seqlen, train)
            got, want = compiled(u, k), fn(u, k)
            assert rel_err(got, want) < 1e-5, (seqlen, rel_err(got, want))
            if train:
                grad = torch.randn_like(want)
                got_grads = torch.autograd.grad(got, (u, k), grad)
                want_grads = torch.autograd.grad(want, (u, k), grad)
                for g, w, name in zip(got_grads, want_grads, ("du", "dk")):
                    assert rel_err(g, w) < 1e-5, (seqlen, name, rel_err(g, w))
    return {name: counter_delta(before[name], counters[name]) for name in before}


@pytest.mark.parametrize("train", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("fn,kernel_len", [
    (lk_equals_l, None),
    (lk_equals_l, SHORT_LK),
    (h3_min_l_max, None),
    (reciprocal_product, None),
], ids=["lk_equals_l", "lk_shorter", "h3_min_l_max", "reciprocal_product"])
def test_second_length_keeps_the_rewrite(fn, kernel_len, train):
    # 64: static graph; 96: recompiled with a symbolic length; 40: the symbolic graph again.
    delta = run_lengths(fn, (64, 96, 40), kernel_len, train)
    assert sum(delta[REWRITE_COUNTERS].values()) == 2, delta  # both graphs rewritten
    assert delta[REJECTION_COUNTERS] == {}, delta


def test_dynamic_true_rewrites_the_first_graph():
    torch._dynamo.reset()
    before = counters[REWRITE_COUNTERS].copy()
    with no_compile_caches():
        install.install_passes()
        compiled = torch.compile(h3_min_l_max, dynamic=True)
        for seqlen in (64, 96, 40):
            u, k = _inputs(seqlen, seqlen, False)
            assert rel_err(compiled(u, k), h3_min_l_max(u, k)) < 1e-5
    assert counter_delta(before, counters[REWRITE_COUNTERS]) == {"rfft_conv_scaled_kernel_inference": 1}


def test_length_where_the_lookalike_turns_circular_stays_alone_and_warns():
    # 64: 64 + 64 - 1 <= 128, rewritten; 96: circular, left as written (and compiled == eager, the
    # circular result); 50: causal again, rewritten by a graph of its own (the refusal at 96 was
    # guarded on L > 64, so the symbolic graph is not reused at 50).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        delta = run_lengths(fixed_fft_size, (64, 96, 50))
    assert sum(delta[REWRITE_COUNTERS].values()) == 2, delta
    assert delta[REJECTION_COUNTERS] == {"circular": 1}, delta
    lost = [w for w in caught if issubclass(w.category, lcconv_compile.LostRewriteWarning)]
    assert len(lost) == 1, [str(w.message) for w in caught]
    message = str(lost[0].message)
    assert "test_lowering_dynamic.py:" in message and "[circular]" in message and "96 here" in message


def test_rewrite_made_at_one_length_is_not_reused_where_it_would_be_circular():
    # 96 first: circular, left alone (static graph). 64: the symbolic graph is rewritten, valid
    # only for L <= 64 (a guard). 80: circular again; the rewritten graph must not run it.
    delta = run_lengths(fixed_fft_size, (96, 64, 80, 33))
    assert sum(delta[REWRITE_COUNTERS].values()) == 1, delta
    assert delta[REJECTION_COUNTERS] == {"circular": 2}, delta


def test_kernel_longer_than_the_rewrite_allows_recompiles():
    # n = 2L is causal for Lk <= L + 1. Rewritten at Lk = L - 8 (two symbols, guarded on
    # Lk <= L + 1); at Lk = L + 8 the eager code is circular and the compiled one must agree.
    torch._dynamo.reset()
    with no_compile_caches():
        install.install_passes()
        compiled = torch.compile(lk_equals_l, dynamic=True)
        for seqlen, kernel_len in ((64, 56), (96, 88), (48, 56), (40, 40)):
            u, k = _inputs(seqlen, kernel_len, False)
            assert rel_err(compiled(u, k), lk_equals_l(u, k)) < 1e-5, (seqlen, kernel_len)


def test_explain_with_dynamic_true_reports_the_symbolic_graph():
    u, k = torch.randn(B, H, 96), torch.randn(H, 96)
    report = lcconv_compile.explain(fixed_fft_size, u, k, dynamic=True)
    assert report.rewritten == []
    assert [r.code for r in report.rejected] == ["circular"]
    assert "96 here" in report.rejected[0].reason
    report = lcconv_compile.explain(h3_min_l_max, u, k, dynamic=True)
    assert [r.pattern for r in report.rewritten] == ["rfft_conv_scaled_kernel_inference"]
    assert report.rejected == []


def folded_block(u, k, D, gate):
    # Skip term through addcmul with a viewed weight, the erfc GELU and an output gate: each folds.
    seqlen = u.shape[-1]
    n = 2 * seqlen
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]
    y = torch.addcmul(y, u, D.view(-1, 1))
    y = 0.5 * y * torch.erfc(-y / 2.0 ** 0.5)
    return y * gate


def test_folds_hold_at_a_second_length():
    torch._dynamo.reset()
    before = counters[REWRITE_COUNTERS].copy()
    with no_compile_caches():
        install.install_passes()
        compiled = torch.compile(folded_block)
        for seqlen in (64, 96, 40):
            args = (torch.randn(B, H, seqlen), torch.randn(H, seqlen), torch.randn(H), torch.randn(B, H, seqlen))
            assert rel_err(compiled(*args), folded_block(*args)) < 1e-5, seqlen
    folds = ("rfft_conv_inference", "fold_skip_addcmul", "fold_gelu_erfc", "fold_output_multiplier")
    assert counter_delta(before, counters[REWRITE_COUNTERS]) == {name: 2 for name in folds}  # both graphs
