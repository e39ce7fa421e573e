# `make demo` and `make test` are the only set-up commands: each creates .venv when it is missing. The optional
# `ultralytics` extra (AGPL-3.0) is installed too, so that the Ultralytics tests run (they skip where it is absent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the test run compiles the fused kernels (CPU and, where nvcc is present, CUDA) into a fresh folder of its own
export FA_KERNELS_BUILD ?= $(CURDIR)/build/kernels

.PHONY: demo test venv clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev,cpu,ultralytics]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py

# FA_KERNELS_CUDA=1: the tests compile the CUDA sources wherever nvcc is present, GPU or not, so a compile error
# fails the run (elsewhere they are compiled only where a GPU can run them)
test: export FA_KERNELS_CUDA ?= 1
test: $(STAMP)
	$(BIN)/python -m cuda_kernels build
	$(BIN)/python -m pytest -q -ra -n 2 --dist loadfile tests

clean:
	rm -rf runs .pytest_cache
