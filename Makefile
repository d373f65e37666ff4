# `make demo` and `make test` set up what they need: a .venv with the project
# installed in editable mode with its dev extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint typecheck unit demo diagram clean test-long

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "Python 3.11+ needed"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(STAMP)
	$(BIN)/mypy --strict keymgmt_proto adapters scripts

unit: $(STAMP)
	$(BIN)/pytest

## The README's test command: lint, strict typing, the whole suite.
test: lint typecheck unit

## Long Hypothesis searches (not part of `make test`).
test-long: $(STAMP)
	HYPOTHESIS_PROFILE=long $(BIN)/pytest tests/test_state_machine.py tests/test_properties.py

## The README's first command: register, log in and send requests, printing each step.
demo: $(STAMP)
	$(BIN)/python -m keymgmt.adapters.demo

## Regenerate the state diagram in docs/architecture.md from the transition table.
diagram: $(STAMP)
	$(BIN)/python scripts/gen_state_diagram.py --write

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
