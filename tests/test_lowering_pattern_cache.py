"""First-compile cost (lowering/pattern_cache.py, install.py): ``import lcconv_compile`` does not
import Inductor, the passes still reach its hooks before the first compile, and the search
patterns come pre-traced when the shipped file fits this torch, else are traced and cached.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch._inductor.pattern_matcher import PatternPrettyPrinter

import lcconv_compile
from lcconv_compile.lowering import passes, pattern_cache


def run_python(code: str, cache_dir=None) -> list[str]:
    env = dict(os.environ)
    env.pop("LCCONV_COMPILE_DISABLE", None)
    if cache_dir is not None:  # a fresh FX graph cache: a hit would skip the passes
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.split()


def source_of(pattern) -> str:
    return PatternPrettyPrinter.run.__wrapped__(pattern, "output")


@contextlib.contextmanager
def pattern_specs():
    """Every pattern spec, under the fake mode their example inputs belong to (trace inside)."""
    with passes.tracing_patterns() as device:
        yield [spec for _, spec in passes.tagged_pattern_specs(device)]


@pytest.fixture(scope="module")
def traced():
    with pattern_specs() as specs:
        return [source_of(passes.trace(spec)) for spec in specs]


# ------------------------------------------------------------------------ import, installing --
def test_import_does_not_import_inductor_or_dynamo_and_installs_when_inductor_loads():
    code = ("import sys, lcconv_compile; "
            "print(any(m.startswith(('torch._inductor', 'torch._dynamo')) for m in sys.modules)); "
            "import torch._inductor.config as c; from lcconv_compile.lowering import install; "
            "print(isinstance(c.joint_custom_post_pass, install.ChainedPass), "
            "isinstance(c.post_grad_custom_post_pass, install.ChainedPass))")
    assert run_python(code) == ["False", "True", "True"]


def test_import_after_inductor_installs_at_once():
    code = ("import torch._inductor.config as c, lcconv_compile; from lcconv_compile.lowering import install; "
            "print(isinstance(c.joint_custom_post_pass, install.ChainedPass))")
    assert run_python(code) == ["True"]


def test_torch_compile_after_a_bare_import_rewrites(tmp_path):
    # The first thing the process does with Inductor is torch.compile: the passes must be there.
    code = ("import torch, lcconv_compile\n"
            "def conv(u, k):\n"
            "    return torch.fft.irfft(torch.fft.rfft(u, n=32) * torch.fft.rfft(k, n=32), n=32)[..., :16]\n"
            "u, k = torch.randn(2, 3, 16), torch.randn(3, 16)\n"
            "out = torch.compile(conv, fullgraph=True)(u, k)\n"
            "from torch._dynamo.utils import counters\n"
            "print(dict(counters['lcconv']).get('rfft_conv_inference'), torch.allclose(out, conv(u, k), atol=1e-5))")
    assert run_python(code, cache_dir=tmp_path) == ["1", "True"]


def test_explain_is_the_function_whichever_module_was_imported_first():
    import lcconv_compile.lowering.explain as explain_module

    assert lcconv_compile.explain is explain_module.explain
    assert lcconv_compile.ExplainReport is explain_module.ExplainReport
    with pytest.raises(AttributeError, match="no_such_name"):
        lcconv_compile.no_such_name  # noqa: B018


# --------------------------------------------------------------------------- shipped patterns --
def _shipped_key() -> str:
    shipped = {}
    exec(pattern_cache.SHIPPED.read_text().split("\n\n\ndef build", 1)[0], shipped)
    return shipped["KEY"]


def test_shipped_patterns_are_made_for_cis_torch():
    """On every torch: the shipped file is the one CI's torch makes (a file regenerated on another
    torch would be skipped, not checked, by the test below everywhere but there)."""
    assert _shipped_key().startswith(f"torch {pattern_cache.CI_TORCH} "), (
        f"serialized_patterns.py was made on another torch: run `make patterns` on torch {pattern_cache.CI_TORCH}")
    makefile = pathlib.Path(pattern_cache.__file__).resolve().parents[2] / "Makefile"
    assert f"TORCH_SPEC ?= torch=={pattern_cache.CI_TORCH}\n" in makefile.read_text()


def test_shipped_patterns_are_the_traced_ones(traced):
    """On CI's torch the shipped file must be current (fails, never skips, when stale)."""
    if pattern_cache.torch_release() != pattern_cache.CI_TORCH:
        pytest.skip(f"torch {torch.__version__} is not CI's ({pattern_cache.CI_TORCH}): the fallback tests cover it")
    assert _shipped_key() == pattern_cache.cache_key(), (
        "serialized_patterns.py is stale for this torch: run `make patterns`")
    with pattern_specs() as specs:
        loaded = pattern_cache.read(pattern_cache.SHIPPED, pattern_cache.cache_key(), [s.name for s in specs])
    assert loaded is not None
    assert [source_of(p) for p in loaded] == traced


