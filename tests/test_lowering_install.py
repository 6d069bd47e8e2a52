"""Installation (lowering/install.py): the passes are on Inductor's hooks after import, chain
with a user's passes, switch off by function, context manager and environment variable, and key
the FX graph cache on their version.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config
from torch._inductor import custom_graph_pass

import lcconv_compile
from lcconv_compile.lowering import install
from inputs import rel_err
from lowering_helpers import GraphRecorder, compile_once, no_compile_caches

B, H, L = 2, 3, 16


def hand_written_conv(u, k):
    seqlen = u.shape[-1]
    n = 2 * seqlen
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :seqlen]


def conv_inputs(train: bool = False):
    return torch.randn(B, H, L, requires_grad=train), torch.randn(H, L, requires_grad=train)


def rewritten(result) -> bool:
    forward = result.graphs[0]
    if "lcconv.fftconv(" in forward:
        assert "_fft_" not in forward
        return True
    assert "_fft_c2r" in forward
    return False


# ------------------------------------------------------------------------------- installing --
def test_import_chains_our_passes_onto_both_hooks():
    assert isinstance(inductor_config.joint_custom_post_pass, install.ChainedPass)
    assert isinstance(inductor_config.post_grad_custom_post_pass, install.ChainedPass)
    before = (inductor_config.joint_custom_post_pass, inductor_config.post_grad_custom_post_pass)
    install.install_passes()  # idempotent: no second layer
    assert (inductor_config.joint_custom_post_pass, inductor_config.post_grad_custom_post_pass) == before


def test_env_variable_at_import_installs_nothing():
    code = ("import lcconv_compile, torch._inductor.config as c; "
            "print(c.joint_custom_post_pass, c.post_grad_custom_post_pass)")
    env = dict(os.environ, LCCONV_COMPILE_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["None", "None"]


class JointGraphRecorder(GraphRecorder):
    def uuid(self) -> bytes:
        return b"lcconv-tests-joint-recorder"


def test_user_passes_keep_running_after_ours():
    user_joint, user_post_grad = JointGraphRecorder(), GraphRecorder()
    with inductor_config.patch(joint_custom_post_pass=user_joint, post_grad_custom_post_pass=user_post_grad), \
            no_compile_caches():
        lcconv_compile.enable()  # chain ours in front of the user's passes
        assert inductor_config.joint_custom_post_pass.previous is user_joint
        u, k = conv_inputs(train=True)
        out = torch.compile(hand_written_conv, fullgraph=True)(u, k)
        torch.autograd.grad(out.sum(), (u, k))
    # The user's joint pass saw our result: the op and its backward op, no FFTs.
    (joint,) = user_joint.graphs
    assert "lcconv.fftconv(" in joint and "lcconv.fftconv_bwd(" in joint and "_fft_" not in joint
    assert len(user_post_grad.graphs) == 2  # forward and backward
    assert isinstance(inductor_config.joint_custom_post_pass, install.ChainedPass)  # patch restored ours


def test_chained_pass_calls_a_list_of_previous_passes_in_order():
    calls = []
    graph = torch.fx.symbolic_trace(lambda x: x + 1).graph
    chained = install.ChainedPass("test_hook", lambda g: calls.append("ours") or 0,
                                  [lambda g: calls.append("first"), lambda g: calls.append("second")])
    chained(graph)
    assert calls == ["ours", "first", "second"]
    assert chained.uuid() is None  # plain callables cannot be keyed: the FX cache is bypassed


@pytest.mark.skipif(not hasattr(custom_graph_pass, "CustomInferenceAwareGraphPass"),
                    reason="CustomInferenceAwareGraphPass is new in torch 2.13")
def test_inference_aware_user_pass_gets_the_flag():
    class FlagRecorder(custom_graph_pass.CustomInferenceAwareGraphPass):
        flags: list = []

        def __call__(self, graph, is_inference):
            self.flags.append(is_inference)

        def uuid(self):
            return b"flag-recorder"

    user_pass = FlagRecorder()
    with inductor_config.patch(post_grad_custom_post_pass=user_pass), no_compile_caches():
        lcconv_compile.enable()
        torch.compile(hand_written_conv, fullgraph=True)(*conv_inputs())
    assert user_pass.flags == [True]


# ------------------------------------------------------------------------------- switching --
def test_disable_and_enable():
    try:
        lcconv_compile.disable()
        assert not rewritten(compile_once(hand_written_conv, *conv_inputs()))
    finally:
        lcconv_compile.enable()
    assert rewritten(compile_once(hand_written_conv, *conv_inputs()))


def test_context_manager_wins_over_enable_and_disable():
    with lcconv_compile.passes_enabled(False):
        assert not rewritten(compile_once(hand_written_conv, *conv_inputs()))
    try:
        lcconv_compile.disable()
        with lcconv_compile.passes_enabled(True):
            assert rewritten(compile_once(hand_written_conv, *conv_inputs()))
        assert not install.passes_active()
    finally:
        lcconv_compile.enable()


def test_env_variable_turns_passes_off_at_compile_time(monkeypatch):
    monkeypatch.setenv(install.DISABLE_ENV, "1")
    with lcconv_compile.passes_enabled(True):  # the environment wins
        assert not rewritten(compile_once(hand_written_conv, *conv_inputs()))
    monkeypatch.setenv(install.DISABLE_ENV, "0")
    assert rewritten(compile_once(hand_written_conv, *conv_inputs()))


def test_uuid_follows_switch_version_dispatch_and_previous_pass(monkeypatch):
    from lcconv_compile import kernels

    chained = install.ChainedPass(install.JOINT_HOOK, lambda g: 0, GraphRecorder())
    enabled_id = chained.uuid()
    assert enabled_id[0] == install.pass_version() and enabled_id[-1] == (b"lcconv-tests-graph-recorder",)
    with lcconv_compile.passes_enabled(False):
        assert chained.uuid() != enabled_id
    # The families the dispatch tries decide what the CUDA stage emits (LCCONV_FLASHCONV6=1 adds
    # one without any source change): another list must not be served this cache entry.
    monkeypatch.setattr(kernels, "FAMILIES", (kernels.monarch_conv,) + tuple(kernels.FAMILIES))
    assert chained.uuid() != enabled_id


# ----------------------------------------------------------------------------------- caching --
def test_second_compile_hits_fx_graph_cache_and_pass_version_is_in_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def compile_training_step():
        torch._dynamo.reset()
        counters.clear()
        u, k = conv_inputs(train=True)
        du, dk = torch.autograd.grad(torch.compile(hand_written_conv, fullgraph=True)(u, k).square().sum(), (u, k))
        u64, k64 = (t.detach().double().requires_grad_() for t in (u, k))
        du64, dk64 = torch.autograd.grad(hand_written_conv(u64, k64).square().sum(), (u64, k64))
        assert rel_err(du, du64) < 1e-5 and rel_err(dk, dk64) < 1e-5
        return dict(counters["inductor"])

    with inductor_config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=False):
        first = compile_training_step()
        assert first.get("fxgraph_cache_miss") == 2 and not first.get("fxgraph_cache_hit")  # forward, backward
        second = compile_training_step()
        assert second.get("fxgraph_cache_hit") == 2 and not second.get("fxgraph_cache_miss")
        # Another version of our passes must not be served this cache entry.
        monkeypatch.setattr(install, "pass_version", lambda: b"another version of the lowering")
        third = compile_training_step()
        assert third.get("fxgraph_cache_miss") == 2 and not third.get("fxgraph_cache_hit")
    torch._dynamo.reset()

