# Two commands for a fresh clone: `make run` and `make test`. Both set up
# a project-local environment (.venv, node_modules) first when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CAI := $(VENV)/bin/cai

# The deployment (make package): the Lambda platform the layers and template are built for.
ARCH ?= x86_64
LAMBDA_PYTHON ?= 3.12
NPM ?= npm
INFERENCE_LAYER := build/layers/inference-py$(LAMBDA_PYTHON)-$(ARCH).zip

.PHONY: setup run test bench clean package lint

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: setup
	$(CAI) run

# CI runs this on a clean clone: build the deployment offline, lint it, then the tests read it.
test: setup lint
	$(PY) -m pytest

# --legacy-peer-deps: otherwise npm also pulls serverless@4, whose `sls` shadows osls's
node_modules/.installed: package.json package-lock.json
	$(NPM) ci --legacy-peer-deps --no-audit --no-fund
	touch $@

$(INFERENCE_LAYER): layers/build.py layers/inference/requirements.txt layers/inference/prune.txt | setup
	$(PY) layers/build.py inference --arch $(ARCH) --python-version $(LAMBDA_PYTHON)

# `sls package` into .serverless/ with no AWS account (a local moto server answers CloudFormation)
package: setup node_modules/.installed $(INFERENCE_LAYER)
	PY=$(PY) scripts/package_offline.sh --param="arch=$(ARCH)"

lint: package
	$(VENV)/bin/cfn-lint .serverless/cloudformation-template-update-stack.json
	node_modules/.bin/asl-validator --json-path statemachine/cai.asl.json

bench: setup
	$(CAI) bench engine

clean:
	rm -rf $(VENV) node_modules .serverless build runs
