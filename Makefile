# Everything a user types: make run | test | test-unit | check | demo | bench | bench-slow | bench-registry | lint
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test test-unit check demo bench bench-slow bench-registry lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python requirements.txt setup.cfg
	$(BIN)/pip install --quiet -r requirements.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

$(TSTAMP): $(STAMP) requirements-test.txt
	$(BIN)/pip install --quiet -r requirements-test.txt
	touch $@

run: $(STAMP)
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

# Test processes (pytest-xdist; 0 runs the tests in pytest's own process, one at a time). The
# integration tests mostly wait (on gunicorn booting, upstreams, deadlines), so they take more
# processes than the machine has cores; a file's tests stay in one process (--dist loadfile),
# in order, with the file's module-scoped gateways.
UNIT_JOBS ?= 2
TEST_JOBS ?= 4

# Unit tests first: they fail in seconds where the integration tests take minutes.
test: $(TSTAMP)
	$(BIN)/python -m pytest tests/unit -n $(UNIT_JOBS) $(PYTEST_ARGS)
	$(BIN)/python -m pytest tests/integration -n $(TEST_JOBS) --dist loadfile $(PYTEST_ARGS)

test-unit: $(TSTAMP)
	$(BIN)/python -m pytest tests/unit -n $(UNIT_JOBS) $(PYTEST_ARGS)

# The one command before a commit: lint, types, unit tests.
check: lint test-unit

lint: $(TSTAMP)
	$(BIN)/ruff check gateway_app tests examples bench docs wsgi.py gunicorn.conf.py
	$(BIN)/mypy gateway_app

demo: $(STAMP)
	bash examples/demo.sh

bench: $(STAMP)
	bash bench/run.sh

bench-slow: $(STAMP)
	$(BIN)/python bench/slow_clients.py $(BENCH_SLOW_ARGS)

bench-registry: $(STAMP)
	$(BIN)/python -m bench.registry_scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
