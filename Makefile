# `make demo` and `make test` set up what they need: a .venv with the project
# installed in editable mode with its dev extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: test lint typecheck unit demo demo-web diagram clean test-long load durability bench bench-smoke fuzz fuzz-smoke fuzz-corpus coverage mutation

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
	$(BIN)/mypy --strict keymgmt_proto adapters scripts fuzz mutation
	@# keymgmt/ and bench/ import keymgmt.adapters, which the editable install maps with an
	@# import hook mypy cannot follow: give mypy the same mapping as a search path.
	mkdir -p .mypy_cache/paths/keymgmt && ln -sfn "$(CURDIR)/adapters" .mypy_cache/paths/keymgmt/adapters
	ln -sfn "$(CURDIR)/keymgmt/__init__.py" .mypy_cache/paths/keymgmt/__init__.py
	MYPYPATH=.mypy_cache/paths $(BIN)/mypy --strict bench keymgmt/__init__.py

## The suite on every core (pytest-xdist): most of its time is spent waiting on server and CLI
## processes, so one worker per core about halves it. Tests that build web/ in place share one
## worker (tests/conftest.py). TEST_WORKERS=0 runs it in one process, as plain `pytest` does.
## Tests marked serial (timing probes) run afterwards, alone. One worker per core, at most 4:
## only 2 and 4 were tried, and each worker's servers hold PostgreSQL connections of their own.
TEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); echo $$(( n < 4 ? n : 4 )))
unit: $(STAMP)
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadgroup -m "not serial"
	$(BIN)/pytest -p no:xdist -m serial

## The README's test command: lint, strict typing, the whole suite.
test: lint typecheck unit

## Long Hypothesis searches (not part of `make test`): 2,000 examples each, and 10,000 for the
## state machine over the real key-server application.
test-long: $(STAMP)
	HYPOTHESIS_PROFILE=long KEYMGMT_MACHINE_EXAMPLES=10000 $(BIN)/pytest tests/core/test_state_machine.py \
		tests/core/test_properties.py tests/server/test_keyserver_machine.py

## Branch coverage of the core and the adapters, per file, over the whole suite (a few minutes).
coverage: $(STAMP)
	$(BIN)/pytest -q -p no:cacheprovider --cov=keymgmt_proto --cov=adapters --cov-branch \
		--cov-report=term:skip-covered --cov-fail-under=0

## Mutation testing (issue #12): plant one small bug at a time in the core, the key-server
## application and its storage, and check that a test fails; about 15 minutes on 2 cores.
## Prints the kill rate per module and every survivor not listed in mutation/equivalent.txt.
## MUTATION_ARGS="--only keymgmt_proto._wire" narrows it; "--reuse" skips re-recording coverage.
MUTATION_ARGS ?=
mutation: $(STAMP)
	$(BIN)/python -m mutation $(MUTATION_ARGS)

## Bounded load test on loopback, asyncio and trio (not part of `make test`; its short
## variant is tests/system/test_load.py). Override: make load LOAD_ARGS="--clients 50 --requests 1000".
LOAD_ARGS ?= --clients 20 --requests 200 --time-limit 600
load: $(STAMP)
	$(BIN)/python -m tests.system.load $(LOAD_ARGS)

## SIGKILL crash durability (STO-1), many rounds (`make test` runs 3).
DURABILITY_ROUNDS ?= 20
durability: $(STAMP)
	KEYMGMT_DURABILITY_ROUNDS=$(DURABILITY_ROUNDS) $(BIN)/pytest -q -s tests/system/test_durability.py

## The README's first command: register, log in and send requests, printing each step.
demo: $(STAMP)
	$(BIN)/python -m keymgmt.adapters.cli.demo

## The browser client's demo page (web/demo/) against a local key server over wss: builds web/
## (npm ci when web/node_modules is missing), keeps the key server and its development CA in
## .demo-web/, serves the page on http://127.0.0.1:8080/ and prints how to trust the CA.
## DEMO_WEB_ARGS="--page-port 8081 --port 7445 --wss-port 7446" for other ports.
DEMO_WEB_ARGS ?=
demo-web: $(STAMP)
	$(BIN)/python -m scripts.web_demo $(DEMO_WEB_ARGS)

## Benchmarks: prints the table, writes bench/results.json; about 30 minutes on 2 cores (20 of them the
## 10,000-session real-server P4 line: BENCH_ARGS="--memory-server 1000:3" leaves it out).
BENCH_ARGS ?=
bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH_ARGS)

## Every benchmark with tiny sizes (seconds); writes bench/results-smoke.json.
bench-smoke: $(STAMP)
	$(BIN)/python -m bench --smoke --json bench/results-smoke.json

## Coverage-guided fuzzing (atheris): each harness in fuzz/ for FUZZ_SECONDS (default 60).
## A crash fails the target; its input is saved as fuzz/crashes/<harness>-crash-*.
FUZZ_SECONDS ?= 60
fuzz: $(STAMP)
	$(BIN)/python -m fuzz.run --seconds $(FUZZ_SECONDS)

## A few seconds per harness (also run by `make test` through tests/repo/test_fuzz_smoke.py).
fuzz-smoke: $(STAMP)
	$(BIN)/python -m fuzz.run --seconds 4

## Regenerate the seed corpora in fuzz/corpus/ from real transcripts.
fuzz-corpus: $(STAMP)
	$(BIN)/python -m fuzz.make_corpus

## Regenerate the state diagram in docs/architecture.md from the transition table.
diagram: $(STAMP)
	$(BIN)/python scripts/gen_state_diagram.py --write

clean:
	rm -rf $(VENV) .demo-web .mypy_cache .pytest_cache .ruff_cache .hypothesis .mutation .coverage
