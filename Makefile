# codeshard: `make demo` (install + whole pipeline on Fashion-MNIST) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE := 1
export PREFECT_HOME ?= $(CURDIR)/.codeshard/prefect
export PREFECT_LOGGING_LEVEL ?= INFO

.PHONY: install data demo demo-s3 test test-all bench clean-store

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# exact versions from constraints.txt (torch 2.13.0: the local CPU wheel); one resolve installs everything
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Debian data packages (Fashion-MNIST, WordNet) when missing and apt is usable.
data:
	@if [ ! -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || [ ! -d /usr/share/wordnet ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist wordnet-base; \
	  elif command -v sudo >/dev/null; then \
	    sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist wordnet-base; \
	  else echo "install the Debian packages dataset-fashion-mnist and wordnet-base"; exit 1; fi; \
	fi

# The demo leaves the evaluation's query rows out of its indexes (--exclude-queries: recorded in each
# build.json and printed); a user's own pipeline indexes every item.
demo: install data
	mkdir -p "$(PREFECT_HOME)"
	$(BIN)/codeshard pipeline --dataset fashion-mnist --exclude-queries $(DEMO_ARGS)

# The same pipeline against a real S3 server (SeaweedFS on loopback).
demo-s3: install data
	$(BIN)/codeshard dev s3 up --env-file .codeshard/s3.env
	mkdir -p "$(PREFECT_HOME)"
	source .codeshard/s3.env && $(BIN)/codeshard pipeline --dataset fashion-mnist --exclude-queries $(DEMO_ARGS)

test: install data
	mkdir -p "$(PREFECT_HOME)"
	$(BIN)/python -m pytest -m "not slow" -q -p no:cacheprovider $(PYTEST_ARGS)

test-all: install data
	mkdir -p "$(PREFECT_HOME)"
	$(BIN)/python -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

bench: install data
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean-store:
	rm -rf .codeshard/store