def test_the_key_follows_the_code_not_its_comments():
    code = 'def pattern(x):\n    """Doc."""\n    return x + 1  # one\n'
    reworded = 'def pattern(x):\n    """Other words."""\n    # a new comment\n    return x + 1  # two\n'
    changed = 'def pattern(x):\n    """Doc."""\n    return x + 2\n'
    assert pattern_cache.code_digest(code) == pattern_cache.code_digest(reworded)
    assert pattern_cache.code_digest(code) != pattern_cache.code_digest(changed)


def test_regenerating_refuses_a_torch_other_than_cis(monkeypatch):
    monkeypatch.setattr(pattern_cache, "torch_release", lambda: "0.0.1")
    with pytest.raises(SystemExit, match="CI's torch"):
        pattern_cache.regenerate()


# ------------------------------------------------------------------------------ the fallback --
@pytest.fixture
def other_torch(tmp_path, monkeypatch):
    """As on a torch the shipped file was not made for: another key, a fresh cache directory."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pattern_cache, "cache_key", lambda: "torch 0.0.0 sources test")
    return tmp_path


def test_other_torch_traces_once_then_reads_its_cache(traced, other_torch):
    calls = []

    def trace(spec):
        calls.append(spec.name)
        return passes.trace(spec)

    with pattern_specs() as specs:
        first = pattern_cache.load_or_trace(specs, trace)
    assert len(calls) == len(specs)  # the shipped file's key does not fit: every pattern traced
    assert [source_of(p) for p in first] == traced
    cached = pattern_cache.user_cache_file("torch 0.0.0 sources test")
    assert cached.is_file() and str(cached).startswith(str(other_torch))

    def must_not_trace(spec):
        raise AssertionError(f"traced {spec.name} although the cache holds it")

    with pattern_specs() as specs:
        second = pattern_cache.load_or_trace(specs, must_not_trace)
    assert [source_of(p) for p in second] == traced


@pytest.mark.parametrize("damage", ["truncated", "other_key", "fewer_patterns", "not_python"])
def test_a_cache_file_that_does_not_fit_is_traced_over(traced, other_torch, damage):
    key = pattern_cache.cache_key()
    with pattern_specs() as specs:
        names = [spec.name for spec in specs]
        text = pattern_cache.render(key, names, [passes.trace(spec) for spec in specs])
    if damage == "truncated":
        text = text[: len(text) // 2]
    elif damage == "other_key":
        text = text.replace(repr(key), repr("torch 9.9.9 sources other"))
    elif damage == "fewer_patterns":
        with pattern_specs() as specs:
            text = pattern_cache.render(key, names[:-1], [passes.trace(spec) for spec in specs[:-1]])
    else:
        text = "this is { not python"
    pattern_cache.write(pattern_cache.user_cache_file(key), text)
    assert pattern_cache.read(pattern_cache.user_cache_file(key), key, names) is None
    calls = []
    with pattern_specs() as specs:
        patterns = pattern_cache.load_or_trace(specs, lambda spec: calls.append(1) or passes.trace(spec))
    assert len(calls) == len(specs)
    assert [source_of(p) for p in patterns] == traced


def test_unwritable_cache_directory_still_traces(traced, other_torch, monkeypatch):
    def refuse(path, text):
        raise PermissionError(f"read-only: {path}")

    monkeypatch.setattr(pattern_cache, "write", refuse)
    with pattern_specs() as specs:
        patterns = pattern_cache.load_or_trace(specs, passes.trace)
    assert [source_of(p) for p in patterns] == traced
