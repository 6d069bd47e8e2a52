"""``lcconv_compile.explain`` (lowering/explain.py): which FFT convolutions were rewritten, what
was fused, what was left alone and why, and where Dynamo broke the graph."""

from __future__ import annotations

import math
import re

import expecttest
import pytest
import torch
import torch.nn.functional as F
from torch._inductor import config as inductor_config

import lcconv_compile
from lcconv_compile import ExplainReport

B, H, L = 2, 3, 16


def conv(u, k, n):
    seqlen = u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]


class TwoConvolutions(torch.nn.Module):
    """One long convolution the op computes (with a skip and a GELU), one circular one it does not."""

    def __init__(self):
        super().__init__()
        self.k = torch.nn.Parameter(torch.randn(H, L) / L)
        self.D = torch.nn.Parameter(torch.randn(H))

    def forward(self, u):
        y = F.gelu(conv(u, self.k, 2 * L) + u * self.D.unsqueeze(-1))
        return conv(y, self.k, L)  # n = L: circular


def without_line_numbers(text: str) -> str:
    return re.sub(r"\.py:\d+", ".py:N", text)


class ExplainTest(expecttest.TestCase):
    def test_inference_report(self):
        with torch.no_grad():
            report = lcconv_compile.explain(TwoConvolutions(), torch.randn(B, H, L))
        assert isinstance(report, ExplainReport)
        self.assertExpectedInline(without_line_numbers(str(report)), """\
lcconv_compile.explain: 1 graph(s), 0 graph break(s)
rewritten into lcconv::fftconv (1):
  - rfft_conv_inference at test_lowering_explain.py:N (L=16, Lk=16, fft_size=32)
fused into the op (2):
  - fold_skip at test_lowering_explain.py:N
  - fold_gelu at test_lowering_explain.py:N
left alone (1):
  - unmatched_fft at test_lowering_explain.py:N: [circular] circular convolution: the FFT inputs are not zero-padded to L + Lk - 1
graph breaks (0):""")

    def test_training_report_names_training_patterns(self):
        report = lcconv_compile.explain(TwoConvolutions(), torch.randn(B, H, L))
        assert [r.pattern for r in report.rewritten] == ["rfft_conv_training"]
        # In training the skip term is not folded (the backward reads the op's output): said so.
        assert [(r.pattern, r.code) for r in report.rejected] == [
            ("unmatched_fft", "circular"), ("neighbour_left_outside", "saved_for_backward")]
        assert "aten.add.Tensor" in report.rejected[1].reason and "backward" in report.rejected[1].reason

    def test_training_report_names_each_neighbour_left_outside(self):
        def hyena_mixer(u, k, D, gate):
            x = u * gate
            n = 2 * u.shape[-1]
            y = torch.fft.irfft(torch.fft.rfft(x, n=n) * torch.fft.rfft(k, n=n) / n, n=n, norm="forward")[..., :L]
            return F.gelu(y + x * D.unsqueeze(-1)) * gate

        inputs = [torch.randn(B, H, L), torch.randn(H, L), torch.randn(H), torch.randn(B, H, L)]
        with torch.no_grad():  # inference: everything folds, nothing is reported left outside
            report = lcconv_compile.explain(hyena_mixer, *inputs)
        assert sorted(r.pattern for r in report.fused) == ["fold_gate_in", "fold_gelu", "fold_output_multiplier",
                                                           "fold_skip"]
        assert report.rejected == []
        report = lcconv_compile.explain(hyena_mixer, *(t.requires_grad_() for t in inputs))
        assert report.fused == []
        left = {r.pattern: r for r in report.rejected}
        assert set(left) == {"neighbour_left_outside", "input_gate_left_outside"}
        assert all(r.code == "saved_for_backward" and r.stage == "fusion" for r in report.rejected)
        assert left["neighbour_left_outside"].reason.startswith("aten.add.Tensor on the op's output stays outside")
        assert "saved for the backward" in left["input_gate_left_outside"].reason

    def test_inference_output_with_another_user_is_reported(self):
        def also_returns_the_convolution(u, k, D):
            y = conv(u, k, 2 * L)
            return y + u * D.unsqueeze(-1), y

        with torch.no_grad():
            report = lcconv_compile.explain(also_returns_the_convolution, torch.randn(B, H, L), torch.randn(H, L),
                                            torch.randn(H))
        assert [r.pattern for r in report.rewritten] == ["rfft_conv_inference"] and report.fused == []
        assert [(r.pattern, r.code) for r in report.rejected] == [("neighbour_left_outside", "other_users")]
        assert report.rejected[0].reason.endswith("also used by the graph's outputs")

    def test_in_place_ops_on_the_crop_when_training_are_explained(self):
        # Inference graphs fold them (test_lowering_fusion); a training graph's backward of the
        # in-place ops (copy, slice_scatter) matches no training pattern: explain says so.
        def in_place(u, k, D):
            y = conv(u, k, 2 * L)
            y.add_(u * D[:, None])
            return y

        inputs = [torch.randn(B, H, L, requires_grad=True), torch.randn(H, L, requires_grad=True), torch.randn(H)]
        report = lcconv_compile.explain(in_place, *inputs)
        assert report.rewritten == []
        assert [(r.pattern, r.code) for r in report.rejected] == [("unmatched_fft", "unmatched")]
        assert "in-place ops on the cropped result" in report.rejected[0].reason

    def test_gelu_spellings_fold_and_a_look_alike_is_not_called_sharing(self):
        def gelu_by_erfc(u, k):
            y = lcconv_compile.fftconv(u, k)
            return 0.5 * y * torch.erfc(-y / math.sqrt(2))

        def wrong_sign(u, k):  # erfc(y / sqrt(2)) is 1 - erf(y / sqrt(2)): not Phi(y)
            y = lcconv_compile.fftconv(u, k)
            return 0.5 * y * torch.erfc(y / math.sqrt(2))

        u, k = torch.randn(B, H, L), torch.randn(H, L)
        with torch.no_grad():
            report = lcconv_compile.explain(gelu_by_erfc, u, k)
            assert [r.pattern for r in report.fused] == ["fold_gelu_erfc"] and report.rejected == []
            # Nothing else reads the op's output: no fold matches the expression, no sharing.
            report = lcconv_compile.explain(wrong_sign, u, k)
        assert report.fused == []
        assert [(r.pattern, r.code) for r in report.rejected] == [("neighbour_left_outside", "unmatched")]
        assert "no fold pattern matches" in report.rejected[0].reason

    def test_graph_breaks_are_reported(self):
        def broken(u, k):
            y = conv(u, k, 2 * L)
            torch._dynamo.graph_break()
            return conv(y, k, 2 * L)

        report = lcconv_compile.explain(broken, torch.randn(B, H, L), torch.randn(H, L))
        assert report.graph_count == 2 and report.graph_break_count == 1
        assert len(report.break_reasons) == 1
        assert [r.pattern for r in report.rewritten] == ["rfft_conv_inference"] * 2


