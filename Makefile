# One venv at .venv; every target that needs it depends on the stamp, so `make run` / `make test` work on a fresh clone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first, pinned to the CPU wheel on disk here: an open range would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
LINT_PATHS := splitserve tests $(wildcard benchmarks)

.PHONY: setup run test test-gpu bench lint format clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# The main job on the embedded default: the tiny model on CPU, a local Ray, 1 prefill + 1 decode worker, both APIs.
# It sends one demo request through the SDK once ready, then serves until Ctrl-C (which drains and stops).
run: $(STAMP)
	$(BIN)/splitserve serve configs/tiny-cpu.yaml --demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not gpu" tests

# On the GPU machine (see shared/gpu). Pack once here; the GPU image's grpcio (1.84) is older than the stubs need:
#   bash ../shared/gpu/pack-ray.sh 2.60.0 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 protobuf==7.36.2
# then, in a device run that carries .gpu:  source .gpu/setup.sh && make test-gpu
test-gpu:
	python3 -m pytest -q -m gpu tests

bench: $(STAMP)
	$(BIN)/python benchmarks/engine.py

lint: $(STAMP)
	$(BIN)/ruff check $(LINT_PATHS)
	$(BIN)/ruff format --check $(LINT_PATHS)
	$(BIN)/mypy splitserve

format: $(STAMP)
	$(BIN)/ruff format $(LINT_PATHS)
	$(BIN)/ruff check --fix $(LINT_PATHS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
