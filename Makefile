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

.PHONY: demo test gpu-check bench clean

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

# On the GPU machine (device tool): GPU tests + benchmark in one call, results under $$OUT.
gpu-check:
	bash scripts/gpu_check.sh

bench: $(STAMP)
	$(PY) benchmarks/bench_fftconv.py

clean:
	rm -rf $(VENV) build *.egg-info
