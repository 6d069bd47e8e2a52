# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv themselves.
# A torch >= 2.11 already importable (e.g. a GPU machine's CUDA build) is kept; otherwise
# torch==2.13.0 is installed (the CPU wheel on our development machines).
PYTHON ?= python3
VENV ?= .venv
VENV_ARGS ?= --system-site-packages
TORCH_SPEC ?= torch==2.13.0
TRITON_SPEC ?= triton==3.6.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
PYTEST_WORKERS ?= auto

# The oldest torch we support, for the compile-path tests (the op, the lowering passes, the models,
# export) in a venv of its own. PyPI's only Linux x86_64 build of torch 2.11 is the CUDA one (about
# 4.6 GB with its CUDA libraries, a minute to install); it runs on CPU machines too.
OLDEST_VENV ?= .venv-torch-oldest
OLDEST_TORCH_SPEC ?= torch==2.11.0
# The op and lowering tests, but not the pattern cache's (every compile on 2.11 already traces the
# patterns: the shipped ones are 2.13's; 2.13 runs the cache's fallback tests), and the H3 and
# LongConv tests that compile or export (the rest of the model tests is eager math, or compiles
# whole LMs, DDP ranks and GPT-2: 4 minutes more on 2.11 with a cold cache). CI's time budget.
OLDEST_TESTS ?= tests/test_ops.py tests/test_butterfly_ops.py tests/test_lowering_*.py \
	--ignore=tests/test_lowering_pattern_cache.py
OLDEST_MODEL_TESTS ?= tests/test_models_h3.py tests/test_models_longconv.py tests/test_models_projections.py \
	-k "compile or export or dynamic"
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_STAMP := $(OLDEST_VENV)/.installed

.PHONY: demo test test-oldest-torch gpu-check bench results-index patterns clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV_ARGS) $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) scripts/have_torch.py || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -c "import triton" 2>/dev/null || [ "$$(uname)" != Linux ] || $(PY) -m pip install -q "$(TRITON_SPEC)"
	$(PY) -m pip install -q -e '.[test]'
	touch $@

demo: $(STAMP)
	$(PY) -m lcconv_compile.demo

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS)

$(OLDEST_STAMP): pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_PY) -m pip install -q --upgrade pip
	$(OLDEST_PY) -m pip install -q "$(OLDEST_TORCH_SPEC)" "$(TRITON_SPEC)"
	$(OLDEST_PY) -m pip install -q -e '.[test]'
	$(OLDEST_PY) -c "import torch; assert torch.__version__.startswith('$(subst torch==,,$(OLDEST_TORCH_SPEC))'), torch.__version__"
	touch $@

# CI runs this after `make test`: the compile-path tests on the oldest supported torch.
test-oldest-torch: $(OLDEST_STAMP)
	$(OLDEST_PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS) $(OLDEST_TESTS)
	$(OLDEST_PY) -m pytest -q -n $(PYTEST_WORKERS) $(PYTEST_ARGS) $(OLDEST_MODEL_TESTS)

# On the GPU machine (device tool): GPU tests + benchmark in one call, results under $$OUT.
gpu-check:
	bash scripts/gpu_check.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_fftconv.py

# lowering/serialized_patterns.py, the shipped traced patterns, after a pattern edit (CI's torch only).
patterns: $(STAMP)
	$(PY) -m lcconv_compile.lowering.pattern_cache

# benchmarks/results/INDEX.md from each results JSON's meta block and README's citations.
results-index:
	python3 scripts/results_index.py

clean:
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info
