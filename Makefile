# Two commands for a fresh clone: `make run` and `make test`. Both set up
# a project-local environment (.venv, node_modules) first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CAI := $(VENV)/bin/cai

.PHONY: setup run test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: setup
	$(CAI) run

test: setup
	$(PY) -m pytest

bench: setup
	$(CAI) bench engine

clean:
	rm -rf $(VENV) node_modules .serverless build runs
