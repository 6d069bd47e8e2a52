"""benchmarks/bench_models.py: the model benchmark runs end to end at tiny sizes on CPU and writes its JSON."""

import importlib.util
import json
import os

import pytest

from lcconv_compile import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_models", os.path.join(ROOT, "benchmarks", "bench_models.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_eager_every_variant(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "models.json"
    result = bench.main(["--smoke", "--no-compile", "--variants", *bench.VARIANTS, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rows"] == json.loads(json.dumps(result["rows"]))
    assert saved["meta"]["command"].startswith("python benchmarks/bench_models.py --smoke")
    assert set(provenance.REQUIRED_KEYS) <= set(saved["meta"]) and saved["meta"]["schema"] == provenance.SCHEMA
    kinds = {(r["kind"], r["variant"]) for r in saved["rows"]}
    assert ("generate", "h3") in kinds and ("generate", "attention") in kinds
    assert all("error" not in r and r["ms"] > 0 and r["tokens_per_s"] > 0 for r in saved["rows"])
    trains = [r for r in saved["rows"] if r["kind"] == "train"]
    assert len(trains) == 2 * len(bench.VARIANTS) and {r["batch"] for r in trains} == {4, 2}  # 128 tokens at L = 32, 64
    assert "tokens/s" in capsys.readouterr().out


def test_smoke_compiled_torchfft_variant():
    """The Inductor-alone baseline compiles with our passes off and the convolutions as torch.fft."""
    bench = load_bench()
    result = bench.main(["--smoke", "--variants", "h3-torchfft", "--lengths", "32", "--infer-lengths"])
    (row,) = result["rows"]
    assert row["kind"] == "train" and row["ms"] > 0


def test_lengths_must_divide_the_tokens():
    bench = load_bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--lengths", "3000"])
