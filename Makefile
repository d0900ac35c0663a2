# Two entry points (see README): `make test`, and `make install` before running `stablekit`.
# The CPU build of torch is installed first and pinned, so nothing later can pull a multi-GB CUDA build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint fast slow

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# open_clip is a test oracle only (tokenizer, text tower); --no-deps because its torchvision dependency
	# would replace the CPU torch. Tests load its modules without running its package __init__.
	$(BIN)/python -m pip install --quiet --no-deps open_clip_torch==3.3.0
	touch $@

lint: install
	$(BIN)/ruff check stablekit tests benchmarks
	$(BIN)/ruff format --check stablekit tests benchmarks
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest -q

slow: install
	$(BIN)/pytest -q -m slow
