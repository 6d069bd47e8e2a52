"""Every committed results JSON carries one ``meta`` block (lcconv_compile/provenance.py) and
benchmarks/results/INDEX.md is what scripts/results_index.py makes of them and of README."""

import json
import os
import subprocess
import sys

import pytest

from lcconv_compile import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "results_index.py")


def test_index_is_current_and_every_result_has_meta():
    out = subprocess.run([sys.executable, SCRIPT, "--check"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_the_index_script_knows_the_required_keys():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import results_index
    finally:
        sys.path.pop(0)
    assert results_index.REQUIRED_KEYS == provenance.REQUIRED_KEYS


def test_readme_citations_skip_code_blocks_and_match_patterns():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import results_index
    finally:
        sys.path.pop(0)
    text = ("# A\nsee `benchmarks/results/x_1.json`.\n```python\n# not a heading\n```\n"
            "## B\nall of `benchmarks/results/y_*.json`\n")
    assert results_index.readme_citations(text) == [("x_1.json", "A"), ("y_*.json", "B")]


def test_run_metadata_names_the_run(monkeypatch):
    monkeypatch.setenv("LCCONV_COMMIT", "abc1234")
    meta = provenance.run_metadata("cpu", argv=[os.path.join(ROOT, "benchmarks", "bench_models.py"), "--smoke",
                                                "--out", "a b.json"])
    assert set(provenance.REQUIRED_KEYS) <= set(meta) and meta["schema"] == provenance.SCHEMA
    assert meta["commit"] == "abc1234" and meta["command"] == "python benchmarks/bench_models.py --smoke --out 'a b.json'"
    module = provenance.run_metadata("cpu", argv=[os.path.join(ROOT, "lcconv_compile", "models", "train_synthetic.py")])
    assert module["command"] == "python -m lcconv_compile.models.train_synthetic"


def test_write_results_puts_meta_first_and_refuses_a_payload_meta(tmp_path):
    path = tmp_path / "sub" / "r.json"
    written = provenance.write_results(str(path), {"rows": [1, 2]}, {"schema": "s"})
    assert json.loads(path.read_text()) == written == {"meta": {"schema": "s"}, "rows": [1, 2]}
    with pytest.raises(ValueError, match="meta"):
        provenance.write_results(str(path), {"meta": {}})
