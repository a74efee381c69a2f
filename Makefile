# difflab: the two commands a newcomer needs are `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0

.PHONY: install test demo bench bench-quick clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is installed first so that no dependency pulls a different build. The dev extra brings diffusers and
# transformers so that the interop tests (tests/test_interop_diffusers.py) run; they are skipped without them.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -x tests

demo: install
	$(BIN)/difflab demo --out demo_out

# diffusers (the side-by-side baseline) is an optional extra, installed with torch already present.
$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,bench]'
	touch $@

bench: $(VENV)/.bench-installed
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.run --out benchmarks/results

bench-quick: $(VENV)/.bench-installed
	OMP_NUM_THREADS=1 $(BIN)/python -m benchmarks.run --quick --out benchmarks/results/quick

clean:
	rm -rf $(VENV) demo_out
