# Everything a user types: make run | test | demo | bench | bench-registry | lint
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: run test demo bench bench-registry lint clean

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

test: $(TSTAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(TSTAMP)
	$(BIN)/ruff check gateway_app tests examples bench wsgi.py gunicorn.conf.py
	$(BIN)/mypy gateway_app

demo: $(STAMP)
	bash examples/demo.sh

bench: $(STAMP)
	bash bench/run.sh

bench-registry: $(STAMP)
	$(BIN)/python -m bench.registry_scale $(BENCH_ARGS)

clean:
	rm -rf $(VENV) var build *.egg-info
