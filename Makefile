# codeshard: `make demo` (install + whole pipeline on Fashion-MNIST) and `make test`.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# GPU=1 (on every make command, or exported): the GPU build, faiss-gpu and torch's CUDA build (README "GPU").
GPU ?=
STAMP := $(VENV)/.installed$(if $(filter 1,$(GPU)),-gpu)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 120
export HF_HUB_OFFLINE := 1
export PREFECT_HOME ?= $(CURDIR)/.codeshard/prefect
export PREFECT_LOGGING_LEVEL ?= INFO

.PHONY: install data demo demo-s3 test test-all bench clean-store

$(STAMP): pyproject.toml constraints.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	rm -f $(VENV)/.installed $(VENV)/.installed-gpu
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	# faiss-cpu and faiss-gpu both install the module `faiss`: never both. After a GPU build, remove
	# both (their files overlap) and let the next line put back the one this build wants first.
	if $(BIN)/pip show -q faiss-gpu 2>/dev/null; then $(BIN)/pip uninstall -q -y faiss-gpu faiss-cpu; fi
	# exact versions from constraints.txt (torch 2.13.0: the local CPU wheel); one resolve installs everything
	$(BIN)/pip install -q -c constraints.txt -e '.[test]'
ifeq ($(GPU),1)
	# the GPU build: faiss-cpu swapped for faiss-gpu (CUDA 12 runtime wheels), torch 2.13.0's CUDA build
	# (CUDA 13 wheels) instead of the local CPU wheel ('!=2.13.0+cpu'); `pip check` then names the
	# missing faiss-cpu: expected, faiss-gpu provides the same module
	$(BIN)/pip uninstall -q -y faiss-cpu
	$(BIN)/pip install -q -c constraints.txt faiss-gpu==1.15.1 'torch==2.13.0,!=2.13.0+cpu'
	$(BIN)/python -c 'import faiss, torch; print("GPU build: faiss", faiss.__version__, "GPUs", faiss.get_num_gpus(), "| torch", torch.__version__, "CUDA", torch.cuda.is_available())'
endif
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
