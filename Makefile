# Two commands set up everything on a fresh clone: `make quickstart` and `make test`.
# On a CPU machine torch's CPU build is installed first (TORCH_SPEC); on a GPU machine use e.g.
#   make test TORCH_SPEC=torch          (or any torch build you already installed into .venv)
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.moetune-installed

.PHONY: setup quickstart test test-all test-gpu lint format bench bench-full clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

quickstart: $(STAMP)
	$(PY) -m finetune.quickstart

test: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not gpu" -p no:cacheprovider

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(STAMP)
	$(PY) benchmarks/expert_lora.py
	$(PY) benchmarks/sparse_attention.py
	$(PY) benchmarks/sparse_decoder.py
	$(PY) benchmarks/quantized_experts.py

bench-full: $(STAMP)
	$(PY) benchmarks/full_model.py

clean:
	rm -rf $(VENV) runs build *.egg-info