# ------------------------------------------------------------------------- passes switched off --
def explain_conv():
    return lcconv_compile.explain(lambda u, k: conv(u, k, 2 * L), torch.randn(B, H, L), torch.randn(H, L))


def assert_reports_passes_off(report, words):
    assert words in report.passes_off, report.passes_off
    assert report.rewritten == [] and report.fused == [] and report.rejected == []
    text = str(report)
    assert "the lcconv_compile passes are OFF" in text and words in text
    assert "rewritten into" not in text and "fused into" not in text
    assert report.graph_count == 1  # Dynamo's part of the report is still there


class PassesOffTest(expecttest.TestCase):
    def test_after_disable(self):
        try:
            lcconv_compile.disable()
            report = explain_conv()
            assert not lcconv_compile.lowering.passes_active()  # explain did not switch them on
        finally:
            lcconv_compile.enable()
        assert_reports_passes_off(report, "lcconv_compile.disable() was called")
        assert [r.pattern for r in explain_conv().rewritten] == ["rfft_conv_inference"]

    def test_with_the_environment_variable(self):
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv(lcconv_compile.lowering.DISABLE_ENV, "1")
            with lcconv_compile.passes_enabled(True):  # the environment wins here too
                report = explain_conv()
        assert_reports_passes_off(report, "LCCONV_COMPILE_DISABLE=1 is set")
        self.assertExpectedInline(str(report), """\
lcconv_compile.explain: 1 graph(s), 0 graph break(s)
the lcconv_compile passes are OFF: LCCONV_COMPILE_DISABLE=1 is set.
torch.compile leaves every FFT convolution and its neighbours as written; nothing was rewritten.
graph breaks (0):""")

    def test_inside_passes_enabled_false(self):
        with lcconv_compile.passes_enabled(False):
            report = explain_conv()
        assert_reports_passes_off(report, "passes_enabled(False)")

    def test_when_a_hook_was_reassigned_after_import(self):
        with inductor_config.patch(post_grad_custom_post_pass=None):
            report = explain_conv()
            assert inductor_config.post_grad_custom_post_pass is None  # explain installed nothing
        assert_reports_passes_off(report, "post_grad_custom_post_pass no longer chains them")


# ------------------------------------------------ Inductor's "complex operators" warning --
def _complex_warnings(fn, *args):
    """The "does not support code generation for complex operators" warnings compiling ``fn``
    emits. Inductor warns once per process; its once-only cache is cleared first."""
    import warnings

    from torch._inductor import lowering

    lowering._warn_complex_not_supported.cache_clear()
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught, inductor_config.patch(fx_graph_cache=False):
        warnings.simplefilter("always")
        torch.compile(fn)(*args)
    torch._dynamo.reset()
    return [w for w in caught if "complex operators" in str(w.message)]


def test_a_rewritten_convolution_leaves_no_complex_warning():
    """Our pattern pass visits the FFT nodes before replacing them; Inductor's check of each node
    warned about complex operators that never reach code generation (make demo's first screen)."""
    u, k = torch.randn(B, H, L), torch.randn(H, L)
    assert _complex_warnings(lambda u, k: conv(u, k, 2 * L), u, k) == []


def test_an_fft_left_alone_still_gets_inductors_complex_warning():
    """A circular convolution (not the op's) keeps its FFTs: Inductor's warning must still come."""
    u, k = torch.randn(B, H, L), torch.randn(H, L)
    assert len(_complex_warnings(lambda u, k: conv(u, k, L), u, k)) == 1
